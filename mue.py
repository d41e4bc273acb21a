"""MuE: a unified vision-language encoder-decoder with multiple early exits.

Tang et al., "You Need Multiple Exiting: Dynamic Early Exiting for Accelerating Unified Vision
Language Model", CVPR 2023 (arXiv 2211.11152), on a compact OFA-style model:

    image --ResNet stem--> patch tokens --.
                                           >-- shared encoder layers --> memory --> decoder --> text
    prompt --embedding--> text tokens ----'

Sec. 3.1 modality decomposition (`MuE.encode`), Sec. 3.2 encoder exits (`MuE.run_encoder`),
Sec. 3.3 decoder exits per token (`MuE.generate`, `Decoding`), Sec. 3.4 the layer-wise loss
(`MuE.forward`). Read top to bottom: the configs; the exit signals, schedules and loss weights
(plain dicts, where a `--plugin` file adds a variant: docs/exercises.md); the layers; the model;
the decoding state; checkpoints and plugins. docs/reference.md ties each formula to the code.
"""

import importlib.util
import math
import os
import pickle
import sys
import tempfile
import traceback
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision


@dataclass
class MuEConfig:
    """The model. The defaults are the cpu preset that `python train.py` trains."""

    vocab_size: int = 128  # words, specials included (train.py sets it from the tokenizer)
    d_model: int = 128  # width of every token (C in the shape comments)
    n_heads: int = 4  # attention heads; must divide d_model
    d_ff: int = 256  # hidden width of the feed-forward blocks (why twice d_model: docs/results.md)
    n_enc_layers: int = 6  # encoder depth, shared by image and text (OFA-Base: 6)
    n_dec_layers: int = 6  # decoder depth; every layer can predict (OFA-Base: 6)
    image_size: int = 24  # pixels per side; 24 gives one patch token per shapes cell
    resnet: str = "resnet18"  # the torchvision ResNet whose stem and first stages embed the image
    resnet_stages: int = 2  # residual stages kept, 1-4 (24 px: 6x6, 3x3, 2x2, 1x1 patches)
    resnet_weights: str = ""  # a torchvision ImageNet state_dict file of yours; "" = random
    dropout: float = 0.0  # on embeddings, attention and residual branches (gpu preset: 0.1)
    max_src_len: int = 32  # longest prompt, in tokens
    max_tgt_len: int = 32  # longest decoder input: bos, prefix and target (eos scored after it)
    fusion: str = "decomposed"  # "decomposed": image and text apart (MuE) | "joint": one sequence
    loss_weights: str = "uniform"  # LOSS_WEIGHTS: "uniform" (the paper's) | "linear" | "last"
    enc_depth_sampling: float = 0.5  # beyond the paper (0 = the paper's): chance of an early stop
    enc_depth_modality: str = "each"  # "each" | "sample" | "both" | "text" | "image": sample_depths
    pad_id: int = 0  # padding token (ignored by attention and by the loss)
    bos_id: int = 1  # first decoder input
    eos_id: int = 2  # ends a generated sequence

    def __post_init__(self):
        _check_choice("fusion", self.fusion, ("decomposed", "joint"))
        _check_choice("loss_weights", self.loss_weights, LOSS_WEIGHTS, "LOSS_WEIGHTS")
        _check_choice("enc_depth_modality", self.enc_depth_modality,
                      ("both", "text", "image", "each", "sample"))
        if self.fusion == "joint" and self.enc_depth_modality in ("text", "image"):  # one depth
            raise ValueError(f"enc_depth_modality={self.enc_depth_modality!r} needs fusion "
                             f"'decomposed': a joint encoder stops image and text together")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if not 1 <= self.resnet_stages <= 4:
            raise ValueError(f"resnet_stages must be in 1..4, got {self.resnet_stages}")
        for name in ("vocab_size", "d_model", "d_ff", "n_enc_layers", "n_dec_layers",
                     "image_size", "max_src_len", "max_tgt_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not (0.0 <= self.dropout < 1.0 and 0.0 <= self.enc_depth_sampling <= 1.0):
            raise ValueError(f"need dropout in [0, 1) and enc_depth_sampling in [0, 1], got "
                             f"{self.dropout} and {self.enc_depth_sampling}")
        self.layer_weights()  # a plugin's weights are checked here, not at the first step

    def layer_weights(self) -> list[float]:
        """The layer-wise loss's weights (Sec. 3.4), normalised to sum to 1 (the paper sums the
        losses: with AdamW only the printed scale and where gradient clipping bites differ)."""
        n = self.n_dec_layers
        raw = [float(w) for w in LOSS_WEIGHTS[self.loss_weights](n)]
        if len(raw) != n or not all(w >= 0 for w in raw) or sum(raw) <= 0:  # NaN fails too
            raise ValueError(f"LOSS_WEIGHTS[{self.loss_weights!r}]({n}) gave {raw}: need {n} "
                             f"weights >= 0, not all 0")
        return [w / sum(raw) for w in raw]


@dataclass(frozen=True)
class ExitConfig:
    """When each part of the model stops (Sec. 3.2, 3.3): after the first layer whose signal is
    above the threshold, strictly; a threshold >= 1 never exits, whatever the schedule. The
    decoder's threshold at output position t of at most N is DEC_SCHEDULES[dec_schedule](self,
    t, N) (the paper: "decay" with theta=0.99, beta=0.95, tau=1)."""

    img_threshold: float = 1.0  # tau_img: the image stops after the layer whose signal > it
    txt_threshold: float = 1.0  # tau_txt: the same for the text
    dec_threshold: float = 1.0  # theta: a generated token stops after the layer whose signal > it
    dec_criterion: str = "confidence"  # the decoder's signal, a name in DEC_SIGNALS
    dec_schedule: str = "constant"  # Theta(t), a name in DEC_SCHEDULES
    dec_beta: float = 0.95  # beta of the decay schedule
    dec_tau: float = 1.0  # tau of the decay schedule (how fast it decays with t)
    enc_criterion: str = "cosine"  # the encoder's signal, a name in ENC_SIGNALS
    dec_min_layer: int = 1  # no decoder exit before this layer (1: the paper's; 2: beyond it)

    def __post_init__(self):
        if type(self.dec_min_layer) is not int or self.dec_min_layer < 1:
            raise ValueError(f"dec_min_layer must be an integer >= 1, got {self.dec_min_layer!r}")
        _check_choice("dec_criterion", self.dec_criterion, DEC_SIGNALS, "DEC_SIGNALS")
        _check_choice("dec_schedule", self.dec_schedule, DEC_SCHEDULES, "DEC_SCHEDULES")
        _check_choice("enc_criterion", self.enc_criterion, ENC_SIGNALS, "ENC_SIGNALS")
        enc_low, dec_low = ENC_SIGNALS[self.enc_criterion].low, DEC_SIGNALS[self.dec_criterion].low
        for name, low, high in (("img_threshold", enc_low, 1.0), ("txt_threshold", enc_low, 1.0),
                                ("dec_threshold", dec_low, 1.0), ("dec_beta", 0.0, 1.0),
                                ("dec_tau", 0.0, math.inf)):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not low <= value <= high:  # NaN fails too
                raise ValueError(f"{name} must be a number in [{low}, {high}], got {value!r}")
        if self.dec_threshold >= 1.0:  # a decoder that never exits has no first exit layer: one
            object.__setattr__(self, "dec_min_layer", 1)  # form, whatever was asked (frozen)

    def dec_threshold_at(self, t: int, n: int) -> float:
        """Theta(t) for output position t (0-based) of at most n generated tokens."""
        if self.dec_threshold >= 1.0:
            return self.dec_threshold
        return DEC_SCHEDULES[self.dec_schedule](self, t, n)


def _check_choice(name, value, choices, registry=None):
    if value not in choices:
        more = f" (mue.{registry}; a --plugin file can register more)" if registry else ""
        raise ValueError(f"{name} must be one of {tuple(choices)}{more}, got {value!r}")


# -- Exit signals, threshold schedules and loss weights: where to add a variant. Each dict maps
# a name (what ExitConfig, MuEConfig and the command lines take) to a function; a --plugin file
# adds one in a line (tests/exercises/entropy_exit.py), and the oracle tests grade it.


@dataclass(frozen=True)
class Signal:
    """An exit signal. Higher means readier: a layer exits when signal > threshold (strict), and
    a threshold >= 1 never exits, so the values that matter lie in [low, 1)."""

    fn: Callable  # what it receives: see ENC_SIGNALS and DEC_SIGNALS
    low: float  # the lowest threshold that means anything; ExitConfig accepts [low, 1]
    head: bool = False  # decoder: fn reads the head's logits (generate computes them per layer)


def masked_cosine(a, b, mask=None):
    """Per-sample cosine between a and b, each flattened over its real tokens (the authors' code
    flattens the whole batch, padding included: meaningful only at batch size 1).
    a, b: (B, N, C); mask: (B, N) bool, True on real tokens, or None -> (B,) float32."""
    a, b = a.float(), b.float()
    if mask is not None:
        m = mask.unsqueeze(-1).float()
        a, b = a * m, b * m
    dot = (a * b).sum((1, 2))
    norms = a.square().sum((1, 2)) * b.square().sum((1, 2))
    return dot / norms.sqrt().clamp_min(1e-12)


# Encoder signals, per sample and modality: fn(h, prev, mask) -> (b,), h and prev the states after
# layer l and l-1 (b, N, C) (prev = the embeddings at l = 1), mask (b, N) True on the modality's
# real tokens. A row's value must not depend on the other rows.
ENC_SIGNALS = {"cosine": Signal(masked_cosine, low=-1.0)}


def confidence(h, prev, logits, layer, state):
    """The head's max softmax probability: how sure this layer's prediction is."""
    return logits.float().softmax(-1).amax(-1), None


def similarity(h, prev, logits, layer, state):
    """The cosine between the token's state after this layer and before it (the authors' code)."""
    return F.cosine_similarity(h.float(), prev.float(), dim=-1), None


# Decoder signals, per generated token: fn(h, prev, logits, layer, state) -> (signal, state).
# h, prev: (..., C) the token's state after and before decoder layer `layer` (1-based; prev = the
# token's embedding at layer 1); logits: (..., V) the head on h if the Signal says head=True, else
# None; state: None at the first layer read (ExitConfig.dec_min_layer; `profile` reads them all),
# then what fn returned at the layer before (a tensor (..., k) or None), for a signal with a memory
# across layers. The leading dims are (b,) tokens in `generate` and (B, T) positions in `profile`:
# compute along the last dim only, never write into h or prev, and never call .item() or print (a
# host sync per layer and token is what makes exits slow).
DEC_SIGNALS = {"confidence": Signal(confidence, low=0.0, head=True),
               "similarity": Signal(similarity, low=-1.0)}


def calm_decay(ex, t, n):
    """CALM's Theta(t) = beta * theta + (1 - beta) * exp(-tau * t / n): strictest at the first
    token, easier towards the budget n."""
    b = ex.dec_beta
    return b * ex.dec_threshold + (1 - b) * math.exp(-ex.dec_tau * t / n)


# Decoder threshold schedules: fn(ex: ExitConfig, t, n) -> Theta(t) for output position t (0-based)
# of at most n; only called with ex.dec_threshold < 1, and must then stay below 1.
DEC_SCHEDULES = {"constant": lambda ex, t, n: ex.dec_threshold, "decay": calm_decay}

# Layer-wise loss weights (Sec. 3.4): fn(n_layers) -> n raw weights >= 0, normalised to sum to 1.
LOSS_WEIGHTS = {"uniform": lambda n: [1.0] * n,  # the paper's
                "linear": lambda n: [float(l) for l in range(1, n + 1)],  # deeper layers count more
                "last": lambda n: [0.0] * (n - 1) + [1.0]}  # the ablation: no layer-wise loss


# -- Building blocks: pre-LN transformer layers on scaled_dot_product_attention.


class Attention(nn.Module):
    """Multi-head attention. Keys and values are projected apart from the queries, so that the
    decoder can fill the cache of a layer a token skipped (state propagation)."""

    def __init__(self, cfg: MuEConfig):
        super().__init__()
        self.n_heads, self.dropout = cfg.n_heads, cfg.dropout
        self.q = nn.Linear(cfg.d_model, cfg.d_model)
        self.kv = nn.Linear(cfg.d_model, 2 * cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def split_heads(self, x):  # (B, N, C) -> (B, H, N, C/H)
        B, N, C = x.shape
        return x.view(B, N, self.n_heads, C // self.n_heads).transpose(1, 2)

    def project_kv(self, y):  # (B, N, C) -> keys, values: (B, H, N, C/H) each
        k, v = self.kv(y).chunk(2, dim=-1)
        return self.split_heads(k), self.split_heads(v)

    def attend(self, x, k, v, mask=None, causal=False):
        """x: (B, M, C) queries; k, v: (B, H, N, C/H); mask: (B, 1, 1, N) bool, True = attend."""
        B, M, C = x.shape
        y = F.scaled_dot_product_attention(
            self.split_heads(self.q(x)), k, v, attn_mask=mask, is_causal=causal,
            dropout_p=self.dropout if self.training else 0.0)  # (B, H, M, C/H)
        return self.drop(self.out(y.transpose(1, 2).reshape(B, M, C)))

    def forward(self, x, y=None, mask=None, causal=False):  # self-attention when y is None
        k, v = self.project_kv(x if y is None else y)
        return self.attend(x, k, v, mask, causal)


class MLP(nn.Sequential):
    def __init__(self, cfg: MuEConfig):
        super().__init__(nn.Linear(cfg.d_model, cfg.d_ff), nn.GELU(),
                         nn.Linear(cfg.d_ff, cfg.d_model), nn.Dropout(cfg.dropout))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: MuEConfig):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(cfg.d_model), Attention(cfg)
        self.ln2, self.mlp = nn.LayerNorm(cfg.d_model), MLP(cfg)

    def forward(self, x, mask=None):  # x: (B, N, C), mask: (B, 1, 1, N) or None
        x = x + self.attn(self.ln1(x), mask=mask)
        return x + self.mlp(self.ln2(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: MuEConfig):
        super().__init__()
        self.ln1, self.self_attn = nn.LayerNorm(cfg.d_model), Attention(cfg)
        self.ln2, self.cross_attn = nn.LayerNorm(cfg.d_model), Attention(cfg)
        self.ln3, self.mlp = nn.LayerNorm(cfg.d_model), MLP(cfg)

    def forward(self, x, memory, mem_mask):
        """Teacher forcing. x: (B, T, C), memory: (B, M, C), mem_mask: (B, 1, 1, M)."""
        x = x + self.self_attn(self.ln1(x), causal=True)
        x = x + self.cross_attn(self.ln2(x), memory, mask=mem_mask)
        return x + self.mlp(self.ln3(x))

    def self_kv(self, x):  # (b, n, C) -> this layer's cache entries for tokens whose state is x
        return self.self_attn.project_kv(self.ln1(x))

    def step(self, x, cache, rows, slots, self_mask, cross_kv, mem_mask):
        """Decoding with a cache. x: (b, n, C), the tokens of batch rows `rows` (b,) at positions
        slots (b, n); cache: this layer's (keys, values), each (B, H, T_max, C/H), where their
        entries are written; self_mask (b, 1, n, K): which of the first K positions they see."""
        a = self.ln1(x)
        put(cache, rows, slots, *self.self_attn.project_kv(a))
        K = self_mask.shape[-1]
        k, v = (take(c[:, :, :K], rows) for c in cache)  # (b, H, K, C/H) each
        x = x + self.self_attn.attend(a, k, v, self_mask)
        x = x + self.cross_attn.attend(self.ln2(x), *cross_kv, mask=mem_mask)
        return x + self.mlp(self.ln3(x))


def to_device(t, device):
    # without waiting: a CPU index into a GPU tensor is copied by a blocking copy, a host sync
    # each time it indexes (docs/results.md, "One GPU")
    return t.to(device, non_blocking=True)


def indices(mask, device):  # (b,) bool on the host -> the indices of its True entries, on device
    return to_device(mask.nonzero().squeeze(1), device)


def take(t, rows):  # t[rows], with no copy while every batch row is still running
    return t if len(rows) == len(t) else t[rows]


def put(cache, rows, slots, k, v):
    """Write k, v: (b, H, n, C/H) into a layer's cache (keys, values), each (B, H, T_max, C/H),
    at batch rows `rows` (b,) and positions slots (b, n)."""
    cache[0][rows[:, None], :, slots] = k.transpose(1, 2)  # indexed: (b, n, H, C/H)
    cache[1][rows[:, None], :, slots] = v.transpose(1, 2)


# -- The model.


@dataclass
class Generation:
    """What `MuE.generate` returns. Layer counts are the layers each sample actually ran."""

    tokens: torch.Tensor  # (B, T) generated ids, eos included, pad_id after the end
    img_layers: torch.Tensor  # (B,) encoder layers run on the image tokens
    txt_layers: torch.Tensor  # (B,) encoder layers run on the text tokens
    dec_layers: torch.Tensor  # (B, T) decoder layers run for each token, 0 after the end
    logits: torch.Tensor | None = None  # (B, T, V) logits each token was read from, if asked


class MuE(nn.Module):
    def __init__(self, cfg: MuEConfig):
        super().__init__()
        self.cfg = cfg
        C = cfg.d_model
        # Image stem: a truncated torchvision ResNet (conv1, bn, relu, maxpool, first stages).
        resnet = getattr(torchvision.models, cfg.resnet)(weights=None)
        if cfg.resnet_weights:  # the user's own copy of torchvision's ImageNet weights
            state = torch.load(cfg.resnet_weights, map_location="cpu", weights_only=True)
            resnet.load_state_dict(state)
        stages = [resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4][:cfg.resnet_stages]
        self.stem = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool, *stages)
        with torch.no_grad():  # ask the stem what it makes of an image rather than do the sums
            probe = torch.zeros(1, 3, cfg.image_size, cfg.image_size)
            _, stem_ch, self.grid, _ = self.stem.eval()(probe).shape  # eval: leave BN stats be
        # channels-last: torch's CPU convolutions then take oneDNN's path, not the slow one, at
        # this size (docs/results.md, "Speed")
        self.stem.train().to(memory_format=torch.channels_last)
        self.img_proj = nn.Linear(stem_ch, C)
        self.img_row = nn.Parameter(torch.zeros(self.grid, 1, C))  # learned 2-D positions:
        self.img_col = nn.Parameter(torch.zeros(1, self.grid, C))  # row + column embeddings
        # Text: one embedding matrix for encoder input, decoder input and the tied LM head.
        self.tok_emb = nn.Embedding(cfg.vocab_size, C)
        self.src_pos = nn.Embedding(cfg.max_src_len, C)
        self.tgt_pos = nn.Embedding(cfg.max_tgt_len, C)
        self.type_emb = nn.Embedding(2, C)  # modality type: 0 image, 1 text
        self.drop = nn.Dropout(cfg.dropout)
        self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_enc_layers))
        self.enc_ln = nn.LayerNorm(C)
        self.decoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_dec_layers))
        self.dec_ln = nn.LayerNorm(C)  # shared by every decoder layer's prediction
        self._init_transformer()

    def _init_transformer(self):
        """Weights ~ N(0, 1/d_model), biases 0; the ResNet keeps torchvision's initialisation.
        (GPT-2's 0.02 left VE at chance at d = 128: docs/results.md, "Initialisation".)"""
        stem, std = set(self.stem.modules()), self.cfg.d_model ** -0.5
        for m in self.modules():
            if m in stem:
                continue
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.img_row, std=std)
        nn.init.normal_(self.img_col, std=std)

    # -- inputs ----------------------------------------------------------------------------------

    def check_inputs(self, images, src, tgt_in=None, targets=None):
        """Raise ValueError naming the argument that is wrong; return the batch size."""
        S = self.cfg.image_size
        if not torch.is_tensor(images) or images.dim() != 4 or not images.is_floating_point():
            raise ValueError(f"images must be a float tensor (B, 3, H, W), got "
                             f"{getattr(images, 'shape', type(images))}")
        if images.shape[1] != 3:
            raise ValueError(f"images must have 3 channels, got {images.shape[1]}")
        if tuple(images.shape[2:]) != (S, S):
            raise ValueError(f"images must be {S}x{S} (MuEConfig.image_size), got "
                             f"{tuple(images.shape[2:])}")
        B = images.shape[0]
        self.check_ids("src", src, B, self.cfg.max_src_len)
        for name, ids in (("tgt_in", tgt_in), ("targets", targets)):
            if ids is not None:
                self.check_ids(name, ids, B, self.cfg.max_tgt_len)
        if targets is not None and targets.shape != tgt_in.shape:
            raise ValueError(f"targets shape {tuple(targets.shape)} != tgt_in shape "
                             f"{tuple(tgt_in.shape)}")
        if (src == self.cfg.pad_id).all(1).any():
            raise ValueError("src has a row made only of padding")
        return B

    def check_ids(self, name, ids, B, max_len):
        """Token ids (B, 1..max_len) long, inside the vocabulary; ValueError naming `name`."""
        if not torch.is_tensor(ids) or ids.dim() != 2 or ids.dtype != torch.long:
            raise ValueError(f"{name} must be a (B, L) long tensor, got "
                             f"{getattr(ids, 'dtype', type(ids))} {getattr(ids, 'shape', '')}")
        if ids.shape[0] != B:
            raise ValueError(f"{name} has batch size {ids.shape[0]} but images has {B}")
        if not 1 <= ids.shape[1] <= max_len:
            raise ValueError(f"{name} has length {ids.shape[1]}, allowed 1..{max_len}")
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.cfg.vocab_size):
            raise ValueError(f"{name} holds token ids outside [0, {self.cfg.vocab_size})")

    def embed_image(self, images):  # (B, 3, S, S) -> (B, G*G, C)
        f = self.stem(images.contiguous(memory_format=torch.channels_last))  # (B, C_stem, G, G)
        f = f.flatten(2).transpose(1, 2)  # (B, G*G, C_stem)
        pos = (self.img_row + self.img_col).flatten(0, 1)  # (G*G, C)
        return self.drop(self.img_proj(f) + pos + self.type_emb.weight[0])

    def embed_text(self, src):  # (B, S) -> (B, S, C)
        pos = self.src_pos(torch.arange(src.shape[1], device=src.device))
        return self.drop(self.tok_emb(src) + pos + self.type_emb.weight[1])

    def head(self, h):  # (..., C) -> (..., V): shared final LayerNorm, then the tied embedding
        return F.linear(self.dec_ln(h), self.tok_emb.weight)

    # -- encoder with exits (Sec. 3.1, 3.2) ------------------------------------------------------

    def run_encoder(self, x, valid, rules, signal, trace=None, depth=None):
        """The encoder layers on x: (B, N, C), valid: (B, N) True on real tokens. rules: [(name,
        tau, token mask (B, N))]; a sample exits after layer l when signal(h_l, h_{l-1}, mask) >
        tau for every rule (one per modality; both on the joint sequence), and leaves the working
        set. trace: collects every layer's signals per rule name. depth: run only that many, an
        int or a (B,) long tensor of each sample's own (training: a sample leaves at its depth).
        -> the states (B, N, C), each sample's from its exit layer, and the layers run (B,)."""
        B = x.shape[0]
        stops = depth.cpu() if torch.is_tensor(depth) else None  # (b,) host, compacted with h
        if stops is not None:
            depth = int(stops.max())  # the deepest sample's
        L = len(self.encoder) if depth is None else depth
        layers = torch.full((B,), L, dtype=torch.long, device=x.device)
        can_exit = all(tau < 1.0 for _, tau, _ in rules)
        mask = None if valid.all() else valid[:, None, None, :]  # (B, 1, 1, N)
        out, rows, h = None, torch.arange(B, device=x.device), x
        # compacted with h, like mask; None where every token is real (no masking to do)
        token_masks = [None if mask is None and m is valid else m for _, _, m in rules]
        # zip, not self.encoder[:L]: slicing a ModuleList builds a new module on every call
        for l, layer in zip(range(1, L + 1), self.encoder, strict=False):
            h_new, early = layer(h, mask), l < L  # leaving after the last layer changes nothing
            done = stops == l if stops is not None and early else None  # (b,) host: at its depth
            if (can_exit and early) or trace is not None:
                passed = None  # (b,): every rule's signal above its tau
                for (name, tau, _), m in zip(rules, token_masks, strict=True):
                    s = signal(h_new, h, m)  # (b,)
                    passed = s > tau if passed is None else passed & (s > tau)
                    if trace is not None:
                        trace[name].append(s)
                if can_exit and early:  # the layer's one host sync: who leaves, for the compaction
                    passed = passed.cpu()
                    done = passed if done is None else done | passed
            if done is not None and done.any():
                if done.all():  # the last rows leave together: no compaction, the
                    layers[rows], h = l, h_new  # epilogue below writes them
                    break
                out = x.clone() if out is None else out
                stay = ~done  # (b,) host
                leave, keep = indices(done, x.device), indices(stay, x.device)
                out[rows[leave]], layers[rows[leave]] = h_new[leave], l
                rows, h_new = rows[keep], h_new[keep]
                mask = None if mask is None else mask[keep]
                token_masks = [m if m is None else m[keep] for m in token_masks]
                stops = None if stops is None else stops[stay]
            h = h_new
        if out is None:  # no row left before the others: the states are simply h
            return h, layers
        out[rows] = h
        return out, layers

    def encode(self, images, src, exit=None, trace=None, depths=(None, None)):
        """Memory for the decoder, LN([image ; text]), with its mask and the encoder layers run.
        exit=None runs every layer; depths (image, text) stops each encoder there (training).
        -> (B, M, C), (B, M) bool, (B,), (B,)"""
        ex = exit or ExitConfig()
        signal = ENC_SIGNALS[ex.enc_criterion].fn
        img, txt = self.embed_image(images), self.embed_text(src)
        img_valid = torch.ones(img.shape[:2], dtype=torch.bool, device=img.device)
        txt_valid = src != self.cfg.pad_id
        valid = torch.cat([img_valid, txt_valid], 1)  # (B, M)
        if self.cfg.fusion == "decomposed":
            img, img_layers = self.run_encoder(
                img, img_valid, [("img", ex.img_threshold, img_valid)], signal, trace, depths[0])
            txt, txt_layers = self.run_encoder(
                txt, txt_valid, [("txt", ex.txt_threshold, txt_valid)], signal, trace, depths[1])
            h = torch.cat([img, txt], 1)
        else:  # joint: one sequence with cross-modal attention, so one depth for both modalities
            is_img = torch.zeros_like(valid)
            is_img[:, :img.shape[1]] = True
            rules = [("img", ex.img_threshold, is_img), ("txt", ex.txt_threshold, valid & ~is_img)]
            h, img_layers = self.run_encoder(torch.cat([img, txt], 1), valid, rules, signal,
                                             trace, depths[0])
            txt_layers = img_layers
        return self.enc_ln(h), valid, img_layers, txt_layers

    # -- training: teacher forcing and the layer-wise loss (Sec. 3.4) ---------------------------

    def forward(self, images, src, tgt_in, targets=None):
        """Teacher forcing with every layer. images: (B, 3, S, S), src: (B, S_src), tgt_in and
        targets: (B, T). Returns the last layer's logits (B, T, V) and, given targets, the
        layer-wise loss sum_l w_l * CE(head(h_l), targets), pad_id ignored."""
        self.check_inputs(images, src, tgt_in, targets)
        memory, valid, _, _ = self.encode(images, src, depths=self.sample_depths(len(images)))
        mem_mask = valid[:, None, None, :]
        T = tgt_in.shape[1]
        x = self.drop(self.tok_emb(tgt_in) + self.tgt_pos(torch.arange(T, device=tgt_in.device)))
        loss, logits = None, None
        for layer, w in zip(self.decoder, self.cfg.layer_weights(), strict=True):
            x = layer(x, memory, mem_mask)
            logits = None
            if targets is not None and w > 0:  # a layer with weight 0 never needs its logits
                logits = self.head(x)  # (B, T, V)
                ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                                     ignore_index=self.cfg.pad_id)
                loss = w * ce if loss is None else loss + w * ce
        return (self.head(x) if logits is None else logits), loss

    def sample_depths(self, B: int) -> tuple:
        """Beyond the paper (LayerSkip-style): a training batch of B stops its encoders at depths
        drawn from 1..L, so that the decoder learns the states an encoder exit hands it. With
        enc_depth_modality "each" every encoder stops on its own draw, with chance
        enc_depth_sampling (why: docs/results.md, "Encoder depth sampling"); with "sample" every
        sample's every encoder does; with "both" a batch stops the two at once, with "text" or
        "image" that one alone, with that chance.
        -> (image depth, text depth), None where the encoder runs every layer; with "sample"
        two (B,) long tensors on the host, L where a sample runs every layer"""
        p, L, modality = self.cfg.enc_depth_sampling, len(self.encoder), self.cfg.enc_depth_modality
        if not self.training or p == 0:
            return None, None
        if modality == "sample":  # the image's draws, then the text's; run_encoder reads them on
            # the host, so that a sample leaving at its depth costs the GPU no sync
            return tuple(torch.where(torch.rand(B) < p, torch.randint(1, L + 1, (B,)), L)
                         for _ in range(2))

        def depth():  # uniform in 1..L
            return int(torch.randint(1, L + 1, ()).item())
        if modality == "each":  # the image's draw, then the text's, each with chance p
            return tuple(depth() if torch.rand(()).item() < p else None for _ in range(2))
        if torch.rand(()).item() >= p:
            return None, None
        if modality == "both":
            return tuple(torch.randint(1, L + 1, (2,)).tolist())
        d = depth()
        return (None, d) if modality == "text" else (d, None)

    # -- generation with exits (Sec. 3.3) --------------------------------------------------------

    @torch.inference_mode()
    def generate(self, images, src, max_new_tokens, exit=None, return_logits=False, prefix=None):
        """Greedy decoding with MuE's exits; exit=None (or every threshold 1.0) is the full model.
        prefix: (B, P) long, right-padded: bos, then for VE the prompt (OFA's prev_output); None
        = bos. Step 0 reads each row's prefix in one pass, which leaves the decoder with the token
        it predicts; each later step reads one token. dec_layers counts per generated token."""
        if self.training:
            raise RuntimeError("call model.eval() before generate: dropout and batch-norm "
                               "statistics would make the output depend on chance and the batch")
        B = self.check_inputs(images, src)
        ex, cfg = exit or ExitConfig(), self.cfg
        if exit is not None and not isinstance(exit, ExitConfig):
            raise ValueError(f"exit must be an ExitConfig or None, got {type(exit).__name__}")
        if prefix is None:
            prefix = torch.full((B, 1), cfg.bos_id, dtype=torch.long, device=images.device)
        real = self.check_prefix(prefix, B)  # (B, P) bool
        S, P = max_new_tokens, prefix.shape[1]
        if not isinstance(S, int) or not 1 <= S <= cfg.max_tgt_len - (P - 1):
            raise ValueError(f"max_new_tokens must be an int in 1..{cfg.max_tgt_len - (P - 1)} "
                             f"(MuEConfig.max_tgt_len {cfg.max_tgt_len} less the prefix's "
                             f"{P - 1} tokens after bos), got {S!r}")
        memory, valid, img_layers, txt_layers = self.encode(images, src, ex)
        d = Decoding(self, memory, valid, real, S, return_logits)
        x = self.tok_emb(prefix) + self.tgt_pos.weight[:P]  # step 0 reads the prefix: (B, P, C)
        for s in range(S):
            d.step(x, s, ex)
            # the step's host sync: rows that wrote eos are finished
            going = (d.tokens[:, s] != cfg.eos_id).cpu()[d.alive]  # (b,)
            if not going.any():
                break
            d.alive = d.alive[going]
            if s + 1 < S:  # the next step reads the token each row just generated
                rows = to_device(d.alive, images.device)
                pos = to_device(d.first[d.alive] + s + 1, images.device)
                x = (self.tok_emb(d.tokens[rows, s]) + self.tgt_pos(pos))[:, None]  # (b, 1, C)
        n = s + 1  # steps taken
        return Generation(d.tokens[:, :n], img_layers, txt_layers, d.layers[:, :n],
                          None if d.logits is None else d.logits[:, :n])

    def check_prefix(self, prefix, B):
        """-> (B, P) bool, True on the prefix's real tokens. Raises ValueError naming the fault."""
        self.check_ids("prefix", prefix, B, self.cfg.max_tgt_len)
        real = prefix != self.cfg.pad_id
        if not real[:, 0].all() or (real[:, 1:] & ~real[:, :-1]).any():
            raise ValueError("each prefix row must be real tokens then padding only (bos first)")
        return real

    # -- diagnostics and baselines ---------------------------------------------------------------

    @torch.inference_mode()
    def profile(self, images, src, tgt_in, enc_criterion="cosine"):
        """Every layer's exit signals with nothing skipped (the paper's Fig. 3), teacher-forced.
        -> dict: "img", "txt": (B, L_enc) the encoder signal ENC_SIGNALS[enc_criterion] of each
        layer (per modality on the joint sequence when fusion="joint"); f"dec_{name}" for every
        name in DEC_SIGNALS: (B, T, L_dec), that signal at every target position and layer."""
        self.check_inputs(images, src, tgt_in)
        trace = {"img": [], "txt": []}
        memory, valid, _, _ = self.encode(images, src, ExitConfig(enc_criterion=enc_criterion),
                                          trace)
        mem_mask = valid[:, None, None, :]
        T = tgt_in.shape[1]
        x = self.tok_emb(tgt_in) + self.tgt_pos(torch.arange(T, device=tgt_in.device))
        dec = {name: [] for name in DEC_SIGNALS}
        state = dict.fromkeys(DEC_SIGNALS)  # each signal's memory across layers
        for l, layer in enumerate(self.decoder, start=1):
            x_new = layer(x, memory, mem_mask)
            logits = self.head(x_new) if any(s.head for s in DEC_SIGNALS.values()) else None
            for name, sig in DEC_SIGNALS.items():
                value, state[name] = sig.fn(x_new, x, logits if sig.head else None, l, state[name])
                dec[name].append(value.float())  # (B, T)
            x = x_new
        return {"img": torch.stack(trace["img"], 1), "txt": torch.stack(trace["txt"], 1),
                **{f"dec_{name}": torch.stack(v, -1) for name, v in dec.items()}}

    def truncated(self, n_enc: int, n_dec: int) -> "MuE":
        """A static shallow model: a copy of the first n_enc encoder and n_dec decoder layers,
        predicting through the same final LN and head (the paper's OFA-Tiny-style baseline)."""
        if not (1 <= n_enc <= self.cfg.n_enc_layers and 1 <= n_dec <= self.cfg.n_dec_layers):
            raise ValueError(f"truncated({n_enc}, {n_dec}) is outside the model's "
                             f"{self.cfg.n_enc_layers} + {self.cfg.n_dec_layers} layers")
        cfg = replace(self.cfg, n_enc_layers=n_enc, n_dec_layers=n_dec, resnet_weights="")
        shallow = MuE(cfg).to(self.tok_emb.weight.device)
        mine = self.state_dict()
        shallow.load_state_dict({k: mine[k] for k in shallow.state_dict()})
        return shallow.train(self.training)


class Decoding:
    """One batched greedy decode with exits (Sec. 3.3), the state `MuE.generate` drives. After
    each layer (from ex.dec_min_layer on), a row whose signal beats Theta(s) predicts from that
    layer and leaves the working set. A token that left at layer k keeps its exit state; when a
    later token first reads a deeper layer, its keys and values there are computed from that
    state (CALM's state propagation, on demand: layers no later token reaches cost nothing).
    The bookkeeping lives on the host (row indices, positions, what is cached), which each
    layer's exit decision reaches anyway; an index goes to the device once, without waiting,
    where it indexes there."""

    def __init__(self, model, memory, valid, real, n_new, return_logits):
        B, P = real.shape
        cfg, L, T, H = model.cfg, len(model.decoder), P - 1 + n_new, model.cfg.n_heads
        self.model, self.n_new, self.memory = model, n_new, memory
        self.mem_mask = valid[:, None, None, :]  # (B, 1, 1, M)
        # Self-attention caches, per layer (keys, values), each (B, H, T, C/H); cached[j] (B,):
        # each row's positions below it are in layer j's cache (the rest skipped the layer).
        shape = (B, H, T, cfg.d_model // H)
        self.caches = [(memory.new_zeros(shape), memory.new_zeros(shape)) for _ in range(L)]
        self.cached = [torch.zeros(B, dtype=torch.long) for _ in range(L)]
        self.exit_h = memory.new_zeros(B, T, cfg.d_model)  # each token's state where it exited
        # Cross-attention keys and values of the memory, per layer, computed when a row first
        # reaches the layer: a row whose tokens all exit by layer k never pays for the deeper ones.
        self.cross_kv = [None] * L  # per layer: (keys, values), each (B, H, M, C/H)
        self.have = [torch.zeros(B, dtype=torch.bool) for _ in range(L)]  # (B,) rows computed
        self.first = real.sum(1).cpu() - 1  # (B,) each row's last prefix position, which
        # predicts its first new token
        self.alive = torch.arange(B)  # rows still generating
        self.tokens = torch.full((B, n_new), cfg.pad_id, dtype=torch.long, device=memory.device)
        self.layers = torch.zeros_like(self.tokens)  # decoder layers run per token
        self.logits = memory.new_zeros(B, n_new, cfg.vocab_size) if return_logits else None

    def step(self, x, s, ex):
        """Step s for the rows in self.alive: x (b, n, C) is what they read, each row's whole
        prefix at s = 0 and its last generated token after. Each row emits token s."""
        decoder, signal = self.model.decoder, DEC_SIGNALS[ex.dec_criterion]
        theta = ex.dec_threshold_at(s, self.n_new)
        rows, n = self.alive, x.shape[1]  # on the host
        start = self.first[rows] + s if s else torch.zeros_like(rows)  # (b,) x's first position
        slots = start[:, None] + torch.arange(n)  # (b, n) positions of x
        at = self.first[rows] + s - start  # (b,) where in x each row's predicting token is
        K = int(self.first[rows].max()) + s + 1 if s else n  # cache positions anyone attends to
        self_mask = (torch.arange(K) <= slots[:, :, None])[:, None]  # (b, 1, n, K) causal
        # the same on the device: r, slots, at, self_mask
        r, slots, at, self_mask = (to_device(t, x.device) for t in (rows, slots, at, self_mask))
        mem_mask = take(self.mem_mask, r)  # (b, 1, 1, M)
        h, state = x, None  # state: what the signal carries from a layer to the next
        for j, layer in enumerate(decoder):
            if ex.dec_threshold < 1.0:  # else no token ever skips a layer
                self.propagate(j, rows, s)
            h_new = layer.step(h, self.caches[j], r, slots, self_mask, self.cross(j, rows, r),
                               mem_mask)  # (b, n, C)
            if j == len(decoder) - 1:  # the last layer predicts for every row still here
                self.emit(r, self.model.head(pick(h_new, at)), s, j + 1)
                return
            if theta < 1.0 and j + 1 >= ex.dec_min_layer:
                now = pick(h_new, at)  # (b, C)
                logits = self.model.head(now) if signal.head else None  # (b, V)
                value, state = signal.fn(now, pick(h, at), logits, j + 1, state)
                done = (value > theta).cpu()  # (b,): the layer's host sync, for the compaction
                if done.any():
                    e = slice(None) if done.all() else indices(done, x.device)  # all: views
                    self.emit(r[e], self.model.head(now[e]) if logits is None else logits[e],
                              s, j + 1)
                    if s + 1 < self.n_new:  # a later step may read the exit states
                        self.exit_h[r[e][:, None], slots[e]] = h_new[e]  # (e, n, C)
                    if done.all():
                        return
                    rows, keep = rows[~done], indices(~done, x.device)  # host, device
                    h_new, r, slots, at = h_new[keep], r[keep], slots[keep], at[keep]
                    mem_mask, self_mask = mem_mask[keep], self_mask[keep]
                    state = None if state is None else state[keep]
            h = h_new

    def propagate(self, j, rows, s):
        """Before rows read layer j's cache at step s, write the entries of their earlier tokens
        that skipped layer j, from their exit states. Then mark this step's tokens as cached:
        layer j writes them itself."""
        lo, top = self.cached[j][rows], self.first[rows] + s  # (b,) each: top = this step's slot
        self.cached[j][rows] = top + 1
        if s and (top > lo).any():  # step 0 reads the prefix: nothing before it
            pos = torch.arange(int(top.max()))
            r, p = ((pos >= lo[:, None]) & (pos < top[:, None])).nonzero(as_tuple=True)
            # (e,) each: one per missing (row, position), on the device
            r, p = (to_device(t, self.memory.device) for t in (rows[r], p))
            layer = self.model.decoder[j]
            put(self.caches[j], r, p[:, None], *layer.self_kv(self.exit_h[r, p][:, None]))

    def cross(self, j, rows, r):
        """Layer j's cross-attention keys and values of the memory, for batch rows `rows` (on the
        host; r: the same on the device)."""
        if self.cross_kv[j] is None:
            B, M, C = self.memory.shape
            shape = (B, self.model.cfg.n_heads, M, C // self.model.cfg.n_heads)
            self.cross_kv[j] = (self.memory.new_empty(shape), self.memory.new_empty(shape))
        missing = rows[~self.have[j][rows]]
        if len(missing):
            self.have[j][missing] = True
            missing = to_device(missing, self.memory.device)
            k, v = self.model.decoder[j].cross_attn.project_kv(self.memory[missing])
            self.cross_kv[j][0][missing], self.cross_kv[j][1][missing] = k, v
        return take(self.cross_kv[j][0], r), take(self.cross_kv[j][1], r)

    def emit(self, rows, logits, s, n_layers):  # rows emit token s, read after n_layers layers
        self.tokens[rows, s], self.layers[rows, s] = logits.argmax(-1), n_layers
        if self.logits is not None:
            self.logits[rows, s] = logits.float()


def pick(h, at):  # (b, n, C) -> (b, C): each row's state at its position `at` (b,)
    return h[:, 0] if h.shape[1] == 1 else h[torch.arange(len(at), device=h.device), at]


# -- Checkpoints: the weights, the config and plain data (tokenizer, step, thresholds, the
# plugins used), read with torch.load(weights_only=True), so loading one never runs code: a
# checkpoint names its plugins, and the user passes --plugin again.


def atomic_write(path, write):
    """write(file) into a temporary file beside path, then rename it: a crash mid-write never
    leaves a half-written file where a good one was."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def save_checkpoint(path, model: MuE, **extra):
    state = {"model": model.state_dict(), "config": asdict(model.cfg), **extra}
    atomic_write(path, lambda f: torch.save(state, f))


# Checkpoints written before a MuEConfig field existed were trained as these values train: a
# file from before 24ff36b sampled both encoders at once, one from before 8dd8edd none.
OLDER_FILES = {"enc_depth_sampling": 0.0, "enc_depth_modality": "both"}


def load_checkpoint(path, device="cpu"):
    """-> (model in eval mode, the checkpoint dict). ValueError says what is wrong with the file."""
    if os.path.isdir(path):
        raise ValueError(f"checkpoint {path!r} is a folder, not a checkpoint file (did you mean "
                         f"{os.path.join(path, 'ckpt.pt')}?)")
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path!r} does not exist")
    not_ours = f"{path!r} is not a checkpoint written by train.py"
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; a cut one has no end
        raise ValueError(f"{not_ours} (not a whole torch.save file)")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError):  # pickled objects, or not torch's archive
        raise ValueError(f"{not_ours} (torch.load(weights_only=True) refuses it)") from None
    if not isinstance(state, dict) or not {"model", "config"} <= state.keys():
        raise ValueError(f"checkpoint {path!r} is not a MuE checkpoint (no model and config)")
    known = {f.name for f in fields(MuEConfig)}
    if not set(state["config"]) <= known:
        raise ValueError(f"checkpoint {path!r} has config fields this MuEConfig does not know: "
                         f"{sorted(set(state['config']) - known)}")
    try:  # the stem's weights are in the file; a field newer than the file: OLDER_FILES
        cfg = MuEConfig(**{**OLDER_FILES, **state["config"], "resnet_weights": ""})
    except ValueError as e:  # loss weights of a plugin not loaded here, most likely
        raise ValueError(f"checkpoint {path!r}: {e}{made_with(state)}") from None
    model = MuE(cfg).to(device)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise ValueError(f"checkpoint {path!r} does not match its config: {e}") from e
    return model.eval(), state


def made_with(state) -> str:
    """The end of an error message about a name no registry knows: the files that knew it."""
    files = state.get("plugins") or []
    return f" (it was made with --plugin {' --plugin '.join(files)})" if files else ""


PLUGINS = {}  # absolute path -> module, for every file load_plugin ran in this process


def load_plugin(path):
    """Run a Python file of yours that registers signals, schedules or loss weights in the dicts
    at the top of this file. Each file runs once per process, however many times it is named.
    Any error comes back as a ValueError naming the file and line."""
    path = os.path.abspath(path)
    if path in PLUGINS:
        return PLUGINS[path]
    if not os.path.isfile(path):
        raise ValueError(f"plugin {path} does not exist")
    name = f"mue_plugin{len(PLUGINS)}_{os.path.splitext(os.path.basename(path))[0]}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up there
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # the file is the user's: say where it broke, in one line
        del sys.modules[name]
        lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if f.filename == path]
        line = e.lineno if isinstance(e, SyntaxError) else lines[-1] if lines else None
        where = f"{path}, line {line}" if line else path
        raise ValueError(f"plugin {where}: {type(e).__name__}: {e}") from e
    PLUGINS[path] = module
    return module
