"""Running statistics of the BatchNorm family: the full batch's (as ``F.batch_norm``) or the ghost batches'.

Example:
    >>> import torch
    >>> from lightning_ghostnoise.functional.moments import per_sample_moments
    >>> rm, rv = torch.zeros(3), torch.ones(3)
    >>> update_ghost_running_stats(rm, rv, *per_sample_moments(torch.randn(8, 3, 4)), 4, 4, momentum=0.1)
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "RUNNING_STATS",
    "ghost_running_targets",
    "resolve_running_stats",
    "update_ghost_running_stats",
    "update_running_stats",
]


def update_running_stats(
    running_mean: Tensor | None,
    running_var: Tensor | None,
    batch_mean: Tensor,
    batch_var: Tensor,
    count: int,
    momentum: float,
    foreach: bool = False,
) -> None:
    """Update running statistics in place as ``F.batch_norm`` does with ``momentum``.

    ``batch_var`` is the biased batch variance over ``count`` values per channel; the running
    variance receives the unbiased one (``count / (count - 1)``). The caller resolves BatchNorm's
    ``momentum=None`` (cumulative average) into a factor, as ``nn.BatchNorm`` does. ``foreach``: both
    buffers in one op (the same values), which inductor makes one kernel where no other kernel takes
    the update as its epilogue (after a custom op); elsewhere two ``lerp_`` fuse better.
    """
    if running_mean is None or running_var is None:
        return
    with torch.no_grad():
        unbiased = batch_var * (count / max(count - 1, 1))
        lerp_running_stats(running_mean, running_var, batch_mean, unbiased, momentum, foreach)


def lerp_running_stats(
    running_mean: Tensor, running_var: Tensor, mean: Tensor, unbiased_var: Tensor, momentum: float, foreach: bool
) -> None:
    """``running += momentum * (target - running)`` for both buffers (in the buffers' dtype), in place."""
    mean = mean.to(running_mean.dtype)
    var = unbiased_var.to(running_var.dtype)
    if (
        foreach
        and _FOREACH_LERP is not None
        and running_mean.dtype == running_var.dtype
        and running_mean.device == running_var.device
    ):
        _FOREACH_LERP([running_mean, running_var], [mean, var], momentum)
    else:
        running_mean.lerp_(mean, momentum)
        running_var.lerp_(var, momentum)


#: Both buffers in one op (private; tests/functional check that it is there): fewer kernels in a compiled
#: graph with the coefficient ops (docs/performance.md). Without it, two public ``lerp_``: the same bits.
_FOREACH_LERP = getattr(torch, "_foreach_lerp_", None)


#: The conventions for GBN's running statistics (see :func:`ghost_running_targets`).
RUNNING_STATS: tuple[str, ...] = ("ghost", "batch")


def resolve_running_stats(running_stats: str | None, ghost: bool) -> str:
    """``running_stats`` checked, with ``None`` resolved to the default: ``"ghost"`` where the method
    normalizes by ghost batches (``ghost``: GBN), else ``"batch"``.

    Only the valid values are checked here; which method allows ``"ghost"`` is
    the layers' business (their validation).
    """
    if running_stats is None:
        return "ghost" if ghost else "batch"
    if not isinstance(running_stats, str) or running_stats.lower() not in RUNNING_STATS:
        raise ValueError(
            f"running_stats must be 'ghost', 'batch' or None (the method's default), got {running_stats!r}."
        )
    return running_stats.lower()


def ghost_running_targets(
    mean: Tensor, var: Tensor, ghost_batch_size: int, spatial_count: int
) -> tuple[Tensor, Tensor]:
    """GBN's running-statistics targets as published: the ghost batches' mean moments.

    From the per-sample moments ``mean``, ``var`` ``(B, C)`` (biased, over ``spatial_count`` positions
    each): ghost batches as in :func:`ghost_groups` (the ``B mod N`` remainder joins the last one);
    each ghost batch ``g`` of ``n_g`` samples has its mean and unbiased variance over its
    ``n_g * spatial_count`` values per channel (``biased * count / (count - 1)``; a ghost batch of
    one value has variance 0, as in :func:`update_running_stats`). The targets are the
    averages of these over the ghost batches, each ghost batch weighing 1 (Hoffer et al.'s GBN,
    Keras's ``virtual_batch_size``): eval then sees the scale training normalized with.

    Returns:
        ``(mean_target, unbiased_var_target)``, each ``(C,)``, without gradient.

    Example:
        >>> from lightning_ghostnoise.functional.moments import per_sample_moments
        >>> x = torch.randn(10, 3, 4, 4)
        >>> m, v = ghost_running_targets(*per_sample_moments(x), 4, 16)
        >>> ref = torch.stack([x[:4].var((0, 2, 3)), x[4:].var((0, 2, 3))]).mean(0)  # groups of 4 and 6
        >>> torch.allclose(v, ref, atol=1e-5)
        True
    """
    with torch.no_grad():
        mean, var = mean.detach(), var.detach()
        batch, channels = mean.shape
        n = ghost_batch_size
        groups = max(batch // n, 1)
        head = (groups - 1) * n  # samples in the equal ghost batches before the last one

        def moments(m: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
            """Sums over ghost batches ``(G, n_g, C)`` of their means and unbiased variances."""
            g_mean = m.mean(1, keepdim=True)
            d = m - g_mean
            size = m.shape[1] * spatial_count
            g_var = torch.addcmul(v, d, d).mean(1) * (size / max(size - 1, 1))
            return g_mean.sum((0, 1)), g_var.sum(0)

        mean_sum, var_sum = moments(mean[head:].unsqueeze(0), var[head:].unsqueeze(0))
        if head:
            m, v = moments(mean[:head].reshape(groups - 1, n, channels), var[:head].reshape(groups - 1, n, channels))
            mean_sum, var_sum = mean_sum + m, var_sum + v
        return mean_sum / groups, var_sum / groups


def update_ghost_running_stats(
    running_mean: Tensor | None,
    running_var: Tensor | None,
    mean: Tensor,
    var: Tensor,
    ghost_batch_size: int,
    spatial_count: int,
    momentum: float,
    foreach: bool = False,
) -> None:
    """Lerp the running statistics towards :func:`ghost_running_targets` of the per-sample moments
    (GBN's ``running_stats="ghost"``), as :func:`update_running_stats` does towards the batch's."""
    if running_mean is None or running_var is None:
        return
    target_mean, target_var = ghost_running_targets(mean, var, ghost_batch_size, spatial_count)
    with torch.no_grad():
        lerp_running_stats(running_mean, running_var, target_mean, target_var, momentum, foreach)
