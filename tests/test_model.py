import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY

from supmae import create_model, list_models
from supmae.models.objective import norm_pix, patchify


def official_layout(embed_dim=768, depth=12, decoder_dim=512, decoder_depth=1, patch=16, grid=14,
                    hidden=3072, classes=1000):
    """Key -> shape of the official SupMAE/MAE pretraining state dict (models_supmae.py / models_mae.py)."""
    def block(prefix, d):
        return {f"{prefix}.norm1.weight": (d,), f"{prefix}.norm1.bias": (d,), f"{prefix}.attn.qkv.weight": (3 * d, d),
                f"{prefix}.attn.qkv.bias": (3 * d,), f"{prefix}.attn.proj.weight": (d, d),
                f"{prefix}.attn.proj.bias": (d,), f"{prefix}.norm2.weight": (d,), f"{prefix}.norm2.bias": (d,),
                f"{prefix}.mlp.fc1.weight": (4 * d, d), f"{prefix}.mlp.fc1.bias": (4 * d,),
                f"{prefix}.mlp.fc2.weight": (d, 4 * d), f"{prefix}.mlp.fc2.bias": (d,)}
    n = grid * grid + 1
    layout = {"cls_token": (1, 1, embed_dim), "pos_embed": (1, n, embed_dim),
              "patch_embed.proj.weight": (embed_dim, 3, patch, patch), "patch_embed.proj.bias": (embed_dim,),
              "norm.weight": (embed_dim,), "norm.bias": (embed_dim,),
              "decoder_embed.weight": (decoder_dim, embed_dim), "decoder_embed.bias": (decoder_dim,),
              "mask_token": (1, 1, decoder_dim), "decoder_pos_embed": (1, n, decoder_dim),
              "decoder_norm.weight": (decoder_dim,), "decoder_norm.bias": (decoder_dim,),
              "decoder_pred.weight": (patch * patch * 3, decoder_dim), "decoder_pred.bias": (patch * patch * 3,)}
    for i in range(depth):
        layout.update(block(f"blocks.{i}", embed_dim))
    for i in range(decoder_depth):
        layout.update(block(f"decoder_blocks.{i}", decoder_dim))
    if classes:
        layout.update({"cls_head.0.weight": (hidden, embed_dim), "cls_head.0.bias": (hidden,),
                       "cls_head.1.weight": (hidden,), "cls_head.1.bias": (hidden,),
                       "cls_head.1.running_mean": (hidden,), "cls_head.1.running_var": (hidden,),
                       "cls_head.1.num_batches_tracked": (), "cls_head.3.weight": (classes, hidden),
                       "cls_head.3.bias": (classes,)})
    return layout


@pytest.mark.parametrize("name,layout", [
    ("supmae_vit_base_patch16", official_layout()),
    ("mae_vit_base_patch16", official_layout(decoder_depth=8, classes=0)),
])
def test_state_dict_has_the_official_layout_and_loads_strictly(name, layout):
    model = create_model(name)
    state = model.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == layout
    official = {k: torch.randn(shape) if shape else torch.tensor(7) for k, shape in layout.items()}
    model.load_state_dict(official, strict=True)
    assert torch.equal(model.state_dict()["blocks.3.attn.qkv.weight"], official["blocks.3.attn.qkv.weight"])


def test_released_projection_head_name_is_accepted():
    model = create_model("supmae_vit_tiny_patch16", **TINY, num_classes=5)
    renamed = {k.replace("cls_head.", "projection_head."): v.clone() + 1 for k, v in model.state_dict().items()}
    model.load_state_dict(renamed, strict=True)
    assert torch.equal(model.cls_head[0].weight, renamed["projection_head.0.weight"])


def test_registry_names_and_overrides():
    names = list_models()
    for size in ("tiny", "small", "base", "large", "huge"):
        assert f"supmae_vit_{size}_patch16" in names and f"mae_vit_{size}_patch16" in names
    sup = create_model("supmae_vit_small_patch16", mask_ratio=0.6, num_classes=7, img_size=96)
    assert len(sup.decoder_blocks) == 1 and sup.decoder_embed.out_features == 512
    assert sup.cls_head[-1].out_features == 7 and sup.num_patches == 36
    mae = create_model("mae_vit_small_patch16", img_size=96)
    assert len(mae.decoder_blocks) == 8 and mae.cls_head is None
    with pytest.raises(ValueError, match="unknown model"):
        create_model("vit_giant")
    with pytest.raises(ValueError, match="unknown model option"):
        create_model("supmae_vit_tiny_patch16", drop_path=0.1)
    with pytest.raises(ValueError, match="mask-ratio"):
        create_model("supmae_vit_tiny_patch16", mask_ratio=1.0)
    with pytest.raises(ValueError, match="pool"):
        create_model("supmae_vit_tiny_patch16", pool="median")


def test_initialisation_follows_the_official_recipe():
    model = create_model("supmae_vit_tiny_patch16", **TINY, num_classes=5)
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad
    assert torch.equal(model.pos_embed[0, 0], torch.zeros(32))
    # sin-cos: patch (row 1, col 2) of the 4x4 grid, channel 0 encodes sin(col * omega_0) = sin(2)
    assert math.isclose(model.pos_embed[0, 1 + 1 * 4 + 2, 0].item(), math.sin(2.0), rel_tol=1e-6)
    assert math.isclose(model.pos_embed[0, 1 + 1 * 4 + 2, 16].item(), math.sin(1.0), rel_tol=1e-6)
    fc = model.blocks[0].mlp.fc1
    bound = math.sqrt(6 / (fc.in_features + fc.out_features))
    assert fc.weight.abs().max() <= bound and fc.weight.abs().max() > 0.9 * bound
    assert torch.equal(fc.bias, torch.zeros_like(fc.bias))
    w = model.patch_embed.proj.weight
    assert w.abs().max() <= math.sqrt(6 / (w.shape[0] + w[0].numel()))
    assert torch.equal(model.norm.weight, torch.ones(32)) and 0.01 < model.cls_token.std() < 0.04


def test_forward_outputs_and_total_loss():
    model = create_model("supmae_vit_tiny_patch16", **TINY, num_classes=5).eval()
    images, labels, noise = torch.randn(6, 3, 32, 32), torch.randint(0, 5, (6,)), torch.rand(6, 16)
    out = model(images, labels, noise=noise)
    assert out.pred.shape == (6, 16, 192) and out.mask.shape == (6, 16) and out.logits.shape == (6, 5)
    target = norm_pix(patchify(images, 8))
    per_patch = ((out.pred - target) ** 2).mean(-1)
    expected_rec = (per_patch * out.mask).sum() / out.mask.sum()
    expected_cls = 0.01 * F.cross_entropy(out.logits / 10, labels)
    torch.testing.assert_close(out.rec_loss, expected_rec)
    torch.testing.assert_close(out.cls_loss, expected_cls)
    torch.testing.assert_close(out.loss, expected_rec + expected_cls)
    # the same noise gives the same result; no labels gives the reconstruction loss alone
    again = model(images, noise=noise)
    assert torch.equal(again.rec_loss, out.rec_loss) and again.cls_loss is None
    assert torch.equal(again.loss, out.rec_loss)


def test_encoder_sees_only_visible_patches():
    model = create_model("supmae_vit_tiny_patch16", **TINY, num_classes=5).eval()
    images, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    out = model(images, noise=noise)
    # changing a removed patch's pixels must not change the logits (the branch sees visible patches only)
    removed = int(out.mask[0].nonzero()[0])
    row, col = divmod(removed, 4)
    changed = images.clone()
    changed[0, :, row * 8:(row + 1) * 8, col * 8:(col + 1) * 8] += 5
    torch.testing.assert_close(model(changed, noise=noise).logits, out.logits)


@pytest.mark.parametrize("pool", ["avg", "token", "max", "map"])
def test_every_pooling_trains(pool):
    model = create_model("supmae_vit_tiny_patch16", **TINY, num_classes=5, pool=pool)
    out = model(torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,)))
    out.loss.backward()
    assert out.logits.shape == (4, 5) and model.cls_head[0].weight.grad.abs().sum() > 0


def test_mae_has_no_branch():
    model = create_model("mae_vit_tiny_patch16", **TINY)
    out = model(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))
    assert out.logits is None and out.cls_loss is None and torch.equal(out.loss, out.rec_loss)
    with pytest.raises(ValueError, match="no classification branch"):
        create_model("mae_vit_tiny_patch16", num_classes=10)


def test_tiny_model_overfits_a_fixed_batch():
    # a wider decoder, so random pixels can be memorised
    model = create_model("supmae_vit_tiny_patch16", **{**TINY, "decoder_embed_dim": 128, "decoder_depth": 2},
                         num_classes=4)
    images, labels, noise = torch.randn(4, 3, 32, 32), torch.arange(4), torch.rand(4, 16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    history = []
    for _ in range(200):
        out = model(images, labels, noise=noise)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        history.append((out.rec_loss.item(), out.cls_loss.item()))
    assert history[-1][0] < history[0][0] / 10
    assert history[-1][1] < history[0][1] / 10
