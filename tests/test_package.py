"""The top-level package: its public names, and what importing it costs (no Lightning for the layers)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import lightning_ghostnoise

#: Where the imported package lies (the source tree, or site-packages for an installed wheel): the
#: fresh interpreters below import the same package as this test.
PACKAGE_PARENT = Path(lightning_ghostnoise.__file__).resolve().parents[1]

PUBLIC = (
    "METHODS",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "GhostGroupNorm",
    "GhostLayerNorm",
    "GhostNoise",
    "GhostNoiseMixin",
    "GhostNoiseMonitor",
    "analyze_noise",
    "apply_ghost_noise",
    "find_norm_layers",
    "ghost_layers",
    "revert_ghost_noise",
    "set_ghost_batch_size",
    "set_strength",
)


def _python(code: str) -> str:
    """Run ``code`` in a fresh interpreter (nothing imported yet) and return its stdout."""
    env = dict(os.environ, PYTHONPATH=str(PACKAGE_PARENT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout.strip()


def test_every_public_name_is_exported_and_resolves() -> None:
    assert set(PUBLIC) <= set(lightning_ghostnoise.__all__)
    for name in lightning_ghostnoise.__all__:
        assert getattr(lightning_ghostnoise, name) is not None, name
    assert set(lightning_ghostnoise.__all__) <= set(dir(lightning_ghostnoise))


def test_lazy_names_are_the_classes_of_their_modules() -> None:
    from lightning_ghostnoise.analysis import analyze_noise
    from lightning_ghostnoise.callbacks.ghost_noise import GhostNoise
    from lightning_ghostnoise.callbacks.monitor import GhostNoiseMonitor

    assert lightning_ghostnoise.GhostNoise is GhostNoise
    assert lightning_ghostnoise.GhostNoiseMonitor is GhostNoiseMonitor
    assert lightning_ghostnoise.analyze_noise is analyze_noise


def test_unknown_attribute_is_an_attribute_error() -> None:
    try:
        lightning_ghostnoise.no_such_name  # noqa: B018
    except AttributeError as err:
        assert "no_such_name" in str(err)
    else:
        raise AssertionError("expected an AttributeError")


def test_the_layers_work_without_importing_lightning() -> None:
    """``apply_ghost_noise`` and a training step with torch alone; warnings reach the user all the same."""
    out = _python(
        "import sys, warnings, torch\n"
        "from lightning_ghostnoise import apply_ghost_noise, set_strength\n"
        "model = apply_ghost_noise(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)), 4)\n"
        "model(torch.randn(8, 4)).sum().backward()\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    apply_ghost_noise(torch.nn.Linear(2, 2))\n"
        "    set_strength(model, 1.5)\n"
        "print(sorted(m for m in ('lightning', 'lightning.pytorch', 'lightning.fabric') if m in sys.modules))\n"
        "print(['no effect' in str(w.message) for w in caught], ['extrapolates' in str(w.message) for w in caught])\n"
    )
    assert out.splitlines() == ["[]", "[True, False] [False, True]"]


@pytest.mark.slow
def test_import_of_the_package_does_not_import_lightning_until_a_callback_is_used() -> None:
    out = _python(
        "import sys\n"
        "import lightning_ghostnoise\n"
        "print('lightning' in sys.modules)\n"
        "lightning_ghostnoise.GhostNoise\n"
        "print('lightning' in sys.modules)\n"
    )
    assert out.splitlines() == ["False", "True"]
