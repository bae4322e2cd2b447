import math

import torch

from supmae.models.objective import classification_loss, norm_pix, patchify, reconstruction_loss


def test_patchify_order_is_p_q_c():
    images = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    patches = patchify(images, 2)  # 2 x 3 grid of 2x2 patches
    assert patches.shape == (2, 6, 12)
    b, row, col = 1, 1, 2
    expected = [images[b, c, row * 2 + p, col * 2 + q].item() for p in range(2) for q in range(2) for c in range(3)]
    assert patches[b, row * 3 + col].tolist() == expected


def test_norm_pix_uses_unbiased_variance():
    patch = torch.tensor([[1.0, 2.0, 4.0, 7.0]])
    mean = 3.5
    var = sum((v - mean) ** 2 for v in [1, 2, 4, 7]) / 3  # n - 1
    expected = [(v - mean) / math.sqrt(var + 1e-6) for v in [1, 2, 4, 7]]
    assert torch.allclose(norm_pix(patch), torch.tensor([expected]), atol=1e-6)


def test_reconstruction_loss_averages_removed_patches_only():
    pred = torch.zeros(1, 3, 2)
    target = torch.tensor([[[1.0, 1.0], [2.0, 0.0], [3.0, 3.0]]])  # per-patch MSE: 1, 2, 9
    mask = torch.tensor([[1.0, 0.0, 1.0]])
    assert reconstruction_loss(pred, target, mask).item() == (1 + 9) / 2


def test_classification_loss_is_scaled_tempered_cross_entropy():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    scaled = [v / 10 for v in (2.0, 0.0, -1.0)]
    ce = -(scaled[1] - math.log(sum(math.exp(v) for v in scaled)))
    loss = classification_loss(logits, torch.tensor([1]), ratio=0.01, temperature=10.0)
    assert math.isclose(loss.item(), 0.01 * ce, rel_tol=1e-6)
