import json
import os

import pytest
import torch
from test_cli import error_of

from supmae.cli.main import main
from supmae.pipelines.synthetic import CLASS_NAMES, MANIFEST, write_synthetic
from supmae.training.metrics import Metrics


def test_file_list_that_is_not_utf8_text_or_not_csv(capsys, tmp_path):
    latin1 = tmp_path / "labels.csv"
    latin1.write_bytes("path,label\ncaf\xe9.jpg,a\n".encode("latin-1"))
    err = error_of(capsys, "pretrain", "--data", str(latin1), "--output", str(tmp_path / "run"))
    assert f"{latin1} is not UTF-8 text" in err
    huge = tmp_path / "huge.tsv"
    huge.write_text("x" * 200_000 + "\ta\n")  # past the csv module's field size limit
    err = error_of(capsys, "pretrain", "--data", str(huge), "--output", str(tmp_path / "run"))
    assert f"{huge} is not a readable file list: field larger than field limit" in err


def test_visualize_wants_an_image_file_name_before_any_model_work(capsys, monkeypatch, checkpoint, synth_folder,
                                                                  tmp_path):
    monkeypatch.setattr("supmae.evaluation.visualize.load_pretrained",
                        lambda *_: pytest.fail("the model was loaded first"))
    for out in ("grid", "grid.xyz", "grid.psd"):  # PIL reads .psd but cannot write it
        err = error_of(capsys, "visualize", "--checkpoint", checkpoint, "--data", synth_folder,
                       "--out", str(tmp_path / out))
        assert err.endswith(f"give an image file name such as {tmp_path / 'grid'}.png"), err


def test_export_makes_the_folder_and_reports_failed_writes(capsys, checkpoint, tmp_path):
    out = tmp_path / "new" / "folder" / "encoder.safetensors"
    assert main(["export", checkpoint, str(out)]) == 0
    assert out.stat().st_size > 0 and os.listdir(out.parent) == ["encoder.safetensors"]
    (tmp_path / "file").write_text("")
    err = error_of(capsys, "export", checkpoint, str(tmp_path / "file" / "x.safetensors"))
    assert err.endswith(f"{tmp_path / 'file'} is a file, not a folder"), err
    too_long = str(tmp_path / ("x" * 300 + ".safetensors"))
    assert f"cannot write {too_long}" in error_of(capsys, "export", checkpoint, too_long)
    state = torch.load(checkpoint, weights_only=True)  # a model that pooled otherwise than timm can
    state["config"]["pool"] = "max"
    torch.save(state, tmp_path / "max.pt")
    assert error_of(capsys, "export", str(tmp_path / "max.pt"), str(tmp_path / "max.safetensors")).endswith(
        "pooled with 'max', which timm's ViT computes differently: pass --global-pool avg or token")
    assert main(["export", str(tmp_path / "max.pt"), str(tmp_path / "max.safetensors"), "--global-pool", "avg"]) == 0


def test_finetune_checks_its_output_folder_before_training(capsys, monkeypatch, checkpoint, synth_folder,
                                                           tmp_path):
    def no_training(*args, **kwargs):
        pytest.fail("fine-tuning started before --output was checked")
    monkeypatch.setattr("supmae.evaluation.finetune.timm_vit", no_training)
    (tmp_path / "file").write_text("")
    splits = ("--checkpoint", checkpoint, "--train", synth_folder, "--val", synth_folder)
    err = error_of(capsys, "finetune", *splits, "--output", str(tmp_path / "file"))
    assert err == f"supmae: error: --output {tmp_path / 'file'} is a file, not a folder"
    assert "Not a directory" in error_of(capsys, "finetune", *splits, "--output", str(tmp_path / "file" / "ft"))


def test_resume_drops_the_torn_last_line_of_a_killed_run(tmp_path):
    good = [json.dumps(dict(step=step, loss=1.0 / step)) + "\n" for step in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(good) + '{"step": 4, "lo')
    with Metrics(str(tmp_path), step=3, enabled=True, tensorboard=False) as metrics:
        metrics.write(dict(step=4, loss=0.25))
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines(keepends=True)
    assert lines == good + [json.dumps(dict(step=4, loss=0.25)) + "\n"]
    with Metrics(str(tmp_path), step=2, enabled=True, tensorboard=False):
        pass
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(good[:2])


def test_a_shared_dataset_published_first_is_kept_and_used(tmp_path):
    path = str(tmp_path / "synthetic")
    assert write_synthetic(path, num_classes=2, images_per_class=2, workers=1, shared=True) == path
    (tmp_path / "synthetic" / "in use").write_text("")  # stands for a reader of the first copy
    # a writer that finishes second
    assert write_synthetic(path, num_classes=2, images_per_class=2, workers=1, shared=True) == path
    assert sorted(os.listdir(tmp_path)) == ["synthetic"]  # its own copy is gone
    assert sorted(os.listdir(path)) == ["0000_circle_stripes", "0001_triangle_stripes", CLASS_NAMES, "in use", MANIFEST]
    with pytest.raises(OSError):  # a target that is not a finished dataset is neither replaced nor taken
        write_synthetic(str(tmp_path / "synthetic" / "0000_circle_stripes"), num_classes=2, images_per_class=2,
                        workers=1, shared=True)


def test_a_seed_past_what_the_generators_take_is_refused(capsys, synth_folder, tmp_path):
    err = error_of(capsys, "pretrain", "--data", synth_folder, "--output", str(tmp_path), "--seed", str(2**64))
    assert err == "supmae: error: --seed: must be at least 0 and at most 4294967295, got 18446744073709551616"


def test_a_conversion_writes_only_a_file_named_beton(capsys, synth_folder, tmp_path):
    err = error_of(capsys, "convert", synth_folder, str(tmp_path / "data"), "--no-progress")
    assert err.endswith("should end in .beton, as --data expects of a converted file")
    assert os.listdir(tmp_path) == []


def test_synth_replaces_only_its_own_output(capsys, tmp_path, monkeypatch):
    (tmp_path / "mine" / "notes").mkdir(parents=True)
    (tmp_path / "mine" / "notes" / "todo.txt").write_text("precious")
    err = error_of(capsys, "synth", str(tmp_path / "mine"), "--classes", "2", "--images-per-class", "1", "--force")
    assert err.endswith("holds files that are not a synthetic dataset; --force replaces only a dataset supmae synth "
                        "wrote")
    assert (tmp_path / "mine" / "notes" / "todo.txt").read_text() == "precious"
    data = tmp_path / "data"
    assert main(["synth", str(data), "--classes", "2", "--images-per-class", "1", "--workers", "1"]) == 0
    monkeypatch.chdir(data)
    assert "holds the current folder" in error_of(capsys, "synth", ".", "--classes", "2", "--images-per-class", "1",
                                                  "--force")
    assert (data / MANIFEST).exists()
    monkeypatch.chdir(tmp_path)
    assert main(["synth", str(data), "--classes", "3", "--images-per-class", "1", "--workers", "1", "--force"]) == 0
    assert len([p for p in os.listdir(data) if os.path.isdir(data / p)]) == 3


def test_export_onto_a_folder_names_a_file_instead(capsys, checkpoint, tmp_path):
    err = error_of(capsys, "export", checkpoint, str(tmp_path))
    assert err == (f"supmae: error: OUT {tmp_path} is a directory; give a file name such as "
                   f"{tmp_path / 'encoder.safetensors'}")


def test_workers_past_four_per_core_are_capped_with_a_warning(caplog):
    from supmae.runtime.hardware import loader_workers
    cores = os.cpu_count() or 2
    assert loader_workers(1000) == 4 * cores and loader_workers(None) == max(1, cores - 1) and loader_workers(0) == 0
    assert [r.getMessage() for r in caplog.records] == [f"--workers 1000 on {cores} cores: using {4 * cores}, as "
                                                        "more would only compete for the cores"]


def test_an_image_size_no_batch_fits_is_refused_before_any_allocation(capsys, synth_folder, tmp_path):
    err = error_of(capsys, "pretrain", "--data", synth_folder, "--output", str(tmp_path), "--img-size", "100000",
                   "--device", "cpu")
    assert err.startswith("supmae: error: --img-size 100000: one batch of 64 images alone needs 7152.6 GiB, more "
                          "than the ")


def test_an_error_naming_a_file_with_a_line_break_stays_one_line(capsys, folder_with_a_bad_image, tmp_path):
    bad = os.path.join(folder_with_a_bad_image, "b", "2.jpg")
    os.rename(bad, os.path.join(folder_with_a_bad_image, "b", "2\nbad.jpg"))
    err = error_of(capsys, "pretrain", "--data", folder_with_a_bad_image, "--model", "supmae_vit_tiny_patch16",
                   "--img-size", "32", "--batch-size", "6", "--steps", "2", "--workers", "0", "--output",
                   str(tmp_path / "out"), "--no-progress")
    assert "cannot read image" in err and "2\\nbad.jpg" in err


def test_finetune_keeps_an_earlier_result_unless_forced(capsys, monkeypatch, checkpoint, synth_folder, tmp_path):
    monkeypatch.setattr("supmae.evaluation.finetune.timm_vit", lambda *_: pytest.fail("fine-tuning started first"))
    (tmp_path / "model.safetensors").write_bytes(b"an earlier result")
    err = error_of(capsys, "finetune", "--checkpoint", checkpoint, "--train", synth_folder, "--val", synth_folder,
                   "--output", str(tmp_path))
    assert err == f"supmae: error: {tmp_path / 'model.safetensors'} exists; pass --force to replace it"
    assert (tmp_path / "model.safetensors").read_bytes() == b"an earlier result"


def test_finetune_checks_the_room_for_its_result_before_training(capsys, monkeypatch, checkpoint, synth_folder,
                                                                  tmpfs):
    disk = tmpfs(1)
    monkeypatch.setattr("torch.optim.AdamW", lambda *_, **__: pytest.fail("fine-tuning started first"))
    err = error_of(capsys, "finetune", "--checkpoint", checkpoint, "--train", synth_folder, "--val", synth_folder,
                   "--output", str(disk))
    assert err.startswith(f"supmae: error: {disk} has 1 MiB free; the fine-tuned model needs about ")
    assert os.listdir(disk) == []
