"""The official recipes: every default of pretrain, finetune and eval linear as SupMAE's and MAE's code and
instructions have it (README's recipe table names the sources), and the pieces they are built from."""
import math

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from supmae.evaluation.config import FinetuneConfig, LinearConfig
from supmae.evaluation.finetune import layer_decay_groups
from supmae.models.families import recipe_of
from supmae.pipelines.augment import CLASSIFIER_CROP_SCALE
from supmae.training.config import PretrainConfig
from supmae.training.optim import LARS, build_optimizer, lr_at

SPLITS = dict(checkpoint=__file__, train=__file__, val=__file__)


def test_every_default_is_the_official_recipe():
    run = PretrainConfig.of()
    assert (run.model, run.blr, run.weight_decay, run.min_lr, run.supmae.cls_loss_ratio, run.supmae.temperature,
            run.trunk.norm_pix_loss, run.trunk.img_size) == ("supmae_vit_base_patch16", 1.5e-4, 0.05, 0.0, 0.01,
                                                              10.0, True, 224)
    assert run.effective("mask_ratio") == 0.75 and run.effective("decoder_depth") == 1
    assert PretrainConfig.of(model="mae_vit_base_patch16").effective("decoder_depth") == 8
    # SupMAE PRETRAIN.md: 400 epochs, 20 of warm-up; MAE PRETRAIN.md: 800 and 40
    assert (run.recipe.pretrain_epochs, run.recipe.pretrain_warmup_epochs) == (400, 20)
    assert (recipe_of("mae_vit_large_patch16").pretrain_epochs, recipe_of("mae_vit_large_patch16")
            .pretrain_warmup_epochs) == (800, 40)

    tune = FinetuneConfig.of(**SPLITS)
    assert (tune.batch_size, tune.accum_iter, tune.weight_decay, tune.min_lr, tune.smoothing, tune.mixup,
            tune.cutmix, tune.warmup_epochs) == (1024, 1, 0.05, 1e-6, 0.1, 0.8, 1.0, 5)
    # util/datasets.py: timm's create_transform with --aa rand-m9-mstd0.5-inc1, --reprob 0.25 (pixel, one box),
    # bicubic, and timm's default crop scale
    assert (tune.aa, tune.reprob, CLASSIFIER_CROP_SCALE) == ("rand-m9-mstd0.5-inc1", 0.25, (0.08, 1.0))
    assert tune.epochs is tune.blr is tune.layer_decay is tune.drop_path is None  # the family's, below
    recipes = {name: recipe_of(f"{name}_patch16") for name in ("supmae_vit_base", "mae_vit_base", "mae_vit_large",
                                                                "mae_vit_huge")}
    assert [(r.finetune_epochs, r.finetune_blr, r.finetune_layer_decay, r.finetune_drop_path)
            for r in recipes.values()] == [(100, 1e-3, 0.65, 0.1), (100, 5e-4, 0.65, 0.1), (50, 1e-3, 0.75, 0.2),
                                           (50, 1e-3, 0.75, 0.3)]

    probe = LinearConfig.of(**SPLITS)
    assert (probe.blr, probe.weight_decay, probe.warmup_epochs, probe.micro_batch, probe.pool) == \
        (0.1, 0.0, 10, 512, "token")
    assert probe.epochs is probe.batch_size is None
    assert [(r.linear_batch, r.linear_epochs) for r in recipes.values()] == [(8192, 90), (16384, 90), (16384, 50),
                                                                            (16384, 50)]


def test_lars_update_equals_a_hand_computation():
    weight = torch.tensor([[3.0, 0.0], [0.0, 4.0]], requires_grad=True)  # |w| = 5
    bias = torch.tensor([1.0, -1.0], requires_grad=True)
    optimizer = LARS([weight, bias], lr=0.5, weight_decay=0.1, momentum=0.9, trust_coefficient=0.001)
    grads = [(torch.tensor([[1.0, 2.0], [2.0, 0.0]]), torch.tensor([0.5, 0.5])),
             (torch.tensor([[0.0, 1.0], [1.0, 1.0]]), torch.tensor([-1.0, 2.0]))]
    w, b = weight.detach().clone(), bias.detach().clone()
    mu_w, mu_b = torch.zeros_like(w), torch.zeros_like(b)
    for g_w, g_b in grads:
        weight.grad, bias.grad = g_w.clone(), g_b.clone()
        optimizer.step()
        update = g_w + 0.1 * w  # weight decay, then the trust ratio, for the 2-D weight alone
        update = update * (0.001 * w.norm() / update.norm())
        mu_w, mu_b = 0.9 * mu_w + update, 0.9 * mu_b + g_b
        w, b = w - 0.5 * mu_w, b - 0.5 * mu_b
        torch.testing.assert_close(weight.detach(), w)
        torch.testing.assert_close(bias.detach(), b)
    frozen = torch.zeros(2, 2, requires_grad=True)  # a zero weight takes the gradient unscaled
    optimizer = LARS([frozen], lr=1.0, momentum=0.0)
    frozen.grad = torch.ones(2, 2)
    optimizer.step()
    assert torch.equal(frozen.detach(), -torch.ones(2, 2))


def test_layer_decay_groups_for_vit_b_have_the_official_scales():
    vit = VisionTransformer(embed_dim=768, depth=12, num_heads=12, global_pool="avg", num_classes=1000)
    groups = layer_decay_groups(vit, 0.05, 0.65)
    scales = {id(p): (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}
    named = dict(vit.named_parameters())
    for name in ("cls_token", "pos_embed"):  # layer 0, and timm's no_weight_decay list
        assert scales[id(named[name])] == (0.65 ** 13, 0.0)
    assert scales[id(named["patch_embed.proj.weight"])] == (0.65 ** 13, 0.05)
    assert scales[id(named["patch_embed.proj.bias"])] == (0.65 ** 13, 0.0)
    for block in range(12):  # block i is layer i + 1 of 13
        assert scales[id(named[f"blocks.{block}.attn.qkv.weight"])] == (0.65 ** (12 - block), 0.05)
        assert scales[id(named[f"blocks.{block}.norm1.weight"])] == (0.65 ** (12 - block), 0.0)
    for name in ("fc_norm.weight", "head.bias"):
        assert scales[id(named[name])] == (1.0, 0.0)
    assert scales[id(named["head.weight"])] == (1.0, 0.05)
    assert len(groups) == 2 * 14 and len(scales) == len(named)


def test_pretraining_decays_the_official_parameters():
    """timm's add_weight_decay as the official pretraining calls it: no decay on 1-D parameters and biases only,
    so the cls token and the mask token are decayed; the fixed positions are not trained at all."""
    from supmae import create_model
    model = create_model("supmae_vit_tiny_patch16", img_size=32, num_classes=3)
    decayed = {id(p) for g in build_optimizer(model, 1e-3, 0.05, fused=False).param_groups
               if g["weight_decay"] for p in g["params"]}
    named = dict(model.named_parameters())
    assert id(named["cls_token"]) in decayed and id(named["mask_token"]) in decayed
    assert id(named["blocks.0.attn.qkv.weight"]) in decayed and id(named["blocks.0.attn.qkv.bias"]) not in decayed
    assert id(named["cls_head.1.weight"]) not in decayed  # the branch's BatchNorm
    assert not named["pos_embed"].requires_grad


@pytest.mark.parametrize("step, expected", [(0, 0.0), (5, 0.5), (10, 1.0), (55, 0.5 * (1 + math.cos(math.pi / 2)))])
def test_the_schedule_is_per_step_warmup_then_half_cosine(step, expected):
    assert lr_at(step, peak=1.0, warmup=10, total=100) == pytest.approx(expected)
    assert lr_at(100, peak=1.0, warmup=10, total=100, min_lr=1e-6) == pytest.approx(1e-6)
