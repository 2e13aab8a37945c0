"""Cross-process pieces of ``sync=True``: global normalization statistics and the global noise pool.

With ``sync=True`` each process holds a slice of the global batch (process ``r`` holds rows
``r * B .. (r + 1) * B - 1``, equal local batch sizes ``B``). The normalization uses the global
batch's statistics (SyncBatchNorm semantics, with gradients through them) and every process draws
the same ghost indices over the global batch and keeps its own rows, so ``k`` processes with batch
``B`` give the same per-sample noise as one process with batch ``k * B`` and the same seed.

Cost per layer and step: one ``all_reduce`` of ``2 C`` floats (BatchNorm only; its backward one
more of the same size) and one ``all_gather`` of ``2 C`` floats per sample (``8 * B * C`` bytes sent
per process, ``8 * k * B * C`` received).
"""

from __future__ import annotations

import os
from typing import Any, Optional, Tuple

import torch
import torch.distributed as dist
from lightning_utilities.core.rank_zero import rank_zero_only
from lightning_utilities.core.rank_zero import rank_zero_warn as _rank_zero_warn
from torch import Tensor

__all__ = ["gather_rows", "global_batch_moments", "rank_zero_warn", "sync_world"]

#: Environment variables that name the process's rank, in the order Lightning reads them.
_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


def rank_zero_warn(message: str, **kwargs: Any) -> None:
    """Warn on the process of rank 0 only, with or without Lightning imported.

    ``lightning_utilities``' ``rank_zero_warn`` needs ``rank_zero_only.rank``, which importing
    Lightning sets. Where it is unset (plain PyTorch), it is set here by Lightning's rule: the first of
    ``RANK``, ``LOCAL_RANK``, ``SLURM_PROCID``, ``JSM_NAMESPACE_RANK`` in the environment, else 0. A
    Trainer sets the real rank when it starts.

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     rank_zero_warn("careful")
        >>> [str(w.message) for w in caught]
        ['careful']
    """
    if getattr(rank_zero_only, "rank", None) is None:
        rank = next((os.environ[key] for key in _RANK_VARIABLES if key in os.environ), "0")
        rank_zero_only.rank = int(rank)  # type: ignore[attr-defined]  # the attribute Lightning sets on import
    # one frame more than lightning_utilities expects: the warning points at this function's caller
    _rank_zero_warn(message, stacklevel=kwargs.pop("stacklevel", 4) + 1, **kwargs)


def sync_world(group: Optional[Any] = None) -> Optional[Tuple[int, int]]:
    """``(rank, world_size)`` in ``group`` when a process group with more than one process is up, else ``None``."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size(group)
    if world < 2:
        return None
    return dist.get_rank(group), world


def gather_rows(t: Tensor, group: Optional[Any] = None) -> Tensor:
    """Concatenate ``t`` (rows = samples) from every process in rank order, without gradient.

    Every process must pass the same shape (equal local batch sizes).
    """
    world = dist.get_world_size(group)
    t = t.detach().contiguous()
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t, group=group)
    return torch.cat(parts, 0)


def global_batch_moments(
    mean: Tensor, var: Tensor, running_mean: Optional[Tensor] = None, group: Optional[Any] = None
) -> Tuple[Tensor, Tensor]:
    """Global batch mean and biased variance per channel from every process's per-sample moments.

    Differentiable: the backward all-reduces the gradients, so every sample's gradient sees the
    global statistics (SyncBatchNorm semantics). Equal local batch sizes are required.

    Returns:
        ``(mean, var)``, each ``(C,)``.
    """
    from torch.distributed.nn.functional import all_reduce

    channels = mean.shape[1]
    world = dist.get_world_size(group)
    samples = mean.shape[0] * world
    # a centre shared by every process (the running mean is identical everywhere) keeps E[x^2] - E[x]^2 stable
    centre = running_mean.detach().to(mean.dtype) if running_mean is not None else mean.new_zeros(channels)
    c = mean - centre
    total = all_reduce(torch.cat([c.sum(0), (var + c * c).sum(0)]), op=dist.ReduceOp.SUM, group=group)
    g_c = total[:channels] / samples
    g_var = (total[channels:] / samples - g_c * g_c).clamp_min(0)
    return g_c + centre, g_var
