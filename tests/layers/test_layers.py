"""Tests for lightning_ghostnoise.layers: exactness against loop references, semantics, edge cases."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers.reference import (
    affine_params,
    ref_apply,
    ref_batch_normalize,
    ref_gbn,
    ref_gni,
    ref_gni_noise,
    ref_layer_normalize,
    ref_sample_normalize,
    ref_xbn,
    varied_input,
)
from torch import nn

from lightning_ghostnoise import functional as GF
from lightning_ghostnoise.layers import (
    METHODS,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostBatchNorm3d,
    GhostGroupNorm,
    GhostLayerNorm,
    ghost_class_for,
    is_ghost_layer,
)

F64 = torch.float64
BN_METHODS = ("gni", "gbn", "xbn", "analytic")
LN_METHODS = ("gni", "analytic")


def cloned_generator(layer) -> torch.Generator:
    g = torch.Generator()
    g.set_state(layer._generator.get_state())
    return g


def with_affine(module: nn.Module, seed: int = 7) -> nn.Module:
    if getattr(module, "weight", None) is not None:
        w, b = affine_params(module.weight.shape[0], seed)
        with torch.no_grad():
            module.weight.copy_(w)
            module.bias.copy_(b)
    return module


def make_ghost(plain: nn.Module, **kw):
    cls = ghost_class_for(type(plain))
    assert cls is not None
    return cls.from_module(plain, **kw)


# (factory of the plain layer, input shape, allowed methods)
LAYER_CASES = {
    "bn1d_2d": (lambda: nn.BatchNorm1d(3), (8, 3), BN_METHODS),
    "bn1d_3d": (lambda: nn.BatchNorm1d(3), (8, 3, 5), BN_METHODS),
    "bn2d": (lambda: nn.BatchNorm2d(3), (8, 3, 4, 4), BN_METHODS),
    "bn3d": (lambda: nn.BatchNorm3d(3), (8, 3, 2, 3, 2), BN_METHODS),
    "ln_tokens": (lambda: nn.LayerNorm(4), (8, 5, 4), LN_METHODS),
    "ln_vectors": (lambda: nn.LayerNorm(4), (8, 4), LN_METHODS),
    "gn1": (lambda: nn.GroupNorm(1, 4), (8, 4, 3, 3), LN_METHODS),
    "gn2": (lambda: nn.GroupNorm(2, 4), (8, 4, 3, 3), LN_METHODS),
}
ALL_COMBOS = [(name, m) for name, (_, _, methods) in LAYER_CASES.items() for m in methods]


def _input(shape, seed=0, dtype=torch.float32):
    return varied_input(shape, seed, dtype) if len(shape) >= 2 else torch.randn(shape)


def _randomize_running_stats(m: nn.Module):
    if getattr(m, "running_mean", None) is not None:
        with torch.no_grad():
            m.running_mean.copy_(torch.randn_like(m.running_mean))
            m.running_var.copy_(0.5 + torch.rand_like(m.running_var))


# ---------------------------------------------------------------------------------------------------
# exactness against loop references
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "strength,shift_noise,scale_noise",
    [(1.0, True, True), (0.5, True, True), (1.0, True, False), (1.0, False, True)],
)
def test_gni_batchnorm2d_layer_matches_loop_reference(strength, shift_noise, scale_noise):
    B, C, N = 8, 3, 4
    bn = with_affine(nn.BatchNorm2d(C))
    layer = GhostBatchNorm2d.from_module(
        bn,
        method="gni",
        ghost_batch_size=N,
        strength=strength,
        shift_noise=shift_noise,
        scale_noise=scale_noise,
        seed=3,
    )
    x = varied_input((B, C, 4, 4), 1)
    g2 = cloned_generator(layer)
    y = layer(x)
    idx = GF.ghost_indices(B, N, generator=g2)
    ref = ref_gni(
        ref_batch_normalize(x, bn.eps), idx, bn.weight.detach(), bn.bias.detach(), strength, shift_noise, scale_noise
    )
    torch.testing.assert_close(y.double(), ref, atol=1e-4, rtol=1e-4)
    # the reference is sensitive to the draw: another draw gives another output
    other = GF.ghost_indices(B, N, generator=torch.Generator().manual_seed(12345))
    ref_other = ref_gni(
        ref_batch_normalize(x, bn.eps), other, bn.weight.detach(), bn.bias.detach(), strength, shift_noise, scale_noise
    )
    assert not torch.allclose(ref_other, ref, atol=1e-3)


def test_gni_layer_generator_advances_between_forwards():
    layer = GhostBatchNorm2d.from_module(nn.BatchNorm2d(3), ghost_batch_size=4, seed=1)
    x = varied_input((8, 3, 4, 4), 2)
    y1, y2 = layer(x), layer(x)
    assert not torch.allclose(y1, y2, atol=1e-3)
    layer.reseed(1)
    y3 = layer(x)
    # same seed -> same draw (running stats changed but x_hat uses batch stats in training)
    torch.testing.assert_close(y1, y3)


@pytest.mark.parametrize(
    "factory,shape,N",
    [
        (lambda: nn.BatchNorm1d(3), (10, 3), 4),
        (lambda: nn.BatchNorm1d(3), (9, 3, 5), 4),
        (lambda: nn.BatchNorm3d(2), (6, 2, 2, 3, 2), 3),
        (lambda: nn.BatchNorm2d(3), (5, 3, 3, 3), 12),  # N > B
        (lambda: nn.BatchNorm2d(3), (7, 3, 3, 3), 1),
    ],
)
def test_gni_batchnorm_family_matches_loop_reference(factory, shape, N):
    bn = with_affine(factory())
    layer = make_ghost(bn, method="gni", ghost_batch_size=N, seed=5)
    x = varied_input(shape, 3)
    g2 = cloned_generator(layer)
    y = layer(x)
    idx = GF.ghost_indices(shape[0], N, generator=g2)
    ref = ref_gni(ref_batch_normalize(x, bn.eps), idx, bn.weight.detach(), bn.bias.detach())
    torch.testing.assert_close(y.double(), ref, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("shape", [(6, 5, 4), (6, 4), (5, 2, 3, 4)])
@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_gni_layernorm_matches_loop_reference(shape, strength):
    D = shape[-1]
    ln = with_affine(nn.LayerNorm(D))
    layer = GhostLayerNorm.from_module(ln, method="gni", ghost_batch_size=3, strength=strength, seed=2)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * (
        0.5 + torch.rand(shape[0], *([1] * (len(shape) - 1)), generator=g)
    ) + torch.randn(shape[0], *([1] * (len(shape) - 2)), D, generator=g)
    g2 = cloned_generator(layer)
    y = layer(x)
    idx = GF.ghost_indices(shape[0], 3, generator=g2)
    x_hat = ref_layer_normalize(x, ln.eps)
    ref = ref_gni(x_hat, idx, ln.weight.detach(), ln.bias.detach(), strength, channel_dim=-1)
    torch.testing.assert_close(y.double(), ref, atol=2e-4, rtol=2e-4)
    # GNI really acted (not just LayerNorm)
    plain = ref_apply(
        x_hat, torch.zeros(shape[0], D), torch.ones(shape[0], D), ln.weight.detach(), ln.bias.detach(), channel_dim=-1
    )
    assert not torch.allclose(plain, ref, atol=1e-2)


def test_gni_layernorm_without_affine():
    ln = nn.LayerNorm(4, elementwise_affine=False)
    layer = GhostLayerNorm.from_module(ln, ghost_batch_size=2, seed=0)
    x = torch.randn(6, 3, 4)
    g2 = cloned_generator(layer)
    y = layer(x)
    ref = ref_gni(ref_layer_normalize(x, ln.eps), GF.ghost_indices(6, 2, generator=g2), channel_dim=-1)
    torch.testing.assert_close(y.double(), ref, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_gni_groupnorm_one_group_matches_loop_reference(strength):
    B, C, N = 7, 4, 3
    gn = with_affine(nn.GroupNorm(1, C))
    layer = GhostGroupNorm.from_module(gn, method="gni", ghost_batch_size=N, strength=strength, seed=4)
    x = varied_input((B, C, 3, 3), 4)
    g2 = cloned_generator(layer)
    y = layer(x)
    idx = GF.ghost_indices(B, N, generator=g2)
    ref = ref_gni(ref_sample_normalize(x, gn.eps), idx, gn.weight.detach(), gn.bias.detach(), strength)
    torch.testing.assert_close(y.double(), ref, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize(
    "factory,shape,channel_dim",
    [
        (lambda: nn.BatchNorm2d(3), (8, 3, 3, 3), 1),
        (lambda: nn.LayerNorm(4), (6, 5, 4), -1),
        (lambda: nn.GroupNorm(1, 3), (6, 3, 2, 2), 1),
    ],
)
def test_analytic_layer_matches_reference(factory, shape, channel_dim):
    plain = with_affine(factory())
    N = 5
    layer = make_ghost(plain, method="analytic", ghost_batch_size=N, strength=0.7, seed=8)
    x = varied_input(shape, 5) if channel_dim == 1 else torch.randn(shape)
    g2 = cloned_generator(layer)
    y = layer(x)
    C = shape[channel_dim]
    shift, scale = GF.analytic_noise(shape[0], C, N, generator=g2)
    if isinstance(plain, nn.BatchNorm2d):
        x_hat = ref_batch_normalize(x, plain.eps)
    elif isinstance(plain, nn.LayerNorm):
        x_hat = ref_layer_normalize(x, plain.eps)
    else:
        x_hat = ref_sample_normalize(x, plain.eps)
    ref = ref_apply(x_hat, shift, scale, plain.weight.detach(), plain.bias.detach(), 0.7, channel_dim=channel_dim)
    torch.testing.assert_close(y.double(), ref, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("B,N", [(8, 4), (9, 4), (11, 4), (3, 4)])
@pytest.mark.parametrize("method", ["gbn", "xbn"])
def test_gbn_xbn_layers_match_loop_reference(method, B, N):
    bn = with_affine(nn.BatchNorm2d(3))
    layer = GhostBatchNorm2d.from_module(bn, method=method, ghost_batch_size=N)
    x = varied_input((B, 3, 3, 3), 6)
    y = layer(x)
    ref_fn = ref_gbn if method == "gbn" else ref_xbn
    ref = ref_fn(x, N, bn.eps, bn.weight.detach(), bn.bias.detach())
    torch.testing.assert_close(y.double(), ref, atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("method", ["gbn", "xbn"])
def test_gbn_xbn_batchnorm1d_vectors(method):
    bn = with_affine(nn.BatchNorm1d(4))
    layer = GhostBatchNorm1d.from_module(bn, method=method, ghost_batch_size=3)
    x = varied_input((10, 4), 7)
    ref_fn = ref_gbn if method == "gbn" else ref_xbn
    torch.testing.assert_close(
        layer(x).double(), ref_fn(x, 3, bn.eps, bn.weight.detach(), bn.bias.detach()), atol=1e-4, rtol=1e-4
    )


# ---------------------------------------------------------------------------------------------------
# gradients: GNI's noise statistics carry no gradient
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_gni_gradient_treats_noise_as_constant(strength):
    B, C, N = 8, 3, 3
    bn = with_affine(nn.BatchNorm2d(C))
    layer = GhostBatchNorm2d.from_module(bn, ghost_batch_size=N, strength=strength, seed=6)
    x = varied_input((B, C, 3, 3), 8).requires_grad_()
    R = torch.randn(B, C, 3, 3, generator=torch.Generator().manual_seed(1))
    g2 = cloned_generator(layer)
    (layer(x) * R).sum().backward()
    gx, gw, gb = x.grad.double(), bn.weight.grad.double(), bn.bias.grad.double()

    idx = GF.ghost_indices(B, N, generator=g2)
    xd = x.detach().double().requires_grad_()
    w = bn.weight.detach().double().requires_grad_()
    b = bn.bias.detach().double().requires_grad_()

    def reference(detach_noise: bool):
        x_hat = ref_batch_normalize(xd, bn.eps)
        if detach_noise:
            shift, scale = ref_gni_noise(x_hat.detach(), idx)
        else:  # differentiable noise statistics (what the library must NOT do)
            flat = x_hat.reshape(B, C, -1)
            bm = flat.mean(dim=(0, 2))
            bv = ((flat - bm.view(1, C, 1)) ** 2).mean(dim=(0, 2))
            pool = flat[idx]  # (B, N, C, S)
            gm = pool.mean(dim=(1, 3))
            gv = ((pool - gm.view(B, 1, C, 1)) ** 2).mean(dim=(1, 3))
            shift, scale = gm - bm, torch.sqrt((gv + 1e-3) / (bv + 1e-3))
        s4 = shift.view(B, C, 1, 1)
        k4 = scale.view(B, C, 1, 1)
        return w.view(1, C, 1, 1) * (x_hat - strength * s4) / k4**strength + b.view(1, C, 1, 1)

    (reference(True) * R.double()).sum().backward()
    torch.testing.assert_close(gx, xd.grad, atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(gw, w.grad, atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(gb, b.grad, atol=2e-4, rtol=2e-4)
    # the check has teeth: with gradient through the noise statistics the input gradient differs
    grad_const = xd.grad.clone()
    xd.grad = None
    (reference(False) * R.double()).sum().backward()
    assert (xd.grad - grad_const).abs().max() > 1e-2


def test_gni_layernorm_gradient_treats_noise_as_constant():
    B, T, D, N = 6, 4, 5, 3
    ln = with_affine(nn.LayerNorm(D))
    layer = GhostLayerNorm.from_module(ln, ghost_batch_size=N, seed=9)
    x = torch.randn(B, T, D, generator=torch.Generator().manual_seed(3)).requires_grad_()
    R = torch.randn(B, T, D, generator=torch.Generator().manual_seed(4))
    g2 = cloned_generator(layer)
    (layer(x) * R).sum().backward()
    idx = GF.ghost_indices(B, N, generator=g2)
    xd = x.detach().double().requires_grad_()
    x_hat = ref_layer_normalize(xd, ln.eps)
    shift, scale = ref_gni_noise(x_hat.detach(), idx, channel_dim=-1)
    y = ln.weight.detach().double() * (x_hat - shift.view(B, 1, D)) / scale.view(B, 1, D) + ln.bias.detach().double()
    (y * R.double()).sum().backward()
    torch.testing.assert_close(x.grad.double(), xd.grad, atol=2e-4, rtol=2e-4)


def test_gni_double_backward_matches_reference():
    """Second derivatives (gradient penalties) through GNI equal those of the reference with constant noise."""
    B, C, N = 6, 2, 3
    bn = with_affine(nn.BatchNorm2d(C))
    layer = GhostBatchNorm2d.from_module(bn, ghost_batch_size=N, seed=4, fused=False).double()
    x = varied_input((B, C, 2, 2), 11, F64).requires_grad_()
    R = torch.randn(B, C, 2, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
    g2 = cloned_generator(layer)
    (gx,) = torch.autograd.grad((layer(x) * R).sum(), x, create_graph=True)
    (ggx,) = torch.autograd.grad(gx.pow(2).sum(), x)

    idx = GF.ghost_indices(B, N, generator=g2)
    xd = x.detach().clone().requires_grad_()
    x_hat = ref_batch_normalize(xd, bn.eps)
    shift, scale = ref_gni_noise(x_hat.detach(), idx)
    w, b = bn.weight.detach().double().view(1, C, 1, 1), bn.bias.detach().double().view(1, C, 1, 1)
    y_ref = w * (x_hat - shift.view(B, C, 1, 1)) / scale.view(B, C, 1, 1) + b
    (gx_ref,) = torch.autograd.grad((y_ref * R).sum(), xd, create_graph=True)
    (ggx_ref,) = torch.autograd.grad(gx_ref.pow(2).sum(), xd)
    torch.testing.assert_close(gx, gx_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ggx, ggx_ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "factory,shape", [(lambda: nn.BatchNorm2d(2), (4, 2, 2, 1)), (lambda: nn.LayerNorm(3), (4, 2, 3))]
)
@pytest.mark.parametrize("order", ["gradcheck", "gradgradcheck"])
def test_analytic_layer_gradcheck(factory, shape, order):
    """Analytic noise does not depend on the data: with a fixed draw the layer is a smooth function of x."""
    layer = make_ghost(with_affine(factory()), method="analytic", ghost_batch_size=3, seed=0).double()
    layer.fused = order == "gradcheck"  # double backward needs the plain-autograd path
    x = torch.randn(shape, dtype=F64, generator=torch.Generator().manual_seed(0)).requires_grad_()

    def fn(inp):
        layer.reseed(0)
        return layer(inp)

    check = getattr(torch.autograd, order)
    assert check(fn, (x,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("method", ["gbn", "xbn"])
def test_gbn_xbn_layer_gradients_flow_through_ghost_statistics(method):
    bn = nn.BatchNorm1d(2)
    layer = GhostBatchNorm1d.from_module(bn, method=method, ghost_batch_size=3).double()
    x = torch.randn(7, 2, 3, dtype=F64, generator=torch.Generator().manual_seed(0)).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: layer(x), (x,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("method", ["gbn", "xbn"])
def test_gbn_xbn_layer_double_backward(method):
    """Second derivatives (gradient penalties) as correct as plain BatchNorm's (which passes this check)."""
    plain = nn.BatchNorm1d(2).double()
    x = torch.randn(5, 2, 2, dtype=F64, generator=torch.Generator().manual_seed(0)).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda x: plain(x), (x,), eps=1e-6, atol=1e-5)
    layer = GhostBatchNorm1d.from_module(nn.BatchNorm1d(2), method=method, ghost_batch_size=3, fused=False).double()
    assert torch.autograd.gradgradcheck(lambda x: layer(x), (x,), eps=1e-6, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# semantics: eval mode, strength 0, settings
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case,method", ALL_COMBOS)
def test_eval_mode_is_bit_identical_to_plain(case, method):
    factory, shape, _ = LAYER_CASES[case]
    plain = with_affine(factory())
    _randomize_running_stats(plain)
    ghost = make_ghost(copy.deepcopy(plain), method=method, ghost_batch_size=3)
    plain.eval()
    ghost.eval()
    x = _input(shape, 1)
    assert torch.equal(ghost(x), plain(x))


@pytest.mark.parametrize("method", BN_METHODS)
def test_eval_mode_without_running_stats_is_bit_identical(method):
    plain = with_affine(nn.BatchNorm2d(3, track_running_stats=False))
    ghost = make_ghost(copy.deepcopy(plain), method=method, ghost_batch_size=3)
    plain.eval()
    ghost.eval()
    x = _input((6, 3, 2, 2))
    assert torch.equal(ghost(x), plain(x))


@pytest.mark.parametrize("case,method", ALL_COMBOS)
def test_strength_zero_training_is_bit_identical_to_plain(case, method):
    factory, shape, _ = LAYER_CASES[case]
    plain = with_affine(factory())
    ghost = make_ghost(copy.deepcopy(plain), method=method, ghost_batch_size=3, strength=0.0)
    plain.train()
    ghost.train()
    for seed in range(2):
        x = _input(shape, seed)
        assert torch.equal(ghost(x), plain(x))
    for name, buf in plain.named_buffers():
        assert torch.equal(buf, dict(ghost.named_buffers())[name]), name


@pytest.mark.parametrize("case,method", ALL_COMBOS)
def test_noise_is_active_in_training(case, method):
    factory, shape, _ = LAYER_CASES[case]
    plain = with_affine(factory())
    ghost = make_ghost(copy.deepcopy(plain), method=method, ghost_batch_size=3)
    x = _input(shape, 2)
    assert not torch.allclose(ghost(x), plain(x), atol=1e-3)


@pytest.mark.parametrize("method", BN_METHODS)
def test_frozen_layer_in_eval_mode_during_training_is_plain(method):
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
    ghost_model = copy.deepcopy(model)
    ghost_model[1] = GhostBatchNorm2d.from_module(ghost_model[1], method=method, ghost_batch_size=2)
    model.train()
    ghost_model.train()
    model[1].eval()
    ghost_model[1].eval()
    x = torch.randn(6, 3, 3, 3)
    assert torch.equal(model(x), ghost_model(x))


def test_strength_is_settable_and_validated():
    plain = nn.BatchNorm2d(3)
    layer = GhostBatchNorm2d.from_module(copy.deepcopy(plain), ghost_batch_size=2)
    x = varied_input((6, 3, 2, 2), 3)
    layer.strength = 0
    assert layer.strength == 0.0 and float(layer._ghost_strength) == 0.0
    assert torch.equal(layer(x), plain(x))
    layer.strength = 0.25
    assert layer.strength == 0.25 and float(layer._ghost_strength) == 0.25
    assert not torch.allclose(layer(x), plain(x), atol=1e-3)
    for bad in (-0.1, float("nan"), float("inf"), "1", None, True):
        with pytest.raises(ValueError, match="strength must be a finite number >= 0"):
            layer.strength = bad
    assert layer.strength == 0.25 and float(layer._ghost_strength) == 0.25  # unchanged by failures


def test_strength_tensor_buffer_drives_output():
    layer = GhostBatchNorm2d.from_module(nn.BatchNorm2d(3), ghost_batch_size=2, strength=0.5, seed=1)
    x = varied_input((6, 3, 2, 2), 4)
    g = cloned_generator(layer)
    y = layer(x)
    x_hat = ref_batch_normalize(x, 1e-5)
    ref = ref_gni(x_hat, GF.ghost_indices(6, 2, generator=g), strength=0.5)
    torch.testing.assert_close(y.double(), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", BN_METHODS)
def test_ghost_batch_size_is_settable_and_validated(method):
    layer = GhostBatchNorm2d.from_module(nn.BatchNorm2d(3), method=method, ghost_batch_size=4)
    layer.ghost_batch_size = 6
    assert layer.ghost_batch_size == 6
    layer.ghost_batch_size = 3.0  # a whole float is accepted
    assert layer.ghost_batch_size == 3 and isinstance(layer.ghost_batch_size, int)
    for bad in (2.5, "4", None, True):
        with pytest.raises(ValueError, match="whole number"):
            layer.ghost_batch_size = bad
    low = 2 if method in ("xbn", "analytic") else 1
    with pytest.raises(ValueError, match=f"must be >= {low}"):
        layer.ghost_batch_size = low - 1
    with pytest.raises(ValueError, match=f"must be >= {low}"):
        layer.ghost_batch_size = -4
    assert layer.ghost_batch_size == 3


def test_ghost_batch_size_change_takes_effect():
    plain = nn.BatchNorm2d(3)
    layer = GhostBatchNorm2d.from_module(copy.deepcopy(plain), method="gbn", ghost_batch_size=2)
    x = varied_input((8, 3, 3, 3), 5)
    assert not torch.allclose(layer(x), plain(x), atol=1e-3)
    layer.ghost_batch_size = 8  # one ghost batch: plain BN
    torch.testing.assert_close(layer(x), plain(x), atol=1e-5, rtol=1e-5)
    layer.ghost_batch_size = 4
    torch.testing.assert_close(layer(x).double(), ref_gbn(x, 4, 1e-5), atol=5e-5, rtol=5e-5)


def test_extra_repr_mentions_settings():
    layer = GhostBatchNorm2d.from_module(
        nn.BatchNorm2d(3), method="gbn", ghost_batch_size=4, strength=0.5, shift_noise=False
    )
    text = repr(layer)
    assert (
        "method=gbn" in text and "ghost_batch_size=4" in text and "strength=0.5" in text and "shift_noise=False" in text
    )


def test_from_module_shares_parameters_and_keeps_state_dict_keys():
    bn = nn.BatchNorm2d(3)
    layer = GhostBatchNorm2d.from_module(bn)
    assert layer.weight is bn.weight and layer.bias is bn.bias and layer.running_mean is bn.running_mean
    assert list(layer.state_dict()) == list(bn.state_dict())
    assert isinstance(layer, nn.BatchNorm2d) and is_ghost_layer(layer) and not is_ghost_layer(bn)
    plain = layer.to_plain()
    assert type(plain) is nn.BatchNorm2d and plain.weight is bn.weight
    assert list(plain.state_dict()) == list(bn.state_dict())
    assert not hasattr(plain, "_ghost_strength") and not hasattr(plain, "method")


def test_from_module_refuses_wrong_type():
    with pytest.raises(TypeError, match="expects a BatchNorm2d"):
        GhostBatchNorm2d.from_module(nn.BatchNorm1d(3))


# ---------------------------------------------------------------------------------------------------
# running statistics
# ---------------------------------------------------------------------------------------------------
def _batches(n, shape, seed, per_sample_sd=2.0, spatial_sd=0.3):
    g = torch.Generator().manual_seed(seed)
    B, C = shape[:2]
    extra = (1,) * (len(shape) - 2)
    mu = torch.linspace(-2, 3, C).view((1, C) + extra)
    return [
        mu + per_sample_sd * torch.randn((B, C) + extra, generator=g) + spatial_sd * torch.randn(shape, generator=g)
        for _ in range(n)
    ]


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("method", ["gni", "analytic"])
def test_gni_running_stats_equal_plain_batchnorm(method, momentum):
    plain = nn.BatchNorm2d(3, momentum=momentum)
    ghost = GhostBatchNorm2d.from_module(copy.deepcopy(plain), method=method, ghost_batch_size=4)
    for x in _batches(6, (8, 3, 3, 3), 0):
        plain(x)
        ghost(x)
    torch.testing.assert_close(ghost.running_mean, plain.running_mean, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(ghost.running_var, plain.running_var, atol=1e-7, rtol=1e-6)
    assert int(ghost.num_batches_tracked) == int(plain.num_batches_tracked) == 6


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("method", ["gbn", "xbn"])
@pytest.mark.parametrize("B", [16, 13])
def test_gbn_xbn_running_stats_equal_plain_batchnorm(method, momentum, B):
    """``running_stats="batch"`` (GBN's former behaviour, XBN's only one): the full batch's statistics."""
    plain = nn.BatchNorm2d(3, momentum=momentum)
    ghost = GhostBatchNorm2d.from_module(copy.deepcopy(plain), method=method, ghost_batch_size=4, running_stats="batch")
    # per-sample variance dominates: running var from ghost-batch variances would be ~25% too low
    for x in _batches(15, (B, 3, 3, 3), 1):
        plain(x)
        ghost(x)
    torch.testing.assert_close(ghost.running_mean, plain.running_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ghost.running_var, plain.running_var, atol=1e-5, rtol=1e-5)
    assert int(ghost.num_batches_tracked) == int(plain.num_batches_tracked) == 15


@pytest.mark.parametrize("method", ["gbn", "xbn", "gni"])
def test_running_stats_estimate_population_moments(method):
    mu = torch.tensor([1.5, -0.5])
    sigma = torch.tensor([2.0, 0.5])
    layer = GhostBatchNorm1d.from_module(nn.BatchNorm1d(2, momentum=None), method=method, ghost_batch_size=4)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        layer(mu + sigma * torch.randn(30, 2, generator=g))
    # 1800 iid values per channel: standard errors ~ sigma/42 (mean) and var*0.033 (var)
    torch.testing.assert_close(layer.running_mean, mu, atol=float(0.15 * sigma.max()), rtol=0)
    torch.testing.assert_close(layer.running_var, sigma**2, atol=0, rtol=0.15)
    assert int(layer.num_batches_tracked) == 60


@pytest.mark.parametrize("method", BN_METHODS)
def test_track_running_stats_false(method):
    plain = with_affine(nn.BatchNorm2d(3, track_running_stats=False))
    ghost = GhostBatchNorm2d.from_module(copy.deepcopy(plain), method=method, ghost_batch_size=3, seed=2)
    assert ghost.running_mean is None and ghost.num_batches_tracked is None
    x = varied_input((9, 3, 2, 2), 9)
    g = cloned_generator(ghost)
    y = ghost(x)
    assert torch.isfinite(y).all()
    w, b = plain.weight.detach(), plain.bias.detach()
    if method == "gbn":
        ref = ref_gbn(x, 3, plain.eps, w, b)
    elif method == "xbn":
        ref = ref_xbn(x, 3, plain.eps, w, b)
    elif method == "gni":
        ref = ref_gni(ref_batch_normalize(x, plain.eps), GF.ghost_indices(9, 3, generator=g), w, b)
    else:
        shift, scale = GF.analytic_noise(9, 3, 3, generator=g)
        ref = ref_apply(ref_batch_normalize(x, plain.eps), shift, scale, w, b)
    torch.testing.assert_close(y.double(), ref, atol=1e-4, rtol=1e-4)
    assert ghost.running_mean is None


# ---------------------------------------------------------------------------------------------------
# edge cases: remainders, tiny batches, degenerate data
# ---------------------------------------------------------------------------------------------------
def _finite_forward_backward(layer, x):
    x = x.clone().requires_grad_()
    y = layer(x)
    assert torch.isfinite(y).all(), "non-finite output"
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    assert torch.isfinite(x.grad).all(), "non-finite input gradient"
    for p in layer.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), "non-finite parameter gradient"
    return y


@pytest.mark.parametrize("method", BN_METHODS)
@pytest.mark.parametrize("B,N", [(9, 4), (3, 4), (5, 16), (2, 2)])
def test_bn_methods_any_batch_size(method, B, N):
    layer = GhostBatchNorm2d.from_module(nn.BatchNorm2d(3), method=method, ghost_batch_size=N)
    _finite_forward_backward(layer, varied_input((B, 3, 3, 3), B))


@pytest.mark.parametrize("method", BN_METHODS)
def test_single_sample_feature_map(method):
    plain = with_affine(nn.BatchNorm2d(3))
    ghost = GhostBatchNorm2d.from_module(copy.deepcopy(plain), method=method, ghost_batch_size=4)
    x = varied_input((1, 3, 4, 4), 1)
    y = _finite_forward_backward(ghost, x)
    if method != "analytic":
        # one sample: its ghost batch is the whole batch (GBN, GNI: shift 0, scale 1; XBN: own moments)
        torch.testing.assert_close(y, plain(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["gbn", "xbn"])
def test_single_vector_sample_gbn_xbn(method):
    # one value per channel carries no variance: like plain BatchNorm1d, the ghost layer refuses it in
    # training (rather than pulling the running variance towards 0)
    plain = with_affine(nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        copy.deepcopy(plain)(torch.randn(1, 4))
    ghost = GhostBatchNorm1d.from_module(plain, method=method, ghost_batch_size=4)
    before = ghost.running_var.clone()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        ghost(torch.randn(1, 4))
    assert torch.equal(ghost.running_var, before)


@pytest.mark.parametrize("method", ["gni", "analytic"])
def test_single_vector_sample_gni(method):
    """(1, C) in training: plain BatchNorm raises; the design leaves open whether GNI raises the same clear
    error or normalizes the lone sample by itself. Either is acceptable; NaN/inf or another error is not."""
    plain = with_affine(nn.BatchNorm1d(4))
    ghost = GhostBatchNorm1d.from_module(plain, method=method, ghost_batch_size=4)
    x = torch.randn(1, 4)
    try:
        y = ghost(x.clone().requires_grad_())
    except ValueError as err:
        assert "value per channel" in str(err)
        return
    y = _finite_forward_backward(ghost, x)
    if method == "gni":  # x_hat = 0, shift = 0, scale = 1
        torch.testing.assert_close(y, plain.bias.detach().view(1, 4), atol=1e-4, rtol=0)
    assert torch.isfinite(ghost.running_var).all() and bool((ghost.running_var >= 0).all())


@pytest.mark.parametrize("case,method", ALL_COMBOS)
@pytest.mark.parametrize("kind", ["constant_channel", "all_zero"])
def test_degenerate_inputs_stay_finite(case, method, kind):
    factory, shape, _ = LAYER_CASES[case]
    layer = make_ghost(with_affine(factory()), method=method, ghost_batch_size=3)
    if kind == "all_zero":
        x = torch.zeros(shape)
    else:
        x = _input(shape, 3)
        if isinstance(layer, nn.LayerNorm):
            x[..., 0] = 0.0
            x[0] = 2.5  # one sample whose every value is the same
        else:
            x[:, 0] = 5.0
    _finite_forward_backward(layer, x)


def test_gni_one_layer_sample_per_pool_value():
    # GNI with N > B and with N == 1 stays finite and matches the reference (N=1: ghost var 0 -> eps)
    for N in (1, 20):
        layer = GhostBatchNorm1d.from_module(nn.BatchNorm1d(3), ghost_batch_size=N, seed=N)
        x = varied_input((4, 3), 2)
        g = cloned_generator(layer)
        y = layer(x)
        ref = ref_gni(ref_batch_normalize(x, 1e-5), GF.ghost_indices(4, N, generator=g))
        torch.testing.assert_close(y.double(), ref, atol=1e-3, rtol=1e-4)


def test_analytic_shift_only_with_ghost_batch_size_one():
    """The setter accepts N=1 for analytic shift-only noise (min_ghost_batch_size is 1): forward must work."""
    bn = with_affine(nn.BatchNorm2d(3))
    layer = GhostBatchNorm2d.from_module(bn, method="analytic", ghost_batch_size=1, scale_noise=False, seed=0)
    assert layer.ghost_batch_size == 1
    x = varied_input((6, 3, 2, 2), 1)
    g2 = cloned_generator(layer)
    y = layer(x)  # shift ~ Normal(0, 1)/sqrt(1), no scale noise
    assert torch.isfinite(y).all()
    shift, _ = GF.analytic_noise(6, 3, 1, generator=g2)
    ref = ref_apply(
        ref_batch_normalize(x, bn.eps), shift, torch.ones(6, 3), bn.weight.detach(), bn.bias.detach(), scale_noise=False
    )
    torch.testing.assert_close(y.double(), ref, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="must be >= 2"):
        GhostBatchNorm2d.from_module(nn.BatchNorm2d(3), method="analytic", ghost_batch_size=1, scale_noise=True)


def test_analytic_switching_scale_noise_on_with_one_member_never_gives_nan():
    """N=1 is valid only for shift-only analytic noise; turning scale noise on afterwards must be refused
    (at assignment or at forward) rather than produce scale 0 -> inf/NaN outputs."""
    layer = GhostBatchNorm2d.from_module(nn.BatchNorm2d(3), method="analytic", ghost_batch_size=1, scale_noise=False)
    x = varied_input((6, 3, 2, 2), 1)
    try:
        layer.scale_noise = True
    except ValueError:
        return
    try:
        y = layer(x)
    except ValueError:
        return
    assert torch.isfinite(y).all(), "scale_noise=True with ghost_batch_size=1 silently produced non-finite outputs"


@pytest.mark.parametrize("shift_noise,scale_noise", [(False, True), (True, False), (False, False)])
def test_noise_switches_settable_after_construction(shift_noise, scale_noise):
    bn = with_affine(nn.BatchNorm2d(3))
    layer = GhostBatchNorm2d.from_module(bn, ghost_batch_size=3, seed=2)
    layer.shift_noise, layer.scale_noise = shift_noise, scale_noise
    x = varied_input((8, 3, 3, 3), 3)
    g2 = cloned_generator(layer)
    y = layer(x)
    idx = GF.ghost_indices(8, 3, generator=g2)
    ref = ref_gni(
        ref_batch_normalize(x, bn.eps), idx, bn.weight.detach(), bn.bias.detach(), 1.0, shift_noise, scale_noise
    )
    torch.testing.assert_close(y.double(), ref, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------
# low precision and memory format
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case,method", ALL_COMBOS)
def test_low_precision_outputs(case, method, dtype):
    factory, shape, _ = LAYER_CASES[case]
    layer = make_ghost(with_affine(factory()), method=method, ghost_batch_size=3).to(dtype)
    x = _input(shape, 4).to(dtype)
    y = layer(x)
    assert y.dtype == dtype
    assert torch.isfinite(y).all()
    # close to the float32 computation with the same noise
    layer32 = make_ghost(with_affine(factory()), method=method, ghost_batch_size=3)
    y32 = layer32(x.float())
    torch.testing.assert_close(y.float(), y32, atol=0.15, rtol=0.05)


@pytest.mark.parametrize("method", BN_METHODS)
def test_channels_last_preserved(method):
    layer = GhostBatchNorm2d.from_module(with_affine(nn.BatchNorm2d(3)), method=method, ghost_batch_size=3, seed=1)
    x = varied_input((6, 3, 4, 5), 2)
    ref_layer = copy.deepcopy(layer)
    y = layer(x.to(memory_format=torch.channels_last))
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, ref_layer(x), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [0, -1])
def test_ghost_batch_size_below_one_rejected(bad):
    with pytest.raises(ValueError, match="ghost_batch_size must be >= 1"):
        GhostBatchNorm2d.from_module(nn.BatchNorm2d(3), ghost_batch_size=bad)


@pytest.mark.parametrize("method", ["xbn", "analytic"])
def test_ghost_batch_size_one_rejected_for_xbn_and_analytic(method):
    with pytest.raises(ValueError, match=f"must be >= 2 for method '{method}'"):
        GhostBatchNorm2d.from_module(nn.BatchNorm2d(3), method=method, ghost_batch_size=1)


def test_non_integer_ghost_batch_size_rejected():
    with pytest.raises(ValueError, match="whole number"):
        GhostBatchNorm2d.from_module(nn.BatchNorm2d(3), ghost_batch_size=2.5)


@pytest.mark.parametrize("bad", [-1.0, float("nan")])
def test_bad_strength_rejected(bad):
    with pytest.raises(ValueError, match="strength must be a finite number >= 0"):
        GhostBatchNorm2d.from_module(nn.BatchNorm2d(3), strength=bad)


def test_unknown_method_rejected():
    with pytest.raises(ValueError, match="Unknown ghost noise method 'dropout'.*gni"):
        GhostBatchNorm2d.from_module(nn.BatchNorm2d(3), method="dropout")


@pytest.mark.parametrize("method", ["gbn", "xbn"])
def test_layernorm_groupnorm_refuse_batch_split_methods(method):
    with pytest.raises(ValueError, match="does not apply to LayerNorm"):
        GhostLayerNorm.from_module(nn.LayerNorm(4), method=method)
    with pytest.raises(ValueError, match="does not apply to GroupNorm"):
        GhostGroupNorm.from_module(nn.GroupNorm(1, 4), method=method)


@pytest.mark.parametrize("case,method", ALL_COMBOS)
def test_integer_input_rejected(case, method):
    factory, shape, _ = LAYER_CASES[case]
    layer = make_ghost(factory(), method=method, ghost_batch_size=3)
    with pytest.raises(TypeError, match="floating point"):
        layer(torch.ones(shape, dtype=torch.int64))


def test_layernorm_two_dim_normalized_shape_rejected():
    with pytest.raises(ValueError, match="last dimension only"):
        GhostLayerNorm.from_module(nn.LayerNorm((4, 5)))


@pytest.mark.parametrize("method", BN_METHODS)
def test_wrong_input_rank_rejected(method):
    layer = GhostBatchNorm2d.from_module(nn.BatchNorm2d(3), method=method, ghost_batch_size=2)
    with pytest.raises(ValueError, match="expected 4D input"):
        layer(torch.randn(4, 3, 5))
    layer1d = GhostBatchNorm1d.from_module(nn.BatchNorm1d(3), method=method, ghost_batch_size=2)
    with pytest.raises(ValueError, match="expected 2D or 3D input"):
        layer1d(torch.randn(4, 3, 5, 5))


@pytest.mark.parametrize(
    "cls,plain", [(GhostLayerNorm, lambda: nn.LayerNorm(4)), (GhostGroupNorm, lambda: nn.GroupNorm(1, 4))]
)
def test_missing_batch_dimension_rejected(cls, plain):
    layer = cls.from_module(plain())
    with pytest.raises(ValueError, match="needs a batch dimension"):
        layer(torch.randn(4))


def test_bad_noise_eps_and_seed_rejected():
    with pytest.raises(ValueError, match="noise_eps must be a positive finite number"):
        GhostBatchNorm2d.from_module(nn.BatchNorm2d(3), noise_eps=0.0)
    with pytest.raises(ValueError, match="seed must be in"):
        GhostBatchNorm2d.from_module(nn.BatchNorm2d(3), seed=-1)


def test_methods_constant():
    assert set(METHODS) == {"gni", "gbn", "xbn", "analytic"}
    assert GhostBatchNorm3d._base is nn.BatchNorm3d and ghost_class_for(nn.SyncBatchNorm) is None
    assert math.isclose(GF.NOISE_EPS, 1e-3)


@pytest.mark.parametrize("method", BN_METHODS)
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("N", [4, 32])  # 32 > B: GNI averages by counting (a matrix product)
def test_bn_methods_under_autocast_match_full_precision(method, fused, N):
    """Under bf16 autocast the statistics stay in float32 (autocast would run their matrix products in bf16)."""
    plain = with_affine(nn.BatchNorm2d(4))
    x = varied_input((16, 4, 3, 3), 2)
    outs = []
    for autocast in (False, True):
        layer = make_ghost(copy.deepcopy(plain), method=method, ghost_batch_size=N, fused=fused)
        layer.train()
        layer.reseed(4)
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = layer(xi)
        y.float().square().sum().backward()
        outs.append((y.float(), xi.grad, layer.weight.grad, layer.running_var))
    for full, low in zip(*outs):
        torch.testing.assert_close(low, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", LN_METHODS)
@pytest.mark.parametrize(
    "factory,shape", [(lambda: nn.LayerNorm(6), (8, 5, 6)), (lambda: nn.GroupNorm(2, 4), (8, 4, 3, 3))]
)
def test_layernorm_groupnorm_fused_and_plain_autograd_agree(method, factory, shape):
    """The layers' default (fused: keeps only the input for backward) against ``fused=False``."""
    plain = with_affine(factory())
    x = torch.randn(shape, generator=torch.Generator().manual_seed(6)) * 2 + 1
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    results = []
    for fused in (True, False):
        layer = make_ghost(copy.deepcopy(plain), method=method, ghost_batch_size=3, strength=0.8, seed=11, fused=fused)
        xr = x.clone().requires_grad_()
        y = layer(xr)
        assert (y.grad_fn.name() == "_NormalizedNoiseBackward") is fused
        y.backward(grad)
        results.append((y.detach(), xr.grad, layer.weight.grad, layer.bias.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    for got, want in zip(results[0][1:], results[1][1:]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", LN_METHODS)
@pytest.mark.parametrize(
    "factory,shape,frozen",
    [
        (lambda: nn.LayerNorm(6, bias=False), (8, 5, 6), False),  # weight only
        (lambda: nn.LayerNorm(6, elementwise_affine=False), (8, 5, 6), False),  # no affine
        (lambda: nn.GroupNorm(2, 4), (8, 4, 3, 3), True),  # frozen affine: only the input's gradient
    ],
)
def test_layernorm_groupnorm_partial_affine_fused_and_plain_agree(method, factory, shape, frozen):
    """The native fused path with a weight but no bias, no affine at all, and a frozen affine."""
    plain = factory()
    if plain.weight is not None:
        with torch.no_grad():
            plain.weight.uniform_(0.5, 1.5)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3)) * 2 + 1
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    results = []
    for fused in (True, False):
        layer = make_ghost(copy.deepcopy(plain), method=method, ghost_batch_size=3, strength=0.8, seed=5, fused=fused)
        if frozen:
            layer.requires_grad_(False)
        xr = x.clone().requires_grad_()
        y = layer(xr)
        y.backward(grad)
        params = [p.grad for p in (layer.weight, layer.bias) if p is not None]
        results.append((y.detach(), xr.grad, *params))
    assert len(results[0]) == len(results[1])
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    for got, want in zip(results[0][1:], results[1][1:]):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
