"""The masked ViT trunk and the objectives over it (SupMAE, MAE, CLIP, FLIP, MAE-CLIP), their options,
their named configurations, and the fast path that runs them on the kernels."""
