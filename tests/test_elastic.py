"""Elastic runs: a run is its global batch, and any split of it on the ranks there are trains the same steps."""
import json
import os
import shutil
import socket

import pytest
import torch
from test_cli import error_of
from test_distributed import WORLD, pretrain_cli

from supmae.core.errors import SupmaeError
from supmae.pipelines.split import Split
from supmae.runtime.distributed import World, apply_batchnorm_groups
from supmae.training.checkpoint import load_checkpoint
from supmae.training.elastic import Groups, first_split, resume_split

SUPMAE = Groups(batchnorm=4)  # a run begun on 2 ranks x 4 without --sync-bn


def resume(saved: Split, groups: Groups = SUPMAE, *, world_size=1, batch_size=None, accum=None, global_batch=None):
    return resume_split(saved, groups, world_size=world_size, batch_size=batch_size or saved.batch_size,
                        accum=accum, global_batch=global_batch)


def test_a_new_run_takes_accumulation_from_the_global_batch():
    assert first_split(world_size=2, batch_size=4, accum=None, global_batch=None) == Split(4, 2, 1)
    assert first_split(world_size=2, batch_size=4, accum=3, global_batch=None) == Split(4, 2, 3)
    assert first_split(world_size=2, batch_size=4, accum=None, global_batch=32) == Split(4, 2, 4)
    assert first_split(world_size=2, batch_size=4, accum=4, global_batch=32) == Split(4, 2, 4)
    with pytest.raises(SupmaeError, match="--global-batch 30 is not a multiple of 2 rank"):
        first_split(world_size=2, batch_size=4, accum=None, global_batch=30)
    with pytest.raises(SupmaeError, match="is not 2 rank.* x --accum-iter 3 = 24"):
        first_split(world_size=2, batch_size=4, accum=3, global_batch=32)


def test_the_groups_a_run_begins_with():
    assert Groups.first(Split(4, 2), classifies=True, contrastive=False, sync_bn=False) == Groups(batchnorm=4)
    assert Groups.first(Split(4, 2), classifies=True, contrastive=False, sync_bn=True) == Groups(batchnorm=8)
    assert Groups.first(Split(4, 2, 3), classifies=False, contrastive=True, sync_bn=False) == Groups(contrastive=8)
    assert Groups.first(Split(4, 2), classifies=False, contrastive=False, sync_bn=True) == Groups()


def test_when_only_the_ranks_change_the_per_rank_batch_and_accumulation_follow():
    two = Split(4, 2)
    assert resume(two) == Split(4, 1, 2)                         # the same micro-batch, accumulated
    assert resume(two, world_size=4) == Split(2, 4, 1)          # a smaller one where it no longer fits
    assert resume(Split(4, 1, 2), world_size=2) == Split(4, 2, 1)
    assert resume(Split(8, 1), Groups(batchnorm=8), world_size=2) == Split(4, 2, 1)  # BatchNorm over both ranks
    assert resume(Split(8, 1), Groups(batchnorm=8), world_size=8) == Split(1, 8, 1)
    # A contrastive loss scores the micro-batch on every rank: that stays 8, so the per-rank batch grows.
    assert resume(two, Groups(contrastive=8), world_size=1) == Split(8, 1, 1)
    assert resume(Split(4, 2, 2), Groups(contrastive=8), world_size=1) == Split(8, 1, 2)


def test_a_changed_per_rank_batch_or_accumulation_fixes_the_other():
    two = Split(4, 2)
    assert resume(two, batch_size=8) == Split(8, 1, 1)           # two BatchNorm groups of 4 in each micro-batch
    assert resume(two, batch_size=2, world_size=2) == Split(2, 2, 2)
    assert resume(two, Groups(), accum=4, world_size=1) == Split(2, 1, 4)
    with pytest.raises(SupmaeError, match="groups of 4 images, which micro-batches of 2 on 1 rank.s. cannot form"):
        resume(two, accum=4, world_size=1)  # the head's BatchNorm group of 4 would span micro-batches


@pytest.mark.parametrize("change, message", [
    (dict(global_batch=16), "made with a global batch of 8 .2 rank.s. x 4 images., not --global-batch 16"),
    (dict(world_size=3), "which 3 ranks cannot share equally"),
    (dict(batch_size=3), "1 rank.s. with --batch-size 3 cannot make it"),
    (dict(batch_size=8, accum=2), "1 rank.s. x 8 images x 2 micro-batches make 16"),
    (dict(world_size=16, groups=Groups(contrastive=8), saved=Split(4, 2, 2)),
     "no split of it on 16 rank.s. keeps its groups: the contrastive loss"),
])
def test_what_cannot_keep_the_run_is_refused(change, message):
    with pytest.raises(SupmaeError, match=message):
        resume(change.pop("saved", Split(4, 2)), change.pop("groups", SUPMAE), **change)


def test_a_contrastive_run_refuses_a_split_that_changes_what_it_scores_against():
    with pytest.raises(SupmaeError, match="scores each image against the 8 images of its micro-batch"):
        resume(Split(4, 2), Groups(contrastive=8), batch_size=4, accum=2)


def test_ghost_batchnorm_normalises_each_group_as_its_own_batch():
    """A micro-batch of 8 holding two BatchNorm groups of 4: outputs and gradients are those of two batches."""
    torch.manual_seed(0)
    x = torch.randn(8, 6, requires_grad=True)
    plain = torch.nn.BatchNorm1d(6)
    with torch.no_grad():
        plain.weight.uniform_(0.5, 1.5)
        plain.bias.uniform_(-1, 1)
    ghost = apply_batchnorm_groups(torch.nn.Sequential(torch.nn.BatchNorm1d(6)), 4, 8, World())
    ghost.load_state_dict({f"0.{k}": v for k, v in plain.state_dict().items()})
    expected = torch.cat([plain(x[:4]), plain(x[4:])])
    out = ghost(x)
    torch.testing.assert_close(out, expected)
    weights = torch.randn(8, 6)
    grads = [torch.autograd.grad((y * weights).sum(), [x, *params])
             for y, params in ((out, list(ghost.parameters())), (expected, list(plain.parameters())))]
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


COMMON = ["--model", "supmae_vit_tiny_patch16", "--img-size", "32", "--steps", "8", "--checkpoint-every", "4",
          "--warmup-steps", "2", "--lr", "1e-3", "--workers", "0", "--log-every", "1", "--no-progress",
          "--no-tensorboard"]


def losses(folder) -> dict[int, dict]:
    with open(folder / "metrics.jsonl") as f:
        return {record["step"]: record for record in map(json.loads, f)}


def assert_same_run(resumed, whole, parts=("loss", "rec_loss", "cls_loss")):
    """Steps 5-8 trained as the uninterrupted run trained them, to the same weights."""
    curves = losses(resumed), losses(whole)
    assert sorted(curves[0]) == [5, 6, 7, 8]
    for step in curves[0]:
        for name in parts:
            assert curves[0][step][name] == pytest.approx(curves[1][step][name], rel=1e-4), (step, name)
    final = [load_checkpoint(str(folder / "checkpoint-00000008.pt"))["model"] for folder in (resumed, whole)]
    # Adam scales every gradient to about lr per step, so where the true gradient is zero (attention's key
    # bias) rounding-level differences become steps of up to lr: weights agree to a few lr, no closer.
    for name, value in final[1].items():
        if value.is_floating_point() and "running" not in name:  # BatchNorm's statistics: not read in training
            torch.testing.assert_close(final[0][name], value, rtol=0, atol=4 * 1e-3, msg=name)


def resumed_copy(run, folder):
    """A new output folder holding `run`'s step-4 checkpoint alone, as a pre-empted run leaves it."""
    folder.mkdir()
    shutil.copy(run / "checkpoint-00000004.pt", folder)
    return folder


def test_two_ranks_resumed_on_one_process_train_the_uninterrupted_run(synth_folder, tmp_path):
    """2 ranks x 4 for 8 steps; from its step-4 checkpoint, one process with the same command (4 x 2
    micro-batches, chosen for it) and one given --batch-size 8 (two BatchNorm groups of 4 in each batch)
    train steps 5-8 as the two ranks did. A changed global batch is refused before any step."""
    whole = tmp_path / "two"
    run = pretrain_cli("--data", synth_folder, *COMMON, "--batch-size", "4", "--output", str(whole), ranks=WORLD)
    assert run.returncode == 0, run.stderr
    for name, extra in (("accumulated", []), ("one-batch", ["--batch-size", "8"])):
        folder = resumed_copy(whole, tmp_path / name)
        run = pretrain_cli("--data", synth_folder, *COMMON, "--batch-size", "4", *extra, "--resume", "auto",
                           "--output", str(folder))
        assert run.returncode == 0, run.stderr
        split = "1 rank(s) x 4 images x 2 micro-batches" if not extra else "1 rank(s) x 8 images"
        assert f"it goes on with {split}, the same global batch of 8" in run.stderr + run.stdout
        assert_same_run(folder, whole)
        saved = load_checkpoint(str(folder / "checkpoint-00000008.pt"))
        assert saved["groups"] == dict(batchnorm=4, contrastive=None)
    folder = resumed_copy(whole, tmp_path / "refused")
    run = pretrain_cli("--data", synth_folder, *COMMON, "--batch-size", "4", "--global-batch", "16", "--resume",
                       "auto", "--output", str(folder))
    assert run.returncode == 1 and "global batch of 8 (2 rank(s) x 4 images), not --global-batch 16" in run.stderr
    assert run.stderr.count("\n") == 1 and not (folder / "metrics.jsonl").exists()


def test_one_process_resumed_on_two_ranks_trains_the_uninterrupted_run(synth_folder, tmp_path):
    """1 x 8 for 8 steps; from step 4 on two ranks of 4, the head's BatchNorm over both (the 8 it began with)."""
    whole = tmp_path / "one"
    run = pretrain_cli("--data", synth_folder, *COMMON, "--batch-size", "8", "--output", str(whole))
    assert run.returncode == 0, run.stderr
    folder = resumed_copy(whole, tmp_path / "two")
    run = pretrain_cli("--data", synth_folder, *COMMON, "--batch-size", "8", "--resume", "auto", "--output",
                       str(folder), ranks=WORLD)
    assert run.returncode == 0, run.stderr
    assert "it goes on with 2 rank(s) x 4 images, the same global batch of 8" in run.stderr + run.stdout
    assert_same_run(folder, whole)


def test_a_contrastive_run_resumed_on_one_process_scores_the_same_global_batch(synth_folder, tmp_path):
    """MAE-CLIP on 2 ranks x 4 scores each image against all 8; resumed on one process, the micro-batch becomes
    8 (not 4 x 2, which would score against 4), with the same patch and caption masks."""
    args = ["--data", synth_folder, *COMMON, "--model", "maeclip_vit_tiny_patch16", "--batch-size", "4"]
    whole = tmp_path / "two"
    run = pretrain_cli(*args, "--output", str(whole), ranks=WORLD)
    assert run.returncode == 0, run.stderr
    folder = resumed_copy(whole, tmp_path / "one")
    run = pretrain_cli(*args, "--resume", "auto", "--output", str(folder))
    assert run.returncode == 0, run.stderr
    assert "it goes on with 1 rank(s) x 8 images, the same global batch of 8" in run.stderr + run.stdout
    assert_same_run(folder, whole, parts=("loss", "clip_loss", "rec_loss", "text_loss"))


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_an_elastic_torchrun_job_that_loses_a_node_goes_on_with_the_rest(synth_folder, tmp_path):
    """`torchrun --nnodes 1:2` (c10d rendezvous) on two agents of one rank each: one agent and its worker are
    killed mid-run; the other's worker fails, its agent restarts it alone, and the run resumes from its last
    checkpoint on one rank, the same global batch in two micro-batches, every step in the metrics once."""
    import subprocess
    import sys
    import time

    import psutil
    from test_distributed import REPO, free_port
    port = free_port()
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1:2", "--nproc_per_node", "1",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id",
                f"elastic-{tmp_path.name}", "--max-restarts", "3", "-m", "supmae", "pretrain", "--data", synth_folder,
                "--model", "supmae_vit_tiny_patch16", "--img-size", "32", "--batch-size", "4", "--steps", "30",
                "--checkpoint-every", "5", "--resume", "auto", "--workers", "0", "--log-every", "1", "--no-progress",
                "--no-tensorboard", "--output", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    agents = []
    try:
        deadline = time.time() + 300
        for _ in range(2):
            agents.append(subprocess.Popen(launcher, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                           text=True, env=env, start_new_session=True))
            while not listening(port):  # the first agent hosts the rendezvous store, and must be the survivor
                assert agents[0].poll() is None and time.time() < deadline, agents[0].communicate()
                time.sleep(0.05)
        metrics = tmp_path / "metrics.jsonl"
        while not (metrics.exists() and metrics.read_text().count("\n") >= 8):  # past the step-5 checkpoint
            assert all(a.poll() is None for a in agents) and time.time() < deadline, agents[0].communicate()
            time.sleep(0.05)
        lost = psutil.Process(agents[1].pid)
        for process in [*lost.children(recursive=True), lost]:
            process.kill()
        out, err = agents[0].communicate(timeout=300)
    finally:
        for agent in agents:
            for process in [*psutil.Process(agent.pid).children(recursive=True)] if agent.poll() is None else []:
                process.kill()
            agent.kill()
    assert agents[0].returncode == 0, err
    assert "it goes on with 1 rank(s) x 4 images x 2 micro-batches, the same global batch of 8" in out + err
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, 31))
    assert load_checkpoint(str(tmp_path / "checkpoint-00000030.pt"))["split"] == dict(batch_size=4, world_size=1,
                                                                                       accum=2)


def test_a_global_batch_that_does_not_split_is_one_line(synth_folder, tmp_path, capsys):
    assert "--global-batch 10 is not a multiple of 1 rank(s) x --batch-size 4" in error_of(
        capsys, "pretrain", "--data", synth_folder, *COMMON, "--batch-size", "4", "--global-batch", "10",
        "--output", str(tmp_path))
