"""Tests of train.py: flags, resuming, failures that must keep the last good checkpoint, and a
2-process torchrun run on the CPU. Tiny models and a few steps, so each test takes seconds."""

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

import mue
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--preset", "cpu", "--d-model", "32", "--n-heads", "2", "--d-ff", "64",
        "--n-enc-layers", "2", "--n-dec-layers", "2", "--image-size", "32", "--batch-size", "4",
        "--lr", "3e-3", "--warmup", "2", "--workers", "0", "--report", "false", "--log-every", "2"]


def run(out, *extra):
    return train.main(TINY + ["--out", str(out), *extra])


def saved(out):
    return torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)


def test_flags_override_presets_and_unknown_flags_are_rejected(capsys):
    mcfg, tcfg, given = train.parse_args(["--preset", "gpu", "--d-model", "64", "--lr=0.01",
                                          "--n_heads", "4", "--report", "no"])
    assert (mcfg.d_model, mcfg.n_heads, mcfg.image_size) == (64, 4, 96)  # image_size: preset
    assert (tcfg.lr, tcfg.steps, tcfg.report) == (0.01, 4000, False)
    assert given == {"preset", "d_model", "lr", "n_heads", "report"}
    # A true/false field alone is a switch, before another flag or at the end; a value still works.
    _, tcfg, given = train.parse_args(["--resume", "--out", "x", "--report"])
    assert (tcfg.resume, tcfg.out, tcfg.report) == (True, "x", True)
    assert train.parse_args(["--force", "--resume", "false"])[1].force is True
    for argv, message in ((["--colour", "red"], "unrecognized arguments: --colour"),
                          (["--steps", "ten"], "invalid int value"),
                          (["--fusion", "late"], "fusion must be one of"),
                          (["--preset", "tpu"], "--preset must be auto or one of"),
                          (["--data", "coco"], "needs --ann and --images"),
                          (["--device", "tpu"], "--device must be cpu, cuda or cuda:N"),
                          (["--dec-criterion", "entropy"], "dec_criterion must be one of"),
                          (["--dec-schedule", "linear"], "dec_schedule must be one of"),
                          (["--workers", "-1"], "workers >= 0"),
                          (["--max-src-len", "12"], "--max-src-len >= 18"),
                          (["--resume", "--force"], "pick one"),
                          (["--resume", "1", "--force", "1"], "pick one")):
        with pytest.raises(SystemExit) as e:
            train.parse_args(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_auto_preset_is_gpu_with_a_cuda_gpu_and_says_why(monkeypatch):
    for cuda, argv, preset, why in (
            (False, [], "cpu", "no CUDA GPU found; --preset gpu to force"),
            (True, [], "gpu", "CUDA GPU found; --preset cpu for the small run"),
            (True, ["--device", "cpu"], "cpu", "--device cpu; --preset gpu to force"),
            (True, ["--preset", "auto"], "gpu", "CUDA GPU found; --preset cpu for the small run"),
            (False, ["--preset", "gpu"], "gpu", "--preset")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        mcfg, tcfg, given = train.parse_args(argv)
        assert tcfg.preset == preset and train.preset_reason(tcfg, given) == why
        assert (tcfg.steps, mcfg.d_model) == ((700, 128) if preset == "cpu" else (4000, 384))


def test_device_cuda_without_a_gpu_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert run(tmp_path, "--device", "cuda") == 1
    assert capsys.readouterr().err == (
        "train.py: error: --device cuda but no CUDA GPU is available\n")
    assert not (tmp_path / "ckpt.pt").exists()


def test_embeddings_positions_norms_and_biases_are_not_decayed():
    model = mue.MuE(mue.MuEConfig(d_model=32, n_heads=2, d_ff=64, n_enc_layers=1,
                                  n_dec_layers=1, image_size=32))
    decay, rest = train.make_optimizer(model, train.TrainConfig()).param_groups
    assert (decay["weight_decay"], rest["weight_decay"]) == (0.05, 0.0)
    decayed = {id(p) for p in decay["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    for name in ("src_pos.weight", "tgt_pos.weight", "img_row", "img_col", "tok_emb.weight",
                 "type_emb.weight", "enc_ln.weight", "dec_ln.bias", "img_proj.bias"):
        assert name not in names
    assert "img_proj.weight" in names and "stem.0.weight" in names  # a linear and a conv
    assert all(n.endswith(".weight") and "ln" not in n and "emb" not in n for n in names)
    assert len(decay["params"]) + len(rest["params"]) == len(list(model.parameters()))


def test_unknown_flag_exits_non_zero_from_the_command_line():
    r = subprocess.run([sys.executable, "train.py", "--stepz", "3"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "unrecognized arguments: --stepz" in r.stderr


def test_step_indices_are_a_function_of_the_step():
    a = [train.step_indices(s, 10, 4, seed=0) for s in range(5)]
    assert a == [train.step_indices(s, 10, 4, seed=0) for s in range(5)]
    flat = sum(a, [])
    assert sorted(flat[:10]) == list(range(10))  # the first epoch visits every sample once
    assert sorted(flat[10:20]) == list(range(10)) and flat[:10] != flat[10:20]
    assert train.step_indices(0, 10, 4, seed=1) != a[0]


def test_lr_schedule_warms_up_then_decays_to_min_lr():
    t = train.TrainConfig(steps=100, warmup=10, lr=1.0, min_lr=0.1)
    lrs = [train.lr_at(s, t) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))
    assert train.lr_at(100, t) == pytest.approx(0.1)


def ctrl_c_at(monkeypatch, n):
    """Ctrl-C during the n-th forward pass of this process (1-based)."""
    real_forward, seen = mue.MuE.forward, []

    def forward(self, *args, **kwargs):
        seen.append(1)
        if len(seen) == n:
            raise KeyboardInterrupt
        return real_forward(self, *args, **kwargs)
    monkeypatch.setattr(mue.MuE, "forward", forward)


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, monkeypatch, capsys):
    assert run(tmp_path / "straight", "--steps", "6", "--ckpt-every", "3") == 0
    straight = saved(tmp_path / "straight")
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "preset cpu (--preset)" and printed[2].startswith("step 1/6 |")

    with monkeypatch.context() as m:  # Ctrl-C in step 4, after the step-3 checkpoint
        ctrl_c_at(m, 4)
        assert run(tmp_path / "cut", "--steps", "6", "--ckpt-every", "3") == 130
    cut = tmp_path / "cut"
    assert capsys.readouterr().err == (
        f"train.py: interrupted at step 3; the last checkpoint (step 3) is in {cut}/ckpt.pt: "
        f"continue with python train.py --resume --out {cut}\n")
    assert saved(cut)["step"] == 3 and [p.name for p in cut.iterdir()] == ["ckpt.pt"]
    assert train.main(["--resume", "--out", str(cut)]) == 0  # nothing else: the saved settings
    assert capsys.readouterr().out.startswith("preset cpu (the checkpoint's)\n")

    resumed = saved(cut)
    assert resumed["train"] == {**straight["train"], "out": str(cut), "resume": True}
    assert resumed["step"] == straight["step"] == 6 and len(resumed["losses"]) == 6
    assert resumed["losses"] == pytest.approx(straight["losses"], abs=1e-6)
    for k, v in straight["model"].items():
        torch.testing.assert_close(resumed["model"][k], v, atol=1e-6, rtol=0)

    with monkeypatch.context() as m:  # before any checkpoint: nothing to resume
        ctrl_c_at(m, 2)
        assert run(tmp_path / "early", "--steps", "6", "--ckpt-every", "3") == 130
    assert capsys.readouterr().err == ("train.py: interrupted at step 1; nothing of this run was "
                                       "saved (its first checkpoint: step 3)\n")


def test_resume_keeps_the_saved_settings_of_a_gpu_preset_run(tmp_path, capsys):
    """The gpu preset's steps, sizes and model stand, resumed by plain python train.py --resume
    on a CPU, where parse_args alone would fill in the cpu preset."""
    out = tmp_path / "gpu"
    assert run(out, "--preset", "gpu", "--steps", "2", "--workers", "64") == 0
    printed = capsys.readouterr()
    assert printed.out.startswith("preset gpu (--preset)\n")
    if not torch.cuda.is_available():
        assert printed.err.startswith("train.py: warning: the gpu preset without a CUDA GPU")
        assert f", {min(64, os.cpu_count())} data workers" in printed.out  # capped
    state = saved(out)
    first = train.TrainConfig(**state["train"])
    assert (first.preset, first.val_size, first.test_size, state["config"]["dropout"]) == (
        "gpu", 1000, 2000, 0.1)

    mcfg, tcfg, given = train.parse_args(["--resume", "--out", str(out)])
    with pytest.raises(ValueError, match="already at step 2 of --steps 2"):
        train.start(mcfg, tcfg, given, "cpu")
    mcfg, tcfg, given = train.parse_args(["--resume", "--out", str(out), "--steps", "3"])
    _, mcfg, tcfg = train.start(mcfg, tcfg, given, "cpu")
    assert tcfg == replace(first, steps=3, resume=True)
    assert mcfg == mue.MuEConfig(**state["config"])
    assert train.main(["--resume", "--out", str(out), "--steps", "3"]) == 0
    assert train.TrainConfig(**saved(out)["train"]) == tcfg and saved(out)["step"] == 3


def test_errors_leave_the_checkpoint_untouched(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(out, "--steps", "2") == 0
    path = out / "ckpt.pt"
    good = path.read_bytes()
    cases = [
        ((), "exists: pass --resume"),  # a fresh run would overwrite it
        (("--resume", "true", "--d-model", "64"), "other settings for d_model"),
        (("--resume", "true", "--steps", "2"), "already at step 2"),
        (("--resume", "true", "--data", "coco", "--ann", str(tmp_path / "no.json"),
          "--images", str(tmp_path)), "other settings for ann, data, images"),
    ]
    for extra, message in cases:
        assert run(out, "--steps", "2", *extra) == 1
        assert message in capsys.readouterr().err
        assert path.read_bytes() == good
    path.write_bytes(good[:1000])
    assert run(out, "--steps", "4", "--resume", "true") == 1
    assert "not a checkpoint written by train.py" in capsys.readouterr().err
    assert run(tmp_path / "new", "--steps", "4", "--resume", "true") == 1
    assert "does not exist" in capsys.readouterr().err
    assert run(tmp_path / "coco", "--data", "coco", "--ann", str(tmp_path / "missing.json"),
               "--images", str(tmp_path)) == 1
    assert "missing.json" in capsys.readouterr().err
    assert not (tmp_path / "coco" / "ckpt.pt").exists()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    real_forward, seen = mue.MuE.forward, []

    def forward(self, *args, **kwargs):
        logits, loss = real_forward(self, *args, **kwargs)
        seen.append(1)
        return logits, loss * float("nan") if len(seen) == 4 else loss
    monkeypatch.setattr(mue.MuE, "forward", forward)
    assert run(tmp_path, "--steps", "6", "--ckpt-every", "2") == 1
    assert "loss is nan at step 3" in capsys.readouterr().err
    state = saved(tmp_path)
    assert state["step"] == 2 and len(state["losses"]) == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_torchrun_two_cpu_processes(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--standalone", "train.py", *TINY, "--steps", "4", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 x cpu" in r.stdout and r.stdout.count("step 4/4") == 1  # rank 0 alone prints
    state = saved(out)
    assert state["step"] == 4 and len(state["losses"]) == 4
    assert [p.name for p in out.iterdir()] == ["ckpt.pt"]

    # The two ranks averaged their gradients: the same steps in one process on the same global
    # batch land on nearly the same weights (not bit-equal: each rank averages its own tokens).
    assert run(tmp_path / "one", "--steps", "4") == 0
    one = saved(tmp_path / "one")
    assert state["losses"][0] == pytest.approx(one["losses"][0], rel=0.05)


def test_report_calibrates_stores_thresholds_and_writes_json(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(out, "--steps", "4", "--report", "--val-size", "8", "--test-size", "8",
               "--dec-criterion", "similarity", "--dec-schedule", "decay") == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    state = saved(out)
    assert set(state["exits"]) == {"caption", "ve"} == set(report["exits"])
    for task, ex in state["exits"].items():
        assert mue.ExitConfig(**ex) == mue.ExitConfig(**report["exits"][task])
        assert (ex["dec_criterion"], ex["dec_schedule"]) == ("similarity", "decay")  # as asked
    names = {(r["task"], r["name"]) for r in report["rows"]}
    assert {("caption", "full"), ("caption", "MuE"), ("ve", "full"), ("ve", "MuE")} <= names
    assert report["train"]["steps"] == 4 and report["train"]["losses"] == state["losses"]
    assert "MuE" in printed and "report.json" in printed
    assert sorted(p.name for p in out.iterdir()) == ["ckpt.pt", "report.json"]
