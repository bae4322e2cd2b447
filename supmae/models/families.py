"""The model families: the class each builds, its own options, what it can do, and its named sizes.

A model option is declared once, as a field of the trunk's options (shared by every family) or of its
family's: `supmae pretrain` takes each as a section, so the field is an option on the command line, in
config files and in checkpoints, and `registry.build_model` hands it to the model, which keeps its
family's as `model.options`. Read without importing torch: the CLI checks --model and every model option
before the stack loads.
"""
import dataclasses

from supmae.core.options import Config, configuration, option

POOLS = ("avg", "token", "max", "map")  # how a head pools the encoder's tokens
GROUP = "model and objective"  # their section of --help


@configuration
class TrunkOptions(Config):
    """The masked trunk's options, which every family shares; left unset, one takes the named model's value."""
    img_size: int = option(224, "image side in pixels", at_least=1, group=GROUP, defines_run=True)
    mask_ratio: float | None = option(None, "share of patches removed (above 0 on a CLIP model: FLIP)",
                                         at_least=0, below=1, group=GROUP, shown="the model's: 0.75, 0 for CLIP",
                                         defines_run=True)
    pool: str | None = option(None, "how the encoder's tokens are pooled for the classification branch or the "
                                       "image embedding", choices=POOLS, group=GROUP,
                                 shown="the model's: avg, token for CLIP", defines_run=True)
    decoder_depth: int | None = option(None, "decoder blocks (MAE-CLIP's cross-modal decoder included)",
                                          at_least=1, group=GROUP, shown="the model's", defines_run=True)
    decoder_embed_dim: int | None = option(None, "decoder width", flag="--decoder-width", at_least=8, group=GROUP,
                                              shown="the model's", defines_run=True)
    norm_pix_loss: bool = option(True, "reconstruct each patch's normalised pixels", group=GROUP)


@configuration
class SupMAEOptions(Config):
    """SupMAE's classification branch on the visible patches (MAE has none, and ignores them)."""
    cls_loss_ratio: float = option(0.01, "weight of the classification loss", at_least=0, group=GROUP)
    temperature: float = option(10.0, "temperature of the classification logits", above=0, group=GROUP)


@configuration
class CLIPOptions(Config):
    """CLIP's, FLIP's and MAE-CLIP's loss weights and caption masking. The MAE-CLIP paper does not publish its
    loss weights; these are M3AE's (arXiv 2205.14204)."""
    clip_weight: float = option(1.0, "CLIP and MAE-CLIP: weight of the contrastive loss", at_least=0, group=GROUP)
    image_weight: float = option(1.0, "MAE-CLIP: weight of the pixel reconstruction loss (M3AE's)", at_least=0,
                                 group=GROUP)
    text_weight: float = option(0.5, "MAE-CLIP: weight of the masked-token loss (M3AE's)", at_least=0, group=GROUP)
    text_mask_ratio: float = option(0.75, "MAE-CLIP: share of each caption's tokens masked (M3AE's)", above=0,
                                    below=1, group=GROUP)
    text_reconstruction: bool = option(True, "MAE-CLIP: reconstruct the masked caption tokens too (off: images "
                                             "only)", group=GROUP, defines_run=True)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The schedule a family's official code pretrains, fine-tunes and linear-probes with: what supmae's options
    left unset take for that family's models. README's recipe table gives each value's source."""
    pretrain_epochs: float            # PRETRAIN.md: SupMAE 400, MAE 800
    pretrain_warmup_epochs: float     # PRETRAIN.md: SupMAE 20, MAE 40
    finetune_epochs: float            # FINETUNE.md: 100 for ViT-B, 50 for MAE's ViT-L/H
    finetune_blr: float               # FINETUNE.md: SupMAE 1e-3, MAE 5e-4 (ViT-B), 1e-3 (ViT-L/H)
    finetune_layer_decay: float       # FINETUNE.md: 0.65 for ViT-B, 0.75 for ViT-L/H
    finetune_drop_path: float         # FINETUNE.md: 0.1 for ViT-B, 0.2 ViT-L, 0.3 ViT-H
    linear_batch: int                 # FINETUNE.md's linear probing: SupMAE 8 x 512 x 2, MAE 32 x 512
    linear_epochs: int                # FINETUNE.md: 90 for ViT-B, 50 for MAE's ViT-L/H


@dataclasses.dataclass(frozen=True)
class Family:
    """A kind of model: the class that builds it, its own options, what it can do, and what every size shares."""
    model: str                 # "module:class" of its model, imported when one is built
    options: type[Config]     # its own options (a section of `supmae pretrain`); the model keeps them as .options
    classifies: bool           # trains a classification branch on the labels
    uses_text: bool            # trains on captions: image-text data
    contrastive: bool          # scores each image against the micro-batch's other images, over every rank
    config: dict               # what every size shares: decoder, mask ratio, pooling
    recipe: Recipe             # its official schedules
    recipe_by_size: dict = dataclasses.field(default_factory=dict)  # size -> what its recipe changes there


_MAE_RECIPE = Recipe(pretrain_epochs=800, pretrain_warmup_epochs=40, finetune_epochs=100, finetune_blr=5e-4,
                     finetune_layer_decay=0.65, finetune_drop_path=0.1, linear_batch=16384, linear_epochs=90)
_MAE_LARGER = {"large": dict(finetune_epochs=50, finetune_blr=1e-3, finetune_layer_decay=0.75, finetune_drop_path=0.2,
                             linear_epochs=50),
               "huge": dict(finetune_epochs=50, finetune_blr=1e-3, finetune_layer_decay=0.75, finetune_drop_path=0.3,
                            linear_epochs=50)}
# SupMAE "basically follows the hyper parameters of MAE with a bit larger learning rate" (its FINETUNE.md), and
# releases ViT-B only. The CLIP family has no official recipe of this kind; it takes MAE's.
_SUPMAE_RECIPE = dataclasses.replace(_MAE_RECIPE, pretrain_epochs=400, pretrain_warmup_epochs=20, finetune_blr=1e-3,
                                     linear_batch=8192)
_MASKED_AUTOENCODER = "supmae.models.mae:MaskedAutoencoderViT"
_CLIP = "supmae.models.clip:CLIPViT"
# SupMAE's official decoder is one block; MAE's is eight, and MAE has no classification branch. MAE-CLIP's
# cross-modal decoder depth is not published: four blocks, between SupMAE's one and MAE's eight.
FAMILIES = {
    "supmae": Family(_MASKED_AUTOENCODER, SupMAEOptions, classifies=True, uses_text=False, contrastive=False,
                     config=dict(decoder_embed_dim=512, decoder_depth=1, decoder_num_heads=16, num_classes=1000,
                                 mask_ratio=0.75, pool="avg"), recipe=_SUPMAE_RECIPE),
    "mae": Family(_MASKED_AUTOENCODER, SupMAEOptions, classifies=False, uses_text=False, contrastive=False,
                  config=dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, num_classes=0,
                              mask_ratio=0.75, pool="avg"), recipe=_MAE_RECIPE, recipe_by_size=_MAE_LARGER),
    "clip": Family(_CLIP, CLIPOptions, classifies=False, uses_text=True, contrastive=True,
                   config=dict(decoder_embed_dim=512, decoder_depth=0, decoder_num_heads=16, mask_ratio=0.0,
                               pool="token", text_masked_max=24), recipe=_MAE_RECIPE),
    "maeclip": Family(_CLIP, CLIPOptions, classifies=False, uses_text=True, contrastive=True,
                      config=dict(decoder_embed_dim=512, decoder_depth=4, decoder_num_heads=16, mask_ratio=0.75,
                                  pool="token", text_masked_max=24), recipe=_MAE_RECIPE),
}
_ENCODERS = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
    "huge": dict(embed_dim=1280, depth=32, num_heads=16),
}
# CLIP's text towers by size, as open_clip's small configurations have them (ViT-S-16-alt: 256 wide, 10
# layers), and the shared embedding.
_TEXT = {
    "tiny": dict(text_width=256, text_depth=6, text_heads=4, proj_dim=256),
    "small": dict(text_width=256, text_depth=10, text_heads=4, proj_dim=256),
    "base": dict(text_width=512, text_depth=12, text_heads=8, proj_dim=512),
}
CONFIGS = {
    f"{name}_vit_{size}_patch16": dict(patch_size=16, mlp_ratio=4.0, **_ENCODERS[size],
                                       **(_TEXT[size] if family.uses_text else {}), **family.config)
    for name, family in FAMILIES.items()
    for size in (_TEXT if family.uses_text else _ENCODERS)
}


def list_models() -> list[str]:
    return sorted(CONFIGS)


def family_of(name: str) -> Family:
    """The family of a named model; ValueError for a name the registry does not hold."""
    if name not in CONFIGS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}")
    return FAMILIES[name.split("_vit_")[0]]


def recipe_of(name: str) -> Recipe:
    """The official schedules for the named model: its family's, as its size changes them."""
    family = family_of(name)
    return dataclasses.replace(family.recipe, **family.recipe_by_size.get(name.split("_")[2], {}))


def option_names(cls: type[Config]) -> list[str]:
    return [opt.name for opt in cls.own_options()]


def model_config(name: str, **overrides) -> dict:
    """Everything the named model is built from, `overrides` laid over it: its architecture, the trunk's options
    (unset ones as the named model has them) and its family's. ValueError on unknown names or keys."""
    family = family_of(name)
    config = {**{opt.name: opt.default for opt in TrunkOptions.own_options()}, **CONFIGS[name]}
    config.update((opt.name, opt.default) for opt in family.options.own_options())
    unknown = sorted(set(overrides) - set(config))
    if unknown:
        raise ValueError(f"unknown model option(s) {', '.join(unknown)} for {name}; allowed: {', '.join(config)}")
    if not family.classifies and overrides.get("num_classes"):
        raise ValueError(f"{name} is an MAE model and has no classification branch")
    config.update((key, value) for key, value in overrides.items() if value is not None)
    return config
