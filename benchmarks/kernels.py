"""Each Triton kernel against its eager twin and torch.compile of the twin, on a GPU, in one run.

    python benchmarks/kernels.py --batch-size 256 --json kernels.json

Times are medians over repeated CUDA-event-timed calls after warm-up; achieved GB/s counts the bytes a
kernel must move (inputs read once, outputs written once) against a device-to-device copy measured in
the same run.
"""
import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from supmae.kernels.norm_pix_loss import norm_pix_mse_triton  # noqa: E402
from supmae.kernels.patch_gather import gather_patches_triton  # noqa: E402
from supmae.kernels.unshuffle import unshuffle_triton  # noqa: E402
from supmae.measure import commit, device_name, versions, write_json  # noqa: E402
from supmae.model import unshuffle  # noqa: E402
from supmae.objective import gather_patches, removed_patch_loss  # noqa: E402
from supmae.pipelines.masking import num_kept, random_masking  # noqa: E402


def timed(fn, repeats: int = 50) -> float:
    """Median seconds per call."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def benchmark_kernels(batch_size: int = 256, img_size: int = 224, patch_size: int = 16, decoder_dim: int = 512,
                      log=print) -> dict:
    if not torch.cuda.is_available():
        raise RuntimeError("needs a CUDA GPU (the kernels' CPU runs are Triton's interpreter)")
    device, b, s, ps = torch.device("cuda"), batch_size, img_size, patch_size
    n = (s // ps) ** 2
    masking = random_masking(torch.rand(b, n, device=device), num_kept(n, 0.75))
    ids_keep, ids_restore, ids_removed = masking.ids_keep, masking.ids_restore, masking.ids_removed
    images = torch.randn(b, 3, s, s, device=device, dtype=torch.bfloat16)
    tokens = torch.randn(b, ids_keep.shape[1], decoder_dim, device=device, dtype=torch.bfloat16)
    mask_token = torch.randn(1, 1, decoder_dim, device=device, dtype=torch.bfloat16)
    pred = torch.randn(b, ids_removed.shape[1], 3 * ps * ps, device=device, dtype=torch.bfloat16)
    size = torch.finfo(torch.bfloat16).bits // 8
    cases = {
        # name: (kernel, twin, bytes moved)
        "patch_gather": (lambda: gather_patches_triton(images, ids_keep, ps), lambda: gather_patches(images, ids_keep, ps),
                         2 * b * ids_keep.shape[1] * 3 * ps * ps * size),
        "unshuffle": (lambda: unshuffle_triton(tokens, mask_token, ids_restore, ids_keep),
                      lambda: unshuffle(tokens, mask_token, ids_restore),
                      (tokens.numel() + b * n * decoder_dim) * size),
        "norm_pix_loss": (lambda: norm_pix_mse_triton(pred, images, ids_removed, ps, True),
                          lambda: removed_patch_loss(pred, images, ids_removed, ps, True), 2 * pred.numel() * size),
    }
    source = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
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
        log(f"{name:>14}: {seconds['kernel'] * 1e6:8.1f} us; {results[name]['speedup_vs_eager']:.2f}x eager, "
            f"{results[name]['speedup_vs_compiled']:.2f}x compiled; {gbs:.0f} GB/s = "
            f"{gbs / copy_gbs:.0%} of copy ({copy_gbs:.0f} GB/s)")
    return dict(device=device_name(device), commit=commit(), versions=versions("triton"),
                config=dict(batch_size=b, img_size=s, patch_size=ps, decoder_dim=decoder_dim),
                copy_gb_per_s=copy_gbs, kernels=results)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--decoder-dim", type=int, default=512)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    try:
        report = benchmark_kernels(args.batch_size, args.img_size, args.patch_size, args.decoder_dim)
    except RuntimeError as error:
        sys.exit(f"kernels.py: error: {error}")
    if args.json:
        write_json(args.json, report)


if __name__ == "__main__":
    main()
