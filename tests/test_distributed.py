"""Data parallelism on CPU with gloo: two ranks must do exactly what one process with their global batch does."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from conftest import TINY
from test_cli import REPO

from supmae import create_model
from supmae.models.fast import apply_kernels
from supmae.pipelines.masking import MaskSampler
from supmae.pipelines.order import Schedule
from supmae.pipelines.split import Split
from supmae.runtime.distributed import apply_batchnorm_groups, apply_ddp, init_world
from supmae.training.checkpoint import load_checkpoint

WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def batch(size=8):
    generator = torch.Generator().manual_seed(1)
    return torch.randn(size, 3, 32, 32, generator=generator), torch.randint(0, 4, (size,), generator=generator)


def model():
    torch.manual_seed(0)
    return create_model("supmae_vit_tiny_patch16", **TINY, num_classes=4)


def gradients(m):
    return {name: p.grad.clone() for name, p in m.named_parameters() if p.grad is not None}


def _rank_gradients(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    world, device = init_world(torch.device("cpu"))
    m = apply_batchnorm_groups(model(), 8, 4, world)  # --sync-bn: the head's BatchNorm over both ranks' 4
    forward = apply_ddp(apply_kernels(m, "eager"), device)
    images, labels = batch()
    masking = MaskSampler(m.num_patches, 0.75, seed=0, device=device, rank=world.rank, split=Split(4, WORLD))(4, 0)
    mine = slice(4 * rank, 4 * rank + 4)
    forward(images[mine], labels[mine], masking=masking).loss.backward()
    torch.save(gradients(m), os.path.join(out, f"rank{rank}.pt"))
    _compiled_batchnorm_is_eager(world)
    torch.distributed.destroy_process_group()


def _compiled_batchnorm_is_eager(world):
    """torch.compile(fullgraph=True) traces the BatchNorm's all-reduces over the ranks with their gradients, and
    the compiled forward and gradients are eager's."""
    norm = apply_batchnorm_groups(torch.nn.Sequential(torch.nn.BatchNorm1d(6)), 8, 4, world)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(world.rank), requires_grad=True)
    weights = torch.randn(4, 6, generator=torch.Generator().manual_seed(7))
    results = []
    for forward in (norm, torch.compile(norm, fullgraph=True)):
        out = forward(x)
        results.append((out, *torch.autograd.grad((out * weights).sum(), [x, *norm.parameters()])))
    for eager, compiled in zip(*results, strict=True):
        torch.testing.assert_close(compiled, eager)


def test_gradients_are_equal_across_ranks_and_to_one_process(tmp_path):
    mp.spawn(_rank_gradients, args=(free_port(), str(tmp_path)), nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    m = model()
    images, labels = batch()
    masking = MaskSampler(m.num_patches, 0.75, seed=0, device="cpu")(8, 0)
    apply_kernels(m, "eager")(images, labels, masking=masking).loss.backward()
    single = gradients(m)
    assert set(ranks[0]) == set(single) and any(n.startswith("cls_head.1") for n in single)
    for name, grad in single.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        torch.testing.assert_close(ranks[0][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_every_split_of_a_global_batch_trains_the_same_samples_and_masks():
    """One process x 8, two ranks x 4, one process x 4 x 2 micro-batches and two ranks x 2 x 2: each step the
    same 8 samples with the same masks; a rank's micro-batch is a contiguous block of the step's rows."""
    one = Schedule(50, 8, seed=3)
    assert one.batches_per_epoch == 6
    splits = [Split(4, WORLD), Split(4, 1, 2), Split(2, WORLD, 2)]
    for split in splits:
        ranks = [Schedule(50, split.batch_size, seed=3, rank=r, world_size=split.world_size, accum=split.accum)
                 for r in range(split.world_size)]
        assert ranks[0].batches_per_epoch == 6 * split.accum
        for step in (0, 5, 6, 13):  # across an epoch boundary too
            epoch, whole = one.batch(step)
            full = MaskSampler(16, 0.75, seed=0, device="cpu")(8, step)
            for r, schedule in enumerate(ranks):
                sampler = MaskSampler(16, 0.75, seed=0, device="cpu", rank=r, split=split)
                for micro in range(split.accum):
                    index = step * split.accum + micro
                    assert schedule.batch(index)[0] == epoch
                    rows = split.rows(r, micro)
                    assert list(schedule.batch(index)[1]) == list(whole[rows])
                    part = sampler(split.batch_size, index)
                    assert torch.equal(part.mask, full.mask[rows]) and torch.equal(part.ids_keep, full.ids_keep[rows])
        for epoch in range(2):  # together the ranks cover every epoch's batches
            covered = [i for s in ranks for b in range(ranks[0].batches_per_epoch)
                       for i in s.batch(epoch * ranks[0].batches_per_epoch + b)[1]]
            assert len(set(covered)) == len(covered) == 48


def pretrain_cli(*args, ranks=1):
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] if ranks > 1 else []
    return subprocess.run([sys.executable, *launcher, "-m", "supmae", "pretrain", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"})


def test_two_ranks_follow_the_one_process_loss_curve(synth_folder, tmp_path):
    """Under a resolution schedule too: 48 images make 6 steps an epoch, the first at side 32."""
    common = ["--data", synth_folder, "--model", "supmae_vit_tiny_patch16", "--img-size", "64", "--steps", "8",
              "--resolution-schedule", "32@0,64@1", "--warmup-steps", "2", "--lr", "1e-3", "--workers", "0",
              "--log-every", "1", "--no-progress", "--sync-bn", "--no-tensorboard"]
    one = pretrain_cli(*common, "--batch-size", "8", "--output", str(tmp_path / "one"))
    two = pretrain_cli(*common, "--batch-size", "4", "--output", str(tmp_path / "two"), ranks=WORLD)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    assert f"x {WORLD} ranks" in two.stdout and "batch 8" in two.stdout
    curves = []
    for run in ("one", "two"):
        with open(tmp_path / run / "metrics.jsonl") as f:
            curves.append([json.loads(line) for line in f])
    assert [r["step"] for r in curves[1]] == list(range(1, 9))
    assert [r["img_size"] for r in curves[1]] == [32] * 6 + [64] * 2
    for a, b in zip(*curves, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["cls_loss"] == pytest.approx(a["cls_loss"], rel=1e-4)
    final = [load_checkpoint(str(tmp_path / run / "checkpoint-00000008.pt")) for run in ("one", "two")]
    assert final[1]["split"] == dict(batch_size=4, world_size=WORLD, accum=1)
    # Adam scales every gradient to about lr per step, so where the true gradient is zero (attention's key
    # bias) rounding-level differences become steps of up to lr: weights agree to a few lr, no closer.
    for name, value in final[0]["model"].items():
        if value.is_floating_point():
            torch.testing.assert_close(final[1]["model"][name], value, rtol=0, atol=6 * 1e-3, msg=name)


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(synth_folder, tmp_path):
    import signal
    import time

    import psutil
    args = ["--data", synth_folder, "--model", "supmae_vit_tiny_patch16", "--img-size", "32", "--batch-size", "4",
            "--steps", "100000", "--checkpoint-every", "0", "--workers", "0", "--log-every", "1", "--no-progress",
            "--no-tensorboard", "--output", str(tmp_path)]
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                 f"--nproc_per_node={WORLD}", "-m", "supmae", "pretrain", *args], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"})
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        assert launcher.poll() is None and time.time() < deadline, launcher.communicate()
        time.sleep(0.05)
    workers = [p for p in psutil.Process(launcher.pid).children(recursive=True) if "supmae" in " ".join(p.cmdline())]
    assert len(workers) == WORLD
    workers[-1].send_signal(signal.SIGTERM)  # one rank only, as when a scheduler pre-empts one node
    out, err = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, err
    step = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert f"at step {step}" in out and "stopped by" in out
    saved = load_checkpoint(str(tmp_path / f"checkpoint-{step:08d}.pt"))
    assert saved["step"] == step and saved["split"]["world_size"] == WORLD


def test_a_killed_rank_is_restarted_by_torchrun_and_the_run_resumes(synth_folder, tmp_path):
    """`torchrun --max-restarts 1` with `--resume auto`: a rank killed mid-run takes the job down, the restarted
    workers resume from the last checkpoint, and metrics.jsonl holds every step once, in order."""
    import signal
    import time

    import psutil
    args = ["--data", synth_folder, "--model", "supmae_vit_tiny_patch16", "--img-size", "32", "--batch-size", "4",
            "--steps", "30", "--checkpoint-every", "6", "--resume", "auto", "--workers", "0", "--log-every", "1",
            "--no-progress", "--no-tensorboard", "--output", str(tmp_path)]
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                 f"--nproc_per_node={WORLD}", "--max-restarts", "1", "-m", "supmae", "pretrain",
                                 *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"})
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= 8):  # past the step-6 checkpoint
        assert launcher.poll() is None and time.time() < deadline, launcher.communicate()
        time.sleep(0.05)
    workers = [p for p in psutil.Process(launcher.pid).children(recursive=True) if "supmae" in " ".join(p.cmdline())]
    assert len(workers) == WORLD
    workers[-1].send_signal(signal.SIGKILL)  # no chance to save or say goodbye
    out, err = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, err
    assert "resumed from" in out
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, 31))
    assert load_checkpoint(str(tmp_path / "checkpoint-00000030.pt"))["step"] == 30
