"""ghostnoise analyze (lightning_ghostnoise.experiments.analyze): plots and JSON, validation, checkpoints, flags."""

import json
import os

import pytest
import torch

from lightning_ghostnoise import apply_ghost_noise
from lightning_ghostnoise.experiments.analyze import build_parser, load_model, main

_TINY = [
    "--model-kwargs",
    '{"width": 4}',
    "--batch-size",
    "32",
    "--batches",
    "1",
    "--ghost-batch-size",
    "4",
    "8",
    "--train-steps",
    "2",
    "--train-batch-size",
    "16",
]


@pytest.mark.slow
def test_command_writes_plots_and_json(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_TINY + ["--out-dir", str(out), "--dpi", "30"]) == 0
    names = sorted(os.listdir(out))
    assert names == sorted(
        [
            "noise_analysis.json",
            "histograms_N8.png",
            "shift_std_vs_n.png",
            "log_scale_std_vs_n.png",
            "histograms_N8_isolated.png",
            "shift_std_vs_n_isolated.png",
            "log_scale_std_vs_n_isolated.png",
        ]
    )
    data = json.loads((out / "noise_analysis.json").read_text())
    assert data["meta"]["train_steps"] == 2 and data["meta"]["model"] == "resnet8"
    assert {r["mode"] for r in data["live"]["results"]} == {"live"}
    assert len(data["isolated"]["results"]) == 4 * 2 * 7
    assert "Wrote" in capsys.readouterr().out


def test_command_validates_before_any_work(tmp_path, capsys):
    out = tmp_path / "never"
    for args, message in [
        (["--methods", "gni,bn"], "unknown method"),
        (["--ghost-batch-sizes", "1,4"], ">= 2"),
        (["--ghost-batch-sizes", "4,x"], "integers"),
        (["--batch-size", "1"], ">= 2"),
        (["--checkpoint", str(tmp_path / "missing.ckpt")], "no such file"),
        (["--model", "vgg"], "unknown model"),
        (["--model-kwargs", "[1]"], "JSON object"),
        (["--ghost-batch-sizes", "4,8", "--hist-ghost-batch-size", "32"], "not among"),
        (["--modes", "live,both"], "modes"),
        (["--methods", "gni", "bn"], "unknown method"),
        (["--ghost-batch-size", "1", "4"], ">= 2"),
        (["--ghost-batch-size", "4", "x"], "integers"),
        (["--ghost-batch-size", "4", "8", "--hist-ghost-batch-size", "32"], "not among"),
        (["--modes", "live", "both"], "modes"),
    ]:
        assert main(args + ["--out-dir", str(out)]) == 2, args
        assert message in capsys.readouterr().err, args
    assert not out.exists()


def test_command_reads_checkpoints_and_explains_bad_ones(tmp_path, capsys):
    net, info = load_model(None, "resnet8", {"width": 4})
    lightning_like = {
        "state_dict": {f"model.{k}": v for k, v in net.state_dict().items()},
        "hyper_parameters": {"model": "resnet8", "model_kwargs": {"width": 4}, "num_classes": 10},
    }
    torch.save(lightning_like, tmp_path / "a.ckpt")
    loaded, info = load_model(str(tmp_path / "a.ckpt"))
    assert info["name"] == "resnet8" and info["kwargs"] == {"width": 4}
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, net.state_dict()[k])
    torch.save(net.state_dict(), tmp_path / "b.pt")
    loaded, _ = load_model(str(tmp_path / "b.pt"), "resnet8", {"width": 4})
    assert torch.equal(loaded.stem.weight, net.stem.weight)
    # a checkpoint with ghost noise layers in it loads into the plain model (same keys)
    ghost = apply_ghost_noise(net, 4, warn=False)
    torch.save(ghost.state_dict(), tmp_path / "g.pt")
    load_model(str(tmp_path / "g.pt"), "resnet8", {"width": 4})

    (tmp_path / "bad.ckpt").write_bytes(b"not a checkpoint")
    assert main(["--checkpoint", str(tmp_path / "bad.ckpt"), "--out-dir", str(tmp_path / "o")]) == 2
    assert "cannot read checkpoint" in capsys.readouterr().err
    assert main(["--checkpoint", str(tmp_path / "b.pt"), "--out-dir", str(tmp_path / "o")]) == 2  # width 16 by default
    err = capsys.readouterr().err
    assert "do not fit model 'resnet8'" in err and "shape mismatches" in err and "--model-kwargs" in err


def test_list_flags_are_space_separated_and_old_spellings_still_work(capsys):
    new = build_parser().parse_args(
        ["--ghost-batch-size", "4", "16", "--methods", "gni", "GBN", "--modes", "live", "--no-plot"]
    )
    assert capsys.readouterr().err == ""
    old = build_parser().parse_args(
        ["--ghost-batch-sizes", "4,16", "--methods", "gni,gbn", "--modes", "live", "--no-plots"]
    )
    err = capsys.readouterr().err
    for attr in ("ghost_batch_size", "methods", "modes", "no_plot"):
        assert getattr(old, attr) == getattr(new, attr), attr
    assert new.ghost_batch_size == [4, 16] and new.methods == ["gni", "gbn"] and new.no_plot is True
    assert "deprecated: --ghost-batch-sizes is now --ghost-batch-size; write --ghost-batch-size 4 16" in err
    assert "deprecated: comma-separated values for --methods; separate them with spaces: --methods gni gbn" in err
    assert "deprecated: --no-plots is now --no-plot" in err
    # the comma spelling on the new name also works, and says so
    assert build_parser().parse_args(["--ghost-batch-size", "4,16"]).ghost_batch_size == [4, 16]
    assert "separate them with spaces: --ghost-batch-size 4 16" in capsys.readouterr().err


def test_old_spellings_run_the_command_with_a_deprecation_message(tmp_path, capsys):
    argv = [
        "--model-kwargs",
        '{"width": 4}',
        "--batch-size",
        "32",
        "--batches",
        "1",
        "--ghost-batch-sizes",
        "4,8",
        "--methods",
        "gni",
        "--modes",
        "live",
        "--train-steps",
        "0",
        "--no-plots",
        "--out-dir",
        str(tmp_path / "o"),
    ]
    assert main(argv) == 0
    assert "deprecated: --ghost-batch-sizes is now --ghost-batch-size" in capsys.readouterr().err
    data = json.loads((tmp_path / "o" / "noise_analysis.json").read_text())
    assert sorted(os.listdir(tmp_path / "o")) == ["noise_analysis.json"]
    assert sorted({r["ghost_batch_size"] for r in data["live"]["results"]}) == [4, 8]
