r"""Worked example (README, "Exercises", exercise 0): an entropy exit for the decoder.

The whole solution is one function and the line that registers it, in a file of its own. Nothing
in mue.py, eval.py or train.py changes: ExitConfig(dec_criterion="entropy") accepts the name,
MuE.generate and MuE.profile compute it, eval.py calibrates, sweeps and draws it, and the oracle
tests of tests/test_mue.py grade it beside the built-in signals, since they run for every name in
mue.DEC_SIGNALS (tests/conftest.py loads this file for every test session).

    python eval.py --ckpt out/ckpt.pt --criterion entropy --sweep \
        --plugin tests/exercises/entropy_exit.py
    pytest -m exercise_0

A signal is higher when a layer is readier to exit, and a threshold >= 1 never exits; the entropy
H = -sum_v p_v log p_v is 0 when the head is sure and log V when it cannot choose, so the signal
turns it around and scales it: 1 - H / log V, in [0, 1].
"""

import math

from mue import DEC_SIGNALS, Signal


def entropy(h, prev, logits, layer, state):
    """1 - H(softmax(logits)) / log V over the last dim: 1 when sure, 0 when uniform."""
    logp = logits.float().log_softmax(-1)  # (..., V)
    h_p = -(logp.exp() * logp).sum(-1)  # (...,) in nats; exp(logp) * logp -> 0 as p -> 0
    return 1 - h_p / math.log(logits.shape[-1]), None


DEC_SIGNALS["entropy"] = Signal(entropy, low=0.0, head=True)  # reads the head's logits
