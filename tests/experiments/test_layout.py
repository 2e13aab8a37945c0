"""The application stands apart: the plugin never imports ``lightning_ghostnoise.experiments``; the old
import paths of the application (``lightning_ghostnoise.data``, ``.models``, ``.cli``) keep working."""

from __future__ import annotations

import re
import subprocess
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
from helpers.fake_data import write_fake_fashion

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "lightning_ghostnoise"
#: Modules outside experiments/ that may name it: the thin re-exports at the application's old paths.
SHIMS = {"data.py", "models.py", "cli.py"}
_IMPORTS_EXPERIMENTS = re.compile(
    r"^\s*(from\s+lightning_ghostnoise\.experiments\b|import\s+lightning_ghostnoise\.experiments\b"
    r"|from\s+lightning_ghostnoise\s+import\s+[^\n]*\bexperiments\b|from\s+\.+experiments\b)",
    re.MULTILINE,
)


def test_the_plugin_source_never_imports_experiments() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "experiments" or (len(rel.parts) == 1 and rel.name in SHIMS):
            continue
        if _IMPORTS_EXPERIMENTS.search(path.read_text()):
            offenders.append(str(rel))
    assert not offenders, f"the plugin imports lightning_ghostnoise.experiments in {offenders}"


@pytest.mark.slow
def test_importing_the_plugin_loads_no_experiment_module() -> None:
    code = (
        "import sys\n"
        "import lightning_ghostnoise as G\n"
        "from lightning_ghostnoise import GhostNoise, GhostNoiseMonitor, apply_ghost_noise\n"
        "import lightning_ghostnoise.analysis\n"
        "from lightning_ghostnoise.analysis import analyze_noise\n"
        "print(sorted(m for m in sys.modules if m.startswith('lightning_ghostnoise.experiments')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_old_module_paths_are_the_new_ones() -> None:
    import lightning_ghostnoise.cli as old_cli
    import lightning_ghostnoise.data as old_data
    import lightning_ghostnoise.models as old_models
    from lightning_ghostnoise.experiments import cli, data, models

    assert old_models.Classifier is models.Classifier and old_models.build_model is models.build_model
    assert old_data.FashionMNISTDataModule is data.FashionMNISTDataModule
    assert old_data.DEFAULT_DATA_DIR == data.DEFAULT_DATA_DIR
    assert old_cli.main is cli.main  # console scripts installed before the move
    for module in (old_models, old_data, old_cli):
        assert set(module.__all__) <= set(dir(module))


def test_console_script_points_at_the_application() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    assert 'ghostnoise = "lightning_ghostnoise.experiments.cli:main"' in text


@pytest.mark.parametrize(
    "prefix", ["lightning_ghostnoise", "lightning_ghostnoise.experiments"], ids=["old paths", "new paths"]
)
def test_model_and_data_class_paths_work_in_lightning_cli(prefix: str, tmp_path: Path) -> None:
    pytest.importorskip("jsonargparse")
    from lightning.pytorch.cli import LightningCLI

    from lightning_ghostnoise.experiments.data import FashionMNISTDataModule
    from lightning_ghostnoise.experiments.models import Classifier

    folder = write_fake_fashion(tmp_path / "fashion", n_train=40, n_test=20)
    config = tmp_path / "config.yaml"
    config.write_text(
        "model:\n"
        f"  class_path: {prefix}.models.Classifier\n"
        "  init_args:\n"
        "    model: resnet8\n"
        "    model_kwargs: {width: 4}\n"
        "data:\n"
        f"  class_path: {prefix}.data.FashionMNISTDataModule\n"
        "  init_args:\n"
        f"    data_dir: {folder}\n"
        "    batch_size: 8\n"
        "trainer:\n"
        "  logger: false\n"
        "  accelerator: cpu\n"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = LightningCLI(
            pl.LightningModule,
            pl.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=["--config", str(config)],
            run=False,
        )
    assert type(cli.model) is Classifier and type(cli.datamodule) is FashionMNISTDataModule
    assert cli.model.hparams.model == "resnet8" and cli.datamodule.batch_size == 8
