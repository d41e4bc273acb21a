"""Data for MuE: a synthetic shapes world that poses both of the paper's tasks, and loaders for
the real ones (COCO captions, SNLI-VE) from files you already have. Nothing is ever downloaded.

The paper (Sec. 4) fine-tunes OFA on COCO captioning and SNLI-VE with OFA's prompts. The shapes
world asks the same two questions of procedurally drawn scenes:

    captioning   "what does the image describe?"                      -> "a red circle and a box"
    entailment   'does the image describe " there is a red shape "?'  -> yes / no / maybe

A scene is a 3x3 grid of 1 to `max_objects` items: objects (circle, square, cross in four
colours) and perhaps a closed box, which may hide one object or nothing. A hypothesis is "yes" if
it holds whatever the box hides, "no" if it fails whatever it hides, "maybe" otherwise; so the
label needs the claim and the image together. Train, val and test never share a scene. Why the
world is what it is (colours and counts only, 24 px): docs/results.md, "The world".

    python data.py                       # grid of samples -> out/shapes_samples.png, difficulty mix
    python data.py --task ve --n 16 --out out/ve.png
    python data.py --check --data snli_ve --ann snli_ve/ --images flickr30k-images/
"""

import argparse
import ast
import inspect
import json
import os
import random
import re
import sys
import time
import zlib
from collections import Counter
from dataclasses import dataclass, fields

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet, as OFA's ResNet stem expects

CAPTION_PROMPT = "what does the image describe?"  # OFA's prompts, verbatim
VE_PROMPT = 'does the image describe " {} "?'

# -----------------------------------------------------------------------------
# tokenizer: one id per lower-cased word or punctuation mark

_TOKEN = re.compile(r"\w+|[^\w\s]")


def clean(text: str) -> str:
    """Real-data text as OFA preprocesses it: lower case, punctuation dropped, single spaces."""
    return " ".join(re.sub(r"[^\w\s]", "", text.lower()).split())


class Tokenizer:
    """Word-level vocabulary. `words` is the whole list, the four specials first (ids 0..3).

    Assumes texts are split by `_TOKEN` (words and single punctuation marks), so a cleaned text
    survives decode(encode(text)) unchanged when all its words are in the vocabulary."""

    pad_id, bos_id, eos_id, unk_id = PAD_ID, BOS_ID, EOS_ID, UNK_ID

    def __init__(self, words: list[str]):
        if list(words[:4]) != SPECIALS:
            raise ValueError(f"the vocabulary must start with {SPECIALS}")
        if len(set(words)) != len(words):
            raise ValueError("duplicate words in the vocabulary")
        self.words = list(words)
        self.ids = {w: i for i, w in enumerate(self.words)}

    @classmethod
    def build(cls, texts, min_count: int = 1) -> "Tokenizer":
        """From a training split: words seen at least min_count times, most frequent first."""
        counts = Counter(w for t in texts for w in _TOKEN.findall(t.lower()))
        kept = [w for w, c in counts.items() if c >= min_count]
        kept.sort(key=lambda w: (-counts[w], w))  # deterministic: frequency, then alphabet
        return cls(SPECIALS + kept)

    def encode(self, text: str) -> list[int]:
        return [self.ids.get(w, UNK_ID) for w in _TOKEN.findall(text.lower())]

    def decode(self, ids) -> str:
        out = []
        for i in ids.tolist() if hasattr(ids, "tolist") else ids:
            if i == EOS_ID:
                break
            if i not in (PAD_ID, BOS_ID):
                out.append(self.words[i] if 0 <= i < len(self.words) else "<unk>")
        return " ".join(out)

    def __len__(self) -> int:
        return len(self.words)

    def state_dict(self) -> dict:
        return {"words": list(self.words)}  # plain strings: fine for torch.load(weights_only=True)

    @classmethod
    def from_state_dict(cls, d) -> "Tokenizer":
        return cls(d["words"])


# -----------------------------------------------------------------------------
# the shapes world: scenes, and the texts that are true of them

SHAPES = ("circle", "square", "cross")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
           "yellow": (235, 200, 30)}
NUMBERS = ("", "a", "two", "three", "four")  # a count never exceeds max_objects (at most 4)
KINDS = ("colour", "count")
LABELS = ("yes", "no", "maybe")  # entailment, contradiction, neutral
SPLIT_SIZES = {"train": 100_000, "val": 500, "test": 500}  # drawn on the fly: big train is free
MAX_CAPTION_WORDS = 16  # bounds max_objects: n different objects take 4n - 1 words


@dataclass(frozen=True)
class Obj:
    shape: str | None  # None on both: the unknown object a box might hide (matches anything)
    colour: str | None
    row: int
    col: int


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]  # visible objects in reading order (row, then column)
    box: tuple[int, int] | None  # (row, col) of the closed box, if any

    def key(self) -> str:
        """Everything a text can say about the scene, and nothing else (no jitter, no noise)."""
        objs = ";".join(f"{o.colour} {o.shape} {o.row}{o.col}" for o in self.objects)
        return f"{objs}|box {self.box}"


def split_of(scene: Scene) -> str:
    """The one split a scene may appear in: a fixed hash, independent of any seed."""
    h = zlib.crc32(scene.key().encode()) % 10
    return "test" if h == 0 else "val" if h == 1 else "train"


def plural(noun: str) -> str:
    return noun + ("es" if noun.endswith("s") else "s")  # crosses, boxes, circles


def captions(scene: Scene) -> list[str]:
    """Reference captions, all true. The first, items in reading order with identical ones grouped
    ("two red circles"), is the training target: one deterministic phrasing is easier for a small
    model, and the others ("there is ...", reversed, a spatial one for two items) make BLEU /
    CIDEr reward the content rather than one word order. At most 16 words each."""
    items = [(o.row, o.col, f"{o.colour} {o.shape}") for o in scene.objects]
    items = sorted(items + ([(*scene.box, "box")] if scene.box else []))  # reading order

    def listing(names):
        groups = Counter(names)  # keeps first-appearance order
        return " and ".join(f"a {n}" if c == 1 else f"{NUMBERS[c]} {plural(n)}"
                            for n, c in groups.items())

    brief = listing([it[2] for it in items])
    refs = [brief, ("there is " if brief.startswith("a ") else "there are ") + brief,
            listing([it[2] for it in reversed(items)])]
    if len(items) == 2:
        (r0, _, a), (r1, _, b) = items
        refs.append(f"a {a} {'above' if r0 < r1 else 'left of'} a {b}")
    refs = [r for r in dict.fromkeys(refs) if len(r.split()) <= MAX_CAPTION_WORDS]
    if not refs or refs[0] != brief:  # not an assert: python -O must not let it through
        raise ValueError(f"caption too long: {brief!r} (fewer objects, please)")
    return refs


# A claim is (colour, k): "there is a <colour> shape" (k = 1, kind "colour") or "there are at
# least <k> <colour> shapes" (k = 2, 3, kind "count"). Holding is existential, hence monotone in
# the set of objects.


def _holds(claim, objs) -> bool:
    colour, k = claim
    return sum(o.colour in (None, colour) for o in objs) >= k  # None: what a box may hide


def _label(claim, scene: Scene) -> str:
    if _holds(claim, scene.objects):
        return "yes"  # monotone: still true whatever the box adds
    hidden = Obj(None, None, *scene.box) if scene.box else None  # the box's best case
    return "maybe" if hidden and _holds(claim, scene.objects + (hidden,)) else "no"


def hypothesis(claim) -> str:
    colour, k = claim
    if k == 1:
        return f"there is a {colour} shape"
    return f"there are at least {NUMBERS[k]} {colour} shapes"


def _propose(rnd: random.Random, kind: str, objs) -> tuple:
    # half the time a visible object's colour, so that "yes" is reachable quickly
    colour = rnd.choice(objs).colour if rnd.random() < 0.5 else rnd.choice(tuple(COLOURS))
    return colour, 1 if kind == "colour" else rnd.randint(2, 3)


def render(scene: Scene, rnd: random.Random, image_size=24, grid=3, clutter=3,
           noise=0.03) -> torch.Tensor:
    """Draw a scene -> (3, image_size, image_size) float32, ImageNet-normalised. Jitter stays under
    0.05 of a cell, so every object covers its cell's centre and rows / columns stay unambiguous."""
    s, cell = image_size, image_size / grid
    img = Image.new("RGB", (s, s), tuple(rnd.randint(215, 255) for _ in range(3)))
    d = ImageDraw.Draw(img)
    for _ in range(rnd.randint(0, clutter)):  # thin light strokes behind the items: never an object
        g = rnd.randint(150, 200)
        d.line([rnd.uniform(0, s) for _ in range(4)], fill=(g, g, g), width=1)
    for o in scene.objects:
        cx = (o.col + 0.5 + rnd.uniform(-0.05, 0.05)) * cell
        cy = (o.row + 0.5 + rnd.uniform(-0.05, 0.05)) * cell
        r = 0.40 * cell
        fill = tuple(min(255, max(0, c + rnd.randint(-12, 12))) for c in COLOURS[o.colour])
        if o.shape == "circle":  # a ring: its open centre tells it from a square at 2x2 px
            d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(1, round(0.4 * r)))
        elif o.shape == "square":
            d.rectangle([cx - 0.85 * r, cy - 0.85 * r, cx + 0.85 * r, cy + 0.85 * r], fill=fill)
        else:  # a cross: open corners, a full centre
            w = 0.36 * r
            d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
            d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    if scene.box:
        cx, cy = (scene.box[1] + 0.5) * cell, (scene.box[0] + 0.5) * cell
        h, dark = 0.38 * cell, (50, 45, 40)
        d.rectangle([cx - h, cy - h, cx + h, cy + h], fill=(128, 118, 108), outline=dark,
                    width=max(1, s // 64))
        d.line([cx - h, cy - h, cx + h, cy + h], fill=dark, width=1)  # the cross on the lid
        d.line([cx - h, cy + h, cx + h, cy - h], fill=dark, width=1)
    x = np.asarray(img, dtype=np.float32) / 255.0  # (H, W, 3)
    if noise:
        x = np.clip(x + np.random.default_rng(rnd.getrandbits(64)).normal(0, noise, x.shape), 0, 1)
    x = (x - np.array(MEAN, np.float32)) / np.array(STD, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32))


@dataclass
class Sample:
    image: torch.Tensor  # (3, H, W) float32, ImageNet-normalised
    src: str  # prompt
    tgt: str  # training target text
    refs: list[str]  # references for evaluation: several captions, or [label]
    task: str  # "caption" or "ve"
    prefix: str = ""  # what the decoder reads after bos, before the target: for VE the prompt
    # itself (OFA's prev_output, which the authors' MuE scripts train with), "" for captions


@dataclass
class Spec:
    """Everything about a shapes sample except its pixels (cheap: no rendering)."""
    scene: Scene
    task: str
    kind: str  # hypothesis kind for "ve", "caption" for captions
    src: str
    tgt: str
    refs: list[str]


class ShapesDataset(Dataset):
    """Sample i is a pure function of (seed, split, task, i), drawn when asked. task="multi"
    alternates caption (even i) and ve (odd i); VE labels cycle yes / no / maybe and kinds every
    three VE samples, so both are balanced. spec(i) gives the texts and the scene without pixels.
    p_box: the chance of a box (forced for "maybe"; a label no boxed scene can carry falls back
    to one without after 50 draws); clutter: at most this many strokes; noise: pixel std on the
    [0, 1] scale. Settings the world cannot serve are refused here, not at sample 1000."""

    def __init__(self, split="train", task="multi", size=None, seed=0, image_size=24,
                 max_objects=4, p_box=0.5, clutter=3, noise=0.03, grid=3):
        if split not in SPLIT_SIZES:
            raise ValueError(f"split must be one of {tuple(SPLIT_SIZES)}, got {split!r}")
        if task not in ("multi", "caption", "ve"):
            raise ValueError(f"task must be multi, caption or ve: {task!r}")
        if not (2 <= max_objects < grid * grid):
            raise ValueError(f"max_objects={max_objects}: need 2 <= max_objects < grid * grid "
                             f"= {grid * grid} (room for an object and a box)")
        if 4 * max_objects - 1 > MAX_CAPTION_WORDS:
            raise ValueError(f"max_objects={max_objects}: captions would reach "
                             f"{4 * max_objects - 1} words, over MAX_CAPTION_WORDS = "
                             f"{MAX_CAPTION_WORDS}; at most {(MAX_CAPTION_WORDS + 1) // 4}")
        if not (0 <= p_box <= 1 and noise >= 0 and isinstance(clutter, int) and clutter >= 0):
            raise ValueError(f"need p_box in [0, 1], noise >= 0, an integer clutter >= 0; got "
                             f"p_box={p_box!r}, noise={noise!r}, clutter={clutter!r}")
        if not (isinstance(image_size, int) and image_size >= 1 and (size or 0) >= 0):
            raise ValueError(f"need an integer image_size >= 1 and size >= 0; got "
                             f"image_size={image_size!r}, size={size!r}")
        self.split, self.task, self.seed, self.image_size = split, task, seed, image_size
        self.size = SPLIT_SIZES[split] if size is None else size
        self.max_objects, self.p_box, self.grid = max_objects, p_box, grid
        self.clutter, self.noise = clutter, noise

    def __len__(self):
        return self.size

    def _scene(self, rnd: random.Random, box: bool) -> Scene:
        for _ in range(1000):  # val / test accept 1 draw in 10
            n = rnd.randint(1, self.max_objects - box)  # a box takes an item slot: short captions
            cells = [divmod(c, self.grid) for c in rnd.sample(range(self.grid**2), n + box)]
            objs = tuple(Obj(rnd.choice(SHAPES), rnd.choice(tuple(COLOURS)), r, c)
                         for r, c in sorted(cells[:n]))
            scene = Scene(objs, cells[n] if box else None)
            if split_of(scene) == self.split:
                return scene
        raise RuntimeError(f"no {self.split} scene in 1000 draws")

    def spec(self, i: int) -> Spec:
        if not 0 <= i < self.size:
            raise IndexError(f"index {i} out of range for {self.size} samples")
        # a str seed goes through sha512: the same stream in every process, whatever PYTHONHASHSEED
        rnd = random.Random(f"shapes/{self.seed}/{self.split}/{self.task}/{i}")
        task = ("caption", "ve")[i % 2] if self.task == "multi" else self.task
        if task == "caption":
            scene = self._scene(rnd, box=rnd.random() < self.p_box)
            refs = captions(scene)
            return Spec(scene, task, "caption", CAPTION_PROMPT, refs[0], refs)
        j = i // 2 if self.task == "multi" else i  # index among the VE samples
        label, kind = LABELS[j % 3], KINDS[j // 3 % len(KINDS)]
        for attempt in range(200):  # some scenes admit no claim with this label ("no" with a box)
            box = label == "maybe" or (attempt < 50 and rnd.random() < self.p_box)
            scene = self._scene(rnd, box)
            for _ in range(30):
                claim = _propose(rnd, kind, scene.objects)
                if _label(claim, scene) == label:
                    src = VE_PROMPT.format(hypothesis(claim))
                    return Spec(scene, task, kind, src, label, [label])
        raise RuntimeError(f"no {kind} claim labelled {label} for sample {i}")

    def scene(self, i: int) -> Scene:
        return self.spec(i).scene

    def __getitem__(self, i: int) -> Sample:
        sp = self.spec(i)
        rnd = random.Random(f"render/{self.seed}/{self.split}/{self.task}/{i}")
        image = render(sp.scene, rnd, self.image_size, self.grid, self.clutter, self.noise)
        return Sample(image, sp.src, sp.tgt, sp.refs, sp.task, sp.src if sp.task == "ve" else "")


def shapes_settings(text: str) -> dict:
    """'max_objects=2,p_box=0.3' -> {"max_objects": 2, "p_box": 0.3}: ShapesDataset's settings as
    --shapes gives them. The names are read off ShapesDataset, so a setting you add there
    (docs/exercises.md, exercise 3) is a name here too."""
    fixed = ("split", "task", "size", "seed", "image_size")  # the command lines set these
    names = [n for n in inspect.signature(ShapesDataset).parameters if n not in fixed]
    out = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = (w.strip() for w in item.partition("="))
        try:
            out[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[name] = None  # refused below, with the names
        if name not in names or not isinstance(out[name], (int, float)):
            raise ValueError(f"--shapes {item!r}: expected NAME=NUMBER, NAME one of "
                             f"{', '.join(names)} (ShapesDataset's settings)")
    return out


def shapes_max_tokens() -> tuple[int, int]:
    """The longest prompt and the longest decoder input the shapes grammar writes, in tokens:
    what MuEConfig's max_src_len / max_tgt_len must hold (VE's decoder reads bos, the prompt
    and the answer; a caption bos and MAX_CAPTION_WORDS words)."""
    prompt = len(_TOKEN.findall(VE_PROMPT.format("there are at least three yellow shapes")))
    return prompt, max(MAX_CAPTION_WORDS + 1, prompt + 2)


def shapes_tokenizer() -> Tokenizer:
    """Every word the shapes grammar can produce, alphabetically (a fixed, seed-free vocabulary)."""
    grammar = "there is are at least and of box shape shapes"
    words = {w for t in (CAPTION_PROMPT, VE_PROMPT.format(""), grammar) for w in _TOKEN.findall(t)}
    words |= set(COLOURS) | set(LABELS) | set(NUMBERS[1:]) | {"above", "left"}  # captions
    words |= set(SHAPES) | {plural(s) for s in SHAPES}
    return Tokenizer(SPECIALS + sorted(words))


# -----------------------------------------------------------------------------
# real data: COCO captions (Karpathy split) and SNLI-VE, from the files as they are published

VE_PREMISE_PROMPT = 'can image and text1 " {} " imply text2 " {} "?'  # OFA's --add-caption
# Text limits that train.py defaults to per source: the authors' SNLI-VE script reads up to 80
# source tokens, and the decoder reads bos, that prompt again (prev_output) and the answer.
REAL_LENGTHS = {"coco": {"max_src_len": 32, "max_tgt_len": 32},
                "snli_ve": {"max_src_len": 80, "max_tgt_len": 82}}
# Words seen fewer times in the training texts read as <unk>: the Karpathy-split preprocessing
# (neuraltalk2's prepro.py, word_count_threshold 5) keeps those seen more than 5 times.
MIN_COUNT = 6
IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)  # Pillow's


class BadImage(ValueError):
    """An image that cannot be read, said in one line: the file, the annotation naming it, and
    Pillow's reason. Raised in a DataLoader worker, it reaches the main process rebuilt from one
    string, the worker's whole traceback (torch's ExceptionWrapper.reraise), whose last line is
    "data.BadImage: <our line>": only that line is kept, so the user reads one line, not a trace."""

    def __init__(self, message: str):
        super().__init__(message.rstrip().splitlines()[-1].split("BadImage: ", 1)[-1])


def read_image(path: str) -> Image.Image:
    """Open and decode the whole file, as RGB (grayscale and CMYK files are converted). Pillow
    opens lazily, so only decoding finds a truncated file. OFA lets Pillow pad those with gray
    (ImageFile.LOAD_TRUNCATED_IMAGES); we refuse them: a cut file is a broken download."""
    with Image.open(path) as im:
        return im.convert("RGB")


def _reason(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__  # one line, whatever Pillow says


def _transform(image_size: int):
    # imported here: torchvision takes seconds to import and the shapes world never needs it
    from torchvision import transforms as T

    # OFA squashes to a square (no crop), bicubic; then the same normalisation as the shapes
    return T.Compose([T.Resize((image_size, image_size), interpolation=T.InterpolationMode.BICUBIC,
                               antialias=True), T.ToTensor(), T.Normalize(MEAN, STD)])


class AnnotatedImages(Dataset):
    """Samples named by annotation files, images read when a sample is asked for. items: (image
    path, prompt, target, references, where), `where` naming the annotation in every message
    about the sample; `cut` counts the texts shortened to fit the model (`cut_note`: how)."""

    task = ""  # "caption" or "ve"

    def _finish(self, ann_path, image_size, must_exist):
        """Called last by __init__: no run starts without its images (data.py --check)."""
        self.tf = _transform(image_size)
        named = self.images()
        missing = [(p, w[0]) for p, w in named.items() if must_exist and not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} of {len(named)} images named by {ann_path} "
                                    f"are missing, first {missing[0][0]} ({missing[0][1]})")

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i) -> Sample:
        path, src, tgt, refs, where = self.items[i]
        try:
            image = self.tf(read_image(path))
        except IMAGE_ERRORS as e:
            raise BadImage(f"cannot read image {path} (named by {where}): {_reason(e)}") from e
        return Sample(image, src, tgt, refs, self.task, src if self.task == "ve" else "")

    def texts(self) -> list[str]:
        """Every prompt and target, as often as the model reads them (for Tokenizer.build)."""
        return [t for _, src, tgt, _, _ in self.items for t in (src, tgt)]

    def images(self) -> dict[str, list[str]]:
        """Image path -> the annotations naming it, in file order."""
        out = {}
        for path, *_, where in self.items:
            out.setdefault(path, {})[where] = None  # a COCO entry names its image once per caption
        return {path: list(wheres) for path, wheres in out.items()}

    def summary(self) -> str:
        cut = f"; {self.cut} {self.cut_note}" if self.cut else ""
        return f"{len(self.items)} samples, {len(self.images())} images{cut}"


class CocoCaptions(AnnotatedImages):
    """COCO captions in Karpathy's split: dataset_coco.json as neuraltalk2 published it (the
    schema: docs/reference.md, "Real data"); images at <image_dir>/<filepath>/<filename> or
    <image_dir>/<filename>. "train" takes "restval" too, one sample per caption; val and test
    one per image, its first caption the target, all of them references (never cut). A target
    longer than max_target words keeps its first max_target, as OFA's pre_caption does."""

    task = "caption"

    def __init__(self, ann_path, image_dir, split="train", image_size=64, max_target=31,
                 size=None, must_exist=True):
        wanted = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}
        if split not in wanted:
            raise ValueError(f"split must be train, val or test, got {split!r}")
        try:
            with open(ann_path, encoding="utf-8") as f:
                ann = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{ann_path}:{e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(ann, dict) or not isinstance(ann.get("images"), list):
            raise ValueError(f"{ann_path}: expected a top-level 'images' list (Karpathy format)")
        self.items, self.cut = [], 0
        self.cut_note = f"target captions cut to {max_target} words"
        for k, im in enumerate(ann["images"]):
            if size is not None and len(self.items) >= size:
                break
            where = f"{ann_path}: images[{k}]"
            try:
                sp, name = im["split"], im["filename"]
                refs = [clean(" ".join(s["tokens"]) if s.get("tokens") else s["raw"])
                        for s in im["sentences"]]
            except (KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"{where}: malformed entry, {type(e).__name__}: {e}") from None
            if sp not in ("train", "restval", "val", "test"):
                raise ValueError(f"{where}: unknown split {sp!r}")
            if sp not in wanted[split]:
                continue
            if not refs or not all(refs):
                raise ValueError(f"{where}: no captions, or an empty one")
            path = os.path.join(image_dir, im.get("filepath", ""), name)
            if not os.path.isfile(path) and os.path.isfile(os.path.join(image_dir, name)):
                path = os.path.join(image_dir, name)
            for r in refs if split == "train" else refs[:1]:
                words = r.split()
                self.cut += len(words) > max_target
                self.items.append((path, CAPTION_PROMPT, " ".join(words[:max_target]), refs,
                                   where))
        self.items = self.items[:size]  # a training image adds up to five at once
        self._finish(ann_path, image_size, must_exist)


class SnliVE(AnnotatedImages):
    """SNLI-VE as published (github.com/necla-ml/SNLI-VE): snli_ve_{train,dev,test}.jsonl, an
    SNLI line each plus Flickr30K_ID, the image <image_dir>/<Flickr30K_ID>.jpg (docs/reference.md,
    "Real data"). premise=True is the authors' recipe (OFA's --add-caption): the prompt reads
    sentence1, a caption of the image, and sentence2, the hypothesis; premise=False the
    hypothesis alone. The prompt is also the decoder's prefix (prev_output); one over max_prompt
    tokens loses words from the end of the premise first, and `cut` counts it. A gold_label "-"
    line is refused: SNLI-VE's generator dropped them, so such a file is not SNLI-VE."""

    task = "ve"
    LABELS = {"entailment": "yes", "contradiction": "no", "neutral": "maybe"}

    def __init__(self, jsonl_path, image_dir, image_size=64, premise=True, max_prompt=80,
                 size=None, must_exist=True):
        template = VE_PREMISE_PROMPT if premise else VE_PROMPT
        texts = ("sentence1", "sentence2") if premise else ("sentence2",)
        need = ("Flickr30K_ID", *texts, "gold_label")
        room = max_prompt - len(_TOKEN.findall(template.format(*[""] * len(texts))))
        if room < 2 * len(texts):
            raise ValueError(f"{max_prompt} tokens leave no room for the texts of {template!r}")
        self.items, self.cut = [], 0
        self.cut_note = f"prompts cut to {max_prompt} tokens (the premise first)"
        with open(jsonl_path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if size is not None and len(self.items) >= size:
                    break
                if not line.strip():
                    continue
                where = f"{jsonl_path}:{n}"
                try:
                    r = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
                if not isinstance(r, dict) or not all(k in r for k in need):
                    raise ValueError(f"{where}: needs the fields {', '.join(need)}, as in the "
                                     f"published SNLI-VE files")
                if r["gold_label"] not in self.LABELS:
                    raise ValueError(f"{where}: unknown gold_label {r['gold_label']!r}, expected "
                                     f"one of {tuple(self.LABELS)} (SNLI-VE has no '-' lines)")
                words = [clean(str(r[k])).split() for k in texts]  # [premise,] hypothesis
                if not all(words):
                    raise ValueError(f"{where}: empty {' or '.join(texts)}")
                if sum(map(len, words)) > room:
                    self.cut += 1
                    words[0] = words[0][:max(1, room - sum(map(len, words[1:])))]
                    words[-1] = words[-1][:room - sum(map(len, words[:-1]))]
                src = template.format(*(" ".join(w) for w in words))
                label = self.LABELS[r["gold_label"]]
                path = os.path.join(image_dir, f"{r['Flickr30K_ID']}.jpg")
                self.items.append((path, src, label, [label], where))
        self._finish(jsonl_path, image_size, must_exist)


def check_source(source: str, ann: str = "", images: str = "", shapes: str = ""):
    """The settings of a data source, checked before anything is read (train.py checks them
    before its first step): ValueError names the flag that is wrong."""
    if source not in ("shapes", "coco", "snli_ve"):
        raise ValueError(f"unknown data source {source!r}: expected shapes, coco or snli_ve")
    if source == "shapes":
        ShapesDataset(**shapes_settings(shapes))  # the names and the values of --shapes
    elif shapes:
        raise ValueError(f"--shapes sets the shapes world, not {source}")
    elif not (ann and images):
        raise ValueError(f"data {source} needs --ann and --images, an annotation path and an "
                         f"image folder (nothing is downloaded)")


def load_split(source: str, split: str, ann: str = "", images: str = "", image_size: int = 24,
               task: str = "multi", seed: int = 0, size: int | None = None, premise: bool = True,
               max_src_len: int = 32, max_tgt_len: int = 32, must_exist: bool = True,
               shapes: str = "") -> Dataset:
    """One split ("train", "val" or "test") of a source, its first `size` samples (all if None):
    "shapes" (task, seed, and ShapesDataset settings in `shapes`), "coco" (ann:
    dataset_coco.json) or "snli_ve" (ann: the folder of snli_ve_{train,dev,test}.jsonl, or a
    path with "{split}"; val is the dev file). Real texts are cut to the model's limits, and
    counted. train.py and eval.py both load here, so they score the same samples."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test, got {split!r}")
    check_source(source, ann, images, shapes)
    if source == "shapes":
        return ShapesDataset(split, task, size=size, seed=seed, image_size=image_size,
                             **shapes_settings(shapes))
    if source == "coco":  # the decoder reads bos + the caption: max_tgt_len - 1 words
        return CocoCaptions(ann, images, split, image_size, max_tgt_len - 1, size, must_exist)
    name = "dev" if split == "val" else split
    path = ann.format(split=name) if "{split}" in ann else os.path.join(
        ann, f"snli_ve_{name}.jsonl")
    # the prompt is the encoder's input and, after bos and before the answer, the decoder's
    return SnliVE(path, images, image_size, premise, min(max_src_len, max_tgt_len - 2), size,
                  must_exist)


def unknown_words(tok: Tokenizer, texts) -> dict:
    """How many words of `texts` the vocabulary does not know: the model reads them as <unk>."""
    ids = [i for t in texts for i in tok.encode(t)]
    unk = ids.count(UNK_ID)
    return {"unknown": unk, "words": len(ids), "share": unk / len(ids) if ids else 0.0}


# -----------------------------------------------------------------------------
# batches


@dataclass
class Batch:
    images: torch.Tensor  # (B, 3, H, W)
    src: torch.Tensor  # (B, S) long, pad_id after the prompt
    prefix: torch.Tensor  # (B, P) long: [bos] + the decoder's prefix (Sample.prefix), pad after
    tgt_in: torch.Tensor  # (B, T) long: prefix + target, the decoder's input
    targets: torch.Tensor  # (B, T) long: target + [eos] where the prefix's last token and the
    # target are read, pad_id elsewhere (the prefix is not scored, as in OFA)
    src_mask: torch.Tensor  # (B, S) bool, True on real tokens
    tgt_mask: torch.Tensor  # (B, T) bool, True on scored positions (targets != pad_id)
    tasks: list[str]
    refs: list[list[str]]

    def to(self, device) -> "Batch":
        vals = {f.name: getattr(self, f.name) for f in fields(self)}
        return Batch(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in vals.items()})


def collate(samples: list[Sample], tok: Tokenizer, max_src_len: int = 32, max_tgt_len: int = 32,
            truncate: bool = False) -> Batch:
    """Pad to the longest in the batch. max_tgt_len counts the decoder's whole input: bos, the
    prefix and the target, so prefix + target may have max_tgt_len - 1 tokens. A longer text
    raises ValueError, naming it, unless truncate=True (then the source keeps its first
    max_src_len tokens, the prefix bos and as many, the target what fits, and eos): a caption
    cut in silence would teach the model to stop mid-sentence. functools.partial(collate,
    tok=tok) is a DataLoader collate_fn (picklable for workers)."""
    src = [tok.encode(s.src) for s in samples]
    pre = [[BOS_ID] + tok.encode(s.prefix) for s in samples]
    tgt = [tok.encode(s.tgt) for s in samples]
    for k, (s, p, t) in enumerate(zip(src, pre, tgt, strict=True)):
        if not truncate and (len(s) > max_src_len or len(p) + len(t) > max_tgt_len):
            raise ValueError(
                f"batch sample {k} ({samples[k].task}) too long: source {len(s)} tokens (max "
                f"{max_src_len}), bos + prefix {len(p)} + target {len(t)} (max {max_tgt_len}); "
                f"src={samples[k].src!r} tgt={samples[k].tgt!r}. Raise the limits or truncate=True")
    src = [s[:max_src_len] for s in src]
    pre = [p[:min(1 + max_src_len, max_tgt_len - 1)] for p in pre]  # bos + the prompt, if it fits
    tgt = [t[:max_tgt_len - len(p)] for p, t in zip(pre, tgt, strict=True)]
    B, S, Pn = len(samples), max(map(len, src)), max(map(len, pre))
    Tn = max(len(p) + len(t) for p, t in zip(pre, tgt, strict=True))
    src_t = torch.full((B, S), PAD_ID, dtype=torch.long)
    prefix = torch.full((B, Pn), PAD_ID, dtype=torch.long)
    tgt_in = torch.full((B, Tn), PAD_ID, dtype=torch.long)
    targets = torch.full((B, Tn), PAD_ID, dtype=torch.long)
    for b, (s, p, t) in enumerate(zip(src, pre, tgt, strict=True)):
        src_t[b, :len(s)] = torch.tensor(s, dtype=torch.long)
        prefix[b, :len(p)] = torch.tensor(p, dtype=torch.long)
        tgt_in[b, :len(p) + len(t)] = torch.tensor(p + t, dtype=torch.long)
        # position i predicts the input at i + 1: the prefix's last token predicts the target's
        # first, the target's last predicts eos (truncated or not)
        targets[b, len(p) - 1:len(p) + len(t)] = torch.tensor(t + [EOS_ID], dtype=torch.long)
    return Batch(torch.stack([s.image for s in samples]), src_t, prefix, tgt_in, targets,
                 src_t != PAD_ID, targets != PAD_ID, [s.task for s in samples],
                 [s.refs for s in samples])


# -----------------------------------------------------------------------------
# python data.py: look at the data, and at how hard it is


def difficulty(ds: ShapesDataset, n: int) -> dict[str, Counter]:
    """Distributions over the first n samples, from their specs (no rendering)."""
    names = ("objects", "box", "kind", "label", "kind/label", "caption words", "hypothesis words")
    c = {k: Counter() for k in names}
    for i in range(min(n, len(ds))):
        sp = ds.spec(i)
        c["objects"][len(sp.scene.objects)] += 1
        c["box"][sp.scene.box is not None] += 1
        if sp.task == "caption":
            c["caption words"][len(sp.tgt.split())] += 1
        else:
            c["kind"][sp.kind] += 1
            c["label"][sp.tgt] += 1
            c["kind/label"][f"{sp.kind}/{sp.tgt}"] += 1
            c["hypothesis words"][len(sp.src.split()) - 6] += 1  # the prompt adds 6 split words
    return c


def _decode_all(paths: list[str], workers: int, label: str) -> dict[str, str]:
    """path -> what is wrong ("missing", or Pillow's reason) for each image that does not decode,
    with a progress bar on stderr meanwhile. Threads suffice: Pillow decodes without the GIL."""
    from concurrent.futures import ThreadPoolExecutor

    def problem(path):
        if not os.path.isfile(path):
            return "missing"
        try:
            read_image(path)
        except IMAGE_ERRORS as e:
            return _reason(e)
        return None

    bad, t0, shown, n = {}, time.time(), 0.0, len(paths)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for k, (path, why) in enumerate(zip(paths, pool.map(problem, paths), strict=True), 1):
            if why:
                bad[path] = why
            if time.time() - shown > 0.5 or k == n:  # a line twice a second, and the last one
                shown, rate = time.time(), k / max(time.time() - t0, 1e-6)
                bar = "#" * (30 * k // n) + "." * (30 - 30 * k // n)
                print(f"\r{label} [{bar}] {k}/{n} images, {len(bad)} bad, {rate:.0f}/s, eta "
                      f"{(n - k) / rate:.0f} s ", end="\n" if k == n else "", file=sys.stderr,
                      flush=True)
    return bad


def check(source: str, ann: str, images: str, premise: bool = True, min_count: int = MIN_COUNT,
          workers: int = 8, log=print) -> int:
    """python data.py --check: read the annotations of every split, open and decode each image
    once, and report per split its samples, images and texts cut to fit train.py's limits; the
    vocabulary train.py would build and how much of val and test it does not know; and every
    missing or unreadable image with the annotations naming it. -> the number of bad images."""
    sets, bad, seen = {}, {}, set()  # bad: path -> (what is wrong, the annotations naming it)
    for split in ("train", "val", "test"):
        ds = load_split(source, split, ann, images, premise=premise, must_exist=False,
                        **REAL_LENGTHS[source])
        named = {p: w for p, w in ds.images().items() if p not in seen}  # each image once
        seen |= named.keys()
        found = _decode_all(list(named), workers, f"{source} {split}")
        bad.update({p: (why, named[p]) for p, why in found.items()})
        log(f"{split}: {ds.summary()} | bad images: {len(found)}")
        sets[split] = ds
    tok = Tokenizer.build(sets["train"].texts(), min_count)
    log(f"vocabulary: {len(tok)} words, the 4 specials and those seen at least {min_count} times "
        f"in train's prompts and targets (--min-count); the others read as <unk>")
    for split in ("val", "test"):
        items = sets[split].items
        p = unknown_words(tok, [it[1] for it in items])  # the prompts
        r = unknown_words(tok, [ref for it in items for ref in it[3]])  # the references
        log(f"{split}: unknown words: {p['unknown']} of the prompts' {p['words']} "
            f"({100 * p['share']:.1f}%), {r['unknown']} of the references' {r['words']} "
            f"({100 * r['share']:.1f}%)")
    log(f"bad images: {len(bad) or 'none'}")
    for path, (why, wheres) in bad.items():
        more = f" and {len(wheres) - 1} more" if len(wheres) > 1 else ""
        log(f"  {path}: {why} (named by {wheres[0]}{more})")
    return len(bad)


def positive(text: str) -> int:
    if int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return int(text)


def parser():
    p = argparse.ArgumentParser(description="Draw shapes samples and their texts; print the mix. "
                                "With --check: check real data files before training on them.")
    p.add_argument("--out", default="out/shapes_samples.png",
                   help="PNG path, or a folder (ends with /, exists, or has no extension) for "
                        "shapes_samples.png")
    p.add_argument("--n", type=positive, default=16, help="samples in the grid")
    p.add_argument("--split", default="train", choices=tuple(SPLIT_SIZES))
    p.add_argument("--task", default="multi", choices=("multi", "caption", "ve"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=positive, default=24)
    p.add_argument("--stats", type=positive, default=3000, help="samples to measure the mix on "
                   "(drawn on the fly: more than the split's nominal size is fine)")
    p.add_argument("--check", action="store_true", help="decode every image of --data's files "
                   "once, count samples, images and words, list bad images (exit 1 if any)")
    p.add_argument("--data", choices=tuple(REAL_LENGTHS), help="--check: coco or snli_ve")
    p.add_argument("--ann", help="--check: dataset_coco.json, or the folder of snli_ve_*.jsonl")
    p.add_argument("--images", help="--check: the COCO or Flickr30k image folder")
    p.add_argument("--premise", default="true", choices=("true", "false"),
                   help="--check, snli_ve: the prompt reads the premise (train.py's default)")
    p.add_argument("--min-count", type=positive, default=MIN_COUNT, help="--check: as train.py's")
    p.add_argument("--workers", type=positive, default=os.cpu_count() or 1,
                   help="--check: threads decoding images")
    return p


def main(argv=None) -> int:
    import textwrap

    p = parser()
    args = p.parse_args(argv)
    if args.check:
        if not (args.data and args.ann and args.images):
            p.error("--check needs --data, --ann and --images")
        try:
            return 1 if check(args.data, args.ann, args.images, args.premise == "true",
                              args.min_count, args.workers) else 0
        except (ValueError, OSError) as e:  # a file that is not what it should be: one line
            print(f"data.py: error: {e}", file=sys.stderr)
            return 1
    out = args.out
    if out.endswith(("/", os.sep)) or os.path.isdir(out) or not os.path.splitext(out)[1]:
        out = os.path.join(out, "shapes_samples.png")  # not a hidden out/.png

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # sized for the request: val and test are 500 by default, but any index can be drawn
    ds = ShapesDataset(args.split, args.task, size=max(args.n, args.stats), seed=args.seed,
                       image_size=args.image_size)
    cols = 4
    rows = -(-args.n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 4.3 * rows), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= args.n:
            continue
        s = ds[k]
        img = s.image * torch.tensor(STD)[:, None, None] + torch.tensor(MEAN)[:, None, None]
        ax.imshow(img.clamp(0, 1).permute(1, 2, 0).numpy(), interpolation="nearest")
        lines = [f"#{k} {s.task}: {s.src}", f"-> {s.tgt}"] + [f"ref: {r}" for r in s.refs[1:]]
        ax.text(0.5, -0.03, "\n".join(textwrap.fill(t, 44) for t in lines), transform=ax.transAxes,
                ha="center", va="top", fontsize=7, family="monospace")
    fig.tight_layout()
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}\nthe mix over the first {args.stats} {args.split} samples:")
    for name, counter in difficulty(ds, args.stats).items():
        total = sum(counter.values())
        shares = (f"{k} {100 * v / total:.1f}%" for k, v in sorted(counter.items()))
        print(f"{name:>16}: " + "  ".join(shares))
    return 0


if __name__ == "__main__":
    sys.exit(main())
