"""Tests of mue.py: the exits against slow, obvious references, and the errors bad input gets.

The models here are tiny and random, with weights drawn wider than a fresh model's, so that
their exit signals spread across samples, layers and tokens and the thresholds have something
to separate. Everything runs on the CPU in float32, seeded.
"""

import functools
import inspect
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from conftest import registered

import mue
from mue import (DEC_SCHEDULES, DEC_SIGNALS, ENC_SIGNALS, LOSS_WEIGHTS, ExitConfig, MuE, MuEConfig,
                 Signal, load_checkpoint, masked_cosine, save_checkpoint)

TINY = dict(vocab_size=16, d_model=32, n_heads=2, d_ff=64, n_enc_layers=4, n_dec_layers=4,
            image_size=32, max_src_len=12, max_tgt_len=10, dropout=0.0)


def make_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = MuE(MuEConfig(**{**TINY, **overrides}))
    with torch.no_grad():  # spread the signals: a fresh model's are nearly alike everywhere
        for name, p in model.named_parameters():
            if not name.startswith("stem") and ".ln" not in name and not name.startswith(
                    ("enc_ln", "dec_ln")):
                p.normal_(0, 0.3)
    return model.eval()


def make_batch(B=8, seed=1, cfg=None, src_len=9):
    cfg = cfg or MuEConfig(**TINY)
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, 3, cfg.image_size, cfg.image_size, generator=g)
    src = torch.randint(3, cfg.vocab_size, (B, src_len), generator=g)
    for r in range(B):  # prompts of different lengths, so the batch carries padding
        src[r, 3 + r % (src_len - 3):] = cfg.pad_id
    return images, src


def make_prefix(B=8, seed=2, cfg=None, longest=5):
    """Decoder prefixes as VE has them (bos, then the prompt): lengths 1..longest, right-padded."""
    cfg = cfg or MuEConfig(**TINY)
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(3, cfg.vocab_size, (B, longest), generator=g)
    prefix[:, 0] = cfg.bos_id
    for r in range(B):
        prefix[r, 1 + r % longest:] = cfg.pad_id
    return prefix


def unpad(ids, r, pad=0):
    """Row r of a right-padded (B, N) tensor, alone and unpadded: (1, n)."""
    return ids[r:r + 1, :int((ids[r] != pad).sum())]


def ended(tokens, eos):
    """Number of tokens up to and including the first eos, per row (all of them if none)."""
    return [(row == eos).nonzero()[0].item() + 1 if (row == eos).any() else len(row)
            for row in tokens]


# -- oracle: exits off is the plain model ----------------------------------------------------


def slow_greedy(model, images, src, T, prefix=None):
    """Greedy decoding by re-running `forward` on everything read so far at every step."""
    seq = torch.full((images.shape[0], 1), model.cfg.bos_id) if prefix is None else prefix
    steps = []
    with torch.no_grad():
        for _ in range(T):
            logits = model(images, src, seq)[0][:, -1]  # (B, V)
            steps.append(logits)
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
    return seq[:, -T:], torch.stack(steps, 1)


@pytest.mark.parametrize("fusion", ["decomposed", "joint"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_exit_equals_greedy_forward(fusion, seed):
    model = make_model(seed, fusion=fusion)
    images, src = make_batch(seed=seed + 10)
    for exit in (None, ExitConfig()):  # None and all thresholds at 1.0 are the same thing
        gen = model.generate(images, src, 10, exit=exit, return_logits=True)
        tokens, logits = slow_greedy(model, images, src, 10)
        for r, n in enumerate(ended(tokens, model.cfg.eos_id)):
            assert torch.equal(gen.tokens[r, :n], tokens[r, :n])
            assert (gen.tokens[r, n:] == model.cfg.pad_id).all()
            torch.testing.assert_close(gen.logits[r, :n], logits[r, :n], atol=1e-5, rtol=1e-5)
            assert (gen.dec_layers[r, :n] == 4).all() and (gen.dec_layers[r, n:] == 0).all()
        assert (gen.img_layers == 4).all() and (gen.txt_layers == 4).all()


@pytest.mark.parametrize("seed", [0, 1])
def test_prefix_decoding_equals_greedy_forward(seed):
    """VE's decoder prompt (OFA's prev_output): each row reads its own prefix, then generates."""
    model = make_model(seed)
    images, src = make_batch(seed=seed + 40)
    prefix = make_prefix(seed=seed + 41)
    gen = model.generate(images, src, 5, prefix=prefix, return_logits=True)
    assert gen.tokens.shape[1] <= 5
    for r in range(8):
        tokens, logits = slow_greedy(model, images[r:r + 1], unpad(src, r), 5, unpad(prefix, r))
        n = ended(tokens, model.cfg.eos_id)[0]
        assert torch.equal(gen.tokens[r, :n], tokens[0, :n])
        torch.testing.assert_close(gen.logits[r, :n], logits[0, :n], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="max_new_tokens must be an int in 1..6"):
        model.generate(images, src, 7, prefix=prefix)  # 4 prefix slots after bos, of 10
    bad = prefix.clone()
    bad[0, 2:] = 5  # row 0 has bos alone: a token after its padding
    bad[0, 1] = 0
    with pytest.raises(ValueError, match="real tokens then padding"):
        model.generate(images, src, 3, prefix=bad)


# -- a slow reference for decoding with exits ------------------------------------------------
# The oracle tests below run for every name in mue's dicts (conftest.registered), the built-in
# ones, the worked example's and yours: a signal is graded by the same checks. Each check is a
# function so that test_the_oracles_fail_wrong_signals can show that it fails on a wrong one.

BUILT_IN = ("confidence", "similarity", "cosine")  # where the checks also assert their coverage


def slow_encoder_exit(model, x, tau, signal):
    """One sample alone, (1, N, C), no padding: run every layer, and keep the state of the first
    layer whose signal (fn(h_l, h_l-1, mask) on this sample only) is above tau."""
    h, mask = x, torch.ones(x.shape[:2], dtype=torch.bool)
    for l, layer in enumerate(model.encoder, start=1):
        h_new = layer(h)
        if tau < 1 and signal(h_new, h, mask).item() > tau:
            return h_new, l
        h = h_new
    return h, len(model.encoder)


def slow_generate(model, images, src, T, ex, prefix=None):
    """Decode one sample at a time with no cache: every step re-runs the decoder on all it has
    read, and a token that exited at layer e keeps its exit state as the input of every
    deeper layer, which is exactly what state propagation puts into those layers' caches.
    The prefix (bos and a prompt) runs the layers of the first token it predicts. The exit
    signals are the registered functions, called on this sample's states alone."""
    cfg, L = model.cfg, len(model.decoder)
    enc, dec = ENC_SIGNALS[ex.enc_criterion].fn, DEC_SIGNALS[ex.dec_criterion]
    out = []
    with torch.no_grad():
        for r in range(images.shape[0]):
            read = [cfg.bos_id] if prefix is None else unpad(prefix, r)[0].tolist()
            img, il = slow_encoder_exit(model, model.embed_image(images[r:r + 1]),
                                        ex.img_threshold, enc)
            txt, tl = slow_encoder_exit(model, model.embed_text(unpad(src, r)), ex.txt_threshold,
                                        enc)
            memory = model.enc_ln(torch.cat([img, txt], 1))
            mem_mask = torch.ones(1, 1, 1, memory.shape[1], dtype=torch.bool)
            exits, new, logits = [L] * (len(read) - 1), [], []  # exits: per position read
            for t in range(T):
                theta = ex.dec_threshold_at(t, T)
                ids = torch.tensor([read])
                x = model.tok_emb(ids) + model.tgt_pos(torch.arange(len(read)))
                state = None
                for j, layer in enumerate(model.decoder):
                    x_new = layer(x, memory, mem_mask)
                    frozen = torch.tensor([e <= j for e in exits] + [False])[None, :, None]
                    x_new = torch.where(frozen, x, x_new)
                    if j == L - 1:
                        break
                    if j + 1 >= ex.dec_min_layer:  # the signal is read from there on
                        now = x_new[:, -1]  # (1, C): the token that predicts, alone
                        signal, state = dec.fn(now, x[:, -1],
                                               model.head(now) if dec.head else None, j + 1, state)
                        if theta < 1 and signal.item() > theta:
                            break
                    x = x_new
                logits.append(model.head(x_new[0, -1]))
                token = logits[-1].argmax().item()
                # step 0 reads the whole prefix, which leaves the decoder with its prediction
                exits = exits + [j + 1] if t else [j + 1] * len(read)
                read.append(token)
                new.append(token)
                if token == cfg.eos_id:
                    break
            out.append((new, exits[-len(new):], il, tl, torch.stack(logits)))
    return out


def thresholds_that_split(model, images, src, criterion, prefix=None, enc="cosine"):
    """Thresholds at which the batch's exit layers differ across rows, picked from the signals
    of each sample alone (so a signal that reads the other rows shows it): near a quantile,
    halfway across the widest gap between neighbouring values there, so that float noise
    decides nothing."""
    if prefix is None:
        prefix = torch.full((len(src), 1), model.cfg.bos_id)
    gen = model.generate(images, src, 5, prefix=prefix)
    prof = [model.profile(images[r:r + 1], unpad(src, r), torch.cat(
        [unpad(prefix, r), gen.tokens[r:r + 1, :-1]], 1), enc) for r in range(len(src))]

    def mid(key, q):
        v = torch.cat([p[key][..., :-1].flatten() for p in prof]).unique()  # sorted
        if len(v) < 2:  # a constant signal: a threshold at its value never fires
            return v[0].item()
        i, w = int(q * (len(v) - 2)), max(1, len(v) // 10)
        lo, hi = max(0, i - w), min(len(v) - 1, i + w)
        k = lo + int((v[lo + 1:hi + 1] - v[lo:hi]).argmax())
        return ((v[k] + v[k + 1]) / 2).item()
    return ExitConfig(img_threshold=mid("img", 0.5), txt_threshold=mid("txt", 0.5),
                      dec_threshold=mid(f"dec_{criterion}", 0.6), dec_criterion=criterion,
                      enc_criterion=enc)


def untouched(check):
    """An oracle check that also hands its decoder and encoder signals (`criterion`, `enc`) only
    what they must leave as it was: after every call, the states, logits and the signal's own
    `state` memory are compared with copies taken before it, whether or not the output would
    show a write."""
    @functools.wraps(check)
    def run(*args, **kwargs):
        bound = inspect.signature(check).bind(*args, **kwargs)
        bound.apply_defaults()
        names = [(DEC_SIGNALS, bound.arguments["criterion"]), (ENC_SIGNALS, bound.arguments["enc"])]
        saved = [registry[name] for registry, name in names]

        def guarded(name, fn):
            def call(*inputs):
                before = [x.clone() if torch.is_tensor(x) else x for x in inputs]
                out = fn(*inputs)
                for x, y in zip(inputs, before, strict=True):
                    assert not torch.is_tensor(x) or torch.equal(x, y), (
                        f"signal {name!r} wrote into an input it was handed (in place)")
                return out
            return call
        try:
            for (registry, name), signal in zip(names, saved, strict=True):
                registry[name] = replace(signal, fn=guarded(name, signal.fn))
            return check(*args, **kwargs)
        finally:
            for (registry, name), signal in zip(names, saved, strict=True):
                registry[name] = signal
    return run


@untouched
def check_cached_equals_slow_reference(criterion, seed, with_prefix, enc="cosine", min_layer=1):
    model = make_model(seed)
    images, src = make_batch(seed=seed + 20)
    prefix = make_prefix(seed=seed + 21) if with_prefix else None
    ex = replace(thresholds_that_split(model, images, src, criterion, prefix, enc),
                 dec_min_layer=min_layer)
    T = 5 if with_prefix else 10
    gen = model.generate(images, src, T, exit=ex, prefix=prefix, return_logits=True)
    ref = slow_generate(model, images, src, T, ex, prefix)
    for r, (tokens, exits, il, tl, logits) in enumerate(ref):
        n = len(tokens)
        assert gen.tokens[r, :n].tolist() == tokens
        assert gen.dec_layers[r, :n].tolist() == exits
        torch.testing.assert_close(gen.logits[r, :n], logits, atol=1e-4, rtol=1e-4)
        assert (gen.dec_layers[r, n:] == 0).all()
        assert (gen.img_layers[r].item(), gen.txt_layers[r].item()) == (il, tl)
    if criterion in BUILT_IN and enc in BUILT_IN:  # the checks reach what they are about
        assert len(set(gen.dec_layers[gen.dec_layers > 0].tolist())) > 1, "split nothing"
        assert gen.dec_layers[gen.dec_layers > 0].min() >= min_layer
        if min_layer > 1 and criterion == "confidence":  # the rule bites: without it, a token
            # leaves before min_layer (similarity's layer 1, against the embedding, never does here)
            free = model.generate(images, src, T, exit=replace(ex, dec_min_layer=1), prefix=prefix)
            assert free.dec_layers[free.dec_layers > 0].min() < min_layer
        if with_prefix:  # a prompt that left early is read by a later token that goes deeper
            d = gen.dec_layers
            assert ((prefix != 0).sum(1).gt(1) & (d[:, 0] < 4) & (d[:, 1] > d[:, 0])).any()


@pytest.mark.parametrize("criterion", registered(DEC_SIGNALS))
@pytest.mark.parametrize("seed, with_prefix, min_layer", [(0, False, 1), (4, True, 1),
                                                         (6, True, 1), (6, True, 2)])
def test_cached_exits_equal_slow_reference(criterion, seed, with_prefix, min_layer):
    check_cached_equals_slow_reference(criterion, seed, with_prefix, min_layer=min_layer)


@pytest.mark.parametrize("enc", registered(ENC_SIGNALS))
def test_encoder_exits_equal_slow_reference(enc):
    check_cached_equals_slow_reference("confidence", 4, True, enc)


@untouched
def check_batch_equals_one_by_one(criterion, schedule, seed, enc="cosine", min_layer=1):
    model = make_model(seed)
    images, src = make_batch(B=8, seed=seed + 30)
    prefix = make_prefix(seed=seed + 31) if seed else None  # prompts of several lengths
    ex = replace(thresholds_that_split(model, images, src, criterion, prefix, enc),
                 dec_schedule=schedule, dec_min_layer=min_layer)
    gen = model.generate(images, src, 5, exit=ex, prefix=prefix)
    if criterion in BUILT_IN and enc in BUILT_IN:
        for name in ("img_layers", "txt_layers"):
            assert len(set(getattr(gen, name).tolist())) > 1, f"{name} equal in every row"
        assert len(set(gen.dec_layers[gen.dec_layers > 0].tolist())) > 1
    for r in range(8):
        one = model.generate(images[r:r + 1], unpad(src, r), 5, exit=ex,  # alone, no padding
                             prefix=None if prefix is None else unpad(prefix, r))
        n = one.tokens.shape[1]
        assert torch.equal(gen.tokens[r, :n], one.tokens[0])
        assert torch.equal(gen.dec_layers[r, :n], one.dec_layers[0])
        assert (gen.img_layers[r], gen.txt_layers[r]) == (one.img_layers[0], one.txt_layers[0])


@pytest.mark.parametrize("criterion", registered(DEC_SIGNALS))
@pytest.mark.parametrize("schedule, seed, min_layer", [("constant", 0, 1), ("decay", 3, 1),
                                                       ("decay", 3, 2)])
def test_batch_equals_one_by_one(criterion, schedule, seed, min_layer):
    check_batch_equals_one_by_one(criterion, schedule, seed, min_layer=min_layer)


@pytest.mark.parametrize("schedule", registered(DEC_SCHEDULES))
def test_batch_equals_one_by_one_with_every_schedule(schedule):
    check_batch_equals_one_by_one("confidence", schedule, 3)


@pytest.mark.parametrize("enc", registered(ENC_SIGNALS))
def test_batch_equals_one_by_one_with_every_encoder_signal(enc):
    check_batch_equals_one_by_one("similarity", "constant", 3, enc)


@untouched
def check_unreachable_thresholds_change_nothing(criterion, enc="cosine", seed=0):
    """Thresholds just above every value the signals take on the full model's own outputs: the
    signals run at every layer and never fire, so the output is the full model's (a signal
    that writes into the states it reads fails here)."""
    model = make_model(seed)
    images, src = make_batch(seed=seed + 50)
    tokens, logits = slow_greedy(model, images, src, 8)
    prof = model.profile(images, src, torch.cat([torch.ones(8, 1, dtype=torch.long),
                                                 tokens[:, :-1]], 1), enc)
    top = {k: prof[k][..., :-1].max().item() + 1e-3 for k in ("img", "txt", f"dec_{criterion}")}
    assert max(top.values()) < 1, (f"the signals reach {top} on these states: no threshold "
                                   f"below 1 is above them all, so this check cannot run")
    ex = ExitConfig(top["img"], top["txt"], top[f"dec_{criterion}"], criterion,
                    enc_criterion=enc)
    gen = model.generate(images, src, 8, exit=ex, return_logits=True)
    for r, n in enumerate(ended(tokens, model.cfg.eos_id)):
        assert torch.equal(gen.tokens[r, :n], tokens[r, :n])
        torch.testing.assert_close(gen.logits[r, :n], logits[r, :n], atol=1e-5, rtol=1e-5)
        assert (gen.dec_layers[r, :n] == 4).all()
    assert (gen.img_layers == 4).all() and (gen.txt_layers == 4).all()


@pytest.mark.parametrize("criterion", registered(DEC_SIGNALS))
def test_unreachable_decoder_threshold_is_the_full_model(criterion):
    check_unreachable_thresholds_change_nothing(criterion)


@pytest.mark.parametrize("enc", registered(ENC_SIGNALS))
def test_unreachable_encoder_thresholds_are_the_full_model(enc):
    check_unreachable_thresholds_change_nothing("similarity", enc)


# -- exits that must, or must not, happen ----------------------------------------------------


@pytest.mark.parametrize("criterion", registered(DEC_SIGNALS))
def test_lowest_decoder_threshold_exits_where_layer_one_says(criterion):
    """At the signal's lowest threshold every token runs at least one layer, and the first one
    leaves after layer 1 exactly where layer 1's signal is above that threshold."""
    model = make_model(4)
    images, src = make_batch(seed=4)
    low = DEC_SIGNALS[criterion].low
    gen = model.generate(images, src, 10, exit=ExitConfig(dec_threshold=low,
                                                          dec_criterion=criterion))
    for r, n in enumerate(ended(gen.tokens, model.cfg.eos_id)):
        assert (gen.dec_layers[r, :n] >= 1).all() and (gen.dec_layers[r, n:] == 0).all()
    first = model.profile(images, src, torch.ones(8, 1, dtype=torch.long))[f"dec_{criterion}"]
    assert torch.equal(gen.dec_layers[:, 0] == 1, first[:, 0, 0] > low)
    if criterion in BUILT_IN:  # confidence > 0 and cosine > -1: everything leaves at layer 1
        assert (gen.dec_layers[gen.dec_layers > 0] == 1).all()


@pytest.mark.parametrize("fusion", ["decomposed", "joint"])
@pytest.mark.parametrize("enc", registered(ENC_SIGNALS))
def test_lowest_encoder_thresholds_exit_where_layer_one_says(enc, fusion):
    model = make_model(4, fusion=fusion)
    images, src = make_batch(seed=4)
    low = ENC_SIGNALS[enc].low
    gen = model.generate(images, src, 1, exit=ExitConfig(low, low, enc_criterion=enc))
    prof = model.profile(images, src, torch.ones(8, 1, dtype=torch.long), enc)
    img, txt = prof["img"][:, 0] > low, prof["txt"][:, 0] > low
    if fusion == "joint":  # one sequence: it stops when both modalities' rules agree
        img = txt = img & txt
    assert torch.equal(gen.img_layers == 1, img) and torch.equal(gen.txt_layers == 1, txt)
    assert (gen.img_layers >= 1).all() and (gen.txt_layers >= 1).all()
    if enc in BUILT_IN:
        assert img.all() and txt.all()


def test_one_never_exits_even_with_decay():
    ex = ExitConfig(dec_threshold=1.0, dec_schedule="decay")
    assert ex.dec_threshold_at(9, 10) == 1.0
    ex = ExitConfig(dec_threshold=0.99, dec_schedule="decay", dec_beta=0.95, dec_tau=1.0)
    assert math.isclose(ex.dec_threshold_at(0, 10), 0.95 * 0.99 + 0.05)
    assert math.isclose(ex.dec_threshold_at(5, 10), 0.95 * 0.99 + 0.05 * math.exp(-0.5))


def rising(values, low):
    """Thresholds from low to 1 through quantiles of a signal's values."""
    qs = torch.quantile(values.flatten().float(), torch.linspace(0.1, 0.9, 5)).tolist()
    return sorted({low, 1.0, *(min(max(q, low), 1.0) for q in qs)})


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("enc", registered(ENC_SIGNALS))
def test_raising_an_encoder_threshold_never_exits_sooner(enc, seed):
    model = make_model(seed)
    images, src = make_batch(seed=seed)
    prof = model.profile(images, src, torch.ones(8, 1, dtype=torch.long), enc)
    last_img = last_txt = torch.zeros(8, dtype=torch.long)
    for tau in rising(torch.cat([prof["img"], prof["txt"]], 1), ENC_SIGNALS[enc].low):
        gen = model.generate(images, src, 1, exit=ExitConfig(tau, tau, enc_criterion=enc))
        assert (gen.img_layers >= last_img).all() and (gen.txt_layers >= last_txt).all()
        assert ((1 <= gen.img_layers) & (gen.img_layers <= 4)).all()
        last_img, last_txt = gen.img_layers, gen.txt_layers
    assert (last_img == 4).all() and (last_txt == 4).all()


@pytest.mark.parametrize("criterion", registered(DEC_SIGNALS))
def test_raising_the_decoder_threshold_never_exits_sooner(criterion):
    """For the first token, whose layers see the same states whatever the threshold (later
    tokens read what earlier ones said, which a threshold changes)."""
    model = make_model(5)
    images, src = make_batch(seed=5)
    prof = model.profile(images, src, torch.ones(8, 1, dtype=torch.long))[f"dec_{criterion}"]
    last = torch.zeros(8, dtype=torch.long)
    for theta in rising(prof[:, 0, :-1], DEC_SIGNALS[criterion].low):
        gen = model.generate(images, src, 1, exit=ExitConfig(dec_threshold=theta,
                                                             dec_criterion=criterion))
        assert (gen.dec_layers[:, 0] >= last).all()
        last = gen.dec_layers[:, 0]
    assert (last == 4).all()


# -- the oracles fail wrong signals ----------------------------------------------------------


def batchwise(h, prev, logits, layer, state):
    """Wrong on purpose: the confidence over the batch's largest, so rows depend on each other."""
    conf = logits.float().softmax(-1).amax(-1)
    return conf / conf.max(), None


def in_place(h, prev, logits, layer, state):
    """Wrong on purpose: it halves the state it reads, in place, before its cosine."""
    return F.cosine_similarity(h.mul_(0.5), prev, dim=-1), None


def counts_in_place(h, prev, logits, layer, state):
    """Wrong on purpose: a memory across layers, counted up in the tensor it was handed."""
    state = torch.zeros(h.shape[:-1] + (1,)) if state is None else state.add_(1)
    return (state[..., 0] + 1) / (state[..., 0] + 2), state


def authors_cosine(h, prev, mask):
    """The authors' encoder signal: one cosine over the whole batch flattened, padding and all."""
    return F.cosine_similarity(h.flatten().float(), prev.flatten().float(), 0).expand(len(h))


def test_the_oracles_fail_wrong_signals(monkeypatch):
    monkeypatch.setitem(DEC_SIGNALS, "batchwise", Signal(batchwise, low=0.0, head=True))
    monkeypatch.setitem(DEC_SIGNALS, "in_place", Signal(in_place, low=-1.0))
    monkeypatch.setitem(DEC_SIGNALS, "counts", Signal(counts_in_place, low=0.0))
    monkeypatch.setitem(ENC_SIGNALS, "authors", Signal(authors_cosine, low=-1.0))
    with pytest.raises(AssertionError):
        check_batch_equals_one_by_one("batchwise", "constant", 0)
    with pytest.raises(AssertionError):
        check_batch_equals_one_by_one("confidence", "constant", 3, "authors")
    with pytest.raises(AssertionError):
        check_unreachable_thresholds_change_nothing("in_place")
    for check in (check_batch_equals_one_by_one, check_cached_equals_slow_reference):
        with pytest.raises(AssertionError, match="'counts' wrote into an input"):
            check("counts", "constant" if check is check_batch_equals_one_by_one else 0, 0)


def test_joint_fusion_exits_both_modalities_together():
    model = make_model(5, fusion="joint")
    images, src = make_batch(seed=5)
    prof = model.profile(images, src, torch.full((8, 1), 1))
    ex = ExitConfig(prof["img"][:, 1].median().item(), -1.0)
    gen = model.generate(images, src, 3, exit=ex)
    assert torch.equal(gen.img_layers, gen.txt_layers)
    assert len(set(gen.img_layers.tolist())) > 1


def test_compaction_drops_exited_rows_from_deeper_layers():
    """Half the batch exits after layer 1; hooks on the layers count the rows each one gets."""
    model = make_model(6)
    images, src = make_batch(B=8, seed=6)
    prof = model.profile(images, src, torch.full((8, 1), 1))
    first = prof["img"][:, 0].sort().values  # layer-1 image cosines: split them 4 / 4
    ex = ExitConfig(img_threshold=((first[3] + first[4]) / 2).item())
    seen = {}
    hooks = [layer.register_forward_hook(lambda m, args, out, l=l: seen.setdefault(
        l, []).append(args[0].shape)) for l, layer in enumerate(model.encoder)]
    gen = model.generate(images, src, 1, exit=ex)
    n_img = model.grid ** 2
    rows = [[s[0] for s in seen[l] if s[1] == n_img] for l in range(4)]  # image passes only
    assert rows[0] == [8] and rows[1] == [4]
    for l in range(1, 4):  # every deeper layer gets exactly the rows that had not exited yet
        assert rows[l] == [int((gen.img_layers > l).sum())]
    for h in hooks:
        h.remove()

    # The decoder: hooks on each layer's feed-forward block see the working set of the step.
    tgt_in = torch.full((8, 1), model.cfg.bos_id)
    conf = model.profile(images, src, tgt_in)["dec_confidence"][:, 0, 0].sort().values
    ex = ExitConfig(dec_threshold=((conf[3] + conf[4]) / 2).item())
    seen = {}
    hooks = [layer.mlp.register_forward_hook(lambda m, args, out, l=l: seen.setdefault(
        l, []).append(args[0].shape[0])) for l, layer in enumerate(model.decoder)]
    gen = model.generate(images, src, 1, exit=ex)
    assert seen[0] == [8] and seen[1] == [4]
    for l in range(1, 4):
        assert seen.get(l, [0]) == [int((gen.dec_layers[:, 0] > l).sum())]
    for h in hooks:
        h.remove()


def test_lazy_cross_attention_cache_skips_layers_nobody_reaches():
    model = make_model(7)
    images, src = make_batch(seed=7)
    calls = []
    for l, layer in enumerate(model.decoder):
        layer.cross_attn.kv.register_forward_hook(lambda m, a, o, l=l: calls.append(l))
    model.generate(images, src, 10, exit=ExitConfig(dec_threshold=0.0))
    assert calls == [0]  # every token exits at layer 1: deeper memory projections never run


# -- the layer-wise loss ---------------------------------------------------------------------


def teacher_batch(cfg, B=4, T=7, seed=8):
    images, src = make_batch(B=B, seed=seed, cfg=cfg)
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(3, cfg.vocab_size, (B, T), generator=g)
    targets[1, 4:] = cfg.pad_id
    tgt_in = torch.cat([torch.full((B, 1), cfg.bos_id), targets[:, :-1]], 1)
    return images, src, tgt_in, targets


def test_last_layer_weights_are_plain_cross_entropy():
    model = make_model(8, loss_weights="last")
    images, src, tgt_in, targets = teacher_batch(model.cfg)
    logits, loss = model(images, src, tgt_in, targets)
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=0)
    torch.testing.assert_close(loss, ce)


BUILT_IN_WEIGHTS = {"uniform": [1.0] * 4, "linear": [1.0, 2.0, 3.0, 4.0], "last": [0, 0, 0, 1.0]}


@pytest.mark.parametrize("weights", registered(LOSS_WEIGHTS))
def test_layerwise_loss_is_the_weighted_sum_over_layers(weights):
    model = make_model(9, loss_weights=weights)
    images, src, tgt_in, targets = teacher_batch(model.cfg)
    _, loss = model(images, src, tgt_in, targets)
    memory, valid, _, _ = model.encode(images, src)
    x = model.tok_emb(tgt_in) + model.tgt_pos(torch.arange(tgt_in.shape[1]))
    per_layer = []
    for layer in model.decoder:
        x = layer(x, memory, valid[:, None, None, :])
        logp = model.head(x).log_softmax(-1).gather(-1, targets[..., None])[..., 0]
        real = targets != 0
        per_layer.append(-(logp * real).sum() / real.sum())
    w = torch.tensor(BUILT_IN_WEIGHTS.get(weights) or LOSS_WEIGHTS[weights](4))
    torch.testing.assert_close(loss, (torch.stack(per_layer) * w).sum() / w.sum())


def test_gradients_reach_the_stem_and_every_decoder_layer():
    model = make_model(10).train()
    images, src, tgt_in, targets = teacher_batch(model.cfg)
    model(images, src, tgt_in, targets)[1].backward()
    assert model.stem[0].weight.grad.abs().sum() > 0
    for l, layer in enumerate(model.decoder):
        assert layer.mlp[0].weight.grad.abs().sum() > 0, f"decoder layer {l + 1}"
    # With weights only on the last layer, layer-l heads still get gradient through the stack.
    assert model.decoder[0].self_attn.q.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("seed, modality", [(0, "both"), (1, "both"), (2, "text"), (3, "image"),
                                            (4, "each"), (5, "each")])
def test_depth_sampling_reads_each_encoder_at_its_drawn_depth(seed, modality):
    """The slow path: each modality through its first k layers by hand, then the decoder."""
    model = make_model(12 + seed, enc_depth_sampling=1.0, enc_depth_modality=modality).train()
    images, src, tgt_in, targets = teacher_batch(model.cfg, seed=seed)
    torch.manual_seed(seed)
    k_img, k_txt = model.sample_depths(4)
    torch.manual_seed(seed)
    logits, _ = model(images, src, tgt_in, targets)
    valid = src != 0
    img, txt = model.embed_image(images), model.embed_text(src)
    for layer in model.encoder[:k_img]:
        img = layer(img)
    for layer in model.encoder[:k_txt]:
        txt = layer(txt, valid[:, None, None, :])
    memory = model.enc_ln(torch.cat([img, txt], 1))
    mem_valid = torch.cat([torch.ones(img.shape[:2], dtype=torch.bool), valid], 1)
    x = model.tok_emb(tgt_in) + model.tgt_pos(torch.arange(tgt_in.shape[1]))
    for layer in model.decoder:
        x = layer(x, memory, mem_valid[:, None, None, :])
    torch.testing.assert_close(logits, model.head(x))


def test_depth_sampling_draws_every_depth_in_training_only():
    model = make_model(16, enc_depth_sampling=1.0).train()
    torch.manual_seed(0)
    drawn = {model.sample_depths(4) for _ in range(200)}
    assert drawn == {(a, b) for a in range(1, 5) for b in range(1, 5)}
    for modality, every in (("text", {(None, b) for b in range(1, 5)}),
                            ("image", {(a, None) for a in range(1, 5)}),
                            ("each", drawn)):  # at chance 1 each encoder is always stopped
        one = make_model(16, enc_depth_sampling=1.0, enc_depth_modality=modality).train()
        assert {one.sample_depths(4) for _ in range(100)} == every, modality
    each = make_model(16, enc_depth_sampling=0.5, enc_depth_modality="each").train()
    halves = [each.sample_depths(4) for _ in range(2000)]  # each encoder on its own coin
    assert {(a is None, b is None) for a, b in halves} == {(True, True), (True, False),
                                                           (False, True), (False, False)}
    for k in range(2):
        assert 900 < sum(d[k] is None for d in halves) < 1100, k
    assert model.eval().sample_depths(4) == (None, None)
    assert make_model(16, enc_depth_sampling=0.0).train().sample_depths(4) == (None, None)


@pytest.mark.parametrize("seed", range(4))
def test_depth_per_sample_equals_each_sample_alone_at_its_depth(seed):
    """Oracle for enc_depth_modality "sample": in a batch whose samples stop their encoders at
    their own depths (rows leave the working set), every sample gets the logits and gradients
    it gets alone with its two depths as ints (the path the test above checks by hand)."""
    model = make_model(20 + seed, enc_depth_sampling=0.7, enc_depth_modality="sample").train()
    model.stem.eval()  # BatchNorm's batch statistics would tie the samples together
    B = 6
    images, src, tgt_in, targets = teacher_batch(model.cfg, B=B, seed=seed)
    torch.manual_seed(seed)
    k_img, k_txt = model.sample_depths(B)
    assert len(set(k_img.tolist())) > 1 and len(set(k_txt.tolist())) > 1  # the rows do differ
    w = torch.randn(B, tgt_in.shape[1], model.cfg.vocab_size, generator=torch.Generator()
                    .manual_seed(seed))  # a fixed random direction for the gradients
    torch.manual_seed(seed)
    x = images.clone().requires_grad_(True)
    logits, _ = model(x, src, tgt_in, targets)
    (logits * w).sum().backward()
    batch_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    for i in range(B):
        model.sample_depths = lambda _B, i=i: (int(k_img[i]), int(k_txt[i]))
        xi = images[i:i + 1].clone().requires_grad_(True)
        logits_i, _ = model(xi, src[i:i + 1], tgt_in[i:i + 1], targets[i:i + 1])
        (logits_i * w[i:i + 1]).sum().backward()
        torch.testing.assert_close(logits_i[0], logits[i], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(xi.grad[0], x.grad[i], atol=1e-5, rtol=1e-4)
    for n, p in model.named_parameters():  # the batch's gradient is the sum of the samples'
        if n in batch_grads:
            torch.testing.assert_close(p.grad, batch_grads[n], atol=1e-4, rtol=1e-4, msg=n)


def test_depth_per_sample_draws_each_sample_and_encoder_on_its_own_coin():
    L, n = 4, 4000
    every = make_model(16, enc_depth_sampling=1.0, enc_depth_modality="sample").train()
    torch.manual_seed(0)
    img, txt = every.sample_depths(n)
    assert img.shape == txt.shape == (n,) and img.dtype == txt.dtype == torch.long
    pairs = set(zip(img.tolist(), txt.tolist(), strict=True))
    assert pairs == {(a, b) for a in range(1, L + 1) for b in range(1, L + 1)}
    half = make_model(16, enc_depth_sampling=0.5, enc_depth_modality="sample").train()
    img, txt = half.sample_depths(n)
    # a sample stops early with chance 0.5 * (L - 1) / L: 1500 expected, sd 27
    assert 1350 < (img < L).sum() < 1650 and 1350 < (txt < L).sum() < 1650
    assert 460 < ((img < L) & (txt < L)).sum() < 660  # independent coins: 562 expected, sd 22
    assert half.eval().sample_depths(n) == (None, None)


def test_truncated_model_shares_the_first_layers():
    model = make_model(11)
    images, src = make_batch(seed=11)
    shallow = model.truncated(2, 3)
    assert len(shallow.encoder) == 2 and len(shallow.decoder) == 3
    full_mem = model.encode(images, src, ExitConfig(-1.0, -1.0))[0]  # every sample stops at 1
    torch.testing.assert_close(model.truncated(1, 1).encode(images, src)[0], full_mem)
    gen = shallow.generate(images, src, 5)
    assert (gen.img_layers == 2).all() and gen.dec_layers.max() == 3


def test_masked_cosine_ignores_padding():
    a, b = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    b2 = b.clone()
    b2[0, 3:] = 100.0  # what padding holds must not matter
    s = masked_cosine(a, b2, mask)
    torch.testing.assert_close(s[0], F.cosine_similarity(a[0, :3].flatten(), b[0, :3].flatten(),
                                                         dim=0))
    torch.testing.assert_close(s[1], F.cosine_similarity(a[1].flatten(), b2[1].flatten(), dim=0))


# -- checkpoints -----------------------------------------------------------------------------


def test_checkpoint_round_trip_and_errors(tmp_path):
    model = make_model(13)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, model, step=7, exits={"ve": {"img_threshold": 0.5}})
    loaded, state = load_checkpoint(path)
    assert state["step"] == 7 and state["exits"]["ve"]["img_threshold"] == 0.5
    images, src = make_batch(seed=13)
    same = loaded.generate(images, src, 5).tokens == model.generate(images, src, 5).tokens
    assert same.all()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left

    good = path.read_bytes()  # a save that fails half-way leaves the old file as it was
    with pytest.raises(TypeError):
        save_checkpoint(path, model, step=object.__new__(type("Unpicklable", (), {
            "__reduce__": lambda self: (_ for _ in ()).throw(TypeError("no"))})))
    assert path.read_bytes() == good and len(list(tmp_path.iterdir())) == 1

    with pytest.raises(ValueError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "bad.pt").write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="not a checkpoint written by train.py"):
        load_checkpoint(tmp_path / "bad.pt")
    state = torch.load(path, weights_only=True)
    torch.save({**state, "config": {**state["config"], "d_model": 64}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="does not match its config"):
        load_checkpoint(tmp_path / "other.pt")
    torch.save({**state, "config": {**state["config"], "colour": 1}}, tmp_path / "new.pt")
    with pytest.raises(ValueError, match="colour"):
        load_checkpoint(tmp_path / "new.pt")


def test_a_checkpoint_older_than_a_field_loads_as_it_was_trained(tmp_path):
    """Files from before --enc-depth-modality sampled both encoders at once, and files from
    before --enc-depth-sampling sampled none: resuming them must not switch to today's default."""
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, make_model(13, enc_depth_sampling=0.3, enc_depth_modality="each"))
    state = torch.load(path, weights_only=True)
    config = {k: v for k, v in state["config"].items() if k != "enc_depth_modality"}
    torch.save({**state, "config": config}, tmp_path / "before_modality.pt")
    cfg = load_checkpoint(tmp_path / "before_modality.pt")[0].cfg
    assert (cfg.enc_depth_sampling, cfg.enc_depth_modality) == (0.3, "both")
    del config["enc_depth_sampling"]
    torch.save({**state, "config": config}, tmp_path / "before_sampling.pt")
    assert load_checkpoint(tmp_path / "before_sampling.pt")[0].cfg.enc_depth_sampling == 0.0
    cfg = load_checkpoint(path)[0].cfg  # a file that has the fields keeps them
    assert (cfg.enc_depth_sampling, cfg.enc_depth_modality) == (0.3, "each")


# -- bad input -------------------------------------------------------------------------------


def test_bad_inputs_name_the_argument():
    model = make_model(12)
    images, src = make_batch(B=4, seed=12)
    cases = [
        ((images[:3], src), "src has batch size"),
        ((images[:, :, :16, :16], src), "images must be 32x32"),
        ((images[:, :1], src), "images must have 3 channels"),
        ((images.long(), src), "images must be a float tensor"),
        ((images, src.clone().fill_(16)), "src holds token ids outside"),
        ((images, src - 5), "src holds token ids outside"),
        ((images, src.float()), "src must be a (B, L) long tensor"),
        ((images, torch.zeros_like(src)), "src has a row made only of padding"),
        ((images, torch.ones(4, 13, dtype=torch.long)), "src has length 13"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            model.generate(*args, 5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(images, src, 11)
    with pytest.raises(ValueError, match="exit must be an ExitConfig"):
        model.generate(images, src, 5, exit={"img_threshold": 0.5})
    tgt = torch.ones(4, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="tgt_in holds token ids outside"):
        model(images, src, tgt * 99)
    with pytest.raises(ValueError, match="targets shape"):
        model(images, src, tgt, tgt[:, :3])
    with pytest.raises(RuntimeError, match="model.eval"):
        model.train().generate(images, src, 5)


@pytest.mark.parametrize("kwargs, name", [
    (dict(img_threshold=float("nan")), "img_threshold"),
    (dict(txt_threshold=1.5), "txt_threshold"),
    (dict(img_threshold=-1.01), "img_threshold"),
    (dict(dec_threshold=-0.1), "dec_threshold"),
    (dict(dec_threshold=float("nan")), "dec_threshold"),
    (dict(dec_threshold="0.9"), "dec_threshold"),
    (dict(dec_min_layer=0), "dec_min_layer"),
    (dict(dec_min_layer=1.5), "dec_min_layer"),
    (dict(dec_criterion="nonsense"), "dec_criterion"),
    (dict(dec_schedule="linear"), "dec_schedule"),
    (dict(enc_criterion="nonsense"), "enc_criterion"),
    (dict(enc_criterion="cosine", img_threshold=-1.5), "img_threshold"),
    (dict(dec_criterion="similarity", dec_threshold=-1.5), "dec_threshold"),
    (dict(dec_beta=2.0), "dec_beta"),
])
def test_bad_exit_config_names_the_field(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ExitConfig(**kwargs)


@pytest.mark.parametrize("kwargs, name", [
    (dict(fusion="late"), "fusion"), (dict(loss_weights="geometric"), "loss_weights"),
    (dict(d_model=30, n_heads=4), "n_heads"), (dict(resnet_stages=5), "resnet_stages"),
    (dict(n_dec_layers=0), "n_dec_layers"), (dict(dropout=1.0), "dropout"),
    (dict(enc_depth_sampling=1.5), "enc_depth_sampling"),
    (dict(enc_depth_modality="audio"), "enc_depth_modality"),
    (dict(enc_depth_modality="text", fusion="joint"), "enc_depth_modality='text' needs fusion"),
])
def test_bad_model_config_names_the_field(kwargs, name):
    with pytest.raises(ValueError, match=name):
        MuEConfig(**kwargs)


def test_loss_weights_of_a_plugin_are_checked_when_the_config_is_made(monkeypatch):
    monkeypatch.setitem(LOSS_WEIGHTS, "short", lambda n: [1.0] * (n - 1))
    monkeypatch.setitem(LOSS_WEIGHTS, "negative", lambda n: [-1.0] + [1.0] * (n - 1))
    for name in ("short", "negative"):
        with pytest.raises(ValueError, match=rf"LOSS_WEIGHTS\['{name}'\]\(4\) gave"):
            MuEConfig(**{**TINY, "loss_weights": name})


# -- plugins ---------------------------------------------------------------------------------


def test_a_plugin_registers_names_once_and_its_errors_name_file_and_line(tmp_path, monkeypatch):
    monkeypatch.setattr(mue, "PLUGINS", {})  # this test's files only, forgotten afterwards
    monkeypatch.setitem(DEC_SIGNALS, "copy", None)  # restored (removed) after the test
    good = tmp_path / "mine.py"
    good.write_text("from mue import DEC_SIGNALS\n"
                    "DEC_SIGNALS['copy'] = DEC_SIGNALS['similarity']\n"
                    "RUNS = [1]\n")
    module = mue.load_plugin(good)
    assert DEC_SIGNALS["copy"] is DEC_SIGNALS["similarity"] and mue.PLUGINS == {str(good): module}
    module.RUNS.append(2)
    assert mue.load_plugin(str(tmp_path / ".." / tmp_path.name / "mine.py")).RUNS == [1, 2]
    ExitConfig(dec_criterion="copy", dec_threshold=-0.5)  # the new name, with its range
    (tmp_path / "typo.py").write_text("import math\n\nx = math.tau * undefined\n")
    (tmp_path / "syntax.py").write_text("def f(:\n")
    for name, message in (("typo.py", "typo.py, line 3: NameError: name 'undefined'"),
                          ("syntax.py", "syntax.py, line 1: SyntaxError"),
                          ("missing.py", "missing.py does not exist")):
        with pytest.raises(ValueError, match=f"plugin .*{message}"):
            mue.load_plugin(tmp_path / name)
    assert list(mue.PLUGINS) == [str(good)]
