"""Tests for data.py: the shapes world checked against its own definition, the tokenizer, batches,
and the real-data loaders on tiny fixtures written here. CPU, seeded, a few seconds in all.

The VE and caption checks below re-derive labels and captions from the scene's object list with
their own parser and their own semantics (possible worlds for the box), so they do not share code
paths with the generator they check."""

import functools
import json
import os
import re
import subprocess
import sys
from collections import Counter
from itertools import product
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
from conftest import truncate
from data import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    SPECIALS,
    UNK_ID,
    CocoCaptions,
    ShapesDataset,
    SnliVE,
    Tokenizer,
    clean,
    collate,
    shapes_tokenizer,
)

# the world's vocabulary, written out here rather than imported, so that the checks are independent
SHAPE_WORDS, COLOUR_WORDS = ("circle", "square", "cross"), ("red", "green", "blue", "yellow")
NUMBER = {"a": 1, "two": 2, "three": 3, "four": 4}


# -----------------------------------------------------------------------------
# an independent reading of the VE hypotheses


def parse_desc(words):
    """["red", "circle"] -> {"colour": "red", "shape": "circle"}."""
    *mods, noun = words
    noun = (
        noun.removesuffix("s")
        if noun.endswith(("circles", "squares", "shapes"))
        else noun
    )
    desc = {} if noun == "shape" else {"shape": noun}
    assert noun in SHAPE_WORDS + ("shape",), words
    for w in mods:
        key = "colour" if w in COLOUR_WORDS else None
        assert key and key not in desc, words
        desc[key] = w
    return desc


def parse_claim(src):
    m = re.fullmatch(r'does the image describe " (.+) "\?', src)
    assert m, src
    hyp = m.group(1)
    if m := re.fullmatch(r"there is a (.+)", hyp):
        desc = parse_desc(m.group(1).split())
        assert list(desc) == ["colour"], hyp  # shapes are named in captions only
        return "colour", hyp, (desc,)
    if m := re.fullmatch(r"there are at least (two|three|four) (.+)", hyp):
        desc = parse_desc(m.group(2).split())
        assert list(desc) == ["colour"], hyp
        return "count", hyp, (NUMBER[m.group(1)], desc)
    raise AssertionError(f"unparsed hypothesis {hyp!r}")


def fits(obj, desc):  # obj: dict with shape, colour, row, col
    return all(obj[k] == v for k, v in desc.items())


def true_in(claim, objects):
    kind, _, args = claim
    if kind == "count":
        k, desc = args
        return len([o for o in objects if fits(o, desc)]) >= k
    return any(fits(o, args[0]) for o in objects)


def checked_label(claim, scene):
    """Possible worlds: the box hides nothing or any one object; yes / no if all worlds agree."""
    visible = [
        dict(shape=o.shape, colour=o.colour, row=o.row, col=o.col) for o in scene.objects
    ]
    worlds = [visible]
    if scene.box is not None:
        worlds += [
            visible + [dict(shape=s, colour=c, row=scene.box[0], col=scene.box[1])]
            for s, c in product(SHAPE_WORDS, COLOUR_WORDS)
        ]
    truths = {true_in(claim, w) for w in worlds}
    return "yes" if truths == {True} else "no" if truths == {False} else "maybe"


def test_ve_labels_rederived_from_the_scene_and_balanced():
    ds = ShapesDataset("train", task="ve", size=3000, seed=3)
    labels, kinds = Counter(), Counter()
    for i in range(len(ds)):
        sp = ds.spec(i)
        claim = parse_claim(sp.src)
        assert checked_label(claim, sp.scene) == sp.tgt, (i, sp.src, sp.scene)
        assert sp.refs == [sp.tgt] and sp.task == "ve"
        assert len(claim[1].split()) <= 7, claim[1]
        labels[sp.tgt] += 1
        kinds[claim[0], sp.tgt] += 1
    for lab in ("yes", "no", "maybe"):
        assert abs(labels[lab] / len(ds) - 1 / 3) <= 0.03, labels
    # graded difficulty: every kind of hypothesis, each with every answer
    for kind, lab in product(("colour", "count"), ("yes", "no", "maybe")):
        assert kinds[kind, lab] >= 100, kinds


def test_ve_labels_on_val_multitask_and_rendered_samples_match_specs():
    ds = ShapesDataset("val", task="multi")
    assert len(ds) == 500
    tasks = Counter()
    for i in range(len(ds)):
        sp = ds.spec(i)
        tasks[sp.task] += 1
        if sp.task == "ve":
            assert checked_label(parse_claim(sp.src), sp.scene) == sp.tgt
    assert tasks == {"caption": 250, "ve": 250}
    for i in range(6):  # __getitem__ serves exactly the spec's texts
        s, sp = ds[i], ds.spec(i)
        assert (s.src, s.tgt, s.refs, s.task) == (sp.src, sp.tgt, sp.refs, sp.task)


# -----------------------------------------------------------------------------
# captions, read back into the scene they claim to describe


def read_caption(text):
    """A caption -> Counter of item names ("red circle", "box"), plus the
    spatial relation when it has the "a X above a Y" form."""
    text = re.sub(r"^there (is|are) ", "", text)
    if m := re.fullmatch(r"a (.+) (above|left of) a (.+)", text):
        return Counter([m.group(1), m.group(3)]), (m.group(1), m.group(2), m.group(3))
    items = Counter()
    for part in text.split(" and "):
        num, name = item_of(part)
        items[name] += num
    return items, None


def item_of(part):
    """"two red crosses" -> (2, "red cross"); "a box" -> (1, "box")."""
    num, _, name = part.partition(" ")
    if NUMBER[num] > 1:  # English plurals: circles, crosses
        assert name.endswith("s"), part
        name = name[:-2] if name.endswith("sses") else name[:-1]
    return NUMBER[num], name


def test_captions_are_true_of_the_scene():
    ds = ShapesDataset("test", task="caption", size=600, seed=1)
    lengths = Counter()
    for i in range(len(ds)):
        sp = ds.spec(i)
        sc = sp.scene
        brief = Counter(
            [f"{o.colour} {o.shape}" for o in sc.objects] + ["box"] * (sc.box is not None)
        )
        assert sp.src == "what does the image describe?" and sp.tgt == sp.refs[0]
        assert len(set(sp.refs)) == len(sp.refs)
        if len(brief) > 1 or sum(brief.values()) > 1:
            assert len(sp.refs) >= 2, sp.refs  # several phrasings whenever several are possible
        for ref in sp.refs:
            assert len(ref.split()) <= 16, ref
            items, rel = read_caption(ref)
            assert items == brief, (ref, sc)
            if rel:  # "a X above a Y": two items in the scene, X strictly above (or left, same row)
                cells = sorted([(o.row, o.col) for o in sc.objects] + ([sc.box] if sc.box else []))
                assert len(cells) == 2
                (r0, c0), (r1, c1) = cells
                assert (rel[1] == "above") == (r0 < r1) and (rel[1] == "above" or c0 < c1)
        # the target lists the items in reading order (first appearance of each name)
        order = [
            n
            for _, n in sorted(
                [((o.row, o.col), f"{o.colour} {o.shape}") for o in sc.objects]
                + ([(sc.box, "box")] if sc.box else [])
            )
        ]
        names = [item_of(p)[1] for p in sp.tgt.split(" and ")]
        assert names == list(dict.fromkeys(order)), (sp.tgt, sc)
        lengths[len(sp.tgt.split())] += 1
    assert len(lengths) >= 5, lengths  # short and long captions both occur


# -----------------------------------------------------------------------------
# scenes, splits, determinism, pixels


def test_scenes_are_well_formed_and_splits_never_share_one():
    keys = {}
    for split, n in (("train", 2000), ("val", 500), ("test", 500)):
        ds = ShapesDataset(split, task="multi", size=n)
        keys[split] = set()
        for i in range(n):
            sc = ds.scene(i)
            cells = [(o.row, o.col) for o in sc.objects] + ([sc.box] if sc.box else [])
            assert len(set(cells)) == len(cells) and all(
                0 <= r < 3 and 0 <= c < 3 for r, c in cells
            )
            assert 1 <= len(sc.objects) and len(cells) <= 4
            assert data.split_of(sc) == split
            keys[split].add(sc.key())
    assert not keys["train"] & keys["val"] and not keys["train"] & keys["test"]
    assert not keys["val"] & keys["test"]
    # the scene space is small enough that independent draws would collide: the hash is what keeps
    # the splits apart (one-object scenes alone: 12 kinds x 9 cells)
    assert len(keys["train"]) < 2000


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_objects=5), "captions would reach 19 words"),  # "a red circle and ..." x 5
        (dict(max_objects=8), "at most 4"),
        (dict(max_objects=1), "need 2 <= max_objects"),
        (dict(max_objects=4, grid=2), "need 2 <= max_objects < grid * grid = 4"),
        (dict(p_box=1.01), "p_box in [0, 1]"),
        (dict(p_box=-0.1), "p_box in [0, 1]"),
        (dict(noise=-0.01), "noise >= 0"),
        (dict(clutter=-1), "clutter >= 0"),
        (dict(clutter=1.5), "integer clutter"),
        (dict(image_size=0), "image_size >= 1"),
        (dict(size=-1), "size >= 0"),
    ],
)
def test_settings_the_world_cannot_serve_are_refused_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ShapesDataset("train", **kwargs)


def test_a_caption_too_long_is_a_value_error_not_an_assert():  # python -O drops asserts
    kinds, cells = product(SHAPE_WORDS, COLOUR_WORDS[:2]), product(range(3), range(2))
    objs = tuple(data.Obj(s, c, r, k)
                 for (s, c), (r, k) in zip(kinds, cells, strict=True))
    with pytest.raises(ValueError, match="caption too long"):  # six different objects: 23 words
        data.captions(data.Scene(objs, None))


@pytest.mark.parametrize("max_objects, grid", [(2, 2), (3, 2), (4, 3), (4, 4)])
@pytest.mark.parametrize("p_box", [0.0, 0.99, 1.0])
def test_every_allowed_setting_draws_samples(max_objects, grid, p_box):
    """What the constructor admits, the sampler serves: the first samples of every split and
    task draw, captions fit, labels hold (p_box=1.0 included: a "no" to "there is ..." cannot
    stand beside a box, so such a sample gets a scene without one)."""
    for split, task in product(("train", "val", "test"), ("caption", "ve")):
        ds = ShapesDataset(split, task, size=120, max_objects=max_objects, grid=grid, p_box=p_box)
        for i in range(len(ds)):
            sp = ds.spec(i)
            assert 1 <= len(sp.scene.objects) + (sp.scene.box is not None) <= max_objects
            if task == "ve":
                assert checked_label(parse_claim(sp.src), sp.scene) == sp.tgt, (i, sp)
            else:
                assert len(sp.tgt.split()) <= data.MAX_CAPTION_WORDS
    odd = ShapesDataset("val", max_objects=max_objects, grid=grid, p_box=p_box, image_size=5,
                        clutter=0, noise=2.0)
    assert odd[0].image.shape == (3, 5, 5) and torch.isfinite(odd[1].image).all()


def sample_bytes(ds, idx):
    return [(ds[i].image.numpy().tobytes(), ds[i].src, ds[i].tgt, tuple(ds[i].refs)) for i in idx]


def test_same_seed_same_bytes_other_seed_other_samples():
    idx = range(0, 40, 3)
    a = sample_bytes(ShapesDataset("train", seed=0), idx)
    assert a == sample_bytes(ShapesDataset("train", seed=0), idx)
    b = sample_bytes(ShapesDataset("train", seed=1), idx)
    assert all(x[0] != y[0] for x, y in zip(a, b, strict=True))
    assert sum(x[1:] != y[1:] for x, y in zip(a, b, strict=True)) >= len(a) - 2
    s = ShapesDataset("val", seed=0)[5]
    assert s.image.shape == (3, 24, 24) and s.image.dtype == torch.float32
    assert ShapesDataset("val", seed=0, image_size=96)[5].image.shape == (3, 96, 96)


FINGERPRINT = """
import hashlib, data
ds = data.ShapesDataset("test", seed=7)
digest = hashlib.sha1(b"".join(ds[i].image.numpy().tobytes() + ds[i].tgt.encode()
                           for i in range(6)))
"""


def test_samples_identical_in_a_fresh_process():
    """str seeds must not depend on PYTHONHASHSEED or on anything else in this process."""
    here = {}
    exec(FINGERPRINT, here)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = f"{FINGERPRINT}print(digest.hexdigest())"
    env = dict(os.environ, PYTHONHASHSEED="123")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == here["digest"].hexdigest()


HUES = {"red": (255, 0, 0), "green": (0, 160, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}


@pytest.mark.parametrize("image_size", [64, 96])
def test_image_shows_the_scene(image_size):
    """Noise and clutter off: each object's colour where it is drawn, its shape from how much of
    its bounding box it fills and from its centre and corners; the box gray; empty cells pale."""
    ds = ShapesDataset(
        "train", task="multi", size=300, seed=2, image_size=image_size, noise=0, clutter=0
    )
    mean, std = torch.tensor(data.MEAN)[:, None, None], torch.tensor(data.STD)[:, None, None]
    cell = image_size / 3
    hues = np.array(list(HUES.values()), dtype=float)  # (4, 3)
    for i in range(0, len(ds), 3 if image_size == 64 else 6):
        sc = ds.scene(i)
        img = ((ds[i].image * std + mean) * 255).round().permute(1, 2, 0).numpy()  # (H, W, 3)
        taken = {(o.row, o.col) for o in sc.objects} | ({sc.box} if sc.box else set())
        for r, c in product(range(3), range(3)):
            y, x = int((r + 0.5) * cell), int((c + 0.5) * cell)
            px = img[y, x]
            if sc.box == (r, c):
                assert px.max() - px.min() < 40 and px.mean() < 170, px  # gray crate, or its X
            elif (r, c) not in taken:
                assert px.min() >= 200, px
        for o in sc.objects:
            y0, x0 = int(o.row * cell), int(o.col * cell)
            patch = img[y0 : int(y0 + cell), x0 : int(x0 + cell)].astype(float)
            drawn = patch.min(-1) < 150  # (h, w): the object's pixels, not the pale background
            nearest = ((patch[:, :, None, :] - hues) ** 2).sum(-1).argmin(-1)  # (h, w)
            assert list(HUES)[Counter(nearest[drawn].tolist()).most_common(1)[0][0]] == o.colour
            ys, xs = np.nonzero(drawn)
            fill = drawn.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
            box = drawn[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
            centre = box[box.shape[0] // 2, box.shape[1] // 2]
            corners = box[[0, 0, -1, -1], [0, -1, 0, -1]]
            if o.shape == "square":
                assert fill >= 0.9 and centre and corners.all(), (o, fill)
            elif o.shape == "circle":  # a ring
                assert 0.3 <= fill <= 0.65 and not centre and not corners.any(), (o, fill)
            else:  # a cross
                assert 0.45 <= fill <= 0.75 and centre and not corners.any(), (o, fill)


# -----------------------------------------------------------------------------
# tokenizer


def test_tokenizer_basics_and_checkpoint_roundtrip(tmp_path):
    tok = Tokenizer.build(["A dog runs.", "a cat runs", "the dog"], min_count=2)
    assert tok.words == ["<pad>", "<bos>", "<eos>", "<unk>", "a", "dog", "runs"]
    assert (
        (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id)
        == (PAD_ID, BOS_ID, EOS_ID, UNK_ID)
        == (0, 1, 2, 3)
    )
    ids = tok.encode("A DOG flies")
    assert ids == [4, 5, UNK_ID] and len(tok) == 7
    assert tok.decode([BOS_ID, 4, 5, PAD_ID, 6, EOS_ID, 5]) == "a dog runs"
    assert tok.decode(torch.tensor([4, EOS_ID, 4])) == "a"
    torch.save({"tokenizer": tok.state_dict()}, tmp_path / "ck.pt")
    back = Tokenizer.from_state_dict(torch.load(tmp_path / "ck.pt", weights_only=True)["tokenizer"])
    assert back.words == tok.words and back.encode("a dog flies") == ids
    with pytest.raises(ValueError, match="must start with"):
        Tokenizer(["a", "b"])
    with pytest.raises(ValueError, match="duplicate"):
        Tokenizer(SPECIALS + ["a", "a"])


def test_shapes_tokenizer_covers_the_grammar():
    tok = shapes_tokenizer()
    assert tok.words[:4] == ["<pad>", "<bos>", "<eos>", "<unk>"] and len(tok) < 60
    # exactly the words the grammar produces, written out here: no "{" or "}" of the VE template
    prompts = "what does the image describe ? \" there is are at least and of box shape shapes"
    grammar = set(prompts.split()) | set(SHAPE_WORDS) | {"circles", "squares", "crosses"}
    grammar |= set(COLOUR_WORDS) | set(NUMBER) | {"yes", "no", "maybe", "left", "above"}
    assert set(tok.words[4:]) == grammar and len(tok.words) == len(grammar) + 4
    longest, seen_src = data.shapes_max_tokens(), 0  # what train.py asks of max_src_len etc.
    for split, task in product(("train", "test"), ("caption", "ve")):
        ds = ShapesDataset(split, task=task, size=600, seed=4)
        for i in range(len(ds)):
            sp = ds.spec(i)
            for text in [sp.src, sp.tgt, *sp.refs]:
                ids = tok.encode(text)
                assert UNK_ID not in ids, text
            if i < 20:  # VE's decoder reads bos, the prompt and the answer: they fit too
                assert collate([ds[i]], tok, *longest).tgt_in.shape[1] <= longest[1]
            assert len(tok.encode(sp.src)) <= longest[0] and len(tok.encode(sp.tgt)) < longest[1]
            seen_src = max(seen_src, len(tok.encode(sp.src)))
            assert tok.decode(tok.encode(sp.tgt)) == sp.tgt
    assert seen_src == longest[0] == 14 and longest[1] == 17


# -----------------------------------------------------------------------------
# batches


def test_collate_pads_and_shifts():
    tok = shapes_tokenizer()
    ds = ShapesDataset("val", task="multi", size=10)
    samples = [ds[i] for i in range(6)]
    b = collate(samples, tok)
    B, S, T = len(samples), b.src.shape[1], b.targets.shape[1]
    assert (
        b.images.shape == (B, 3, 24, 24) and b.tgt_in.shape == (B, T) and b.src_mask.shape == (B, S)
    )
    assert (
        b.src.dtype == b.tgt_in.dtype == b.targets.dtype == torch.long
        and b.src_mask.dtype == torch.bool
    )
    assert {s.task for s in samples} == {"caption", "ve"}
    for k, s in enumerate(samples):
        src, tgt = tok.encode(s.src), tok.encode(s.tgt)
        # OFA's prev_output for VE: the decoder reads bos and the prompt, then the answer; only
        # the answer and eos are scored. Captions start from bos alone.
        pre = [BOS_ID] + (src if s.task == "ve" else [])
        n = len(pre) + len(tgt)
        assert b.src[k, : len(src)].tolist() == src and not b.src[k, len(src) :].any()
        assert b.src_mask[k].tolist() == [j < len(src) for j in range(S)]
        assert b.prefix[k, : len(pre)].tolist() == pre and not b.prefix[k, len(pre) :].any()
        assert b.tgt_in[k, :n].tolist() == pre + tgt and not b.tgt_in[k, n:].any()
        assert b.targets[k].tolist() == [0] * (len(pre) - 1) + tgt + [EOS_ID] + [0] * (T - n)
        assert b.tgt_mask[k].tolist() == [len(pre) - 1 <= j < n for j in range(T)]
        assert tok.decode(b.targets[k, len(pre) - 1:]) == s.tgt
        assert torch.equal(b.images[k], s.image)
    assert b.tasks == [s.task for s in samples] and b.refs == [s.refs for s in samples]
    # padded to the batch's longest, no further
    assert max(b.src_mask.sum(1)) == S and max((b.tgt_in != 0).sum(1)) == T
    assert max((b.prefix != 0).sum(1)) == b.prefix.shape[1]
    moved = b.to("cpu")
    assert torch.equal(moved.targets, b.targets) and moved.refs == b.refs


def test_collate_too_long_raises_or_truncates_on_request():
    tok = shapes_tokenizer()
    s = ShapesDataset("val", task="caption", size=40)
    long = max((s[i] for i in range(40)), key=lambda x: len(x.tgt.split()))
    n = len(tok.encode(long.tgt))
    with pytest.raises(ValueError, match="too long"):
        collate([long], tok, max_tgt_len=n)  # needs n + 1 with eos
    assert collate([long], tok, max_tgt_len=n + 1).targets.shape == (1, n + 1)
    b = collate([long], tok, max_src_len=3, max_tgt_len=4, truncate=True)
    assert b.src.shape == (1, 3) and b.targets[0].tolist() == tok.encode(long.tgt)[:3] + [EOS_ID]
    ve = ShapesDataset("val", task="ve", size=1)[0]  # the prefix counts against max_tgt_len
    n = len(tok.encode(ve.src)) + 1 + 1  # bos + prompt, then the answer
    with pytest.raises(ValueError, match="too long"):
        collate([ve], tok, max_tgt_len=n - 1)
    assert collate([ve], tok, max_tgt_len=n).targets.shape == (1, n)


def test_dataloader_with_workers_gives_the_same_batches():
    tok = shapes_tokenizer()
    ds = ShapesDataset("test", task="multi", size=12)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=4, num_workers=2, collate_fn=functools.partial(collate, tok=tok)
    )
    for k, b in enumerate(loader):
        ref = collate([ds[i] for i in range(4 * k, 4 * k + 4)], tok)
        assert torch.equal(b.images, ref.images) and torch.equal(b.targets, ref.targets)
        assert torch.equal(b.src, ref.src) and b.refs == ref.refs


def test_main_writes_a_png(tmp_path, monkeypatch, capsys):
    out = tmp_path / "grid.png"
    monkeypatch.setattr(sys, "argv", ["data.py", "--out", str(out), "--n", "4", "--stats", "60"])
    data.main()
    with Image.open(out) as im:
        assert im.size[0] > 300 and im.size[1] > 300
    assert "kind/label" in capsys.readouterr().out


def test_main_names_folders_measures_what_is_asked_and_refuses_no_samples(
    tmp_path, monkeypatch, capsys
):
    measured = []
    real = data.difficulty
    monkeypatch.setattr(data, "difficulty", lambda ds, n: measured.append(min(n, len(ds))) or
                        real(ds, n))
    (tmp_path / "there").mkdir()
    for out in (f"{tmp_path}/new/", str(tmp_path / "there")):  # a folder gets the file name
        data.main(["--out", out, "--n", "1", "--split", "test", "--stats", "600"])
        assert (Path(out) / "shapes_samples.png").is_file()
        assert "the mix over the first 600 test samples:" in capsys.readouterr().out
    assert measured == [600, 600]  # the test split's nominal 500 is no cap: samples are drawn
    assert not (tmp_path / "new" / ".png").exists()
    for argv, message in ((["--n", "0"], "--n: must be at least 1, got 0"),
                          (["--stats", "-3"], "--stats: must be at least 1")):
        with pytest.raises(SystemExit) as e:
            data.main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err


# -----------------------------------------------------------------------------
# real-data loaders, on files in the published formats (tests/conftest.py writes them)


def mean_rgb(image):
    return (
        (image * torch.tensor(data.STD)[:, None, None] + torch.tensor(data.MEAN)[:, None, None])
        * 255
    ).mean((1, 2))


def test_coco_loads_each_split(coco_files):
    f = coco_files
    train = CocoCaptions(f.ann, f.images, split="train")
    assert len(train) == 10  # train and restval, one sample per caption
    refs = [" ".join(s["tokens"]) for s in f.entries[0]["sentences"]]
    s = train[0]
    assert (s.src, s.prefix, s.task) == ("what does the image describe?", "", "caption")
    assert s.tgt == "a wooden table with six chairs in a bright dining room" and s.refs == refs
    assert [train[i].tgt for i in range(5)] == refs and train[5].refs[0].startswith("a bicycle")
    assert s.image.shape == (3, 64, 64)
    assert abs(mean_rgb(s.image) - torch.tensor([200.0, 30, 30])).max() < 12
    assert abs(mean_rgb(train[5].image) - 128).max() < 12  # the grayscale JPEG comes out as RGB
    val = CocoCaptions(f.ann, f.images, split="val", image_size=32)
    assert len(val) == 1 and val[0].image.shape == (3, 32, 32) and len(val[0].refs) == 5
    assert val[0].tgt == "a child with an umbrella standing next to a cow"
    test = CocoCaptions(f.ann, f.images, split="test")
    assert test[0].tgt == "a man riding a motorbike on a dirt road"
    assert abs(mean_rgb(test[0].image) - torch.tensor([30.0, 30, 200])).max() < 12
    # the prompt counts once per sample, as the model reads it, so min_count keeps it
    tok = Tokenizer.build(train.texts(), min_count=10)
    assert set(tok.words[4:]) == {"a", "the", "what", "does", "image", "describe", "?"}
    assert tok.encode("a zebra") == [tok.ids["a"], UNK_ID]
    assert data.unknown_words(tok, ["a zebra", "the image"]) == {
        "unknown": 1, "words": 4, "share": 0.25}
    assert train.summary() == "10 samples, 2 images"


def test_coco_cuts_long_targets_but_never_references(coco_files):
    f = coco_files
    train = CocoCaptions(f.ann, f.images, split="train", max_target=6)
    long = [len(" ".join(s["tokens"]).split()) > 6 for e in f.entries[:2] for s in e["sentences"]]
    assert train.cut == sum(long) > 0 and max(len(s[2].split()) for s in train.items) == 6
    assert train.summary() == f"10 samples, 2 images; {sum(long)} target captions cut to 6 words"
    assert train[0].tgt == "a wooden table with six chairs" and len(train[0].refs[0].split()) == 11
    # load_split fits the decoder's limit: bos + the caption within max_tgt_len
    via = data.load_split("coco", "train", str(f.ann), str(f.images), max_tgt_len=7)
    assert via.cut == train.cut


def test_coco_flat_image_folder(coco_files, tmp_path):
    flat = tmp_path / "flat"
    os.makedirs(flat)
    for path in coco_files.jpgs:
        os.replace(path, flat / os.path.basename(path))
    assert len(CocoCaptions(coco_files.ann, flat, split="train")) == 10


def test_coco_errors_name_the_file_and_entry(coco_files, tmp_path):
    ann, root = coco_files.ann, coco_files.images
    with pytest.raises(FileNotFoundError, match="nope.json"):
        CocoCaptions(tmp_path / "nope.json", root)
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [\n  {"split": "train",,}\n]}')
    with pytest.raises(ValueError, match=r"bad\.json:2"):
        CocoCaptions(bad, root)
    good = json.loads(ann.read_text())
    for mutate, err, pattern in [
        (lambda a: a["images"][1].update(split="holdout"), ValueError,
         r"images\[1\]: unknown split"),
        (lambda a: a["images"][0].pop("filename"), ValueError, r"images\[0\]: malformed"),
        (lambda a: a["images"][1].update(sentences=[]), ValueError, r"images\[1\]: no captions"),
        (lambda a: a["images"][1].update(filename="gone.jpg"), FileNotFoundError,
         r"1 of 2 images .* missing, first .*gone\.jpg \(.*images\[1\]\)"),
    ]:
        a = json.loads(json.dumps(good))
        mutate(a)
        ann.write_text(json.dumps(a))
        with pytest.raises(err, match=pattern):
            CocoCaptions(ann, root, split="train")
    ann.write_text(json.dumps(good))
    a_jpg, b_jpg = coco_files.jpgs[:2]
    with open(a_jpg, "wb") as f:
        f.write(b"this is not a jpeg")
    ds = CocoCaptions(ann, root)  # existence is checked eagerly, decoding only when asked
    with pytest.raises(data.BadImage, match=re.escape(a_jpg) + r" \(named by .*images\[0\]\): "
                       "cannot identify image file"):
        ds[0]
    truncate(b_jpg)
    with pytest.raises(data.BadImage) as e:
        ds[5]
    expected = re.escape(f"cannot read image {b_jpg} (named by {ann}: images[1]): image file is "
                         "truncated (") + r"\d+ bytes not processed\)"
    assert re.fullmatch(expected, str(e.value))  # one line: nothing after it


def test_snli_ve_reads_the_published_lines(snli_files):
    f = snli_files
    ds = SnliVE(f.ann / "snli_ve_train.jsonl", f.images, image_size=48)
    assert len(ds) == 6 and [ds[i].tgt for i in range(6)] == ["yes", "maybe", "no"] * 2
    s = ds[0]
    # the authors' recipe: the premise (sentence1) in the prompt, and the prompt as the prefix
    assert s.src == ('can image and text1 " two men in work clothes are fixing a red bike on the '
                     'sidewalk " imply text2 " two men are repairing a bicycle "?')
    assert s.prefix == s.src and s.refs == ["yes"] and s.task == "ve"
    assert s.image.shape == (3, 48, 48)
    assert abs(mean_rgb(s.image) - torch.tensor([200.0, 30, 30])).max() < 12
    assert abs(mean_rgb(ds[3].image) - 128).max() < 12  # grayscale
    assert ds.summary() == "6 samples, 2 images"
    alone = SnliVE(f.ann / "snli_ve_train.jsonl", f.images, premise=False)
    assert alone[0].src == 'does the image describe " two men are repairing a bicycle "?'
    assert alone[0].prefix == alone[0].src
    tok = Tokenizer.build(ds.texts())
    assert {"yes", "no", "maybe", "text1", "imply", '"', "?"} <= set(tok.words)
    b = collate([ds[i] for i in range(3)], tok, max_src_len=80, max_tgt_len=82)
    assert [row[m][0].item() for row, m in zip(b.targets, b.tgt_mask, strict=True)] == [
        tok.ids[w] for w in ("yes", "maybe", "no")
    ]  # the answer is the first scored target, the prompt before it is not scored
    assert b.tgt_mask.sum(1).tolist() == [2, 2, 2]  # the answer and eos


def test_snli_ve_prompts_cut_to_fit_the_premise_first(snli_files):
    f = snli_files
    ds = SnliVE(f.ann / "snli_ve_train.jsonl", f.images, max_prompt=20)  # 9 words after the 11
    tok = Tokenizer.build(ds.texts())
    assert max(len(tok.encode(s)) for _, s, *_ in ds.items) == 20
    hyp = [clean(r["sentence2"]) for r in f.lines["train"]]
    assert all(f'text2 " {h} "?' in s for h, (_, s, *_) in zip(hyp, ds.items, strict=True))
    assert ds.items[0][1].startswith('can image and text1 " two men in " imply')
    long = [len(clean(r["sentence1"] + " " + r["sentence2"]).split()) > 9 for r in f.lines["train"]]
    assert ds.cut == sum(long) > 0
    assert ds.summary().endswith(f"; {sum(long)} prompts cut to 20 tokens (the premise first)")
    # load_split fits the prompt to both limits: it is the decoder's prefix too
    via = data.load_split("snli_ve", "train", str(f.ann), str(f.images), max_src_len=80,
                          max_tgt_len=22)
    assert [s for _, s, *_ in via.items] == [s for _, s, *_ in ds.items]
    b = collate([via[i] for i in range(6)], tok, max_src_len=80, max_tgt_len=22)  # fits
    assert b.tgt_in.shape[1] == 22
    alone = SnliVE(f.ann / "snli_ve_train.jsonl", f.images, premise=False, max_prompt=10)
    assert alone.items[1][1] == 'does the image describe " the men are "?' and alone.cut == 6


def test_an_80_token_prompt_keeps_its_question_mark_in_the_decoder(snli_files):
    """--data snli_ve's limits (80 source tokens, 82 decoder tokens) hold bos, the whole prompt
    and the answer: the prefix once lost its last token, the '?', in silence."""
    f = snli_files
    lines = [dict(r, sentence1=" ".join(["word"] * 100)) for r in f.lines["train"]]
    (f.ann / "snli_ve_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    limits = data.REAL_LENGTHS["snli_ve"]
    ds = data.load_split("snli_ve", "train", str(f.ann), str(f.images), **limits)
    tok = Tokenizer.build(ds.texts())
    assert ds.cut == 6 and all(len(tok.encode(s)) == 80 for _, s, *_ in ds.items)
    b = collate([ds[i] for i in range(6)], tok, **limits)
    assert b.prefix.shape[1] == 81 and (b.prefix[:, -1] == tok.ids["?"]).all()
    assert b.tgt_in.shape[1] == 82 and (b.tgt_in[:, -2] == tok.ids["?"]).all()
    assert (b.targets[:, 80] == b.tgt_in[:, 81]).all()  # the '?' predicts the answer


def test_snli_ve_errors_name_the_file_and_line(snli_files, tmp_path):
    f = snli_files
    path, rows = f.ann / "snli_ve_dev.jsonl", f.lines["dev"]
    lines = [json.dumps(r) for r in rows]

    def write(*ls):
        path.write_text("\n".join(ls) + "\n")

    write(lines[0], "", '{"Flickr30K_ID": "1003163366", "sentence2": oops}')
    with pytest.raises(ValueError, match=r"snli_ve_dev\.jsonl:3: not valid JSON"):
        SnliVE(path, f.images)
    write(lines[0], json.dumps({**rows[1], "gold_label": "-"}))  # raw SNLI has these
    with pytest.raises(ValueError, match=r"snli_ve_dev\.jsonl:2: unknown gold_label '-'.*no '-'"):
        SnliVE(path, f.images)
    old = {("Flickr30k_ID" if k == "Flickr30K_ID" else k): v for k, v in rows[0].items()}
    write(json.dumps(old))  # the capital K matters
    with pytest.raises(ValueError, match=r":1: needs the fields Flickr30K_ID, sentence1, "):
        SnliVE(path, f.images)
    write(json.dumps({k: v for k, v in rows[0].items() if k != "sentence1"}))
    with pytest.raises(ValueError, match=r":1: needs the fields .*sentence1"):
        SnliVE(path, f.images)
    assert len(SnliVE(path, f.images, premise=False)) == 1  # the hypothesis alone needs no premise
    write(json.dumps({**rows[0], "sentence2": "?!"}))
    with pytest.raises(ValueError, match=r":1: empty sentence1 or sentence2"):
        SnliVE(path, f.images)
    write(lines[0], json.dumps({**rows[1], "Flickr30K_ID": "999"}))
    with pytest.raises(FileNotFoundError, match=r"999\.jpg \(.*snli_ve_dev\.jsonl:2\)"):
        SnliVE(path, f.images)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        SnliVE(tmp_path / "missing.jsonl", f.images)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_bad_image_is_one_line_also_from_a_dataloader_worker(snli_files, workers):
    f = snli_files
    truncate(f.jpgs["dev"][0])
    ds = SnliVE(f.ann / "snli_ve_dev.jsonl", f.images)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=3, num_workers=workers,
        collate_fn=functools.partial(collate, tok=shapes_tokenizer(), max_src_len=80,
                                     max_tgt_len=82, truncate=True),
    )
    with pytest.raises(data.BadImage) as e:
        next(iter(loader))
    line = str(e.value)  # torch rebuilds a worker's error from its whole traceback: we keep ours
    assert line.startswith(f"cannot read image {f.jpgs['dev'][0]} (named by "
                           f"{f.ann / 'snli_ve_dev.jsonl'}:1): image file is truncated")
    assert "\n" not in line and "Traceback" not in line


def test_load_split_picks_the_source_and_caps_the_size(coco_files, snli_files):
    shapes = data.load_split("shapes", "val", task="ve", seed=3, size=7, image_size=32)
    assert len(shapes) == 7 and shapes[2].src == ShapesDataset("val", "ve", seed=3)[2].src
    ann, root = str(coco_files.ann), str(coco_files.images)
    assert len(data.load_split("coco", "train", ann, root)) == 10
    assert len(data.load_split("coco", "train", ann, root, size=2)) == 2
    f = snli_files  # SNLI-VE calls its validation split "dev"
    val = data.load_split("snli_ve", "val", str(f.ann), str(f.images))
    assert len(val) == 3 and val[0].tgt == "yes" and "woman in a blue coat" in val[0].src
    pattern = str(f.ann / "snli_ve_{split}.jsonl")
    assert len(data.load_split("snli_ve", "val", pattern, str(f.images), size=1)) == 1
    assert data.load_split("snli_ve", "test", pattern, str(f.images), premise=False)[0].src == (
        'does the image describe " the children are asleep indoors "?')
    os.remove(f.ann / "snli_ve_test.jsonl")
    with pytest.raises(FileNotFoundError, match="snli_ve_test.jsonl"):
        data.load_split("snli_ve", "test", str(f.ann), str(f.images))
    with pytest.raises(ValueError, match="unknown data source 'vqa'"):
        data.load_split("vqa", "val", "x", "y")
    with pytest.raises(ValueError, match="needs --ann and --images"):
        data.load_split("coco", "val", "", root)
    with pytest.raises(ValueError, match="split must be"):
        data.load_split("shapes", "dev")


def test_shapes_settings_come_from_the_command_line_by_name():
    assert data.shapes_settings(" max_objects=2, p_box=0.25,") == {"max_objects": 2, "p_box": 0.25}
    assert data.shapes_settings("") == {}
    for bad in ("colour=red", "max_objects", "max_objects=two", "seed=3", "p_box=[1]"):
        with pytest.raises(ValueError, match="expected NAME=NUMBER, NAME one of max_objects"):
            data.shapes_settings(bad)
    few = data.load_split("shapes", "test", task="caption", size=40, shapes="max_objects=2,p_box=0")
    scenes = [few.scene(i) for i in range(40)]
    assert all(len(s.objects) <= 2 and s.box is None for s in scenes)
    assert {len(s.objects) for s in scenes} == {1, 2}
    with pytest.raises(ValueError, match="sets the shapes world, not coco"):
        data.load_split("coco", "val", "a.json", "images", shapes="p_box=0")


def test_check_lists_every_bad_image_with_its_annotation(coco_files, capsys):
    f, log = coco_files, []
    assert data.check("coco", str(f.ann), str(f.images), min_count=2, log=log.append) == 0
    assert log[:3] == ["train: 10 samples, 2 images | bad images: 0",
                       "val: 1 samples, 1 images | bad images: 0",
                       "test: 1 samples, 1 images | bad images: 0"]
    tok = Tokenizer.build(CocoCaptions(f.ann, f.images).texts(), min_count=2)
    assert log[3].startswith(f"vocabulary: {len(tok)} words") and log[-1] == "bad images: none"
    assert "coco train [" in capsys.readouterr().err  # the progress bar
    truncate(f.jpgs[1])
    os.remove(f.jpgs[3])
    log.clear()
    assert data.check("coco", str(f.ann), str(f.images), log=log.append) == 2
    assert log[0] == "train: 10 samples, 2 images | bad images: 1"
    assert log[-3] == "bad images: 2"
    assert re.fullmatch(re.escape(f"  {f.jpgs[1]}: image file is truncated (") + r"\d+ bytes not "
                        + re.escape(f"processed) (named by {f.ann}: images[1])"),
                        log[-2])
    assert log[-1] == f"  {f.jpgs[3]}: missing (named by {f.ann}: images[3])"


def test_check_command_exits_1_naming_the_truncated_file(snli_files):
    f = snli_files
    truncate(f.jpgs["train"][1])
    cmd = [sys.executable, "data.py", "--check", "--data", "snli_ve", "--ann", str(f.ann),
           "--images", str(f.images), "--min-count", "1"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    out = r.stdout.splitlines()
    assert out[:3] == ["train: 6 samples, 2 images | bad images: 1",
                       "val: 3 samples, 1 images | bad images: 0",
                       "test: 3 samples, 1 images | bad images: 0"]
    assert out[3].startswith("vocabulary: ") and "of the references' 3 (0.0%)" in out[5]
    assert out[-2] == "bad images: 1" and out[-1].startswith(
        f"  {f.jpgs['train'][1]}: image file is truncated (")
    assert out[-1].endswith(f"(named by {f.ann / 'snli_ve_train.jsonl'}:4 and 2 more)")
    assert "snli_ve test [" in r.stderr  # the progress bar
