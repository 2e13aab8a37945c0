"""The plain per-sample references every test checks the library against: float64 loops, no library math.

Written from the formulas in DESIGN.md, independently of :mod:`lightning_ghostnoise`: explicit loops
over samples, ghost batches and channels. The ``ref_*`` functions give a method's output; the
functions after them (``gni_noise``, ``ghost_statistics_noise``, ...) give the per-(sample, channel)
shift and scale a method applies, for the noise analysis tests.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

NOISE_EPS = 1e-3
F64 = torch.float64


# ---------------------------------------------------------------------------------------------------
# plain references (float64, loops)
# ---------------------------------------------------------------------------------------------------
def _biased_moments(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m = values.mean()
    return m, ((values - m) ** 2).mean()


def _affine(weight: torch.Tensor | None, bias: torch.Tensor | None, c: int) -> tuple[float, float]:
    g = 1.0 if weight is None else float(weight[c])
    b = 0.0 if bias is None else float(bias[c])
    return g, b


def ref_batch_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-channel batch normalization (biased variance), no affine; differentiable, float64."""
    x = x.to(F64)
    outs = []
    for c in range(x.shape[1]):
        v = x[:, c]
        m, var = _biased_moments(v.reshape(-1))
        outs.append((v - m) / torch.sqrt(var + eps))
    return torch.stack(outs, dim=1)


def ref_layer_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dimension, no affine, loop over all leading positions; float64."""
    x = x.to(F64)
    flat = x.reshape(-1, x.shape[-1])
    rows = []
    for r in range(flat.shape[0]):
        m, var = _biased_moments(flat[r])
        rows.append((flat[r] - m) / torch.sqrt(var + eps))
    return torch.stack(rows).reshape(x.shape)


def ref_sample_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """GroupNorm(1, C): each sample normalized over all its (channel, spatial) values; float64."""
    x = x.to(F64)
    outs = []
    for b in range(x.shape[0]):
        m, var = _biased_moments(x[b].reshape(-1))
        outs.append((x[b] - m) / torch.sqrt(var + eps))
    return torch.stack(outs)


def ref_gni_noise(x_hat: torch.Tensor, idx: torch.Tensor, channel_dim: int = 1, eps: float = NOISE_EPS):
    """GNI's (shift, scale) per (sample, channel): pool the N*spatial normalized values of the drawn samples."""
    xh = x_hat.detach().to(F64).movedim(channel_dim, 1)
    B, C = xh.shape[:2]
    flat = xh.reshape(B, C, -1)
    N = idx.shape[1]
    shift = torch.zeros(B, C, dtype=F64)
    scale = torch.zeros(B, C, dtype=F64)
    for c in range(C):
        bm, bv = _biased_moments(flat[:, c, :].reshape(-1))
        for b in range(B):
            pool = torch.cat([flat[int(idx[b, j]), c, :] for j in range(N)])
            gm, gv = _biased_moments(pool)
            shift[b, c] = gm - bm
            scale[b, c] = math.sqrt((float(gv) + eps) / (float(bv) + eps))
    return shift, scale


def ref_apply(
    x_hat: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    weight=None,
    bias=None,
    strength: float = 1.0,
    shift_noise: bool = True,
    scale_noise: bool = True,
    channel_dim: int = 1,
) -> torch.Tensor:
    """y = gamma * (x_hat - s*shift) / scale**s + beta, loop over (sample, channel)."""
    xh = x_hat.to(F64).movedim(channel_dim, 1)
    B, C = xh.shape[:2]
    out = torch.empty_like(xh)
    for b in range(B):
        for c in range(C):
            v = xh[b, c]
            if shift_noise:
                v = v - strength * float(shift[b, c])
            if scale_noise:
                v = v / float(scale[b, c]) ** strength
            g, be = _affine(weight, bias, c)
            out[b, c] = g * v + be
    return out.movedim(1, channel_dim)


def ref_gni(x_hat, idx, weight=None, bias=None, strength=1.0, shift_noise=True, scale_noise=True, channel_dim=1):
    shift, scale = ref_gni_noise(x_hat, idx, channel_dim)
    return ref_apply(x_hat, shift, scale, weight, bias, strength, shift_noise, scale_noise, channel_dim)


def ref_groups(B: int, N: int) -> list[list[int]]:
    """Consecutive ghost batches; the B mod N trailing samples join the last full one; B < N: one batch."""
    if B < N:
        return [list(range(B))]
    groups = [list(range(k * N, (k + 1) * N)) for k in range(B // N)]
    groups[-1].extend(range((B // N) * N, B))
    return groups


def ref_gbn(x: torch.Tensor, N: int, eps: float, weight=None, bias=None) -> torch.Tensor:
    x = x.to(F64)
    y = torch.empty_like(x)
    for members in ref_groups(x.shape[0], N):
        for c in range(x.shape[1]):
            pool = torch.cat([x[i, c].reshape(-1) for i in members])
            m, v = _biased_moments(pool)
            g, be = _affine(weight, bias, c)
            for i in members:
                y[i, c] = g * (x[i, c] - m) / math.sqrt(float(v) + eps) + be
    return y


def ref_xbn(x: torch.Tensor, N: int, eps: float, weight=None, bias=None) -> torch.Tensor:
    x = x.to(F64)
    y = torch.empty_like(x)
    for members in ref_groups(x.shape[0], N):
        for i in members:
            others = [j for j in members if j != i] or [i]
            for c in range(x.shape[1]):
                pool = torch.cat([x[j, c].reshape(-1) for j in others])
                m, v = _biased_moments(pool)
                g, be = _affine(weight, bias, c)
                y[i, c] = g * (x[i, c] - m) / math.sqrt(float(v) + eps) + be
    return y


def ref_gbn_strength(x: torch.Tensor, N: int, eps: float, strength: float, shift_noise=True, scale_noise=True):
    """GBN with strength s via DESIGN's formula: with x_hat = (x - mu_B)/std_B, GBN's implied noise is
    shift = (mu_G - mu_B)/std_B and scale = std_G/std_B (std = sqrt(var + eps));
    y = (x_hat - s*shift)/scale**s."""
    x = x.to(F64)
    y = torch.empty_like(x)
    for c in range(x.shape[1]):
        bm, bv = _biased_moments(x[:, c].reshape(-1))
        std_b = math.sqrt(float(bv) + eps)
        for members in ref_groups(x.shape[0], N):
            gm, gv = _biased_moments(torch.cat([x[i, c].reshape(-1) for i in members]))
            shift = (float(gm) - float(bm)) / std_b
            scale = math.sqrt(float(gv) + eps) / std_b
            for i in members:
                v = (x[i, c] - bm) / std_b
                if shift_noise:
                    v = v - strength * shift
                if scale_noise:
                    v = v / scale**strength
                y[i, c] = v
    return y


def varied_input(shape: Sequence[int], seed: int, dtype=torch.float32) -> torch.Tensor:
    """Random data with per-sample and per-channel offsets/scales, so ghost statistics really differ."""
    g = torch.Generator().manual_seed(seed)
    B, C = shape[0], shape[1]
    extra = (1,) * (len(shape) - 2)
    offs = 0.7 * torch.randn((B, C) + extra, generator=g) + torch.linspace(-1, 2, C).view((1, C) + extra)
    scales = 0.5 + torch.rand((B, 1) + extra, generator=g)
    return (offs + scales * torch.randn(tuple(shape), generator=g)).to(dtype)


def affine_params(C: int, seed: int = 7):
    g = torch.Generator().manual_seed(seed)
    return 1.0 + 0.5 * torch.randn(C, generator=g), 0.3 * torch.randn(C, generator=g)


# ---------------------------------------------------------------------------------------------------
# the noise each method applies, per (sample, channel)
# ---------------------------------------------------------------------------------------------------
def channel_values(x: Tensor, channel_dim: int) -> Tensor:
    """``(B, C, P)``: for each sample and channel, its P values (spatial positions or tokens), float64."""
    x = x.double().movedim(channel_dim, 1)
    return x.reshape(x.shape[0], x.shape[1], -1)


def ghost_batches(batch: int, n: int) -> list[list[int]]:
    """Consecutive groups of n samples; the last batch % n samples join the last full group."""
    groups = max(batch // n, 1)
    members: list[list[int]] = [[] for _ in range(groups)]
    for b in range(batch):
        members[min(b // n, groups - 1)].append(b)
    return members


def ghost_statistics_noise(x: Tensor, n: int, exclusive: bool, eps: float) -> tuple[Tensor, Tensor]:
    """GBN/XBN written as BN plus noise: shift = (ghost mean - batch mean) / sqrt(batch var + eps),
    scale = sqrt((ghost var + eps) / (batch var + eps)); XBN takes the other members of the ghost batch."""
    v = channel_values(x, 1)
    batch, channels, _ = v.shape
    shift = torch.zeros(batch, channels, dtype=torch.float64)
    scale = torch.zeros(batch, channels, dtype=torch.float64)
    for members in ghost_batches(batch, n):
        for b in members:
            others = [j for j in members if j != b] if exclusive and len(members) > 1 else members
            for c in range(channels):
                everything = v[:, c, :].reshape(-1)
                bm, bv = everything.mean(), everything.var(unbiased=False)
                ghost = v[others, c, :].reshape(-1)
                gm, gv = ghost.mean(), ghost.var(unbiased=False)
                shift[b, c] = (gm - bm) / math.sqrt(bv + eps)
                scale[b, c] = math.sqrt((gv + eps) / (bv + eps))
    return shift, scale


def batch_normalized(x: Tensor, eps: float) -> Tensor:
    """BatchNorm's normalized output (batch statistics, biased variance, no affine), float64."""
    v = x.double()
    dims = [0] + list(range(2, x.dim()))
    mean = v.mean(dims, keepdim=True)
    var = v.var(dims, unbiased=False, keepdim=True)
    return (v - mean) / torch.sqrt(var + eps)


def gni_noise(x_hat: Tensor, indices: Tensor, noise_eps: float, channel_dim: int = 1) -> tuple[Tensor, Tensor]:
    """GNI from the normalized features: sample b's ghost batch is the rows indices[b] (with repeats);
    shift = ghost mean - batch mean, scale = sqrt((ghost var + eps) / (batch var + eps)), over all values."""
    v = channel_values(x_hat, channel_dim)
    batch, channels, _ = v.shape
    shift = torch.zeros(batch, channels, dtype=torch.float64)
    scale = torch.zeros(batch, channels, dtype=torch.float64)
    for c in range(channels):
        everything = v[:, c, :].reshape(-1)
        bm, bv = everything.mean(), everything.var(unbiased=False)
        for b in range(batch):
            ghost = torch.cat([v[int(j), c, :] for j in indices[b]])
            gm, gv = ghost.mean(), ghost.var(unbiased=False)
            shift[b, c] = gm - bm
            scale[b, c] = math.sqrt((gv + noise_eps) / (bv + noise_eps))
    return shift, scale


def with_noise(
    x_hat: Tensor, shift: Tensor, scale: Tensor, weight: Tensor, bias: Tensor, strength: float, channel_dim: int = 1
) -> Tensor:
    """weight * (x_hat - s * shift) / scale**s + bias, per (sample, channel)."""
    shape = [1] * x_hat.dim()
    shape[0] = x_hat.shape[0]
    shape[channel_dim] = x_hat.shape[channel_dim]
    per_channel = [1] * x_hat.dim()
    per_channel[channel_dim] = x_hat.shape[channel_dim]
    y = (x_hat - strength * shift.reshape(shape)) / scale.reshape(shape) ** strength
    return y * weight.double().reshape(per_channel) + bias.double().reshape(per_channel)
