"""``ghostnoise compare`` as a study: validation split, N selected on validation only, paired statistics
against scipy, method variants end to end, optimizer flags, and ``--resume`` over a damaged run file."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch
from helpers.fake_data import write_fake_fashion
from scipy import stats

from lightning_ghostnoise.experiments.compare import main as compare_main
from lightning_ghostnoise.experiments.compare import method_specs, parse_args
from lightning_ghostnoise.experiments.compare_stats import (
    paired_difference,
    select_on_validation,
    summarize,
)
from lightning_ghostnoise.experiments.data import FashionMNISTDataModule
from lightning_ghostnoise.experiments.lr_schedule import WarmupCosine
from lightning_ghostnoise.experiments.models import Classifier

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning:lightning.pytorch.utilities._pytree"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
]
TINY = ["--epochs", "1", "--width", "4", "--batch-size", "32", "--progress-bar", "off", "--no-plot"]


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch: pytest.MonkeyPatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setattr("sys.argv", ["ghostnoise"])
    yield
    torch.set_num_threads(threads)


def _fashion(folder: Path, test_noise: int = 0) -> Path:
    """A Fashion-MNIST folder in the idx.gz format: 300 training, 60 test images with learnable labels;
    ``test_noise`` seeds a perturbation of the test images only."""
    return write_fake_fashion(folder, n_train=300, n_test=60, test_noise=test_noise)


def _run(argv: List[str]) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compare_main(argv)


# --------------------------------------------------------------------------- the validation split
def test_validation_split_is_disjoint_and_the_same_for_every_seed(tmp_path: Path) -> None:
    folder = _fashion(tmp_path / "f")
    splits = []
    for seed in (0, 1, 2):
        dm = FashionMNISTDataModule(str(folder), train_subset=100, val_size=50, split_seed=7, seed=seed, fallback=False)
        dm.setup()
        assert dm.val_indices is not None and dm.train_indices is not None
        assert len(dm.val_indices) == 50 and len(dm.train_indices) == 100
        assert not set(dm.val_indices) & set(dm.train_indices)
        assert np.bincount(dm.class_counts("val") > 0).tolist() == [0, 10]  # every class validated
        splits.append((dm.val_indices.tolist(), dm.train_indices.tolist()))
    assert splits[0][0] == splits[1][0] == splits[2][0]  # the same validation images whatever the seed
    assert splits[0][1] != splits[1][1]  # the training subset is the seed's own
    other = FashionMNISTDataModule(str(folder), val_size=50, split_seed=8, fallback=False)
    other.setup()
    assert other.val_indices.tolist() != splits[0][0]


def test_validation_split_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not both"):
        FashionMNISTDataModule(val_size=10, val_fraction=0.1)
    with pytest.raises(ValueError, match="val_size must be a positive integer"):
        FashionMNISTDataModule(val_size=0)
    dm = FashionMNISTDataModule(str(_fashion(tmp_path / "f")), val_size=300, fallback=False)
    with pytest.raises(ValueError, match="leaves no training images"):
        dm.setup()


# --------------------------------------------------------------------------- statistics
def test_paired_difference_matches_scipy() -> None:
    base = [0.801, 0.812, 0.795, 0.808, 0.799]
    other = [0.806, 0.815, 0.801, 0.807, 0.809]
    runs = [{"label": "BN", "seed": s, "test_acc": a} for s, a in enumerate(base)]
    runs += [{"label": "GNI(16)", "seed": s, "test_acc": a} for s, a in enumerate(other)]
    runs.append({"label": "GNI(16)", "seed": 9, "test_acc": 0.5})  # unpaired seed: left out
    d = paired_difference(runs, "GNI(16)", "BN")
    assert d is not None and d["n"] == 5 and d["seeds"] == [0, 1, 2, 3, 4]
    diffs = np.array(other) - np.array(base)
    assert d["mean"] == pytest.approx(diffs.mean())
    assert d["p"] == pytest.approx(stats.ttest_rel(other, base).pvalue)
    ci = stats.t.interval(0.95, 4, loc=diffs.mean(), scale=stats.sem(diffs))
    assert d["ci"] == pytest.approx(list(ci))
    assert d["wins"] == 4
    # known numbers: differences 1, 2, 3 -> mean 2, sd 1, t = 2 sqrt(3), p = 0.0742
    known = [{"label": lab, "seed": s, "test_acc": v} for s in range(3) for lab, v in (("a", 0.0), ("b", s + 1.0))]
    assert paired_difference(known, "b", "a")["p"] == pytest.approx(0.07417990, rel=1e-5)
    single = paired_difference(runs[:1] + runs[5:6], "GNI(16)", "BN")
    assert single["ci"] is None and single["p"] is None and single["n"] == 1
    assert paired_difference(runs, "GNI(16)", "LN") is None


def test_selection_reads_validation_only() -> None:
    def row(label: str, method: str, val: float, test: float) -> dict:
        return {"label": label, "method": method, "variant": None, "val_acc_mean": val, "test_acc_mean": test}

    rows = [
        row("BN", "plain", 0.9, 0.9),
        row("GNI(8)", "gni", 0.91, 0.99),
        row("GNI(16)", "gni", 0.93, 0.80),
        row("GBN(8)", "gbn", 0.92, 0.5),
        row("GBN(16)", "gbn", 0.92, 0.99),
    ]
    assert select_on_validation(rows) == {("gni", None): "GNI(16)", ("gbn", None): "GBN(8)"}  # ties: the first
    for r in rows:
        r["test_acc_mean"] = 1.0 - r["test_acc_mean"]
    assert select_on_validation(rows) == {("gni", None): "GNI(16)", ("gbn", None): "GBN(8)"}
    with pytest.raises(ValueError, match="--val-size"):
        select_on_validation([{"label": "GNI(8)", "method": "gni"}])


def test_summarize_keeps_validation_and_test_loss() -> None:
    runs = [
        {
            "label": "BN",
            "method": "plain",
            "ghost_batch_size": None,
            "seed": s,
            "val_acc": v,
            "val_loss": 0.1,
            "test_acc": 0.8,
            "test_loss": 0.5 + s,
            "train_acc": 1.0,
            "gap": 0.2,
            "train_seconds_per_epoch": 1.0,
            "eval_seconds": 1.0,
        }
        for s, v in enumerate((0.7, 0.9))
    ]
    row = summarize(runs, ["BN", "missing"])[0]
    assert row["val_acc_mean"] == pytest.approx(0.8) and row["test_loss_mean"] == pytest.approx(1.0)


# --------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_sweep_selects_on_validation_and_never_on_test(tmp_path: Path, capsys) -> None:
    argv = TINY + [
        "--seeds",
        "2",
        "--val-size",
        "60",
        "--subset",
        "200",
        "--methods",
        "plain",
        "gni",
        "--ghost-batch-size",
        "2",
        "8",
        "--eval-every",
        "1",
    ]
    outs = []
    for name, noise in (("clean", 0), ("noisy", 5)):
        folder = _fashion(tmp_path / name, test_noise=noise)
        out_dir = tmp_path / f"out-{name}"
        assert _run(argv + ["--data-dir", str(folder), "--out-dir", str(out_dir)]) == 0
        outs.append(json.loads((out_dir / "results.json").read_text()))
    clean, noisy = outs
    # other test images change the test numbers, not the validation numbers, nor the choice
    assert [r["test_loss"] for r in clean["runs"]] != [r["test_loss"] for r in noisy["runs"]]
    assert [(r["val_acc"], r["val_loss"]) for r in clean["runs"]] == [
        (r["val_acc"], r["val_loss"]) for r in noisy["runs"]
    ]
    assert clean["selection"] == noisy["selection"] and len(clean["selection"]) == 1
    chosen = next(iter(clean["selection"].values()))
    gni_rows = [r for r in clean["summary"] if r["method"] == "gni"]
    assert chosen == max(gni_rows, key=lambda r: r["val_acc_mean"])["label"]
    table_rows = [line.split("|")[1].strip() for line in clean["table"].splitlines()[2:]]
    assert table_rows == ["BN", chosen]  # only the selected N is reported
    assert len(clean["summary"]) == 3  # every N stays in the JSON
    for row in clean["summary"]:
        if row["method"] != "plain":
            assert row["paired"]["n"] == 2 and row["paired"]["baseline"] == "BN"
    for run in clean["runs"]:
        assert run["n_val"] == 60 and run["n_train"] == 200 and run["curves"]["eval_epoch"] == [1]
        assert len(run["curves"]["val_acc"]) == 1 and run["val_acc"] == run["curves"]["val_acc"][-1]
    out = capsys.readouterr().out
    assert "N selected on validation accuracy" in out and "val acc" in out


def test_variants_and_optimizer_flags_end_to_end(tmp_path: Path) -> None:
    folder = _fashion(tmp_path / "f")
    argv = TINY + [
        "--seeds",
        "1",
        "--subset",
        "100",
        "--data-dir",
        str(folder),
        "--out-dir",
        str(tmp_path / "o"),
        "--methods",
        "plain",
        "gni:shift",
        "analytic:scale",
        "gbn:batch",
        "gbn",
        "--ghost-batch-size",
        "4",
        "--warmup-epochs",
        "0.5",
        "--label-smoothing",
        "0.1",
        "--momentum",
        "0.8",
        "--weight-decay",
        "0",
    ]
    assert _run(argv) == 0
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    labels = [r["label"] for r in results["runs"]]
    assert labels == ["BN", "GNI shift-only(4)", "analytic GNI scale-only(4)", "GBN batch running stats(4)", "GBN(4)"]
    runs = {r["label"]: r for r in results["runs"]}
    # every run starts from the same weights and batches: the variants change the training
    losses = {label: r["curves"]["train_loss"][0] for label, r in runs.items() if label != "GBN(4)"}
    assert len(set(losses.values())) == len(losses)
    # gbn and gbn:batch differ only by the running statistics: same training, other eval numbers
    assert runs["GBN(4)"]["curves"]["train_loss"] == runs["GBN batch running stats(4)"]["curves"]["train_loss"]
    assert runs["GBN(4)"]["test_loss"] != runs["GBN batch running stats(4)"]["test_loss"]


def test_method_variants_parse() -> None:
    specs = method_specs("resnet8_ln", ["plain", "gni:shift", "analytic:SCALE"], [8])
    assert [(s.method, s.variant, s.label, s.key) for s in specs] == [
        ("plain", None, "LN", "plain"),
        ("gni", "shift", "LN+GNI shift-only(8)", "gni-shift8"),
        ("analytic", "scale", "LN+analytic GNI scale-only(8)", "analytic-scale8"),
    ]
    # METHOD@N: that method at that N only (the N a sweep selected), the others at every --ghost-batch-size
    specs = method_specs("resnet8", ["plain", "gni@16", "gbn", "gni@16"], [4, 8])
    assert [s.label for s in specs] == ["BN", "GNI(16)", "GBN(4)", "GBN(8)"]
    args = parse_args(["--methods", "plain", "gni@16", "gbn@8", "--val-size", "10"])
    assert args.select == "none"  # one N per method: nothing to select


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--methods", "gni:both"], "unknown variant"),
        (["--methods", "xbn:shift"], "unknown variant"),
        (["--select", "val"], "--val-size"),
        (["--methods", "plain@4"], "plain has no ghost batch size"),
        (["--methods", "gni@x"], "after @ must be an integer >= 1"),
        (["--methods", "xbn@1"], "ghost batch size >= 2"),
        (["--warmup-epochs", "30"], "--warmup-epochs must be in"),
        (["--label-smoothing", "1"], "--label-smoothing must be in [0, 1)"),
        (["--momentum", "1.5"], "--momentum must be in"),
        (["--val-size", "-2"], "--val-size must be >= 0"),
    ],
)
def test_study_flags_are_validated(argv: List[str], needle: str, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        parse_args(argv)
    assert info.value.code == 2
    assert needle in capsys.readouterr().err


def test_resume_retrains_a_damaged_run_file_and_keeps_the_others(tmp_path: Path, capsys) -> None:
    folder = _fashion(tmp_path / "f")
    out_dir = tmp_path / "o"
    argv = TINY + [
        "--seeds",
        "2",
        "--subset",
        "100",
        "--methods",
        "plain",
        "--data-dir",
        str(folder),
        "--out-dir",
        str(out_dir),
        "--resume",
    ]
    assert _run(argv) == 0
    first = json.loads((out_dir / "results.json").read_text())
    files = sorted((out_dir / "runs").glob("*.json"))
    assert len(files) == 2
    files[0].write_bytes(files[0].read_bytes()[:100])  # an interrupted copy: truncated JSON
    capsys.readouterr()
    assert _run(argv) == 0
    captured = capsys.readouterr()
    assert f"{files[0]} is damaged" in captured.err and "training this run again" in captured.err
    assert captured.out.count("reusing") == 1 and captured.out.count("fitting") == 1
    again = json.loads((out_dir / "results.json").read_text())
    assert [r["test_acc"] for r in again["runs"]] == [r["test_acc"] for r in first["runs"]]  # retrained, same numbers
    json.loads(files[0].read_text())  # whole again
    files[1].write_text(json.dumps({"config": "wrong shape"}))
    assert _run(argv) == 0  # a file of another configuration is retrained silently
    files[1].write_text(
        json.dumps({"config": json.loads(files[0].read_text())["config"] | {"seed": 1}, "result": {"label": "BN"}})
    )
    assert _run(argv) == 0
    assert "is damaged" in capsys.readouterr().err


def test_warmup_then_cosine() -> None:
    f = WarmupCosine(4, 20)
    factors = [f(step) for step in range(21)]
    assert factors[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8]) and factors[4] == pytest.approx(1.0)
    assert factors[20] == pytest.approx(0.0) and all(a >= b for a, b in zip(factors[4:], factors[5:]))
    plain = WarmupCosine(0, 10)
    assert plain(5) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="warmup_epochs"):
        Classifier("small_cnn", warmup_epochs=-1)
    with pytest.raises(ValueError, match="onecycle warms up by itself"):
        Classifier("small_cnn", warmup_epochs=1, scheduler="onecycle")
