"""What a run does when it is stopped, killed or diverges."""
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_cli import REPO
from test_train import config, metrics

from supmae.core.errors import SupmaeError
from supmae.training.checkpoint import list_checkpoints, load_checkpoint
from supmae.training.loop import pretrain


def start(*args):
    return subprocess.Popen([sys.executable, "-m", "supmae", "pretrain", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": REPO})


def wait_for(condition, process, timeout=300):
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def arguments(data, output, steps, *extra):
    return ["--data", data, "--output", str(output), "--model", "supmae_vit_tiny_patch16", "--img-size", "32",
            "--batch-size", "4", "--steps", str(steps), "--warmup-steps", "5", "--lr", "1e-3", "--workers", "0",
            "--log-every", "1", "--no-progress", *extra]


def logged_steps(output):
    path = os.path.join(output, "metrics.jsonl")
    return sum(1 for _ in open(path)) if os.path.exists(path) else 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_finishes_the_step_checkpoints_and_exits_0(synth_folder, tmp_path, signum):
    run = start(*arguments(synth_folder, tmp_path, 100_000, "--checkpoint-every", "0"))
    wait_for(lambda: logged_steps(tmp_path) >= 3, run)
    run.send_signal(signum)
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, err
    stopped_at = metrics(tmp_path)[-1]["step"]
    assert f"stopped by {signal.Signals(signum).name} at step {stopped_at}" in out
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path))] == [f"checkpoint-{stopped_at:08d}.pt"]
    assert load_checkpoint(list_checkpoints(str(tmp_path))[0])["step"] == stopped_at


@pytest.mark.parametrize("engine", ["torch", "dali"])
def test_sigterm_to_the_whole_process_group_still_checkpoints(synth_folder, tmp_path, engine):
    """What Slurm, Docker and Kubernetes send: the loader's workers get it too, and must leave it to the run."""
    run = subprocess.Popen([sys.executable, "-m", "supmae", "pretrain", *arguments(
        synth_folder, tmp_path, 100_000, "--checkpoint-every", "0", "--workers", "2", "--loader", engine)], cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": REPO},
        start_new_session=True)
    wait_for(lambda: logged_steps(tmp_path) >= 3, run)
    os.killpg(run.pid, signal.SIGTERM)
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, err
    assert "stopped by SIGTERM" in out and "Traceback" not in err
    assert load_checkpoint(list_checkpoints(str(tmp_path))[-1])["step"] == metrics(tmp_path)[-1]["step"]


def test_a_killed_run_resumes_onto_the_uninterrupted_curve(synth_folder, tmp_path):
    steps = 60  # the kill comes at the second checkpoint (step 20), with 40 steps still to go
    straight = start(*arguments(synth_folder, tmp_path / "straight", steps, "--checkpoint-every", "10"))
    assert straight.wait(timeout=600) == 0, straight.communicate()
    killed = tmp_path / "killed"
    run = start(*arguments(synth_folder, killed, steps, "--checkpoint-every", "10"))
    wait_for(lambda: len(list_checkpoints(str(killed))) >= 2, run)
    run.kill()  # SIGKILL: no handler, no last checkpoint
    run.communicate()
    saved = load_checkpoint(list_checkpoints(str(killed))[-1])["step"]
    assert saved < steps, "the run ended before it could be killed"
    partial = killed / ".checkpoint-00000999.pt.partial-12345"  # what a kill during a checkpoint write leaves
    partial.write_bytes(b"half a checkpoint")
    resumed = start(*arguments(synth_folder, killed, steps, "--checkpoint-every", "10", "--resume", "auto"))
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert "resumed from" in out and f"at step {saved}" in out
    assert not partial.exists() and f"removed {partial}" in out
    a, b = metrics(tmp_path / "straight"), metrics(killed)
    assert [r["step"] for r in b] == list(range(1, steps + 1))  # steps logged after the checkpoint were dropped
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5, abs=1e-7), x["step"]


@pytest.mark.parametrize("checkpoint_every", [20, 3])  # 3: checkpoints fall between the log steps
def test_a_diverging_loss_stops_naming_its_first_step(synth_folder, tmp_path, checkpoint_every):
    cfg = config(synth_folder, tmp_path, steps=40, lr=1e6, warmup_steps=0, log_every=20,
                 checkpoint_every=checkpoint_every, keep_checkpoints=2)
    with pytest.raises(SupmaeError, match=r"loss stopped being finite at step \d+; stopping") as raised:
        pretrain(cfg)
    first = int(str(raised.value).split("at step ")[1].split(";")[0])
    assert all(r["step"] >= first for r in metrics(tmp_path) if not math.isfinite(r["loss"]))  # found between syncs
    for path in list_checkpoints(str(tmp_path)):  # what was kept was saved before the divergence
        state = load_checkpoint(path)
        assert state["step"] < first and all(torch.isfinite(t).all() for t in state["model"].values())


def test_a_damaged_newer_checkpoint_never_costs_the_good_one(synth_folder, tmp_path):
    pretrain(config(synth_folder, tmp_path, steps=3, keep_checkpoints=1))
    good = tmp_path / "checkpoint-00000003.pt"
    damaged = tmp_path / "checkpoint-00000010.pt"  # a copy cut short, newer than the run's own
    damaged.write_bytes(good.read_bytes()[:1000])
    pretrain(config(synth_folder, tmp_path, steps=4, keep_checkpoints=1, checkpoint_every=1, resume="auto"))
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*.pt")) == ["checkpoint-00000004.pt", damaged.name]
    assert load_checkpoint(str(tmp_path / "checkpoint-00000004.pt"))["step"] == 4
    pretrain(config(synth_folder, tmp_path, steps=5, keep_checkpoints=1, checkpoint_every=1, resume="auto"))
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3, 4, 5]  # continued from 4, not from 0


def test_a_second_run_on_a_folder_in_use_is_refused(capsys, synth_folder, tmp_path):
    from test_cli import error_of

    from supmae.core.lock import exclusive
    from supmae.training.loop import LOCK
    with exclusive(str(tmp_path / LOCK), "the first run's folder"):  # as a run in another process holds it
        err = error_of(capsys, *["pretrain", *arguments(synth_folder, tmp_path, 2)])
    assert err == (f"supmae: error: --output {tmp_path} is in use by process {os.getpid()}: wait for it to "
                   "finish, or choose another")
    assert not list(tmp_path.glob("checkpoint-*")) and not (tmp_path / "metrics.jsonl").exists()
    pretrain(config(synth_folder, tmp_path, steps=1))  # released: the folder is free again


def test_a_full_disk_is_one_line_and_the_last_checkpoint_survives(capsys, synth_folder, tmpfs):
    """Room for one checkpoint of supmae_vit_tiny_patch16 (about 112 MiB), not two."""
    from test_cli import error_of
    small_disk = tmpfs(200)
    run = arguments(synth_folder, small_disk / "run", 2, "--checkpoint-every", "1", "--keep-checkpoints", "3")
    err = error_of(capsys, "pretrain", *run)
    assert f"{small_disk / 'run'} has " in err and "MiB free; a checkpoint needs about " in err
    assert [os.path.basename(p) for p in list_checkpoints(str(small_disk / "run"))] == ["checkpoint-00000001.pt"]
    assert load_checkpoint(list_checkpoints(str(small_disk / "run"))[0])["step"] == 1
    assert [p for p in os.listdir(small_disk / "run") if "partial" in p] == []
    err = error_of(capsys, "pretrain", *run, "--resume", "auto")  # the disk still full: refused before training
    assert "MiB free; a checkpoint needs about " in err
    assert [os.path.basename(p) for p in list_checkpoints(str(small_disk / "run"))] == ["checkpoint-00000001.pt"]
