"""After pretraining: a checkpoint's encoder scored (k-NN, linear probe, fine-tuning, zero-shot, retrieval),
exported as a timm ViT, and its reconstructions shown."""
