"""Tests for lightning_ghostnoise.functional against plain float64 loop references.

The ``ref_*`` functions below are written independently of the library, from the formulas in
DESIGN.md, as explicit python loops over samples / ghost batches / channels in float64. They are
also imported by ``test_layers.py``.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from helpers.reference import (  # noqa: F401
    F64,
    NOISE_EPS,
    _affine,
    _biased_moments,
    affine_params,
    ref_apply,
    ref_batch_normalize,
    ref_gbn,
    ref_gbn_strength,
    ref_gni,
    ref_gni_noise,
    ref_groups,
    ref_layer_normalize,
    ref_sample_normalize,
    ref_xbn,
    varied_input,
)

from lightning_ghostnoise import functional as GF
from lightning_ghostnoise.backends import torch_passes
from lightning_ghostnoise.functional import affine as GFA
from lightning_ghostnoise.functional import batch_norm as GFB
from lightning_ghostnoise.functional import moments as GFM
from lightning_ghostnoise.functional import noise as GFN


class _LazyStats:
    """``scipy.stats``, imported on first use (the GPU check runs the kernel tests without scipy)."""

    def __getattr__(self, name: str):
        from scipy import stats as scipy_stats

        return getattr(scipy_stats, name)


stats = _LazyStats()


# ---------------------------------------------------------------------------------------------------
# per_sample_moments, ghost_indices, ghost_groups
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,channel_dim", [((5, 3, 4, 2), 1), ((5, 6, 3), -1), ((5, 3), 1), ((4, 2, 3, 3, 2), 1)])
def test_per_sample_moments_match_loop(shape, channel_dim):
    x = varied_input(shape, 0, F64) if channel_dim == 1 else torch.randn(shape, dtype=F64)
    mean, var = GF.per_sample_moments(x, channel_dim)
    xc = x.movedim(channel_dim, 1)
    B, C = xc.shape[:2]
    assert mean.shape == (B, C) and var.shape == (B, C)
    for b in range(B):
        for c in range(C):
            m, v = _biased_moments(xc[b, c].reshape(-1))
            assert float(mean[b, c]) == pytest.approx(float(m), abs=1e-12)
            assert float(var[b, c]) == pytest.approx(float(v), abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_per_sample_moments_are_float32_for_low_precision(dtype):
    x = torch.randn(4, 3, 5, 5).to(dtype)
    mean, var = GF.per_sample_moments(x)
    assert mean.dtype == torch.float32 and var.dtype == torch.float32
    ref_m, ref_v = GF.per_sample_moments(x.to(F64))
    torch.testing.assert_close(mean.double(), ref_m, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(var.double(), ref_v, atol=1e-5, rtol=1e-5)


def test_per_sample_moments_rejects_integer_input():
    with pytest.raises(TypeError, match="floating point"):
        GF.per_sample_moments(torch.ones(4, 3, 2, 2, dtype=torch.int64))


def test_ghost_indices_shape_range_reproducible_and_private():
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    idx = GF.ghost_indices(10, 4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.random.get_rng_state(), before), "ghost_indices with a generator touched the global RNG"
    assert idx.shape == (10, 4) and idx.dtype == torch.int64
    assert int(idx.min()) >= 0 and int(idx.max()) < 10
    assert torch.equal(idx, GF.ghost_indices(10, 4, generator=torch.Generator().manual_seed(3)))
    assert not torch.equal(idx, GF.ghost_indices(10, 4, generator=torch.Generator().manual_seed(4)))
    big = GF.ghost_indices(3, 50, generator=torch.Generator().manual_seed(0))  # N > B
    assert big.shape == (3, 50) and set(big.unique().tolist()) == {0, 1, 2}
    assert GF.ghost_indices(6, 2, generator=torch.Generator().manual_seed(0), num_rows=9).shape == (9, 2)


def test_ghost_indices_draw_with_replacement_uniformly():
    idx = GF.ghost_indices(8, 64, generator=torch.Generator().manual_seed(0), num_rows=2000)
    counts = torch.bincount(idx.reshape(-1), minlength=8).double()
    expected = idx.numel() / 8
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert stats.chi2(7).sf(chi2) > 1e-3
    # with replacement: some rows contain repeats (N=64 > B=8 forces it)
    assert all(len(set(r.tolist())) < 64 for r in idx[:10])


@pytest.mark.parametrize("bad", [0, -3])
def test_ghost_indices_and_groups_reject_bad_size(bad):
    with pytest.raises(ValueError, match="ghost_batch_size must be >= 1"):
        GF.ghost_indices(8, bad)
    with pytest.raises(ValueError, match="ghost_batch_size must be >= 1"):
        GF.ghost_groups(8, bad)


@pytest.mark.parametrize("B,N", [(8, 4), (9, 4), (11, 4), (3, 4), (4, 4), (1, 4), (7, 1), (13, 5)])
def test_ghost_groups_remainder_rule(B, N):
    group, num = GF.ghost_groups(B, N)
    expected = ref_groups(B, N)
    assert num == len(expected)
    assert group.tolist() == [k for k, members in enumerate(expected) for _ in members]
    sizes = torch.bincount(group).tolist()
    assert min(sizes) >= min(N, B)  # no ghost batch smaller than N (unless the batch itself is)


def test_ghost_groups_explicit_example():
    assert GF.ghost_groups(7, 3)[0].tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert GF.ghost_groups(9, 4)[0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1]


# ---------------------------------------------------------------------------------------------------
# GNI: ghost_noise + apply_noise against the pooled loop reference
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,N", [((8, 3, 4, 4), 4), ((8, 3, 4, 4), 12), ((10, 4), 3), ((6, 2, 5), 2)])
def test_ghost_noise_matches_pooled_reference(shape, N):
    x = varied_input(shape, 1)
    x_hat = ref_batch_normalize(x, 1e-5)
    idx = GF.ghost_indices(shape[0], N, generator=torch.Generator().manual_seed(11))
    shift, scale = GF.ghost_noise(*GF.per_sample_moments(x_hat), idx)
    ref_shift, ref_scale = ref_gni_noise(x_hat, idx)
    assert shift.dtype == torch.float32 and scale.dtype == torch.float32
    torch.testing.assert_close(shift.double(), ref_shift, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(scale.double(), ref_scale, atol=2e-6, rtol=1e-5)
    assert not torch.allclose(ref_shift, torch.zeros_like(ref_shift), atol=1e-3)  # the test has teeth


@pytest.mark.parametrize(
    "strength,shift_noise,scale_noise",
    [
        (1.0, True, True),
        (0.5, True, True),
        (1.0, True, False),
        (1.0, False, True),
        (0.5, False, True),
        (2.0, True, True),
    ],
)
def test_gni_functional_matches_loop_reference(strength, shift_noise, scale_noise):
    B, C, N = 8, 3, 4
    x = varied_input((B, C, 3, 3), 2)
    x_hat = F.batch_norm(x, None, None, training=True, eps=1e-5)
    w, b = affine_params(C)
    idx = GF.ghost_indices(B, N, generator=torch.Generator().manual_seed(5))
    shift, scale = GF.ghost_noise(*GF.per_sample_moments(x_hat), idx)
    y = GF.apply_noise(x_hat, shift, scale, w, b, strength=strength, shift_noise=shift_noise, scale_noise=scale_noise)
    ref = ref_gni(ref_batch_normalize(x, 1e-5), idx, w, b, strength, shift_noise, scale_noise)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref, atol=1e-4, rtol=1e-4)


def test_apply_noise_strength_zero_is_plain_affine():
    x_hat = torch.randn(6, 3, 2, 2)
    w, b = affine_params(3)
    shift, scale = 0.5 * torch.randn(6, 3), 0.5 + torch.rand(6, 3)
    y = GF.apply_noise(x_hat, shift, scale, w, b, strength=0.0)
    torch.testing.assert_close(y, x_hat * w.view(1, 3, 1, 1) + b.view(1, 3, 1, 1))
    y_tensor_s = GF.apply_noise(x_hat, shift, scale, w, b, strength=torch.tensor(0.5))
    torch.testing.assert_close(y_tensor_s, GF.apply_noise(x_hat, shift, scale, w, b, strength=0.5))


def test_apply_noise_channel_last_layout():
    x_hat = torch.randn(4, 5, 3)  # (B, T, D) with channel D last
    shift, scale = 0.3 * torch.randn(4, 3), 0.5 + torch.rand(4, 3)
    w, b = affine_params(3)
    y = GF.apply_noise(x_hat, shift, scale, w, b, strength=0.7, channel_dim=-1)
    ref = ref_apply(x_hat, shift, scale, w, b, 0.7, channel_dim=-1)
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_ghost_noise_with_given_batch_moments_and_in_a_compiled_graph():
    """``batch=`` (BatchNorm's closed form) and the gather form traced under ``torch.compile`` give
    the pooled reference's noise."""
    x = varied_input((12, 3, 4, 4), 21)
    x_hat = ref_batch_normalize(x, 1e-5)
    idx = GF.ghost_indices(12, 5, generator=torch.Generator().manual_seed(3))
    mean, var = GF.per_sample_moments(x_hat)
    m64, v64 = mean.double(), var.double()
    batch_m1 = m64.mean(0)
    batch = (batch_m1, (v64 + m64 * m64).mean(0) - batch_m1 * batch_m1)
    ref_shift, ref_scale = ref_gni_noise(x_hat, idx)
    torch._dynamo.reset()
    compiled = torch.compile(GF.ghost_noise, backend="eager", fullgraph=True)
    for got in (
        GF.ghost_noise(mean, var, idx, batch=batch),
        compiled(mean, var, idx),
        compiled(mean, var, idx, batch=batch),
    ):
        torch.testing.assert_close(got[0].double(), ref_shift, atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(got[1].double(), ref_scale, atol=2e-6, rtol=1e-5)
    # the given moments are used, not recomputed
    shifted = GF.ghost_noise(mean, var, idx, batch=(batch[0] + 1, batch[1]))
    torch.testing.assert_close(shifted[0], ref_shift.float() - 1, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("exclusive", [False, True])
@pytest.mark.parametrize("B,N", [(12, 3), (12, 4), (9, 4)])  # equal ghost batches (a reshape), and not (the matrix)
@pytest.mark.slow
def test_ghost_statistics_compiled_matches_eager(B, N, exclusive):
    """Under ``torch.compile`` equal ghost batches are averaged by a reshape instead of the ``B x B``
    matrix (forward and the closed-form backward): same values and gradients as eager."""
    fn = GF.exclusive_batch_norm if exclusive else GF.ghost_batch_norm
    x = varied_input((B, 3, 4, 4), 22).requires_grad_()
    w, b = affine_params(3)
    w.requires_grad_()
    b.requires_grad_()
    grad = torch.randn(B, 3, 4, 4, generator=torch.Generator().manual_seed(4))

    def run(f):
        y = f(x, N, weight=w, bias=b, eps=1e-3, strength=0.8)
        gx, gw, gb = torch.autograd.grad(y, (x, w, b), grad)
        return y, gx, gw, gb

    torch._dynamo.reset()
    compiled = run(torch.compile(fn, backend="aot_eager", fullgraph=True))
    for got, want in zip(compiled, run(fn)):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    assert GFB.ghost_matrix(B, N, exclusive, x) is not None  # eager: the matrix


def test_ghost_noise_carries_no_gradient():
    x_hat = torch.randn(8, 3, 2, 2, requires_grad=True)
    mean, var = GF.per_sample_moments(x_hat)
    assert mean.requires_grad
    shift, scale = GF.ghost_noise(mean, var, GF.ghost_indices(8, 4, generator=torch.Generator().manual_seed(0)))
    assert not shift.requires_grad and not scale.requires_grad


def test_ghost_noise_with_one_sample_is_identity_noise():
    x_hat = torch.randn(1, 3, 4, 4)
    idx = GF.ghost_indices(1, 5, generator=torch.Generator().manual_seed(0))
    shift, scale = GF.ghost_noise(*GF.per_sample_moments(x_hat), idx)
    torch.testing.assert_close(shift, torch.zeros(1, 3), atol=1e-6, rtol=0)
    torch.testing.assert_close(scale, torch.ones(1, 3), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------
# GBN / XBN against the loop references
# ---------------------------------------------------------------------------------------------------
GROUP_CASES = [(8, 4), (9, 4), (11, 4), (3, 4), (12, 3), (13, 5)]  # B%N == 0, 1, 3, B<N, ...


@pytest.mark.parametrize("B,N", GROUP_CASES)
@pytest.mark.parametrize("affine", [False, True])
def test_ghost_batch_norm_matches_loop_reference(B, N, affine):
    x = varied_input((B, 3, 3, 2), 3, F64)
    w, b = affine_params(3) if affine else (None, None)
    wd = None if w is None else w.double()
    bd = None if b is None else b.double()
    y = GF.ghost_batch_norm(x, N, weight=wd, bias=bd, eps=1e-5)
    assert y.dtype == F64
    torch.testing.assert_close(y, ref_gbn(x, N, 1e-5, w, b), atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("B,N", [(9, 4), (8, 4)])
def test_ghost_batch_norm_float32_matches_reference(B, N):
    x = varied_input((B, 4, 5, 5), 4)
    w, b = affine_params(4)
    y = GF.ghost_batch_norm(x, N, weight=w, bias=b, eps=1e-3)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref_gbn(x, N, 1e-3, w, b), atol=2e-5, rtol=2e-5)


def test_ghost_batch_norm_limits():
    x = varied_input((8, 3, 4, 4), 5, F64)
    # one ghost batch of the whole batch: plain BN
    torch.testing.assert_close(
        GF.ghost_batch_norm(x, 8), F.batch_norm(x, None, None, training=True), atol=1e-10, rtol=0
    )
    torch.testing.assert_close(
        GF.ghost_batch_norm(x, 100), F.batch_norm(x, None, None, training=True), atol=1e-10, rtol=0
    )
    # ghost batches of one sample: instance norm
    torch.testing.assert_close(GF.ghost_batch_norm(x, 1), F.instance_norm(x), atol=1e-10, rtol=0)


@pytest.mark.parametrize("strength", [0.0, 0.5, 1.0, 1.5])
@pytest.mark.parametrize("shift_noise,scale_noise", [(True, True), (True, False), (False, True)])
def test_ghost_batch_norm_strength_and_switches(strength, shift_noise, scale_noise):
    x = varied_input((9, 3, 2, 2), 6, F64)
    y = GF.ghost_batch_norm(x, 4, strength=strength, shift_noise=shift_noise, scale_noise=scale_noise)
    ref = ref_gbn_strength(x, 4, 1e-5, strength, shift_noise, scale_noise)
    torch.testing.assert_close(y, ref, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("B,N", GROUP_CASES + [(1, 4), (2, 2)])
@pytest.mark.parametrize("affine", [False, True])
def test_exclusive_batch_norm_matches_loop_reference(B, N, affine):
    x = varied_input((B, 3, 3, 2), 8, F64)
    w, b = affine_params(3) if affine else (None, None)
    y = GF.exclusive_batch_norm(x, N, weight=None if w is None else w.double(), bias=None if b is None else b.double())
    torch.testing.assert_close(y, ref_xbn(x, N, 1e-5, w, b), atol=1e-9, rtol=1e-9)


def test_exclusive_batch_norm_float32_with_one_value_per_sample():
    x = varied_input((10, 5), 9)
    y = GF.exclusive_batch_norm(x, 3, eps=1e-5)
    torch.testing.assert_close(y.double(), ref_xbn(x, 3, 1e-5), atol=1e-4, rtol=1e-4)


def test_exclusive_differs_from_ghost_batch_norm():
    x = varied_input((8, 3, 2, 2), 10, F64)
    assert not torch.allclose(GF.exclusive_batch_norm(x, 4), GF.ghost_batch_norm(x, 4), atol=1e-3)


@pytest.mark.parametrize("bad", [1, 0])
def test_exclusive_batch_norm_rejects_small_ghost_batch(bad):
    with pytest.raises(ValueError, match="XBN needs ghost_batch_size >= 2"):
        GF.exclusive_batch_norm(torch.randn(8, 3, 2, 2), bad)


def test_ghost_batch_norm_rejects_zero_ghost_batch():
    with pytest.raises(ValueError, match="ghost_batch_size must be >= 1"):
        GF.ghost_batch_norm(torch.randn(8, 3, 2, 2), 0)


@pytest.mark.parametrize("fn", [GF.ghost_batch_norm, GF.exclusive_batch_norm])
def test_ghost_functions_update_running_stats_like_batch_norm(fn):
    x = varied_input((9, 3, 4, 4), 12)
    rm, rv = torch.zeros(3), torch.ones(3)
    rm_ref, rv_ref = torch.zeros(3), torch.ones(3)
    kwargs = {"running_stats": "batch"} if fn is GF.ghost_batch_norm else {}  # GBN's default is "ghost"
    fn(x, 4, rm, rv, momentum=0.3, **kwargs)
    F.batch_norm(x, rm_ref, rv_ref, training=True, momentum=0.3)
    torch.testing.assert_close(rm, rm_ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(rv, rv_ref, atol=1e-6, rtol=1e-6)


def test_update_running_stats_unbiased_variance():
    rm, rv = torch.full((2,), 1.0), torch.full((2,), 2.0)
    GF.update_running_stats(rm, rv, torch.tensor([3.0, -1.0]), torch.tensor([4.0, 0.5]), count=5, momentum=0.25)
    torch.testing.assert_close(rm, torch.tensor([0.75 * 1 + 0.25 * 3, 0.75 * 1 - 0.25]))
    torch.testing.assert_close(rv, torch.tensor([0.75 * 2 + 0.25 * 4 * 5 / 4, 0.75 * 2 + 0.25 * 0.5 * 5 / 4]))
    GF.update_running_stats(None, None, torch.zeros(2), torch.ones(2), 5, 0.1)  # no-op, no error


# ---------------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,N", [((6, 2, 3), 2), ((7, 2, 2, 2), 3), ((3, 2, 2), 4), ((8, 3), 4)])
@pytest.mark.parametrize("fn", [GF.ghost_batch_norm, GF.exclusive_batch_norm], ids=["gbn", "xbn"])
def test_gradcheck_ghost_and_exclusive_batch_norm(fn, shape, N):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=gen, dtype=F64) * 1.5 + 0.3).requires_grad_()
    C = shape[1]
    w = (1.0 + 0.3 * torch.randn(C, generator=gen, dtype=F64)).requires_grad_()
    b = (0.2 * torch.randn(C, generator=gen, dtype=F64)).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, w, b: fn(x, N, weight=w, bias=b, eps=1e-3), (x, w, b), eps=1e-6, atol=1e-5
    )


@pytest.mark.parametrize("shape,N", [((6, 2, 3), 3), ((5, 2), 2)])
@pytest.mark.parametrize("fn", [GF.ghost_batch_norm, GF.exclusive_batch_norm], ids=["gbn", "xbn"])
def test_gradgradcheck_ghost_and_exclusive_batch_norm(fn, shape, N):
    """Second derivatives (e.g. gradient penalties) must be right, as they are for plain BatchNorm."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(shape, generator=gen, dtype=F64).requires_grad_()
    w = (1.0 + 0.3 * torch.randn(shape[1], generator=gen, dtype=F64)).requires_grad_()
    # the plain-autograd path (fused=False) supports double backward
    assert torch.autograd.gradgradcheck(
        lambda x, w: fn(x, N, weight=w, eps=1e-3, fused=False), (x, w), eps=1e-6, atol=1e-5
    )


@pytest.mark.parametrize("fn", [GF.ghost_batch_norm, GF.exclusive_batch_norm], ids=["gbn", "xbn"])
def test_fused_path_refuses_double_backward_clearly(fn):
    """The fused path gives first-order gradients only: a second derivative must fail loudly, never be wrong."""
    x = torch.randn(6, 2, 3, dtype=F64, requires_grad=True)
    (gx,) = torch.autograd.grad(fn(x, 3, fused=True).pow(2).sum(), x, create_graph=False)
    assert torch.isfinite(gx).all()
    with pytest.raises(RuntimeError, match="fused=False"):
        torch.autograd.grad(fn(x, 3, fused=True).pow(2).sum(), x, create_graph=True)


@pytest.mark.parametrize("shape", [(10, 3, 5, 5), (9, 4), (6, 3, 7)])
@pytest.mark.parametrize("method", ["gbn", "xbn", "gni"])
def test_fused_and_plain_autograd_paths_agree(method, shape):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=gen, dtype=F64) * 3 + 1).requires_grad_()
    w = torch.randn(shape[1], generator=gen, dtype=F64).requires_grad_()
    b = torch.randn(shape[1], generator=gen, dtype=F64).requires_grad_()
    idx = GF.ghost_indices(shape[0], 4, generator=torch.Generator().manual_seed(1))
    fns = {
        "gbn": lambda f: GF.ghost_batch_norm(x, 4, None, None, w, b, strength=0.7, fused=f),
        "xbn": lambda f: GF.exclusive_batch_norm(x, 4, None, None, w, b, fused=f),
        "gni": lambda f: GF.ghost_noise_batch_norm(
            x, lambda m, v: GF.ghost_noise(m, v, idx), None, None, w, b, fused=f
        ),
    }
    g = torch.randn(shape, generator=gen, dtype=F64)
    results = []
    for fused in (True, False):
        y = fns[method](fused)
        results.append((y, *torch.autograd.grad(y, (x, w, b), g)))
    for a, c in zip(*results):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("fn", [GF.ghost_batch_norm, GF.exclusive_batch_norm], ids=["gbn", "xbn"])
def test_gradcheck_with_strength(fn):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(7, 2, 3, generator=gen, dtype=F64).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: fn(x, 3, strength=0.5, eps=1e-3), (x,), eps=1e-6, atol=1e-5)


def test_gbn_gradient_matches_autograd_of_loop_reference():
    """The gradient flows through the ghost statistics (not only through x)."""
    x = varied_input((9, 2, 3), 13, F64).requires_grad_()
    R = torch.randn(9, 2, 3, dtype=F64, generator=torch.Generator().manual_seed(2))
    (GF.ghost_batch_norm(x, 4, eps=1e-3) * R).sum().backward()
    g_lib = x.grad.clone()
    x.grad = None
    # autograd of a differentiable per-ghost-batch normalization
    parts = []
    for members in ref_groups(9, 4):
        xs = x[members]
        m = xs.mean(dim=(0, 2), keepdim=True)
        v = ((xs - m) ** 2).mean(dim=(0, 2), keepdim=True)
        parts.append((xs - m) / torch.sqrt(v + 1e-3))
    (torch.cat(parts) * R).sum().backward()
    torch.testing.assert_close(g_lib, x.grad, atol=1e-10, rtol=1e-9)


# ---------------------------------------------------------------------------------------------------
# the noise law (one value per sample)
# ---------------------------------------------------------------------------------------------------
LAW_B, LAW_C = 4096, 64


@functools.cache
def _gni_law_samples(N: int, raw_scale: float = 100.0, normalize: bool = True):
    x = raw_scale * torch.randn(LAW_B, LAW_C, generator=torch.Generator().manual_seed(100 + N))
    data = F.batch_norm(x, None, None, training=True) if normalize else x
    idx = GF.ghost_indices(LAW_B, N, generator=torch.Generator().manual_seed(200 + N))
    mean, var = GF.per_sample_moments(data)
    assert float(var.abs().max()) == 0.0  # one value per sample
    shift, scale = GF.ghost_noise(mean, var, idx)
    batch_var = data.double().var(0, unbiased=False)
    return shift.double(), scale.double(), batch_var


@pytest.mark.parametrize("N", [4, 16])
def test_gni_noise_moments_follow_law(N):
    shift, scale, batch_var = _gni_law_samples(N)
    shift_std = float((shift / batch_var.sqrt()).std())
    assert shift_std == pytest.approx(1 / math.sqrt(N), rel=0.01)
    assert abs(shift_std - 1 / math.sqrt(N - 1)) > 0.02 / math.sqrt(N)  # resolution check
    mean_sq = float((scale**2).mean())
    assert mean_sq == pytest.approx((N - 1) / N, rel=0.01)
    assert abs(mean_sq - 1.0) > 2 * 0.01 * (N - 1) / N  # would fail for chi2(N)/N


@pytest.mark.parametrize("N", [4, 16])
def test_gni_scale_law_is_chi2_n_minus_1(N):
    # un-normalized data with variance 1e4: the noise eps (1e-3) is negligible in scale**2
    _, scale, batch_var = _gni_law_samples(N, raw_scale=100.0, normalize=False)
    assert float(batch_var.min()) > 5e3
    values = (N * scale**2).reshape(-1).numpy()
    good = stats.kstest(values, stats.chi2(N - 1).cdf)
    bad = stats.kstest(values, stats.chi2(N).cdf)
    assert good.pvalue > 1e-3 and good.statistic < 0.006, good
    assert bad.statistic > 0.03, bad


@pytest.mark.parametrize("N", [4, 16])
def test_gni_law_on_normalized_data_with_eps_accounted(N):
    shift, scale, batch_var = _gni_law_samples(N)
    # invert scale**2 = (ghost_var + eps)/(batch_var + eps) exactly, then N*ghost_var/batch_var ~ chi2(N-1)
    ghost_var = scale**2 * (batch_var + NOISE_EPS) - NOISE_EPS
    values = (N * ghost_var / batch_var).reshape(-1).numpy()
    assert stats.kstest(values, stats.chi2(N - 1).cdf).pvalue > 1e-3
    z = (shift * math.sqrt(N) / batch_var.sqrt()).reshape(-1).numpy()
    ks = stats.kstest(z, stats.norm.cdf)
    assert ks.statistic < 0.006, ks
    assert stats.kstest(z * math.sqrt(N / (N - 1.0)), stats.norm.cdf).statistic > ks.statistic


@pytest.mark.parametrize("N", [2, 4, 16])
def test_analytic_noise_follows_law(N):
    shift, scale = GF.analytic_noise(LAW_B, LAW_C, N, generator=torch.Generator().manual_seed(N))
    assert shift.shape == (LAW_B, LAW_C) and scale.shape == (LAW_B, LAW_C)
    assert shift.dtype == torch.float32 and scale.dtype == torch.float32
    assert bool((scale > 0).all())
    z = (shift.double() * math.sqrt(N)).reshape(-1).numpy()
    assert stats.kstest(z, stats.norm.cdf).pvalue > 1e-3
    q = (N * scale.double() ** 2).reshape(-1).numpy()
    good = stats.kstest(q, stats.chi2(N - 1).cdf)
    assert good.pvalue > 1e-3 and good.statistic < 0.006, good
    assert stats.kstest(q, stats.chi2(N).cdf).statistic > 0.03
    assert float((scale.double() ** 2).mean()) == pytest.approx((N - 1) / N, rel=0.01)


def test_analytic_noise_matches_gni_law_two_sample():
    N = 8
    _, gni_scale, _ = _gni_law_samples(N, normalize=False)
    _, an_scale = GF.analytic_noise(LAW_B, LAW_C, N, generator=torch.Generator().manual_seed(1))
    res = stats.ks_2samp(gni_scale.reshape(-1)[::7].numpy(), an_scale.double().reshape(-1)[::7].numpy())
    assert res.pvalue > 1e-3, res


def test_analytic_noise_reproducible_private_and_validated():
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    a = GF.analytic_noise(5, 3, 4, generator=torch.Generator().manual_seed(9))
    b = GF.analytic_noise(5, 3, 4, generator=torch.Generator().manual_seed(9))
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="ghost_batch_size must be >= 1"):
        GF.analytic_noise(5, 3, 0)


def test_analytic_noise_with_one_member_is_shift_only():
    # N = 1: chi2(0) is zero, so the scale is zero (usable for shift-only noise); shift ~ Normal(0, 1)
    shift, scale = GF.analytic_noise(2000, 4, 1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(scale, torch.zeros_like(scale))
    assert stats.kstest(shift.double().reshape(-1).numpy(), stats.norm.cdf).pvalue > 1e-3


def test_broadcast_channels():
    x = torch.zeros(2, 3, 4, 5)
    assert GF.broadcast_channels(torch.ones(2, 3), x).shape == (2, 3, 1, 1)
    assert GF.broadcast_channels(torch.ones(2, 5), x, channel_dim=-1).shape == (2, 1, 1, 5)
    v = torch.arange(6.0).view(2, 3)
    out = GF.broadcast_channels(v, x) + x
    assert float(out[1, 2, 3, 4]) == 5.0 and float(out[0, 1, 0, 0]) == 1.0


def test_apply_noise_identity_noise_keeps_memory_format():
    x_hat = torch.randn(4, 3, 5, 5).to(memory_format=torch.channels_last)
    y = GF.apply_noise(x_hat, torch.zeros(4, 3), torch.ones(4, 3))
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, x_hat)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "shape, channel_dim, layout, two_ops",
    [
        ((4, 3, 5, 6), 1, "contiguous", True),  # coefficients broadcast along W: x * a, then += d
        ((4, 3, 5, 6), 1, "channels_last", False),  # they vary along C, innermost: one addcmul
        ((4, 3, 7), 1, "contiguous", True),
        ((4, 3, 5, 1), 1, "contiguous", False),  # nothing to broadcast along the innermost size-1 dim
        ((4, 6, 5), -1, "contiguous", False),  # channels last dimension (LayerNorm)
        ((4, 3, 5, 6), 1, "transposed", False),  # any other layout: addcmul
    ],
)
def test_sample_affine_and_its_input_gradient_in_every_layout(shape, channel_dim, layout, two_ops, dtype):
    """Both op sequences (see ``_coefficients_inner_broadcast``) give ``x * a + d`` and ``g * a + x * p + q``."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen)
    grad = torch.randn(shape, generator=gen)
    if layout == "channels_last":
        x, grad = x.to(memory_format=torch.channels_last), grad.to(memory_format=torch.channels_last)
    elif layout == "transposed":
        x, grad = x.transpose(2, 3).contiguous().transpose(2, 3), grad.transpose(2, 3).contiguous().transpose(2, 3)
    x, grad = x.to(dtype), grad.to(dtype)
    channels = shape[channel_dim]
    a, d = torch.randn(shape[0], channels, generator=gen), torch.randn(shape[0], channels, generator=gen)
    p, q = torch.randn(channels, generator=gen), torch.randn(channels, generator=gen)
    assert GFA.inner_broadcast(x, channel_dim, grad) is two_ops

    def per_position(t: torch.Tensor) -> torch.Tensor:  # (B, C) or (C,) -> the shape of x, by loops
        out = torch.empty(shape, dtype=F64)
        for b in range(shape[0]):
            for c in range(channels):
                value = float(t[b, c] if t.dim() == 2 else t[c])
                if channel_dim == 1:
                    out[b, c] = value
                else:
                    out[b, ..., c] = value
        return out

    # the coefficients rounded to x's dtype first, as both functions do
    a64, d64, p64, q64 = (per_position(t.to(dtype).double()) for t in (a, d, p, q))
    x64, g64 = x.double(), grad.double()
    tol = {"rtol": 0, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 5e-2}
    y = GF.sample_affine(x, a, d, channel_dim)
    assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y.double(), x64 * a64 + d64, **tol)
    grad_x = torch_passes.affine_input_grad(grad, x, a, p, q, channel_dim)
    assert grad_x.dtype == dtype
    torch.testing.assert_close(grad_x.double(), g64 * a64 + x64 * p64 + q64, **tol)
    # written into a scratch tensor of x's shape and dtype (the backward passes grad * x's memory) ...
    scratch = grad * x
    into = torch_passes.affine_input_grad(grad, x, a, p, q, channel_dim, out=scratch)
    assert into.data_ptr() == scratch.data_ptr()
    torch.testing.assert_close(into, grad_x, rtol=0, atol=0)
    # ... and a scratch that does not fit is left alone
    wrong = torch.zeros(shape, dtype=torch.float64)
    other = torch_passes.affine_input_grad(grad, x, a, p, q, channel_dim, out=wrong)
    assert other.data_ptr() != wrong.data_ptr() and other.dtype == dtype and not wrong.any()
    torch.testing.assert_close(other, grad_x, rtol=0, atol=0)


def test_ghost_draws_validates_and_matches_the_noise_functions():
    idx = GF.ghost_indices(6, 3, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="either indices"):
        GF.GhostDraws()
    z, g = GF.analytic_draws(6, 2, 3, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="either indices"):
        GF.GhostDraws(indices=idx, normal=z, gamma=g, ghost_batch_size=3)
    with pytest.raises(ValueError, match="either indices"):
        GF.GhostDraws(normal=z, gamma=g)  # the ghost batch size is part of the analytic law
    mean, var = torch.randn(6, 2), torch.rand(6, 2)
    for got, want in zip(GF.GhostDraws(indices=idx, eps=0.01)(mean, var), GF.ghost_noise(mean, var, idx, eps=0.01)):
        assert torch.equal(got, want)
    # the analytic draws and their transform are analytic_noise, draw for draw
    expected = GF.analytic_noise(6, 2, 3, generator=torch.Generator().manual_seed(1))
    for got, want in zip(GF.GhostDraws(normal=z, gamma=g, ghost_batch_size=3)(mean, var), expected):
        assert torch.equal(got, want)


@pytest.mark.parametrize("n", [1, 2, 5, 16])
def test_analytic_draws_are_a_normal_then_a_gamma_from_the_generator(n):
    """Generator draws: a standard normal, then Gamma((N - 1) / 2) from a full shape tensor, in this order."""
    z, g = GF.analytic_draws(7, 3, n, generator=torch.Generator().manual_seed(4))
    gen = torch.Generator().manual_seed(4)
    want_z = torch.randn(7, 3, generator=gen)
    want_g = torch._standard_gamma(torch.full((7, 3), (n - 1) / 2.0), generator=gen) if n > 1 else torch.zeros(7, 3)
    assert torch.equal(z, want_z) and torch.equal(g, want_g)
    assert g.is_contiguous() and g.dtype == torch.float32


@pytest.mark.parametrize("n", [2, 3, 6, 17])
def test_analytic_draws_counter_gamma_follows_its_law(n):
    """Counter draws (torch.compile): Gamma((N - 1) / 2) from exponentials (and a squared normal)."""
    from lightning_ghostnoise.functional import counter_rng

    key = counter_rng.mix_key(torch.tensor(3))
    z, g = GF.analytic_draws(20_000, 2, n, key=key)
    assert torch.equal(z, counter_rng.normal(key, (20_000, 2), salt=0))
    assert stats.kstest(g.flatten().numpy(), stats.gamma((n - 1) / 2).cdf).pvalue > 1e-3
    assert stats.kstest(g.flatten().numpy(), stats.gamma(n / 2).cdf).pvalue < 1e-3  # the test can fail
    # independent of the normal behind the shift
    assert abs(float(torch.corrcoef(torch.stack([z.flatten(), g.flatten()]))[0, 1])) < 0.03
    _z1, g1 = GF.analytic_draws(5, 4, 1, key=key)
    assert torch.equal(g1, torch.zeros(5, 4))


@pytest.mark.parametrize("n", [2, 16, 35])
@pytest.mark.slow
def test_analytic_counter_draws_compiled_equal_eager(n):
    """The counter draws traced by ``torch.compile`` are the eager ones (the compiled layers' noise)."""
    from lightning_ghostnoise.functional import counter_rng

    key = counter_rng.mix_key(torch.tensor(5), 2)
    torch._dynamo.reset()
    compiled = torch.compile(lambda k: GF.analytic_draws(64, 3, n, key=k), backend="eager", fullgraph=True)
    for got, want in zip(compiled(key), GF.analytic_draws(64, 3, n, key=key)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# normalized_noise: GNI after LayerNorm / GroupNorm, fused (keeps x only) against plain autograd
# ---------------------------------------------------------------------------------------------------
def _layer_norm(t: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(t, (t.shape[-1],), None, None, 1e-5)


def _group_norm(t: torch.Tensor) -> torch.Tensor:
    return F.group_norm(t, 2, None, None, 1e-5)


NORMALIZED_CASES = {
    # a plain callable: the fused path recomputes normalize(x) in the backward
    "layer_norm": (_layer_norm, (8, 5, 6), -1, None),
    "group_norm": (_group_norm, (8, 4, 3, 5), 1, None),
    "group_norm_channels_last": (_group_norm, (8, 4, 3, 5), 1, torch.channels_last),
    # a NativeNorm: the fused path keeps (mean, rstd) and calls the native backward
    "native_layer_norm": (GF.NativeLayerNorm((6,)), (8, 5, 6), -1, None),
    "native_layer_norm_2d": (GF.NativeLayerNorm((6,)), (8, 6), -1, None),
    "native_layer_norm_4d": (GF.NativeLayerNorm((6,)), (8, 3, 5, 6), -1, None),
    "native_group_norm": (GF.NativeGroupNorm(2), (8, 4, 3, 5), 1, None),
    "native_group_norm_channels_last": (GF.NativeGroupNorm(2), (8, 4, 3, 5), 1, torch.channels_last),
    "native_group_norm_1d": (GF.NativeGroupNorm(2), (8, 4, 7), 1, None),
}


def _normalized_inputs(shape, memory_format, affine: bool, dtype=torch.float32, channel_dim=-1):
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(shape, generator=gen) * 2 + 1).to(dtype)
    if memory_format is not None:
        x = x.to(memory_format=memory_format)
    channels = shape[channel_dim]
    w = (torch.rand(channels, generator=gen) + 0.5) if affine else None
    b = torch.randn(channels, generator=gen) if affine else None
    grad = torch.randn(shape, generator=gen).to(dtype)
    return x, w, b, grad


def _run_normalized(fused, x, w, b, grad, normalize, channel_dim, draws, **kwargs):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_() if w is not None else None
    b = b.detach().clone().requires_grad_() if b is not None else None
    y = GF.normalized_noise(x, normalize, draws, w, b, channel_dim=channel_dim, fused=fused, **kwargs)
    y.backward(grad)
    return y.detach(), x.grad, (w.grad if w is not None else None), (b.grad if b is not None else None)


@pytest.mark.parametrize("case", sorted(NORMALIZED_CASES))
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize(
    "kwargs",
    [{"strength": 0.7}, {"strength": 1.0, "shift_noise": False}, {"strength": torch.tensor(1.3), "scale_noise": False}],
)
@pytest.mark.parametrize("analytic", [False, True])
def test_normalized_noise_fused_matches_plain_autograd(case, affine, kwargs, analytic):
    normalize, shape, channel_dim, memory_format = NORMALIZED_CASES[case]
    x, w, b, grad = _normalized_inputs(shape, memory_format, affine, channel_dim=channel_dim)
    channels = shape[channel_dim]
    gen = torch.Generator().manual_seed(5)
    if analytic:
        normal, gamma = GF.analytic_draws(shape[0], channels, 4, generator=gen)
        draws = GF.GhostDraws(normal=normal, gamma=gamma, ghost_batch_size=4)
    else:
        draws = GF.GhostDraws(indices=GF.ghost_indices(shape[0], 3, generator=gen))
    fused = _run_normalized(None, x, w, b, grad, normalize, channel_dim, draws, **kwargs)
    plain = _run_normalized(False, x, w, b, grad, normalize, channel_dim, draws, **kwargs)
    # the same float32 operations forward: bit-identical; the backward sums in another order
    torch.testing.assert_close(fused[0], plain[0], rtol=0, atol=0)
    if memory_format is not None:
        assert fused[0].is_contiguous(memory_format=memory_format)
    for got, want in zip(fused[1:], plain[1:]):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # and against float64 autograd of the plain formula, from the same draws
    ref = _run_normalized(False, *(t.double() if t is not None else None for t in (x, w, b, grad)),
                          normalize, channel_dim, draws, **kwargs)  # fmt: skip
    for got, want in zip(fused, ref):
        if want is not None:
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_normalized_noise_fused_keeps_only_the_input_for_backward():
    """The fused path saves one full-size tensor (x), as LayerNorm does; plain autograd saves two.
    (With a NativeNorm too: ``test_native_norm_path_saves_what_the_plain_layer_saves``.)"""
    x, w, b, _ = _normalized_inputs((8, 5, 6), None, True)
    x.requires_grad_()
    w.requires_grad_()
    idx = GF.ghost_indices(8, 3, generator=torch.Generator().manual_seed(0))

    def full_size_saved(fused):
        saved = []

        def pack(t):
            if t.numel() == x.numel():
                saved.append(t.untyped_storage().data_ptr())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            GF.normalized_noise(x, _layer_norm, GF.GhostDraws(indices=idx), w, b, channel_dim=-1, fused=fused)
        return set(saved)

    assert full_size_saved(None) == {x.untyped_storage().data_ptr()}
    assert len(full_size_saved(False)) == 2


def test_normalized_noise_fused_recomputes_under_the_forward_autocast():
    """The backward recomputes ``normalize`` under the forward's autocast state: here a matrix
    product autocasts to bfloat16, so a float32 recomputation would give another x_hat."""
    x, w, b, grad = _normalized_inputs((8, 5, 6), None, True)
    mix = torch.eye(6) + 0.1 * torch.randn(6, 6, generator=torch.Generator().manual_seed(9))
    seen = []

    def normalize(t):
        out = _layer_norm(t @ mix)
        seen.append(out.detach().clone())
        return out

    idx = GF.ghost_indices(8, 3, generator=torch.Generator().manual_seed(1))
    results = {}
    for fused in (False, None):
        xr = x.detach().clone().requires_grad_()
        wr, br = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = GF.normalized_noise(xr, normalize, GF.GhostDraws(indices=idx), wr, br, channel_dim=-1, fused=fused)
        y.backward(grad.to(y.dtype))
        results[fused] = (y.detach(), xr.grad, wr.grad, br.grad)
    _plain_forward, fused_forward, fused_backward = seen
    assert fused_forward.dtype == torch.bfloat16
    torch.testing.assert_close(fused_backward, fused_forward, rtol=0, atol=0)  # same dtype, same values
    torch.testing.assert_close(results[None][0], results[False][0], rtol=0, atol=0)
    # plain autograd sums the (B, C) gradients in bfloat16, the fused path in float32
    for got, want in zip(results[None][1:], results[False][1:]):
        torch.testing.assert_close(got.float(), want.float(), rtol=0.05, atol=0.05)


class _CountingLayerNorm(GF.NativeLayerNorm):
    """A NativeLayerNorm that counts its calls (to see which path ran)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.calls = {"call": 0, "forward": 0, "backward": 0}

    def __call__(self, x):
        self.calls["call"] += 1
        return super().__call__(x)

    def forward(self, x):
        self.calls["forward"] += 1
        return super().forward(x)

    def backward(self, *args):
        self.calls["backward"] += 1
        return super().backward(*args)


@pytest.mark.parametrize(
    "norm,plain,shape,memory_format",
    [
        (GF.NativeLayerNorm((6,)), lambda t: F.layer_norm(t, (6,), None, None, 1e-5), (8, 5, 6), None),
        (GF.NativeLayerNorm((256,), 1e-3), lambda t: F.layer_norm(t, (256,), None, None, 1e-3), (4, 3, 7, 256), None),
        (GF.NativeLayerNorm((33,)), lambda t: F.layer_norm(t, (33,), None, None, 1e-5), (16, 33), None),
        (GF.NativeGroupNorm(2), lambda t: F.group_norm(t, 2, None, None, 1e-5), (8, 4, 3, 5), None),
        (
            GF.NativeGroupNorm(4, 1e-3),
            lambda t: F.group_norm(t, 4, None, None, 1e-3),
            (8, 4, 3, 5),
            torch.channels_last,
        ),
        (
            GF.NativeGroupNorm(1),
            lambda t: F.group_norm(t, 1, None, None, 1e-5),
            (8, 6, 2, 3, 4),
            torch.channels_last_3d,
        ),
    ],
)
@pytest.mark.parametrize("affine", [True, False])
def test_native_norms_match_the_functional_norms(norm, plain, shape, memory_format, affine):
    """NativeNorm: its call and its forward give the bits of the plain functional norm (the float32
    LayerNorm passes an identity affine, which must not change them); its backward gives
    ``autograd`` of ``plain(x) * w``, in float32 and float64."""
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        gen = torch.Generator().manual_seed(1)
        x = (torch.randn(shape, generator=gen) * 3 + 1).to(dtype)
        if memory_format is not None:
            x = x.to(memory_format=memory_format)
        channels = shape[-1] if isinstance(norm, GF.NativeLayerNorm) else shape[1]
        w = (torch.rand(channels, generator=gen) + 0.5).to(dtype) if affine else None
        grad = torch.randn(shape, generator=gen).to(dtype)
        want = plain(x)
        assert torch.equal(norm(x), want)
        x_hat, mean, rstd = norm.forward(x)
        assert torch.equal(x_hat, want)
        assert mean.numel() == rstd.numel() < x.numel() // 2
        xr = x.clone().requires_grad_()
        wr = w.clone().requires_grad_() if affine else None
        out = plain(xr)
        out = (
            out * (wr.view(-1, *([1] * (x.dim() - 2))) if isinstance(norm, GF.NativeGroupNorm) else wr)
            if affine
            else out
        )
        expected = torch.autograd.grad(out, [xr] + ([wr] if affine else []), grad)
        grad_x, grad_w = norm.backward(grad, x, mean, rstd, w, True, affine)
        torch.testing.assert_close(grad_x, expected[0], rtol=tol, atol=tol)
        if affine:
            torch.testing.assert_close(grad_w, expected[1], rtol=tol, atol=tol)
        else:
            assert grad_w is None


def test_native_norm_path_saves_what_the_plain_layer_saves_and_does_not_recompute():
    """With a NativeNorm the fused path keeps x and the native (mean, rstd), as nn.LayerNorm does,
    and its backward calls the native backward once (no second normalization)."""
    x, w, b, grad = _normalized_inputs((8, 5, 6), None, True)
    x.requires_grad_()
    idx = GF.ghost_indices(8, 3, generator=torch.Generator().manual_seed(0))

    def saved_by(run):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = run()
        return out, saved

    norm = _CountingLayerNorm((6,))
    y, saved = saved_by(lambda: GF.normalized_noise(x, norm, GF.GhostDraws(indices=idx), w, b, channel_dim=-1))
    _, plain_saved = saved_by(lambda: F.layer_norm(x, (6,), w, b))
    full = [t for t in saved if t.numel() == x.numel()]
    assert len(full) == 1 and full[0].untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    small = sorted(t.numel() for t in saved if t.numel() != x.numel())
    assert [t.numel() for t in plain_saved if t.numel() == 40] == [40, 40]  # LayerNorm's mean and rstd
    assert small.count(40) == 2
    y.backward(grad)
    assert norm.calls == {"call": 0, "forward": 1, "backward": 1}


class _CastingLayerNorm(_CountingLayerNorm):
    """Normalizes in float32 whatever the input, as CUDA's autocast does for ``layer_norm``."""

    def __call__(self, x):
        self.calls["call"] += 1
        return F.layer_norm(x.float(), self.normalized_shape, None, None, self.eps)


def _autocast_runs(norm, x, w, b, grad, channel_dim, idx):
    results = {}
    for fused in (False, None):
        xr = x.detach().clone().requires_grad_()
        wr, br = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = GF.normalized_noise(xr, norm, GF.GhostDraws(indices=idx), wr, br, channel_dim=channel_dim, fused=fused)
        y.backward(grad.to(y.dtype))
        results[fused] = (y.detach(), xr.grad, wr.grad, br.grad)
    return results


@pytest.mark.parametrize("native_cls", ["layer", "group"])
def test_native_norm_under_autocast_with_a_low_precision_input_recomputes(native_cls):
    """Under CPU autocast a bfloat16 input stays bfloat16 for these norms: the recomputing path (the
    native bfloat16 weight gradient is imprecise), as for any callable."""
    if native_cls == "layer":
        norm, shape, channel_dim = _CountingLayerNorm((6,)), (8, 5, 6), -1
    else:
        norm, shape, channel_dim = GF.NativeGroupNorm(2), (8, 4, 3, 5), 1
    x, w, b, grad = _normalized_inputs(shape, None, True, dtype=torch.bfloat16, channel_dim=channel_dim)
    idx = GF.ghost_indices(8, 3, generator=torch.Generator().manual_seed(1))
    results = _autocast_runs(norm, x, w, b, grad, channel_dim, idx)
    assert results[None][0].dtype == torch.bfloat16
    if native_cls == "layer":
        assert norm.calls["forward"] == 0 and norm.calls["backward"] == 0 and norm.calls["call"] >= 3
    torch.testing.assert_close(results[None][0], results[False][0], rtol=0, atol=0)
    for got, want in zip(results[None][1:], results[False][1:]):
        torch.testing.assert_close(got.float(), want.float(), rtol=0.05, atol=0.05)


def test_native_norm_under_autocast_with_a_float32_input_takes_the_native_path():
    """Under CPU autocast a float32 input (a transformer's residual stream) stays float32 for
    LayerNorm: the native statistics, the same forward bits as plain autograd under autocast."""
    norm = _CountingLayerNorm((6,))
    x, w, b, grad = _normalized_inputs((8, 5, 6), None, True)
    idx = GF.ghost_indices(8, 3, generator=torch.Generator().manual_seed(2))
    results = _autocast_runs(norm, x, w, b, grad, -1, idx)
    assert norm.calls["forward"] == 1 and norm.calls["backward"] == 1
    torch.testing.assert_close(results[None][0], results[False][0], rtol=0, atol=0)
    for got, want in zip(results[None][1:], results[False][1:]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_native_norm_follows_an_autocast_cast_of_its_input():
    """A norm that autocast runs in float32 (CUDA's policy for layer_norm, emulated here): the native
    path normalizes autocast's float32 copy, keeps that copy as the plain layer would, and returns a
    bfloat16 input gradient; forward bits equal plain autograd's, gradients agree."""
    norm = _CastingLayerNorm((6,))
    x, w, b, grad = _normalized_inputs((8, 5, 6), None, True, dtype=torch.bfloat16)
    idx = GF.ghost_indices(8, 3, generator=torch.Generator().manual_seed(3))
    assert norm.input_dtype(x) == torch.bfloat16  # no autocast: no cast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert norm.input_dtype(x) == torch.float32
    results = _autocast_runs(norm, x, w, b, grad, -1, idx)
    assert norm.calls["forward"] == 1 and norm.calls["backward"] == 1
    fused, plain = results[None], results[False]
    assert fused[0].dtype == torch.float32 and fused[1].dtype == torch.bfloat16
    torch.testing.assert_close(fused[0], plain[0], rtol=0, atol=0)
    for got, want in zip(fused[1:], plain[1:]):
        torch.testing.assert_close(got.float(), want.float(), rtol=0.02, atol=0.02)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            GF.normalized_noise(x.clone().requires_grad_(), norm, GF.GhostDraws(indices=idx), w, b, channel_dim=-1)
    assert [t.dtype for t in saved if t.shape == x.shape] == [torch.float32]  # autocast's copy, not x as well


@pytest.mark.parametrize("norm_cls,shape,channel_dim", [(_CountingLayerNorm, (32, 16, 64), -1),
                                                        (GF.NativeGroupNorm, (8, 4, 3, 5), 1)])  # fmt: skip
def test_native_norm_with_bfloat16_input_takes_the_recompute_path(norm_cls, shape, channel_dim):
    """A bfloat16 activation with float32 parameters (no autocast) takes the recomputing path: the
    native CPU LayerNorm backward sums a bfloat16 weight gradient in low precision. The fused
    result is as close to a float64 reference as plain autograd's."""
    norm = norm_cls((shape[-1],)) if norm_cls is _CountingLayerNorm else norm_cls(2)
    x, w, b, grad = _normalized_inputs(shape, None, True, dtype=torch.bfloat16, channel_dim=channel_dim)
    gen = torch.Generator().manual_seed(5)
    draws = GF.GhostDraws(indices=GF.ghost_indices(shape[0], 3, generator=gen))
    fused = _run_normalized(None, x, w, b, grad, norm, channel_dim, draws)
    if norm_cls is _CountingLayerNorm:
        assert norm.calls == {"call": 2, "forward": 0, "backward": 0}
    plain = _run_normalized(False, x, w, b, grad, norm, channel_dim, draws)
    ref = _run_normalized(False, x.double(), w.double(), b.double(), grad.double(), norm, channel_dim, draws)
    assert fused[0].dtype == torch.bfloat16 and fused[2].dtype == torch.float32
    torch.testing.assert_close(fused[0], plain[0], rtol=0, atol=0)
    for got, base, want in zip(fused[1:], plain[1:], ref[1:]):
        err, base_err = (got.double() - want).abs().max(), (base.double() - want).abs().max()
        assert err <= 2 * base_err + 1e-3 * want.abs().max()


@pytest.mark.parametrize("norm,shape,channel_dim,transpose", [(GF.NativeLayerNorm((5,)), (8, 6, 5), -1, (0, 1)),
                                                              (GF.NativeGroupNorm(2), (8, 4, 6, 5), 1, (2, 3))])  # fmt: skip
def test_native_norm_path_with_a_non_contiguous_input(norm, shape, channel_dim, transpose):
    """A strided (non-dense) input: made dense for the native kernels, same results as plain autograd."""
    x, w, b, grad = _normalized_inputs(shape, None, True, channel_dim=channel_dim)
    x = x.transpose(*transpose).contiguous().transpose(*transpose)  # same values, other strides
    assert not x.is_contiguous()
    draws = GF.GhostDraws(indices=GF.ghost_indices(shape[0], 3, generator=torch.Generator().manual_seed(6)))
    fused = _run_normalized(None, x, w, b, grad, norm, channel_dim, draws)
    plain = _run_normalized(False, x, w, b, grad, norm, channel_dim, draws)
    torch.testing.assert_close(fused[0], plain[0], rtol=0, atol=0)
    for got, want in zip(fused[1:], plain[1:]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.fixture
def small_chunks(monkeypatch):
    """Make every CPU temporary above 1 KiB go through chunks of 4 KiB (see ``batch_chunks``)."""
    monkeypatch.setattr(GFM, "_TEMPORARY_LIMIT", 1024)
    monkeypatch.setattr(GFM, "_CHUNK_BYTES", 4096)


@pytest.mark.parametrize(
    "shape,channel_dim,memory_format,dtype",
    [((13, 9, 24), -1, None, torch.float32), ((13, 9, 24), -1, None, torch.bfloat16),
     ((11, 6, 5, 7), 1, torch.channels_last, torch.float32), ((7, 3, 2, 40), -1, None, torch.float64)],
)  # fmt: skip
def test_per_sample_moments_in_chunks_match_one_piece(shape, channel_dim, memory_format, dtype, monkeypatch):
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 2 + 1).to(dtype)
    if memory_format is not None:
        x = x.to(memory_format=memory_format)
    whole = GF.per_sample_moments(x, channel_dim)
    monkeypatch.setattr(GFM, "_TEMPORARY_LIMIT", 1024)
    monkeypatch.setattr(GFM, "_CHUNK_BYTES", 4096)
    if dtype != torch.float64:  # (float64 takes var_mean, no temporary)
        assert 1 < GFM.batch_chunks(x, 4) < shape[0] and shape[0] % GFM.batch_chunks(x, 4)
    chunked = GF.per_sample_moments(x, channel_dim)
    for got, want in zip(chunked, whole):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("batch,n,exclusive", [(8, 4, False), (8, 4, True), (7, 3, False), (7, 3, True), (5, 1, True)])
def test_ghost_matrix_is_cached_in_eager_mode_and_matches_a_loop(batch, n, exclusive, monkeypatch):
    """The ghost averaging matrix, built once per (batch, ghost batch size, kind, device, dtype)."""
    like = torch.zeros(batch, 3)
    first = GFB.ghost_matrix(batch, n, exclusive, like)
    assert GFB.ghost_matrix(batch, n, exclusive, like) is first  # cached
    # ghost_groups: consecutive samples; the remainder joins the last full ghost batch
    starts = list(range(0, max(batch // n, 1) * n, n))
    groups = [list(range(i, i + n)) for i in starts[:-1]] + [list(range(starts[-1], batch))]
    expected = torch.zeros(batch, batch)
    for members in groups:
        for b in members:
            others = [j for j in members if j != b] if exclusive and len(members) > 1 else members
            for j in others:
                expected[b, j] = 1.0 / len(others)
    torch.testing.assert_close(first, expected)
    monkeypatch.setattr(GFB, "_MATRIX_CACHE_MAX_BATCH", batch - 1)  # above the limit: built every time
    assert GFB.ghost_matrix(batch, n, exclusive, like) is not GFB.ghost_matrix(batch, n, exclusive, like)


def test_cached_ghost_matrix_first_built_in_inference_mode_serves_training():
    """A matrix first asked for under ``torch.inference_mode`` is a normal tensor: a later training
    step saves it for its backward."""
    from lightning_ghostnoise.layers import GhostBatchNorm2d

    GFB.cached_ghost_matrix.cache_clear()
    layer = GhostBatchNorm2d.from_module(torch.nn.BatchNorm2d(3), method="xbn", ghost_batch_size=2, seed=0).train()
    x = torch.randn(6, 3, 2, 2)
    with torch.inference_mode():
        layer(x)
    x.requires_grad_()
    layer(x).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_update_running_stats_foreach_matches_two_lerps(dtype):
    """``foreach=True`` (one op for both buffers, for the custom-op path) gives the same bits."""
    gen = torch.Generator().manual_seed(3)
    mean, var = torch.randn(7, generator=gen), torch.rand(7, generator=gen)
    out = {}
    for foreach in (False, True):
        rm, rv = torch.zeros(7, dtype=dtype), torch.ones(7, dtype=dtype)
        GF.update_running_stats(rm, rv, mean, var, 12, 0.3, foreach=foreach)
        out[foreach] = (rm, rv)
    assert torch.equal(out[True][0], out[False][0]) and torch.equal(out[True][1], out[False][1])
    assert not torch.equal(out[True][0], torch.zeros(7, dtype=dtype))  # updated
    torch.testing.assert_close(out[False][1].double(), (0.7 + 0.3 * var.double() * 12 / 11).to(dtype).double())


@pytest.mark.slow
def test_no_chunks_under_torch_compile(small_chunks):
    """Chunks are for eager CPU temporaries: under ``torch.compile`` their loop would be unrolled into
    the graph (inductor plans its own buffers), so a traced layer takes the batch in one piece."""
    x = torch.randn(13, 9, 24)
    assert GFM.batch_chunks(x, 4) < 13
    traced = torch.compile(lambda t: t * GFM.batch_chunks(t, 4), backend="eager", fullgraph=True)
    try:
        assert torch.equal(traced(x), x * 13)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize(
    "norm,shape,channel_dim,memory_format",
    [(GF.NativeLayerNorm((24,)), (13, 9, 24), -1, None), (GF.NativeLayerNorm((24,)), (13, 3, 3, 24), -1, None),
     (GF.NativeGroupNorm(2), (11, 6, 5, 7), 1, torch.channels_last), (GF.NativeGroupNorm(3), (11, 6, 35), 1, None)],
)  # fmt: skip
@pytest.mark.parametrize("affine,need", [(True, "all"), (False, "all"), (True, "params_only"), (True, "input_only")])
def test_native_backward_in_chunks_matches_one_piece(
    norm, shape, channel_dim, memory_format, affine, need, small_chunks
):
    """The native backward of ``grad_y * inv`` in chunks of the batch (large CPU temporaries) against
    the same in one piece and against plain autograd. (``params_only`` on channels-last GroupNorm: the
    input gradient is computed anyway, where torch 2.13's CPU kernel would crash without it.)"""
    x, w, b, grad = _normalized_inputs(shape, memory_format, affine, channel_dim=channel_dim)
    draws = GF.GhostDraws(indices=GF.ghost_indices(shape[0], 3, generator=torch.Generator().manual_seed(7)))

    def run(fused, limit):
        GFM._TEMPORARY_LIMIT = limit
        xr = x.detach().clone().requires_grad_(need != "params_only")
        wr = w.detach().clone().requires_grad_(need != "input_only") if affine else None
        br = b.detach().clone().requires_grad_(need != "input_only") if affine else None
        y = GF.normalized_noise(xr, norm, draws, wr, br, channel_dim=channel_dim, fused=fused, strength=0.9)
        y.backward(grad)
        return [t.grad if t is not None else None for t in (xr, wr, br)]

    assert 1 < GFM.batch_chunks(x, 4) < shape[0]
    chunked = run(None, 1024)
    whole = run(None, 1 << 40)
    plain = run(False, 1 << 40)
    for got, one, want in zip(chunked, whole, plain):
        if want is None:
            assert got is None and one is None
        else:
            torch.testing.assert_close(got, one, rtol=4e-6, atol=4e-6)  # the moments: sums in another order
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_normalized_noise_fused_refuses_double_backward_plain_supports_it():
    x, w, b, _ = _normalized_inputs((8, 5, 6), None, True)
    idx = GF.ghost_indices(8, 3, generator=torch.Generator().manual_seed(2))
    for fused in (None, False):
        xr = x.detach().clone().requires_grad_()
        y = GF.normalized_noise(xr, _layer_norm, GF.GhostDraws(indices=idx), w, b, channel_dim=-1, fused=fused)
        (g,) = torch.autograd.grad(y.square().sum(), xr, create_graph=True) if fused is False else (None,)
        if fused is None:
            with pytest.raises(RuntimeError, match="Double backward"):
                torch.autograd.grad(y.square().sum(), xr, create_graph=True)
        else:
            g.square().sum().backward()
            assert xr.grad is not None and torch.isfinite(xr.grad).all()


def test_normalized_noise_leaves_the_input_alone_when_normalize_returns_it():
    """The fused path writes y over its own x_hat: never over a normalize result that is x itself."""
    x, w, b, grad = _normalized_inputs((8, 5, 6), None, True)
    x.requires_grad_()
    before = x.detach().clone()
    idx = GF.ghost_indices(8, 3, generator=torch.Generator().manual_seed(3))
    y = GF.normalized_noise(x, lambda t: t, GF.GhostDraws(indices=idx), w, b, channel_dim=-1)
    torch.testing.assert_close(x.detach(), before, rtol=0, atol=0)
    y.backward(grad)
    torch.testing.assert_close(x.detach(), before, rtol=0, atol=0)
    ref = GF.apply_noise(before, *GF.ghost_noise(*GF.per_sample_moments(before, -1), idx), w, b, channel_dim=-1)
    torch.testing.assert_close(y.detach(), ref.detach(), rtol=0, atol=0)


def test_normalized_noise_without_gradients_takes_the_plain_path():
    x, w, b, _ = _normalized_inputs((8, 5, 6), None, True)
    idx = GF.ghost_indices(8, 3, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        y = GF.normalized_noise(x, _layer_norm, GF.GhostDraws(indices=idx), w, b, channel_dim=-1)
    assert y.grad_fn is None
    want = GF.normalized_noise(x, _layer_norm, GF.GhostDraws(indices=idx), w, b, channel_dim=-1, fused=False)
    torch.testing.assert_close(y, want, rtol=0, atol=0)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_sample_moments_in_both_cpu_reductions(memory_format, dtype):
    """Channels innermost (channels-last; LayerNorm's last dimension) square-then-sum; otherwise the norm."""
    x = (torch.randn(6, 5, 4, 3) * 3 + 2).to(dtype).to(memory_format=memory_format)
    mean, var = GF.per_sample_moments(x)
    ref = x.double().flatten(2)
    torch.testing.assert_close(mean.double(), ref.mean(2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var.double(), ref.var(2, unbiased=False), rtol=1e-4, atol=1e-4)
    tokens = (torch.randn(6, 7, 5) * 3 + 2).to(dtype)
    mean, var = GF.per_sample_moments(tokens, channel_dim=-1)
    torch.testing.assert_close(mean.double(), tokens.double().mean(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var.double(), tokens.double().var(1, unbiased=False), rtol=1e-4, atol=1e-4)


def test_docstring_examples_of_the_math_layers_and_surgery_run():
    """The short examples in the docstrings of functional, layers and surgery are doctests."""
    import doctest
    import importlib
    import pkgutil

    from lightning_ghostnoise import backends, config, layers, surgery

    for module in (GF, layers, surgery, config, backends):
        result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE, extraglobs={"torch": torch})
        assert result.attempted > 0 and result.failed == 0, module.__name__
    for package in (GF, backends):  # every submodule of the math and the backends (Triton's: tests/backends)
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if ".triton" in info.name:
                continue
            module = importlib.import_module(info.name)
            result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE, extraglobs={"torch": torch})
            assert result.failed == 0, module.__name__


@pytest.mark.parametrize("fused", [None, False])
@pytest.mark.parametrize("norm,shape,channel_dim", [(GF.NativeLayerNorm((6,)), (8, 5, 6), -1),
                                                    (GF.NativeGroupNorm(2), (8, 4, 3, 5), 1)])  # fmt: skip
def test_moment_free_noise_skips_the_moments_and_gives_the_same_result(norm, shape, channel_dim, fused, monkeypatch):
    """Analytic GNI's noise does not read the moments: wrapped in MomentFreeNoise, normalized_noise
    does not compute them, and the result (forward and gradients) is the same."""
    x, w, b, grad = _normalized_inputs(shape, None, True, channel_dim=channel_dim)
    normal, gamma = GF.analytic_draws(shape[0], shape[channel_dim], 4, generator=torch.Generator().manual_seed(8))
    draws = GF.GhostDraws(normal=normal, gamma=gamma, ghost_batch_size=4)
    assert draws.uses_moments is False and GF.GhostDraws(indices=torch.zeros(8, 2, dtype=torch.long)).uses_moments
    reads = GF.MomentFreeNoise(lambda m, v: draws(m, v))
    want = _run_normalized(fused, x, w, b, grad, norm, channel_dim, lambda m, v: draws(m, v))  # computes moments

    def refuse(*args, **kwargs):
        raise AssertionError("per_sample_moments called for a moment-free noise")

    monkeypatch.setattr(GFN, "per_sample_moments", refuse)
    for noise_fn in (reads, draws):
        got = _run_normalized(fused, x, w, b, grad, norm, channel_dim, noise_fn)
        for g, t in zip(got, want):
            torch.testing.assert_close(g, t, rtol=0, atol=0)
