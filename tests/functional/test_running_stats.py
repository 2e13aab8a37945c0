"""GBN's running statistics: ``running_stats="ghost"`` (the published convention, GBN's default) and
``"batch"`` (the full batch's, as plain BatchNorm; XBN, GNI and analytic GNI), on every path.

The references are plain loops written here, independently of the library: the ghost batches are
consecutive slices (the ``B mod N`` remainder joins the last one), each one's mean and unbiased
variance come from ``Tensor.mean`` / ``Tensor.var``, their averages over ghost batches are the
targets, and the buffers are lerped towards them with BatchNorm's momentum.
"""

from __future__ import annotations

import copy
import typing

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_ghostnoise import config
from lightning_ghostnoise import functional as GF
from lightning_ghostnoise.backends.triton import ghost_statistics as kernels
from lightning_ghostnoise.layers import (
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostBatchNorm3d,
    GhostLayerNorm,
    validate_running_stats,
)
from lightning_ghostnoise.surgery import apply_ghost_noise, ghost_layers

GHOST = {nn.BatchNorm1d: GhostBatchNorm1d, nn.BatchNorm2d: GhostBatchNorm2d, nn.BatchNorm3d: GhostBatchNorm3d}
FACTORY = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


# ---------------------------------------------------------------------------------------------------
# the plain references
# ---------------------------------------------------------------------------------------------------
def loop_targets(x: torch.Tensor, n: int, convention: str):
    """The running statistics' targets of one batch ``x`` ``(B, C, *spatial)``, in float64."""
    x = x.detach().double()
    dims = (0,) + tuple(range(2, x.dim()))
    if convention == "batch":
        return x.mean(dim=dims), x.var(dim=dims, unbiased=True)
    batch = x.shape[0]
    groups = max(batch // n, 1)
    means, variances = [], []
    for g in range(groups):
        stop = (g + 1) * n if g < groups - 1 else batch  # the remainder joins the last ghost batch
        x_g = x[g * n : stop]
        means.append(x_g.mean(dim=dims))
        variances.append(x_g.var(dim=dims, unbiased=True))
    return sum(means) / groups, sum(variances) / groups


def loop_running_stats(batches, n: int, convention: str, momentum, running_mean, running_var):
    """The buffers after ``batches``, as ``nn.BatchNorm`` lerps them (``momentum=None``: cumulative average)."""
    rm, rv = running_mean.detach().double().clone(), running_var.detach().double().clone()
    for step, x in enumerate(batches, start=1):
        mean, var = loop_targets(x, n, convention)
        factor = 1.0 / step if momentum is None else momentum
        rm = (1 - factor) * rm + factor * mean
        rv = (1 - factor) * rv + factor * var
    return rm, rv


def make_batches(count: int, shape, seed: int):
    """Batches whose per-sample offsets dominate: ghost and full-batch variances differ clearly."""
    g = torch.Generator().manual_seed(seed)
    batch, channels = shape[:2]
    extra = (1,) * (len(shape) - 2)
    mu = torch.linspace(-2, 3, channels).view((1, channels) + extra)
    return [
        mu + 2.0 * torch.randn((batch, channels) + extra, generator=g) + 0.5 * torch.randn(shape, generator=g)
        for _ in range(count)
    ]


def start_buffers(channels: int):
    return torch.linspace(-1, 1, channels), torch.linspace(0.5, 2, channels)


def assert_stats(rm, rv, ref_mean, ref_var, tol=2e-5):
    torch.testing.assert_close(rm.double(), ref_mean, atol=tol, rtol=tol)
    torch.testing.assert_close(rv.double(), ref_var, atol=tol, rtol=tol)


SHAPES = [(16, 3, 4, 4), (13, 3, 4, 4), (16, 3), (13, 3), (13, 3, 5), (10, 2, 2, 3, 2), (3, 3, 2, 2)]
SHAPE_IDS = ["2d-divisible", "2d-remainder", "1d-vector", "1d-vector-remainder", "1d-seq-remainder", "3d", "B<N"]


@pytest.mark.parametrize("shape", SHAPES[:-1], ids=SHAPE_IDS[:-1])
def test_conventions_differ_on_these_batches(shape):
    """The test data tell the conventions apart, far beyond the tests' tolerances (per-sample offsets:
    ghost variances are about (N - 1) / N of the offsets' variance smaller on average)."""
    for seed in (1, 3, 6, 7, 10, 12):
        for x in make_batches(2, shape, seed):
            ghost_var, batch_var = loop_targets(x, 4, "ghost")[1], loop_targets(x, 4, "batch")[1]
            assert float((batch_var - ghost_var).abs().min()) > 1e-3


# ---------------------------------------------------------------------------------------------------
# the functional API
# ---------------------------------------------------------------------------------------------------
# N = 1 on (B, C) vectors leaves one value per ghost batch, which has no unbiased variance (see the test below)
@pytest.mark.parametrize(
    "shape, n",
    [(shape, n) for shape in SHAPES for n in (1, 4) if not (n == 1 and len(shape) == 2)],
    ids=[f"{i}-N{n}" for shape, i in zip(SHAPES, SHAPE_IDS) for n in (1, 4) if not (n == 1 and len(shape) == 2)],
)
def test_ghost_running_targets_match_loop(shape, n):
    (x,) = make_batches(1, shape, 1)
    spatial = x[0, 0].numel()
    mean, var = GF.ghost_running_targets(*GF.per_sample_moments(x), n, spatial)
    ref_mean, ref_var = loop_targets(x, n, "ghost")
    assert mean.shape == var.shape == (shape[1],)
    assert_stats(mean, var, ref_mean, ref_var)


def test_ghost_running_targets_single_value_ghost_batches():
    """``N = 1`` on ``(B, C)`` vectors: each ghost batch holds one value (GBN normalizes it to 0); its
    variance is 0, not NaN (:func:`update_running_stats`'s rule for a count of 1)."""
    x = torch.randn(6, 3)
    mean, var = GF.ghost_running_targets(*GF.per_sample_moments(x), 1, 1)
    torch.testing.assert_close(mean, x.mean(0))
    assert torch.equal(var, torch.zeros(3))


def test_ghost_running_targets_one_ghost_batch_is_the_batch():
    """``N >= B``: one ghost batch, the full batch's statistics."""
    (x,) = make_batches(1, (6, 3, 2, 2), 2)
    mean, var = GF.ghost_running_targets(*GF.per_sample_moments(x.double()), 8, 4)
    ref_mean, ref_var = loop_targets(x, 6, "batch")
    torch.testing.assert_close(mean, ref_mean)
    torch.testing.assert_close(var, ref_var)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("running_stats", [None, "ghost", "batch"])
def test_ghost_batch_norm_running_stats_match_loop(shape, fused, running_stats):
    convention = running_stats or "ghost"  # GBN's default
    (x,) = make_batches(1, shape, 3)
    rm, rv = start_buffers(shape[1])
    ref = loop_running_stats([x], 4, convention, 0.3, rm, rv)
    x = x.clone().requires_grad_()
    y = GF.ghost_batch_norm(x, 4, rm, rv, momentum=0.3, fused=fused, running_stats=running_stats)
    y.square().sum().backward()  # the backward is unaffected by where the running statistics come from
    assert torch.isfinite(x.grad).all()
    assert_stats(rm, rv, *ref)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(16, 3, 4, 4), (13, 3, 4, 4), (13, 3), (9, 4, 2, 2, 2)])
def test_batch_convention_is_the_former_path_bit_for_bit(shape, dtype, fused):
    """``running_stats="batch"``: GBN's former running statistics, bit for bit.

    XBN's path is untouched by the option and computes the full batch's statistics with the same
    operations GBN's did; ``"batch"`` gives exactly its bits (and matches ``F.batch_norm``'s update)."""
    (x,) = make_batches(1, shape, 4)
    x = x.to(dtype)
    out = {}
    for name, fn, kwargs in (
        ("gbn", GF.ghost_batch_norm, {"running_stats": "batch"}),
        ("xbn", GF.exclusive_batch_norm, {}),
    ):
        rm, rv = start_buffers(shape[1])
        fn(x.clone().requires_grad_(), 4, rm, rv, momentum=0.3, fused=fused, **kwargs)
        out[name] = (rm, rv)
    assert torch.equal(out["gbn"][0], out["xbn"][0]) and torch.equal(out["gbn"][1], out["xbn"][1])
    rm_ref, rv_ref = start_buffers(shape[1])
    F.batch_norm(x.float(), rm_ref, rv_ref, training=True, momentum=0.3)
    tol = 1e-6 if dtype != torch.bfloat16 else 1e-5
    torch.testing.assert_close(out["gbn"][0], rm_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(out["gbn"][1], rv_ref, atol=tol, rtol=tol)


def test_update_ghost_running_stats_foreach_and_none():
    mean, var = GF.per_sample_moments(make_batches(1, (9, 3, 2, 2), 5)[0])
    out = {}
    for foreach in (False, True):
        rm, rv = start_buffers(3)
        GF.update_ghost_running_stats(rm, rv, mean, var, 4, 4, 0.2, foreach=foreach)
        out[foreach] = (rm, rv)
    assert torch.equal(out[True][0], out[False][0]) and torch.equal(out[True][1], out[False][1])
    GF.update_ghost_running_stats(None, None, mean, var, 4, 4, 0.2)  # no buffers: a no-op


@pytest.mark.parametrize("bad", ["full", "GHOSTS", 1, True])
def test_ghost_batch_norm_rejects_bad_running_stats(bad):
    with pytest.raises(ValueError, match="running_stats must be 'ghost', 'batch' or None"):
        GF.ghost_batch_norm(torch.randn(8, 3, 2, 2), 4, running_stats=bad)


def test_ghost_batch_norm_running_stats_is_keyword_only():
    with pytest.raises(TypeError):
        GF.ghost_batch_norm(torch.randn(8, 3), 4, None, None, None, None, 0.1, 1e-5, 1.0, True, True, 1, None, "batch")


# ---------------------------------------------------------------------------------------------------
# the layers
# ---------------------------------------------------------------------------------------------------
def _layer(shape, momentum=0.1, **kwargs):
    plain = FACTORY[len(shape)](shape[1], momentum=momentum)
    rm, rv = start_buffers(shape[1])
    with torch.no_grad():
        plain.running_mean.copy_(rm)
        plain.running_var.copy_(rv)
    return plain, GHOST[type(plain)].from_module(copy.deepcopy(plain), ghost_batch_size=4, **kwargs)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("running_stats", [None, "ghost", "batch"])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_gbn_layer_running_stats_match_loop(shape, running_stats, momentum, fused):
    plain, layer = _layer(shape, momentum, method="gbn", running_stats=running_stats, fused=fused)
    assert layer.running_stats == (running_stats or "ghost")
    batches = make_batches(4, shape, 6)
    for x in batches:
        layer(x.clone().requires_grad_()).sum().backward()
    ref = loop_running_stats(batches, 4, layer.running_stats, momentum, plain.running_mean, plain.running_var)
    assert_stats(layer.running_mean, layer.running_var, *ref)
    assert int(layer.num_batches_tracked) == 4


@pytest.mark.parametrize("method", ["xbn", "gni", "analytic"])
@pytest.mark.parametrize("shape", [(13, 3, 4, 4), (16, 3)])
def test_other_methods_keep_full_batch_running_stats(method, shape):
    plain, layer = _layer(shape, 0.1, method=method)
    assert layer.running_stats == "batch"
    batches = make_batches(3, shape, 7)
    for x in batches:
        layer(x)
    ref = loop_running_stats(batches, 4, "batch", 0.1, plain.running_mean, plain.running_var)
    assert_stats(layer.running_mean, layer.running_var, *ref)


def test_ghost_running_stats_keep_eval_at_training_scale():
    """Why "ghost" is GBN's default: training normalizes each ghost batch to variance 1. In eval, the
    ghost running variance keeps a ghost batch's (unbiased) variance at about 1 on average; the full
    batch's, larger by the per-sample offsets' spread between ghost batches, shrinks it."""
    shape = (64, 3, 4, 4)
    scale = {}
    for convention in ("ghost", "batch"):
        _, layer = _layer(shape, None, method="gbn", running_stats=convention)
        for x in make_batches(40, shape, 8):  # ghost batches of 4
            layer(x)
        layer.eval()
        with torch.no_grad():
            y = torch.cat([layer(x) for x in make_batches(20, shape, 9)])  # fresh batches, in eval
        ghost_batches = y.reshape(-1, 4, 3, 16).transpose(1, 2).reshape(-1, 3, 4 * 16)
        scale[convention] = float(ghost_batches.var(-1, unbiased=True).mean())
    # offsets' variance 4, within-sample 0.25: ghost batches of 4 see (3/4) * 4 + 0.25, the batch 4.19
    assert abs(scale["ghost"] - 1.0) < 0.05
    assert scale["batch"] < 0.85


@pytest.mark.parametrize("running_stats", ["ghost", "batch", None])
def test_running_stats_adds_nothing_to_the_state_dict(running_stats):
    plain = nn.BatchNorm2d(3)
    layer = GhostBatchNorm2d.from_module(plain, method="gbn", running_stats=running_stats)
    assert sorted(layer.state_dict()) == sorted(plain.state_dict())
    buffers = sorted(n for n, _ in plain.named_buffers()) + ["_ghost_state", "_ghost_strength"]
    assert sorted(n for n, _ in layer.named_buffers()) == sorted(buffers)
    assert sorted(n for n, _ in layer.named_parameters()) == sorted(n for n, _ in plain.named_parameters())
    restored = layer.to_plain()
    assert type(restored) is nn.BatchNorm2d and "_running_stats" not in restored.__dict__


def test_running_stats_is_settable_validated_and_shown():
    layer = GhostBatchNorm2d.from_module(nn.BatchNorm2d(3), method="gbn")
    assert layer.running_stats == "ghost" and ", running_stats=" not in repr(layer)  # the default is not shown
    layer.running_stats = "BATCH"
    assert layer.running_stats == "batch" and ", running_stats=batch" in repr(layer)
    layer.running_stats = None
    assert layer.running_stats == "ghost"
    with pytest.raises(ValueError, match="running_stats must be"):
        layer.running_stats = "population"
    assert layer.running_stats == "ghost"
    xbn = GhostBatchNorm2d.from_module(nn.BatchNorm2d(3), method="xbn", ghost_batch_size=4)
    with pytest.raises(ValueError, match="leave-one-out"):
        xbn.running_stats = "ghost"
    assert xbn.running_stats == "batch"


def test_layer_pickled_before_the_option_gets_the_default():
    layer = GhostBatchNorm2d.from_module(nn.BatchNorm2d(3), method="gbn")
    del layer.__dict__["_running_stats"]
    assert layer.running_stats == "ghost"


@pytest.mark.parametrize(
    "method,match",
    [
        ("xbn", r"applies to method 'gbn' only.*leave-one-out.*no batch's own.*running_stats='batch'"),
        ("gni", r"applies to method 'gbn' only.*full batch's statistics before it adds.*running_stats='batch'"),
        ("analytic", r"applies to method 'gbn' only.*full batch's statistics.*running_stats='batch'"),
    ],
)
def test_ghost_running_stats_refused_for_other_methods(method, match):
    with pytest.raises(ValueError, match=match):
        validate_running_stats("ghost", method)
    with pytest.raises(ValueError, match=match):
        GhostBatchNorm2d.from_module(nn.BatchNorm2d(3), method=method, ghost_batch_size=4, running_stats="ghost")
    with pytest.raises(ValueError, match=match):
        apply_ghost_noise(nn.Sequential(nn.BatchNorm2d(3)), 4, method=method, running_stats="ghost")
    if method != "xbn":
        with pytest.raises(ValueError, match=match):  # also where no layer is a target
            GhostLayerNorm.from_module(nn.LayerNorm(3), method=method, running_stats="ghost")


@pytest.mark.parametrize("method", ["gni", "gbn", "xbn", "analytic"])
def test_batch_and_none_accepted_for_every_method(method):
    assert validate_running_stats("batch", method) == "batch"
    assert validate_running_stats(None, method) == ("ghost" if method == "gbn" else "batch")


@pytest.mark.parametrize("bad", ["mean", "", 0, ["ghost"]])
def test_bad_running_stats_values(bad):
    with pytest.raises(ValueError, match="running_stats must be 'ghost', 'batch' or None"):
        GhostBatchNorm2d.from_module(nn.BatchNorm2d(3), method="gbn", running_stats=bad)
    model = nn.Sequential(nn.BatchNorm2d(3))
    with pytest.raises(ValueError, match="running_stats must be"):
        apply_ghost_noise(model, 4, method="gbn", running_stats=bad)
    assert type(model[0]) is nn.BatchNorm2d  # untouched


def test_apply_ghost_noise_threads_running_stats():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Flatten(), nn.BatchNorm1d(4 * 9))
    apply_ghost_noise(model, 4, method="gbn")
    assert [layer.running_stats for _, layer in ghost_layers(model)] == ["ghost", "ghost"]
    apply_ghost_noise(model, 4, method="gbn", running_stats="batch")  # reconfigures in place
    assert [layer.running_stats for _, layer in ghost_layers(model)] == ["batch", "batch"]
    apply_ghost_noise(model, 4, method="xbn")
    assert [layer.running_stats for _, layer in ghost_layers(model)] == ["batch", "batch"]


# ---------------------------------------------------------------------------------------------------
# the Triton kernel path (Triton's interpreter on CPU) and the custom-op path in compiled graphs
# ---------------------------------------------------------------------------------------------------
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def use_kernels(monkeypatch):
    """Route supported tensors through the kernels, on CPU too (interpreted); record their running buffers."""
    monkeypatch.setattr(config.settings(), "backend", "triton")
    calls = []
    real = kernels.ghost_statistics_coefficients

    def record(mv, weight, bias, running_mean, running_var, *args):
        calls.append(running_mean is not None)
        return real(mv, weight, bias, running_mean, running_var, *args)

    monkeypatch.setattr(kernels, "ghost_statistics_coefficients", record)
    return calls


@pytest.mark.parametrize(
    "shape, channels_last",  # channels-last needs a 4-d input
    [
        ((16, 3, 4, 4), False),
        ((13, 3, 4, 4), False),
        ((13, 5), False),
        ((13, 3, 5), False),
        ((16, 3, 4, 4), True),
        ((13, 3, 4, 4), True),
    ],
    ids=["2d", "2d-rem", "1d", "1d-seq", "2d-channels-last", "2d-rem-channels-last"],
)
@pytest.mark.parametrize("running_stats", ["ghost", "batch"])
def test_kernel_path_running_stats_match_loop(use_kernels, shape, running_stats, channels_last):
    plain, layer = _layer(shape, 0.1, method="gbn", running_stats=running_stats)
    plain, layer = plain.to(DEVICE), layer.to(DEVICE)
    batches = make_batches(2, shape, 10)
    for x in batches:
        x = x.to(DEVICE)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        layer(x.requires_grad_()).sum().backward()
    # the kernel updates the buffers for "batch" only; "ghost" is done from the kernel path's moments
    assert use_kernels == [running_stats == "batch"] * 2
    ref = loop_running_stats(batches, 4, running_stats, 0.1, plain.running_mean.cpu(), plain.running_var.cpu())
    assert_stats(layer.running_mean.cpu(), layer.running_var.cpu(), *ref)


@pytest.mark.parametrize("running_stats", ["ghost", "batch"])
def test_kernel_path_equals_pytorch_path(use_kernels, monkeypatch, running_stats):
    shape = (13, 3, 4, 4)
    _, layer = _layer(shape, 0.1, method="gbn", running_stats=running_stats)
    x = make_batches(1, shape, 11)[0].to(DEVICE)
    out = {}
    for on in (True, False):
        monkeypatch.setattr(config.settings(), "backend", "triton" if on else "torch")
        module = copy.deepcopy(layer).to(DEVICE)
        module(x.clone().requires_grad_())
        out[on] = (module.running_mean, module.running_var)
    assert use_kernels == [running_stats == "batch"]
    for a, b in zip(out[True], out[False]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("running_stats", ["ghost", "batch"])
def test_compiled_custom_op_path_running_stats_match_loop(use_kernels, monkeypatch, running_stats):
    """Inside a compiled graph with ``GHOSTNOISE_COMPILED_KERNELS=1`` (the custom ops, which leave the
    running statistics to the graph): the same buffers as the loop."""

    config.enable_compiled_kernels(True)
    monkeypatch.setattr(config.settings(), "compiled_kernels", True)
    assert config.compiled_kernels_enabled()
    torch._dynamo.reset()
    shape = (13, 3, 4, 4)
    plain, layer = _layer(shape, 0.1, method="gbn", running_stats=running_stats)
    layer = layer.to(DEVICE).train()
    batches = make_batches(2, shape, 12)
    try:
        compiled = torch.compile(layer, backend="aot_eager")
        for x in batches:
            compiled(x.to(DEVICE).requires_grad_()).sum().backward()
    finally:
        torch._dynamo.reset()
    # the custom op ran (it calls the kernel without the running statistics), the graph did the update
    assert use_kernels == [False, False]
    ref = loop_running_stats(batches, 4, running_stats, 0.1, plain.running_mean, plain.running_var)
    assert_stats(layer.running_mean.cpu(), layer.running_var.cpu(), *ref)


# ---------------------------------------------------------------------------------------------------
# the callback
# ---------------------------------------------------------------------------------------------------
def test_callback_running_stats_parameter():
    from lightning_ghostnoise import GhostNoise

    hints = typing.get_type_hints(GhostNoise.__init__)
    assert hints["running_stats"] == typing.Optional[typing.Literal["ghost", "batch"]]
    assert "running_stats:" in GhostNoise.__doc__
    with pytest.raises(ValueError, match="applies to method 'gbn' only"):
        GhostNoise(method="xbn", running_stats="ghost")
    with pytest.raises(ValueError, match="running_stats must be"):
        GhostNoise(method="gbn", running_stats="full")
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    GhostNoise(method="gbn", running_stats="batch").controller.apply(model, warn=False)
    assert model[1].running_stats == "batch"
    GhostNoise(method="gbn").controller.apply(model, warn=False)
    assert model[1].running_stats == "ghost"
