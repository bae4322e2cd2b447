import json
import os
import subprocess
import sys

import pytest

from supmae.cli.main import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, **env):
    """`python -m supmae` from the checkout, as a user would run it."""
    return subprocess.run([sys.executable, "-m", "supmae", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": REPO, **env}, timeout=600)


def error_of(capsys, *args):
    """Runs the CLI in-process and returns its error, one line on stderr (beside any warnings); it must exit
    non-zero with no traceback."""
    try:
        code = main(list(args))
    except SystemExit as exit_:
        code = exit_.code
    err = "\n".join(line for line in capsys.readouterr().err.splitlines() if not line.startswith("warning: "))
    assert code != 0, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("supmae"), err
    return err


def test_bad_paths_are_one_line_errors(capsys, synth_folder, tmp_path):
    assert "does not exist" in error_of(capsys, "pretrain", "--data", str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    assert "no class sub-folders" in error_of(capsys, "pretrain", "--data", str(tmp_path / "empty"))
    (tmp_path / "classes" / "x").mkdir(parents=True)
    assert "no image files" in error_of(capsys, "pretrain", "--data", str(tmp_path / "classes"))
    assert "missing.pt does not exist" in error_of(capsys, "pretrain", "--data", synth_folder, "--resume",
                                                   str(tmp_path / "missing.pt"), "--output", str(tmp_path / "o"),
                                                   "--batch-size", "8")


def test_unreadable_image_is_a_one_line_error(capsys, folder_with_a_bad_image, tmp_path):
    err = error_of(capsys, "pretrain", "--data", folder_with_a_bad_image, "--model", "supmae_vit_tiny_patch16",
                   "--img-size", "32",
                   "--batch-size", "6", "--steps", "2", "--workers", "1", "--output", str(tmp_path / "out"),
                   "--no-progress")
    assert "cannot read image" in err and "2.jpg" in err


@pytest.mark.parametrize("args,expected", [
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "many"], "expected an integer"),
    (["--mask-ratio", "1.5"], "--mask-ratio"),
    (["--steps", "-3"], "--steps"),
    (["--epochs", "2", "--steps", "3"], "give --epochs or --steps, not both"),
    (["--model", "vit_giant"], "--model: 'vit_giant' is not one of clip_vit_base_patch16"),
    (["--pool", "median"], "--pool"),
    (["--precision", "fp8"], "--precision"),
    (["--compile-mode", "fastest"], "--compile-mode"),
    (["--batch-size", "1", "--model", "supmae_vit_tiny_patch16"], "at least 2 images per batch"),
    (["--device", "cuda:0"] if not __import__("torch").cuda.is_available() else ["--device", "tpu"], "device"),
    (["--img-size", "100"], "multiple of patch_size"),
    (["--lr", "0"], "--lr"),
    (["--loader", "magic"], "--loader"),
])
def test_bad_option_values_are_one_line_errors(capsys, synth_folder, tmp_path, args, expected):
    err = error_of(capsys, "pretrain", "--data", synth_folder, "--output", str(tmp_path), "--no-progress", *args)
    assert expected in err


def test_synth_refuses_to_overwrite(capsys, tmp_path):
    (tmp_path / "keep.txt").write_text("precious")
    assert "already exists" in error_of(capsys, "synth", str(tmp_path), "--classes", "2", "--images-per-class", "1")
    assert (tmp_path / "keep.txt").read_text() == "precious"
    assert "--classes" in error_of(capsys, "synth", str(tmp_path / "new"), "--classes", "1")


def test_end_to_end_from_the_checkout(tmp_path):
    data, out = tmp_path / "data", tmp_path / "run"
    made = run_cli("synth", str(data), "--classes", "3", "--images-per-class", "4")
    assert made.returncode == 0, made.stderr
    trained = run_cli("pretrain", "--data", str(data), "--model", "mae_vit_tiny_patch16", "--img-size", "32",
                      "--batch-size", "4", "--steps", "3", "--workers", "1", "--output", str(out), "--log-every", "1")
    assert trained.returncode == 0, trained.stderr
    assert "images/s" in trained.stdout and (out / "checkpoint-00000003.pt").exists()
    assert (out / "metrics.jsonl").read_text().count("\n") == 3
    again = run_cli("pretrain", "--data", str(data), "--model", "mae_vit_tiny_patch16", "--batch-size", "4",
                    "--output", str(out))
    assert again.returncode != 0 and "already holds checkpoints" in again.stderr and "Traceback" not in again.stderr


def test_models_lists_the_registry(capsys):
    assert main(["models"]) == 0
    assert "supmae_vit_base_patch16" in capsys.readouterr().out.split()


def test_the_installed_command_runs():
    """The `supmae` script pyproject.toml installs names a function that exists."""
    script = os.path.join(os.path.dirname(sys.executable), "supmae")
    done = subprocess.run([script, "models"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "supmae_vit_base_patch16" in done.stdout.split(), done.stderr


def test_unwritable_outputs_are_one_line_errors(capsys, synth_folder):
    assert "Not a directory" in error_of(capsys, "pretrain", "--data", synth_folder, "--output", "/dev/null/run",
                                         "--model", "supmae_vit_tiny_patch16", "--batch-size", "8", "--no-progress")
    assert "supmae: error:" in error_of(capsys, "convert", synth_folder, "/dev/null/data.beton", "--no-progress")


def test_config_file_with_command_line_overrides(synth_folder, tmp_path):
    (tmp_path / "run.toml").write_text(f'data = "{synth_folder}"\nmodel = "mae_vit_tiny_patch16"\nimg-size = 32\n'
                                       'batch-size = 4\nepochs = 5\nprogress = false\ntensorboard = false\n'
                                       'workers = 0\nmask-ratio = 0.5\n')
    out = tmp_path / "run"
    assert main(["pretrain", "--config", str(tmp_path / "run.toml"), "--steps", "2", "--batch-size", "8",
                 "--output", str(out)]) == 0
    with open(out / "config.json") as f:
        saved = json.load(f)
    assert (saved["batch_size"], saved["steps"], saved["epochs"]) == (8, 2, None)  # the command line wins
    assert (saved["model"], saved["mask_ratio"], saved["progress"], saved["tensorboard"]) == \
        ("mae_vit_tiny_patch16", 0.5, False, False)
    (tmp_path / "run.yaml").write_text("model: mae_vit_tiny_patch16\nimg-size: 32\ncompile: false\n")
    assert main(["pretrain", "--config", str(tmp_path / "run.yaml"), "--data", synth_folder, "--steps", "1",
                 "--batch-size", "4", "--workers", "0", "--no-progress", "--output", str(tmp_path / "yaml")]) == 0


@pytest.mark.parametrize("text, expected", [
    ("bogus = 1", "unknown option 'bogus'"),
    ("batch-size = 0", "--batch-size: must be at least 1"),
    ("compile = 3", "--compile: expected true or false, got 3"),
    ("x = [", "cannot be parsed"),
])
def test_bad_config_files_are_one_line_errors(capsys, tmp_path, text, expected):
    (tmp_path / "bad.toml").write_text(text + "\n")
    assert expected in error_of(capsys, "pretrain", "--config", str(tmp_path / "bad.toml"))
    assert "does not exist" in error_of(capsys, "pretrain", "--config", str(tmp_path / "none.toml"))


def test_a_resumed_run_takes_its_options_from_the_checkpoint(capsys, synth_folder, tmp_path):
    out = str(tmp_path / "run")
    assert main(["pretrain", "--data", synth_folder, "--output", out, "--model", "supmae_vit_tiny_patch16",
                 "--img-size", "32", "--batch-size", "8", "--mask-ratio", "0.5", "--steps", "2", "--lr", "1e-3",
                 "--warmup-steps", "1", "--workers", "0", "--no-tensorboard", "--no-progress"]) == 0
    assert main(["pretrain", "--output", out, "--resume", "auto", "--steps", "3", "--no-progress"]) == 0
    with open(os.path.join(out, "config.json")) as f:
        saved = json.load(f)
    assert {k: saved[k] for k in ("data", "model", "img_size", "batch_size", "mask_ratio", "lr", "warmup_steps",
                                  "workers", "tensorboard", "steps")} == dict(
        data=synth_folder, model="supmae_vit_tiny_patch16", img_size=32, batch_size=8, mask_ratio=0.5, lr=1e-3,
        warmup_steps=1, workers=0, tensorboard=False, steps=3)  # typed --steps 3 wins over the saved 2
    with open(os.path.join(out, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [2, 3]  # each run logs its last step
    err = error_of(capsys, "pretrain", "--output", out, "--resume", "auto", "--steps", "4", "--batch-size", "4")
    assert "BatchNorm normalises over groups of 8 images, which micro-batches of 4 on 1 rank(s) cannot form" in err


@pytest.mark.parametrize("how", ["module", "file"])
def test_a_benchmark_answers_help_however_it_is_started(tmp_path, how):
    command = ["-m", "benchmarks.suite"] if how == "module" else [os.path.join(REPO, "benchmarks", "suite.py")]
    done = subprocess.run([sys.executable, *command, "--help"], cwd=REPO if how == "module" else tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "the GPU check" in done.stdout, done.stderr
