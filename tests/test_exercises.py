"""The exercises of README's "Exercises", one pytest marker each: `pytest -m exercise_N`.

Each test skips, saying what to write and where, until the function exists (in solutions.py at
the repository root, which tests/conftest.py loads, or in a file given with `pytest --plugin`);
then it checks what the function does, not one particular answer. A name that an exercise
registers in mue's dicts is graded by the oracle tests of tests/test_mue.py too, which carry the
exercise's marker for it. Exercise 0 is solved, in tests/exercises/entropy_exit.py.
"""

import inspect
import itertools
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, WORKED_EXAMPLE
from test_mue import (check_batch_equals_one_by_one, check_cached_equals_slow_reference,
                      make_batch, make_model, make_prefix, teacher_batch, thresholds_that_split)

import eval as ev
import mue
from data import Batch, ShapesDataset, collate
from mue import DEC_SIGNALS, ENC_SIGNALS, ExitConfig, Signal, masked_cosine


def needs(registry, name, exercise):
    """Skip until `name` is registered in mue's dict `registry`."""
    if name not in getattr(mue, registry):
        pytest.skip(f"exercise {exercise}: register {name!r} in mue.{registry} (in solutions.py "
                    f"at the repository root) to start")


def solution(name, exercise):
    """The function `name` of a loaded plugin (solutions.py, or pytest --plugin), or a skip."""
    for module in mue.PLUGINS.values():
        if callable(getattr(module, name, None)):
            return getattr(module, name)
    pytest.skip(f"exercise {exercise}: write {name} in solutions.py at the repository root to "
                f"start")


# -- exercise 0 (solved): an entropy exit ----------------------------------------------------


@pytest.mark.exercise_0
def test_entropy_is_one_minus_the_entropy_over_its_largest_value():
    sig = DEC_SIGNALS["entropy"]
    logits = 3 * torch.randn(3, 5, 20, generator=torch.Generator().manual_seed(0))
    value, state = sig.fn(None, None, logits, 2, None)
    H = torch.distributions.Categorical(logits=logits).entropy()
    torch.testing.assert_close(value, 1 - H / math.log(20))
    sure, undecided = torch.zeros(2, 20), torch.zeros(2, 20)
    sure[:, 3] = 60.0
    torch.testing.assert_close(sig.fn(None, None, sure, 1, None)[0], torch.ones(2))
    torch.testing.assert_close(sig.fn(None, None, undecided, 1, None)[0], torch.zeros(2))
    assert state is None and sig.head and sig.low == 0.0


@pytest.mark.exercise_0
def test_entropy_runs_through_eval_calibration_and_sweep(ckpt, tmp_path):
    """In a process of its own, where only --plugin can register "entropy". (The figures draw
    every registered decoder signal: test_eval's command-line tests see the entropy's too.)"""
    out, report = tmp_path / "out", tmp_path / "r.json"
    cmd = [sys.executable, "eval.py", "--ckpt", str(ckpt), "--plugin",
           "tests/exercises/entropy_exit.py", "--criterion", "entropy", "--calibrate",
           "--target", "0.9", "--sweep", "--grid", "2", "--n", "4", "--n-val", "8",
           "--batch-size", "4", "--no-timing", "--no-figures", "--threads", "1", "--out",
           str(out), "--json", str(report)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(report.read_text())
    assert result["plugins"] == [str(WORKED_EXAMPLE)]
    exits = [row["thresholds"] for row in result["sweep"] + result["rows"] if row["thresholds"]]
    assert exits and all(t["dec_criterion"] == "entropy" for t in exits)
    assert any(row["dec_layers"] < 3 for row in result["sweep"] if row["kind"] == "decoder only")
    assert re.search(r"calibrate caption \| full .* \| chosen .* on 4 val samples", r.stdout)
    assert r.stdout.count("configurations x 2 samples (entropy, constant)") == 2  # both tasks
    state = torch.load(ckpt, weights_only=True)  # calibrated with entropy, and says by which file
    assert {e["dec_criterion"] for e in state["exits"].values()} == {"entropy"}
    assert state["plugins"] == [str(WORKED_EXAMPLE)]
    assert [p.name for p in out.iterdir()] == ["sweep.png"]


@pytest.mark.parametrize("spelling", ["--plugin {}", "--plugin={}"])
def test_pytest_loads_a_plugin_file_from_anywhere(tmp_path, spelling):
    """`pytest --plugin FILE.py`, FILE.py outside the repository: pytest must know the option
    before it reads FILE.py (tests/mue_pytest.py, installed by requirements.txt)."""
    mine = tmp_path / "elsewhere" / "mine.py"
    mine.parent.mkdir()
    mine.write_text("import os\nopen(os.environ['LOADED'], 'w').write('yes')\n")
    cmd = [sys.executable, "-m", "pytest", *spelling.format(mine).split(), "-m", "exercise_0",
           "-k", "entropy_is_one_minus", "-q", "-p", "no:cacheprovider"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "LOADED": str(tmp_path / "loaded")})
    assert r.returncode == 0 and "1 passed" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    assert (tmp_path / "loaded").read_text() == "yes"


# -- exercise 1: a patience exit (PABEE) -----------------------------------------------------


def layer_predictions(model, images, src, tgt_in):
    """(B, T, L): the head's argmax after every decoder layer, teacher-forced, computed here."""
    with torch.no_grad():
        memory, valid, _, _ = model.encode(images, src)
        x = model.tok_emb(tgt_in) + model.tgt_pos(torch.arange(tgt_in.shape[1]))
        out = []
        for layer in model.decoder:
            x = layer(x, memory, valid[:, None, None, :])
            out.append(model.head(x).argmax(-1))
    return torch.stack(out, -1)


def streaks(pred):
    """(B, T, L): for how many layers in a row, up to layer l, a layer repeated the prediction of
    the one before it (0 at layer 1, and wherever the prediction just changed)."""
    s = torch.zeros_like(pred)
    for l in range(1, pred.shape[-1]):
        s[..., l] = torch.where(pred[..., l] == pred[..., l - 1], s[..., l - 1] + 1, 0)
    return s


def patience_levels(model, images, src):
    """The patience signal's value for each streak, checked to depend on the streak alone."""
    tgt_in = torch.cat([torch.ones(len(src), 1, dtype=torch.long),
                        model.generate(images, src, 6).tokens[:, :-1]], 1)
    signal = model.profile(images, src, tgt_in)["dec_patience"]
    streak = streaks(layer_predictions(model, images, src, tgt_in))
    levels = {}
    for k in streak.unique().tolist():
        v = signal[streak == k]
        assert v.max() - v.min() <= 1e-6, f"streak {k}: the signal varies ({v.min()}..{v.max()})"
        levels[k] = v[0].item()
    return levels


@pytest.mark.exercise_1
def test_patience_is_a_rising_function_of_the_streak():
    needs("DEC_SIGNALS", "patience", 1)
    model = make_model(11)
    levels = patience_levels(model, *make_batch(seed=11))
    assert sorted(levels)[:3] == [0, 1, 2]  # the model shows the streaks that matter
    values = [levels[k] for k in sorted(levels)]
    assert all(a < b for a, b in itertools.pairwise(values)), levels
    assert DEC_SIGNALS["patience"].low <= values[0] and values[-1] < 1


@pytest.mark.exercise_1
@pytest.mark.parametrize("p", [1, 2])
def test_patience_p_leaves_after_p_layers_that_agree(p):
    """PABEE: a token leaves at the first layer l whose prediction is the one of the p layers
    before it (streak_l >= p), so never before layer p + 1. For the first token, whose layers
    see the same states at any threshold."""
    needs("DEC_SIGNALS", "patience", 1)
    model = make_model(11)
    images, src = make_batch(seed=11)
    levels = patience_levels(model, images, src)
    theta = (levels[p - 1] + levels[p]) / 2
    gen = model.generate(images, src, 1, exit=ExitConfig(dec_threshold=theta,
                                                         dec_criterion="patience"))
    streak = streaks(layer_predictions(model, images, src, torch.ones(8, 1, dtype=torch.long)))
    expected = [next((l + 1 for l in range(3) if s[l] >= p), 4) for s in streak[:, 0].tolist()]
    assert gen.dec_layers[:, 0].tolist() == expected
    assert min(expected) == p + 1 and len(set(expected)) > 1  # some leave early, some do not


# -- exercise 2: an encoder signal in which every token counts -------------------------------


@pytest.mark.exercise_2
def test_token_signal_is_per_sample_and_ignores_padding():
    needs("ENC_SIGNALS", "tokens", 2)
    fn = ENC_SIGNALS["tokens"].fn
    g = torch.Generator().manual_seed(0)
    prev = torch.randn(4, 10, 8, generator=g)
    h = prev + 0.8 * torch.randn(4, 10, 8, generator=g)
    lengths = [10, 7, 4, 1]
    mask = torch.arange(10) < torch.tensor(lengths)[:, None]
    batch = fn(h, prev, mask)
    assert batch.shape == (4,)
    for r, n in enumerate(lengths):
        alone = fn(h[r:r + 1, :n], prev[r:r + 1, :n], torch.ones(1, n, dtype=torch.bool))
        torch.testing.assert_close(batch[r:r + 1], alone)
    h2, prev2 = h.clone(), prev.clone()
    h2[~mask], prev2[~mask] = 100.0, -3.0  # what padding holds must not matter
    torch.testing.assert_close(fn(h2, prev2, mask), batch)


@pytest.mark.exercise_2
def test_token_signal_is_one_without_change_and_the_cosine_when_all_turn_alike():
    needs("ENC_SIGNALS", "tokens", 2)
    fn, mask = ENC_SIGNALS["tokens"].fn, torch.ones(3, 6, dtype=torch.bool)
    g = torch.Generator().manual_seed(1)
    prev = torch.randn(3, 6, 8, generator=g)
    torch.testing.assert_close(fn(prev.clone(), prev, mask), torch.ones(3))
    u = F.normalize(prev, dim=-1)
    w = torch.randn(3, 6, 8, generator=g)
    v = F.normalize(w - (w * u).sum(-1, keepdim=True) * u, dim=-1)  # a direction at right angles
    length = 0.1 + 3 * torch.rand(3, 6, 1, generator=g)  # every token its own new length
    for a in (0.3, 1.0, 2.0):  # every token turned by the same angle a
        h = (math.cos(a) * u + math.sin(a) * v) * length
        torch.testing.assert_close(fn(h, prev, mask), torch.full((3,), math.cos(a)))


@pytest.mark.exercise_2
def test_token_signal_notices_one_short_token_that_turned():
    """Sixteen tokens: fifteen long ones unchanged, one short one turned a right angle. The
    flattened cosine hardly moves; where every token counts the same, the signal is at most
    15/16."""
    needs("ENC_SIGNALS", "tokens", 2)
    g = torch.Generator().manual_seed(2)
    prev = 10 * F.normalize(torch.randn(1, 16, 8, generator=g), dim=-1)
    prev[0, 15] /= 20
    h = prev.clone()
    h[0, 15] = torch.linalg.svd(prev[0, 15:])[2][1] * prev[0, 15].norm()  # at right angles
    mask = torch.ones(1, 16, dtype=torch.bool)
    assert masked_cosine(h, prev, mask).item() > 0.999
    assert ENC_SIGNALS["tokens"].fn(h, prev, mask).item() <= 15 / 16 + 1e-6


# -- exercise 3: exits under distribution shift ----------------------------------------------


def min_objects_setting():
    if "min_objects" not in inspect.signature(ShapesDataset).parameters:
        pytest.skip("exercise 3: give data.ShapesDataset a min_objects setting to start")


def items(scene):
    return len(scene.objects) + (scene.box is not None)


@pytest.mark.exercise_3
@pytest.mark.parametrize("task", ["caption", "ve"])
def test_min_objects_bounds_the_items_of_every_scene(task):
    min_objects_setting()
    for low, high in ((1, 2), (2, 3), (3, 4), (4, 4)):
        ds = ShapesDataset("test", task, size=24, min_objects=low, max_objects=high)
        scenes = [ds.scene(i) for i in range(24)]
        assert all(s.objects and low <= items(s) <= high for s in scenes), (low, high)
    plain = ShapesDataset("train", task, size=12)
    same = ShapesDataset("train", task, size=12, min_objects=1)
    assert [plain.spec(i) for i in range(12)] == [same.spec(i) for i in range(12)]
    for kwargs in (dict(min_objects=0), dict(min_objects=3, max_objects=2)):
        with pytest.raises(ValueError, match="min_objects"):
            ShapesDataset("test", task, **kwargs)


@pytest.mark.exercise_3
def test_min_objects_reaches_eval_through_the_shapes_flag(trained):
    min_objects_setting()
    args = ev.parser().parse_args(["--ckpt", "x.pt", "--shapes", "min_objects=3", "--n", "20",
                                   "--n-val", "20"])
    val, test = ev.datasets(args, {"task": "multi"}, trained.cfg)
    assert all(items(test.scene(i)) >= 3 for i in range(20))
    assert any(items(val.scene(i)) < 3 for i in range(20))  # calibration keeps the world


# -- exercise 4: the decay schedule on long outputs ------------------------------------------


@pytest.mark.exercise_4
def test_position_schedule_depends_on_the_position_alone_and_never_rises():
    needs("DEC_SCHEDULES", "position", 4)
    for theta in (0.0, 0.3, 0.9, 0.99):
        ex = ExitConfig(dec_threshold=theta, dec_schedule="position", dec_beta=0.9)
        by_budget = [[ex.dec_threshold_at(t, n) for t in range(n)] for n in (5, 12, 31)]
        for short in by_budget[:-1]:
            assert short == by_budget[-1][:len(short)], "Theta(t) changed with the budget n"
        th = by_budget[-1]
        assert all(a >= b for a, b in itertools.pairwise(th)) and all(x < 1 for x in th), th


@pytest.mark.exercise_4
def test_an_output_does_not_depend_on_the_budget_with_the_position_schedule():
    """The same samples and thresholds, with 5 and 10 tokens of budget: with the position
    schedule each row's first tokens and exit layers are the same; with CALM's decay, whose
    Theta(t) reads t / budget, they are not (which is what the check is for)."""
    needs("DEC_SCHEDULES", "position", 4)
    model = make_model(0)
    images, src = make_batch(seed=20)
    base = replace(thresholds_that_split(model, images, src, "confidence"), dec_beta=0.5)

    def same_start(schedule):
        short, long = (model.generate(images, src, n, exit=replace(base, dec_schedule=schedule))
                       for n in (5, 10))
        n = short.tokens.shape[1]
        return (torch.equal(short.tokens, long.tokens[:, :n])
                and torch.equal(short.dec_layers, long.dec_layers[:, :n]))
    assert not same_start("decay")
    assert same_start("position")


# -- exercise 5: a learned exit classifier ---------------------------------------------------


def auc(scores, labels):
    """The chance that a random positive scores above a random negative (ties count half)."""
    pos, neg = scores[labels], scores[~labels]
    above = (pos[:, None] > neg[None, :]).float() + 0.5 * (pos[:, None] == neg[None, :]).float()
    return above.mean().item()


def agreement(model, batch):
    """(scored positions, L - 1) bool: does layer l predict what the last layer predicts?"""
    pred = layer_predictions(model, batch.images, batch.src, batch.tgt_in)
    return (pred[..., :-1] == pred[..., -1:])[batch.tgt_mask]


def shapes_batches(tok, split, first, n, size=16):
    ds = ShapesDataset(split, "multi", image_size=32)
    return [collate([ds[first + size * k + i] for i in range(size)], tok) for k in range(n)]


@pytest.mark.exercise_5
def test_a_learned_exit_tells_which_layers_already_agree_with_the_last(trained, tok, monkeypatch):
    """Fitted on training batches of the trained tiny model, scored on validation ones: its
    values rank the layers whose prediction is already the last layer's above those whose is
    not at least as well as the confidence does."""
    fit = solution("fit_exit_classifier", 5)
    sig = fit(trained, shapes_batches(tok, "train", 5000, 4))
    assert isinstance(sig, Signal), "fit_exit_classifier returns a mue.Signal"
    monkeypatch.setitem(DEC_SIGNALS, "learned", sig)
    scores, conf, labels = [], [], []
    for b in shapes_batches(tok, "val", 0, 4):
        p = trained.profile(b.images, b.src, b.tgt_in)
        scores.append(p["dec_learned"][..., :-1][b.tgt_mask])
        conf.append(p["dec_confidence"][..., :-1][b.tgt_mask])
        labels.append(agreement(trained, b))
    scores, conf, labels = torch.cat(scores), torch.cat(conf), torch.cat(labels)
    assert sig.low <= scores.min() and scores.max() <= 1
    assert (~labels).sum() >= 10 and labels.sum() >= 10  # both kinds of layer, to rank
    assert auc(scores, labels) >= auc(conf, labels) - 0.01, (auc(scores, labels),
                                                             auc(conf, labels))


@pytest.mark.exercise_5
def test_a_learned_exit_passes_the_oracles(monkeypatch):
    """Fitted on the oracle tests' random model, on batches like theirs: the same checks as every
    registered signal."""
    fit = solution("fit_exit_classifier", 5)
    model = make_model(4)
    batches = []
    for seed in (60, 61):
        images, src = make_batch(seed=seed)
        g = torch.Generator().manual_seed(seed)
        targets = torch.randint(3, model.cfg.vocab_size, (8, 6), generator=g)
        tgt_in = torch.cat([torch.ones(8, 1, dtype=torch.long), targets[:, :-1]], 1)
        batches.append(Batch(images, src, make_prefix(seed=seed)[:, :1], tgt_in, targets,
                             src != 0, targets != 0, ["caption"] * 8, [[""]] * 8))
    monkeypatch.setitem(DEC_SIGNALS, "learned", fit(model, batches))
    check_cached_equals_slow_reference("learned", 4, True)
    check_batch_equals_one_by_one("learned", "constant", 3)


# -- exercise 6: distilling the last layer into the early ones -------------------------------


@pytest.mark.exercise_6
def test_distillation_is_the_layerwise_loss_at_zero_and_adds_to_it_above():
    distill = solution("distill_loss", 6)
    model = make_model(9)
    batch = teacher_batch(model.cfg)
    torch.testing.assert_close(distill(model, *batch, alpha=0.0), model(*batch)[1])
    assert distill(model, *batch, alpha=1.0) > model(*batch)[1] + 1e-4


@pytest.mark.exercise_6
def test_distillation_teaches_the_early_layers_without_moving_the_last():
    """The last layer is the teacher: the distillation term sends no gradient into what only it
    computes (its own decoder layer), and some into the layers below."""
    distill = solution("distill_loss", 6)
    model = make_model(9)
    batch = teacher_batch(model.cfg)
    extra = distill(model, *batch, alpha=1.0) - distill(model, *batch, alpha=0.0)
    last = torch.autograd.grad(extra, list(model.decoder[-1].parameters()), allow_unused=True,
                               retain_graph=True)
    first = torch.autograd.grad(extra, list(model.decoder[0].parameters()))
    assert all(g is None or g.abs().max() < 1e-6 for g in last)
    assert sum(g.abs().sum() for g in first) > 1e-4


@pytest.mark.exercise_6
def test_distillation_reads_scored_positions_only():
    distill = solution("distill_loss", 6)
    model = make_model(9)
    images, src, tgt_in, targets = teacher_batch(model.cfg)
    pad = torch.zeros(len(src), 3, dtype=torch.long)  # three more positions, all padding
    torch.testing.assert_close(
        distill(model, images, src, torch.cat([tgt_in, pad], 1), torch.cat([targets, pad], 1),
                alpha=1.0),
        distill(model, images, src, tgt_in, targets, alpha=1.0))


# -- exercise 7: token-level image exits -----------------------------------------------------


def slow_token_exits(model, images, tau):
    """One image at a time, every layer on every token: a token stops after the first layer (below
    the last) where the cosine between its own states after and before it is above tau. It then
    keeps that state, which the tokens still running go on reading as keys and values."""
    L, states, layers = len(model.encoder), [], []
    with torch.no_grad():
        for r in range(len(images)):
            h = model.embed_image(images[r:r + 1])  # (1, N, C)
            stopped = torch.zeros(h.shape[1], dtype=torch.bool)
            layer_of = torch.full((h.shape[1],), L)
            for l, layer in enumerate(model.encoder, start=1):
                h_new = torch.where(stopped[None, :, None], h, layer(h))
                if l < L and tau < 1:
                    stop = ~stopped & (F.cosine_similarity(h_new[0], h[0], dim=-1) > tau)
                    layer_of[stop], stopped = l, stopped | stop
                h = h_new
            states.append(h)
            layers.append(layer_of)
    return torch.cat(states), torch.stack(layers)


@pytest.mark.exercise_7
def test_token_exits_off_are_the_encoder_and_at_the_bottom_one_layer():
    encode = solution("encode_image_tokens", 7)
    model = make_model(2)
    images, _ = make_batch(seed=2)
    with torch.no_grad():
        x = model.embed_image(images)
        valid = torch.ones(x.shape[:2], dtype=torch.bool)
        full = model.run_encoder(x, valid, [("img", 1.0, valid)])[0]
        states, layers = encode(model, images, 1.0)
        torch.testing.assert_close(states, full, atol=1e-5, rtol=1e-5)
        assert layers.shape == x.shape[:2] and (layers == 4).all()
        states, layers = encode(model, images, -1.0)
        torch.testing.assert_close(states, model.encoder[0](x), atol=1e-5, rtol=1e-5)
        assert (layers == 1).all()


@pytest.mark.exercise_7
@pytest.mark.parametrize("q", [0.3, 0.6])
def test_token_exits_equal_a_slow_reference(q):
    encode = solution("encode_image_tokens", 7)
    model = make_model(3)
    images, _ = make_batch(seed=3)
    with torch.no_grad():  # tau: a quantile of every token's cosine to the layer below it
        h, cos = model.embed_image(images), []
        for layer in model.encoder:
            h_new = layer(h)
            cos.append(F.cosine_similarity(h_new, h, dim=-1).flatten())
            h = h_new
        tau = torch.quantile(torch.cat(cos), q).item()
        states, layers = encode(model, images, tau)
    ref_states, ref_layers = slow_token_exits(model, images, tau)
    assert torch.equal(layers, ref_layers)  # (a tie within float noise of tau: unlikely)
    torch.testing.assert_close(states, ref_states, atol=1e-4, rtol=1e-4)
    assert len(set(layers.flatten().tolist())) > 2  # tokens of one image stop at several depths
