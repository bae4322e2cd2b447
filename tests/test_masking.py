import pytest
import torch

from supmae.pipelines.masking import MaskSampler, num_kept, random_masking


@pytest.mark.parametrize("length,ratio", [(196, 0.75), (49, 0.5), (16, 0.9), (10, 0.33)])
def test_masking_invariants(length, ratio):
    kept = num_kept(length, ratio)
    assert kept == int(length * (1 - ratio))
    noise = torch.rand(7, length)
    ids_keep, ids_restore, mask, ids_removed = random_masking(noise, kept)
    assert ids_keep.shape == (7, kept) and ids_restore.shape == (7, length) and mask.shape == (7, length)
    # exactly kept kept per sample, and the kept ones are those the mask marks 0
    assert torch.equal(mask.sum(1), torch.full((7,), float(length - kept)))
    assert torch.equal(mask.gather(1, ids_keep), torch.zeros(7, kept))
    # the kept patches are the lowest-noise ones
    assert torch.equal(ids_keep.sort(1).values, noise.topk(kept, dim=1, largest=False).indices.sort(1).values)
    # ids_restore inverts the shuffle: shuffled[ids_restore] is the identity
    ids_shuffle = torch.argsort(noise, dim=1)
    assert torch.equal(ids_shuffle.gather(1, ids_restore), torch.arange(length).expand(7, -1))
    assert torch.equal(ids_shuffle[:, :kept], ids_keep)


def test_mask_sampler_depends_only_on_seed_and_index():
    a, b = MaskSampler(16, 0.75, seed=3, device="cpu"), MaskSampler(16, 0.75, seed=3, device="cpu")
    first = a(5, index=2)
    a(5, index=0)  # drawing other batches in between changes nothing
    assert all(torch.equal(x, y) for x, y in zip(first, b(5, index=2)))
    assert all(torch.equal(x, y) for x, y in zip(first, a(5, index=2)))
    assert not torch.equal(first.ids_keep, a(5, index=3).ids_keep)
    assert not torch.equal(first.ids_keep, MaskSampler(16, 0.75, seed=4, device="cpu")(5, index=2).ids_keep)
