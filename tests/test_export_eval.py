import json
import os

import pytest
import timm
import torch
from test_cli import error_of
from timm.models.vision_transformer import VisionTransformer

from supmae.cli.main import main
from supmae.evaluation.config import KnnConfig, LinearConfig
from supmae.evaluation.finetune import layer_decay_groups, timm_vit
from supmae.evaluation.knn import eval_knn, knn_top1
from supmae.evaluation.linear import linear_probe
from supmae.evaluation.pretrained import load_pretrained
from supmae.pipelines.synthetic import write_synthetic
from supmae.training.config import PretrainConfig
from supmae.training.loop import pretrain


@pytest.mark.parametrize("pool", ["avg", "token"])
def test_exported_encoder_loads_in_timm_with_our_features(capsys, checkpoint, tmp_path, pool):
    out = str(tmp_path / "encoder.safetensors")
    assert main(["export", checkpoint, out, "--global-pool", pool]) == 0
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=out),
                            num_classes=7, global_pool=pool).eval()
    from safetensors.torch import load_file
    result = vit.load_state_dict(load_file(out), strict=False)
    assert set(result.missing_keys) == {"head.weight", "head.bias"} and not result.unexpected_keys
    ours, _ = load_pretrained(checkpoint, "cpu")
    images = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        assert isinstance(vit, VisionTransformer)
        theirs = vit.forward_head(vit.forward_features(images), pre_logits=True)
        torch.testing.assert_close(theirs, ours.features(images, pool), rtol=1e-5, atol=1e-5)


def test_export_refuses_to_overwrite_and_bad_inputs(capsys, checkpoint, tmp_path):
    out = tmp_path / "encoder.safetensors"
    out.write_bytes(b"keep me")
    assert "pass --force" in error_of(capsys, "export", checkpoint, str(out))
    assert out.read_bytes() == b"keep me"
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert "cannot be read" in error_of(capsys, "export", str(tmp_path / "junk.pt"), str(tmp_path / "x.safetensors"))
    (tmp_path / "noise.pt").write_bytes(os.urandom(3000))  # torch's own words would advise unsafe loading
    assert error_of(capsys, "export", str(tmp_path / "noise.pt"), str(tmp_path / "x.safetensors")).endswith(
        "cannot be read: it is not a file torch.save writes, or it is cut short")
    assert "does not exist" in error_of(capsys, "export", str(tmp_path / "none.pt"), str(tmp_path / "y.safetensors"))


def test_a_checkpoint_is_evaluated_where_its_training_data_is_not(checkpoint, tmp_path):
    state = torch.load(checkpoint, weights_only=True)
    state["config"].update(data=str(tmp_path / "gone"), resume=str(tmp_path / "gone.pt"))
    moved = str(tmp_path / "moved.pt")
    torch.save(state, moved)
    model, trained = load_pretrained(moved, "cpu")
    assert trained.model == "supmae_vit_tiny_patch16" and trained.data is None


def test_knn_votes_by_weighted_neighbours():
    train = torch.nn.functional.normalize(torch.tensor([[1.0, 0], [0.9, 0.1], [0, 1.0], [0.1, 0.9]]), dim=1)
    labels = torch.tensor([0, 0, 1, 1])
    val = torch.nn.functional.normalize(torch.tensor([[1.0, 0.2], [0.2, 1.0], [0.0, 1.0]]), dim=1)
    assert knn_top1((train, labels), (val, torch.tensor([0, 1, 1])), k=3) == 1.0
    assert knn_top1((train, labels), (val, torch.tensor([1, 1, 1])), k=3) == pytest.approx(2 / 3)


@pytest.fixture(scope="module")
def short_runs(tmp_path_factory):
    """Same-length SupMAE and MAE runs on the embedded-style data, and a held-out split drawn with another seed."""
    root = tmp_path_factory.mktemp("short")
    train = write_synthetic(str(root / "train"), num_classes=4, images_per_class=16, seed=0, workers=1)
    val = write_synthetic(str(root / "val"), num_classes=4, images_per_class=20, seed=1, workers=1)
    checkpoints = {}
    for model in ("supmae_vit_tiny_patch16", "mae_vit_tiny_patch16"):
        checkpoints[model] = pretrain(PretrainConfig.of(
            data=train, model=model, img_size=64, batch_size=16, steps=100, warmup_steps=10, lr=1.5e-3, workers=1,
            progress=False, tensorboard=False, output=str(root / model), log_every=50))["checkpoint"]
    return train, val, checkpoints


def test_short_supmae_run_beats_chance_and_a_same_length_mae_run(short_runs):
    train, val, checkpoints = short_runs
    top1 = {m: eval_knn(KnnConfig(checkpoint=c, train=train, val=val, k=10))["top1"] for m, c in checkpoints.items()}
    assert top1["supmae_vit_tiny_patch16"] >= 0.25 + 0.4  # chance is 25%
    assert top1["supmae_vit_tiny_patch16"] > top1["mae_vit_tiny_patch16"] + 0.05  # more than 4 of 80 images


def test_linear_probe_and_finetune_report_top1(capsys, short_runs, tmp_path):
    train, val, checkpoints = short_runs
    supmae = checkpoints["supmae_vit_tiny_patch16"]
    # LARS moves a weight by about lr x 0.001 of its norm a step: the official lr of 3.2 (blr 0.1 at batch 8192)
    # is blr 50 at a batch of 16.
    probed = linear_probe(LinearConfig(checkpoint=supmae, train=train, val=val, epochs=30, batch_size=16, blr=50,
                                       workers=0))
    assert probed["top1"] >= 0.25 + 0.4 and probed["pool"] == "token"
    assert main(["eval", "linear", "--checkpoint", supmae, "--train", train, "--val", val, "--epochs", "2",
                 "--batch-size", "32", "--micro-batch", "16", "--workers", "0"]) == 0
    assert "linear probe top-1" in capsys.readouterr().out
    assert main(["finetune", "--checkpoint", supmae, "--train", train, "--val", val, "--epochs", "2",
                 "--batch-size", "16", "--warmup-epochs", "1", "--mixup", "0.8", "--cutmix", "1.0", "--workers", "0",
                 "--output", str(tmp_path / "ft")]) == 0
    out = capsys.readouterr().out
    accuracy = float(out.split("fine-tuned top-1: ")[1].split("%")[0]) / 100
    assert accuracy >= 0.5 and (tmp_path / "ft" / "model.safetensors").exists()


def test_layer_decay_scales_lr_from_the_head_down(checkpoint):
    vit = timm_vit(checkpoint, 3)
    groups = layer_decay_groups(vit, 0.05, 0.5)
    scale = {id(p): (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}
    layers = len(vit.blocks) + 1
    assert scale[id(vit.head.weight)] == (1.0, 0.05) and scale[id(vit.head.bias)] == (1.0, 0.0)
    assert scale[id(vit.get_parameter(f"blocks.{len(vit.blocks) - 1}.mlp.fc1.weight"))] == (0.5, 0.05)
    assert scale[id(vit.patch_embed.proj.weight)] == (0.5 ** layers, 0.05)
    assert scale[id(vit.pos_embed)] == (0.5 ** layers, 0.0) and scale[id(vit.cls_token)][1] == 0.0
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in vit.parameters() if p.requires_grad)


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_eval_knn_cli(capsys, synth_folder, checkpoint, tmp_path, loader):
    """Evaluation reads through the training engines."""
    assert main(["eval", "knn", "--checkpoint", checkpoint, "--train", synth_folder, "--val", synth_folder,
                 "--loader", loader, "--workers", "0", "--json", str(tmp_path / "knn.json")]) == 0
    assert "k-NN (k=20, T=0.07) top-1" in capsys.readouterr().out
    with open(tmp_path / "knn.json") as f:
        result = json.load(f)
    assert result["val_images"] == result["train_images"] == 48


def test_visualize_writes_the_grid_and_keeps_visible_patches(capsys, checkpoint, synth_folder, tmp_path):
    from PIL import Image

    from supmae.evaluation.visualize import reconstruct, unpatchify
    from supmae.models.objective import patchify
    images = torch.randn(2, 3, 48, 32 + 16)
    assert torch.equal(unpatchify(patchify(images, 16), 16), images)
    model, _ = load_pretrained(checkpoint, "cpu")
    original, visible, _, pasted = reconstruct(model, torch.randn(2, 3, 224, 224))
    kept = visible.abs().sum(1) > 0  # removed patches are zero in the visible view
    assert 0.2 < kept.float().mean() < 0.3  # a quarter of the patches is visible
    torch.testing.assert_close(pasted.permute(0, 2, 3, 1)[kept], original.permute(0, 2, 3, 1)[kept])
    out = tmp_path / "grid.png"
    assert main(["visualize", "--checkpoint", checkpoint, "--data", synth_folder, "--out", str(out),
                 "--images", "3"]) == 0
    assert Image.open(out).size == (4 * (224 + 8), 3 * (224 + 8))


def test_the_compiled_finetune_step_is_the_eager_one():
    """Fine-tuning's fast path (the objective compiled whole, as on a GPU) against its eager twin: the same
    loss and gradients for a batch mixed by the recipe's mixup and cutmix."""
    from supmae.evaluation.config import FinetuneConfig
    from supmae.evaluation.finetune import FinetuneObjective, mixed, mixer
    from supmae.pipelines.batch import Batch
    from supmae.runtime.hardware import apply_compile
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5,
                            global_pool="avg")
    tune = FinetuneConfig.of(checkpoint=__file__, train=__file__, val=__file__, batch_size=8)
    batch = mixed(Batch(torch.randn(8, 3, 32, 32), torch.randint(0, 5, (8,)), None), mixer(tune, 5))
    assert batch.labels.shape == (8, 5)  # soft targets
    objective = FinetuneObjective(vit, tune.smoothing, mixing=True)
    results = []
    for forward in (objective, apply_compile(objective)):
        vit.zero_grad()
        loss = forward(batch.images, batch.labels).loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in vit.parameters() if p.grad is not None]))
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    for compiled_grad, eager_grad in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-4, atol=1e-6)
