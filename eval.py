"""What MuE's exits save, measured three ways side by side, and the figures to see it.

The paper reports one efficiency number, the "expected time reduction" 1 - (layers used) /
(layers in the model) (Sec. 4, Tables 1-3). This file reports it beside a FLOP-weighted reduction
(the ResNet stem runs in full whatever exits, image tokens outnumber text tokens, a decoder layer
runs once per generated word) and the wall-clock speedup measured against the full model, with
the ratio measured / FLOP-predicted, so that a saving which never becomes time shows.

    python eval.py --ckpt out/ckpt.pt                             # full vs MuE vs baselines, test
    python eval.py --ckpt out/ckpt.pt --calibrate --target 0.99   # thresholds from val, stored
    python eval.py --ckpt out/ckpt.pt --sweep                     # threshold grid, trade-off PNG
    python eval.py --ckpt out/ckpt.pt --ablation out/joint.pt --ablation out/last.pt
    python eval.py --ckpt out/ckpt.pt --plugin tests/exercises/entropy_exit.py --criterion entropy

Writes under --out (default: the checkpoint's folder) profiles.png (the paper's Fig. 3),
exits.png (where each modality and word exited), words.png (captions word by layer) and, with
--sweep, sweep.png; --json PATH gets every number of the tables.
"""

import argparse
import collections
import itertools
import json
import math
import os
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial

import numpy as np
import torch
import torch.nn as nn
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.cider.cider_scorer import precook

from data import BadImage, Tokenizer, clean, collate, load_split, positive, unknown_words
from mue import (DEC_SCHEDULES, DEC_SIGNALS, ENC_SIGNALS, PLUGINS, ExitConfig, atomic_write,
                 load_checkpoint, load_plugin, made_with, save_checkpoint)

# Thresholds (image / text / decoder) of the authors' scripts, used when a checkpoint carries no
# calibrated ones: a starting point for a model trained from scratch, not an answer.
PAPER_EXITS = {"ve": ExitConfig(0.7, 0.99, 0.7), "caption": ExitConfig(0.99, 0.7, 0.9)}
KNOB_FIELDS = {"img": "img_threshold", "txt": "txt_threshold", "dec": "dec_threshold"}

# -- Quality: VE accuracy, caption BLEU-4 and CIDEr-D (pycocoevalcap's scorers, as everyone
# reports; outputs and references are cleaned alike, since the toolkit's tokenizer needs Java).


def caption_scores(preds: list[str], refs: list[list[str]]) -> tuple:
    """Corpus BLEU-4 and CIDEr-D, raw (BLEU in [0, 1], CIDEr-D up to 10). CIDEr-D takes its idf
    from the references of the scored set, so it compares configurations on the same samples
    only, as this file does."""
    gts = {i: [clean(r) for r in rs] for i, rs in enumerate(refs)}
    res = {i: [clean(p)] for i, p in enumerate(preds)}
    return (float(Bleu(4).compute_score(gts, res, verbose=0)[0][3]),
            float(Cider().compute_score(gts, res)[0]))


class CiderD:
    """Each sample's CIDEr-D against fixed references, bit for bit pycocoevalcap's (tested).
    Calibration scores dozens of configurations on the same samples, and pycocoevalcap redoes
    the references' side (their n-grams, idf and tf-idf vectors) at every call, most of its time
    (docs/results.md, "Calibration"): here it is done once. A sample's score needs only its own
    prediction, so any run of samples can be scored alone, their idf still that of all refs."""

    def __init__(self, refs: list[list[str]], n=4, sigma=6.0):
        self.n, self.sigma = n, sigma  # n-gram orders 1..n; the length penalty's width
        grams = [[precook(clean(r), n) for r in rs] for rs in refs]  # n-gram counts, orders 1..n
        df = collections.Counter(g for rs in grams for g in set().union(*rs))  # images per n-gram
        self.log_n = np.log(float(len(refs)))  # the idf of an n-gram no reference has
        self.idf = {g: self.log_n - np.log(max(1.0, d)) for g, d in df.items()}
        self.refs = [[self.vector(c) for c in rs] for rs in grams]

    def vector(self, counts):  # -> per order: tf-idf {n-gram: weight}, its norm; the length
        vec, norm = [{} for _ in range(self.n)], [0.0] * self.n
        for g, tf in counts.items():
            vec[len(g) - 1][g] = v = float(tf) * self.idf.get(g, self.log_n)
            norm[len(g) - 1] += v ** 2  # ** as pycocoevalcap: v * v can differ in the last bit
        # the length is the number of bigrams, as pycocoevalcap counts it (words - 1 if any)
        return vec, [math.sqrt(x) for x in norm], sum(tf for g, tf in counts.items() if len(g) == 2)

    def __call__(self, preds: list[str], start=0) -> list[float]:
        """-> the CIDEr-D of samples start, start + 1, ... that predicted preds: per n-gram
        order, the cosine of the prediction's clipped tf-idf vector with each reference's, times
        a Gaussian penalty on their length difference; averaged over orders and references,
        times 10."""
        out = []
        for p, refs in zip(preds, self.refs[start:start + len(preds)], strict=True):
            vec, norm, length = self.vector(precook(clean(p), self.n))
            score = [0.0] * self.n
            for r_vec, r_norm, r_length in refs:
                penalty = math.e ** (-(float(length - r_length) ** 2) / (2 * self.sigma ** 2))
                for n in range(self.n):
                    dot = 0.0
                    for g, v in vec[n].items():
                        r = r_vec[n].get(g, 0.0)
                        dot += min(v, r) * r  # clipped: repeating a word gains nothing
                    if norm[n] != 0 and r_norm[n] != 0:
                        dot /= norm[n] * r_norm[n]
                    score[n] += dot * penalty
            out.append(float(np.mean(score)) / len(refs) * 10.0)
        return out


def each_sample(task: str, refs: list[list[str]]):
    """-> a function (preds, start=0) -> each sample's quality in percent, preds being those of
    refs[start:start + len(preds)] (their mean over all of refs is `quality`'s): what
    calibration's bound is computed on."""
    if task == "ve":
        def accuracy(preds, start=0):  # the answer against refs[0]
            mine = refs[start:start + len(preds)]
            return [100.0 * (clean(p) == clean(r[0])) for p, r in zip(preds, mine, strict=True)]
        return accuracy
    if task == "caption":
        cider = CiderD(refs)
        return lambda preds, start=0: [100 * c for c in cider(preds, start)]
    raise ValueError(f"unknown task {task!r}: expected 'caption' or 've'")


def quality(task: str, preds: list[str], refs: list[list[str]]) -> dict:
    """In percent, as papers print them. "quality" is what retention is computed on: VE
    accuracy (the answer against refs[0]) or CIDEr-D."""
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions for {len(refs)} samples' references")
    if task == "caption":
        bleu, cider = caption_scores(preds, refs)
        return {"quality": 100 * cider, "cider": 100 * cider, "bleu4": 100 * bleu}
    acc = statistics.fmean(each_sample(task, refs)(preds))  # raises on an unknown task
    return {"quality": acc, "accuracy": acc}


# -- Cost of one sample, from its own exits: multiply-accumulates (MACs) of the matrix products
# (convolutions, linear layers, the two attention products). Norms, activations, softmax and the
# exit checks are O(tokens x width) and left out, as is customary; what they and Python cost
# shows in the measured / predicted ratio instead.


def stem_macs(model) -> int:
    """MACs of the ResNet stem on one image, counted by hooks on its convolutions."""
    total = 0

    def hook(conv, inputs, out):
        nonlocal total
        kh, kw = conv.kernel_size
        total += out.numel() * conv.in_channels // conv.groups * kh * kw

    convs = [m for m in model.stem.modules() if isinstance(m, nn.Conv2d)]
    handles = [c.register_forward_hook(hook) for c in convs]
    was_training, S = model.stem.training, model.cfg.image_size
    model.stem.eval()  # a forward in training mode would move the batch-norm statistics
    try:
        with torch.no_grad():
            model.stem(torch.zeros(1, 3, S, S, device=model.tok_emb.weight.device))
    finally:
        model.stem.train(was_training)
        for h in handles:
            h.remove()
    return total


def sample_macs(model, ex, stem: int, n_txt: int, img_l: int, txt_l: int, dec: list[int],
                n_pre: int = 1) -> int:
    """MACs of one sample as `MuE.generate` runs it. n_txt: its real prompt tokens (padding is an
    artefact of batching, absent at batch size 1); img_l, txt_l: encoder layers run per modality;
    dec: decoder layers run for each generated token; n_pre: the decoder's prefix, bos included,
    which runs the layers of the first token."""
    cfg = model.cfg
    C, Ff, V = cfg.d_model, cfg.d_ff, cfg.vocab_size
    n_img, c_stem = model.grid ** 2, model.img_proj.in_features

    def enc_layer(n):  # q, k, v, out projections; QK^T and AV; the MLP
        return 4 * n * C * C + 2 * n * n * C + 2 * n * C * Ff

    macs = stem + n_img * c_stem * C  # the stem, then the patch projection
    if cfg.fusion == "decomposed":
        macs += img_l * enc_layer(n_img) + txt_l * enc_layer(n_txt)
    else:  # joint: one sequence, one depth
        macs += img_l * enc_layer(n_img + n_txt)
    M = n_img + n_txt  # memory the decoder cross-attends to
    macs += max(dec) * 2 * M * C * C  # cross-attention K/V of the memory, once per layer reached
    ex = ex or ExitConfig()
    heads_at_every_layer = DEC_SIGNALS[ex.dec_criterion].head and ex.dec_threshold < 1.0
    for s, k in enumerate(dec):  # step s read n tokens (the prefix at s = 0), ran layers 1..k
        n, keys = (n_pre, n_pre) if s == 0 else (1, n_pre + s)  # keys: positions attended to
        per_layer = (n * (4 * C * C + 2 * C * C + 2 * C * Ff)  # projections (self q, k, v, out;
                     + 2 * n * keys * C + 2 * n * M * C)  # cross q, out), MLP; QK^T and AV
        heads = max(1, k - ex.dec_min_layer + 1) if heads_at_every_layer else 1  # one token's:
        macs += k * per_layer + heads * C * V  # at each layer that may exit, and the last
        reached = max(dec[s + 1:], default=0)  # state propagation, on demand: K/V of the
        macs += max(0, reached - k) * n * 2 * C * C  # skipped layers a later token reads
    return macs


def layer_reduction(img_l, txt_l, dec: list[int], n_enc: int, n_dec: int) -> float:
    """The paper's expected time reduction for one sample: 1 - (mean of the image and text
    encoder depths + mean decoder layers per generated token) / (encoder + decoder depth)."""
    return 1 - ((img_l + txt_l) / 2 + sum(dec) / len(dec)) / (n_enc + n_dec)


# -- Running configurations: a configuration is (name, model, ExitConfig or None = every layer).


@dataclass
class TaskData:
    samples: list  # data.Sample, the first n of the split for this task
    batches: list  # data.Batch of up to batch_size, on the device
    max_new: int  # generation budget: captions the longest reference, eos and a margin; VE 1


@dataclass
class Run:
    """One configuration on one task's samples: per sample, in order, what it said and cost."""

    preds: list = field(default_factory=list)  # decoded texts
    tokens: list = field(default_factory=list)  # generated ids, one per entry of dec
    refs: list = field(default_factory=list)
    img: list = field(default_factory=list)  # encoder layers on the image tokens
    txt: list = field(default_factory=list)  # encoder layers on the text tokens
    dec: list = field(default_factory=list)  # decoder layers per generated token
    macs: list = field(default_factory=list)
    seconds: list = field(default_factory=list)  # per unit (batch or sample), median of repeats

    def add(self, model, ex, batch, g, tok, stem):
        n_txt = (batch.src != model.cfg.pad_id).sum(1).tolist()
        n_pre = (batch.prefix != model.cfg.pad_id).sum(1).tolist()
        img, txt, dec = g.img_layers.tolist(), g.txt_layers.tolist(), g.dec_layers.tolist()
        for b in range(len(n_txt)):
            d = [k for k in dec[b] if k > 0]  # 0 = after the sequence ended
            self.preds.append(tok.decode(g.tokens[b]))
            self.tokens.append(g.tokens[b, :len(d)].tolist())
            self.img.append(img[b])
            self.txt.append(txt[b])
            self.dec.append(d)
            self.macs.append(sample_macs(model, ex, stem, n_txt[b], img[b], txt[b], d, n_pre[b]))
        self.refs += batch.refs


def collated(samples, tok, cfg, batch_size, device) -> list:
    """The samples as data.Batch of up to batch_size, in order, on the device."""
    return [collate(samples[i:i + batch_size], tok, cfg.max_src_len, cfg.max_tgt_len,
                    truncate=True).to(device) for i in range(0, len(samples), batch_size)]


def prepare(dataset, tok, cfg, n, batch_size, device) -> dict[str, TaskData]:
    """The first n samples of `dataset` (all if n is None), grouped by task and collated once,
    reused by every configuration (reading images is not what we time). VE is decided in one
    decoder pass, as the authors evaluate it (eval_snli_ve in OFA's MuE branch scores the
    answers after the prompt; the eos after them is forced, so it decides nothing): one
    generated token, the answer, from the prefix's pass."""
    by_task = {}
    for i in range(len(dataset) if n is None else min(n, len(dataset))):
        s = dataset[i]
        by_task.setdefault(s.task, []).append(s)
    out = {}
    for task, samples in by_task.items():
        batches = collated(samples, tok, cfg, batch_size, device)
        longest = max(len(tok.encode(r)) for s in samples for r in s.refs)
        room = cfg.max_tgt_len - max(b.prefix.shape[1] for b in batches) + 1  # after the prefix
        out[task] = TaskData(samples, batches, 1 if task == "ve" else min(room, longest + 3))
    return out


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def run_configs(configs, units, tok, max_new, repeats=1, warmup=False) -> list[Run]:
    """Every configuration on every unit (a batch), `repeats` rounds. Within a round the order
    rotates from one unit and round to the next, so that drifts in the machine's load fall on all
    configurations alike. A unit's time is the median over rounds; the outputs are round 0's."""
    runs, stems = [Run() for _ in configs], [stem_macs(m) for _, m, _ in configs]
    times = [[[] for _ in units] for _ in configs]  # config -> unit -> seconds per round
    dev = units[0].images.device
    if warmup:  # first calls at a new shape allocate and pick kernels: not what we time
        for _, m, ex in configs:
            m.generate(units[0].images, units[0].src, max_new, ex, prefix=units[0].prefix)
    for r in range(repeats):
        for u, batch in enumerate(units):
            for c in [(r + u + k) % len(configs) for k in range(len(configs))]:
                _, m, ex = configs[c]
                sync(dev)
                t0 = time.perf_counter()
                g = m.generate(batch.images, batch.src, max_new, ex, prefix=batch.prefix)
                sync(dev)
                times[c][u].append(time.perf_counter() - t0)
                if r == 0:
                    runs[c].add(m, ex, batch, g, tok, stems[c])
    for run, ts in zip(runs, times, strict=True):
        run.seconds = [statistics.median(t) for t in ts]
    return runs


def summarize(name, task, run: Run, full: Run, q_full, depth, ex) -> dict:
    """A row: quality, retention against the full model, layers, the paper's layer-count
    reduction (averaged over samples) and the FLOP-weighted one (total MACs against the full
    model's on the same samples, each generating its own text)."""
    q = quality(task, run.preds, run.refs)
    macs, full_macs = sum(run.macs), sum(full.macs)
    return {"name": name, "task": task, **q,
            "retention": q["quality"] / q_full if q_full > 0 else None,
            "img_layers": statistics.fmean(run.img), "txt_layers": statistics.fmean(run.txt),
            "dec_layers": statistics.fmean(sum(d) / len(d) for d in run.dec),
            "layer_reduction": statistics.fmean(layer_reduction(i, t, d, *depth) for i, t, d
                                                in zip(run.img, run.txt, run.dec, strict=True)),
            "flop_reduction": 1 - macs / full_macs, "flop_speedup": full_macs / macs,
            "gmacs_per_sample": macs / len(run.macs) / 1e9,
            "thresholds": None if ex is None else asdict(ex), "samples": len(run.preds)}


# -- Calibration as risk control (Learn then Test: Angelopoulos et al. 2021; CALM, Schuster et
# al. 2022, Sec. 4). The promise: with probability at least 1 - delta over the draw of the
# validation samples, the chosen exits keep at least `target` of the full model's expected
# quality on new samples from the same distribution (independent units: samples that share an
# image count as one). The val samples are split: a fifth, the tuning units, orders the
# candidates into a path from safe to daring; the rest tests them along that path in turn
# (fixed-sequence testing), each test at its path's share of delta. Each test asks the promise
# itself, gains counted against losses (`p_value`). Two paths: the paper's exit rule, and one
# where no token leaves the decoder before layer `dec_min_layer` (beyond the paper: a step that
# lets tokens leave at layer 1 can fail and end the first path early; docs/results.md,
# "The default run"). A false pass in either happens with chance at most the sum of their shares,
# delta (a union bound), so every configuration that passed keeps the promise: the one that
# saves most FLOPs is chosen. Candidate thresholds are quantiles of the model's own exit signals
# on the tuning samples (MuE.profile): a fixed grid would mostly land where nothing, or
# everything, exits. Why these levels: docs/results.md, "Calibration".
LEVELS = (0.95, 0.85, 0.7, 0.5, 0.3, 0.2, 0.1, 0.03, 0.01)
QUALITY_MAX = {"ve": 100.0, "caption": 1000.0}  # a sample's best score: accuracy, CIDEr-D x 100
TUNING = 0.2  # the share of the validation samples that orders the candidates
SECOND = 0.2  # the second path's share of delta


def check_calibration(target, delta, dec_min_layer=1):
    if not 0 < target <= 1:
        raise ValueError(f"--target must be in (0, 1], got {target}")
    if not 0 < delta < 1:
        raise ValueError(f"--delta must be in (0, 1), got {delta}")
    if type(dec_min_layer) is not int or dec_min_layer < 1:
        raise ValueError(f"--dec-min-layer must be an integer >= 1, got {dec_min_layer!r}")


def p_value(z: list[float], delta: float, n: int | None = None) -> float:
    """A p-value for "E[z] >= 0" from i.i.d. z in [-1, 1], by testing by betting (Waudby-Smith
    and Ramdas 2024, their predictable plug-in bet). A gambler starts with wealth 1 and bets
    against the hypothesis on each z in turn: wealth *= 1 - lam z, lam in [0, 0.75] chosen from
    the z before it. Where the hypothesis holds, the wealth is a nonnegative supermartingale, so
    it ever reaches 1/p with chance at most p (Ville's inequality): 1 / the largest wealth is a
    p-value. The bets grow as z varies less, so gains and losses that nearly cancel can still be
    certified, which a bound for the worst variance cannot do. delta: the level the bets aim at;
    n: the units the test will see, len(z) unless z is the first of them (the bets depend on n,
    and the bound holds at any time: once p <= delta on a prefix, it is on the whole)."""
    n, wealth, best, mean, ss, k = n or len(z), 1.0, 1.0, 0.0, 1.0, 1  # a prior: 0, variance 1
    for x in z:
        lam = min(0.75, math.sqrt(2 * math.log(1 / delta) * k / (n * ss)))  # ss / k: variance
        wealth *= 1 - lam * x
        best = max(best, wealth)
        k += 1
        mean += (x - mean) / k
        ss += (x - mean) ** 2
    return min(1.0, 1 / best)


def knobs(model, td: TaskData, base: ExitConfig, levels, dec_min_layer=1) -> dict[str, list]:
    """Per knob, candidate ExitConfig fields, most conservative first: quantiles of every tuning
    sample's signals (whatever the batch size) at the positions that can exit: the encoder's
    layers but the last, the decoder's at the positions generate decides (VE: the answer alone)
    from layer dec_min_layer on. base gives the signals (its thresholds, hence its own
    dec_min_layer, play no part: a base that never exits has dec_min_layer 1).
    Decomposed: img, txt and dec apart; joint fusion exits only when both modalities agree, so
    img and txt move together as one knob."""
    L_enc, L_dec = model.cfg.n_enc_layers, model.cfg.n_dec_layers
    sig = {"img": [], "txt": [], "dec": []}
    for batch in td.batches:
        p = model.profile(batch.images, batch.src, batch.tgt_in, base.enc_criterion)
        decided = batch.tgt_mask & (batch.tgt_mask.cumsum(1) <= td.max_new)  # (B, T)
        sig["img"].append(p["img"][:, :L_enc - 1].flatten())
        sig["txt"].append(p["txt"][:, :L_enc - 1].flatten())
        sig["dec"].append(p[f"dec_{base.dec_criterion}"][:, :, dec_min_layer - 1:L_dec - 1]
                          [decided])
    cands = {}
    for name, vals in sig.items():
        v = torch.cat(vals).float().cpu()
        low = (DEC_SIGNALS[base.dec_criterion] if name == "dec" else
               ENC_SIGNALS[base.enc_criterion]).low
        cands[name] = [] if v.numel() == 0 else [
            min(max(round(torch.quantile(v, lv).item(), 6), low), 0.999999) for lv in levels]
    if model.cfg.fusion == "joint":
        out = {"enc": [{"img_threshold": a, "txt_threshold": b}
                       for a, b in zip(cands["img"], cands["txt"], strict=True)]}
    else:
        out = {k: [{KNOB_FIELDS[k]: v} for v in cands[k]] for k in ("img", "txt")}
    out["dec"] = [{"dec_threshold": v} for v in cands["dec"]]
    return {k: [c for i, c in enumerate(v) if c not in v[:i]] for k, v in out.items() if v}


def calibrate(model, val_set, tok, device, target=0.99, delta=0.05, batch_size=512, n=None,
              base=None, log=print, dec_min_layer=2) -> tuple[dict, dict]:
    """Per task in the first n samples of val_set, the thresholds with the largest saving that
    keep `target` of the full model's quality, as promised above. base carries the signals and
    the schedule; its thresholds are ignored. dec_min_layer: the second path's (1: one path, the
    paper's rule alone). batch_size changes only the time (larger: fewer decoding steps in
    Python; why 512: docs/results.md, "Calibration"). -> (task -> ExitConfig, task -> a record)."""
    check_calibration(target, delta, dec_min_layer)
    paths = ((1, 1 - SECOND), (dec_min_layer, SECOND)) if dec_min_layer > 1 else ((1, 1.0),)
    found = {}
    for task, td in prepare(val_set, tok, model.cfg, n, batch_size, device).items():
        units = grouped(td.samples)
        if len(units) < 2:
            raise ValueError(f"calibrating {task} needs validation samples of at least two "
                             f"images, got {len(td.samples)} of one (--n-val)")
        k = next(i for i in range(1, len(units) + 1)  # at least one unit on each side
                 if i == len(units) - 1 or sum(map(len, units[:i])) >= TUNING * len(td.samples))
        parts = [sorted(i for u in us for i in u) for us in (units[:k], units[k:])]
        tune, test = (TaskData([td.samples[i] for i in part], collated(
            [td.samples[i] for i in part], tok, model.cfg, batch_size, device), td.max_new)
            for part in parts)
        found[task] = calibrate_task(model, task, tune, test, tok, target, delta,
                                     base or ExitConfig(), log, paths)
    return {t: ex for t, (ex, _) in found.items()}, {t: rec for t, (_, rec) in found.items()}


def calibrate_task(model, task, tune: TaskData, test: TaskData, tok, target, delta, base, log,
                   paths=((1, 1.0),)):
    """Each path (dec_min_layer, share of delta) on the tuning samples, then fixed-sequence testing
    on the rest (see above). -> (ExitConfig, a record of what was done)."""
    t0, q_max = time.perf_counter(), QUALITY_MAX[task]
    never, tuned, tested = {f: 1.0 for f in KNOB_FIELDS.values()}, {}, {}
    units = grouped(test.samples)

    def config(fields_):  # equal configurations are equal ExitConfigs, whichever path made them
        return replace(base, **{**never, **fields_})

    score_tune = each_sample(task, [s.refs for s in tune.samples])
    score_test = each_sample(task, [s.refs for s in test.samples])

    def run(fields_):  # on the tuning samples -> (per-sample quality, total MACs)
        ex = config(fields_) if fields_ else None
        if ex not in tuned:  # the paths share the configurations they both reach
            r = run_configs([("", model, ex)], tune.batches, tok, tune.max_new)[0]
            tuned[ex] = score_tune(r.preds), sum(r.macs)
        return tuned[ex]

    r = run_configs([("", model, None)], test.batches, tok, test.max_new)[0]  # the full model
    q_test, m_test = score_test(r.preds), r.macs
    full = [statistics.fmean(q_test[i] for i in u) / q_max for u in units]  # per unit, in [0, 1]
    full_mean = statistics.fmean(q_test)

    def scored(q, a):  # -> p at level a, given q: the quality of the first len(q) samples
        ready = itertools.takewhile(lambda u: u[-1] < len(q), units)  # the first units, whole
        # the promise E[exits] >= target E[full] is E[z] <= 0: reject E[z] >= 0 to pass
        z = [target * f - statistics.fmean(q[i] for i in u) / q_max
             for f, u in zip(full, ready, strict=False)]
        return p_value(z, a, len(units))

    def test_run(ex, a):  # -> (p, quality and MACs per sample run)
        # a batch at a time until p <= a: the bound holds at any time, so it decides as it would
        # on every sample
        i, q, macs = tested.get(ex, (0, [], []))
        p = scored(q, a) if q else 1.0
        while p > a and i < len(test.batches):
            r = run_configs([("", model, ex)], test.batches[i:i + 1], tok, test.max_new)[0]
            i, q, macs = i + 1, q + score_test(r.preds, len(q)), macs + r.macs
            p = scored(q, a)
        tested[ex] = (i, q, macs)
        return p, q, macs

    q_tune, m_tune = run({})
    record = {"procedure": "Learn then Test, fixed-sequence along each path ordered on tuning "
              "samples, a union bound over the paths; p-values by betting", "delta": delta,
              "target": target, "units": len(units),
              "samples": {"tuning": len(tune.samples), "testing": len(test.samples)}}
    if statistics.fmean(q_tune + q_test) <= 0:  # nothing to keep a share of
        log(f"calibrate {task} | warning: the full model scores 0 on "
            f"{len(tune.samples) + len(test.samples)} val samples: the task was not learned, so "
            f"nothing can be calibrated; every layer runs")
        return replace(base, **never), {**record, "tried": 0, "paths": []}
    chosen, saving, record["paths"] = {}, 0.0, []
    for m, share in paths:
        a = share * delta
        path = [{**f, "dec_min_layer": m} for f in walk(
            knobs(model, tune, base, LEVELS, m),
            lambda f, m=m: run({**f, "dec_min_layer": m}), q_tune, m_tune)]
        passed, stop = 0, None
        for fields_ in path:  # fixed-sequence testing: stop at the first configuration that fails
            p, q, macs = test_run(ex := config(fields_), a)
            if p > a:  # what ended the path, for a reader of the run
                stop = {"thresholds": asdict(ex), "p": p, "quality": statistics.fmean(q)}
                break
            passed += 1
            if (now := 1 - sum(macs) / sum(m_test[:len(macs)])) > saving:  # where it ran
                chosen, saving = fields_, now
        log(f"calibrate {task} | path {len(record['paths']) + 1}, decoder exits from layer {m}"
            f"{' (beyond the paper)' if m > 1 else ''}: "
            f"{len(path)} configurations ordered on {len(tune.samples)} tuning samples, "
            f"{passed} passed in turn on {len(test.samples)} testing samples ({len(units)} "
            f"units) at delta {a:g}")
        if stop:
            log(f"calibrate {task} | path {len(record['paths']) + 1} stopped at configuration "
                f"{passed + 1}, {_thr(stop['thresholds'])}: {stop['quality']:.1f} on the testing "
                f"samples against the full model's {full_mean:.1f}, p {stop['p']:.3f} > "
                f"{a:g}, so none after it is tested")
        record["paths"].append({"dec_min_layer": m, "delta": a, "length": len(path),
                                "tested": passed + (stop is not None), "passed": passed,
                                "stopped_at": stop})
    ex, ran = config(chosen), sum(len(q) for _, q, _ in tested.values())
    log(f"calibrate {task} | full {full_mean:.1f} | chosen {_thr(asdict(ex))} "
        f"({-100 * saving:+.1f}% FLOPs): keeps at least {100 * target:g}% "
        f"with probability {1 - delta:g}, on {len(tune.samples) + len(test.samples)} val "
        f"samples | {len(tuned) - 1} tuning runs, {ran} testing samples run | "
        f"{time.perf_counter() - t0:.1f} s")
    return ex, {**record, "tried": len(tuned) - 1, "testing_samples_run": ran}


def walk(cands: dict[str, list[dict]], trial, q_full, m_full) -> list[dict]:
    """The path, from the tuning samples: each knob's candidates tried alone, then one knob
    one candidate further at a time, the step that loses least quality there (then saves most
    FLOPs), to every knob's last candidate; testing stops at the first failure anyway. A step
    saving under a point of the FLOPs more than the last one kept is passed over, to test
    fewer. -> the joint configurations along it, safest first."""
    full = statistics.fmean(q_full)
    alone = {}  # knob -> [(quality lost, FLOPs saved)] of its candidates, each alone
    for k, cs in cands.items():
        alone[k] = [(full - statistics.fmean(q), m_full - macs) for q, macs in map(trial, cs)]

    def step(k, i):  # knob k's step to its candidate i: (quality lost, -FLOPs saved, k)
        before = alone[k][i - 1] if i else (0.0, 0.0)
        return alone[k][i][0] - before[0], before[1] - alone[k][i][1], k

    pick, path, saved = {}, [], 0.0  # pick: knob -> its candidate on the path
    while steps := [step(k, pick.get(k, -1) + 1) for k in cands
                    if pick.get(k, -1) + 1 < len(cands[k])]:
        k = min(steps)[2]
        pick[k] = pick.get(k, -1) + 1
        if (now := sum(alone[j][i][1] for j, i in pick.items())) >= saved + 0.01 * m_full:
            saved = now
            path.append({f: v for j, i in pick.items() for f, v in cands[j][i].items()})
    return path


# -- The comparison: every configuration on the same test samples, timed against the full model.


def shallow_models(model):
    """Static shallow models, every k + k from L - 1 down to 1 (the paper's OFA-Tiny-style
    baseline: the first k layers of each stack)."""
    L_enc, L_dec = model.cfg.n_enc_layers, model.cfg.n_dec_layers
    fractions = [k / max(L_enc, L_dec) for k in range(1, max(L_enc, L_dec))]
    ks = sorted({(max(1, round(f * L_enc)), max(1, round(f * L_dec))) for f in fractions},
                reverse=True)
    return [(f"static {e}+{d}", model.truncated(e, d).eval()) for e, d in ks
            if (e, d) != (L_enc, L_dec)]


def grouped(samples, what="images") -> list[list[int]]:
    """The samples' indices grouped by equal input, in order of first appearance: the same pixels
    (what="images"; SNLI-VE's lines come several to an image) or the same prompt ("texts")."""
    groups = {}
    for i, s in enumerate(samples):
        key = s.image.numpy().tobytes() if what == "images" else (s.src, s.prefix)
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def shuffled(samples, what: str) -> list | None:
    """The samples, each with another's image (what="images") or prompt and decoder prefix
    ("texts"), the references kept: a permutation in which no sample gets an input equal to its
    own. Equal inputs are put side by side, and each sample takes the input m places on, m the
    largest group. None when one input is shared by more than half the samples."""
    groups = grouped(samples, what)
    order, m = [i for g in groups for i in g], max(map(len, groups))
    if 2 * m > len(samples):
        return None
    moved = ("image",) if what == "images" else ("src", "prefix")
    donor = {i: order[(k + m) % len(order)] for k, i in enumerate(order)}
    return [replace(s, **{f: getattr(samples[donor[i]], f) for f in moved})
            for i, s in enumerate(samples)]


def compare(model, test_set, tok, device, exits: dict, batch_size=32, timing=True, n=None,
            n_b1=16, repeats=3, ablations=(), log=print) -> list[dict]:
    """Rows, one per configuration x task: the full model, MuE with `exits` (task -> ExitConfig;
    a task without one gets PAPER_EXITS), its decoder-only and encoder-only halves, every static
    k + k, and for each ablation (label, model, exits) its full model and its MuE (with the
    ablation's own exits, else PAPER_EXITS: never the main model's). Then, untimed, the full
    model on mismatched pairs ("full, shuffled images", and for VE "full, shuffled texts"): how
    much each task needs each input. Quality and the reductions use all n samples. With timing,
    each configuration is timed against the full model, interleaved (run_configs), on the first
    4 batches of batch_size and the first n_b1 samples one by one (after a warm-up), each unit
    the median of `repeats`: speedup_* = the full model's time / this one's, pred_* the
    FLOP-predicted speedup on the same samples, ratio_* = measured / predicted."""
    cfg = model.cfg
    depth = (cfg.n_enc_layers, cfg.n_dec_layers)
    data = prepare(test_set, tok, cfg, n, batch_size, device)
    shallows = shallow_models(model)
    rows = []
    for task, td in data.items():
        t0 = time.perf_counter()
        ex = exits.get(task) or PAPER_EXITS[task]
        configs = [("full", model, None), ("MuE", model, ex),
                   ("MuE decoder exits only", model, replace(ex, img_threshold=1.0,
                                                             txt_threshold=1.0)),
                   ("MuE encoder exits only", model, replace(ex, dec_threshold=1.0)),
                   *[(name, m, None) for name, m in shallows]]
        ref = [0] * len(configs)  # each configuration's full model: the main one's, or its own
        for label, m, ab_exits in ablations:
            ref += [len(configs)] * 2
            configs += [(f"{label}: full", m, None),
                        (f"{label}: MuE", m, ab_exits.get(task) or PAPER_EXITS[task])]
        runs = run_configs(configs, td.batches, tok, td.max_new)  # quality; warms up b32
        timed = {}
        if timing:  # the first 4 batches again (why 4 and 16: docs/results.md, "Timing")
            ones = collated(td.samples[:n_b1], tok, cfg, 1, device)
            timed = {"b32": run_configs(configs, td.batches[:4], tok, td.max_new, repeats),
                     "b1": run_configs(configs, ones, tok, td.max_new, repeats, warmup=True)}
        q = [quality(task, r.preds, r.refs)["quality"] for r in runs]
        unknown = unknown_words(tok, [r for s in td.samples for r in s.refs])  # the model's <unk>
        for c, (name, _, e) in enumerate(configs):
            rows.append({**summarize(name, task, runs[c], runs[ref[c]], q[ref[c]], depth, e),
                         "unknown_ref_words": unknown, **speeds(timed, c, ref[c]),
                         "reference": configs[ref[c]][0], "batch_size": batch_size})
        for what in ("images", "texts") if task == "ve" else ("images",):
            swapped = shuffled(td.samples, what)
            if swapped is None:
                log(f"compare {task} | no 'full, shuffled {what}' row: one {what[:-1]} is shared "
                    f"by more than half of the {len(td.samples)} samples")
                continue
            mixed = collated(swapped, tok, cfg, batch_size, device)
            run = run_configs([("", model, None)], mixed, tok, td.max_new)[0]
            rows.append({**summarize(f"full, shuffled {what}", task, run, runs[0], q[0], depth,
                                     None), "unknown_ref_words": unknown, **speeds({}, 0, 0),
                         "reference": "full", "batch_size": batch_size})
        how = (f"timed: {len(timed['b32'][0].seconds)} batches of {len(td.batches[0].src)} and "
               f"{len(timed['b1'][0].preds)} at batch 1, median of {repeats}" if timing
               else "untimed")
        log(f"compare {task} | {len(configs)} configurations x {len(td.samples)} samples "
            f"| {how} | {unknown['unknown']} of {unknown['words']} reference words unknown to "
            f"the vocabulary | {time.perf_counter() - t0:.1f} s")
    return rows


def speeds(timed: dict, c: int, ref: int) -> dict:
    """Configuration c's timing columns against its full model (configuration ref) at batch size
    1 and the batch size ("b32"): measured speedup, FLOP-predicted speedup, their ratio, ms per
    unit; None untimed."""
    out = {}
    for key in ("b1", "b32"):
        rs = timed.get(key)
        meas = sum(rs[ref].seconds) / sum(rs[c].seconds) if rs else None
        pred = sum(rs[ref].macs) / sum(rs[c].macs) if rs else None
        out.update({f"speedup_{key}": meas, f"pred_{key}": pred,
                    f"ratio_{key}": meas / pred if rs else None,
                    f"ms_{key}": 1e3 * statistics.fmean(rs[c].seconds) if rs else None})
    return out


def _pct(x):
    return "-" if x is None else f"{100 * x:.1f}"


def _thr(t):
    if t is None:
        return "-"
    m = t.get("dec_min_layer", 1)  # beyond the paper where > 1
    return "/".join(f"{t[f]:.6g}" for f in KNOB_FIELDS.values()) + (
        f" (dec from layer {m})" if m > 1 else "")


def _speed(r, key):
    s = r.get(f"speedup_{key}")
    return "-" if s is None else f"{s:.2f} ({r[f'ratio_{key}']:.2f})"


COLUMNS = [  # header, cell: every number printed here is in the row (percents are fractions x 100)
    ("task", lambda r: r["task"]),
    ("configuration", lambda r: r["name"]),
    ("thr img/txt/dec", lambda r: _thr(r["thresholds"])),
    ("acc|CIDEr", lambda r: f"{r['quality']:.1f}"),
    ("B@4", lambda r: f"{r['bleu4']:.1f}" if "bleu4" in r else "-"),
    ("kept%", lambda r: _pct(r["retention"])),
    ("img", lambda r: f"{r['img_layers']:.2f}"),
    ("txt", lambda r: f"{r['txt_layers']:.2f}"),
    ("dec/tok", lambda r: f"{r['dec_layers']:.2f}"),
    ("layers-%", lambda r: _pct(r["layer_reduction"])),
    ("FLOPs-%", lambda r: _pct(r["flop_reduction"])),
    ("FLOP x", lambda r: f"{r['flop_speedup']:.2f}"),
    ("b1 x (ratio to pred)", lambda r: _speed(r, "b1")),
    ("b{B} x (ratio to pred)", lambda r: _speed(r, "b32")),  # B: the run's batch size
]


def format_table(rows, columns=COLUMNS) -> str:
    B = rows[0].get("batch_size", 32) if rows else 32
    cells = [[h.format(B=B) for h, _ in columns]] + [[f(r) for _, f in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w)
                       in enumerate(zip(row, widths, strict=True))) for row in cells]
    key = ("kept% = quality / the full model's (an ablation's own) | layers-% = the paper's "
           "expected time reduction | FLOPs-% = FLOP-weighted | FLOP x = FLOP-predicted speedup "
           "| bN x = measured speedup at batch size N (ratio to pred = measured / FLOP-predicted, "
           "same samples)")
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:], key])


# -- Sweep: a grid over the thresholds, against static shallow models and decoder-only exits.


def sweep(model, test_set, tok, device, grid=4, n=None, batch_size=32, base=None, out="out",
          log=print) -> list[dict]:
    """Per task, every combination of the knobs (grid^3; grid^2 with joint fusion), each at 1.0
    or one of grid-1 quantile levels (decoder-only exits: the encoder knobs at 1.0), every static
    shallow model k+k. Untimed: quality and reductions. Marks MuE's Pareto front and draws
    quality against FLOP-weighted reduction to out/sweep.png."""
    base = base or ExitConfig()
    cfg, depth = model.cfg, (model.cfg.n_enc_layers, model.cfg.n_dec_layers)
    levels = [0.9 - 0.8 * i / max(1, grid - 2) for i in range(grid - 1)]
    never = {f: 1.0 for f in KNOB_FIELDS.values()}
    rows = []
    for task, td in prepare(test_set, tok, cfg, n, batch_size, device).items():
        t0 = time.perf_counter()
        configs = [("full", model, None)]
        for combo in itertools.product(*[[{}] + v for v in knobs(model, td, base,
                                                                  levels).values()]):
            fields_ = {f: v for c in combo for f, v in c.items()}
            if fields_:
                ex = replace(base, **{**never, **fields_})
                kind = ("decoder only" if ex.img_threshold == ex.txt_threshold == 1.0 else
                        "encoder only" if ex.dec_threshold == 1.0 else "MuE")
                configs.append((kind, model, ex))
        configs += [(name, m, None) for name, m in shallow_models(model)]
        log(f"sweep {task} | {len(configs)} configurations x {len(td.samples)} samples "
            f"({base.dec_criterion}, {base.dec_schedule})")
        runs, chunk = [], -(-len(configs) // 10)  # a progress line per tenth: it takes minutes
        for i in range(0, len(configs), chunk):
            runs += run_configs(configs[i:i + chunk], td.batches, tok, td.max_new)
            log(f"sweep {task} | {len(runs)}/{len(configs)} | {time.perf_counter() - t0:.0f} s")
        q_full = quality(task, runs[0].preds, runs[0].refs)["quality"]
        task_rows = [summarize(name, task, r, runs[0], q_full, depth, e)
                     for (name, _, e), r in zip(configs, runs, strict=True)]
        points = {(r["quality"], r["flop_reduction"]) for r in task_rows if r["thresholds"]}
        for r in task_rows:  # Pareto: no exit configuration is as good on both and better on one
            q, f = r["quality"], r["flop_reduction"]
            r["kind"] = "static" if r["name"].startswith("static") else r["name"]
            r["pareto"] = bool(r["thresholds"]) and not any(
                oq >= q and of >= f and (oq, of) != (q, f) for oq, of in points)
        rows += task_rows
    plot_sweep(rows, os.path.join(out, "sweep.png"))
    return rows


# -- Figures. matplotlib is imported where it draws: train.py imports this file for its numbers.


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path, rect=(0, 0, 1, 1)):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


COLORS = {"caption": "tab:blue", "ve": "tab:red"}


def plot_sweep(rows, path):
    """Quality against FLOP-weighted saving per task: the exit configurations and their Pareto
    front, decoder exits only, the static k+k models and the full model."""
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = _plt().subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.8), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        rs = [r for r in rows if r["task"] == task]

        def pts(keep, rs=rs):
            sel = sorted((r for r in rs if keep(r)), key=lambda r: r["flop_reduction"])
            return [100 * r["flop_reduction"] for r in sel], [r["quality"] for r in sel], sel
        x, y, _ = pts(lambda r: r["kind"] == "MuE")
        ax.scatter(x, y, s=14, color="tab:blue", alpha=0.35, label="encoder + decoder exits")
        x, y, _ = pts(lambda r: r["kind"] == "encoder only")
        ax.scatter(x, y, s=14, marker="s", color="tab:green", alpha=0.5, label="encoder exits only")
        x, y, _ = pts(lambda r: r["pareto"])
        ax.plot(x, y, "-o", color="tab:blue", ms=4, label="exits: Pareto front")
        x, y, _ = pts(lambda r: r["kind"] == "decoder only")
        ax.plot(x, y, "--^", color="tab:orange", label="decoder exits only")
        x, y, sel = pts(lambda r: r["kind"] == "static")
        ax.plot(x, y, ":s", color="tab:gray", label="static shallow k+k")
        for xi, yi, r in zip(x, y, sel, strict=True):
            ax.annotate(r["name"].split()[-1], (xi, yi), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        x, y, _ = pts(lambda r: r["kind"] == "full")
        ax.plot(x, y, "*", color="black", ms=13, label="full model")
        ax.set(title=f"{task}: quality against FLOP-weighted saving",
               xlabel="FLOP-weighted reduction (%)",
               ylabel="VE accuracy (%)" if task == "ve" else "CIDEr-D")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_profiles(model, data, exits, path):
    """The paper's Fig. 3: each exit signal per layer, teacher-forced, every layer run: the
    encoder's per modality and every registered decoder signal, with the thresholds."""
    titles = [("img", "encoder, image tokens"), ("txt", "encoder, text tokens")] + [
        (f"dec_{name}", f"decoder, {name}") for name in DEC_SIGNALS]
    fig, axes = _plt().subplots(1, len(titles), figsize=(4.3 * len(titles), 3.8))
    for task, td in data.items():
        ex = exits.get(task) or PAPER_EXITS[task]
        thresholds = {"img": ex.img_threshold, "txt": ex.txt_threshold,
                      f"dec_{ex.dec_criterion}": ex.dec_threshold}
        prof = {k: [] for k, _ in titles}
        for b in td.batches:
            p = model.profile(b.images, b.src, b.tgt_in, ex.enc_criterion)
            for k in prof:  # decoder signals at the real target positions: (rows, L_dec)
                prof[k].append((p[k] if k in ("img", "txt") else p[k][b.tgt_mask]).cpu())
        for ax, (k, title) in zip(axes, titles, strict=True):
            v = torch.cat(prof[k]).float()  # (rows, L)
            x = range(1, v.shape[1] + 1)
            ax.plot(x, v.mean(0).numpy(), "-o", color=COLORS[task], label=f"{task}: mean")
            ax.fill_between(x, v.quantile(0.1, 0).numpy(), v.quantile(0.9, 0).numpy(),
                            color=COLORS[task], alpha=0.15, label=f"{task}: 10-90%")
            if thresholds.get(k, 1.0) < 1.0:
                ax.axhline(thresholds[k], color=COLORS[task], ls="--", lw=1,
                           label=f"{task}: threshold")
            ax.set(title=title, xlabel="layer l", xticks=list(x))
    axes[0].set_ylabel("signal (a layer exits above its threshold)")
    fig.legend(*axes[-1].get_legend_handles_labels(), loc="lower center", ncol=6, fontsize=8)
    fig.suptitle("Exit signals per layer (the paper's Fig. 3), test samples, every layer run")
    return _save(fig, path, rect=(0, 0.08, 1, 1))


def plot_exits(model, runs, exits, path):
    """Where MuE stopped: encoder layers per sample and modality, decoder layers per word."""
    cfg = model.cfg
    fig, axes = _plt().subplots(1, 3, figsize=(14, 3.6))
    width = 0.8 / len(runs)
    for i, (task, r) in enumerate(runs.items()):
        for ax, vals, L in ((axes[0], r.img, cfg.n_enc_layers), (axes[1], r.txt, cfg.n_enc_layers),
                            (axes[2], [k for d in r.dec for k in d], cfg.n_dec_layers)):
            share = [100 * vals.count(l) / len(vals) for l in range(1, L + 1)]
            ex = exits.get(task) or PAPER_EXITS[task]
            ax.bar([l - 0.4 + width * (i + 0.5) for l in range(1, L + 1)], share, width,
                   color=COLORS[task], label=f"{task} ({_thr(asdict(ex))})")
            ax.set_xticks(range(1, L + 1))
    for ax, title in zip(axes, ("image: encoder layers run", "text: encoder layers run",
                                "decoder: layers run per generated token"), strict=True):
        ax.set(title=title, xlabel="exit layer", ylabel="% of samples" if ax is not axes[2]
               else "% of tokens")
    axes[2].legend(fontsize=8, title="task (thresholds img/txt/dec)", title_fontsize=8)
    fig.suptitle(f"MuE exit layers on {sum(len(r.img) for r in runs.values())} test samples")
    return _save(fig, path)


def plot_words(model, run, tok, path):
    """Four captions, word by layer: dark = the layer the word was read from, light = run."""
    L = model.cfg.n_dec_layers
    by_text = {run.preds[i]: i for i in range(len(run.preds))}  # one sample per distinct caption
    picks = sorted(by_text.values(), key=lambda i: -len(set(run.dec[i])))[:4]
    fig, axes = _plt().subplots(len(picks), 1, figsize=(10, 1.5 + 1.3 * len(picks)),
                                squeeze=False)
    for ax, i in zip(axes[:, 0], picks, strict=True):
        d = run.dec[i]
        names = [tok.decode([t]) if t != model.cfg.eos_id else "<eos>" for t in run.tokens[i]]
        grid = torch.zeros(L, len(d))
        for t, k in enumerate(d):
            grid[:k, t] = 1
            grid[k - 1, t] = 2
        ax.imshow(grid.numpy(), origin="lower", cmap="Blues", vmin=0, vmax=2.2, aspect="auto")
        ax.set_xticks(range(len(d)), names, fontsize=8)
        ax.set_yticks(range(L), range(1, L + 1), fontsize=7)
        ax.set_ylabel("layer")
        ax.set_title(f"\"{run.preds[i]}\"  (image {run.img[i]}, text {run.txt[i]} encoder "
                     f"layers)", fontsize=9)
    fig.suptitle("Where each word exited the decoder (dark: exit layer, light: layers run)")
    return _save(fig, path)


def figures(model, test_set, tok, device, exits: dict, out) -> list[str]:
    """profiles.png, exits.png and (with captions) words.png on the first 64 test samples."""
    data = prepare(test_set, tok, model.cfg, 64, 32, device)
    runs = {task: run_configs([("MuE", model, exits.get(task) or PAPER_EXITS[task])],
                              td.batches, tok, td.max_new)[0] for task, td in data.items()}
    paths = [plot_profiles(model, data, exits, os.path.join(out, "profiles.png")),
             plot_exits(model, runs, exits, os.path.join(out, "exits.png"))]
    if "caption" in runs:
        paths.append(plot_words(model, runs["caption"], tok, os.path.join(out, "words.png")))
    return paths


# -- Command line.


def check_device(name: str):
    if name and not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {name!r}")


def pick_device(name: str) -> str:
    """"" -> cuda if there is a GPU, else cpu. ValueError for a device this machine lacks."""
    check_device(name)
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name} but no CUDA GPU is available")
    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def check_output(flag, path, folder=False):
    """Before any work: ValueError naming `flag` unless `path` can be written, a folder (or a
    file) where one is wanted inside a folder this user may write. Nothing is created."""
    kind, other = ("a folder", "a file") if folder else ("a file", "a folder")
    if os.path.exists(path) and os.path.isdir(path) != folder:
        raise ValueError(f"{flag} {path} is {other}, not {kind}")
    parent = os.path.abspath(path if folder else os.path.dirname(os.path.abspath(path)))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path} cannot be written: {parent} is not a folder you may "
                         f"write in")


def write_json(path, obj):
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1, default=str).encode()))


def datasets(args, train: dict, cfg):
    """(val, test) of the data the checkpoint was trained on, or as the flags say (--shapes: the
    test scenes only). train.py saves absolute paths; an older checkpoint's relative ones are
    read from the current folder."""
    source = args.data or train.get("data", "shapes")
    ann, images = args.ann or train.get("ann"), args.images or train.get("images")
    for flag, path in (("--ann", ann), ("--images", images)):
        if path and not getattr(args, flag[2:]) and not os.path.exists(
                path.replace("{split}", "dev")):
            raise ValueError(f"{args.ckpt} was trained on {path}, which is not there any more "
                             f"(moved?): give its new place with {flag}")
    load = partial(load_split, source, ann=ann, images=images, image_size=cfg.image_size,
                   task=train.get("task", "multi"),
                   seed=train.get("seed", 0) if args.seed is None else args.seed,
                   premise=train.get("premise", False),  # absent: trained before the premise
                   max_src_len=cfg.max_src_len, max_tgt_len=cfg.max_tgt_len)
    world = train.get("shapes", "")
    return (load("val", size=args.n_val, shapes=world),
            load("test", size=args.n, shapes=",".join(filter(None, [world, args.shapes]))))


def ablation_label(cfg, path):
    if cfg.fusion == "joint":
        return "no decomposition"
    return "no layer-wise loss" if cfg.loss_weights == "last" else os.path.basename(path)


SIGNAL_FIELDS = ("dec_criterion", "dec_schedule", "dec_beta", "dec_tau", "enc_criterion")


def thresholds(state, flags) -> tuple[dict, dict]:
    """-> (task -> ExitConfig, task -> where its thresholds came from): the checkpoint's own
    calibrated ones while the flags keep the signals they were calibrated for, else the paper's
    scripts' (never another checkpoint's); threshold flags over either."""
    saved, exits, source = state.get("exits") or {}, {}, {}
    for task, paper in PAPER_EXITS.items():
        mine = saved.get(task) or {}
        moved = [f"{f} {v}" for f, v in mine.items() if f in SIGNAL_FIELDS and flags.get(f, v) != v]
        use = mine if mine and not moved else asdict(paper)
        where = "checkpoint (calibrated)" if use is mine else "the paper's scripts (uncalibrated)"
        if moved:
            where += (f", since the checkpoint's were calibrated for {', '.join(moved)} "
                      f"(--calibrate calibrates the flags' signals)")
        given = [f for f in KNOB_FIELDS.values() if f in flags]
        if given:
            where = "the flags" if len(given) == 3 else f"{where}; {'/'.join(given)} from flags"
        exits[task], source[task] = ExitConfig(**{**use, **flags}), where
    return exits, source


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="checkpoint written by train.py")
    p.add_argument("--spread", nargs="+", metavar="REPORT", help="instead: the headline figures "
                   "of several report.json files (runs on other seeds), each as its range")
    p.add_argument("--plugin", action="append", default=[], metavar="FILE.py", help="a file "
                   "that registers exit signals, schedules or loss weights in mue's dicts, run "
                   "before anything else (docs/exercises.md); repeatable")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--out", help="folder for the PNGs (default: the checkpoint's folder)")
    p.add_argument("--json", help="write every number of the tables here")
    p.add_argument("--data", choices=("shapes", "coco", "snli_ve"), help="default: the ckpt's")
    p.add_argument("--ann", help="coco: Karpathy json; snli_ve: folder or '{split}' pattern")
    p.add_argument("--images", help="image folder (coco, snli_ve)")
    p.add_argument("--seed", type=int, help="shapes seed (default: the checkpoint's)")
    p.add_argument("--shapes", help="shapes: draw the test scenes with these settings over the "
                   "checkpoint's, e.g. max_objects=4 (a distribution shift); calibration keeps "
                   "the checkpoint's world")
    p.add_argument("--n", type=positive, help="test samples, the first n of the split over all "
                   "tasks (default: train.py's test_size, else 500)")
    p.add_argument("--n-val", type=positive, help="val samples for --calibrate (default: "
                   "train.py's val_size, else 300)")
    p.add_argument("--batch-size", type=positive, default=32, help="the comparison's batch "
                   "(its bN x column)")
    p.add_argument("--n-b1", type=positive, default=16, help="samples timed at batch 1, per task")
    p.add_argument("--repeats", type=positive, default=3, help="timed runs per unit (median)")
    p.add_argument("--no-timing", action="store_true", help="skip the wall-clock measurements")
    p.add_argument("--threads", type=positive, help="torch CPU threads (1: faster on a busy CPU)")
    p.add_argument("--img", type=float, help="image threshold, all tasks ([-1, 1] for the "
                   "cosine)")
    p.add_argument("--txt", type=float, help="text threshold, all tasks ([-1, 1] for the cosine)")
    p.add_argument("--dec", type=float, help="decoder threshold, all tasks")
    # The names come from mue's dicts once the plugins are loaded, so ExitConfig checks them.
    for flag, field_, names in (("--criterion", "dec-criterion", DEC_SIGNALS),
                                ("--schedule", "dec-schedule", DEC_SCHEDULES),
                                ("--enc-criterion", "enc-criterion", ENC_SIGNALS)):
        p.add_argument(flag, help=f"one of {', '.join(names)} or a plugin's (calibrate, sweep: "
                       f"train.py's --{field_} unless given)")
    p.add_argument("--beta", type=float, help="decay schedule beta")
    p.add_argument("--tau", type=float, help="decay schedule tau")
    p.add_argument("--calibrate", action="store_true", help="choose thresholds on val and store "
                   "them in each checkpoint (--img/--txt/--dec are then ignored)")
    p.add_argument("--target", type=float, help="quality to keep when calibrating (default: "
                   "train.py's --target, else 0.99)")
    p.add_argument("--delta", type=float, default=0.05, help="calibration's chance of a wrong "
                   "promise: the chosen exits keep --target with probability 1 - delta")
    p.add_argument("--dec-min-layer", type=positive, help="calibration's second path: no "
                   "decoder exit before this layer, beyond the paper (1: the paper's rule alone; "
                   "default: train.py's, else 2)")
    p.add_argument("--sweep", action="store_true", help="threshold grid and trade-off PNG")
    p.add_argument("--grid", type=int, default=4, help="values per knob in the sweep")
    p.add_argument("--sweep-n", type=positive, default=200, help="test samples in the sweep (its "
                   "grid^3 + L configurations cost minutes per 100 samples on a CPU)")
    p.add_argument("--ablation", action="append", default=[], help="another checkpoint (joint "
                   "fusion or last-layer loss) evaluated beside this one; repeatable")
    p.add_argument("--no-figures", action="store_true")
    return p


FLAG_FIELDS = {**KNOB_FIELDS, "criterion": "dec_criterion", "schedule": "dec_schedule",
               "beta": "dec_beta", "tau": "dec_tau",
               "enc_criterion": "enc_criterion"}  # eval.py's flag -> ExitConfig field
REGISTRIES = {"dec_criterion": ("DEC_SIGNALS", DEC_SIGNALS),  # ExitConfig field -> mue's dict
              "dec_schedule": ("DEC_SCHEDULES", DEC_SCHEDULES),
              "enc_criterion": ("ENC_SIGNALS", ENC_SIGNALS)}


def check_registered(path, state, flags):
    """A checkpoint's calibrated exits, and the signals it was trained to report with, may name a
    plugin's signal or schedule: say which file to pass, before anything runs. A flag that
    replaces the name makes it moot."""
    named = [("calibrated", e) for e in (state.get("exits") or {}).values()]
    for how, given in named + [("trained", state.get("train") or {})]:
        for f, (registry, names) in REGISTRIES.items():
            if f in given and f not in flags and given[f] not in names:
                raise ValueError(f"{path} was {how} with {f} {given[f]}: pass --plugin FILE that "
                                 f"registers it in mue.{registry}{made_with(state)}")


def load(args, flags):
    """Check the settings and the output paths, read the checkpoints and the data, before
    anything runs. -> [(path, model, state)], the tokenizer, val, test, and the signals for
    --calibrate and --sweep (an ExitConfig). ValueError names what is wrong."""
    check_calibration(0.99 if args.target is None else args.target, args.delta)
    if args.grid < 2:
        raise ValueError(f"need --grid >= 2, got {args.grid}")
    args.out = args.out or os.path.dirname(args.ckpt) or "."  # beside the checkpoint
    if args.sweep or not args.no_figures:
        check_output("--out", args.out, folder=True)
    if args.json:
        check_output("--json", args.json)
    for path in [args.ckpt, *args.ablation] if args.calibrate else ():  # rewritten in place
        check_output("--calibrate rewrites", path)
    for path in args.plugin:  # first: they add names that the checks below accept
        load_plugin(path)
    args.device = pick_device(args.device or "")
    model, state = load_checkpoint(args.ckpt, args.device)
    if "tokenizer" not in state:
        raise ValueError(f"checkpoint {args.ckpt!r} has no tokenizer (not written by train.py)")
    tok = Tokenizer.from_state_dict(state["tokenizer"])
    if len(tok) != model.cfg.vocab_size:
        raise ValueError(f"checkpoint {args.ckpt!r}: tokenizer has {len(tok)} words, the "
                         f"model {model.cfg.vocab_size}")
    checkpoints = [(args.ckpt, model, state)]
    for path in args.ablation:
        m, st = load_checkpoint(path, args.device)
        if st.get("tokenizer") != state["tokenizer"] or m.cfg.image_size != model.cfg.image_size:
            raise ValueError(f"ablation checkpoint {path!r} does not share the main one's "
                             f"tokenizer and image size")
        checkpoints.append((path, m, st))
    train = state.get("train") or {}
    for path, _, st in checkpoints:
        check_registered(path, st, flags)
        thresholds(st, {} if args.calibrate else flags)  # the flags' names and ranges, now
    # The signals and the schedule for --calibrate and --sweep: the flags, else train.py's.
    base = ExitConfig(**{"dec_criterion": train.get("dec_criterion", "confidence"),
                         "dec_schedule": train.get("dec_schedule", "constant"),
                         "enc_criterion": train.get("enc_criterion", "cosine"),
                         **{k: v for k, v in flags.items() if k in SIGNAL_FIELDS}})
    args.n = args.n or train.get("test_size", 500)  # the samples train.py reported on
    args.n_val = args.n_val or train.get("val_size", 300)
    args.target = args.target or train.get("target", 0.99)
    args.dec_min_layer = args.dec_min_layer or train.get("dec_min_layer", 2)
    return checkpoints, tok, *datasets(args, train, model.cfg), base


HEADLINES = [  # (row, figure, key, scale): what README quotes, per task
    ("full", "full model quality", "quality", 1), ("MuE", "MuE kept %", "retention", 100),
    ("MuE", "MuE fewer layers %", "layer_reduction", 100),
    ("MuE", "MuE fewer FLOPs %", "flop_reduction", 100),
    ("MuE", "MuE decoder layers a token", "dec_layers", 1),
    ("MuE", "MuE speedup at batch 1", "speedup_b1", 1),
    ("MuE", "MuE speedup at the batch size", "speedup_b32", 1)]


def spread(paths) -> str:
    """The headline figures of several train.py reports side by side, with their range; each
    column is named by its report's folder."""
    runs, names = [], [os.path.basename(os.path.dirname(os.path.abspath(p))) for p in paths]
    for path in paths:
        with open(path) as f:
            runs.append({(r["task"], r["name"]): r for r in json.load(f)["rows"]})
    lines = [f"{'task':8s} {'figure':31s} " + " ".join(f"{n[-9:]:>9s}" for n in names) + "  range"]
    for task in dict.fromkeys(t for t, _ in runs[0]):
        for row, figure, key, scale in HEADLINES:
            got = [r.get((task, row), {}).get(key) for r in runs]  # 0.0 is a figure, None not
            values = [math.nan if v is None else scale * v for v in got]
            known = [v for v in values if not math.isnan(v)]  # untimed runs have no speedups
            span = f"{min(known):.2f} - {max(known):.2f}" if known else "-"
            lines.append(f"{task:8s} {figure:31s} " + " ".join(f"{v:9.2f}" for v in values)
                         + f"  {span}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.spread:
        try:
            print(spread(args.spread))
        except (OSError, ValueError, KeyError) as e:  # not a report of train.py
            print(f"eval.py: error: --spread: {e}", file=sys.stderr)
            return 1
        return 0
    if not args.ckpt:
        p.error("--ckpt is required (or --spread REPORT [REPORT ...])")
    flags = {f: getattr(args, a) for a, f in FLAG_FIELDS.items() if getattr(args, a) is not None}
    try:  # a setting or a file that is not what it should be: one line, exit status 1
        loaded = load(args, flags)
    except (ValueError, FileNotFoundError) as e:
        print(f"eval.py: error: {e}", file=sys.stderr)
        return 1
    try:
        return evaluate(args, flags, *loaded)
    except BadImage as e:  # met while reading samples
        print(f"eval.py: error: {e}", file=sys.stderr)
        return 1


def evaluate(args, flags, checkpoints, tok, val_set, test_set, base) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    path, model, state = checkpoints[0]
    train = state.get("train") or {}
    tasks = {"coco": ["caption"], "snli_ve": ["ve"]}.get(args.data or train.get("data")) or (
        ["caption", "ve"] if train.get("task", "multi") == "multi" else [train["task"]])
    result = {"checkpoint": args.ckpt, "device": args.device, "settings": vars(args),
              "plugins": list(PLUGINS), "thresholds_from": {}}
    t0 = time.perf_counter()
    every = []  # per checkpoint, task -> ExitConfig: its own thresholds, else the paper's
    for path, m, st in checkpoints:
        if args.calibrate:  # each checkpoint gets its own thresholds, stored in it
            found, result["calibration"] = calibrate(m, val_set, tok, args.device, args.target,
                                                     args.delta, n=args.n_val, base=base,
                                                     dec_min_layer=args.dec_min_layer)
            st["exits"] = {t: asdict(e) for t, e in found.items()}
            st["plugins"] = sorted(set(st.get("plugins") or []) | set(PLUGINS))
            save_checkpoint(path, m, **{k: v for k, v in st.items() if k != "model"})
            print(f"stored the thresholds in {path}")
        exits, source = thresholds(st, {} if args.calibrate else flags)  # --img... ignored then
        every.append(exits)
        result["thresholds_from"][path] = {t: source[t] for t in tasks}
        print(f"thresholds of {path}: " + ", ".join(
            f"{t} {_thr(asdict(exits[t]))} from {source[t]}" for t in tasks) + (
            f"; the flags set {flags}" if flags and not args.calibrate else ""))
    exits = every[0]
    result["exits"] = {t: asdict(e) for t, e in exits.items()}
    rows = compare(model, test_set, tok, args.device, exits, args.batch_size,
                   not args.no_timing, args.n, args.n_b1, args.repeats,
                   [(ablation_label(m.cfg, p), m, ab) for (p, m, _), ab
                    in zip(checkpoints[1:], every[1:], strict=True)])
    result["rows"] = rows
    print(format_table(rows))
    if args.sweep:
        result["sweep"] = sweep(model, test_set, tok, args.device, args.grid,
                                min(args.n, args.sweep_n), args.batch_size, base, args.out)
        shown = [r for r in result["sweep"] if r["pareto"] or r["kind"] in ("full", "static")]
        print(f"sweep: {len(result['sweep'])} points, the exits' Pareto front and references:")
        print(format_table(sorted(shown, key=lambda r: (r["task"], r["kind"] != "full",
                                                        r["flop_reduction"])), COLUMNS[:12]))
    if not args.no_figures:
        result["figures"] = figures(model, test_set, tok, args.device, exits, args.out)
        if args.sweep:
            result["figures"].append(os.path.join(args.out, "sweep.png"))
        print("figures: " + ", ".join(result["figures"]))
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # --calibrate writes checkpoints atomically: nothing is half-done
        print("eval.py: interrupted", file=sys.stderr)
        sys.exit(130)
