import contextlib
import json
import logging
import math
import os
import shutil

import pytest
import torch
from conftest import TINY

from supmae import create_model
from supmae.core.errors import SupmaeError
from supmae.pipelines.batch import Batch
from supmae.pipelines.masking import num_kept, random_masking
from supmae.profiling.config import ProfileConfig
from supmae.training.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from supmae.training.config import PretrainConfig
from supmae.training.loop import pretrain
from supmae.training.optim import build_optimizer, lr_at, param_groups
from supmae.training.step import train_step


def config(folder, output, **overrides):
    base = dict(data=folder, output=str(output), model="supmae_vit_tiny_patch16", img_size=64, batch_size=8,
                steps=6, checkpoint_every=3, log_every=1, workers=0, progress=False, warmup_steps=2, lr=1e-3)
    return PretrainConfig.of(**{**base, **overrides})


def metrics(output):
    with open(os.path.join(output, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_pretrain_writes_checkpoints_metrics_and_config(synth_folder, tmp_path):
    summary = pretrain(config(synth_folder, tmp_path))
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path))] == ["checkpoint-00000003.pt",
                                                                              "checkpoint-00000006.pt"]
    assert summary["checkpoint"].endswith("checkpoint-00000006.pt") and summary["images_per_s"] > 0
    records = metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(r["loss"]) and r["images_per_s"] > 0 and "cls_loss" in r for r in records)
    assert math.isclose(records[0]["loss"], records[0]["rec_loss"] + records[0]["cls_loss"], rel_tol=1e-5)
    state = load_checkpoint(summary["checkpoint"])
    assert state["step"] == 6 and set(state) >= {"model", "optimizer", "scaler", "config", "rng"}
    model = create_model("supmae_vit_tiny_patch16", img_size=64, num_classes=4)
    model.load_state_dict(state["model"], strict=True)  # plain official-layout keys
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["total_steps"] == 6
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    board = EventAccumulator(str(tmp_path / "tensorboard"))
    board.Reload()
    assert [e.step for e in board.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    assert board.Scalars("train/loss")[0].value == pytest.approx(records[0]["loss"])


def test_resume_continues_exactly(synth_folder, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    pretrain(config(synth_folder, straight))
    resumed.mkdir()
    shutil.copy(straight / "checkpoint-00000003.pt", resumed)
    pretrain(config(synth_folder, resumed, resume="auto", workers=1))
    after = [r for r in metrics(resumed)]
    assert [r["step"] for r in after] == [4, 5, 6]
    for a, b in zip(metrics(straight)[3:], after):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7) and a["lr"] == b["lr"]
    final_a = load_checkpoint(str(straight / "checkpoint-00000006.pt"))["model"]
    final_b = load_checkpoint(str(resumed / "checkpoint-00000006.pt"))["model"]
    for key in final_a:
        torch.testing.assert_close(final_a[key], final_b[key], rtol=1e-5, atol=1e-6)


def test_fresh_run_never_overwrites_an_earlier_one(synth_folder, tmp_path, caplog):
    pretrain(config(synth_folder, tmp_path, steps=3))
    with pytest.raises(SupmaeError, match="already holds checkpoints"):
        pretrain(config(synth_folder, tmp_path, steps=3))
    with caplog.at_level(logging.INFO, logger="supmae"):
        assert pretrain(config(synth_folder, tmp_path, steps=3, resume="auto"))["checkpoint"] is None
    assert "already at step 3" in caplog.messages[-1] and len(metrics(tmp_path)) == 3
    with pytest.raises(SupmaeError, match="made with model"):
        pretrain(config(synth_folder, tmp_path, steps=6, model="mae_vit_tiny_patch16", resume="auto"))
    # An option left to the model is compared as the model's value: giving that value is no change.
    assert pretrain(config(synth_folder, tmp_path, steps=3, resume="auto", mask_ratio=0.75))["checkpoint"] is None
    with pytest.raises(SupmaeError, match="made with decoder_depth=1, not 2"):
        pretrain(config(synth_folder, tmp_path, steps=6, resume="auto", decoder_depth=2))


def test_gradient_accumulation_matches_the_full_batch():
    torch.manual_seed(0)
    full_model = create_model("mae_vit_tiny_patch16", **TINY)  # no BatchNorm, so the two must agree
    split_model = create_model("mae_vit_tiny_patch16", **TINY)
    split_model.load_state_dict(full_model.state_dict())
    images, labels = torch.randn(8, 3, 32, 32), torch.zeros(8, dtype=torch.long)
    masking = random_masking(torch.rand(8, 16), num_kept(16, full_model.mask_ratio))
    halves = [Batch(images[s], labels[s], type(masking)(*(t[s] for t in masking))) for s in (slice(0, 4), slice(4, 8))]
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    losses = []
    for model, micro in ((full_model, [Batch(images, labels, masking)]), (split_model, halves)):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        losses.append(train_step(model, micro, opt, scaler, contextlib.nullcontext()))
    torch.testing.assert_close(losses[0], losses[1])
    for a, b in zip(full_model.parameters(), split_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_a_warm_up_as_long_as_the_run_is_warned_about(synth_folder, tmp_path, caplog):
    pretrain(config(synth_folder, tmp_path, steps=2, warmup_steps=2, img_size=32))
    assert any(line.startswith("the warm-up (2 steps) is as long as the run (2 steps)") for line in warnings_of(caplog))


def test_accumulation_warns_about_batchnorm(synth_folder, tmp_path, caplog):
    pretrain(config(synth_folder, tmp_path, steps=1, batch_size=4, accum_iter=2))
    assert any("BatchNorm" in line and "groups of 4, not the global batch of 8" in line for line in warnings_of(caplog))


def test_weight_decay_skips_biases_and_1d_parameters():
    model = create_model("supmae_vit_tiny_patch16", **TINY, num_classes=3)
    no_decay, decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert no_decay["weight_decay"] == 0 and decay["weight_decay"] == 0.05
    assert all(p.ndim <= 1 or names[id(p)].endswith(".bias") for p in no_decay["params"])
    decayed = {names[id(p)] for p in decay["params"]}
    assert {"cls_token", "mask_token", "blocks.0.attn.qkv.weight", "cls_head.0.weight"} <= decayed
    assert not {"pos_embed", "decoder_pos_embed"} & (decayed | {names[id(p)] for p in no_decay["params"]})
    opt = build_optimizer(model, 1e-3, 0.05)
    assert opt.defaults["betas"] == (0.9, 0.95)


def test_learning_rate_schedule():
    assert lr_at(0, peak=1.0, warmup=10, total=110) == 0
    assert lr_at(5, peak=1.0, warmup=10, total=110) == 0.5
    assert lr_at(10, peak=1.0, warmup=10, total=110) == 1.0
    assert math.isclose(lr_at(60, peak=1.0, warmup=10, total=110, min_lr=0.1), 0.55)  # half way down the cosine
    assert math.isclose(lr_at(110, peak=1.0, warmup=10, total=110, min_lr=0.1), 0.1)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint-00000001.pt")
    save_checkpoint({"model": {"w": torch.ones(3)}, "step": 1}, path)

    def crash(obj, f):
        with open(f, "wb") as file:
            file.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(SupmaeError, match=r"^cannot write checkpoint .*checkpoint-00000001.pt: disk full$"):
        save_checkpoint({"model": {"w": torch.zeros(3)}, "step": 2}, path)
    assert os.listdir(tmp_path) == ["checkpoint-00000001.pt"]
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_run(synth_folder, tmp_path, precision):
    summary = pretrain(config(synth_folder, tmp_path, steps=2, precision=precision))
    assert all(math.isfinite(r["loss"]) for r in metrics(tmp_path)) and summary["checkpoint"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_bf16_runs_on_gpu_with_and_without_cuda_graphs(synth_folder, tmp_path, caplog):
    from torch._inductor import config as inductor_config
    curves = {}
    for mode in ("default", "reduce-overhead"):
        caplog.clear()
        with inductor_config.patch({"triton.cudagraph_or_error": True}), caplog.at_level(logging.INFO, "supmae"):
            pretrain(config(synth_folder, tmp_path / mode, steps=4, device="cuda", compile_mode=mode))
        assert any("bf16, compiled" in line for line in caplog.messages)
        curves[mode] = [r["loss"] for r in metrics(tmp_path / mode)]
        assert all(math.isfinite(loss) for loss in curves[mode]) and len(curves[mode]) == 4
    assert curves["reduce-overhead"] == pytest.approx(curves["default"], rel=1e-2)  # bf16: the same step, replayed


def test_the_compile_mode_reaches_torch_compile(synth_folder, tmp_path, monkeypatch):
    from supmae.training.run import Run
    modes = []
    monkeypatch.setattr(torch, "compile", lambda module, mode, fullgraph, dynamic: modes.append(
        (mode, fullgraph, dynamic)) or module)
    run = Run(config(synth_folder, tmp_path, compile=True, compile_mode="max-autotune"))
    assert modes == [("max-autotune", True, False)] and run.speed == "fp32, compiled, max-autotune"


def test_compiled_run_follows_the_eager_run(synth_folder, tmp_path):
    """torch.compile over the forward and, through AOTAutograd, its backward."""
    curves = {}
    for compiled in (False, True):
        pretrain(config(synth_folder, tmp_path / str(compiled), img_size=32, compile=compiled, tensorboard=False))
        curves[compiled] = [r["loss"] for r in metrics(tmp_path / str(compiled))]
    assert curves[True] == pytest.approx(curves[False], rel=1e-5)


def test_a_gpu_torch_cannot_use_is_named_not_silently_replaced(monkeypatch, caplog):
    """An old driver makes torch.cuda.is_available() false on a GPU machine: say so, in one line."""
    from supmae.runtime.hardware import resolve_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("shutil.which", lambda command: "/usr/bin/nvidia-smi" if command == "nvidia-smi" else None)
    assert resolve_device("auto").type == "cpu"
    [warning] = warnings_of(caplog)
    assert warning.startswith("an NVIDIA GPU is present but torch") and "driver" in warning
    assert len(warning.splitlines()) == 1
    caplog.clear()
    with pytest.raises(SupmaeError, match="driver older than"):
        resolve_device("cuda")
    monkeypatch.setattr("shutil.which", lambda command: None)
    monkeypatch.setattr("glob.glob", lambda pattern: [])
    assert resolve_device("auto").type == "cpu" and warnings_of(caplog) == []


def test_cuda_graphs_with_accumulation_are_refused(synth_folder, tmp_path):
    """The next replay would overwrite the gradients being accumulated: no run or profile is configured so."""
    with pytest.raises(SupmaeError, match="use --accum-iter 1"):
        config(synth_folder, tmp_path, accum_iter=2, compile_mode="reduce-overhead")
    with pytest.raises(SupmaeError, match="use --accum-iter 1"):
        ProfileConfig.merge(dict(data=synth_folder, accum_iter=2, compile_mode="reduce-overhead"))


def test_a_single_class_is_warned_about_for_a_supervised_model(synth_folder, tmp_path, caplog):
    one = tmp_path / "one"
    shutil.copytree(os.path.join(synth_folder, sorted(os.listdir(synth_folder))[0]), one / "only")
    pretrain(config(str(one), tmp_path / "run", steps=1, img_size=32))
    assert any("holds one class" in line and "classification loss is always 0" in line for line in warnings_of(caplog))


def test_a_resume_reads_the_data_it_began_with(capsys, synth_folder, tmp_path, monkeypatch):
    """A relative --data is stored absolute; other data under the same classes is refused by its fingerprint."""
    from test_cli import error_of

    from supmae.cli.main import main
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    shutil.copytree(synth_folder, here / "data")
    shutil.copytree(synth_folder, elsewhere / "data", ignore=lambda folder, names: {"000000.jpg"} & set(names))
    out = str(tmp_path / "run")
    monkeypatch.chdir(here)
    assert main(["pretrain", "--data", "data", "--output", out, "--model", "supmae_vit_tiny_patch16", "--img-size",
                 "32", "--batch-size", "8", "--steps", "1", "--workers", "0", "--no-progress"]) == 0
    assert load_checkpoint(os.path.join(out, "checkpoint-00000001.pt"))["config"]["data"] == str(here / "data")
    monkeypatch.chdir(elsewhere)
    assert main(["pretrain", "--output", out, "--resume", "auto", "--steps", "2", "--no-progress"]) == 0
    assert metrics(out)[-1]["step"] == 2  # went on with the data in `here`, not with ./data in `elsewhere`
    err = error_of(capsys, "pretrain", "--output", out, "--resume", "auto", "--steps", "3", "--data", "data")
    assert f"was trained on other data than {elsewhere / 'data'}: 48 images" in err and "44 (" in err
