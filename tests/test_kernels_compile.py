"""Every Triton kernel compiles for the GPUs users train on (sm_80, sm_90), with no GPU present, at the
shapes and dtypes a ViT-B/16 step at batch 256 passes, and keeps every value in registers.

Triton's own compiler and the ptxas and cuobjdump in its wheel do this ahead of time; a kernel that
spills to local memory (or needs a stack) would run several times slower than the measured figures.
"""
import json
import os
import re
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

# ViT-B/16 at 224 and batch 256: 196 patches of 768 values; 49 kept, 147 removed; decoder 512 wide. The
# integer arguments as a launch passes them, so the kernels are specialised as a launch specialises them.
E, D = 3 * 16 * 16, 512
INTS = dict(K=49, E=E, L=196, D=D, R=147, GRID_W=14, s_b=3 * 224 * 224, s_c=224 * 224, s_h=224, s_w=1,
            g_b=196 * D, g_l=D, g_d=1)
PATCH = dict(P=16, NORM=True)
# kernel, pointer dtypes as a bf16 step passes them (fp32 images from the loader, gathered into bf16 rows;
# the fp32 mask token and the fp32 sequence it promotes to), constexprs
KERNELS = {
    "patch_gather": (_gather_kernel, dict(images="*fp32", ids_keep="*i64", out="*bf16"),
                     dict(P=16, BLOCK=triton.next_power_of_2(E))),
    "patch_gather_fp32": (_gather_kernel, dict(images="*fp32", ids_keep="*i64", out="*fp32"),
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


def specialised(kernel, pointers: dict, constexprs: dict) -> ASTSource:
    """`kernel` specialised as a launch with INTS specialises it: an integer equal to 1 becomes a constant,
    one divisible by 16 is marked so, and so are the pointers (PyTorch's allocations are 16-byte aligned)."""
    signature, constants, attrs = {}, dict(constexprs), {}
    for index, arg in enumerate(kernel.arg_names):
        value = INTS.get(arg)
        if arg in pointers:
            signature[arg], attrs[(index,)] = pointers[arg], [["tt.divisibility", 16]]
        elif value == 1:
            signature[arg], constants[arg] = "constexpr", 1
        elif value is not None:
            signature[arg] = "i32"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            signature[arg] = "fp32" if arg == "scale" else "constexpr"
    assert set(constants) == {arg for arg, kind in signature.items() if kind == "constexpr"}, signature
    return ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)


def compile_all(folder: str) -> dict:
    """"name-sm_XX" -> resources and the PTX's global memory and conversion instructions, for every kernel
    (and the spilling probe) on every architecture."""
    cases = dict(KERNELS, probe_that_spills=(_hoard, dict(x="*fp32", out="*fp32"), dict(BLOCK=1 << 14)))
    found = {}
    for name, (kernel, pointers, constexprs) in cases.items():
        for arch in ARCHS:
            compiled = triton.compile(specialised(kernel, pointers, constexprs), target=GPUTarget("cuda", arch, 32))
            ptx = compiled.asm["ptx"]
            found[f"{name}-sm_{arch}"] = dict(resources(compiled.asm["cubin"], folder),
                                              loads=re.findall(r"ld\.global[.\w]*", ptx),
                                              stores=re.findall(r"st\.global[.\w]*", ptx),
                                              conversions=sorted(set(re.findall(r"cvt\.\w+\.bf16\w*\.f32", ptx))))
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
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", ["patch_gather", "patch_gather_fp32", "norm_pix_loss", "norm_pix_loss_backward"])
def test_image_patches_are_read_with_vector_loads(usage, name, arch):
    """Rows of p neighbouring pixels of one colour plane are read 16 bytes at a time: the loads that set
    these kernels' share of the memory bandwidth. (Reading a patch in (i, j, c) order, as patchify lays it
    out, gives one scalar load per value, neighbouring lanes in different planes.)"""
    loads = usage[f"{name}-sm_{arch}"]["loads"]
    scalars = 1 if name == "norm_pix_loss_backward" else 0  # the loss's incoming gradient, one value
    assert "ld.global.v4.b32" in loads and loads.count("ld.global.b32") == scalars, loads


@needs_cuobjdump
@pytest.mark.parametrize("arch", ARCHS)
def test_the_gather_rounds_to_the_nearest_bf16(usage, arch):
    """The GPU rounds as PyTorch's cast does (Triton's interpreter truncates, which the twin test allows)."""
    assert usage[f"patch_gather-sm_{arch}"]["conversions"] == ["cvt.rn.bf16x2.f32"]
    assert usage[f"patch_gather-sm_{arch}"]["stores"] == ["st.global.v4.b32"]


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
