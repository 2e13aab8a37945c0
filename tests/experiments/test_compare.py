"""The ``ghostnoise`` command: ``compare`` end to end on tiny data, its flags and data errors, the
``fit`` subcommand with the bundled YAML configs, and the layer-normalized models it compares."""

from __future__ import annotations

import csv
import gzip
import json
import os
import sys
import warnings
from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch
from helpers.fake_data import write_fake_fashion
from torch import nn

from lightning_ghostnoise import GhostNoise, apply_ghost_noise, ghost_layers
from lightning_ghostnoise.experiments import data as data_module
from lightning_ghostnoise.experiments.cli import build_lightning_cli
from lightning_ghostnoise.experiments.cli import main as cli_main
from lightning_ghostnoise.experiments.compare import main as compare_main
from lightning_ghostnoise.experiments.compare import method_specs, parse_args
from lightning_ghostnoise.experiments.compare_stats import format_table, summarize
from lightning_ghostnoise.experiments.data import FASHION_MNIST_FILES
from lightning_ghostnoise.experiments.models import WSConv2d, build_model
from lightning_ghostnoise.surgery import SurgeryReport

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning:lightning.pytorch.utilities._pytree"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
]
ROOT = Path(__file__).resolve().parents[2]
TINY = ["--epochs", "1", "--width", "4", "--batch-size", "32", "--progress-bar", "off", "--seeds", "2"]


@pytest.fixture(autouse=True)
def _one_thread_and_clean_seed(monkeypatch: pytest.MonkeyPatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setattr("sys.argv", ["ghostnoise"])
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")
    monkeypatch.delenv("PL_GLOBAL_SEED")
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fake_fashion(tmp_path: Path) -> Path:
    """A Fashion-MNIST folder in the real idx.gz format: 200 training and 50 test images with learnable labels."""
    folder = write_fake_fashion(tmp_path / "fashion", n_train=200, n_test=50)
    assert sorted(os.listdir(folder)) == sorted(FASHION_MNIST_FILES.values())
    return folder


def _run(argv: List[str]) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compare_main(argv)


# --------------------------------------------------------------------------- compare end to end
@pytest.mark.slow
def test_compare_reads_idx_files_and_writes_table_json_png(fake_fashion: Path, tmp_path: Path, capsys) -> None:
    out_dir = tmp_path / "out"
    argv = TINY + ["--data-dir", str(fake_fashion), "--out-dir", str(out_dir)]
    assert _run(argv) == 0
    out = capsys.readouterr().out
    # the table: one row per method, accuracies as mean +- std over the 2 seeds
    assert "fashion-mnist (200 training / 0 validation / 50 test images)" in out
    assert "GhostNoise rewrote: 7 BatchNorm2d" in out
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows] == ["method", "BN", "GBN(16)", "GNI(16)"]
    assert all(r.count("+-") == 4 for r in rows[1:])  # test acc, train acc, gap, test loss
    results = json.loads((out_dir / "results.json").read_text())
    assert [r["label"] for r in results["summary"]] == ["BN", "GBN(16)", "GNI(16)"]
    assert len(results["runs"]) == 6 and results["environment"]["torch"] == torch.__version__
    for run in results["runs"]:
        assert run["dataset"] == "fashion-mnist" and run["n_train"] == 200 and run["n_test"] == 50
        assert run["curves"]["eval_epoch"] == [1] and len(run["curves"]["test_acc"]) == 1
        assert len(run["curves"]["train_loss"]) == 1
        assert 0.0 <= run["test_acc"] <= 1.0 and 0.0 <= run["train_acc"] <= 1.0
        assert run["gap"] == pytest.approx(run["train_acc"] - run["test_acc"])
    for row in results["summary"]:
        accs = [r["test_acc"] for r in results["runs"] if r["label"] == row["label"]]
        assert row["test_acc_mean"] == pytest.approx(np.mean(accs))
        assert row["test_acc_std"] == pytest.approx(np.std(accs, ddof=1))
    assert (out_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((out_dir / "runs").glob("*.json"))) == 6
    assert not list(out_dir.rglob(".tmp-*"))  # atomic writes leave nothing behind
    umask = os.umask(0)
    os.umask(umask)
    for name in ("results.json", "curves.png"):  # readable like any file the user writes, not mkstemp's 0600
        assert (out_dir / name).stat().st_mode & 0o777 == 0o666 & ~umask

    # same seed, same data, same start: the methods differ only by the callback
    bn = [r for r in results["runs"] if r["label"] == "BN"]
    assert bn[0]["curves"]["train_loss"] != bn[1]["curves"]["train_loss"]  # two different seeds

    # --resume reuses every finished run and trains nothing
    assert _run(argv + ["--resume"]) == 0
    out = capsys.readouterr().out
    assert out.count("reusing") == 6 and "fitting" not in out
    again = json.loads((out_dir / "results.json").read_text())
    assert again["summary"] == results["summary"]

    # a changed configuration is not reused
    assert _run(argv + ["--resume", "--seeds", "1", "--methods", "plain", "--lr", "0.05"]) == 0
    assert "reusing" not in capsys.readouterr().out


def test_compare_is_deterministic_per_seed(fake_fashion: Path, tmp_path: Path) -> None:
    argv = TINY + ["--data-dir", str(fake_fashion), "--seeds", "1", "--methods", "gni", "--no-plot"]
    argv += ["--epochs", "3", "--eval-every", "2"]
    assert _run(argv + ["--out-dir", str(tmp_path / "a")]) == 0
    assert _run(argv + ["--out-dir", str(tmp_path / "b")]) == 0
    a = json.loads((tmp_path / "a" / "results.json").read_text())["runs"][0]
    b = json.loads((tmp_path / "b" / "results.json").read_text())["runs"][0]
    assert a["curves"]["train_loss"] == b["curves"]["train_loss"] and len(a["curves"]["train_loss"]) == 3
    assert a["test_acc"] == b["test_acc"]
    # the test set every 2 epochs and after the last one
    assert a["curves"]["eval_epoch"] == [2, 3] and len(a["curves"]["test_acc"]) == 2
    assert a["test_acc"] == a["curves"]["test_acc"][-1]
    assert not (tmp_path / "a" / "curves.png").exists()


def test_eval_every_changes_only_the_curves(fake_fashion: Path, tmp_path: Path) -> None:
    argv = TINY + ["--data-dir", str(fake_fashion), "--seeds", "1", "--methods", "gbn", "--no-plot", "--epochs", "3"]
    assert _run(argv + ["--eval-every", "1", "--out-dir", str(tmp_path / "every")]) == 0
    assert _run(argv + ["--eval-every", "3", "--out-dir", str(tmp_path / "last")]) == 0
    every = json.loads((tmp_path / "every" / "results.json").read_text())["runs"][0]
    last = json.loads((tmp_path / "last" / "results.json").read_text())["runs"][0]
    assert every["curves"]["eval_epoch"] == [1, 2, 3] and last["curves"]["eval_epoch"] == [3]
    # the test passes leave the training's random streams alone: same training, same final numbers
    assert every["curves"]["train_loss"] == last["curves"]["train_loss"]
    assert (every["test_acc"], every["train_acc"]) == (last["test_acc"], last["train_acc"])


def test_compare_falls_back_to_digits_and_says_so(tmp_path: Path, monkeypatch, capsys) -> None:
    missing = tmp_path / "no-fashion-here"
    monkeypatch.setattr(data_module, "DEFAULT_DATA_DIR", str(missing))
    argv = TINY + [
        "--seeds",
        "1",
        "--subset",
        "100",
        "--model",
        "resnet8_ln",
        "--out-dir",
        str(tmp_path / "o"),
        "--no-plot",
    ]
    assert _run(argv) == 0
    captured = capsys.readouterr()
    assert "Fashion-MNIST is not installed" in captured.err and "digits" in captured.err
    assert "apt-get install dataset-fashion-mnist" in captured.err
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert [r["label"] for r in results["summary"]] == ["LN", "LN+GNI(16)"]
    assert {r["dataset"] for r in results["runs"]} == {"digits"}
    assert "GroupNorm" in results["runs"][1]["rewritten"]


# --------------------------------------------------------------------------- data errors: clear, nothing written
def test_compare_partial_data_dir_is_an_error_and_writes_nothing(fake_fashion: Path, tmp_path: Path, capsys) -> None:
    (fake_fashion / FASHION_MNIST_FILES["test_labels"]).unlink()
    out_dir = tmp_path / "out"
    assert _run(TINY + ["--data-dir", str(fake_fashion), "--out-dir", str(out_dir)]) == 2
    err = capsys.readouterr().err
    assert "incomplete" in err and FASHION_MNIST_FILES["test_labels"] in err
    assert not out_dir.exists()


def test_compare_corrupt_idx_file_is_named(fake_fashion: Path, tmp_path: Path, capsys) -> None:
    bad = fake_fashion / FASHION_MNIST_FILES["train_images"]
    bad.write_bytes(gzip.compress(b"\x00\x00\x08\x03" + b"\x00" * 7))  # truncated header
    out_dir = tmp_path / "out"
    assert _run(TINY + ["--data-dir", str(fake_fashion), "--out-dir", str(out_dir)]) == 2
    assert FASHION_MNIST_FILES["train_images"] in capsys.readouterr().err
    assert not out_dir.exists()


def test_compare_explicit_empty_data_dir_does_not_fall_back(tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _run(TINY + ["--data-dir", str(empty), "--out-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "not found" in err and "dataset-fashion-mnist" in err
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- flags
@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--model", "resnet8_ln", "--methods", "plain", "gbn"], "needs BatchNorm layers"),
        (["--model", "vit", "--methods", "xbn"], "needs BatchNorm layers"),
        (["--methods", "dropout"], "unknown method"),
        (["--methods", "xbn", "--ghost-batch-size", "1"], "ghost batch size >= 2"),
        (["--ghost-batch-size", "0"], ">= 1"),
        (["--strength", "1.5"], "--strength must be in [0, 1]"),
        (["--strength", "nan"], "--strength must be in [0, 1]"),
        (["--epochs", "0"], "--epochs must be >= 1"),
        (["--eval-every", "0"], "--eval-every must be >= 1"),
        (["--seeds", "0"], "--seeds must be >= 1"),
        (["--subset", "-1"], "--subset must be >= 0"),
        (["--lr", "0"], "--lr must be in (0, inf]"),
        (["--data-dir", "/nonexistent/fashion"], "is not a folder"),
        (["--model", "resnet1000"], "invalid choice"),
    ],
)
def test_bad_flags_exit_with_a_message(argv: List[str], needle: str, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        parse_args(argv)
    assert info.value.code == 2
    assert needle in capsys.readouterr().err


def test_method_specs_per_norm_family() -> None:
    assert [s.label for s in method_specs("resnet8", None, [16])] == ["BN", "GBN(16)", "GNI(16)"]
    assert [s.label for s in method_specs("resnet8_ln", None, [16])] == ["LN", "LN+GNI(16)"]
    assert [s.label for s in method_specs("vit", ["plain", "analytic"], [4, 8])] == [
        "LN",
        "LN+analytic GNI(4)",
        "LN+analytic GNI(8)",
    ]
    specs = method_specs("resnet8", ["GNI", "gni", "plain"], [8, 8])
    assert [s.key for s in specs] == ["gni8", "plain"]  # case-insensitive, duplicates dropped, order kept


def test_summary_and_table() -> None:
    runs = [
        {
            "label": lab,
            "method": m,
            "ghost_batch_size": n,
            "test_acc": t,
            "train_acc": 1.0,
            "gap": 1.0 - t,
            "train_seconds_per_epoch": 2.0,
            "eval_seconds": 1.0,
            "seed": s,
        }
        for lab, m, n, t, s in (
            ("BN", "plain", None, 0.80, 0),
            ("BN", "plain", None, 0.90, 1),
            ("GNI(16)", "gni", 16, 0.85, 0),
        )
    ]
    rows = summarize(runs, ["BN", "GNI(16)"])
    assert rows[0]["test_acc_mean"] == pytest.approx(0.85) and rows[0]["test_acc_std"] == pytest.approx(0.0707107)
    assert rows[1]["test_acc_std"] == 0.0 and rows[1]["seeds"] == [0]
    table = format_table(rows)
    assert "| BN " in table and "85.00% +- 7.07" in table and "15.00 +- 7.07" in table


# --------------------------------------------------------------------------- the ghostnoise command
def test_ghostnoise_usage_and_unknown_subcommand(capsys) -> None:
    assert cli_main(["--help"]) == 0
    assert "compare" in capsys.readouterr().out
    assert cli_main([]) == 2
    assert cli_main(["train"]) == 2
    assert "unknown subcommand 'train'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        cli_main(["compare", "--help"])
    assert info.value.code == 0
    assert "--ghost-batch-size" in capsys.readouterr().out


def _metrics(csv_path: Path) -> List[dict]:
    with open(csv_path) as f:
        return list(csv.DictReader(f))


def test_fit_with_the_bundled_schedule_config(fake_fashion: Path, tmp_path: Path) -> None:
    """``ghostnoise fit --config configs/resnet_gni.yaml``: GNI with a geometric ghost-batch-size schedule
    over the first half of the run and a 2-epoch strength warm-up, as logged step by step."""
    argv = [
        "fit", "--config", str(ROOT / "configs" / "resnet_gni.yaml"),
        "--data.data_dir", str(fake_fashion), "--data.train_subset", "64", "--data.batch_size", "16",
        "--model.model_kwargs", '{"width": 4}', "--trainer.max_epochs", "4", "--trainer.accelerator", "cpu",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(tmp_path),
        "--trainer.log_every_n_steps", "1",
    ]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = build_lightning_cli(argv)
    assert cli.trainer.state.finished and cli.trainer.current_epoch == 4
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, GhostNoise)]
    assert cb.method == "gni" and cb.report.num_replaced == 7 and cb.base_seed == 0
    assert not ghost_layers(cli.model)  # the plain layers are back after fit
    rows = [r for r in _metrics(Path(cli.trainer.logger.log_dir) / "metrics.csv") if r.get("ghostnoise/strength")]
    assert len(rows) == 4 * 4  # 64 images / 16 per batch, 4 epochs
    strength = [float(r["ghostnoise/strength"]) for r in rows]
    size = [float(r["ghostnoise/ghost_batch_size"]) for r in rows]
    assert strength == [0.0] * 8 + [1.0] * 8  # WarmUp(2 epochs)
    assert size[0] == 32 and size[-1] == 16 and size[8] == 16  # 32 -> 16 over the first half (8 of 16 steps)
    assert all(a >= b for a, b in zip(size, size[1:])) and len(set(size[:9])) > 2  # decays step by step
    # the resolved configuration is saved next to the logs, for the record
    assert (Path(cli.trainer.logger.log_dir) / "config.yaml").is_file()


@pytest.mark.parametrize("config", ["resnet_bn.yaml", "resnet_ln_gni.yaml", "vit_gni.yaml"])
def test_bundled_configs_parse(config: str, fake_fashion: Path) -> None:
    argv = [
        "--config",
        str(ROOT / "configs" / config),
        "--data.data_dir",
        str(fake_fashion),
        "--trainer.logger",
        "false",
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = build_lightning_cli(argv, run=False)
    ghosts = [c for c in cli.trainer.callbacks if isinstance(c, GhostNoise)]
    expected = {"resnet_bn.yaml": "resnet8", "resnet_ln_gni.yaml": "resnet8_ln", "vit_gni.yaml": "vit"}[config]
    assert cli.model.hparams.model == expected
    assert len(ghosts) == (0 if config == "resnet_bn.yaml" else 1)
    if ghosts:
        report = SurgeryReport()
        apply_ghost_noise(cli.model, method="gni", ghost_batch_size=16, report=report)
        assert report.num_replaced > 0 and "BatchNorm" not in report.summary()


# --------------------------------------------------------------------------- the layer-normalized models
def test_ws_conv_standardizes_each_filter() -> None:
    torch.manual_seed(0)
    conv = WSConv2d(3, 5, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.mul_(7).add_(2)
    w = conv.standardized_weight()
    assert torch.allclose(w.mean((1, 2, 3)), torch.zeros(5), atol=1e-5)
    assert torch.allclose(w.var((1, 2, 3), unbiased=False), torch.ones(5), atol=1e-3)
    x = torch.randn(2, 3, 6, 6)
    ref = nn.functional.conv2d(x, w, None, padding=1)
    assert torch.allclose(conv(x), ref, atol=1e-5)
    assert set(conv.state_dict()) == {"weight"}  # same keys as a plain Conv2d


def test_resnet8_ln_is_group_normalized_and_takes_gni() -> None:
    torch.manual_seed(0)
    model = build_model("resnet8_ln", width=4)
    kinds = {type(m) for m in model.modules()}
    assert nn.GroupNorm in kinds and WSConv2d in kinds
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert all(m.num_groups == 1 for m in model.modules() if isinstance(m, nn.GroupNorm))
    x = torch.randn(8, 1, 28, 28)
    model.eval()
    plain = model(x)
    report = SurgeryReport()
    model = apply_ghost_noise(model, method="gni", ghost_batch_size=4, seed=0, report=report)
    assert report.num_replaced == 7 and report.summary() == "7 GroupNorm"
    model.eval()
    assert torch.allclose(model(x), plain, atol=1e-5)  # eval: exactly the plain layers
    model.train()
    noisy = model(x)
    assert noisy.shape == (8, 10) and torch.isfinite(noisy).all()
    assert not torch.allclose(noisy, plain, atol=1e-3)  # training: ghost noise on the GroupNorms


def test_compare_without_data_and_without_scikit_learn_says_what_to_install(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.setattr(data_module, "DEFAULT_DATA_DIR", str(tmp_path / "missing"))
    monkeypatch.setitem(sys.modules, "sklearn", None)  # makes `import sklearn...` raise ImportError
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    out_dir = tmp_path / "out"
    assert _run(TINY + ["--out-dir", str(out_dir)]) == 2
    err = capsys.readouterr().err
    assert "pip install scikit-learn" in err and "dataset-fashion-mnist" in err and "Traceback" not in err
    assert not out_dir.exists()


def test_compare_vit_layernorm_with_analytic_gni(fake_fashion: Path, tmp_path: Path, capsys) -> None:
    argv = TINY + ["--data-dir", str(fake_fashion), "--model", "vit", "--width", "8", "--seeds", "1", "--no-plot"]
    argv += ["--methods", "plain", "gni", "analytic", "--ghost-batch-size", "4", "--out-dir", str(tmp_path / "o")]
    assert _run(argv) == 0
    out = capsys.readouterr().out
    assert "GhostNoise rewrote: 5 LayerNorm" in out
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert [r["label"] for r in results["summary"]] == ["LN", "LN+GNI(4)", "LN+analytic GNI(4)"]
    assert all(np.isfinite(r["curves"]["train_loss"]).all() for r in results["runs"])


def test_list_flags_take_spaces_and_the_comma_spelling_with_a_deprecation(capsys) -> None:
    spaced = parse_args(["--methods", "plain", "gni", "--ghost-batch-size", "8", "16", "--no-plot"])
    assert capsys.readouterr().err == ""
    commas = parse_args(["--methods", "plain,gni", "--ghost-batch-size", "8,16", "--no-plot"])
    err = capsys.readouterr().err
    assert [s.label for s in commas.specs] == [s.label for s in spaced.specs] == ["BN", "GNI(8)", "GNI(16)"]
    assert (
        "deprecated: comma-separated values for --ghost-batch-size; separate them with spaces: --ghost-batch-size 8 16"
        in err
    )
    assert "separate them with spaces: --methods plain gni" in err
