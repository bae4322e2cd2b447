"""Models by name, timm-style: `create_model("supmae_vit_base_patch16", mask_ratio=0.8)`, and the model a
run's configuration trains. What each name means is data (`families`); the rules that join its options
with its architecture are checked here, once, on every way a model is built."""
import importlib

from supmae.core.errors import SupmaeError
from supmae.core.options import Config
from supmae.models.families import TrunkOptions, family_of, model_config, option_names
from supmae.models.trunk import MaskedViT
from supmae.pipelines.masking import num_kept


def create_model(name: str, **overrides) -> MaskedViT:
    """The named model with `overrides` (its architecture's, the trunk's and its family's options): a
    `MaskedAutoencoderViT` (SupMAE, MAE) or a `CLIPViT` (CLIP, FLIP, MAE-CLIP). ValueError (a SupmaeError)
    names what is wrong with them."""
    family = family_of(name)
    config = model_config(name, **overrides)
    TrunkOptions.of(**{key: overrides[key] for key in option_names(TrunkOptions) if key in overrides})  # as given
    options = family.options.of(**{key: config.pop(key) for key in option_names(family.options)})
    _check_architecture(**config)
    module, cls = family.model.split(":")
    return getattr(importlib.import_module(module), cls)(**config, options=options)


def build_model(name: str, run: Config, num_classes: int) -> MaskedViT:
    """The model `name` as the run configuration `run` sets it (the sections the families declare), for data
    of `num_classes` classes (used by the families that classify). Options left unset take the model's values."""
    family = family_of(name)
    chosen = {**run.section_of(TrunkOptions).values(), **run.section_of(family.options).values()}
    if family.classifies:
        chosen["num_classes"] = num_classes
    try:
        return create_model(name, **chosen)
    except ValueError as error:
        raise SupmaeError(str(error)) from None


def _check_architecture(*, img_size: int, patch_size: int, embed_dim: int, num_heads: int, decoder_embed_dim: int,
                        decoder_num_heads: int, decoder_depth: int, mask_ratio: float, **_) -> None:
    """What the options' own ranges cannot say: how they fit the architecture."""
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise SupmaeError(message)

    need(img_size % patch_size == 0, f"img_size {img_size} must be a multiple of patch_size {patch_size}")
    need(embed_dim % num_heads == 0, f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
    need(decoder_embed_dim % decoder_num_heads == 0,
         f"decoder_embed_dim {decoder_embed_dim} is not divisible by decoder_num_heads {decoder_num_heads}")
    need(embed_dim % 4 == 0 and decoder_embed_dim % 4 == 0,
         "embed_dim and decoder_embed_dim must be divisible by 4 (sin-cos position embeddings)")
    _check_mask((img_size // patch_size) ** 2, mask_ratio, decoder_depth > 0)


def check_sides(model: MaskedViT, sides) -> None:
    """That `model` trains at each of `sides` (a resolution schedule's): its mask keeps and removes patches
    on each side's grid too. The schedule has put them on the patch grid, at most img_size."""
    for side in sides:
        _check_mask((side // model.patch_size) ** 2, model.mask_ratio, model.reconstructs, f" at side {side}")


def _check_mask(num_patches: int, mask_ratio: float, reconstructs: bool, where: str = "") -> None:
    kept = num_kept(num_patches, mask_ratio)
    if kept == 0:
        raise SupmaeError(f"mask_ratio {mask_ratio} must keep at least one of {num_patches} patches{where}")
    if reconstructs and kept == num_patches:
        raise SupmaeError(f"mask_ratio {mask_ratio} must remove at least one of {num_patches} patches{where} for the "
                          "decoder to reconstruct")
