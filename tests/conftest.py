"""Shared by the tests: the plugins every session loads (the worked example, your solutions), the
small trained model several test files use, and tiny copies of the real data files.

Plugins. tests/exercises/entropy_exit.py (the worked example), solutions.py at the repository
root (yours, once you write it; README, "Exercises") and any `pytest --plugin FILE.py` are loaded
before any test module is collected, so the oracle tests, parametrized over mue's dicts, grade
what they register beside the built-in names.

Tiny copies of the real data files, written field for field in their published formats, for
tests/test_data.py and tests/test_train.py: a loader that disagrees with the published schema
fails here, not on a user's machine.

SNLI-VE, as github.com/necla-ml/SNLI-VE's generator writes it (vet/tools/snli_ve_generator.py; the
fields are listed in vet/tools/snli_ve_parser.py): each line is an SNLI line (annotator_labels,
captionID, gold_label, pairID, sentence1, sentence1_binary_parse, sentence1_parse, sentence2,
sentence2_binary_parse, sentence2_parse) plus Flickr30K_ID, the image's number as a string (the
pairID before ".jpg"), keys sorted; no gold_label "-" lines. Files snli_ve_{train,dev,test}.jsonl.

COCO in Karpathy's split, dataset_coco.json: {"images": [{"filepath", "sentids", "filename",
"imgid", "split", "sentences": [{"tokens", "raw", "imgid", "sentid"}], "cocoid"}],
"dataset": "coco"}, split one of train / restval / val / test.

Images are real JPEGs of different sizes, noisy around one colour (so the files have image data
worth truncating, and the mean colour says which file a sample came from); one is grayscale."""

import json
import os
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
# pytest settles its root beside a `--plugin FILE.py` outside the repository (it takes the file
# for a test path before it knows the option), so pyproject.toml's pythonpath does not apply.
sys.path.insert(0, str(ROOT))

import mue  # noqa: E402
import mue_pytest  # noqa: E402
from data import ShapesDataset, collate, shapes_tokenizer  # noqa: E402

WORKED_EXAMPLE = ROOT / "tests" / "exercises" / "entropy_exit.py"
SOLUTIONS = ROOT / "solutions.py"


def pytest_addoption(parser, pluginmanager):
    if not pluginmanager.has_plugin("mue_pytest"):  # not installed: --plugin=FILE.py still works
        mue_pytest.pytest_addoption(parser)


# `pytest -m exercise_N` runs exercise N's tests and the oracle tests of the names it registers;
# they skip, saying what to write, until it exists (docs/exercises.md).
EXERCISES = ["the worked example, an entropy exit (tests/exercises/entropy_exit.py)",
             "a patience exit for the decoder (PABEE), DEC_SIGNALS['patience']",
             "an encoder signal in which every token counts, ENC_SIGNALS['tokens']",
             "exits under distribution shift, ShapesDataset(min_objects=...)",
             "the decay schedule on long outputs, DEC_SCHEDULES['position']",
             "a learned exit classifier, fit_exit_classifier in solutions.py",
             "distilling the last layer into the early ones, distill_loss in solutions.py",
             "token-level image exits, encode_image_tokens in solutions.py"]


def pytest_configure(config):
    for n, what in enumerate(EXERCISES):
        config.addinivalue_line("markers", f"exercise_{n}: {what}")
    mine = [SOLUTIONS] if SOLUTIONS.exists() else []
    for path in [WORKED_EXAMPLE, *mine, *config.getoption("plugin")]:
        try:
            mue.load_plugin(path)
        except ValueError as e:  # a broken solutions.py: one line naming the file, no trace
            raise pytest.UsageError(str(e)) from None


# A registered name that an exercise asks for: the oracle tests parametrized over that dict carry
# the exercise's marker for it, so `pytest -m exercise_1` runs the oracles on "patience" too.
EXERCISE_OF = {"entropy": 0, "patience": 1, "tokens": 2, "position": 4, "learned": 5}


def registered(registry):
    """pytest parameters, one per name in a registry (sorted), marked with its exercise."""
    return [pytest.param(name, marks=[getattr(pytest.mark, f"exercise_{EXERCISE_OF[name]}")]
                         if name in EXERCISE_OF else []) for name in sorted(registry)]


@pytest.fixture(scope="session")
def tok():
    return shapes_tokenizer()


@pytest.fixture(scope="session")
def trained(tok):
    """A tiny model (32 wide, 3 + 3 layers, 32-pixel images) after 60 steps on shapes: it says
    "a blue square ..." and gets about half of the VE answers right, enough for exits to have
    quality to lose. One thread: tiny models run as fast on one, and the weights do not depend on
    how many the machine has."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = mue.MuE(mue.MuEConfig(vocab_size=len(tok), d_model=32, n_heads=2, d_ff=64,
                                  n_enc_layers=3, n_dec_layers=3, image_size=32, dropout=0.0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    train = ShapesDataset("train", "multi", image_size=32)
    for step in range(60):
        b = collate([train[16 * step + i] for i in range(16)], tok)
        opt.zero_grad()
        model(b.images, b.src, b.tgt_in, b.targets)[1].backward()
        opt.step()
    torch.set_num_threads(before)
    return model.eval()


@pytest.fixture
def ckpt(trained, tok, tmp_path):
    """`trained` as train.py would have saved it, in a folder of its own."""
    path = tmp_path / "ckpt.pt"
    mue.save_checkpoint(path, trained, tokenizer=tok.state_dict(), step=60,
                        train={"task": "multi", "seed": 0, "image_size": 32, "data": "shapes"},
                        optimizer={"lr": 3e-3})
    return path


# ---------------------------------------------------------------------------------------------
# Real data files


def jpeg(path, size, colour, seed=0):
    """A JPEG of size (w, h): `colour` (an int for grayscale) plus uniform noise of +-20."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    shape = (size[1], size[0]) if isinstance(colour, int) else (size[1], size[0], 3)
    noise = np.random.default_rng(seed).integers(-20, 21, shape)
    pixels = np.clip(np.broadcast_to(np.asarray(colour), shape) + noise, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, "JPEG", quality=90)


def truncate(path):
    """Cut a JPEG to 70% of its bytes: Pillow opens it, and decoding it fails."""
    with open(path, "rb") as f:
        b = f.read()
    with open(path, "wb") as f:
        f.write(b[: int(0.7 * len(b))])


# ---------------------------------------------------------------------------------------------
# SNLI-VE

TAGS = {"a": "DT", "an": "DT", "the": "DT", "two": "CD", "are": "VBP", "is": "VBZ", "in": "IN",
        "on": "IN", "at": "IN", "over": "IN", "after": "IN", "their": "PRP$", "own": "JJ"}


def parses(sentence):
    """SNLI's two parses of a sentence, in their formats: a binary bracketing and a Penn
    Treebank tree (a flat one here; the loaders never read either)."""
    words = re.findall(r"\w+|[^\w\s]", sentence)
    body, stop = (words[:-1], words[-1]) if words[-1] == "." else (words, None)
    binary = body[-1]
    for w in reversed(body[:-1]):  # right-branching
        binary = f"( {w} {binary} )"
    binary = f"( {binary} . )" if stop else binary
    leaves = " ".join(f"({TAGS.get(w.lower(), 'NNS' if w.endswith('s') else 'NN')} {w})"
                      for w in body)
    return binary, f"(ROOT (S {leaves}{' (. .)' if stop else ''}))"


# split -> (Flickr30K_ID, size, colour, premise, [(label, hypothesis, annotator labels)])
SNLI_VE = {
    "train": [
        ("1000092795", (40, 30), (200, 30, 30), "Two men in work clothes are fixing a red bike "
         "on the sidewalk.", [
             ("entailment", "Two men are repairing a bicycle.", ["entailment"]),
             ("neutral", "The men are brothers fixing their own bike.", ["neutral"]),
             ("contradiction", "Two women are riding horses on a beach.", ["contradiction"])]),
        ("1001773457", (64, 48), 128, "A black dog jumps over a log in the snow.", [
            ("entailment", "An animal is outside in the snow.", ["entailment"]),
            ("neutral", "The dog is chasing a ball.", ["neutral"]),
            ("contradiction", "A cat sleeps on a couch.", ["contradiction"])]),
    ],
    "dev": [
        ("1003163366", (50, 80), (30, 200, 30), "A woman in a blue coat sells fruit at a "
         "market stall.", [
             ("entailment", "A woman is selling food.",
              ["entailment", "entailment", "entailment", "neutral", "entailment"]),
             ("neutral", "The woman owns the market.",
              ["neutral", "neutral", "contradiction", "neutral", "neutral"]),
             ("contradiction", "A man is buying a car.",
              ["contradiction", "contradiction", "contradiction", "contradiction",
               "contradiction"])]),
    ],
    "test": [
        ("1007129816", (33, 47), (30, 30, 200), "Children play soccer in a muddy field after "
         "school.", [
             ("contradiction", "The children are asleep indoors.",
              ["contradiction", "contradiction", "neutral", "contradiction", "contradiction"]),
             ("entailment", "Kids are playing a sport.",
              ["entailment", "entailment", "entailment", "entailment", "entailment"]),
             ("neutral", "The children are on the same team.",
              ["neutral", "neutral", "neutral", "entailment", "neutral"])]),
    ],
}


def snli_ve_line(fid, caption_no, premise, label, hypothesis, annotators):
    caption_id = f"{fid}.jpg#{caption_no}"
    p_bin, p_parse = parses(premise)
    h_bin, h_parse = parses(hypothesis)
    line = {"annotator_labels": annotators, "captionID": caption_id, "gold_label": label,
            "pairID": f"{caption_id}r1{label[0]}", "sentence1": premise,
            "sentence1_binary_parse": p_bin, "sentence1_parse": p_parse, "sentence2": hypothesis,
            "sentence2_binary_parse": h_bin, "sentence2_parse": h_parse, "Flickr30K_ID": fid}
    return dict(sorted(line.items()))  # as the generator writes them: keys in sorted order


@pytest.fixture
def snli_files(tmp_path):
    """-> namespace: ann (the folder of the three .jsonl files), images (flickr30k-images),
    lines (split -> the dicts written, in order), jpgs (split -> image paths)."""
    ann, images = tmp_path / "snli_ve", tmp_path / "flickr30k-images"
    os.makedirs(ann)
    lines, jpgs = {}, {}
    for split, entries in SNLI_VE.items():
        lines[split], jpgs[split] = [], []
        for k, (fid, size, colour, premise, pairs) in enumerate(entries):
            jpgs[split].append(str(images / f"{fid}.jpg"))
            jpeg(jpgs[split][-1], size, colour, seed=k)
            lines[split] += [snli_ve_line(fid, 2, premise, *p) for p in pairs]
        with open(ann / f"snli_ve_{split}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in lines[split])
    return SimpleNamespace(ann=ann, images=images, lines=lines, jpgs=jpgs)


# ---------------------------------------------------------------------------------------------
# COCO, Karpathy's split

# (split, folder, cocoid, size, colour, raw captions)
COCO = [
    ("train", "train2014", 57870, (40, 30), (200, 30, 30), [
        "A wooden table with six chairs in a bright dining room.",
        "Dining room with a long table and chairs by the window.",
        "a long table surrounded by wooden chairs ",
        "An empty dining table set for a meeting",
        "Wooden chairs stand around a table near large windows."]),
    ("restval", "val2014", 203564, (100, 80), 128, [
        "A bicycle leaning against a brick wall.",
        "The old bike is parked next to a wall.",
        "A black bicycle stands by a wall on a quiet street.",
        "A bicycle with a basket parked outside a shop\n",
        "A bike rests against the side of a building "]),
    ("val", "val2014", 184613, (64, 64), (30, 200, 30), [
        "A child with an umbrella standing next to a cow.",
        "A young boy holding an umbrella near a herd of cattle.",
        "a boy in a field with cows and an umbrella",
        "A small boy touches the horn of a cow.",
        "A boy holds an umbrella while standing next to livestock."]),
    ("test", "val2014", 391895, (50, 120), (30, 30, 200), [
        "A man riding a motorbike on a dirt road. ",
        "A person on a motorcycle rides along a country road.",
        "A man on a small motorbike on a hill.",
        "A rider in a red jacket on a motorcycle in the hills.",
        "A zebra grazing near a dirt road."]),
]

@pytest.fixture
def coco_files(tmp_path):
    """-> namespace: ann (dataset_coco.json), images (the folder holding train2014/, val2014/),
    entries (the published dicts), jpgs (one path per entry)."""
    root = tmp_path / "coco"
    entries, jpgs, sentid = [], [], 770337
    for imgid, (split, folder, cocoid, size, colour, raws) in enumerate(COCO):
        name = f"COCO_{folder}_{cocoid:012d}.jpg"
        jpgs.append(str(root / folder / name))
        jpeg(jpgs[-1], size, colour, seed=imgid)
        sentences = [{"tokens": re.findall(r"\w+", raw.lower()), "raw": raw, "imgid": imgid,
                      "sentid": sentid + j} for j, raw in enumerate(raws)]
        entries.append({"filepath": folder, "sentids": [s["sentid"] for s in sentences],
                        "filename": name, "imgid": imgid, "split": split,
                        "sentences": sentences, "cocoid": cocoid})
        sentid += len(raws)
    ann = tmp_path / "dataset_coco.json"
    ann.write_text(json.dumps({"images": entries, "dataset": "coco"}))
    return SimpleNamespace(ann=ann, images=root, entries=entries, jpgs=jpgs)
