"""`supmae export`: a checkpoint's encoder as a timm ViT checkpoint (safetensors).

    timm.create_model("vit_base_patch16_224", pretrained=True, num_classes=N, global_pool="avg",
                      pretrained_cfg_overlay=dict(file="encoder.safetensors"))

The encoder's parameter names are timm's already; the final norm becomes `fc_norm` for average pooling
(timm normalises after pooling then), and the decoder, mask token and classification branch are left
out. timm's features then equal `MaskedAutoencoderViT.features` with the same pooling.
"""
import logging
import os

from supmae.core.errors import SupmaeError
from supmae.evaluation.classifier import write_safetensors
from supmae.evaluation.config import ExportConfig
from supmae.training.checkpoint import load_checkpoint, saved_config

logger = logging.getLogger(__name__)
_ENCODER = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")


def timm_state_dict(model_state: dict, global_pool: str = "avg") -> dict:
    """The encoder's entries of a model state dict, named for a timm ViT with `global_pool` avg or token."""
    encoder = {k: v for k, v in model_state.items() if k.startswith(_ENCODER)}
    if "pos_embed" not in encoder or not any(k.startswith("blocks.") for k in encoder):
        raise SupmaeError("the checkpoint holds no ViT encoder")
    rename = (lambda k: "fc_norm." + k[len("norm."):] if k.startswith("norm.") else k) if global_pool == "avg" \
        else (lambda k: k)
    return {rename(k): v.detach().contiguous() for k, v in encoder.items()}


def export(cfg: ExportConfig) -> dict:
    out = cfg.out
    if os.path.exists(out) and not cfg.force:
        raise SupmaeError(f"{out} exists; pass --force to replace it")
    state = load_checkpoint(cfg.checkpoint)
    trained = saved_config(state)
    pool = cfg.global_pool or trained.effective("pool")
    if pool not in ("avg", "token"):  # timm's max and map pool the normed tokens otherwise than the trunk does
        raise SupmaeError(f"{trained.model} pooled with {pool!r}, which timm's ViT computes differently: pass "
                          "--global-pool avg or token")
    tensors = timm_state_dict(state["model"], pool)
    config = state.get("config", {})
    metadata = {"format": "pt", "supmae_model": str(config.get("model")), "global_pool": pool,
                "img_size": str(config.get("img_size")), "step": str(state.get("step"))}
    folder = os.path.dirname(os.path.abspath(out))
    try:
        os.makedirs(folder, exist_ok=True)
    except FileExistsError:
        raise SupmaeError(f"cannot write {out}: {folder} is a file, not a folder") from None
    write_safetensors(out, tensors, metadata)
    parameters = sum(t.numel() for t in tensors.values())
    logger.info(f"wrote {out}: {len(tensors)} tensors, {parameters / 1e6:.1f}M parameters of "
                f"{metadata['supmae_model']} (step {metadata['step']}), for timm global_pool={pool!r}")
    return dict(tensors=len(tensors), parameters=parameters, **metadata)
