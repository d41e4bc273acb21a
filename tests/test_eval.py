"""Tests of eval.py: the scores and the FLOP counts against hand counts and against torch's own
FLOP counter on real generations, the calibration's promise checked by an evaluation of its own,
the command line end to end (table, JSON, PNGs, the checkpoint it updates), and its errors.

Models are tiny (32 wide, 3 + 3 layers, 32-pixel images) on the CPU with one thread, seeded. A
few use a model trained for 60 steps (conftest's `trained`), so that quality is above zero and an
exit can cost some.
"""

import copy
import itertools
import json
import math
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

import eval as ev
import mue
from conftest import WORKED_EXAMPLE
from data import Sample, ShapesDataset, collate
from mue import ExitConfig, MuE, MuEConfig, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(d_model=32, n_heads=2, d_ff=64, n_enc_layers=3, n_dec_layers=3, image_size=32,
            dropout=0.0)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run as fast on one thread, and a busy machine slows two threads down a lot."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def widened(seed=0, **overrides):
    """A random tiny model with wide weights, so that its exit signals spread (as in test_mue)."""
    torch.manual_seed(seed)
    model = MuE(MuEConfig(**{"vocab_size": 20, **TINY, **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith(("stem", "enc_ln", "dec_ln")) and ".ln" not in name:
                p.normal_(0, 0.3)
    return model.eval()


# -- scores -------------------------------------------------------------------------------------


def test_bleu4_matches_a_hand_count():
    preds = ["A red circle and a box.", "a square"]
    refs = [["a red circle and a box", "there is a red circle and a box"],
            ["a green square", "a small green square"]]
    # Sentence 1 is reference 1: 6/6 unigrams, 5/5 bigrams, 4/4 trigrams, 3/3 4-grams; length 6,
    # closest reference 6. Sentence 2: "a", "square" match (2/2), "a square" does not (0/1), no
    # 3- or 4-grams; length 2, closest reference 3. Corpus: (8/8 * 5/6 * 4/4 * 3/3)^(1/4) with
    # the brevity penalty exp(1 - 9/8), the reference length 9 exceeding the output's 8.
    hand = (8 / 8 * 5 / 6 * 4 / 4 * 3 / 3) ** 0.25 * math.exp(1 - 9 / 8)
    bleu, _ = ev.caption_scores(preds, refs)
    assert bleu == pytest.approx(hand, abs=1e-6)


def test_cider_d_matches_a_hand_count():
    preds = ["Red, circle!", "blue square thing"]
    refs = [["red circle"], ["blue square"]]
    # Two images, so every n-gram seen in one image's references (or in none) weighs
    # g = log(2) - log(max(1, df)) = log 2 per occurrence; cosines per n-gram order n = 1..4.
    # Image 1 is its reference: n=1 and n=2 give 1, n=3, 4 have no n-grams and give 0.
    img1 = 10 * (1 + 1 + 0 + 0) / 4
    # Image 2, unigrams {blue, square, thing} vs {blue, square}: 2g^2 / (sqrt3 g * sqrt2 g);
    # bigrams {blue square, square thing} vs {blue square}: g^2 / (sqrt2 g * g); trigram: 0.
    # CIDEr-D's length penalty: exp(-(3 - 2)^2 / (2 * 6^2)) on every order.
    img2 = 10 * (2 / math.sqrt(6) + 1 / math.sqrt(2) + 0 + 0) / 4 * math.exp(-1 / 72)
    _, cider = ev.caption_scores(preds, refs)
    assert cider == pytest.approx((img1 + img2) / 2, rel=1e-9)
    assert ev.CiderD(refs)(preds) == pytest.approx([img1, img2], rel=1e-9)  # per sample
    assert ev.each_sample("caption", refs)(preds[1:], 1) == pytest.approx([100 * img2], rel=1e-9)
    q = ev.quality("caption", preds, refs)
    assert q["quality"] == q["cider"] == pytest.approx(100 * cider)


@pytest.mark.parametrize("seed", range(20))
def test_cached_cider_d_is_pycocoevalcaps_bit_for_bit(seed):
    """Oracle: calibration's CIDEr-D (references prepared once) against pycocoevalcap's on
    random captions: repeated and unseen words, empty predictions, one-word references, one to
    four references per image; and any slice scored alone, with the idf of all the images."""
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(40)]

    def text(lo, hi):
        return " ".join(rng.choice(words, rng.integers(lo, hi)))

    refs = [[text(1, 9) for _ in range(rng.integers(1, 5))] for _ in range(rng.integers(2, 300))]
    preds = [text(0, 12) if rng.random() < 0.6 else str(rng.choice(r)) for r in refs]
    gts = {i: [ev.clean(r) for r in rs] for i, rs in enumerate(refs)}
    res = {i: [ev.clean(p)] for i, p in enumerate(preds)}
    _, truth = ev.Cider().compute_score(gts, res)
    cider = ev.CiderD(refs)
    assert cider(preds) == list(truth)
    k = int(rng.integers(0, len(refs)))
    assert cider(preds[k:k + 5], k) == list(truth[k:k + 5])


def test_ve_accuracy_compares_normalised_words():
    preds, refs = ["Yes.", "no", "maybe"], [["yes"], ["maybe"], ["maybe"]]
    q = ev.quality("ve", preds, refs)
    assert q["quality"] == q["accuracy"] == pytest.approx(200 / 3)
    assert ev.each_sample("ve", refs)(preds) == [100, 0, 100]
    assert ev.each_sample("ve", refs)(preds[2:], 2) == [100]
    with pytest.raises(ValueError, match="unknown task"):
        ev.quality("vqa", ["a"], [["a"]])
    with pytest.raises(ValueError, match="2 predictions for 3 samples"):
        ev.quality("ve", preds[:2], refs)


# -- cost ---------------------------------------------------------------------------------------


def test_macs_match_a_hand_count():
    model = widened()  # resnet18, 2 stages, 32-pixel images: a 4x4 grid of 128-channel patches
    stem = (16 * 16 * 64 * 3 * 7 * 7  # conv1, 7x7 stride 2: 32 -> 16 pixels, 3 -> 64 channels
            + 4 * 8 * 8 * 64 * 64 * 9  # layer1 after the stride-2 max-pool: four 3x3 convs at 8x8
            + 4 * 4 * 128 * 64 * 9  # layer2 block 1: 3x3 stride 2 conv, 64 -> 128, out 4x4
            + 4 * 4 * 128 * 64  # its 1x1 stride 2 shortcut
            + 3 * 4 * 4 * 128 * 128 * 9)  # the other three 3x3 convs of layer2, 128 -> 128
    assert ev.stem_macs(model) == stem
    C, Ff, V = 32, 64, 20  # width, MLP width, vocabulary
    patches = 16 * 128 * C  # 16 patches projected from 128 stem channels to C
    enc_img = 4 * 16 * C * C + 2 * 16 * 16 * C + 2 * 16 * C * Ff  # projections, attention, MLP
    enc_txt = 4 * 5 * C * C + 2 * 5 * 5 * C + 2 * 5 * C * Ff  # 5 prompt tokens
    M = 16 + 5
    cross_kv = 2 * M * C * C  # per decoder layer reached

    def dec(t, k):  # token t through k layers: self-attn (4 proj, over t+1 keys), cross, MLP
        return k * (4 * C * C + 2 * (t + 1) * C + 2 * C * C + 2 * M * C + 2 * C * Ff)

    # Image 2 layers, text 3, tokens through 3, 1, 2 decoder layers; confidence exits: the head
    # at every layer a token runs; an early token gets K/V for the skipped layers that a later
    # token reads: token 1 for layer 2 (token 2 reads it), token 2 for none (nothing follows).
    hand = (stem + patches + 2 * enc_img + 3 * enc_txt + 3 * cross_kv
            + dec(0, 3) + 3 * C * V
            + dec(1, 1) + 1 * C * V + 1 * 2 * C * C
            + dec(2, 2) + 2 * C * V)
    conf = ExitConfig(0.5, 0.5, 0.5)
    assert ev.sample_macs(model, conf, stem, 5, 2, 3, [3, 1, 2]) == hand
    # Similarity exits read the head once per token, at the exit layer.
    sim = ExitConfig(0.5, 0.5, 0.5, dec_criterion="similarity")
    assert ev.sample_macs(model, sim, stem, 5, 2, 3, [3, 1, 2]) == hand - (2 + 0 + 1) * C * V
    full = stem + patches + 3 * enc_img + 3 * enc_txt + 3 * cross_kv + sum(
        dec(t, 3) + C * V for t in range(4))
    assert ev.sample_macs(model, None, stem, 5, 3, 3, [3] * 4) == full
    # Joint fusion: one sequence of 21 tokens, with attention across it.
    joint = widened(fusion="joint")
    enc_joint = 4 * M * C * C + 2 * M * M * C + 2 * M * C * Ff
    assert ev.sample_macs(joint, None, stem, 5, 2, 2, [3] * 4) == full - 3 * enc_img \
        - 3 * enc_txt + 2 * enc_joint
    assert ev.layer_reduction(2, 4, [6, 3, 3], 6, 6) == pytest.approx(1 - (3 + 4) / 12)


def explicit_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False):
    """Attention as plain matrix products, which torch's FLOP counter sees (the fused CPU
    kernel it does not)."""
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if is_causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf"))
    return s.softmax(-1) @ v


@pytest.mark.parametrize("fusion", ["decomposed", "joint"])
@pytest.mark.parametrize("ex", [None, ExitConfig(0.5, 0.5, 0.3), ExitConfig(1.0, 1.0, 0.2),
                                ExitConfig(0.9, 0.2, 0.5, dec_criterion="similarity"),
                                ExitConfig(0.95, 0.6, 0.3, dec_schedule="decay"),
                                ExitConfig(0.5, 0.5, 0.3, dec_min_layer=2)])
@pytest.mark.parametrize("n_pre", [1, 5])
def test_macs_equal_torch_flop_counter_on_real_generations(fusion, ex, n_pre, monkeypatch):
    monkeypatch.setattr(F, "scaled_dot_product_attention", explicit_sdpa)
    model = widened(seed=3, fusion=fusion)
    g = torch.Generator().manual_seed(4)
    images, src = torch.randn(1, 3, 32, 32, generator=g), torch.randint(3, 20, (1, 7), generator=g)
    prefix = torch.cat([torch.ones(1, 1, dtype=torch.long), src[:, :n_pre - 1]], 1)  # VE's way
    with FlopCounterMode(display=False) as counter:
        out = model.generate(images, src, 8, exit=ex, prefix=prefix)
    dec = [k for k in out.dec_layers[0].tolist() if k > 0]
    macs = ev.sample_macs(model, ex, ev.stem_macs(model), 7, out.img_layers.item(),
                          out.txt_layers.item(), dec, n_pre)
    assert macs == counter.get_total_flops() // 2  # a multiply-accumulate is two FLOPs


# -- compare and calibrate ----------------------------------------------------------------------


def own_quality(model, samples, tok, ex, batch_size=8):
    """Quality and mean encoder layers of one configuration, computed here from generate."""
    preds, img = [], []
    longest = max(len(tok.encode(r)) for s in samples for r in s.refs)
    budget = 1 if samples[0].task == "ve" else longest + 3  # VE: the answer (ev.prepare)
    for i in range(0, len(samples), batch_size):
        b = collate(samples[i:i + batch_size], tok, truncate=True)
        g = model.generate(b.images, b.src, budget, exit=ex, prefix=b.prefix)
        preds += [tok.decode(t) for t in g.tokens]
        img += g.img_layers.tolist()
    return ev.quality(samples[0].task, preds, [s.refs for s in samples])["quality"], img


def test_compare_rows(trained, tok):
    test = ShapesDataset("test", "multi", image_size=32)
    exits = {"caption": ExitConfig(0.9, 0.8, 0.6), "ve": ExitConfig(0.8, 0.95, 0.5)}
    rows = ev.compare(trained, test, tok, "cpu", exits, batch_size=8, n=24, n_b1=2, repeats=1,
                      log=lambda s: None)
    names = ["full", "MuE", "MuE decoder exits only", "MuE encoder exits only", "static 2+2",
             "static 1+1", "full, shuffled images"]  # every static k + k, then the mismatches
    assert [(r["task"], r["name"]) for r in rows] == [(t, n) for t in ("caption", "ve")
                                                      for n in names] + [
        ("ve", "full, shuffled texts")] and rows[-1]["task"] == "ve"
    rows.insert(len(names), rows.pop())  # in task order, for the checks below
    json.dumps(rows)  # plain data
    for r in rows:
        assert {"name", "task", "quality", "retention", "layer_reduction", "flop_reduction",
                "speedup_b1", "speedup_b32", "thresholds"} <= r.keys()
        if "shuffled" in r["name"]:  # a quality check, untimed
            assert r["speedup_b1"] is None and r["thresholds"] is None
            continue
        for key in ("b1", "b32"):
            assert r[f"speedup_{key}"] > 0
            assert r[f"ratio_{key}"] == pytest.approx(r[f"speedup_{key}"] / r[f"pred_{key}"])
        if r["name"] == "full":
            assert r["retention"] == 1 and r["layer_reduction"] == r["flop_reduction"] == 0
            assert r["speedup_b1"] == r["speedup_b32"] == r["flop_speedup"] == 1
            assert r["img_layers"] == r["txt_layers"] == r["dec_layers"] == 3
        if r["name"] == "static 2+2":
            assert r["layer_reduction"] == pytest.approx(1 - 4 / 6) and r["thresholds"] is None
            assert 0 < r["flop_reduction"] < 1 - 4 / 6  # the stem runs in full
        if r["name"] == "MuE decoder exits only":
            assert r["img_layers"] == r["txt_layers"] == 3
        if r["name"] == "MuE encoder exits only":
            assert r["dec_layers"] == 3
        if r["name"] == "MuE":
            assert r["layer_reduction"] > 0 and r["thresholds"] == asdict(exits[r["task"]])
    samples = [test[i] for i in range(24)]
    for task in ("caption", "ve"):
        mine = [s for s in samples if s.task == task]
        q_full, _ = own_quality(trained, mine, tok, None)
        q_mue, img = own_quality(trained, mine, tok, exits[task])
        full, mue = (next(r for r in rows if r["task"] == task and r["name"] == n)
                     for n in ("full", "MuE"))
        assert full["quality"] == pytest.approx(q_full) and mue["quality"] == pytest.approx(q_mue)
        assert mue["img_layers"] == pytest.approx(sum(img) / len(img))
        # the shuffled rows: the full model on pairs where every sample has another's input
        for what in ("images", "texts") if task == "ve" else ("images",):
            pairs = check_deranged(mine, what)
            row = next(r for r in rows if r["task"] == task and r["name"] == f"full, shuffled "
                       f"{what}")
            assert row["quality"] == pytest.approx(own_quality(trained, pairs, tok, None)[0])


def check_deranged(samples, what):
    """ev.shuffled's pairs: the same inputs, each on another sample, none equal to the sample's
    own (by pixels, or by text), and the references where they were."""
    pairs = ev.shuffled(samples, what)
    fields = ("image",) if what == "images" else ("src", "prefix")

    def key(s):
        return tuple(getattr(s, f).numpy().tobytes() if f == "image" else getattr(s, f)
                     for f in fields)
    assert sorted(map(key, pairs)) == sorted(map(key, samples))  # a permutation of the inputs
    for p, s in zip(pairs, samples, strict=True):
        assert key(p) != key(s) and p.refs == s.refs and p.tgt == s.tgt
    return pairs


def test_shuffled_images_differ_in_pixels_on_files_grouped_by_image():
    """SNLI-VE's lines come grouped by image (5 images x 6 lines, as in the published files): the
    next line's image is mostly the line's own, so every sample must get one from another group."""
    images = [torch.full((3, 4, 4), float(k)) for k in range(5)]
    samples = [Sample(images[k].clone(), f"does the image describe {k}-{j}?", "yes", ["yes"],
                      "ve", f"does the image describe {k}-{j}?") for k in range(5)
               for j in range(6)]
    check_deranged(samples, "images")
    check_deranged(samples, "texts")
    lopsided = samples[:6] + samples[6:8]  # one image on 6 of 8 lines: no derangement exists
    assert ev.shuffled(lopsided, "images") is None


def test_an_ablation_row_is_measured_against_its_own_full_model(trained, tok):
    """An ablation whose MuE changes nothing keeps 100% of its own full model, which scores
    otherwise than the main one: against the main full model it read 70%."""
    other = copy.deepcopy(trained)
    with torch.no_grad():
        other.decoder[-1].mlp[2].weight.mul_(-1.0)
    never = {t: ExitConfig() for t in ("caption", "ve")}
    rows = ev.compare(trained, ShapesDataset("test", "multi", image_size=32), tok, "cpu", never,
                      batch_size=8, n=16, n_b1=1, repeats=1, ablations=[("half", other, never)],
                      log=lambda line: None)
    quality = {(r["task"], r["name"]): r["quality"] for r in rows}
    assert quality["caption", "half: full"] != quality["caption", "full"]  # the models differ
    for task in ("caption", "ve"):
        row = {r["name"]: r for r in rows if r["task"] == task}
        for name in ("half: full", "half: MuE"):
            assert row[name]["reference"] == "half: full" and row[name]["retention"] == 1
            assert row[name]["flop_reduction"] == 0 and row[name]["pred_b1"] == 1
        assert row["MuE"]["reference"] == "full"


def test_ve_is_decided_by_one_decoder_pass_as_the_authors_score_it(trained, tok):
    """The authors' VE evaluation runs the prompt and an answer through the decoder once; here the
    answer is the full model's argmax after the prompt in one teacher-forced forward, and each VE
    sample counts one decoder decision (no eos step), while captions still end with their eos."""
    samples = [ShapesDataset("test", "multi", image_size=32)[i] for i in range(16)]
    data = ev.prepare(samples, tok, trained.cfg, None, 8, "cpu")
    assert data["ve"].max_new == 1 and data["caption"].max_new > 1
    run = ev.run_configs([("full", trained, None)], data["ve"].batches, tok, 1)[0]
    assert run.dec == [[3]] * 8 and all(len(t) == 1 for t in run.tokens)
    b = data["ve"].batches[0]
    with torch.no_grad():
        logits, _ = trained(b.images, b.src, b.tgt_in)  # (B, T, V)
    last = (b.prefix != trained.cfg.pad_id).sum(1) - 1  # the prompt's last position
    answers = logits[torch.arange(len(last)), last].argmax(-1)
    assert run.preds == [tok.decode([a]) for a in answers.tolist()]
    cap = ev.run_configs([("full", trained, None)], data["caption"].batches, tok,
                         data["caption"].max_new)[0]
    assert any(len(d) > 1 for d in cap.dec)


@pytest.mark.parametrize("world", [
    [(-0.01, 0.975), (0.99, 0.01), (-1.0, 0.002), (0.0, 0.013)],  # VE: right, lost, gained, wrong
    [(-0.02, 0.98), (0.98, 0.02)],  # rare large losses
    [(x / 10 + 0.05, 0.1) for x in range(-5, 5)]])  # spread evenly
def test_the_betting_p_value_holds_its_level(world):
    """At the edge of the hypothesis, E[z] = 0 exactly (mass moved between the first two values
    centres a world), p <= delta in at most delta of 400 draws of 1600 units, within three Monte
    Carlo standard errors."""
    values, probs = map(list, zip(*world, strict=True))
    shift = np.dot(values, probs) / (values[1] - values[0])
    probs[0], probs[1] = probs[0] + shift, probs[1] - shift
    assert abs(np.dot(values, probs)) < 1e-12 and abs(sum(probs) - 1) < 1e-12
    rng = np.random.default_rng(0)
    rejected = sum(ev.p_value(list(rng.choice(values, 1600, p=probs)), 0.05) <= 0.05
                   for _ in range(400))
    assert rejected <= 0.05 * 400 + 3 * math.sqrt(400 * 0.05 * 0.95), rejected


def test_the_betting_p_value_certifies_what_it_should():
    """Nothing changed on 1600 VE units (1.3% of them wrong for the full model too) passes at
    target 99%, delta 0.05; on 300 units it cannot (the bets cannot grow fast enough). Gains
    offset losses: 12 answers lost and 12 gained pass, 12 lost alone do not (one-sided, 0.75% of
    the units lost), and 30 lost with 30 gained fail only when the gains go."""
    def z(n, lost=0, gained=0, wrong=0.013):  # target 0.99: z = 0.99 full - exits, per unit
        n_wrong = round(wrong * n)
        units = [-0.01] * (n - n_wrong - lost) + [0.99] * lost + [0.0] * (n_wrong - gained) \
            + [-1.0] * gained
        return list(np.random.default_rng(1).permutation(units))
    assert ev.p_value(z(1600), 0.05) <= 0.05
    assert ev.p_value(z(300), 0.05) > 0.05
    assert ev.p_value(z(1600, lost=12, gained=12), 0.05) <= 0.05
    assert ev.p_value(z(1600, lost=12), 0.05) > 0.05
    assert ev.p_value(z(1600, lost=30, gained=30), 0.05) <= 0.05 < ev.p_value(z(1600, 30), 0.05)
    assert ev.p_value([0.5] * 1600, 0.05) == 1.0  # every bet lost: no evidence at all


def test_the_p_value_of_the_first_units_is_never_below_the_whole_tests():
    """What lets a test stop early: told that n units will come, the bets on the first k are
    those of the whole test, so its p-value there is never below the whole test's, and a test
    that reached delta on its first units passes on them all."""
    rng = np.random.default_rng(0)
    for _ in range(40):
        z = list(rng.choice([-0.01, 0.99, -1.0, 0.0], 800, p=[0.975, 0.01, 0.005, 0.01]))
        whole = ev.p_value(z, 0.05)
        firsts = [ev.p_value(z[:k], 0.05, len(z)) for k in range(0, 801, 50)]
        assert all(p >= whole for p in firsts) and firsts[-1] == whole
        assert firsts == sorted(firsts, reverse=True)  # more units, more evidence so far


class Stub:
    """Validation answers of a known world, for calibrate_task without a model: sample i is a
    full-model success unless full_wrong[i], and configuration c flips it when flips(c, i); c
    holds the thresholds below 1, and dec_min_layer where the decoder exits from a later layer."""

    def __init__(self, monkeypatch, n, full_wrong, flips, cands, saving, batch=512):
        self.full_wrong, self.flips, self.saving = full_wrong, flips, saving
        monkeypatch.setattr(ev, "run_configs", self.run_configs)
        monkeypatch.setattr(ev, "knobs", lambda model, td, base, levels, dec_min_layer: cands)
        monkeypatch.setattr(ev, "each_sample", lambda task, refs: lambda preds, start=0: preds)
        samples = [SimpleNamespace(image=torch.tensor([i]), refs=None) for i in range(n)]
        cut = n // 5
        self.tune, self.test = (ev.TaskData(samples[a:b], [np.arange(i, min(i + batch, b))
                                                           for i in range(a, b, batch)], 1)
                                for a, b in ((0, cut), (cut, n)))

    def run_configs(self, configs, units, tok, max_new, repeats=1, warmup=False):
        (_, _, ex), idx = configs[0], np.concatenate(units)
        fields = {} if ex is None else {f: getattr(ex, f) for f in ev.KNOB_FIELDS.values()
                                        if getattr(ex, f) < 1}
        if ex is not None and ex.dec_min_layer > 1:
            fields["dec_min_layer"] = ex.dec_min_layer
        wrong = self.full_wrong[idx] ^ self.flips(fields, idx)
        return [ev.Run(preds=list(np.where(wrong, 0.0, 100.0)), refs=[None] * len(idx),
                       macs=[100.0 - self.saving(fields)] * len(idx))]

    def calibrate(self, target=0.99, delta=0.05, paths=((1, 1.0),)):
        return ev.calibrate_task(None, "ve", self.tune, self.test, None, target, delta,
                                 ExitConfig(), lambda line: None, paths)


def test_calibration_walks_the_safest_step_first_and_stops_at_the_first_failure(monkeypatch):
    """2000 answers the full model gets right. The image's candidate breaks 2% of them, the
    text's second one 0.1%, the decoder's third 1.5%; the rest break nothing. The path takes
    the decoder, the text, the decoder, the text, then the decoder's third step (1.5%) before
    the image (2%); testing passes the first four and stops at the fifth."""
    every = {("img_threshold", 0.9): 50, ("txt_threshold", 0.8): 1000,
             ("dec_threshold", 0.5): 67}  # the candidates that break every k-th answer

    def breaks(fields, idx):
        return np.array([any(i % every[f] == 7 for f in fields.items() if f in every)
                         for i in idx], dtype=bool)

    cands = {"img": [{"img_threshold": 0.9}],
             "txt": [{"txt_threshold": 0.95}, {"txt_threshold": 0.8}],
             "dec": [{"dec_threshold": v} for v in (0.7, 0.6, 0.5)]}
    saves = {0.9: 1, 0.95: 5, 0.8: 8, 0.7: 25, 0.6: 26, 0.5: 27}
    stub = Stub(monkeypatch, 2000, np.zeros(2000, dtype=bool), breaks, cands,
                lambda fields: sum(saves[v] for v in fields.values()))
    ex, record = stub.calibrate()
    assert (ex.img_threshold, ex.txt_threshold, ex.dec_threshold) == (1.0, 0.8, 0.6)
    [path] = record["paths"]
    assert path["passed"] == 4 and path["tested"] == 5 and record["units"] == 1600
    assert record["samples"] == {"tuning": 400, "testing": 1600} and record["delta"] == 0.05
    # what ended the path: the fifth configuration, where the decoder breaks 1.5% of the answers
    stop = path["stopped_at"]
    assert {f: stop["thresholds"][f] for f in ev.KNOB_FIELDS.values()} == {
        "img_threshold": 1.0, "txt_threshold": 0.8, "dec_threshold": 0.5} and stop["p"] > 0.05
    i = np.arange(400, 2000)  # the testing samples, with the text's 0.1% broken too
    assert stop["quality"] == pytest.approx(100 * (1 - np.mean((i % 67 == 7) | (i % 1000 == 7))))
    # A test that passes stops at the batch where its p-value reaches delta (the bound holds at
    # any time); testing every sample at once decides alike, and runs them all.
    assert record["testing_samples_run"] < 5 * 1600
    whole = Stub(monkeypatch, 2000, np.zeros(2000, dtype=bool), breaks, cands,
                 lambda fields: sum(saves[v] for v in fields.values()), batch=1600)
    ex_whole, record_whole = whole.calibrate()
    assert ex_whole == ex and record_whole["paths"] == record["paths"]
    assert record_whole["testing_samples_run"] == 5 * 1600
    # with 400 validation samples, not even a change-nothing configuration can be certified
    small = Stub(monkeypatch, 400, np.zeros(400, dtype=bool), breaks, cands,
                 lambda fields: sum(saves[v] for v in fields.values()))
    assert small.calibrate()[0] == ExitConfig()


@pytest.mark.parametrize("gains", [False, True])
def test_the_promise_holds_over_many_validation_draws(monkeypatch, gains):
    """What the promise says, simulated: 2000 validation samples (train.py's default) drawn from
    a known world, through the real search with its two paths, 300 draws. Each knob has six
    nested candidates; the k-th breaks a share p_k of the answers the full model gets right,
    independently across knobs, and with gains it also mends a share g_k of those the full model
    gets wrong, so that some configurations lose answers but keep 99% net. From decoder layer 2
    on, the decoder's candidates break and mend a quarter as many and save 60% as much. The chosen
    configuration is truly below 99% of the full model's accuracy in at most delta of the draws,
    within three Monte Carlo standard errors (at 5%, 300 draws: 26 or fewer); exits are chosen in
    most draws, from either path. The search before risk control went below 99% in 92 of 300 such
    draws of 500 samples: docs/results.md, "Calibration"."""
    # per candidate: p, the share broken; g, the share mended; acc: the full model's accuracy
    if gains:
        p, g, acc = [0.002, 0.006, 0.012, 0.02, 0.03, 0.04], [0.05, 0.1, 0.2, 0.3, 0.4, 0.5], 0.97
    else:
        p, g, acc = [0.001, 0.003, 0.006, 0.009, 0.013, 0.02], [0.0] * 6, 0.996
    knobs = ("img", "txt", "dec")
    cands = {k: [{f"{k}_threshold": 0.9 - 0.1 * c} for c in range(6)] for k in knobs}

    def later(fields, knob):  # the decoder exits from layer 2 on: a quarter of the changes
        return 0.25 if knob == "dec" and "dec_min_layer" in fields else 1.0

    def share(fields, knob, levels):
        v = fields.get(f"{knob}_threshold")
        return 0.0 if v is None else levels[round((0.9 - v) / 0.1)] * later(fields, knob)

    def saving(fields):
        return sum(10 * (1 + round((0.9 - fields[f"{k}_threshold"]) / 0.1))
                   * (0.6 if later(fields, k) < 1 else 1) for k in knobs
                   if f"{k}_threshold" in fields)

    rng, below, chosen, second, n = np.random.default_rng(0), 0, 0, 0, 2000
    for _ in range(300):
        fragile = rng.random((3, n))  # knob k flips answer i when fragile[k, i] < its share
        full_wrong = rng.random(n) > acc

        def flips(fields, idx, fragile=fragile, full_wrong=full_wrong):
            hit = [fragile[k, idx] < np.where(full_wrong[idx], share(fields, knob, g),
                                              share(fields, knob, p))
                   for k, knob in enumerate(knobs)]
            return np.any(hit, axis=0)
        stub = Stub(monkeypatch, n, full_wrong, flips, cands, saving)
        ex, _ = stub.calibrate(paths=((1, 1 - ev.SECOND), (2, ev.SECOND)))
        fields = {f: getattr(ex, f) for f in ev.KNOB_FIELDS.values() if getattr(ex, f) < 1}
        fields.update({"dec_min_layer": 2} if ex.dec_min_layer == 2 else {})
        right = acc * math.prod(1 - share(fields, k, p) for k in knobs)
        mended = (1 - acc) * (1 - math.prod(1 - share(fields, k, g) for k in knobs))
        below, chosen = below + ((right + mended) / acc < 0.99), chosen + bool(fields)
        second += ex.dec_min_layer == 2
    assert below <= 0.05 * 300 + 3 * math.sqrt(300 * 0.05 * 0.95), below
    assert chosen >= 150, chosen  # the search does pick exits: the check has teeth
    assert 30 <= second <= 270, second  # and both paths win draws


@pytest.mark.parametrize("target, base, n", [
    (0.9, ExitConfig(), 32),
    (0.95, ExitConfig(dec_criterion="similarity", dec_schedule="decay"), 16)])
def test_calibration_on_a_model_keeps_the_target_on_val_and_says_what_it_did(trained, tok,
                                                                            target, base, n,
                                                                            monkeypatch):
    val = ShapesDataset("val", "multi", image_size=32)
    lines, asked, knobs = [], [], ev.knobs

    def spy(model, td, base, levels, dec_min_layer=1):  # which decoder layers each path reads
        asked.append(dec_min_layer)
        return knobs(model, td, base, levels, dec_min_layer)
    monkeypatch.setattr(ev, "knobs", spy)
    exits, records = ev.calibrate(trained, val, tok, "cpu", target, batch_size=8, n=n,
                                  base=base, log=lines.append)
    paths = [p for r in records.values() for p in r["paths"]]
    stops = [p for p in paths if p["stopped_at"]]
    assert set(exits) == set(records) == {"caption", "ve"}
    assert [p["dec_min_layer"] for p in paths] == [1, 2] * 2  # 4 of delta's 5 parts, and 1
    assert asked == [1, 2] * 2  # path 2's candidates from layer 2 on
    assert [p["delta"] for p in paths] == pytest.approx([0.04, 0.01] * 2)
    assert len(lines) == 2 + len(paths) + len(stops)  # per task, per path, per stop
    for p in stops:  # the line that says what ended the path, with its p-value
        stop = p["stopped_at"]
        assert stop["p"] > p["delta"] and sum(f"p {stop['p']:.3f} > {p['delta']:g}" in x
                                              for x in lines) >= 1
    samples = [val[i] for i in range(n)]
    for task, ex in exits.items():
        assert (ex.dec_criterion, ex.dec_schedule) == (base.dec_criterion, base.dec_schedule)
        mine = [s for s in samples if s.task == task]
        q_full, _ = own_quality(trained, mine, tok, None)
        q_exit, _ = own_quality(trained, mine, tok, ex)
        assert q_exit >= target * q_full - 1e-9, (task, ex, q_exit, q_full)
        r = records[task]
        assert r["samples"]["tuning"] + r["samples"]["testing"] == len(mine) == r["units"] + \
            r["samples"]["tuning"] and r["delta"] == 0.05 and r["target"] == target
        assert all(p["passed"] <= p["tested"] <= p["length"] for p in r["paths"])
    with pytest.raises(ValueError, match="target"):
        ev.calibrate(trained, val, tok, "cpu", 1.5)
    with pytest.raises(ValueError, match="delta"):
        ev.calibrate(trained, val, tok, "cpu", 0.99, 1.0)
    with pytest.raises(ValueError, match="dec-min-layer"):
        ev.calibrate(trained, val, tok, "cpu", dec_min_layer=0)


def test_joint_fusion_moves_both_encoder_thresholds_together(tok):
    """A joint encoder exits only when both modalities' rules agree: one knob sets both."""
    model = widened(fusion="joint", vocab_size=len(tok))
    td = ev.prepare(ShapesDataset("val", "ve", image_size=32, size=8), tok, model.cfg, 8, 8,
                    "cpu")["ve"]
    knobs = ev.knobs(model, td, ExitConfig(), (0.9, 0.5))
    assert set(knobs) == {"enc", "dec"} and knobs["enc"]
    assert all(c.keys() == {"img_threshold", "txt_threshold"} for c in knobs["enc"])
    decomposed = ev.knobs(widened(vocab_size=len(tok)), td, ExitConfig(), (0.9, 0.5))
    assert set(decomposed) == {"img", "txt", "dec"}


@pytest.mark.parametrize("m", [1, 2])
def test_decoder_candidates_are_quantiles_from_the_first_exit_layer_on(trained, tok, m):
    """Oracle: the decoder's candidates against quantiles of the signals gathered one by one,
    at the positions generate decides, from layer m to the last but one. The layer is passed on
    its own: a base that never exits has dec_min_layer 1, so reading it from the base once gave
    the second path the first path's candidates."""
    td = ev.prepare(ShapesDataset("val", "multi", image_size=32), tok, trained.cfg, 24, 24,
                    "cpu")["caption"]
    levels = (0.9, 0.6, 0.3, 0.1)
    got = [c["dec_threshold"] for c in ev.knobs(trained, td, ExitConfig(), levels, m)["dec"]]
    b, L = td.batches[0], trained.cfg.n_dec_layers
    conf = trained.profile(b.images, b.src, b.tgt_in)["dec_confidence"]  # (B, T, L)
    values = [conf[i, t, l].item() for i in range(conf.shape[0]) for t in range(conf.shape[1])
              for l in range(m - 1, L - 1)
              if b.tgt_mask[i, t] and b.tgt_mask[i, :t + 1].sum() <= td.max_new]
    want = [min(round(float(np.quantile(values, lv)), 6), 0.999999) for lv in levels]
    assert got == pytest.approx(list(dict.fromkeys(want)), abs=2e-6) and got
    if m > 1:  # the layers before m would have given others
        assert got != [c["dec_threshold"] for c in
                       ev.knobs(trained, td, ExitConfig(), levels, m - 1)["dec"]]


def test_candidates_come_from_every_tuning_sample_whatever_the_batch_size(trained, tok):
    """The quantiles are over all of td's samples: read from the first batches only, they came
    from 64 samples at batch size 32 and from 256 at 128, and the chosen exits moved with it."""
    val = ShapesDataset("val", "multi", image_size=32)
    got = [ev.knobs(trained, ev.prepare(val, tok, trained.cfg, 24, b, "cpu")["caption"],
                    ExitConfig(), (0.9, 0.7, 0.5, 0.3, 0.1)) for b in (2, 5, 24)]
    assert got[0].keys() == got[1].keys() == got[2].keys() and got[0]["dec"]
    for k in got[0]:
        values = [[v for c in g[k] for v in c.values()] for g in got]
        assert values[0] == pytest.approx(values[1], abs=2e-6)
        assert values[0] == pytest.approx(values[2], abs=2e-6)


def test_calibration_keeps_every_layer_when_the_full_model_scores_zero(trained, tok,
                                                                        monkeypatch):
    """Nothing to keep a fraction of: without the guard every exit passes and the most drastic
    thresholds win, printed as "-% kept"."""
    monkeypatch.setattr(ev, "each_sample",
                        lambda task, refs: lambda preds, start=0: [0.0] * len(preds))
    lines = []
    base = ExitConfig(dec_criterion="similarity")
    exits, _ = ev.calibrate(trained, ShapesDataset("val", "multi", image_size=32), tok, "cpu",
                            batch_size=8, n=8, base=base, log=lines.append)
    assert exits == {"caption": ExitConfig(1.0, 1.0, 1.0, "similarity"),
                     "ve": ExitConfig(1.0, 1.0, 1.0, "similarity")}
    assert len(lines) == 2 and all("the task was not learned" in line for line in lines)


# -- command line -------------------------------------------------------------------------------


def not_in_row(line, row):
    """The numbers printed in a table line that are no value of the row (percents are the row's
    fractions x 100), to the precision printed."""
    values = []

    def walk(v):
        if isinstance(v, dict):
            [walk(x) for x in v.values()]
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            values.extend([v, 100 * v])
    walk(row)
    cells = re.split(r"\s{2,}", line.strip())[2:]  # past the task and the configuration's name
    printed = re.findall(r"-?\d+(?:\.\d+)?", " ".join(cells))
    assert len(printed) >= 7, line  # the parse found the columns
    return [s for s in printed if not any(
        abs(v - float(s)) <= 0.5 * 10 ** -len(s.partition(".")[2]) + 1e-9 for v in values)]


def table(out, nth=0):
    """The data lines of the nth table printed in out (a header line starting with "task ")."""
    lines = out.splitlines()
    start = [i for i, line in enumerate(lines) if line.startswith("task ")][nth] + 2
    return list(itertools.takewhile(lambda line: line.startswith(("caption ", "ve ")),
                                    lines[start:]))


def test_command_line_end_to_end(ckpt, tmp_path, capsys):
    before = torch.load(ckpt, weights_only=True)
    argv = ["--ckpt", str(ckpt), "--calibrate", "--target", "0.9", "--sweep", "--grid", "2",
            "--n", "16", "--n-val", "16", "--n-b1", "1", "--repeats", "1", "--batch-size", "8",
            "--json", str(tmp_path / "r.json"), "--out", str(tmp_path / "figs"), "--threads", "1"]
    assert ev.main(argv) == 0
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "r.json").read_text())
    # The table: one line per row, every number in it also in the JSON row.
    lines = table(out)
    assert len(lines) == len(result["rows"]) == 15  # 7 caption rows, 8 VE
    for line, row in zip(lines, result["rows"], strict=True):
        assert line.split()[0] == row["task"] and row["name"] in line
        assert not_in_row(line, row) == []
    # The calibration is stored, and nothing else in the checkpoint changed.
    after = torch.load(ckpt, weights_only=True)
    assert after["exits"] == result["exits"] and set(after["exits"]) == {"caption", "ve"}
    for key in ("step", "train", "tokenizer", "optimizer", "config"):
        assert after[key] == before[key]
    assert all(torch.equal(after["model"][k], v) for k, v in before["model"].items())
    for task, ex in after["exits"].items():
        mue = next(r for r in result["rows"] if r["task"] == task and r["name"] == "MuE")
        assert mue["thresholds"] == ex
    # The sweep: its table's lines are JSON rows; the Pareto points are the undominated ones.
    for line in table(out, nth=1):
        assert any(not_in_row(line, r) == [] for r in result["sweep"]), line
    for task in ("caption", "ve"):
        pts = [(r["quality"], r["flop_reduction"], r["pareto"]) for r in result["sweep"]
               if r["task"] == task and r["thresholds"]]
        assert len(pts) == 2 ** 3 - 1  # every knob at 1 or at one quantile, not all at 1
        for q, f, pareto in pts:
            assert pareto == (not any(oq >= q and of >= f and (oq, of) != (q, f)
                                      for oq, of, _ in pts))
    # The figures exist and are real images.
    assert sorted(Path(p).name for p in result["figures"]) == [
        "exits.png", "profiles.png", "sweep.png", "words.png"]
    for p in result["figures"]:
        with Image.open(p) as im:
            assert im.format == "PNG" and im.width > 600 and im.height > 250
    # A second run picks the stored thresholds up by default.
    assert ev.main(["--ckpt", str(ckpt), "--n", "8", "--no-timing", "--no-figures",
                    "--json", str(tmp_path / "r2.json")]) == 0
    assert "from checkpoint (calibrated)" in capsys.readouterr().out
    rows2 = json.loads((tmp_path / "r2.json").read_text())["rows"]
    assert [r["thresholds"] for r in rows2 if r["name"] == "MuE"] == [
        after["exits"][t] for t in ("caption", "ve")]


def test_sweep_uses_the_decoder_flags_logs_progress_and_draws_beside_the_checkpoint(
        ckpt, tmp_path, capsys):
    run2 = tmp_path / "run2"
    run2.mkdir()
    ckpt.rename(run2 / "ckpt.pt")
    assert ev.main(["--ckpt", str(run2 / "ckpt.pt"), "--sweep", "--grid", "2", "--n", "8",
                    "--batch-size", "8", "--no-timing", "--criterion", "similarity", "--schedule",
                    "decay", "--beta", "0.9", "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "r.json").read_text())
    asked = {"dec_criterion": "similarity", "dec_schedule": "decay", "dec_beta": 0.9}
    for r in result["sweep"] + result["rows"]:
        assert r["thresholds"] is None or asked.items() <= r["thresholds"].items(), r
    for task in ("caption", "ve"):
        n = sum(r["task"] == task for r in result["sweep"])
        assert f"sweep {task} | {n} configurations x 4 samples (similarity, decay)" in out
        assert f"sweep {task} | {n}/{n} |" in out and out.count(f"sweep {task} | ") >= 5
    assert sorted(p.name for p in run2.iterdir()) == [
        "ckpt.pt", "exits.png", "profiles.png", "sweep.png", "words.png"]
    assert result["figures"][0] == str(run2 / "profiles.png")


def test_each_checkpoint_and_task_says_where_its_thresholds_come_from(ckpt, tmp_path, capsys):
    """A checkpoint calibrated for VE only, and an uncalibrated ablation beside it: the paper's
    thresholds stand in where nothing was calibrated, never the main checkpoint's."""
    state = torch.load(ckpt, weights_only=True)
    ve = ExitConfig(0.5, 0.6, 0.4)
    torch.save({**state, "exits": {"ve": asdict(ve)}}, ckpt)
    torch.save(state, tmp_path / "other.pt")
    assert ev.main(["--ckpt", str(ckpt), "--ablation", str(tmp_path / "other.pt"), "--n", "8",
                    "--no-timing", "--no-figures", "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    paper = {t: ev._thr(asdict(e)) for t, e in ev.PAPER_EXITS.items()}
    assert (f"thresholds of {ckpt}: caption {paper['caption']} from the paper's scripts "
            f"(uncalibrated), ve 0.5/0.6/0.4 from checkpoint (calibrated)\n") in out
    assert (f"thresholds of {tmp_path / 'other.pt'}: caption {paper['caption']} from the "
            f"paper's scripts (uncalibrated), ve {paper['ve']} from the paper's scripts "
            f"(uncalibrated)\n") in out
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["thresholds_from"][str(tmp_path / "other.pt")] == dict.fromkeys(
        ("caption", "ve"), "the paper's scripts (uncalibrated)")
    mue = {(r["task"], r["name"]): r["thresholds"] for r in result["rows"]}
    assert mue[("ve", "MuE")] == asdict(ve)
    for task in ("caption", "ve"):
        assert mue[(task, "other.pt: MuE")] == asdict(ev.PAPER_EXITS[task])


def test_thresholds_say_when_they_come_from_the_flags_or_miss_the_flags_signal(ckpt, capsys):
    state = torch.load(ckpt, weights_only=True)
    saved = {"caption": asdict(ExitConfig(0.5, 0.6, 0.4, "similarity")),
             "ve": asdict(ExitConfig(0.5, 0.6, 0.4))}
    torch.save({**state, "exits": saved}, ckpt)
    quick = ["--ckpt", str(ckpt), "--n", "4", "--no-timing", "--no-figures"]
    assert ev.main(quick + ["--img", "0.99", "--txt", "0.9", "--dec", "0.8"]) == 0
    assert ("caption 0.99/0.9/0.8 from the flags, ve 0.99/0.9/0.8 from the flags"
            in capsys.readouterr().out)
    assert ev.main(quick + ["--dec", "0.3"]) == 0
    assert "caption 0.5/0.6/0.3 from checkpoint (calibrated); dec_threshold from flags" in \
        capsys.readouterr().out
    # a cosine threshold of -0.5 on the checkpoint that was calibrated with the cosine
    assert ev.main(quick + ["--dec", "-0.5", "--json", str(ckpt.parent / "r.json")]) == 1
    assert "dec_threshold must be a number in [0.0, 1.0]" in capsys.readouterr().err  # VE's
    torch.save({**state, "exits": {"caption": saved["caption"]}}, ckpt)
    assert ev.main(quick + ["--dec", "-0.5", "--criterion", "similarity"]) == 0
    out = capsys.readouterr().out
    assert "caption 0.5/0.6/-0.5 from checkpoint (calibrated); dec_threshold from flags" in out
    # thresholds calibrated for one signal are never used with another
    assert ev.main(quick + ["--criterion", "confidence"]) == 0
    assert (f"caption {ev._thr(asdict(ev.PAPER_EXITS['caption']))} from the paper's scripts "
            f"(uncalibrated), since the checkpoint's were calibrated for dec_criterion "
            f"similarity (--calibrate calibrates the flags' signals)") in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--json", "{tmp}"], "--json {tmp} is a folder, not a file"),
    (["--out", "{tmp}/file.txt"], "--out {tmp}/file.txt is a file, not a folder"),
    (["--out", "{tmp}/file.txt", "--calibrate"], "--out {tmp}/file.txt is a file"),
    (["--json", "{tmp}/file.txt/r.json"], "cannot be written: {tmp}/file.txt is not a folder"),
])
def test_a_bad_output_path_is_refused_before_any_work(ckpt, tmp_path, args, message, capsys,
                                                      monkeypatch):
    (tmp_path / "file.txt").write_text("mine")
    before = {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    monkeypatch.setattr(ev, "load_checkpoint", lambda *a: pytest.fail("read the checkpoint"))
    args = [a.format(tmp=tmp_path) for a in args]
    assert ev.main(["--ckpt", str(ckpt), *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("eval.py: error: ") and err.count("\n") == 1
    assert message.format(tmp=tmp_path) in err
    assert {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def test_shapes_flag_draws_the_test_scenes_otherwise_and_calibration_keeps_the_world(trained):
    args = ev.parser().parse_args(["--ckpt", "x.pt", "--shapes", "p_box=0", "--n", "40",
                                   "--n-val", "40"])
    val, test = ev.datasets(args, {"task": "caption", "shapes": "max_objects=2"}, trained.cfg)
    for ds, boxes in ((val, True), (test, False)):
        scenes = [ds.scene(i) for i in range(40)]
        assert all(len(s.objects) + (s.box is not None) <= 2 for s in scenes)
        assert any(s.box for s in scenes) == boxes


def test_a_checkpoint_calibrated_with_a_plugins_signal_asks_for_the_plugin(ckpt, monkeypatch,
                                                                           capsys):
    state = torch.load(ckpt, weights_only=True)
    entropy = asdict(ExitConfig(0.9, 0.9, 0.5, "entropy"))
    torch.save({**state, "exits": {"ve": entropy}, "plugins": [str(WORKED_EXAMPLE)]}, ckpt)
    monkeypatch.delitem(mue.DEC_SIGNALS, "entropy")  # as in a process that did not load it
    quick = ["--ckpt", str(ckpt), "--n", "4", "--no-timing", "--no-figures"]
    assert ev.main(quick) == 1
    assert capsys.readouterr().err == (
        f"eval.py: error: {ckpt} was calibrated with dec_criterion entropy: pass --plugin FILE "
        f"that registers it in mue.DEC_SIGNALS (it was made with --plugin {WORKED_EXAMPLE})\n")
    assert ev.main(quick + ["--criterion", "nonsense"]) == 1
    assert "dec_criterion must be one of ('confidence', 'similarity'" in capsys.readouterr().err
    monkeypatch.setattr(mue, "PLUGINS", {})  # so that --plugin runs the file again here
    assert ev.main(quick + ["--plugin", str(WORKED_EXAMPLE)]) == 0
    assert "ve 0.9/0.9/0.5 from checkpoint (calibrated)" in capsys.readouterr().out


def test_spread_puts_the_headlines_of_several_runs_side_by_side(tmp_path, capsys):
    for seed, (kept, b1) in enumerate([(0.99, 1.5), (1.0, None), (0.995, 2.0)]):
        rows = [{"task": "ve", "name": "full", "quality": 90.0 + seed},
                {"task": "ve", "name": "MuE", "quality": 89.0, "retention": kept,
                 "layer_reduction": 0.5 * seed, "flop_reduction": 0.4, "dec_layers": 1.5,
                 "speedup_b1": b1, "speedup_b32": None}]
        (tmp_path / f"seed{seed}").mkdir()
        (tmp_path / f"seed{seed}" / "report.json").write_text(json.dumps({"rows": rows}))
    assert ev.main(["--spread", *sorted(map(str, tmp_path.glob("seed*/report.json")))]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[2:] == ["seed0", "seed1", "seed2", "range"]
    assert lines[1].split()[-3:] == ["90.00", "-", "92.00"] and "MuE kept %" in lines[2]
    assert lines[2].endswith("99.00 - 100.00") and lines[6].endswith("1.50 - 2.00")
    assert lines[3].split()[-6:] == ["0.00", "50.00", "100.00", "0.00", "-", "100.00"]  # no exit
    assert lines[7].endswith("nan  -")  # untimed everywhere
    assert ev.main(["--spread", str(tmp_path / "missing.json")]) == 1
    assert "eval.py: error: --spread:" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # neither --ckpt nor --spread
        ev.main([])


def test_counts_below_one_are_usage_errors(capsys):
    for flag in ("--n", "--n-val", "--batch-size", "--n-b1", "--repeats", "--threads", "--sweep-n"):
        with pytest.raises(SystemExit) as e:
            ev.main(["--ckpt", "x.pt", flag, "0"])
        assert e.value.code == 2 and f"{flag}: must be at least 1" in capsys.readouterr().err
    assert ev.main(["--ckpt", "x.pt", "--grid", "1"]) == 1
    assert "need --grid >= 2" in capsys.readouterr().err
    for delta in ("0", "1", "-0.1"):
        assert ev.main(["--ckpt", "x.pt", "--delta", delta]) == 1
        assert f"--delta must be in (0, 1), got {float(delta)}" in capsys.readouterr().err


def test_device_cuda_without_a_gpu_is_one_line(ckpt, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ev.main(["--ckpt", str(ckpt), "--device", "cuda"]) == 1
    assert capsys.readouterr().err == "eval.py: error: --device cuda but no CUDA GPU is available\n"


@pytest.mark.parametrize("args, message", [
    (["--img", "1.5"], "img_threshold"),
    (["--txt", "-1.01"], "txt_threshold"),
    (["--dec", "1.2"], "dec_threshold"),
    (["--dec", "-0.1"], "dec_threshold"),  # a confidence is in [0, 1]
    (["--criterion", "similarity", "--dec", "-1.5"], "dec_threshold"),
    (["--target", "0"], "target"),
])
def test_bad_thresholds_are_refused(ckpt, args, message, capsys):
    assert ev.main(["--ckpt", str(ckpt), *args]) == 1
    err = capsys.readouterr().err
    assert "error" in err and message in err


def test_bad_checkpoints_are_refused(ckpt, trained, tmp_path, capsys):
    assert ev.main(["--ckpt", str(tmp_path / "missing.pt")]) == 1
    assert "does not exist" in capsys.readouterr().err
    state = torch.load(ckpt, weights_only=True)
    state["config"]["d_model"] = 64  # weights of a 32-wide model under a 64-wide config
    torch.save(state, tmp_path / "other.pt")
    assert ev.main(["--ckpt", str(tmp_path / "other.pt")]) == 1
    assert "does not match its config" in capsys.readouterr().err
    bigger = MuE(MuEConfig(**{**asdict(trained.cfg), "image_size": 64}))
    save_checkpoint(tmp_path / "big.pt", bigger, tokenizer=state["tokenizer"])
    assert ev.main(["--ckpt", str(ckpt), "--ablation", str(tmp_path / "big.pt")]) == 1
    assert "image size" in capsys.readouterr().err
    assert ev.main(["--ckpt", str(tmp_path)]) == 1  # a folder: which file was meant
    assert f"did you mean {tmp_path / 'ckpt.pt'}?" in capsys.readouterr().err
    (tmp_path / "report.json").write_text('{"rows": []}')
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    for name in ("report.json", "junk.pt"):  # one line of ours, not torch's plea to file an issue
        proc = subprocess.run([sys.executable, "eval.py", "--ckpt", str(tmp_path / name)],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
        assert proc.stderr.startswith("eval.py: error: ") and "file an issue" not in proc.stderr
        assert "is not a checkpoint written by train.py" in proc.stderr
