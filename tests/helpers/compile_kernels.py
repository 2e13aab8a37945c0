"""Compile every Triton kernel for an sm_90 (H100) target without a GPU: catches errors that Triton's
interpreter does not (types, layouts, code generation). Run by ``tests/backends/test_triton.py`` in a subprocess,
with ``TRITON_INTERPRET`` unset so that the kernels are real JIT functions."""

from __future__ import annotations

import inspect
import sys
from types import SimpleNamespace

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lightning_ghostnoise.backends.triton import (
    common,
    ghost_statistics,
    gni,
    kernels,
    layout,
)

# every kernel and tile constant of the Triton backend, by name
K = SimpleNamespace(
    **{k: v for m in (common, gni, ghost_statistics, kernels) for k, v in vars(m).items() if k.endswith("_kernel")},
    _SMALL_B=layout.SMALL_B,
    _SMALL_C=layout.SMALL_C,
)

FLOATS = {"momentum", "unbias", "eps", "noise_eps", "count", "sqrt_n"}
# pointers that are not float32: the data tensors in half precision, the ghost indices int64
FLAGS = ("HAS_W", "HAS_BIAS", "HAS_RUNNING", "SHIFT_NOISE", "SCALE_NOISE")
POINTERS = {
    "x_ptr": "*bf16",
    "y_ptr": "*bf16",
    "g_ptr": "*bf16",
    "gx_ptr": "*bf16",
    "idx_ptr": "*i64",
    "rm_ptr": "*fp32",
}


def compile_kernel(fn, constexprs):
    names = list(inspect.signature(fn.fn).parameters)
    signature = {}
    for name in names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = POINTERS.get(name, "*fp32")
        elif name in FLOATS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32))


def main() -> int:
    assert isinstance(K._moments_kernel, triton.runtime.jit.JITFunction), "unset TRITON_INTERPRET"
    big = {"BLOCK_C": 64, "BLOCK_S": 32}
    small = {"BLOCK_B": K._SMALL_B, "BLOCK_C": K._SMALL_C}
    cases = [
        (K._moments_kernel, big),
        (K._moments_kernel, {"BLOCK_C": 4, "BLOCK_S": 1024}),
        (K._sums_kernel, big),
        (K._affine_kernel, big),
        (K._input_grad_kernel, big),
        (K._gni_input_coefficients_kernel, dict(HAS_W=True, **small)),
        (K._channel_moments_kernel, small),
    ]
    all_on, all_off = dict.fromkeys(FLAGS, True), dict.fromkeys(FLAGS, False)
    for variant in (False, True):  # analytic GNI / XBN, with the statistics from a separate launch
        for flags in (all_on, all_off):
            cases.append((K._gni_coefficients_kernel, dict(STATS_GIVEN=variant, ANALYTIC=variant, **flags, **small)))
            cases.append(
                (K._ghost_stats_coefficients_kernel, dict(STATS_GIVEN=variant, EXCLUSIVE=variant, **flags, **small))
            )
            noise = {"SHIFT_NOISE": flags["SHIFT_NOISE"], "SCALE_NOISE": flags["SCALE_NOISE"]}
            if not variant:
                cases.append((K._ghost_stats_channel_grads_kernel, dict(**noise, **small)))
            cases.append((K._ghost_stats_input_coefficients_kernel, dict(
                GRADS_GIVEN=flags["SHIFT_NOISE"], EXCLUSIVE=variant, **noise, **small)))  # fmt: skip
    for fn, constexprs in cases:
        compiled = compile_kernel(fn, constexprs)
        print(f"compiled {fn.fn.__name__} {constexprs}: {len(compiled.asm['cubin'])} bytes of cubin")
    return 0


if __name__ == "__main__":
    sys.exit(main())
