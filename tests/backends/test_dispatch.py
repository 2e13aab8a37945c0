"""Tests for lightning_ghostnoise.config and the one dispatch function, backends.dispatch.select."""

from __future__ import annotations

import pytest
import torch

from lightning_ghostnoise import config
from lightning_ghostnoise.backends import dispatch


def _facts(**changes):
    facts = {
        "fused": None, "grad_enabled": True, "compiling": False, "closed_form": True, "kernels_apply": True, "backend": "auto",
        "compiled_kernels": False, "triton_installed": True, "device": "cuda", "interpreter": False, "dtype": torch.float32,
        "dim": 4, "empty": False, "channel_dim": 1, "dense": True,
    }  # fmt: skip
    facts.update(changes)
    return facts


@pytest.mark.parametrize(
    "changes,backend,reason",
    [
        ({}, "triton", "cuda tensor"),
        ({"fused": False}, "autograd", "fused=False"),
        ({"grad_enabled": False}, "autograd", "no gradient"),
        ({"compiling": True, "closed_form": False}, "autograd", "torch.compile"),
        ({"kernels_apply": False}, "torch", "no Triton kernel"),
        ({"backend": "torch"}, "torch", "backend 'torch'"),
        ({"device": "cpu"}, "torch", "CPU tensor"),
        ({"device": "cpu", "backend": "triton"}, "torch", "CPU tensor"),
        ({"device": "cpu", "backend": "triton", "interpreter": True}, "triton", "cpu tensor"),
        ({"dtype": torch.float64}, "torch", "float64"),
        ({"channel_dim": -1, "dim": 3}, "torch", "(B, C, *spatial)"),
        ({"empty": True}, "torch", "non-empty"),
        ({"triton_installed": False}, "torch", "not installed"),
        ({"dense": False}, "torch", "channels-last"),
        ({"compiling": True}, "torch", "enable_compiled_kernels"),
        ({"compiling": True, "compiled_kernels": True}, "triton-ops", "compiled kernels"),
        ({"fused": True, "grad_enabled": False}, "triton", "cuda tensor"),
    ],
)
def test_decide_names_the_backend_and_why(changes, backend, reason):
    choice = dispatch.decide(**_facts(**changes))
    assert choice.backend == backend and reason in choice.reason, choice


def test_select_reads_the_tensor_and_the_config():
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    with torch.enable_grad():
        assert dispatch.select(x).backend == "torch"  # a CPU tensor
        with config.use_backend("torch"):
            assert dispatch.select(x).reason.startswith("backend 'torch'")
        assert dispatch.select(x, fused=False).backend == "autograd"
    with torch.no_grad():
        assert dispatch.select(x).backend == "autograd"


def test_set_backend_and_use_backend_restore_state():
    assert config.get_backend() == "auto"
    with config.use_backend("torch"):
        assert config.get_backend() == "torch"
        with pytest.raises(ValueError, match="backend must be one of"):
            with config.use_backend("cuda"):
                pass
        assert config.get_backend() == "torch"
    assert config.get_backend() == "auto"
    config.set_backend("TORCH")
    try:
        assert config.get_backend() == "torch"
    finally:
        config.set_backend("auto")


@pytest.mark.parametrize("bad", ["gpu", "", None, 1])
def test_bad_backend_raises_a_clear_error(bad):
    with pytest.raises(ValueError, match="'auto', 'torch', 'triton'"):
        config.set_backend(bad)


def test_override_restores_every_setting_and_rejects_unknown_ones():
    before = config.Settings(**vars(config.settings()))
    with config.override(split_batch=4, fast_launch=False) as s:
        assert s.split_batch == 4 and not s.fast_launch
    assert config.settings() == before
    with pytest.raises(ValueError, match="unknown settings"):
        with config.override(allow_cpu=True):
            pass


@pytest.mark.slow
def test_import_does_not_import_triton_or_register_ops():
    import subprocess
    import sys

    code = (
        "import sys, lightning_ghostnoise, lightning_ghostnoise.functional, lightning_ghostnoise.backends\n"
        "from lightning_ghostnoise import apply_ghost_noise\n"
        "import torch\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
        "assert not hasattr(torch.ops.ghostnoise, 'gni_coefficients'), 'custom ops registered'\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "GHOSTNOISE_COMPILED_KERNELS"}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr


def test_clear_caches_empties_the_process_caches():
    from lightning_ghostnoise.functional import batch_norm

    batch_norm.cached_ghost_matrix(8, 4, False, torch.device("cpu"), torch.float32)
    assert batch_norm.cached_ghost_matrix.cache_info().currsize > 0
    config.clear_caches()
    assert batch_norm.cached_ghost_matrix.cache_info().currsize == 0


def test_private_torch_api_in_use_is_still_there():
    """The package uses a few private PyTorch functions, each with a public fallback; this fails loudly
    (rather than the package getting silently slower or drawing another stream) when one goes away."""
    from lightning_ghostnoise.functional import running_stats, sampling

    assert sampling._STANDARD_GAMMA is torch._standard_gamma  # the Gamma draws of analytic GNI (stream)
    assert running_stats._FOREACH_LERP is torch._foreach_lerp_  # one kernel for both running buffers
    g = torch.Generator().manual_seed(0)
    assert torch._standard_gamma(torch.full((3,), 2.0), generator=g).shape == (3,)


def test_gamma_fallback_has_the_law():
    from lightning_ghostnoise.functional import sampling

    g = torch.Generator().manual_seed(0)
    k = 7  # N = 8: Gamma(3.5, 1), mean 3.5, variance 3.5
    draws = sampling._gamma_from_uniforms(k, (20000, 2), g, torch.device("cpu"))
    assert abs(draws.mean().item() - 3.5) < 0.05 and abs(draws.var().item() - 3.5) < 0.15


def test_triton_launcher_internals_present_where_cuda_is():
    triton = pytest.importorskip("triton")
    from lightning_ghostnoise.backends.triton import launcher

    if tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 4):  # launch hooks came with Triton 3.4
        assert not launcher.internals_present() and launcher._launch_hook_set()  # always Triton's own launch
        return
    assert hasattr(triton, "knobs") and hasattr(triton.knobs.runtime, "launch_enter_hook")
    if torch.cuda.is_available():  # CUDA builds: the raw device and stream getters of the cached launch
        assert launcher.internals_present()
