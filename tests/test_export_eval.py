import dataclasses

import pytest
import timm
import torch

from supmae.checkpoint import save_checkpoint
from supmae.cli import main
from supmae.evaluate import eval_knn, knn_top1, load_encoder
from supmae.pipelines.synthetic import write_synthetic
from supmae.train import PretrainConfig, build_model, pretrain

from test_cli import error_of


@pytest.fixture
def checkpoint(tmp_path):
    """A fresh supmae_vit_tiny_patch16 at 224, saved as a run would save it."""
    cfg = PretrainConfig(model="supmae_vit_tiny_patch16")
    torch.manual_seed(0)
    model = build_model(cfg, 5)
    path = str(tmp_path / "checkpoint-00000001.pt")
    save_checkpoint(dict(model=model.state_dict(), config=dataclasses.asdict(cfg), classes=list("abcde"), step=1), path)
    return path


@pytest.mark.parametrize("pool", ["avg", "token"])
def test_exported_encoder_loads_in_timm_with_our_features(capsys, checkpoint, tmp_path, pool):
    out = str(tmp_path / "encoder.safetensors")
    assert main(["export", checkpoint, out, "--global-pool", pool]) == 0
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=out),
                            num_classes=7, global_pool=pool).eval()
    from safetensors.torch import load_file
    result = vit.load_state_dict(load_file(out), strict=False)
    assert set(result.missing_keys) == {"head.weight", "head.bias"} and not result.unexpected_keys
    ours, _ = load_encoder(checkpoint, "cpu")
    images = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        theirs = vit.forward_head(vit.forward_features(images), pre_logits=True)
        torch.testing.assert_close(theirs, ours.features(images, pool), rtol=1e-5, atol=1e-5)


def test_export_refuses_to_overwrite_and_bad_inputs(capsys, checkpoint, tmp_path):
    out = tmp_path / "encoder.safetensors"
    out.write_bytes(b"keep me")
    assert "pass --force" in error_of(capsys, "export", checkpoint, str(out))
    assert out.read_bytes() == b"keep me"
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert "cannot be read" in error_of(capsys, "export", str(tmp_path / "junk.pt"), str(tmp_path / "x.safetensors"))
    assert "does not exist" in error_of(capsys, "export", str(tmp_path / "none.pt"), str(tmp_path / "y.safetensors"))


def test_knn_votes_by_weighted_neighbours():
    train = torch.nn.functional.normalize(torch.tensor([[1.0, 0], [0.9, 0.1], [0, 1.0], [0.1, 0.9]]), dim=1)
    labels = torch.tensor([0, 0, 1, 1])
    val = torch.nn.functional.normalize(torch.tensor([[1.0, 0.2], [0.2, 1.0], [0.0, 1.0]]), dim=1)
    assert knn_top1(train, labels, val, torch.tensor([0, 1, 1]), k=3) == 1.0
    assert knn_top1(train, labels, val, torch.tensor([1, 1, 1]), k=3) == pytest.approx(2 / 3)


def test_short_supmae_run_beats_chance_and_a_same_length_mae_run(tmp_path):
    train = write_synthetic(str(tmp_path / "train"), 4, 16, seed=0, workers=1)
    val = write_synthetic(str(tmp_path / "val"), 4, 10, seed=1, workers=1)
    top1 = {}
    for model in ("supmae_vit_tiny_patch16", "mae_vit_tiny_patch16"):
        summary = pretrain(PretrainConfig(data=train, model=model, img_size=64, batch_size=16, steps=100,
                                          warmup_steps=10, lr=1.5e-3, workers=1, progress=False, tensorboard=False,
                                          output=str(tmp_path / model), log_every=50), log=lambda *_: None)
        top1[model] = eval_knn(summary["checkpoint"], train, val, k=10, log=lambda *_: None)["top1"]
    assert top1["supmae_vit_tiny_patch16"] >= 0.25 + 0.4  # chance is 25%
    assert top1["supmae_vit_tiny_patch16"] > top1["mae_vit_tiny_patch16"] + 0.1


def test_eval_knn_cli(capsys, synth_folder, checkpoint, tmp_path):
    assert main(["eval", "knn", "--checkpoint", checkpoint, "--train", synth_folder, "--val", synth_folder,
                 "--workers", "0", "--json", str(tmp_path / "knn.json")]) == 0
    assert "k-NN (k=20, T=0.07) top-1" in capsys.readouterr().out and (tmp_path / "knn.json").exists()
