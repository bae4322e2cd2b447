"""Named model configurations, timm-style: `create_model("supmae_vit_base_patch16", mask_ratio=0.8)`, and
the model a run's configuration trains. The names are read without importing torch (the CLI checks
--model before it loads anything heavy)."""

_ENCODERS = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
    "huge": dict(embed_dim=1280, depth=32, num_heads=16),
}
# SupMAE's official decoder is one block; MAE's is eight, and MAE has no classification branch.
_FAMILIES = {
    "supmae": dict(decoder_embed_dim=512, decoder_depth=1, decoder_num_heads=16, num_classes=1000),
    "mae": dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, num_classes=0),
}
_CONFIGS = {
    f"{family}_vit_{size}_patch16": dict(img_size=224, patch_size=16, mlp_ratio=4.0, **encoder, **decoder)
    for family, decoder in _FAMILIES.items()
    for size, encoder in _ENCODERS.items()
}
OVERRIDES = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "decoder_embed_dim", "decoder_depth",
             "decoder_num_heads", "mlp_ratio", "num_classes", "mask_ratio", "pool", "cls_loss_ratio",
             "temperature", "norm_pix_loss")


def list_models() -> list[str]:
    return sorted(_CONFIGS)


def model_config(name: str, **overrides) -> dict:
    """The constructor arguments `create_model` would use; raises ValueError on unknown names or keys."""
    if name not in _CONFIGS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}")
    unknown = sorted(set(overrides) - set(OVERRIDES))
    if unknown:
        raise ValueError(f"unknown model option(s) {', '.join(unknown)}; allowed: {', '.join(OVERRIDES)}")
    if _CONFIGS[name]["num_classes"] == 0 and overrides.get("num_classes"):
        raise ValueError(f"{name} is an MAE model and has no classification branch")
    return {**_CONFIGS[name], **overrides}


def create_model(name: str, **overrides):
    """A `MaskedAutoencoderViT` of the named configuration, with `overrides`."""
    from supmae.model import MaskedAutoencoderViT
    return MaskedAutoencoderViT(**model_config(name, **overrides))


def build_model(cfg, num_classes: int):
    """The model a run of `cfg` (a PretrainConfig) trains, on data with `num_classes` classes (MAE models
    have no branch)."""
    from supmae.errors import SupmaeError
    try:
        supervised = model_config(cfg.model)["num_classes"] != 0
        return create_model(
            cfg.model, img_size=cfg.img_size, mask_ratio=cfg.mask_ratio, norm_pix_loss=cfg.norm_pix_loss,
            **(dict(num_classes=num_classes, pool=cfg.pool, cls_loss_ratio=cfg.cls_loss_ratio,
                    temperature=cfg.temperature) if supervised else {}))
    except ValueError as error:
        raise SupmaeError(str(error)) from None


def print_models(cfg=None) -> None:
    """`supmae models`."""
    print("\n".join(list_models()))
