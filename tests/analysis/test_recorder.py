"""Observing live layers (lightning_ghostnoise.analysis.recorder): GBN/XBN decomposition, GNI/analytic noise
from the layers' own draws, every layer path, the recorder's hooks."""

import math

import pytest
import torch
from helpers import reference as ref
from torch import nn

from lightning_ghostnoise import apply_ghost_noise, ghost_layers
from lightning_ghostnoise.analysis import NoiseRecorder
from lightning_ghostnoise.layers import (
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostGroupNorm,
    GhostLayerNorm,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _with_affine(module: nn.Module, seed: int = 0) -> nn.Module:
    g = _gen(seed)
    with torch.no_grad():
        module.weight.copy_(torch.rand(module.weight.shape, generator=g) + 0.5)
        module.bias.copy_(torch.randn(module.bias.shape, generator=g))
    return module


def _record(model: nn.Module, x: torch.Tensor) -> dict:
    """The noise each ghost layer of ``model`` injects into one forward, and the output. Gradients are
    recorded, as in training: the layers take their fused paths (``fused=True``)."""
    seen = {}
    with NoiseRecorder(ghost_layers(model), lambda name, layer, noise: seen.__setitem__(name, noise)):
        y = model(x)
    seen["__out__"] = y.detach()
    return seen


@pytest.mark.parametrize("method", ["gbn", "xbn"])
@pytest.mark.parametrize("batch,n", [(16, 4), (18, 4), (13, 5), (3, 8)])
@pytest.mark.parametrize("fused", [True, False])
def test_gbn_xbn_decomposition_reproduces_the_layer(method, batch, n, fused):
    """BN output + measured noise == the GBN/XBN layer's output, and the noise equals a plain loop's."""
    layer = GhostBatchNorm2d.from_module(
        _with_affine(nn.BatchNorm2d(3)), method=method, ghost_batch_size=n, fused=fused
    )
    x = torch.randn(batch, 3, 4, 5, generator=_gen(batch)) * 2 + 1
    model = nn.Sequential(layer).train()
    seen = _record(model, x)
    noise = seen["0"]
    shift, scale = ref.ghost_statistics_noise(x, n, method == "xbn", layer.eps)
    torch.testing.assert_close(noise.shift.double(), shift, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(noise.scale.double(), scale, rtol=1e-4, atol=1e-5)
    rebuilt = ref.with_noise(
        ref.batch_normalized(x, layer.eps), noise.shift.double(), noise.scale.double(), layer.weight, layer.bias, 1.0
    )
    torch.testing.assert_close(seen["__out__"].double(), rebuilt, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_gbn_with_strength_is_bn_plus_scaled_noise(strength):
    layer = GhostBatchNorm2d.from_module(
        _with_affine(nn.BatchNorm2d(4)), method="gbn", ghost_batch_size=4, strength=strength
    )
    x = torch.randn(16, 4, 3, 3, generator=_gen(1))
    seen = _record(nn.Sequential(layer).train(), x)
    noise = seen["0"]
    shift, scale = noise.injected()
    rebuilt = ref.with_noise(
        ref.batch_normalized(x, layer.eps), shift.double(), scale.double(), layer.weight, layer.bias, 1.0
    )
    torch.testing.assert_close(seen["__out__"].double(), rebuilt, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fused", [True, False])
def test_gni_noise_is_the_layers_with_the_same_draws(fused):
    """The recorder's GNI noise equals a plain loop over samples with the layer's own draws, and rebuilds its output."""
    batch, n, seed = 12, 5, 1234
    layer = GhostBatchNorm2d.from_module(
        _with_affine(nn.BatchNorm2d(3)), method="gni", ghost_batch_size=n, seed=seed, fused=fused
    )
    x = torch.randn(batch, 3, 3, 4, generator=_gen(2)) * 3 - 1
    seen = _record(nn.Sequential(layer).train(), x)
    indices = torch.randint(0, batch, (batch, n), generator=_gen(seed))  # the layer's first draw after seeding
    x_hat = ref.batch_normalized(x, layer.eps)
    shift, scale = ref.gni_noise(x_hat, indices, layer.noise_eps)
    torch.testing.assert_close(seen["0"].shift.double(), shift, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(seen["0"].scale.double(), scale, rtol=1e-4, atol=1e-5)
    rebuilt = ref.with_noise(x_hat, shift, scale, layer.weight, layer.bias, 1.0)
    torch.testing.assert_close(seen["__out__"].double(), rebuilt, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["gni", "gbn", "xbn", "analytic"])
def test_noise_rebuilds_the_output_of_the_triton_kernel_path(method, monkeypatch):
    """The CUDA kernels (here in Triton's interpreter) compute the noise inside the kernel; the recorder's
    noise, recomputed from the input and the draws, still rebuilds their output."""
    pytest.importorskip("triton")
    from lightning_ghostnoise import config
    from lightning_ghostnoise.backends.triton import kernels

    calls = []
    real = kernels.affine
    monkeypatch.setattr(kernels, "affine", lambda *a: calls.append(1) or real(*a))
    layer = GhostBatchNorm2d.from_module(
        _with_affine(nn.BatchNorm2d(3)), method=method, ghost_batch_size=4, strength=0.7
    )
    x = torch.randn(10, 3, 3, 4, generator=_gen(8)) * 2 + 1
    seen = {}
    record = NoiseRecorder([("0", layer)], lambda name, layer, noise: seen.__setitem__(name, noise))
    with config.use_backend("triton"), record:  # CPU tensors through Triton's interpreter (tests/conftest.py)
        seen["__out__"] = layer.train()(x).detach()  # with gradients recorded: the fused (kernel) path
    assert calls, "the kernel path was not taken"
    shift, scale = seen["0"].injected()
    rebuilt = ref.with_noise(
        ref.batch_normalized(x, layer.eps), shift.double(), scale.double(), layer.weight, layer.bias, 1.0
    )
    torch.testing.assert_close(seen["__out__"].double(), rebuilt, rtol=1e-4, atol=1e-4)


def test_analytic_noise_is_the_layers_with_the_same_draws():
    batch, n, seed = 10, 6, 77
    layer = GhostBatchNorm1d.from_module(
        _with_affine(nn.BatchNorm1d(5)), method="analytic", ghost_batch_size=n, seed=seed
    )
    x = torch.randn(batch, 5, generator=_gen(3))
    seen = _record(nn.Sequential(layer).train(), x)
    g = _gen(seed)
    normal = torch.randn(batch, 5, generator=g)
    gamma = torch._standard_gamma(torch.full((batch, 5), (n - 1) / 2), generator=g)
    torch.testing.assert_close(seen["0"].shift, normal / math.sqrt(n))
    torch.testing.assert_close(seen["0"].scale, torch.sqrt(2 * gamma / n))
    rebuilt = ref.with_noise(
        ref.batch_normalized(x, layer.eps),
        seen["0"].shift.double(),
        seen["0"].scale.double(),
        layer.weight,
        layer.bias,
        1.0,
    )
    torch.testing.assert_close(seen["__out__"].double(), rebuilt, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["layernorm", "groupnorm"])
def test_gni_after_layernorm_and_groupnorm(kind):
    batch, n, seed = 8, 4, 5
    if kind == "layernorm":
        plain, x, channel_dim = nn.LayerNorm(6), torch.randn(batch, 5, 6, generator=_gen(4)), -1
        layer = GhostLayerNorm.from_module(_with_affine(plain), ghost_batch_size=n, seed=seed)
        x_hat = torch.nn.functional.layer_norm(x.double(), (6,), eps=plain.eps)
    else:
        plain, x, channel_dim = nn.GroupNorm(2, 4), torch.randn(batch, 4, 3, 3, generator=_gen(4)), 1
        layer = GhostGroupNorm.from_module(_with_affine(plain), ghost_batch_size=n, seed=seed)
        x_hat = torch.nn.functional.group_norm(x.double(), 2, eps=plain.eps)
    seen = _record(nn.Sequential(layer).train(), x)
    indices = torch.randint(0, batch, (batch, n), generator=_gen(seed))
    shift, scale = ref.gni_noise(x_hat, indices, layer.noise_eps, channel_dim)
    torch.testing.assert_close(seen["0"].shift.double(), shift, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(seen["0"].scale.double(), scale, rtol=1e-4, atol=1e-5)
    rebuilt = ref.with_noise(x_hat, shift, scale, layer.weight, layer.bias, 1.0, channel_dim)
    torch.testing.assert_close(seen["__out__"].double(), rebuilt, rtol=1e-4, atol=1e-4)


def test_recorder_leaves_nothing_behind_and_sees_inactive_layers():
    model = apply_ghost_noise(nn.Sequential(nn.BatchNorm1d(4), nn.BatchNorm1d(4)), 4, warn=False)
    model[1].strength = 0.0
    seen = []
    recorder = NoiseRecorder(ghost_layers(model), lambda name, layer, noise: seen.append((name, noise is None)))
    with torch.no_grad(), recorder:
        model.train()(torch.randn(8, 4))
        assert all("noise_observer" in layer.__dict__ for layer in model)
    assert seen == [("0", False), ("1", True)]
    for layer in model:
        assert "noise_observer" not in layer.__dict__ and layer.noise_observer is None
        assert not layer._forward_hooks
        assert "noise_observer" not in layer.to_plain().__dict__
    model(torch.randn(8, 4))
    assert len(seen) == 2


def test_the_idle_observer_keeps_compiled_graphs_whole():
    """With no recorder attached (``noise_observer`` None) the ghost layers compile without a graph break."""
    torch._dynamo.reset()
    model = nn.Sequential(
        GhostBatchNorm2d.from_module(nn.BatchNorm2d(3), method="gni", ghost_batch_size=2),
        nn.Flatten(2),
        GhostLayerNorm.from_module(nn.LayerNorm(4), method="analytic", ghost_batch_size=2),
    ).train()
    try:
        explanation = torch._dynamo.explain(model)(torch.randn(4, 3, 2, 2))
        assert explanation.graph_break_count == 0, explanation.break_reasons
    finally:
        torch._dynamo.reset()


def test_isolated_mode_passes_on_the_plain_output():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
    x = torch.randn(16, 2, 5, 5, generator=_gen(5))
    with torch.no_grad():
        expected = plain.train()(x)
    ghost = apply_ghost_noise(__import__("copy").deepcopy(plain), 4, "gbn", warn=False).train()
    with torch.no_grad(), NoiseRecorder(ghost_layers(ghost), lambda *a: None, plain_output=True):
        torch.testing.assert_close(ghost(x), expected)
