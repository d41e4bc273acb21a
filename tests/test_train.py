"""Tests of train.py: flags, resuming, failures that must keep the last good checkpoint, and a
2-process torchrun run on the CPU. Tiny models and a few steps, so each test takes seconds."""

import dataclasses
import json
import os
import re
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from conftest import WORKED_EXAMPLE, truncate

import data
import mue
import train
from eval import main as eval_main

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
                          (["--dec-criterion", "nonsense"], "dec_criterion must be one of"),
                          (["--dec-schedule", "linear"], "dec_schedule must be one of"),
                          (["--workers", "-1"], "workers >= 0"),
                          (["--dec-min-layer", "0"], "--dec-min-layer must be an integer >= 1"),
                          (["--shapes", "colour=red"], "--shapes 'colour=red': expected NAME"),
                          (["--shapes", "max_objects=9"], "max_objects=9"),
                          (["--data", "coco", "--ann", "a", "--images", "b", "--shapes",
                            "p_box=0"], "sets the shapes world, not coco"),
                          (["--plugin", "missing.py"], "missing.py does not exist"),
                          (["--max-src-len", "12"], "--max-src-len >= 14"),
                          (["--resume", "--force"], "pick one"),
                          (["--resume", "1", "--force", "1"], "pick one")):
        with pytest.raises(SystemExit) as e:
            train.parse_args(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_a_plugin_run_is_recorded_and_resuming_without_it_names_the_file(tmp_path, monkeypatch,
                                                                        capsys):
    out = tmp_path / "run"
    assert run(out, "--steps", "1", "--plugin", str(WORKED_EXAMPLE), "--dec-criterion",
               "entropy") == 0
    state = saved(out)
    assert str(WORKED_EXAMPLE) in state["plugins"] and state["train"]["dec_criterion"] == "entropy"
    monkeypatch.delitem(mue.DEC_SIGNALS, "entropy")  # as in a process that did not load it
    assert run(out, "--resume", "--steps", "2") == 1
    err = capsys.readouterr().err
    assert err.startswith(f"train.py: error: {out / 'ckpt.pt'}: dec_criterion must be one of")
    assert "got 'entropy' (it was made with --plugin " in err and str(WORKED_EXAMPLE) in err


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
        assert (tcfg.steps, mcfg.d_model) == ((3000, 128) if preset == "cpu" else (4000, 384))


def test_device_cuda_without_a_gpu_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert run(tmp_path, "--device", "cuda") == 1
    assert capsys.readouterr().err == (
        "train.py: error: --device cuda but no CUDA GPU is available\n")
    assert not (tmp_path / "ckpt.pt").exists()


def test_help_says_what_each_flag_means_and_the_choices(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for model_or_train in (mue.MuEConfig, train.TrainConfig):
        docs = train.field_docs(model_or_train)
        assert {f.name for f in dataclasses.fields(model_or_train)} - train.DERIVED <= docs.keys()
    assert "--d-model D_MODEL, --d_model D_MODEL width of every token" in text
    assert '--fusion FUSION "decomposed": image and text apart (MuE) | "joint"' in text
    assert '"confidence" | "similarity" (default \'confidence\')' in text
    assert "MuEConfig.d_model" not in text


def test_a_bad_out_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "datasets", lambda *a: pytest.fail("read the data"))
    (tmp_path / "file.txt").write_text("mine")
    for out, message in ((tmp_path / "file.txt", "is a file, not a folder"),
                         (tmp_path / "file.txt" / "run", "cannot be written")):
        assert run(out) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"train.py: error: --out {out} ") and message in err
        assert err.count("\n") == 1
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"]


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


def test_only_a_recipe_beyond_the_paper_says_so(tmp_path, capsys):
    assert run(tmp_path / "paper", "--steps", "1", "--enc-depth-sampling", "0") == 0
    assert "beyond the paper" not in capsys.readouterr().out
    assert run(tmp_path / "text", "--steps", "1", "--enc-depth-modality", "text") == 0
    assert "encoder depth sampling 0.5 (text), beyond the paper" in capsys.readouterr().out


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, monkeypatch, capsys):
    assert run(tmp_path / "straight", "--steps", "6", "--ckpt-every", "3") == 0
    straight = saved(tmp_path / "straight")
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "preset cpu (--preset)" and printed[3].startswith("step 1/6 |")
    assert printed[2].startswith("encoder depth sampling 0.5 (each), beyond the paper")

    with monkeypatch.context() as m:  # Ctrl-C in step 4, after the step-3 checkpoint
        ctrl_c_at(m, 4)
        assert run(tmp_path / "cut", "--steps", "6", "--ckpt-every", "3") == 130
    cut = tmp_path / "cut"
    assert capsys.readouterr().err == (
        f"train.py: interrupted at step 3; the last checkpoint (step 3) is in {cut}/ckpt.pt: "
        f"continue with python train.py --resume --out {cut}\n")
    assert saved(cut)["step"] == 3 and [p.name for p in cut.iterdir()] == ["ckpt.pt"]
    before = saved(cut)["seconds"]  # the time of steps 1-3, which the resumed run adds to
    assert train.main(["--resume", "--out", str(cut)]) == 0  # nothing else: the saved settings
    assert capsys.readouterr().out.startswith("preset cpu (the checkpoint's)\n")

    resumed = saved(cut)
    assert resumed["train"] == {**straight["train"], "out": str(cut), "resume": True}
    assert resumed["step"] == straight["step"] == 6 and len(resumed["losses"]) == 6
    assert resumed["seconds"] > before > 0
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
        "gpu", 4000, 2000, 0.1)

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

    # Each rank's loss is weighed by its tokens, so the first loss (same weights) is the global
    # batch's: unweighted it was 6% off. Not equal: the stem's BatchNorm takes its statistics
    # over each rank's half, and that difference grows a little with every step.
    assert run(tmp_path / "one", "--steps", "4") == 0
    one = saved(tmp_path / "one")
    assert state["losses"][0] == pytest.approx(one["losses"][0], rel=0.005)
    assert state["losses"] == pytest.approx(one["losses"], rel=0.05)


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
    assert report["train"]["seconds"] == round(state["seconds"], 1) > 0
    assert report["plugins"] == state["plugins"] == sorted(mue.PLUGINS)  # the worked example
    assert "MuE" in printed and "report.json" in printed
    assert sorted(p.name for p in out.iterdir()) == ["ckpt.pt", "report.json"]


# ----------------------------------------------------------------------------------------------
# Real data files in their published formats (tests/conftest.py writes them).


def real_flags(source, files, relative_to=None):
    ann, images = str(files.ann), str(files.images)
    if relative_to:  # as a user types them, from the folder they work in
        ann, images = os.path.relpath(ann, relative_to), os.path.relpath(images, relative_to)
    return ["--data", source, "--ann", ann, "--images", images, "--min-count", "1"]


def test_real_data_brings_its_text_limits_and_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = ["--ann", "snli_ve", "--images", "flickr30k-images"]
    mcfg, tcfg, _ = train.parse_args(["--data", "snli_ve", *base])
    assert (mcfg.max_src_len, mcfg.max_tgt_len) == (80, 82)  # the premise makes prompts long
    assert tcfg.ann == str(tmp_path / "snli_ve") and tcfg.images == str(tmp_path / base[3])
    assert tcfg.premise and tcfg.min_count == data.MIN_COUNT == 6
    mcfg, tcfg, _ = train.parse_args(["--data", "snli_ve", *base, "--max-src-len", "40",
                                      "--premise", "false", "--min-count", "2"])
    assert (mcfg.max_src_len, mcfg.max_tgt_len, tcfg.premise, tcfg.min_count) == (40, 82, False, 2)
    mcfg, _, _ = train.parse_args(["--data", "coco", *base])
    assert (mcfg.max_src_len, mcfg.max_tgt_len) == (32, 32)


@pytest.mark.parametrize("source", ["coco", "snli_ve"])
def test_trains_two_steps_and_evaluates_on_the_published_files(source, coco_files, snli_files,
                                                              tmp_path, monkeypatch, capsys):
    files = {"coco": coco_files, "snli_ve": snli_files}[source]
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    assert run(out, "--steps", "2", *real_flags(source, files, relative_to=tmp_path)) == 0
    printed = capsys.readouterr().out
    summary = {"coco": "coco train: 10 samples, 2 images", "snli_ve": "snli_ve train: 6 samples, "
               "2 images"}[source]
    assert summary in printed and "step 2/2" in printed
    state = saved(out)
    assert state["train"]["ann"] == str(files.ann) and state["train"]["premise"]
    assert state["config"]["max_tgt_len"] == {"coco": 32, "snli_ve": 82}[source]
    task = {"coco": "caption", "snli_ve": "ve"}[source]

    elsewhere = tmp_path / "elsewhere"  # eval.py finds the files without being told where
    os.makedirs(elsewhere)
    monkeypatch.chdir(elsewhere)
    assert eval_main(["--ckpt", str(out / "ckpt.pt"), "--out", "figs", "--json", "r.json",
                      "--no-timing", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert re.search(rf"^{task} +full ", printed, re.M)  # the table
    result = json.loads((elsewhere / "r.json").read_text())
    assert {(r["task"], r["name"]) for r in result["rows"]} >= {(task, "full"), (task, "MuE")}
    unknown = result["rows"][0]["unknown_ref_words"]
    if source == "coco":  # the test captions' words the two training images never used
        assert 0 < unknown["unknown"] < unknown["words"] == 47
        assert f"{unknown['unknown']} of 47 reference words unknown" in printed
    else:
        assert unknown == {"unknown": 0, "words": 3, "share": 0.0}  # yes / no / maybe
    figures = {"profiles.png", "exits.png"} | ({"words.png"} if source == "coco" else set())
    assert set(os.listdir(elsewhere / "figs")) == figures


def test_eval_says_when_the_training_files_moved(coco_files, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(out, "--steps", "1", *real_flags("coco", coco_files)) == 0
    moved = tmp_path / "moved.json"
    os.replace(coco_files.ann, moved)
    args = ["--ckpt", str(out / "ckpt.pt"), "--no-timing", "--no-figures", "--n", "1"]
    capsys.readouterr()
    assert eval_main(args) == 1
    assert capsys.readouterr().err == (
        f"eval.py: error: {out / 'ckpt.pt'} was trained on {coco_files.ann}, which is not there "
        f"any more (moved?): give its new place with --ann\n")
    assert eval_main([*args, "--ann", str(moved)]) == 0


@pytest.mark.parametrize("source, workers", [("snli_ve", 0), ("snli_ve", 1), ("coco", 1)])
def test_a_bad_image_ends_the_run_in_one_line_and_keeps_the_checkpoint(
        source, workers, coco_files, snli_files, tmp_path, capsys):
    files = {"coco": coco_files, "snli_ve": snli_files}[source]
    # the truncated image is in every batch: SNLI-VE's is named by 3 of the 6 training lines, so
    # by one of any 4; COCO's by 5 of the 10 training captions, and a batch takes all 10
    flags = [*real_flags(source, files), "--batch-size", "4" if source == "snli_ve" else "10"]
    bad, named_by = {"snli_ve": (snli_files.jpgs["train"][1], f"{files.ann}/snli_ve_train.jsonl:4"),
                     "coco": (coco_files.jpgs[1], f"{files.ann}: images[1]")}[source]
    out = tmp_path / "run"
    assert run(out, "--steps", "2", *flags) == 0
    good = (out / "ckpt.pt").read_bytes()
    truncate(bad)
    again = ["--steps", "4", "--resume", "true", "--workers", str(workers), *flags]
    if workers == 0:
        capsys.readouterr()
        rc, (stdout, stderr) = run(out, *again), capsys.readouterr()
    else:  # a worker process: what reaches the terminal is only seen from outside
        r = subprocess.run([sys.executable, "train.py", *TINY, "--out", str(out), *again],
                           cwd=ROOT, capture_output=True, text=True, timeout=240,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        rc, stdout, stderr = r.returncode, r.stdout, r.stderr
    assert rc == 1 and "step 3/4" not in stdout
    assert stderr.startswith(f"train.py: error: cannot read image {bad} (named by {named_by}): "
                             f"image file is truncated (") and stderr.count("\n") == 1, stderr
    assert (out / "ckpt.pt").read_bytes() == good and os.listdir(out) == ["ckpt.pt"]
    if workers == 0:  # eval.py, reading its test images in its own process, says it alike
        truncate(snli_files.jpgs["test"][0])
        capsys.readouterr()
        assert eval_main(["--ckpt", str(out / "ckpt.pt"), "--no-timing", "--no-figures"]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"eval.py: error: cannot read image {snli_files.jpgs['test'][0]} "
                              f"(named by {snli_files.ann / 'snli_ve_test.jsonl'}:1): image file "
                              f"is truncated (") and err.count("\n") == 1
