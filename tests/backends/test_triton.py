"""Tests for lightning_ghostnoise.backends.triton: the Triton (CUDA) path against the PyTorch path and loop references.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``, set in
``conftest.py``); with one they run natively on CUDA tensors. Either way each kernel is compared with
the plain PyTorch formula of :mod:`lightning_ghostnoise.functional` fed the same inputs and draws.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.reference import affine_params, ref_batch_normalize, ref_gni, varied_input
from torch import nn

from lightning_ghostnoise import config
from lightning_ghostnoise import functional as GF
from lightning_ghostnoise.backends import dispatch, torch_passes
from lightning_ghostnoise.backends.triton import kernels, launcher
from lightning_ghostnoise.backends.triton import layout as triton_layout
from lightning_ghostnoise.layers import (
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostBatchNorm3d,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(6, 5), (6, 5, 7), (6, 5, 3, 4), (5, 3, 2, 3, 2), (4, 40, 3, 3)]


@pytest.fixture
def use_kernels(monkeypatch):
    """Route supported tensors through the kernels, on CPU too (interpreted)."""
    monkeypatch.setattr(config.settings(), "backend", "triton")


def _supports(x):
    """Whether a layer call with gradients on ``x`` runs on the Triton kernels."""
    return dispatch.select(x, fused=True).backend == "triton"


def _layouts(shape):
    x = varied_input(shape, 0).to(DEVICE)
    out = [x]
    if len(shape) == 4:
        out.append(x.to(memory_format=torch.channels_last))
    if len(shape) == 5:
        out.append(x.to(memory_format=torch.channels_last_3d))
    return out


def test_supports(use_kernels, monkeypatch):
    x = torch.randn(4, 3, 5, 5, device=DEVICE)
    assert _supports(x)
    assert _supports(x.to(memory_format=torch.channels_last))
    assert _supports(x.to(torch.bfloat16))
    assert not _supports(x.double())  # float64 keeps the PyTorch path
    assert not _supports(x[:, :, ::2])  # no (B, C, S) view
    assert not _supports(x[:, :, 0, 0].t().t()[:, ::2])  # a strided (B, C)
    assert triton_layout.strides(x) == (4, 3, 25, 75, 25, 1)
    assert triton_layout.strides(x.to(memory_format=torch.channels_last)) == (4, 3, 25, 75, 1, 3)
    assert not _supports(torch.randn(4, device=DEVICE))
    assert not _supports(torch.empty(0, 3, 4, device=DEVICE))
    monkeypatch.setattr(config.settings(), "backend", "torch")
    assert not _supports(x)


def test_environment_switch_turns_the_layers_kernels_off(use_kernels, monkeypatch):
    layer = GhostBatchNorm2d.from_module(_bn(nn.BatchNorm2d, 3), method="gbn", ghost_batch_size=2)
    layer.train()
    calls = []
    real = kernels.affine
    monkeypatch.setattr(kernels, "affine", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(4, 3, 2, 2, device=DEVICE)
    layer(x)
    monkeypatch.setattr(config.settings(), "backend", "torch")
    layer(x)
    assert calls == [1]


def test_cpu_tensors_take_pytorch_path_by_default():
    assert config.get_backend() == "auto"
    assert not _supports(torch.randn(4, 3, 5, 5))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moments_match_per_sample_moments(use_kernels, shape, dtype):
    for x in _layouts(shape):
        x = (x + 100.0).to(dtype)  # a large mean: the kernel shifts by a pivot
        mean, var = kernels.moments(x, triton_layout.strides(x))
        ref_mean, ref_var = GF.per_sample_moments(x.double())
        assert mean.dtype == torch.float32 and mean.shape == ref_mean.shape
        torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(var.double(), ref_var, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_affine_matches_sample_affine_and_keeps_layout(use_kernels, shape, dtype):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(shape[:2], generator=g).to(DEVICE)
    d = torch.randn(shape[:2], generator=g).to(DEVICE)
    for x in _layouts(shape):
        x = x.to(dtype)
        y = kernels.affine(x, triton_layout.strides(x), torch.stack([a, d]))
        assert y.dtype == dtype and y.stride() == x.stride()
        ref = GF.sample_affine(x.double(), a.double(), d.double())
        tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
        torch.testing.assert_close(y.double(), ref, **tol)


@pytest.mark.parametrize("shape", SHAPES)
def test_channel_sums_and_input_grad_match_pytorch(use_kernels, shape):
    g = torch.Generator().manual_seed(2)
    a = torch.randn(shape[:2], generator=g).to(DEVICE)
    p_c, q_c = torch.randn(shape[1], generator=g).to(DEVICE), torch.randn(shape[1], generator=g).to(DEVICE)
    p_bc, q_bc = torch.randn(shape[:2], generator=g).to(DEVICE), torch.randn(shape[:2], generator=g).to(DEVICE)
    for x in _layouts(shape):
        grad_y = torch.randn(shape, generator=g).to(DEVICE)  # contiguous even when x is channels-last
        lay = triton_layout.strides(x)
        r0, r1 = kernels.channel_sums(grad_y, x, lay)
        e0, e1, _ = torch_passes.sample_channel_sums(grad_y.double(), x.double(), 1, torch.float64)
        torch.testing.assert_close(r0.double(), e0, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r1.double(), e1, rtol=1e-5, atol=1e-5)
        for p, q in ((p_c, q_c), (p_bc, q_bc)):
            gx = kernels.affine_input_grad(grad_y, x, lay, a, torch.stack([p, q]))
            assert gx.stride() == x.stride()
            ref = torch_passes.affine_input_grad(grad_y.double(), x.double(), a.double(), p.double(), q.double(), 1)
            torch.testing.assert_close(gx.double(), ref, rtol=1e-5, atol=1e-5)


def _bn(factory, channels, affine=True, track=True):
    plain = factory(channels, affine=affine, track_running_stats=track)
    if affine:
        w, b = affine_params(channels)
        with torch.no_grad():
            plain.weight.copy_(w)
            plain.bias.copy_(b)
    if track:
        with torch.no_grad():
            plain.running_mean.copy_(torch.linspace(-1, 1, channels))
            plain.running_var.copy_(torch.linspace(0.5, 2, channels))
    return plain.to(DEVICE)


FACTORY = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
GHOST = {nn.BatchNorm1d: GhostBatchNorm1d, nn.BatchNorm2d: GhostBatchNorm2d, nn.BatchNorm3d: GhostBatchNorm3d}


def _run(layer, x, monkeypatch, on: bool):
    """Forward and backward of a copy of ``layer`` with the kernels on or off: outputs, grads, stats."""
    monkeypatch.setattr(config.settings(), "backend", "triton" if on else "torch")
    calls = []
    real = kernels.channel_sums
    monkeypatch.setattr(kernels, "channel_sums", lambda *a: calls.append(1) or real(*a))
    layer = copy.deepcopy(layer)
    layer.reseed(11)
    x = x.detach().clone().requires_grad_()
    y = layer(x)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE, y.dtype)
    y.backward(grad_y)
    assert len(calls) == (1 if on else 0), "the kernels were (not) used"
    out = {"y": y.detach(), "grad_x": x.grad}
    for name in ("weight", "bias"):
        p = getattr(layer, name)
        if p is not None:
            out["grad_" + name] = p.grad
    for name in ("running_mean", "running_var"):
        if getattr(layer, name) is not None:
            out[name] = getattr(layer, name)
    return out


CASES = [
    # (method, ghost batch size, strength, shift_noise, scale_noise, affine, track_running_stats)
    ("gni", 4, 1.0, True, True, True, True),
    ("gni", 3, 0.5, True, True, False, False),
    ("gni", 16, 1.0, True, False, True, True),  # N > B
    ("gni", 2, 0.7, False, True, True, True),
    ("analytic", 4, 1.0, True, True, True, True),
    ("analytic", 8, 0.3, True, False, False, True),
    ("gbn", 2, 1.0, True, True, True, True),
    ("xbn", 3, 0.6, True, True, True, False),
    ("xbn", 4, 1.0, False, True, False, True),
    ("gbn", 4, 0.5, True, False, True, True),
]


@pytest.mark.parametrize("method,N,strength,shift,scale,affine,track", CASES)
@pytest.mark.parametrize("shape", [(6, 5), (6, 5, 3, 4), (5, 3, 2, 3, 2)])
def test_layer_with_kernels_matches_pytorch_path(monkeypatch, method, N, strength, shift, scale, affine, track, shape):
    _check_layer_against_pytorch(monkeypatch, method, N, strength, shift, scale, affine, track, shape)


@pytest.mark.parametrize(
    "method,N,shift,scale",
    [("gni", 3, True, True), ("analytic", 4, True, True), ("gbn", 2, True, True), ("xbn", 3, True, True),
     ("gbn", 2, False, True), ("xbn", 3, True, False)],
)  # fmt: skip
def test_large_batch_statistics_launch_matches_pytorch_path(monkeypatch, method, N, shift, scale):
    """Above SPLIT_BATCH the batch statistics get a launch of their own: same results."""
    monkeypatch.setattr(config.settings(), "split_batch", 4)
    _check_layer_against_pytorch(monkeypatch, method, N, 0.8, shift, scale, True, True, (7, 5, 3, 4))


def _check_layer_against_pytorch(monkeypatch, method, N, strength, shift, scale, affine, track, shape):
    plain = _bn(FACTORY[len(shape)], shape[1], affine, track)
    layer = GHOST[FACTORY[len(shape)]].from_module(
        plain, method=method, ghost_batch_size=N, strength=strength, shift_noise=shift, scale_noise=scale
    )
    layer.train()
    exact = _run(copy.deepcopy(layer).double(), varied_input(shape, 0).to(DEVICE).double(), monkeypatch, on=False)
    for x in _layouts(shape):
        fast = _run(layer, x, monkeypatch, on=True)
        slow = _run(layer, x, monkeypatch, on=False)
        assert fast.keys() == slow.keys() == exact.keys()
        for key, ref in exact.items():
            # float32 rounding (amplified where a tiny ghost variance makes the noise large): the kernels
            # must be about as close to the float64 result as the PyTorch path is
            scale = float(ref.abs().max())
            err_fast = float((fast[key].double() - ref).abs().max())
            err_slow = float((slow[key].double() - ref).abs().max())
            assert err_fast <= 4 * err_slow + 2e-6 * scale + 1e-7, (
                f"{key}: kernels {err_fast:.3g}, PyTorch {err_slow:.3g}"
            )
        assert fast["y"].stride() == x.stride()


def test_gni_kernels_match_loop_reference(use_kernels):
    """The kernel path against the paper's plain loop form (float64), fed the layer's own index draws."""
    x = varied_input((8, 4, 3, 3), 3).to(DEVICE)
    plain = _bn(nn.BatchNorm2d, 4)
    layer = GhostBatchNorm2d.from_module(plain, method="gni", ghost_batch_size=4, strength=0.8)
    layer.train()
    layer.reseed(3)
    g = torch.Generator(device=DEVICE)
    g.set_state(layer._generator_for(x.device).get_state())
    idx = GF.ghost_indices(8, 4, generator=g, device=DEVICE)
    y = layer(x)
    x_hat = ref_batch_normalize(x.double().cpu(), layer.eps)
    ref = ref_gni(
        x_hat, idx.cpu(), layer.weight.detach().double().cpu(), layer.bias.detach().double().cpu(), strength=0.8
    )
    torch.testing.assert_close(y.double().cpu(), ref, rtol=1e-4, atol=1e-4)


def test_bf16_channels_last_layer(monkeypatch):
    """Half precision in channels-last (the GPU training setting) stays close to the float32 result."""
    plain = _bn(nn.BatchNorm2d, 6)
    layer = GhostBatchNorm2d.from_module(plain, method="gni", ghost_batch_size=4)
    x = varied_input((8, 6, 4, 4), 4).to(DEVICE).to(memory_format=torch.channels_last)
    fast = _run(layer, x.to(torch.bfloat16), monkeypatch, on=True)
    ref = _run(layer, x, monkeypatch, on=False)
    assert fast["y"].dtype == torch.bfloat16
    torch.testing.assert_close(fast["y"].float(), ref["y"], rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(fast["grad_weight"], ref["grad_weight"], rtol=5e-2, atol=5e-2)


@pytest.mark.slow
def test_compiled_graph_does_not_use_the_kernels(use_kernels):
    """Under torch.compile the layers take the PyTorch formulas (traced, no graph break), kernels or not."""
    torch._dynamo.reset()
    layer = GhostBatchNorm2d.from_module(_bn(nn.BatchNorm2d, 3), method="gni", ghost_batch_size=2)
    layer.train()
    calls = []
    real = kernels.moments
    kernels.moments = lambda *a: calls.append(1) or real(*a)
    try:
        x = torch.randn(4, 3, 2, 2, device=DEVICE)
        explanation = torch._dynamo.explain(layer)(x)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        torch.compile(layer, backend="aot_eager")(x.requires_grad_()).sum().backward()
        assert calls == []
        layer(x)  # eager: the kernels
        assert calls == [1]
    finally:
        kernels.moments = real
        torch._dynamo.reset()


def test_kernel_path_refuses_double_backward(use_kernels):
    layer = GhostBatchNorm2d.from_module(_bn(nn.BatchNorm2d, 3), method="gni", ghost_batch_size=2)
    x = torch.randn(4, 3, 2, 2, device=DEVICE, requires_grad=True)
    with pytest.raises(RuntimeError, match="Double backward"):
        torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)


def _ast_source_takes_constexprs() -> bool:
    import inspect

    from triton.compiler import ASTSource

    return "constexprs" in inspect.signature(ASTSource).parameters


@pytest.mark.slow
@pytest.mark.skipif(
    not _ast_source_takes_constexprs(),
    reason="tests/helpers/compile_kernels.py builds ASTSource(constexprs=...), which this Triton does not take (3.0)",
)
def test_kernels_compile_for_h100():
    """Triton compiles every kernel variant for sm_90 (no GPU needed): catches what the interpreter cannot."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, str(root / "tests" / "helpers" / "compile_kernels.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("compiled ") == 21


class _FakeCompiled:
    """Stands in for a Triton ``CompiledKernel``: records what its launcher gets."""

    function = "function-handle"
    packed_metadata = "packed-metadata"

    def __init__(self):
        self.runs = []

    def run(self, *args):
        self.runs.append(args)


class _FakeKernel:
    """Stands in for a ``JITFunction``: ``fn[grid](*args, **meta)`` records the call, returns the compiled kernel."""

    arg_names = ["x_ptr", "n", "scale", "BLOCK", "FLAG"]

    def __init__(self, returns_compiled=True):
        self.compiled = _FakeCompiled()
        self.triton_calls = []
        self.returns_compiled = returns_compiled

    def __getitem__(self, grid):
        def call(*args, **meta):
            self.triton_calls.append((grid, args, meta))
            return self.compiled if self.returns_compiled else None

        return call


@pytest.fixture
def fast_launch(monkeypatch):
    """The launcher as on a GPU: device 0, stream 77, no launch hook."""
    monkeypatch.setattr(config.settings(), "fast_launch", True)
    monkeypatch.setattr(launcher, "_current_device", lambda: 0)
    monkeypatch.setattr(launcher, "_current_stream", lambda device: 77)
    monkeypatch.setattr(launcher, "_launch_hook_set", lambda: False)


def test_launcher_reuses_the_compiled_kernel(fast_launch):
    fn = _FakeKernel()
    x = torch.zeros(8)
    launcher.launch(fn, (3, 2), x, 32, 0.5, FLAG=True, BLOCK=64)  # first: through Triton (compiles)
    assert fn.triton_calls == [((3, 2), (x, 32, 0.5), {"FLAG": True, "BLOCK": 64})]
    x2 = torch.ones(8)
    launcher.launch(fn, (4,), x2, 32, 0.25, FLAG=True, BLOCK=64)  # same key (another tensor, float): direct
    assert len(fn.triton_calls) == 1
    # as Triton's own launch: grid padded to 3 dims, stream, handles, no metadata or hooks, then every
    # argument in signature order (the constexprs after the others, whatever the keyword order)
    assert fn.compiled.runs == [
        (4, 1, 1, 77, "function-handle", "packed-metadata", None, None, None, x2, 32, 0.25, 64, True)
    ]


def test_launcher_cache_is_bounded(fast_launch, monkeypatch):
    monkeypatch.setattr(launcher, "_CACHE_SIZE", 4)
    fn = _FakeKernel()
    x = torch.zeros(8)
    for n in range(10):  # a new integer each call: a new key each time, through Triton
        launcher.launch(fn, (1,), x, n, 0.5, BLOCK=64, FLAG=True)
    kept = launcher._LAUNCHERS[id(fn)]
    assert len(fn.triton_calls) == 10 and 1 <= len(kept.cache) <= 4
    launcher.launch(fn, (1,), x, 9, 0.5, BLOCK=64, FLAG=True)  # the latest key is still cached
    assert len(fn.triton_calls) == 10 and len(fn.compiled.runs) == 1


@pytest.mark.parametrize(
    "change",
    [
        lambda x: {"args": (x[1:], 32, 0.5)},  # a pointer off 16-byte alignment
        lambda x: {"args": (x.half(), 32, 0.5)},  # another dtype
        lambda x: {"args": (x, 1, 0.5)},  # an integer equal to 1
        lambda x: {"args": (x, 33, 0.5)},  # not divisible by 16
        lambda x: {"args": (x, 48, 0.5)},  # another integer (the key holds them exactly)
        lambda x: {"args": (x, 2**31, 0.5)},  # beyond int32
        lambda x: {"args": (x, 32, 1)},  # an integer where a float was
        lambda x: {"meta": {"FLAG": False, "BLOCK": 64}},  # another constexpr
    ],
)
def test_launcher_respecializes(fast_launch, change):
    fn = _FakeKernel()
    x = torch.zeros(8)
    base = {"args": (x, 32, 0.5), "meta": {"FLAG": True, "BLOCK": 64}}
    launcher.launch(fn, (1,), *base["args"], **base["meta"])
    other = {**base, **change(x)}
    launcher.launch(fn, (1,), *other["args"], **other["meta"])
    assert len(fn.triton_calls) == 2 and not fn.compiled.runs  # compiled anew, through Triton


def test_launcher_keeps_tritons_path(fast_launch, monkeypatch):
    x = torch.zeros(8)
    interpreted = _FakeKernel(returns_compiled=False)  # the interpreter returns no compiled kernel
    for _ in range(3):
        launcher.launch(interpreted, (1,), x, 32, 0.5, BLOCK=64, FLAG=True)
    assert len(interpreted.triton_calls) == 3
    missing = _FakeKernel()  # a constexpr left to its default: not cached
    for _ in range(2):
        launcher.launch(missing, (1,), x, 32, 0.5, BLOCK=64)
    assert len(missing.triton_calls) == 2 and not missing.compiled.runs
    for setting in ("FAST_LAUNCH", "_launch_hook_set"):
        fn = _FakeKernel()
        with monkeypatch.context() as m:
            if setting == "FAST_LAUNCH":
                m.setattr(config.settings(), "fast_launch", False)
            else:
                m.setattr(launcher, "_launch_hook_set", lambda: True)  # e.g. a profiler's launch hook
            for _ in range(2):
                launcher.launch(fn, (1,), x, 32, 0.5, BLOCK=64, FLAG=True)
        assert len(fn.triton_calls) == 2 and not fn.compiled.runs
    before_cuda = _FakeKernel()
    monkeypatch.setattr(launcher, "_current_device", lambda: -1)
    for _ in range(2):
        launcher.launch(before_cuda, (1,), x, 32, 0.5, BLOCK=64, FLAG=True)
    assert len(before_cuda.triton_calls) == 2


def test_launch_hooks_detected(monkeypatch):
    triton = pytest.importorskip("triton")
    if getattr(triton, "knobs", None) is None:
        assert launcher._launch_hook_set()  # an older Triton: always its own launch path
        return
    runtime = triton.knobs.runtime
    assert not launcher._launch_hook_set()  # an empty hook chain (Triton >= 3.5) or None: no hook

    def hook(metadata):
        pass

    chain = runtime.launch_enter_hook
    if hasattr(chain, "add"):
        chain.add(hook)
        try:
            assert launcher._launch_hook_set()
        finally:
            chain.remove(hook)
    else:
        monkeypatch.setattr(runtime, "launch_enter_hook", hook)
        assert launcher._launch_hook_set()
    assert not launcher._launch_hook_set()


@pytest.mark.parametrize("method", ["gni", "gbn"])
def test_layers_launch_through_the_cache(use_kernels, monkeypatch, method):
    """A layer's launches: on CUDA the cached compiled kernels (bit-identical to Triton's own launch),
    in the interpreter Triton's path."""

    def run(fast):
        monkeypatch.setattr(config.settings(), "fast_launch", fast)
        layer = GhostBatchNorm2d.from_module(_bn(nn.BatchNorm2d, 5), method=method, ghost_batch_size=4, seed=3).train()
        x = varied_input((8, 5, 3, 4), 1).to(DEVICE).requires_grad_()
        outs = []
        for _ in range(3):  # the first call of each kernel fills the cache, the later ones use it
            y = layer(x)
            (gx,) = torch.autograd.grad(y, x, torch.cos(y.detach()))
            outs += [y, gx, layer.running_mean.clone(), layer.running_var.clone()]
        return outs

    monkeypatch.setattr(launcher, "_LAUNCHERS", {})
    fast = run(True)
    entries = [v for launcher in launcher._LAUNCHERS.values() for v in launcher.cache.values()]
    assert len(launcher._LAUNCHERS) == 6
    if launcher._KNOBS is None:  # a Triton without launch hooks (before 3.4): always its own launch, nothing cached
        assert entries == []
    elif DEVICE == "cuda":
        assert len(entries) == 6  # six kernels, one specialization each
        assert all(v is not False for v in entries)
    else:
        assert len(entries) == 6 and all(v is False for v in entries)
    for a, b in zip(fast, run(False)):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------
# Opt-in: the coefficient kernels as custom ops inside compiled graphs (lightning_ghostnoise.backends.triton.custom_ops)
# ---------------------------------------------------------------------------------------------------
def _count_launches(monkeypatch):
    """Record the name of every Triton kernel launched."""
    calls = []
    real = launcher.launch
    monkeypatch.setattr(launcher, "launch", lambda fn, *a, **k: calls.append(fn.__name__) or real(fn, *a, **k))
    return calls


@pytest.mark.parametrize(
    "method,backend,channels_last",
    [
        ("gni", "aot_eager", False),
        ("analytic", "aot_eager", False),
        ("gbn", "aot_eager", False),
        ("xbn", "aot_eager", False),
        ("gni", "inductor", False),
        # channels last: the input gradient's buffer is not contiguous, and an ``out=`` into it broke
        # the graph at every layer (found by benchmarks/compiled_kernels.py on ResNet-18; fixed)
        ("gni", "aot_eager", True),
        ("analytic", "aot_eager", True),
        ("gbn", "aot_eager", True),
        ("xbn", "aot_eager", True),
    ],
)
@pytest.mark.slow
def test_compiled_graph_calls_the_coefficient_ops(use_kernels, monkeypatch, method, backend, channels_last):
    config.enable_compiled_kernels(True)  # registers the custom ops
    monkeypatch.setattr(config.settings(), "compiled_kernels", True)
    with torch.enable_grad():  # outside a compiled graph: the eager kernels, not the ops
        assert config.compiled_kernels_enabled() and dispatch.select(torch.randn(4, 3, 2, 2)).backend == "triton"
    torch._dynamo.reset()
    layer = GhostBatchNorm2d.from_module(_bn(nn.BatchNorm2d, 5), method=method, ghost_batch_size=4, seed=1).train()
    layer.counter_rng = True  # the eager reference draws from the generator the compiled graph uses
    reference = copy.deepcopy(layer)
    x = varied_input((8, 5, 3, 4), 2).to(DEVICE)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    calls = _count_launches(monkeypatch)
    try:
        outs = {}
        for name, module in (("compiled", torch.compile(layer, backend=backend)), ("eager", reference)):
            xi = x.clone().requires_grad_()
            y = module(xi)
            gx, gw = torch.autograd.grad(y, [xi, module.weight], torch.cos(y.detach()))
            outs[name] = (y, gx, gw, module.running_mean, module.running_var)
            if name == "compiled":
                # only the two coefficient kernels ran; inductor (or aot_eager) did the full-size passes
                kind = "gni" if method in ("gni", "analytic") else "ghost_stats"
                assert calls == [f"_{kind}_coefficients_kernel", f"_{kind}_input_coefficients_kernel"]
        for a, b in zip(outs["compiled"], outs["eager"]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(layer)(x.clone().requires_grad_())  # with the input's gradient
        assert explanation.graph_break_count == 0, explanation.break_reasons
    finally:
        torch._dynamo.reset()


def test_coefficient_ops_opcheck(use_kernels):
    """The custom ops' schemas, fake (meta) implementations and declared mutations (torch.library.opcheck)."""
    from lightning_ghostnoise.backends.triton import custom_ops  # noqa: F401 - registers torch.ops.ghostnoise

    batch, channels = 8, 5
    mv = torch.stack([torch.randn(batch, channels), torch.rand(batch, channels) + 0.5]).to(DEVICE)
    w, b = torch.rand(channels, device=DEVICE) + 0.5, torch.randn(channels, device=DEVICE)
    s = torch.tensor(0.7, device=DEVICE)
    idx = torch.randint(0, batch, (batch, 4), device=DEVICE)
    gni_args = (mv, w, b, s, 1e-5, True, True)
    torch.library.opcheck(torch.ops.ghostnoise.gni_coefficients.default, gni_args, {"indices": idx})
    coef, stats = torch.ops.ghostnoise.gni_coefficients(*gni_args, indices=idx)
    r = torch.randn(2, batch, channels, device=DEVICE)
    torch.library.opcheck(torch.ops.ghostnoise.gni_input_coefficients.default, (r, coef, stats, w, 96))
    gs_args = (mv, w, b, s, 1e-5, 4, True, True, True)
    torch.library.opcheck(torch.ops.ghostnoise.ghost_statistics_coefficients.default, gs_args)
    per_sample, per_channel = torch.ops.ghostnoise.ghost_statistics_coefficients(*gs_args)
    torch.library.opcheck(
        torch.ops.ghostnoise.ghost_statistics_input_coefficients.default,
        (r, mv, per_sample, per_channel, s, 12, 1e-5, 4, True, True, True),
    )
