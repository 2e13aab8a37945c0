"""Plain references for the noise analysis tests: loops over samples and channels, float64, no library math.

Each function takes the raw input of a normalization layer and returns, per (sample, channel), the
shift and scale that the method gives that sample, written straight from the method's definition.
"""

import math
from typing import List, Tuple

import torch
from torch import Tensor


def channel_values(x: Tensor, channel_dim: int) -> Tensor:
    """``(B, C, P)``: for each sample and channel, its P values (spatial positions or tokens), float64."""
    x = x.double().movedim(channel_dim, 1)
    return x.reshape(x.shape[0], x.shape[1], -1)


def ghost_batches(batch: int, n: int) -> List[List[int]]:
    """Consecutive groups of n samples; the last batch % n samples join the last full group."""
    groups = max(batch // n, 1)
    members: List[List[int]] = [[] for _ in range(groups)]
    for b in range(batch):
        members[min(b // n, groups - 1)].append(b)
    return members


def ghost_statistics_noise(x: Tensor, n: int, exclusive: bool, eps: float) -> Tuple[Tensor, Tensor]:
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


def gni_noise(x_hat: Tensor, indices: Tensor, noise_eps: float, channel_dim: int = 1) -> Tuple[Tensor, Tensor]:
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


def with_noise(x_hat: Tensor, shift: Tensor, scale: Tensor, weight: Tensor, bias: Tensor, strength: float,
               channel_dim: int = 1) -> Tensor:
    """weight * (x_hat - s * shift) / scale**s + bias, per (sample, channel)."""
    shape = [1] * x_hat.dim()
    shape[0] = x_hat.shape[0]
    shape[channel_dim] = x_hat.shape[channel_dim]
    per_channel = [1] * x_hat.dim()
    per_channel[channel_dim] = x_hat.shape[channel_dim]
    y = (x_hat - strength * shift.reshape(shape)) / scale.reshape(shape) ** strength
    return y * weight.double().reshape(per_channel) + bias.double().reshape(per_channel)
