"""Launching Triton kernels with less host time: the compiled kernel's own launcher, once cached.

Triton's ``kernel[grid](...)`` binds and specializes every argument and looks the compiled kernel up
on every call; in eager mode, where a small model's step is bound by the host, that is a visible
part of a layer's cost (docs/performance.md, "Cached launch"). :func:`launch` goes through Triton
once per specialization and then hands the arguments straight to the compiled kernel's launcher.

This relies on internals: ``triton.knobs`` (launch hooks), the compiled kernel's ``run``,
``function`` and ``packed_metadata``, and ``torch._C._cuda_getDevice`` /
``_cuda_getCurrentRawStream``. Any of them missing, launch hooks installed (profilers),
:func:`lightning_ghostnoise.config.enable_fast_launch` ``(False)`` or the interpreter: Triton's own
path. ``tests/backends`` check the internals on every installed version, ``tests/gpu`` the bits.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import triton
from torch import Tensor

from lightning_ghostnoise import config

__all__ = ["clear", "internals_present", "launch"]

_KNOBS = getattr(triton, "knobs", None)
_GET_DEVICE: Callable[[], int] | None = getattr(torch._C, "_cuda_getDevice", None)
_GET_STREAM: Callable[[int], int] | None = getattr(torch._C, "_cuda_getCurrentRawStream", None)
_CACHE_SIZE = 256  # specializations kept per kernel


def internals_present() -> bool:
    """Whether the internals the cached launch uses are there (else it always takes Triton's path)."""
    runtime = getattr(_KNOBS, "runtime", None)
    hooks = runtime is not None and hasattr(runtime, "launch_enter_hook") and hasattr(runtime, "launch_exit_hook")
    return hooks and _GET_DEVICE is not None and _GET_STREAM is not None


def _key(device: int, args: tuple[object, ...], meta: dict) -> tuple[object, ...]:
    """A cache key that determines Triton's specialization of a launch (and more: exact integers).

    Triton specializes on each tensor's dtype and 16-byte alignment, each integer's value being 1,
    divisible by 16 or beyond int32, the other arguments' types and the constexprs. The key holds
    the tensors' dtypes and addresses modulo 16, the integers themselves, the other arguments' types
    and the constexprs by name: equal keys imply equal specializations.
    """
    key: list = [device]
    for arg in args:
        if type(arg) is int:
            key.append(arg)
        elif isinstance(arg, Tensor):
            key.append(arg.dtype)
            key.append(arg.data_ptr() % 16)
        else:
            key.append(type(arg))
    key.extend(meta.items())
    return tuple(key)


def _current_device() -> int:
    """The current CUDA device (the one Triton launches on), ``-1`` before CUDA is initialized."""
    return _GET_DEVICE() if _GET_DEVICE is not None and torch.cuda.is_initialized() else -1


def _current_stream(device: int) -> int:
    assert _GET_STREAM is not None
    return _GET_STREAM(device)


def _hook_active(hook: object) -> bool:
    # Triton >= 3.5 keeps a (usually empty) HookChain here; earlier ones a function or None
    return hook is not None and bool(getattr(hook, "calls", True))


def _launch_hook_set() -> bool:
    """Whether a launch hook is installed (or this Triton has no ``knobs``: Triton's path). Without the
    torch internals :func:`_current_device` reads -1, which also keeps Triton's path."""
    runtime = getattr(_KNOBS, "runtime", None)
    if runtime is None:
        return True
    return _hook_active(runtime.launch_enter_hook) or _hook_active(runtime.launch_exit_hook)


class _Launcher:
    """``fn[grid](*args, **constexprs)``, later calls of a seen specialization through its launcher.

    The first call for a key (the current device and :func:`_key`) goes through Triton and keeps
    the compiled kernel it returns; later calls with the same key hand the arguments straight to
    that kernel's launcher, as Triton's own launch does after its lookup. At most ``_CACHE_SIZE``
    keys are kept per kernel (the keys hold exact integers).
    """

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.cache: dict[tuple[object, ...], Any] = {}

    def __call__(self, grid: tuple[int, ...], args: tuple[object, ...], meta: dict) -> None:
        if not config.settings().fast_launch or _launch_hook_set():
            self.fn[grid](*args, **meta)
            return
        device = _current_device()
        key = _key(device, args, meta)
        hit = self.cache.get(key)
        if hit is None:
            if len(self.cache) >= _CACHE_SIZE:
                self.cache.clear()
            compiled = self.fn[grid](*args, **meta)
            if hasattr(compiled, "result"):  # an asynchronous compile
                compiled = compiled.result()
            names = list(getattr(self.fn, "arg_names", ()))
            rest = names[len(args) :]
            if device >= 0 and hasattr(compiled, "packed_metadata") and sorted(rest) == sorted(meta):
                self.cache[key] = (compiled, tuple(meta[n] for n in rest))
            else:  # the interpreter (or an unexpected signature): Triton's path from now on
                self.cache[key] = False
            return
        if hit is False:
            self.fn[grid](*args, **meta)
            return
        compiled, constexprs = hit
        dims = tuple(grid) + (1, 1)
        compiled.run(
            dims[0], dims[1], dims[2], _current_stream(device), compiled.function, compiled.packed_metadata,
            None, None, None, *args, *constexprs,
        )  # fmt: skip


_LAUNCHERS: dict[int, _Launcher] = {}


def launch(fn: Any, grid: tuple[int, ...], *args: object, **meta: object) -> None:
    """Launch the Triton kernel ``fn`` on ``grid``: ``fn[grid](*args, **meta)`` (see :class:`_Launcher`)."""
    launcher = _LAUNCHERS.get(id(fn))
    if launcher is None or launcher.fn is not fn:
        launcher = _LAUNCHERS[id(fn)] = _Launcher(fn)
    launcher(grid, args, meta)


def clear() -> None:
    """Forget every cached compiled kernel (they refill on the next launches)."""
    _LAUNCHERS.clear()
