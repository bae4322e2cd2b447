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
    "supmae": dict(decoder_embed_dim=512, decoder_depth=1, decoder_num_heads=16, num_classes=1000, mask_ratio=0.75,
                   pool="avg"),
    "mae": dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, num_classes=0, mask_ratio=0.75),
}
_CONFIGS = {
    f"{family}_vit_{size}_patch16": dict(img_size=224, patch_size=16, mlp_ratio=4.0, **encoder, **decoder)
    for family, decoder in _FAMILIES.items()
    for size, encoder in _ENCODERS.items()
}
# CLIP's text towers by size, as open_clip's small configurations have them (ViT-S-16-alt: 256 wide, 10
# layers), and the shared embedding; MAE-CLIP adds a cross-modal decoder (its depth is not published; four
# blocks, as in between SupMAE's one and MAE's eight) and reconstructs 75% of the patches.
_TEXT = {
    "tiny": dict(text_width=256, text_depth=6, text_heads=4, proj_dim=256),
    "small": dict(text_width=256, text_depth=10, text_heads=4, proj_dim=256),
    "base": dict(text_width=512, text_depth=12, text_heads=8, proj_dim=512),
}
_CLIP_FAMILIES = {
    "clip": dict(decoder_depth=0, mask_ratio=0.0, pool="token"),
    "maeclip": dict(decoder_embed_dim=512, decoder_depth=4, decoder_num_heads=16, mask_ratio=0.75, pool="token"),
}
_CONFIGS.update({
    f"{family}_vit_{size}_patch16": dict(img_size=224, patch_size=16, mlp_ratio=4.0, **_ENCODERS[size], **text,
                                         **decoder)
    for family, decoder in _CLIP_FAMILIES.items()
    for size, text in _TEXT.items()
})
OVERRIDES = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "decoder_embed_dim", "decoder_depth",
             "decoder_num_heads", "mlp_ratio", "num_classes", "mask_ratio", "pool", "cls_loss_ratio",
             "temperature", "norm_pix_loss")
CLIP_OVERRIDES = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "mask_ratio", "pool",
                  "proj_dim", "text_width", "text_depth", "text_heads", "decoder_embed_dim", "decoder_depth",
                  "decoder_num_heads", "norm_pix_loss", "text_reconstruction", "clip_weight", "image_weight",
                  "text_weight", "text_masked_max")


def list_models() -> list[str]:
    return sorted(_CONFIGS)


def is_text_model(name: str) -> bool:
    """CLIP and MAE-CLIP models train on image-text data."""
    return name.startswith(tuple(f"{family}_" for family in _CLIP_FAMILIES))


def model_config(name: str, **overrides) -> dict:
    """The constructor arguments `create_model` would use; raises ValueError on unknown names or keys."""
    if name not in _CONFIGS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}")
    allowed = CLIP_OVERRIDES if is_text_model(name) else OVERRIDES
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ValueError(f"unknown model option(s) {', '.join(unknown)} for {name}; allowed: {', '.join(allowed)}")
    if _CONFIGS[name].get("num_classes", 1) == 0 and overrides.get("num_classes"):
        raise ValueError(f"{name} is an MAE model and has no classification branch")
    return {**_CONFIGS[name], **overrides}


def create_model(name: str, **overrides):
    """The model of the named configuration, with `overrides`: a `MaskedAutoencoderViT` (SupMAE, MAE) or a
    `CLIPViT` (CLIP, FLIP, MAE-CLIP)."""
    if is_text_model(name):
        from supmae.clip import CLIPViT
        return CLIPViT(**model_config(name, **overrides))
    from supmae.model import MaskedAutoencoderViT
    return MaskedAutoencoderViT(**model_config(name, **overrides))


_OPTION_KEYS = dict(decoder_width="decoder_embed_dim")  # a run's option -> the model's argument


def effective(cfg, key: str):
    """A run's (PretrainConfig's) option `key`, or where it is left unset, the value its model takes."""
    value = getattr(cfg, key)
    return model_config(cfg.model).get(_OPTION_KEYS.get(key, key)) if value is None else value


def build_model(cfg, num_classes: int):
    """The model a run of `cfg` (a PretrainConfig) trains, on data with `num_classes` classes (MAE models
    have no branch; CLIP models use no labels). Options left unset take the model's own values."""
    from supmae.errors import SupmaeError
    chosen = dict(img_size=cfg.img_size, norm_pix_loss=cfg.norm_pix_loss, mask_ratio=cfg.mask_ratio, pool=cfg.pool,
                  decoder_depth=cfg.decoder_depth, decoder_embed_dim=cfg.decoder_width)
    if is_text_model(cfg.model):
        chosen.update(clip_weight=cfg.clip_weight, image_weight=cfg.image_weight, text_weight=cfg.text_weight,
                      text_reconstruction=cfg.text_reconstruction)
    elif model_config(cfg.model)["num_classes"]:
        chosen.update(num_classes=num_classes, cls_loss_ratio=cfg.cls_loss_ratio, temperature=cfg.temperature)
    else:
        chosen.pop("pool")  # MAE has no branch to pool for
    try:
        return create_model(cfg.model, **{k: v for k, v in chosen.items() if v is not None})
    except ValueError as error:
        raise SupmaeError(str(error)) from None


def print_models(cfg=None) -> None:
    """`supmae models`."""
    print("\n".join(list_models()))
