"""Every Triton kernel against its eager twin, on fresh random inputs over several shapes and dtypes.

On CPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1); outputs are
poisoned with NaN first, so an element a kernel fails to write fails the comparison.
"""
import pytest
import torch

from supmae.kernels.norm_pix_loss import norm_pix_mse_triton
from supmae.kernels.patch_gather import gather_patches_triton
from supmae.models.objective import channel_major, gather_patches, patchify, reconstruction_loss, removed_patch_loss
from supmae.pipelines.masking import num_kept, random_masking

pytestmark = pytest.mark.cuda
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (batch, image height, width, patch size, mask ratio): odd batches, patch sizes 8/14/16, sizes other than 224
SHAPES = [(3, 32, 32, 8, 0.75), (5, 56, 56, 14, 0.5), (1, 48, 48, 16, 0.9), (3, 48, 32, 16, 0.6)]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 5e-3}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("SUPMAE_POISON_OUTPUTS", "1")


def masks(batch, h, w, p, ratio, seed):
    num_patches = (h // p) * (w // p)
    generator = torch.Generator().manual_seed(seed)
    masking = random_masking(torch.rand(batch, num_patches, generator=generator), num_kept(num_patches, ratio))
    return masking, masking.ids_removed


def images_of(batch, h, w, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, h, w, generator=generator).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,h,w,p,ratio", SHAPES)
def test_patch_gather_matches_its_twin(batch, h, w, p, ratio, dtype):
    images = images_of(batch, h, w, dtype, seed=batch + h)
    masking, _ = masks(batch, h, w, p, ratio, seed=p)
    ids = masking.ids_keep.to(DEVICE)
    out = gather_patches_triton(images, ids, p)
    assert out.shape == (batch, ids.shape[1], 3 * p * p) and out.dtype == dtype
    torch.testing.assert_close(out, gather_patches(images, ids, p), rtol=0, atol=0)  # a copy: exact


def test_patch_gather_writes_the_compute_dtype():
    images = images_of(3, 32, 32, torch.float32, seed=2)
    ids = masks(3, 32, 32, 8, 0.75, seed=3)[0].ids_keep.to(DEVICE)
    out = gather_patches_triton(images, ids, 8, torch.bfloat16)
    twin = gather_patches(images, ids, 8, torch.bfloat16)
    assert out.dtype == twin.dtype == torch.bfloat16
    torch.testing.assert_close(twin, gather_patches(images, ids, 8).to(torch.bfloat16), rtol=0, atol=0)
    # The GPU rounds to nearest as the twin does (test_kernels_compile reads its cvt.rn); Triton's
    # interpreter truncates, one bf16 step at most.
    step = 0 if DEVICE == "cuda" else 2 ** -7
    torch.testing.assert_close(out, twin, rtol=step, atol=0)


def test_channel_major_reorders_patch_values_into_the_gather_order():
    images = images_of(2, 32, 32, torch.float32, seed=4)
    ids = torch.arange(16, device=DEVICE).expand(2, -1)
    torch.testing.assert_close(channel_major(patchify(images, 8), 8), gather_patches(images, ids, 8), rtol=0, atol=0)
    weight = torch.randn(192, 5, device=DEVICE)  # a prediction layer's rows: the same values along dim 0
    torch.testing.assert_close(channel_major(weight, 8, dim=0), channel_major(weight.T, 8).T, rtol=0, atol=0)


def test_gathered_patches_embed_like_the_convolution():
    """The (c, i, j) order is the patch-embedding weight's: a matmul with it equals the convolution."""
    images = images_of(2, 32, 32, torch.float32, seed=0)
    conv = torch.nn.Conv2d(3, 24, 8, 8).to(DEVICE)
    masking, _ = masks(2, 32, 32, 8, 0.75, seed=1)
    ids = masking.ids_keep.to(DEVICE)
    rows = gather_patches_triton(images, ids, 8) @ conv.weight.flatten(1).T + conv.bias
    full = conv(images).flatten(2).transpose(1, 2)
    torch.testing.assert_close(rows, torch.gather(full, 1, ids.unsqueeze(-1).expand(-1, -1, 24)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,h,w,p,ratio", SHAPES)
def test_norm_pix_loss_and_gradient_match_the_twin(batch, h, w, p, ratio, dtype, norm):
    images = images_of(batch, h, w, dtype, seed=h * w)
    _, ids_removed = masks(batch, h, w, p, ratio, seed=batch)
    ids_removed = ids_removed.to(DEVICE)
    generator = torch.Generator().manual_seed(7)
    pred = torch.randn(batch, ids_removed.shape[1], 3 * p * p, generator=generator).to(DEVICE, dtype)
    pred_k, pred_e = pred.clone().requires_grad_(), pred.clone().requires_grad_()
    loss_k = norm_pix_mse_triton(pred_k, images, ids_removed, p, norm)
    loss_e = removed_patch_loss(pred_e, images, ids_removed, p, norm)
    (loss_k * 3).backward()
    (loss_e * 3).backward()
    assert pred_k.grad is not None and pred_e.grad is not None
    assert loss_k.dtype == torch.float32 and pred_k.grad.dtype == dtype
    tolerance = TOLERANCE[dtype]
    torch.testing.assert_close(loss_k, loss_e, rtol=1e-5, atol=1e-6)  # both accumulate in float32
    torch.testing.assert_close(pred_k.grad, pred_e.grad, rtol=tolerance,
                               atol=tolerance * pred_e.grad.abs().max().item())


def test_removed_patch_loss_is_the_reference_objective():
    """The twin equals the reference: full prediction, loss averaged over mask == 1."""
    images = images_of(3, 32, 32, torch.float32, seed=3)
    masking, ids_removed = masks(3, 32, 32, 8, 0.75, seed=4)
    pred = torch.randn(3, 16, 192, device=DEVICE)
    ids_removed, mask = ids_removed.to(DEVICE), masking.mask.to(DEVICE)
    from supmae.models.objective import norm_pix
    reference = reconstruction_loss(pred, norm_pix(patchify(images, 8)), mask)
    removed = torch.gather(pred, 1, ids_removed.unsqueeze(-1).expand(-1, -1, 192))
    torch.testing.assert_close(removed_patch_loss(channel_major(removed, 8), images, ids_removed, 8), reference)


def test_kernels_trace_without_graph_breaks():
    images = images_of(2, 32, 32, torch.float32, seed=5)
    masking, ids_removed = masks(2, 32, 32, 8, 0.75, seed=6)
    ids_keep, ids_removed = masking.ids_keep.to(DEVICE), ids_removed.to(DEVICE)

    def step(pred):
        loss = norm_pix_mse_triton(pred, images, ids_removed, 8, True)
        return gather_patches_triton(images, ids_keep, 8).sum() + loss

    explanation = torch._dynamo.explain(step)(torch.randn(2, 12, 192, device=DEVICE, requires_grad=True))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def _model_and_batch(num_classes=4, seed=0):
    from conftest import TINY

    from supmae.models.registry import create_model
    torch.manual_seed(seed)
    model = create_model("supmae_vit_tiny_patch16", num_classes=num_classes, **TINY).to(DEVICE)
    images = images_of(5, 32, 32, torch.float32, seed=seed)
    masking, _ = masks(5, 32, 32, 8, 0.75, seed=seed + 1)
    masking = type(masking)(*(t.to(DEVICE) for t in masking))
    labels = torch.randint(0, max(num_classes, 1), (5,)).to(DEVICE)
    return model, images, labels, masking


def _loss_and_grads(forward, model, images, labels, masking):
    model.zero_grad()
    out = forward(images, labels, masking=masking)
    out.loss.backward()
    return out, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("num_classes", [4, 0])
def test_fast_path_has_the_reference_loss_and_gradients(backend, num_classes):
    """Kernels on or off, the fast path trains the model exactly as its reference forward does."""
    from supmae.models.fast import apply_kernels
    model, images, labels, masking = _model_and_batch(num_classes)
    reference, ref_grads = _loss_and_grads(model, model, images, labels, masking)
    fast, grads = _loss_and_grads(apply_kernels(model, backend), model, images, labels, masking)
    torch.testing.assert_close(fast.loss, reference.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast.rec_loss, reference.rec_loss, rtol=1e-5, atol=1e-6)
    assert set(grads) == set(ref_grads)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_fast_path_under_bf16_autocast_follows_the_reference(backend):
    """Under autocast the two paths round differently (a matmul over gathered patches against the
    convolution), so neither equals the other bit for bit; the fast path must be as close to the float32
    gradients as the reference forward is under the same autocast."""
    from supmae.models.fast import apply_kernels
    model, images, labels, masking = _model_and_batch()
    exact, exact_grads = _loss_and_grads(model, model, images, labels, masking)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        reference, ref_grads = _loss_and_grads(model, model, images, labels, masking)
        fast, grads = _loss_and_grads(apply_kernels(model, backend), model, images, labels, masking)
    assert fast.loss.dtype == reference.loss.dtype == torch.float32
    torch.testing.assert_close(fast.loss, reference.loss, rtol=1e-2, atol=0)
    for name in ref_grads:
        assert grads[name].dtype == ref_grads[name].dtype, name
        # As whole tensors, not element by element: the head's BatchNorm over 5 images amplifies rounding
        # in a few elements, on a GPU more than on a CPU.
        fast_error, ref_error = (_relative(g[name], exact_grads[name]) for g in (grads, ref_grads))
        assert fast_error <= 2 * ref_error + 1e-2, f"{name}: {fast_error:.2e} from float32, reference {ref_error:.2e}"


def _relative(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


# (tokens, mask token): bf16 tokens beside the fp32 mask token parameter is what bf16 autocast gives
@pytest.mark.parametrize("dtype,mask_dtype", [(torch.float32,) * 2, (torch.bfloat16,) * 2,
                                              (torch.bfloat16, torch.float32)])
def test_unshuffle_and_its_gradient_match_the_twin(dtype, mask_dtype):
    from supmae.kernels.unshuffle import unshuffle_triton
    from supmae.models.trunk import unshuffle
    for batch, length, ratio, width in [(3, 16, 0.75, 32), (5, 49, 0.5, 40), (1, 9, 0.9, 1100)]:
        masking = random_masking(torch.rand(batch, length), num_kept(length, ratio))
        ids_keep, ids_restore = masking.ids_keep.to(DEVICE), masking.ids_restore.to(DEVICE)
        tokens = torch.randn(batch, ids_keep.shape[1], width, device=DEVICE, dtype=dtype)
        mask_token = torch.randn(1, 1, width, device=DEVICE, dtype=mask_dtype)
        # strided, as inductor may hand the gradient back: the backward reads it in place
        upstream = torch.randn(batch, width, length, device=DEVICE, dtype=dtype).transpose(1, 2)
        results, strides = [], []
        for op in (lambda t, m, r=ids_restore, k=ids_keep: unshuffle_triton(t, m, r, k),
                   lambda t, m, r=ids_restore: unshuffle(t, m, r)):
            t, m = tokens.clone().requires_grad_(), mask_token.clone().requires_grad_()
            out = op(t, m)
            out.register_hook(lambda grad, seen=strides: seen.append(grad.is_contiguous()))
            (out.float() * upstream.float()).sum().backward()
            results.append((out, t.grad, m.grad))
        assert strides == [False, False]
        (out_k, dt_k, dm_k), (out_e, dt_e, dm_e) = results
        torch.testing.assert_close(out_k, out_e, rtol=0, atol=0)
        torch.testing.assert_close(dt_k, dt_e, rtol=0, atol=0)
        tolerance = TOLERANCE[dtype]
        torch.testing.assert_close(dm_k.float(), dm_e.float(), rtol=tolerance,
                                   atol=tolerance * dm_e.float().abs().max())


def test_backend_choice(monkeypatch, capsys, synth_folder, tmp_path):
    from test_cli import error_of

    from supmae.models.fast import kernel_backend
    assert kernel_backend(torch.device("cpu")) == "eager" and kernel_backend(torch.device("cuda")) == "triton"
    monkeypatch.setenv("SUPMAE_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernel_backend(torch.device("cpu")) == "triton"
    args = ("pretrain", "--data", synth_folder, "--output", str(tmp_path), "--model", "supmae_vit_tiny_patch16",
            "--batch-size", "8", "--no-progress", "--device", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET=1" in error_of(capsys, *args)
    monkeypatch.setenv("SUPMAE_KERNELS", "fast")
    assert "SUPMAE_KERNELS" in error_of(capsys, *args)


def test_compiled_fast_path_with_triton_ops_is_one_graph_under_bf16():
    """What a GPU step compiles: the Triton ops (here in the interpreter) inside torch.compile with
    fullgraph under bf16 autocast; a graph break would be an error. Compiled, the loss follows eager and
    the gradients are as close to float32's as eager's are (inductor fuses, so it rounds elsewhere)."""
    from supmae.models.fast import apply_kernels
    from supmae.runtime.hardware import apply_compile
    model, images, labels, masking = _model_and_batch()
    forward = apply_kernels(model, "triton")
    _, exact_grads = _loss_and_grads(model, model, images, labels, masking)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        eager, eager_grads = _loss_and_grads(forward, model, images, labels, masking)
        compiled, grads = _loss_and_grads(apply_compile(forward), model, images, labels, masking)
    torch.testing.assert_close(compiled.loss, eager.loss, rtol=1e-2, atol=0)
    for name in eager_grads:
        compiled_error, eager_error = (_relative(g[name], exact_grads[name]) for g in (grads, eager_grads))
        assert compiled_error <= 2 * eager_error + 1e-2, \
            f"{name}: {compiled_error:.2e} from float32, eager {eager_error:.2e}"
