"""GhostNoiseMonitor: logs the live layers' noise through the Trainer's loggers, merged across processes."""

import csv
import math
import warnings
from pathlib import Path
from typing import Any, Dict, List

import lightning.pytorch as pl
import pytest
import torch
from helpers import reference as ref  # noqa: E402
from helpers.processes import run_worker
from lightning.pytorch.loggers import CSVLogger, Logger
from torch import nn

from lightning_ghostnoise import GhostNoise, GhostNoiseMonitor  # noqa: E402
from lightning_ghostnoise.analysis import noise_stats as NS  # noqa: E402
from lightning_ghostnoise.callbacks.monitor import STATISTICS, NoiseStatistics  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "helpers" / "monitor_ddp_worker.py"


class Net(pl.LightningModule):
    """BatchNorm first (on the raw input, which it records in training), then a conv head."""

    def __init__(self, channels: int = 3, spatial: bool = True) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels) if spatial else nn.BatchNorm1d(channels)
        self.head = nn.Linear(channels, 3)
        self.inputs: List[torch.Tensor] = []

    def forward(self, x):
        if self.training:
            self.inputs.append(x.detach().clone())
        h = torch.relu(self.bn(x))
        return self.head(h.mean((2, 3)) if h.dim() == 4 else h)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader(shape, n_batches: int, batch: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_batches * batch, *shape, generator=g) * 2 + 0.5
    y = torch.randint(0, 3, (n_batches * batch,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch, shuffle=False)


def _trainer(tmp_path, callbacks, steps: int, logger: Any = None) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        logger=logger if logger is not None else CSVLogger(str(tmp_path), name="logs", version=0),
        log_every_n_steps=1,
    )


def _rows(path: Path) -> Dict[int, Dict[str, float]]:
    out: Dict[int, Dict[str, float]] = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            values = {  # the monitor's ghostnoise/<layer>/<statistic> (GhostNoise logs ghostnoise/strength, ...)
                k: float(v)
                for k, v in row.items()
                if v not in ("", None) and k.startswith("ghostnoise/") and k.count("/") == 2
            }
            if values:
                out.setdefault(int(row["step"]), {}).update(values)
    return out


def _stats(shift: torch.Tensor, scale: torch.Tensor) -> Dict[str, float]:
    shift, scale = shift.reshape(-1).double(), scale.reshape(-1).double()
    log_scale = scale.log()
    return {
        "shift_mean": float(shift.mean()),
        "shift_std": float(shift.std(unbiased=False)),
        "scale_mean": float(scale.mean()),
        "scale_std": float(scale.std(unbiased=False)),
        "log_scale_mean": float(log_scale.mean()),
        "log_scale_std": float(log_scale.std(unbiased=False)),
    }


def _assert_stats(logged: Dict[str, float], expected: Dict[str, float], layer: str = "bn") -> None:
    for stat in STATISTICS:
        assert logged[f"ghostnoise/{layer}/{stat}"] == pytest.approx(expected[stat], rel=1e-4, abs=1e-6), stat


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def test_monitor_writes_exact_gbn_statistics_to_csv(tmp_path):
    model = Net()
    trainer = _trainer(tmp_path, [GhostNoise(ghost_batch_size=4, method="gbn"), GhostNoiseMonitor(every_n_steps=2)], 5)
    trainer.fit(model, _loader((3, 4, 4), 5))
    rows = _rows(tmp_path / "logs" / "version_0" / "metrics.csv")
    assert sorted(rows) == [0, 2, 4]
    for step in (0, 2, 4):
        assert len(rows[step]) == len(STATISTICS)
        shift, scale = ref.ghost_statistics_noise(model.inputs[step], 4, False, model.bn.eps)
        _assert_stats(rows[step], _stats(shift, scale))


def test_monitor_logs_what_the_layer_injects_at_its_strength(tmp_path):
    """GNI at strength 0.5 on one Gaussian value per sample: shift std 0.5 / sqrt(N), scale**0.5."""
    n = 8
    model = Net(channels=16, spatial=False)
    cb = [GhostNoise(ghost_batch_size=n, strength=0.5, seed=3), GhostNoiseMonitor(every_n_steps=1)]
    trainer = _trainer(tmp_path, cb, 3)
    trainer.fit(model, _loader((16,), 3, batch=128, seed=1))
    rows = _rows(tmp_path / "logs" / "version_0" / "metrics.csv")
    assert sorted(rows) == [0, 1, 2]
    for values in rows.values():
        assert values["ghostnoise/bn/shift_std"] == pytest.approx(0.5 / math.sqrt(n), rel=0.1)
        # log(scale**0.5) = 0.5 log(scale): half the law's std of log(scale) at N = 8, sqrt(trigamma(3.5)) / 2
        assert values["ghostnoise/bn/log_scale_std"] == pytest.approx(
            0.5 * float(NS.law_moments(n)["log_scale_std"]), rel=0.1
        )
        assert abs(values["ghostnoise/bn/shift_mean"]) < 0.02


class _Probe(pl.Callback):
    """Placed after the monitor: records, at each batch start, whether the ghost layer is being watched."""

    def __init__(self) -> None:
        self.watched: List[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        bn = pl_module.bn
        self.watched.append(bool(bn._forward_hooks) or "noise_observer" in bn.__dict__)


@pytest.mark.parametrize("every", [3, 0])
def test_monitor_does_nothing_between_logging_steps(tmp_path, every):
    probe = _Probe()
    model = Net()
    trainer = _trainer(tmp_path, [GhostNoise(ghost_batch_size=4), GhostNoiseMonitor(every_n_steps=every), probe], 7)
    trainer.fit(model, _loader((3, 4, 4), 7))
    expected = [every > 0 and step % every == 0 for step in range(7)]
    assert probe.watched == expected
    assert not model.bn._forward_hooks and "noise_observer" not in model.bn.__dict__
    rows = _rows(tmp_path / "logs" / "version_0" / "metrics.csv") if every else {}
    assert sorted(rows) == [s for s in range(7) if expected[s]]


class _Experiment:
    def __init__(self) -> None:
        self.histograms: List[Dict[str, Any]] = []

    def add_histogram_raw(self, tag, **kwargs):
        self.histograms.append({"tag": tag, **kwargs})


class _HistogramLogger(Logger):
    """A logger whose experiment takes raw histograms, as TensorBoard's SummaryWriter does."""

    def __init__(self) -> None:
        super().__init__()
        self._experiment = _Experiment()
        self.metrics: List[Dict[str, float]] = []

    @property
    def name(self):
        return "histograms"

    @property
    def version(self):
        return 0

    @property
    def experiment(self):
        return self._experiment

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.metrics.append(dict(metrics, step=step))


def test_histograms_go_to_loggers_that_take_them(tmp_path):
    logger = _HistogramLogger()
    monitor = GhostNoiseMonitor(every_n_steps=2, bins=20, histogram_range=2.0)
    trainer = _trainer(tmp_path, [GhostNoise(ghost_batch_size=4), monitor], 3, logger=logger)
    trainer.fit(Net(), _loader((3, 4, 4), 3))
    hist = logger.experiment.histograms
    assert [(h["tag"], h["global_step"]) for h in hist] == [
        ("ghostnoise/bn/shift", 0),
        ("ghostnoise/bn/log_scale", 0),
        ("ghostnoise/bn/shift", 2),
        ("ghostnoise/bn/log_scale", 2),
    ]
    for h in hist:
        assert sum(h["bucket_counts"]) == h["num"] == 16 * 3
        assert len(h["bucket_limits"]) == 20 and h["bucket_limits"][-1] == pytest.approx(2.0)
        assert h["min"] <= h["max"]
    scalars = [m for m in logger.metrics if "ghostnoise/bn/shift_std" in m]
    assert [m["step"] for m in scalars] == [0, 2]


def _merge(a: NoiseStatistics, b: NoiseStatistics) -> None:
    """``b``'s states into ``a``: torchmetrics' ``merge_state`` (>= 1.6), before it the metric's own sync as
    under DDP, with ``b`` standing in for a second process."""
    if hasattr(a, "merge_state"):
        a.merge_state(b)
        return
    states = ("count", "sums", "shift_hist", "log_scale_hist", "minima", "maxima")
    other = {id(getattr(a, state)): getattr(b, state) for state in states}
    a.sync(dist_sync_fn=lambda t, group=None: [t, other[id(t)]], distributed_available=lambda: True)
    merged = {state: getattr(a, state).clone() for state in states}
    a.unsync()
    for state, value in merged.items():
        setattr(a, state, value)


def test_noise_statistics_states_merge_like_one_metric():
    """The states reduce by sum/min/max: two halves merged give the statistics of the whole."""
    g = torch.Generator().manual_seed(0)
    shift, scale = torch.randn(2, 40, 5, generator=g) * 0.3, torch.rand(2, 40, 5, generator=g) + 0.5
    whole, a, b = NoiseStatistics(2, bins=10), NoiseStatistics(2, bins=10), NoiseStatistics(2, bins=10)
    for i in range(2):
        whole.update(i, shift[i], scale[i])
        a.update(i, shift[i, :25], scale[i, :25])
        b.update(i, shift[i, 25:], scale[i, 25:])
    _merge(a, b)
    for k, v in whole.compute().items():
        torch.testing.assert_close(a.compute()[k], v)
    for state in ("count", "sums", "shift_hist", "log_scale_hist", "minima", "maxima"):
        torch.testing.assert_close(getattr(a, state), getattr(whole, state))
    expected = _stats(shift[1], scale[1])
    for k, v in whole.compute().items():
        assert float(v[1]) == pytest.approx(expected[k], rel=1e-9, abs=1e-12)


@pytest.mark.ddp
def test_ddp_two_processes_log_the_merged_statistics(tmp_path):
    """2-process gloo DDP: rank 0 logs the statistics of both ranks' noise, not its own."""
    run_worker(WORKER.name, tmp_path, 2)
    inputs = [torch.load(tmp_path / f"rank{r}.pt")["bn_in"] for r in range(2)]
    noise = [ref.ghost_statistics_noise(x, 4, False, 1e-5) for x in inputs]
    merged = _stats(torch.cat([noise[0][0], noise[1][0]]), torch.cat([noise[0][1], noise[1][1]]))
    own = _stats(*noise[0])
    rows = _rows(tmp_path / "logs" / "version_0" / "metrics.csv")
    assert sorted(rows) == [0]
    _assert_stats(rows[0], merged)
    assert abs(merged["shift_std"] - own["shift_std"]) > 0.1 * own["shift_std"]  # merging matters here


def test_arguments_are_checked_and_readable_by_lightning_cli():
    with pytest.raises(ValueError, match="every_n_steps"):
        GhostNoiseMonitor(every_n_steps=-1)
    with pytest.raises(TypeError, match="list of name patterns"):
        GhostNoiseMonitor(include_names="blocks.*")
    with pytest.raises(ValueError, match="histogram_range"):
        GhostNoiseMonitor(histogram_range=0)
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser()
    parser.add_class_arguments(GhostNoiseMonitor, "monitor")
    cfg = parser.parse_args(["--monitor.every_n_steps", "10", "--monitor.include_names", '["blocks.*"]'])
    monitor = GhostNoiseMonitor(**cfg.monitor.as_dict())
    assert monitor.every_n_steps == 10 and monitor.include_names == ["blocks.*"]
