"""Each Triton kernel against its eager twin and torch.compile of the twin, on a GPU, in one run.

    python -m benchmarks.kernels --batch-size 256 --json kernels.json

Each call is captured in a CUDA graph and timed over its replays (the median, after warm-up), so the
host's launch and dispatch overhead, which a compiled step under CUDA graphs does not pay, stays out of
the kernel's time. Achieved GB/s counts the bytes a kernel must move (inputs read once, outputs written
once) against a device-to-device copy timed the same way in the same run.
"""

import os
import sys

import torch
import triton.testing

if not __package__:  # run as a file, not with -m: the checkout's root holds benchmarks and supmae
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import main
from supmae.core.options import Config, configuration, option
from supmae.kernels.norm_pix_loss import norm_pix_mse_backward, norm_pix_mse_triton
from supmae.kernels.patch_gather import gather_patches_triton
from supmae.kernels.unshuffle import unshuffle_backward, unshuffle_triton
from supmae.models.objective import gather_patches, removed_patch_loss
from supmae.models.trunk import unshuffle
from supmae.pipelines.masking import num_kept, random_masking
from supmae.profiling.measure import commit, device_name, versions


@configuration
class KernelBenchmark(Config):
    """Each Triton kernel against its eager twin and torch.compile of the twin, at a training step's shapes."""
    batch_size: int = option(256, "images per step", at_least=1)
    img_size: int = option(224, "image side", at_least=1)
    patch_size: int = option(16, "patch side", at_least=1)
    decoder_dim: int = option(512, "the decoder's width", at_least=1)
    json: str | None = option(None, "write the results here", metavar="FILE")


def timed(fn) -> float:
    """Median seconds per call, over CUDA-graph replays."""
    fn()  # compiles and autotunes outside the capture
    torch.cuda.synchronize()
    return float(triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")) / 1e3  # pyright: ignore[reportArgumentType]


def _loss_grad(pred, images, ids_removed, patch_size):
    leaf = pred.detach().requires_grad_()
    return torch.autograd.grad(removed_patch_loss(leaf, images, ids_removed, patch_size, True), leaf)[0]


def benchmark_kernels(cfg: KernelBenchmark) -> dict:
    if not torch.cuda.is_available():
        raise RuntimeError("needs a CUDA GPU (the kernels' CPU runs are Triton's interpreter)")
    device, b, s, ps, decoder_dim = torch.device("cuda"), cfg.batch_size, cfg.img_size, cfg.patch_size, cfg.decoder_dim
    n = (s // ps) ** 2
    masking = random_masking(torch.rand(b, n, device=device), num_kept(n, 0.75))
    ids_keep, ids_restore, ids_removed = masking.ids_keep, masking.ids_restore, masking.ids_removed
    # The dtypes a bf16 training step passes: fp32 images from the loader, gathered into bf16 rows, bf16
    # activations, the fp32 mask token parameter (so the unshuffled sequence and its gradient are fp32, as
    # torch.cat promotes).
    bf16 = torch.bfloat16
    images = torch.randn(b, 3, s, s, device=device)
    tokens = torch.randn(b, ids_keep.shape[1], decoder_dim, device=device, dtype=bf16)
    mask_token = torch.randn(1, 1, decoder_dim, device=device)
    pred = torch.randn(b, ids_removed.shape[1], 3 * ps * ps, device=device, dtype=bf16)
    grad_out = torch.randn(b, n, decoder_dim, device=device)
    one = torch.ones((), device=device)
    kept, removed = b * ids_keep.shape[1], pred.numel()
    cases = {
        # name: (kernel, twin, bytes it must move: inputs read once, outputs written once)
        # the kept patches read (fp32) and written once in the compute dtype
        "patch_gather": (lambda: gather_patches_triton(images, ids_keep, ps, bf16),
                         lambda: gather_patches(images, ids_keep, ps, bf16), kept * 3 * ps * ps * (4 + 2)),
        "unshuffle": (lambda: unshuffle_triton(tokens, mask_token, ids_restore, ids_keep),
                      lambda: unshuffle(tokens, mask_token, ids_restore),
                      kept * decoder_dim * 2 + b * n * decoder_dim * 4),
        # each visible token's gradient read from its one position (fp32) and written once (bf16)
        "unshuffle_backward": (lambda: unshuffle_backward(grad_out, ids_keep, bf16),
                               lambda: torch.gather(grad_out, 1, ids_keep.unsqueeze(-1).expand(-1, -1, decoder_dim))
                               .to(bf16),
                               kept * decoder_dim * (4 + 2)),
        "norm_pix_loss": (lambda: norm_pix_mse_triton(pred, images, ids_removed, ps, True),
                          lambda: removed_patch_loss(pred, images, ids_removed, ps, True), removed * (2 + 4)),
        # the prediction and the removed patches read, d(pred) written
        "norm_pix_loss_backward": (lambda: norm_pix_mse_backward(one, pred, images, ids_removed, ps, True),
                                   lambda: _loss_grad(pred, images, ids_removed, ps), removed * (2 + 4 + 2)),
    }
    source = torch.randint(0, 255, (256 * 2**20,), dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    copy_gbs = 2 * source.numel() / timed(lambda: target.copy_(source)) / 1e9
    results = {}
    for name, (kernel, twin, moved) in cases.items():
        compiled = torch.compile(twin)
        seconds = dict(kernel=timed(kernel), eager=timed(twin), compiled=timed(compiled))
        gbs = moved / seconds["kernel"] / 1e9
        results[name] = dict(seconds=seconds, speedup_vs_eager=seconds["eager"] / seconds["kernel"],
                             speedup_vs_compiled=seconds["compiled"] / seconds["kernel"], gb_per_s=gbs,
                             fraction_of_copy_bandwidth=gbs / copy_gbs)
        print(f"{name:>22}: {seconds['kernel'] * 1e6:8.1f} us; {results[name]['speedup_vs_eager']:.2f}x eager, "
              f"{results[name]['speedup_vs_compiled']:.2f}x compiled; {gbs:.0f} GB/s = "
              f"{gbs / copy_gbs:.0%} of copy ({copy_gbs:.0f} GB/s)")
    return dict(device=device_name(device), commit=commit(), versions=versions("triton"),
                config=dict(batch_size=b, img_size=s, patch_size=ps, decoder_dim=decoder_dim),
                copy_gb_per_s=copy_gbs, kernels=results)


if __name__ == "__main__":
    main(KernelBenchmark, benchmark_kernels, errors=(RuntimeError,))
