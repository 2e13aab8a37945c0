"""Ghost noise for the BatchNorm family: :class:`GhostBatchNorm1d`, :class:`GhostBatchNorm2d`, :class:`GhostBatchNorm3d`.

GNI and analytic GNI add their noise after BatchNorm's normalization; GBN and XBN normalize with
the statistics of ghost batches (XBN: of the other samples of each ghost batch). In eval mode, with
``strength == 0``, or when the layer is in eval mode during training (a frozen BatchNorm), the layer
is plain BatchNorm.

Example:
    >>> import torch
    >>> from lightning_ghostnoise.layers import GhostBatchNorm2d
    >>> bn = torch.nn.BatchNorm2d(8)
    >>> gbn = GhostBatchNorm2d.from_module(bn, method="gni", ghost_batch_size=16)
    >>> sorted(gbn.state_dict()) == sorted(bn.state_dict())
    True
    >>> gbn(torch.randn(32, 8, 4, 4)).shape
    torch.Size([32, 8, 4, 4])
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

from torch import Tensor, nn

from lightning_ghostnoise import backends
from lightning_ghostnoise.distributed import global_batch_moments
from lightning_ghostnoise.layers.base import _STRENGTH_BUFFER, GhostNoiseMixin
from lightning_ghostnoise.layers.validation import check_floating

__all__ = ["GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d"]


class _GhostBatchNorm(GhostNoiseMixin, nn.modules.batchnorm._BatchNorm):
    """Forward of the BatchNorm family: GNI and analytic after BN; GBN and XBN with ghost statistics."""

    def _running_factor(self) -> float:
        # mirrors torch.nn.modules.batchnorm._BatchNorm.forward
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        return factor

    def forward(self, x: Tensor) -> Tensor:
        if not self._noise_active():
            return super().forward(x)
        self._check_input_dim(x)
        check_floating(x)
        if x.numel() == x.shape[1]:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)} "
                "(as torch.nn.BatchNorm: one value carries no variance)."
            )
        factor = self._running_factor()
        settings: Dict[str, Any] = dict(
            running_mean=self.running_mean,
            running_var=self.running_var,
            weight=self.weight,
            bias=self.bias,
            momentum=factor,
            eps=self.eps,
            strength=getattr(self, _STRENGTH_BUFFER),
            shift_noise=self.shift_noise,
            scale_noise=self.scale_noise,
            fused=None if self.fused else False,
        )
        world = self._sync_world()
        if self.method in ("gbn", "xbn"):
            if world:
                raise RuntimeError(
                    f"sync=True supports the methods 'gni' and 'analytic'; {self.method!r} forms its ghost batches "
                    "inside each process's batch. Use sync=False (identical when the per-process batch is a "
                    "multiple of ghost_batch_size)."
                )
            if self.method == "gbn":
                return backends.ghost_batch_norm(
                    x, self._ghost_batch_size, **settings, running_stats=self.running_stats
                )
            return backends.exclusive_batch_norm(x, self._ghost_batch_size, **settings)
        if world:
            settings["stats_fn"] = self._global_statistics(x.numel() // x.shape[1] * world[1], settings["running_mean"])
            return backends.ghost_noise_batch_norm(x, self._draw_noise, **settings)
        # draws made up front: the fused CUDA kernels compute the noise from them in-kernel
        return backends.ghost_noise_batch_norm(x, self._draws(x.shape[0], x.shape[1], x.device), **settings)

    def _global_statistics(
        self, count: int, running_mean: Optional[Tensor]
    ) -> Callable[[Tensor, Tensor], Tuple[Tensor, Tensor, int]]:
        """``stats_fn`` for ``sync=True``: the global batch's moments (``count`` values per channel)."""
        group = self.process_group

        def stats(mean: Tensor, var: Tensor) -> Tuple[Tensor, Tensor, int]:
            return (*global_batch_moments(mean, var, running_mean, group), count)

        return stats


class GhostBatchNorm1d(_GhostBatchNorm, nn.BatchNorm1d):
    """:class:`torch.nn.BatchNorm1d` with ghost noise, for ``(B, C)`` and ``(B, C, L)`` inputs."""

    _base = nn.BatchNorm1d


class GhostBatchNorm2d(_GhostBatchNorm, nn.BatchNorm2d):
    """:class:`torch.nn.BatchNorm2d` with ghost noise, for ``(B, C, H, W)`` inputs (any memory format)."""

    _base = nn.BatchNorm2d


class GhostBatchNorm3d(_GhostBatchNorm, nn.BatchNorm3d):
    """:class:`torch.nn.BatchNorm3d` with ghost noise, for ``(B, C, D, H, W)`` inputs."""

    _base = nn.BatchNorm3d
