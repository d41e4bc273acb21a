"""Train MuE, then measure what its exits save.

    python train.py                          # the gpu preset with a CUDA GPU, else the cpu one
    python train.py --preset cpu             # the laptop run on the shapes world
    python train.py --resume --out out       # continue out/ckpt.pt with its own settings
    python train.py --task ve --steps 300 --lr 5e-4 --out out/ve
    python train.py --data coco --ann dataset_coco.json --images coco/images --preset gpu
    python train.py --plugin tests/exercises/entropy_exit.py --dec-criterion entropy  # a plugin
    torchrun --nproc_per_node=4 train.py --preset gpu   # DistributedDataParallel, a shard per rank

One run tells the paper's story: train with the layer-wise loss (Sec. 3.4: every decoder layer
learns to predict, all layers always run), calibrate the exit thresholds on val
(eval.calibrate), compare the full model with MuE on test (eval.compare). Rank 0 writes
<out>/ckpt.pt and <out>/report.json, atomically. Every field of MuEConfig and TrainConfig is a
flag (--batch-size or --batch_size; a true/false field alone is a switch). Step s's data and
noise depend only on (seed, s), so a resumed run gives the losses of the uninterrupted one.
"""

import argparse
import inspect
import math
import os
import re
import shlex
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from functools import partial

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

import data
from eval import (calibrate, check_calibration, check_device, check_output, compare,
                  format_table, pick_device, write_json)
from mue import (PLUGINS, ExitConfig, MuE, MuEConfig, load_checkpoint, load_plugin, made_with,
                 save_checkpoint)


@dataclass
class TrainConfig:
    """How to train. MuEConfig holds the model; `preset` picks defaults for both."""

    preset: str = "auto"  # "cpu" | "gpu" (PRESETS) | "auto": gpu when a CUDA GPU is used
    data: str = "shapes"  # "shapes" (built in, no download) | "coco" | "snli_ve"
    ann: str = ""  # coco: dataset_coco.json (Karpathy split); snli_ve: folder of the .jsonl files
    images: str = ""  # coco: the image folder; snli_ve: the Flickr30k image folder
    task: str = "multi"  # shapes: "multi" (both tasks) | "caption" | "ve"
    shapes: str = ""  # shapes: other settings of data.ShapesDataset, e.g. "max_objects=2"
    premise: bool = True  # snli_ve: the prompt reads the premise too (the authors' add-caption)
    min_count: int = 6  # real data: words seen fewer times in train read as <unk>
    steps: int = 3000  # optimizer steps
    batch_size: int = 32  # samples per step, over all ranks together
    lr: float = 1e-3  # peak learning rate of AdamW
    min_lr: float = 1e-4  # where the cosine decay ends
    warmup: int = 50  # steps of linear warm-up
    weight_decay: float = 0.05  # AdamW's, on linear and conv weights only
    grad_clip: float = 1.0  # maximum global gradient norm
    seed: int = 0  # data order, dropout, initial weights and the synthetic world
    device: str = ""  # "cpu" | "cuda" | "cuda:N"; "" = cuda if present, else cpu
    workers: int = 1  # data-loading processes per rank (0 = in the training process)
    log_every: int = 50  # steps between progress lines
    ckpt_every: int = 200  # steps between checkpoints (one is always written at the end)
    out: str = "out"  # folder for ckpt.pt and report.json
    resume: bool = False  # continue <out>/ckpt.pt instead of starting over
    force: bool = False  # start over even though <out>/ckpt.pt exists (it is replaced)
    report: bool = True  # after training: calibrate the exits, compare with the full model
    target: float = 0.99  # calibration keeps at least this fraction of full-model quality
    delta: float = 0.05  # the chance that calibration's promise fails: it holds with 1 - delta
    dec_min_layer: int = 2  # beyond the paper: 2nd calibration path, no decoder exit before it
    dec_criterion: str = "confidence"  # the report's decoder signal: "confidence" | "similarity"
    dec_schedule: str = "decay"  # the report's decoder threshold: "decay" (paper) | "constant"
    enc_criterion: str = "cosine"  # the report's encoder signal: "cosine"
    val_size: int = 4000  # validation samples for calibration (both tasks together, shapes)
    test_size: int = 1000  # test samples in the report (shapes: generated)


# Presets change defaults; a flag given on the command line always wins.
PRESETS = {
    "cpu": {},
    "gpu": dict(d_model=384, n_heads=6, d_ff=1536, n_enc_layers=8, n_dec_layers=8, dropout=0.1,
                image_size=96, resnet_stages=2,
                steps=4000, batch_size=256, lr=6e-4, min_lr=6e-5, warmup=300, workers=6,
                log_every=100, ckpt_every=1000, val_size=4000, test_size=2000),
}
MODEL_FIELDS = {f.name for f in fields(MuEConfig)}
DERIVED = {"vocab_size", "pad_id", "bos_id", "eos_id"}  # set from the tokenizer, not by flags
# What --resume lets a flag change; every other setting is the checkpoint's, given or not.
KEEP_ON_RESUME = {"steps", "device", "workers", "log_every", "ckpt_every", "out", "resume",
                  "force", "report", "target", "delta", "dec_min_layer", "val_size", "test_size",
                  "dec_criterion", "dec_schedule", "enc_criterion"}


def field_docs(cls) -> dict[str, str]:
    """Each field's comment in the dataclass's source, the one place a setting is documented."""
    return dict(re.findall(r"^ +(\w+): [^#\n]*  # (.*)$", inspect.getsource(cls), re.M))


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for cls in (MuEConfig, TrainConfig):
        docs = field_docs(cls)
        for f in fields(cls):
            if f.name in DERIVED:
                continue
            flags = [f"--{f.name.replace('_', '-')}"] + (
                [f"--{f.name}"] if "_" in f.name else [])
            kind = {bool: _boolean, int: int, float: float}.get(type(f.default), str)
            switch = dict(nargs="?", const=True) if kind is _boolean else {}  # --resume alone
            p.add_argument(*flags, dest=f.name, type=kind, default=None, **switch,
                           help=f"{docs[f.name]} (default {f.default!r})".replace("%", "%%"))
    p.add_argument("--plugin", action="append", metavar="FILE.py", help="a file that registers "
                   "exit signals, schedules or loss weights in mue's dicts, run before the "
                   "settings are checked (docs/exercises.md); repeatable")
    return p


def parse_args(argv=None):
    """-> (MuEConfig, TrainConfig, names the user set). Unknown flags: argparse exits with 2."""
    p = parser()
    args = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    for path in args.pop("plugin", []):  # before anything checks a signal's or weights' name
        try:
            load_plugin(path)
        except ValueError as e:
            p.error(str(e))
    if args.get("preset") == "auto":  # saying auto is not choosing one
        del args["preset"]
    preset = args.get("preset") or auto_preset(args.get("device", ""))
    if preset not in PRESETS:
        p.error(f"--preset must be auto or one of {sorted(PRESETS)}, got {preset!r}")
    # real data brings its own text limits (SNLI-VE's prompts carry the premise), below the flags
    merged = {**PRESETS[preset], **data.REAL_LENGTHS.get(args.get("data"), {}), **args,
              "preset": preset}
    try:
        mcfg = MuEConfig(**{k: v for k, v in merged.items() if k in MODEL_FIELDS})
        tcfg = TrainConfig(**{k: v for k, v in merged.items() if k not in MODEL_FIELDS})
        check_train_config(tcfg)
        src, tgt = data.shapes_max_tokens()
        if tcfg.data == "shapes" and (mcfg.max_src_len < src or mcfg.max_tgt_len < tgt):
            raise ValueError(f"the shapes texts need --max-src-len >= {src} and --max-tgt-len "
                             f">= {tgt} (eos included); a shorter one fails mid-run")
    except ValueError as e:
        p.error(str(e))
    # absolute, so that eval.py finds the files from wherever it runs (they are saved in ckpt.pt)
    tcfg = replace(tcfg, **{k: os.path.abspath(getattr(tcfg, k)) for k in ("ann", "images")
                            if getattr(tcfg, k)})
    return mcfg, tcfg, set(args)


def auto_preset(device: str) -> str:
    return "gpu" if torch.cuda.is_available() and not device.startswith("cpu") else "cpu"


def _boolean(text):
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def check_train_config(t: TrainConfig):
    if t.preset not in PRESETS:  # a checkpoint records the preset it ran, never "auto"
        raise ValueError(f"preset must be one of {sorted(PRESETS)} (parse_args resolves auto), "
                         f"got {t.preset!r}")
    data.check_source(t.data, t.ann, t.images, t.shapes)
    data.ShapesDataset(task=t.task)  # the task's name
    check_device(t.device)
    for name in ("steps", "batch_size", "log_every", "ckpt_every", "val_size", "test_size"):
        if getattr(t, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive")
    if not (t.lr > 0 and 0 <= t.min_lr <= t.lr and t.warmup >= 0 and t.grad_clip > 0
            and t.weight_decay >= 0 and t.workers >= 0):
        raise ValueError("need lr > 0, 0 <= min-lr <= lr, warmup >= 0, grad-clip > 0, "
                         "weight-decay >= 0, workers >= 0")
    ExitConfig(dec_criterion=t.dec_criterion, dec_schedule=t.dec_schedule,
               enc_criterion=t.enc_criterion)  # names the field
    check_calibration(t.target, t.delta, t.dec_min_layer)
    if t.resume and t.force:
        raise ValueError("--resume continues the checkpoint and --force replaces it: pick one")


# -- Data: datasets for the three splits, and the batches of each step.


def datasets(t: TrainConfig, m: MuEConfig, tok=None):
    """-> train, val, test datasets and the tokenizer (from the training texts unless given)."""
    load = partial(data.load_split, t.data, ann=t.ann, images=t.images, image_size=m.image_size,
                   task=t.task, seed=t.seed, premise=t.premise, max_src_len=m.max_src_len,
                   max_tgt_len=m.max_tgt_len, shapes=t.shapes)
    train, val, test = load("train"), load("val", size=t.val_size), load("test", size=t.test_size)
    if tok is None:
        tok = (data.shapes_tokenizer() if t.data == "shapes"
               else data.Tokenizer.build(train.texts(), t.min_count))
    return train, val, test, tok


def step_indices(step, n, batch_size, seed):
    """The dataset indices of one step: epoch e is a random permutation seeded by (seed, e), and
    step s takes positions [s * B, (s + 1) * B) of the concatenated epochs. A function of the
    step alone, so resuming needs no sampler state."""
    out, start = [], step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out += perm[offset:offset + batch_size - len(out)].tolist()
    return out


def lr_at(step, t: TrainConfig):
    """Linear warm-up to lr, then cosine decay to min_lr at the last step."""
    if step < t.warmup:
        return t.lr * (step + 1) / t.warmup
    progress = (step - t.warmup) / max(1, t.steps - t.warmup)
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


# -- Training.


def setup_distributed(t: TrainConfig):
    """-> (rank, world size, device). Under torchrun: NCCL on GPUs, gloo on CPUs."""
    device = pick_device(t.device)  # ValueError for cuda on a machine without
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
        else:  # several processes share the cores: one thread each
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return rank, world, torch.device(device)


def make_optimizer(model, t: TrainConfig):
    """AdamW with weight decay on the weights of linear layers and convolutions only: norms,
    biases, embeddings and positions are not pulled towards zero. Chosen by module, so a new
    embedding is safe too. Fused: one kernel per parameter group (docs/results.md, "Speed")."""
    weights = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    decay, rest = [], []
    for p in model.parameters():
        (decay if id(p) in weights else rest).append(p)
    fused = next(model.parameters()).device.type in ("cpu", "cuda")
    return torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=t.lr, betas=(0.9, 0.98),
                             fused=fused)


def start(mcfg, tcfg, given, device):
    """Build or resume the model, optimizer and history. Refuses to overwrite a checkpoint that
    the user did not ask to replace, and to resume one of another configuration. A resumed run
    takes every setting from the checkpoint (the preset's defaults, which parse_args filled in,
    must not stand in for them); only flags given in KEEP_ON_RESUME change it."""
    path = os.path.join(tcfg.out, "ckpt.pt")
    if not tcfg.resume:
        if os.path.exists(path) and not tcfg.force:
            raise ValueError(f"{path} exists: pass --resume to continue it, --force to start "
                             f"over, or --out to write elsewhere")
        return None, mcfg, tcfg
    model, state = load_checkpoint(path, device)  # ValueError on a missing or bad file
    unknown = set(state.get("train", {})) - {f.name for f in fields(TrainConfig)}
    if "train" not in state or unknown:
        raise ValueError(f"{path} has no training settings this train.py knows "
                         f"({', '.join(sorted(unknown)) or 'none saved'}): start over with --force")
    saved_t = TrainConfig(**state["train"])

    def setting(m, t, name):
        return getattr(m if name in MODEL_FIELDS else t, name)
    clash = sorted(n for n in given - KEEP_ON_RESUME
                   if setting(mcfg, tcfg, n) != setting(model.cfg, saved_t, n))
    if clash:
        raise ValueError(f"{path} was trained with other settings for {', '.join(clash)}: "
                         f"drop those flags to resume it, or start over with --force")
    tcfg = replace(saved_t, **{**{n: getattr(tcfg, n) for n in given & KEEP_ON_RESUME},
                               "out": tcfg.out, "device": tcfg.device,  # this machine's
                               "resume": True, "force": False})
    try:  # the saved settings may name a plugin's signal: find out now, not after training
        check_train_config(tcfg)
    except ValueError as e:
        raise ValueError(f"{path}: {e}{made_with(state)}") from None
    if state["step"] >= tcfg.steps:
        raise ValueError(f"{path} is already at step {state['step']} of --steps {tcfg.steps} "
                         f"(a larger --steps trains it further)")
    return state, model.cfg, tcfg


def preset_reason(tcfg, given) -> str:
    if tcfg.resume:
        return "the checkpoint's"
    if "preset" in given:
        return "--preset"
    if tcfg.preset == "gpu":
        return "CUDA GPU found; --preset cpu for the small run"
    return ("--device cpu" if torch.cuda.is_available() else "no CUDA GPU found"
            ) + "; --preset gpu to force"


def train(mcfg: MuEConfig, tcfg: TrainConfig, given=frozenset()):
    """The whole run. Returns the loss history (one value per step, averaged over ranks)."""
    check_train_config(tcfg)
    check_output("--out", tcfg.out, folder=True)  # before any work, not at the first checkpoint
    rank, world, device = setup_distributed(tcfg)
    master = rank == 0
    if tcfg.batch_size % world:
        raise ValueError(f"--batch-size {tcfg.batch_size} does not split over {world} ranks")
    state, mcfg, tcfg = start(mcfg, tcfg, given, device)
    if master:  # the first line: which preset, and why
        print(f"preset {tcfg.preset} ({preset_reason(tcfg, given)})", flush=True)
        if tcfg.preset == "gpu" and device.type != "cuda":
            print("train.py: warning: the gpu preset without a CUDA GPU: its defaults take hours "
                  "on a CPU (the eta at step 1 tells; --preset cpu is the short run)",
                  file=sys.stderr, flush=True)
    tok = None if state is None else data.Tokenizer.from_state_dict(state["tokenizer"])
    train_set, val_set, test_set, tok = datasets(tcfg, mcfg, tok)
    if master and tcfg.data != "shapes":  # what was read, and what was cut to fit: never silent
        for name, ds in (("train", train_set), ("val", val_set), ("test", test_set)):
            print(f"{tcfg.data} {name}: {ds.summary()}")
    mcfg = replace(mcfg, vocab_size=len(tok), pad_id=tok.pad_id, bos_id=tok.bos_id,
                   eos_id=tok.eos_id)
    torch.manual_seed(tcfg.seed)
    model = MuE(mcfg).to(device)
    optimizer = make_optimizer(model, tcfg)
    run = Run(model, optimizer, tok, tcfg, master)
    if state is not None:
        run.resume(state)
    # an encoder stopped early leaves its upper layers without gradients in that step
    net = DDP(model, device_ids=[device] if device.type == "cuda" else None,
              find_unused_parameters=mcfg.enc_depth_sampling > 0) if world > 1 else model
    per_rank = tcfg.batch_size // world
    workers = min(tcfg.workers, os.cpu_count() or 1)  # the gpu preset's 6 on a 2-core laptop
    batches = DataLoader(
        train_set, num_workers=workers, pin_memory=device.type == "cuda",
        collate_fn=partial(data.collate, tok=tok, max_src_len=mcfg.max_src_len,
                           max_tgt_len=mcfg.max_tgt_len),
        batch_sampler=[step_indices(s, len(train_set), tcfg.batch_size, tcfg.seed)
                       [rank * per_rank:(rank + 1) * per_rank]
                       for s in range(run.step, tcfg.steps)])
    if master:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"MuE {n_params / 1e6:.2f}M parameters | {mcfg.n_enc_layers}+{mcfg.n_dec_layers} "
              f"layers, d={mcfg.d_model} | {tcfg.data}/{tcfg.task} | {world} x {device} | "
              f"steps {run.step}->{tcfg.steps}, batch {tcfg.batch_size}, {workers} data workers")
        if mcfg.enc_depth_sampling > 0:  # a recipe beyond the paper says so where it starts
            print(f"encoder depth sampling {mcfg.enc_depth_sampling} ({mcfg.enc_depth_modality}), "
                  f"beyond the paper: --enc-depth-sampling 0 trains the paper's recipe")
    try:
        run.fit(net, batches, device, rank, world)
    except KeyboardInterrupt:  # the checkpoint on disk is whole (written atomically): say so
        raise KeyboardInterrupt(f"interrupted at step {run.step}; {run.saved()}") from None
    run.checkpoint()
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    if master and tcfg.report:
        try:
            report(model, tok, val_set, test_set, tcfg, device, run.losses, run.seconds,
                   run.checkpoint)
        except KeyboardInterrupt:
            raise KeyboardInterrupt(
                f"interrupted during the report; training is complete in {run.path}, and "
                f"python eval.py --ckpt {shlex.quote(run.path)} --calibrate reports on it"
            ) from None
    return run.losses


class Run:
    """A training run's state: the model, its optimizer, the step, the loss history, and the
    checkpoint on disk (written by rank 0 only)."""

    def __init__(self, model, optimizer, tok, tcfg, master):
        self.model, self.optimizer, self.tok, self.tcfg, self.master = \
            model, optimizer, tok, tcfg, master
        self.path = os.path.join(tcfg.out, "ckpt.pt")
        self.step, self.losses, self.saved_at = 0, [], None  # saved_at: the step on disk
        self.seconds = 0.0  # spent training, resumed runs included
        self.plugins = set(PLUGINS)  # every file that registered a name the settings may use

    def resume(self, state):
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.losses = state["step"], list(state["losses"])
        self.seconds = state.get("seconds", 0.0)
        self.saved_at = self.step
        self.plugins |= set(state.get("plugins") or [])

    def checkpoint(self, extra=None):
        if self.master:
            save_checkpoint(self.path, self.model, tokenizer=self.tok.state_dict(),
                            step=self.step, losses=self.losses, seconds=self.seconds,
                            train=asdict(self.tcfg), optimizer=self.optimizer.state_dict(),
                            plugins=sorted(self.plugins), **(extra or {}))
        self.saved_at = self.step

    def saved(self) -> str:  # what Ctrl-C leaves, and how to go on
        if self.saved_at is None:
            return (f"nothing of this run was saved (its first checkpoint: step "
                    f"{min(self.tcfg.ckpt_every, self.tcfg.steps)})")
        return (f"the last checkpoint (step {self.saved_at}) is in {self.path}: continue with "
                f"python train.py --resume --out {shlex.quote(self.tcfg.out)}")

    def fit(self, net, batches, device, rank, world):
        """The training loop, from self.step to tcfg.steps."""
        t, model, optimizer = self.tcfg, self.model, self.optimizer
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
        model.train()
        t0, first, before = time.time(), self.step, self.seconds
        for batch in batches:
            batch = batch.to(device)
            torch.manual_seed(t.seed * 1_000_003 + self.step * 1009 + rank)  # dropout, depths
            for group in optimizer.param_groups:
                group["lr"] = lr_at(self.step, t)
            with autocast:
                _, loss = net(batch.images, batch.src, batch.tgt_in, batch.targets)
            if world > 1:  # each rank's loss is a mean over its own tokens: weigh it by them, so
                # that DDP's mean over ranks is the mean over the global batch's tokens
                n = batch.tgt_mask.sum().float()  # the scored positions
                total = n.clone()
                dist.all_reduce(total)
                loss = loss * n * world / total
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            value = loss.detach().float()
            if world > 1:
                dist.all_reduce(value)
                value /= world
            value = value.item()  # one host sync a step: a NaN must stop the run before it lands
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"loss is {value} at step {self.step}: stopped; the last good checkpoint is "
                    f"kept (lower --lr or --grad-clip, then --resume)")
            optimizer.step()
            self.losses.append(value)
            self.step, self.seconds = self.step + 1, before + time.time() - t0
            if self.master:
                self.log(first, t0)
            if self.step % t.ckpt_every == 0 and self.step < t.steps:
                self.checkpoint()

    def log(self, first, t0):  # after step 1 (a slow run shows at once), then every log_every
        t, step = self.tcfg, self.step
        if step == first + 1 or step % t.log_every == 0 or step == t.steps:
            dt = (time.time() - t0) / (step - first)
            recent = self.losses[-min(len(self.losses), t.log_every):]
            print(f"step {step}/{t.steps} | loss {sum(recent) / len(recent):.4f} | "
                  f"lr {lr_at(step - 1, t):.1e} | {1000 * dt:.0f} ms | "
                  f"{t.batch_size / dt:.0f} samples/s | eta {_clock(dt * (t.steps - step))}",
                  flush=True)


def report(model, tok, val_set, test_set, tcfg, device, losses, train_time, checkpoint):
    """Calibrate the exits on val, keep them in the checkpoint, compare on test, write the JSON."""
    model.eval()
    t0 = time.time()
    base = ExitConfig(dec_criterion=tcfg.dec_criterion, dec_schedule=tcfg.dec_schedule,
                      enc_criterion=tcfg.enc_criterion)
    exits, calibration = calibrate(model, val_set, tok, device, tcfg.target, tcfg.delta, base=base,
                                   dec_min_layer=tcfg.dec_min_layer)
    checkpoint({"exits": {task: asdict(ex) for task, ex in exits.items()}})
    rows = compare(model, test_set, tok, device, exits)
    print(format_table(rows))
    out = {"train": {"steps": len(losses), "seconds": round(train_time, 1),
                     "final_loss": sum(losses[-50:]) / len(losses[-50:]), "losses": losses},
           "eval_seconds": round(time.time() - t0, 1),
           "exits": {task: asdict(ex) for task, ex in exits.items()}, "calibration": calibration,
           "rows": rows,
           "plugins": sorted(PLUGINS)}
    path = os.path.join(tcfg.out, "report.json")
    write_json(path, out)
    print(f"wrote {os.path.join(tcfg.out, 'ckpt.pt')} and {path} "
          f"(training {_clock(train_time)}, evaluation {_clock(time.time() - t0)})")


def _clock(seconds):
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s"


def main(argv=None):
    mcfg, tcfg, given = parse_args(argv)
    try:
        train(mcfg, tcfg, given)
    except (ValueError, OSError, FloatingPointError) as e:  # a clear message, not a trace
        print(f"train.py: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C: what is saved and how to go on, not a trace
        print(f"train.py: {e or 'interrupted'}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
