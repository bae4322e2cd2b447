"""Resolution schedules: the side by epoch, the positions and masks on each grid, every engine at the
scheduled side, the compiled step once per side, and a scheduled run that resumes exactly."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import TINY
from test_cli import error_of
from test_loaders import ENGINES, take
from test_train import config, metrics

from supmae import create_model
from supmae.cli.main import main
from supmae.core.errors import SupmaeError
from supmae.models.fast import apply_kernels
from supmae.models.pos_embed import on_grid, sincos_2d
from supmae.pipelines.masking import MaskSampler
from supmae.pipelines.resolution import MAX_SIZES, parse_resolution_schedule
from supmae.profiling.config import ProfileConfig
from supmae.profiling.profiler import profile
from supmae.runtime.hardware import apply_compile
from supmae.training.checkpoint import load_checkpoint
from supmae.training.config import PretrainConfig
from supmae.training.loop import pretrain


def official_positions(dim: int, grid: int) -> np.ndarray:
    """MAE's util/pos_embed.get_2d_sincos_pos_embed(dim, grid, cls_token=True), as its code computes it: numpy
    float64, meshgrid(w, h), the first half of the channels from the column index."""
    def one_axis(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    w, h = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    emb = np.concatenate([one_axis(dim // 2, w), one_axis(dim // 2, h)], axis=1)
    return np.concatenate([np.zeros([1, dim]), emb], axis=0)


def test_positions_at_224_are_the_official_ones_and_a_smaller_grid_takes_its_own():
    table = sincos_2d(768, 14)
    torch.testing.assert_close(table, torch.from_numpy(official_positions(768, 14)).float(), rtol=0, atol=1e-6)
    for grid in (6, 10, 13):
        assert torch.equal(on_grid(table[None], 14, grid)[0], sincos_2d(768, grid))
        assert torch.equal(on_grid(table[None, 1:], 14, grid)[0], sincos_2d(768, grid, cls_token=False))


def test_ramps_follow_ffcvs_rule_and_stages_hold_from_their_epoch():
    ramp = parse_resolution_schedule("160-224@10-90", 16)
    for epoch in range(100):
        # FFCV ImageNet's get_resolution, rounded to the patch size where it rounds to 32.
        expected = 160 if epoch <= 10 else 224 if epoch >= 90 else \
            int(np.round(np.interp(epoch, [10, 90], [160, 224]) / 16)) * 16
        assert ramp.size_at(epoch) == expected
    assert ramp.sizes == (160, 176, 192, 208, 224) and ramp.final_epoch == 90
    stages = parse_resolution_schedule("128@0,192@40,224@80", 16)
    assert [stages.size_at(e) for e in (0, 39, 40, 79, 80, 400)] == [128, 128, 192, 192, 224, 224]
    assert stages.patches(128) == 64


@pytest.mark.parametrize("text, message", [
    ("160-224", "is neither a ramp"),
    ("160-224@9-3", "the ramp's last epoch must come after its first"),
    ("128@1,224@9", "stages start at epoch 0"),
    ("128@0,224@9,192@5", "their epochs increase"),
    ("150-224@0-9", "150 is not a multiple of the patch size 16"),
    ("16-224@0-100", f"at most {MAX_SIZES}"),
])
def test_a_bad_schedule_is_one_line(text, message):
    with pytest.raises(SupmaeError, match=message):
        parse_resolution_schedule(text, 16)


@pytest.mark.parametrize("schedule, message", [
    ("32@0,96@1", "96 is larger than the model's side 64"),
    ("48-64@0-9", "reaches its last side at epoch 9, beyond the run's 2 epochs"),
    ("16@0,64@1", "must keep at least one of 1 patches at side 16"),
    ("40@0,64@1", "40 is not a multiple of the patch size 16"),
])
def test_the_cli_refuses_a_schedule_the_run_cannot_take(capsys, synth_folder, tmp_path, schedule, message):
    err = error_of(capsys, "pretrain", "--data", synth_folder, "--output", str(tmp_path), "--model",
                   "supmae_vit_tiny_patch16", "--img-size", "64", "--batch-size", "8", "--steps", "12",
                   "--workers", "0", "--no-progress", "--resolution-schedule", schedule)
    assert message in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "metrics.jsonl")


@pytest.mark.parametrize("engine, kind", [e for e in ENGINES if e[1] != "raw" or e[0] == "ffcv"])
def test_every_engine_yields_the_scheduled_side_with_the_same_crops(coordinates, engine, kind):
    """16 images a batch, 32 an epoch: two batches per side. The crops are the unscheduled run's at that side
    (the torch and DALI engines draw them from (seed, epoch, index); FFCV draws its own, so only its sides and
    masks are compared)."""
    pytest.importorskip("nvidia.dali" if engine == "dali" else engine)
    schedule = parse_resolution_schedule("16@0,24@1,32@2", 8)
    batches = take(engine, coordinates[kind], 5, resolution=schedule, start=1)
    sides = [b.images.shape[-1] for b in batches]
    assert sides == [16, 24, 24, 32, 32] and all(b.images.shape[-2] == b.images.shape[-1] for b in batches)
    for b, side in zip(batches, sides):  # masks over each side's own grid, at the ratio
        assert b.masking is not None
        kept = (1 - b.masking.mask).sum(1)
        assert b.masking.mask.shape[1] == (side // 8) ** 2 and (kept == int((side // 8) ** 2 * 0.25)).all()
    if engine != "ffcv":
        for start, index in ((2, 1), (4, 3)):
            fixed = take(engine, coordinates[kind], 1, img_size=sides[index], start=start)[0]
            assert torch.equal(fixed.images, batches[index].images)


def test_masks_keep_the_ratio_on_every_grid():
    sampler = MaskSampler(196, 0.75, seed=0, device="cpu")
    for patches in (64, 100, 144, 196):
        masking = sampler(6, index=3, num_patches=patches)
        assert masking.mask.shape == (6, patches) and masking.ids_keep.shape == (6, int(patches * 0.25))
        assert (masking.mask.sum(1) == patches - int(patches * 0.25)).all()
    assert torch.equal(sampler(6, 3).ids_keep, sampler(6, 3, 196).ids_keep)


def test_the_fast_path_and_the_official_forward_agree_at_every_side():
    model = create_model("supmae_vit_tiny_patch16", num_classes=4, **dict(TINY, img_size=48, patch_size=8))
    fast = apply_kernels(model, "eager")
    labels = torch.arange(4)
    for side in (16, 32, 48):
        images, noise = torch.randn(4, 3, side, side), torch.rand(4, (side // 8) ** 2)
        reference = model(images, labels, noise=noise)
        masking = model.masking_for(images, noise, None)
        out = fast(images, labels, masking=masking)
        torch.testing.assert_close(out.loss, reference.loss, rtol=1e-5, atol=1e-6)
        assert reference.pred.shape[1] == (side // 8) ** 2


def test_the_compiled_step_compiles_once_per_side(monkeypatch):
    """Dynamo's graphs, caught by a backend that records each (inductor would generate code for each, once, at
    a cost the test need not pay): one per side, each static in every shape."""
    graphs = []

    def backend(graph, example_inputs):
        values = [node.meta.get("example_value") for node in graph.graph.nodes if node.op == "placeholder"]
        graphs.append(any(isinstance(v, torch.SymInt) or isinstance(v, torch.Tensor)
                          and any(isinstance(size, torch.SymInt) for size in v.shape) for v in values))
        return graph.forward

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, mode, **kw: compile_(fn, backend=backend, **kw))
    torch._dynamo.reset()
    model = create_model("supmae_vit_tiny_patch16", num_classes=4, **TINY)
    forward = apply_compile(apply_kernels(model, "eager"))
    sampler = MaskSampler(16, 0.75, seed=0, device="cpu")
    for index, side in enumerate((16, 24, 32, 24, 16, 32, 32)):
        masking = sampler(4, index, (side // 8) ** 2)
        forward(torch.randn(4, 3, side, side), torch.arange(4), masking=masking).loss.backward()
    assert graphs == [False, False, False]


def test_a_scheduled_run_resumes_exactly_and_evaluates_at_full_size(synth_folder, tmp_path):
    """48 images in batches of 8: 6 steps an epoch at 32, 48 and 64; the metrics say each step's side."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run = dict(steps=18, checkpoint_every=9, resolution_schedule="32@0,48@1,64@2")
    pretrain(config(synth_folder, straight, **run))
    records = metrics(straight)
    assert [r["img_size"] for r in records] == [32] * 6 + [48] * 6 + [64] * 6
    resumed.mkdir()
    shutil.copy(straight / "checkpoint-00000009.pt", resumed)
    pretrain(config(synth_folder, resumed, resume="auto", **run))
    for a, b in zip(records[9:], metrics(resumed), strict=True):
        assert a["img_size"] == b["img_size"] and a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7)
    with open(straight / "config.json") as f:
        assert json.load(f)["resolution_schedule"] == "32@0,48@1,64@2"
    with pytest.raises(SupmaeError, match="resolution_schedule"):  # a resume cannot change the schedule
        pretrain(config(synth_folder, resumed, resume="auto", steps=18, resolution_schedule="32@0,64@1"))
    model = create_model("supmae_vit_tiny_patch16", img_size=64, num_classes=4)
    model.load_state_dict(load_checkpoint(str(straight / "checkpoint-00000018.pt"))["model"], strict=True)
    model.eval()
    features = model.features(torch.randn(2, 3, 64, 64))
    assert features.shape == (2, model.embed_dim) and torch.isfinite(features).all()


def test_log_lines_split_where_the_side_changes(synth_folder, tmp_path):
    pretrain(config(synth_folder, tmp_path, steps=12, log_every=4, resolution_schedule="32@0,64@1"))
    assert [(r["step"], r["img_size"]) for r in metrics(tmp_path)] == [(4, 32), (6, 32), (8, 64), (12, 64)]


def test_profile_records_each_steps_side(synth_folder, tmp_path):
    """Six batches an epoch: the loop's seventh step is the first at the second epoch's side."""
    run = PretrainConfig.of(data=synth_folder, model="supmae_vit_tiny_patch16", img_size=64, batch_size=8,
                            workers=0, steps=12, resolution_schedule="32@0,64@1")
    report = profile(ProfileConfig(run=run, steps=4, warmup=3, window=2, out=str(tmp_path)))
    stages = report["stages"]
    assert stages["loader"]["img_size"] == stages["step"]["img_size"] == 32
    assert stages["end_to_end"]["img_size_by_step"] == [32] * 6 + [64]


def test_finetuning_follows_a_schedule_too(capsys, synth_folder, tmp_path):
    pretrain(config(synth_folder, tmp_path / "run", steps=2))
    checkpoint = str(tmp_path / "run" / "checkpoint-00000002.pt")
    tune = ["finetune", "--checkpoint", checkpoint, "--train", synth_folder, "--val", synth_folder, "--epochs", "2",
            "--batch-size", "8", "--aa", "none", "--workers", "0"]
    assert main([*tune, "--resolution-schedule", "32@0,64@1"]) == 0
    sides = [line.split("side ")[1] for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert sides == ["32", "64"]
    err = error_of(capsys, *tune, "--resolution-schedule", "32@0,64@2")
    assert "reaches its last side at epoch 2, beyond the run's 2 epochs" in err
