"""Every Triton kernel compiles for the GPUs users train on (sm_80, sm_90), with no GPU present, at the
shapes and dtypes a ViT-B/16 step at batch 256 passes, and keeps every value in registers.

Triton's own compiler and the ptxas and cuobjdump in its wheel do this ahead of time; a kernel that
spills to local memory (or needs a stack) would run several times slower than the measured figures.
"""
import json
import os
import subprocess
import sys

import pytest
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

if __name__ == "__main__":  # run by the fixture below, from the checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from supmae.kernels.norm_pix_loss import _backward_kernel, _forward_kernel
from supmae.kernels.patch_gather import _gather_kernel
from supmae.kernels.unshuffle import _gather_rows_kernel, _unshuffle_kernel

# ViT-B/16 at 224: 196 patches of 768 values; 49 kept, 147 removed; decoder 512 wide.
E, D = 3 * 16 * 16, 512
INTS = dict(K="i32", E="i32", L="i32", D="i32", R="i32", GRID_W="i32", s_b="i32", s_c="i32", s_h="i32", s_w="i32",
            g_b="i32", g_l="i32", g_d="i32")
PATCH = dict(P=16, C=3, NORM=True)
# kernel, pointer dtypes as a bf16 step passes them (fp32 images from the loader, the fp32 mask token
# and the fp32 sequence it promotes to), constexprs
KERNELS = {
    "patch_gather": (_gather_kernel, dict(images="*fp32", ids_keep="*i64", out="*fp32"),
                     dict(P=16, BLOCK=triton.next_power_of_2(E))),
    "patch_gather_bf16": (_gather_kernel, dict(images="*bf16", ids_keep="*i64", out="*bf16"),
                          dict(P=16, BLOCK=triton.next_power_of_2(E))),
    "unshuffle": (_unshuffle_kernel, dict(tokens="*bf16", mask_token="*fp32", ids_restore="*i64", out="*fp32"),
                  dict(BLOCK=D)),
    "unshuffle_backward": (_gather_rows_kernel, dict(grad="*fp32", ids_keep="*i64", dtokens="*bf16"), dict(BLOCK=D)),
    "norm_pix_loss": (_forward_kernel, dict(pred="*bf16", images="*fp32", ids="*i64", losses="*fp32"),
                      dict(PATCH, BLOCK=triton.next_power_of_2(E))),
    "norm_pix_loss_backward": (_backward_kernel, dict(grad="*fp32", pred="*bf16", images="*fp32", ids="*i64",
                                                      dpred="*bf16", scale="fp32"),
                               dict(PATCH, BLOCK=triton.next_power_of_2(E))),
}
CUOBJDUMP = os.path.join(os.path.dirname(__import__("triton.backends.nvidia", fromlist=["_"]).__file__), "bin",
                         "cuobjdump")


ARCHS = (80, 90)


def resources(cubin: bytes, folder: str) -> dict:
    """REG, STACK, LOCAL, SHARED ... of the one function in `cubin`, as cuobjdump reports them."""
    path = os.path.join(folder, "kernel.cubin")
    with open(path, "wb") as f:
        f.write(cubin)
    report = subprocess.run([CUOBJDUMP, "--dump-resource-usage", path], capture_output=True, text=True,
                            check=True).stdout
    line = next(line for line in report.splitlines() if "REG:" in line)
    return {key: int(value) for key, value in (field.split(":") for field in line.split() if ":" in field)
            if value.isdigit()}


def compile_all(folder: str) -> dict:
    """"name-sm_XX" -> resources, for every kernel (and the spilling probe) on every architecture."""
    cases = dict(KERNELS, probe_that_spills=(_hoard, dict(x="*fp32", out="*fp32"), dict(BLOCK=1 << 14)))
    found = {}
    for name, (kernel, pointers, constexprs) in cases.items():
        signature = {arg: pointers.get(arg) or INTS.get(arg) or "constexpr" for arg in kernel.arg_names}
        assert set(constexprs) == {arg for arg, kind in signature.items() if kind == "constexpr"}, signature
        # Launches pass 16-byte-aligned buffers (PyTorch's allocations), which Triton specialises on.
        aligned = {(i,): [["tt.divisibility", 16]] for i, kind in enumerate(signature.values()) if kind.startswith("*")}
        for arch in ARCHS:
            compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=aligned),
                                      target=GPUTarget("cuda", arch, 32))
            found[f"{name}-sm_{arch}"] = resources(compiled.asm["cubin"], folder)
    return found


@pytest.fixture(scope="module")
def usage(tmp_path_factory):
    # Compiled in a process of its own: the suite runs the kernels in Triton's interpreter, which
    # replaces the compiler's view of them.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, __file__, str(tmp_path_factory.mktemp("cubin"))], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


needs_cuobjdump = pytest.mark.skipif(not os.access(CUOBJDUMP, os.X_OK), reason="this triton wheel ships no cuobjdump")


@needs_cuobjdump
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", list(KERNELS))
def test_kernel_compiles_for_the_gpu_without_spilling(usage, name, arch):
    used = usage[f"{name}-sm_{arch}"]
    assert used["LOCAL"] == 0 and used["STACK"] == 0, f"{name} spills on sm_{arch}: {used}"
    assert used["REG"] <= 255, used


@needs_cuobjdump
def test_the_compile_check_sees_spills(usage):
    """The check is not vacuous: a kernel holding more values than registers can keep does spill."""
    for arch in ARCHS:
        used = usage[f"probe_that_spills-sm_{arch}"]
        assert used["LOCAL"] > 0 or used["STACK"] > 0, used


@triton.jit
def _hoard(x, out, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    values = tl.load(x + offsets)
    tl.store(out + offsets, tl.cumsum(values * values, axis=0) + tl.flip(values, 0))


if __name__ == "__main__":
    print(json.dumps(compile_all(sys.argv[1])))
