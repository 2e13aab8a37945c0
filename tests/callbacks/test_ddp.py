"""Real multi-process DDP runs (gloo on CPU), each in a subprocess with a timeout."""

from pathlib import Path

import pytest
import torch
from helpers.processes import run_worker

pytestmark = [pytest.mark.ddp, pytest.mark.slow]


def _run(mode: str, out: Path, world: int = 2) -> list:
    # Lightning's launcher starts the other processes (no distributed variables in the environment)
    run_worker("ddp_worker.py", mode, out, world, timeout=240)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def ddp_rewrite(tmp_path_factory):
    return _run("rewrite", tmp_path_factory.mktemp("rewrite"))


def test_rewrite_happens_on_every_rank_before_the_wrap(ddp_rewrite):
    for rec in ddp_rewrite:
        assert rec["world"] == 2
        assert rec["types_at_setup"] == ["GhostBatchNorm2d"]
        assert rec["ghost_at_setup"] is True
        assert rec["wrapped_at_optimizers"] == "DistributedDataParallel"
    # training finished on both ranks with the DDP-averaged, identical weights
    for k, v in ddp_rewrite[0]["state"].items():
        assert torch.equal(v, ddp_rewrite[1]["state"][k]), k


def test_ranks_draw_different_noise(ddp_rewrite):
    # identical data and weights on both ranks: only the noise can make the outputs differ
    a, b = ddp_rewrite[0]["bn_out"], ddp_rewrite[1]["bn_out"]
    assert a.shape == b.shape
    assert not torch.allclose(a, b)


def test_sync_two_processes_match_one_process(tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one = _run("sync", tmp_path / "one", world=1)
    two = _run("sync", tmp_path / "two", world=2)
    # the LayerNorm over tokens is a ghost layer too (the fused path): its weights are compared below
    assert all(rec["ln_ghost_at_setup"] for rec in one + two)
    assert any(k.startswith("ln.") for k in one[0]["state"])
    full = one[0]["bn_out"]
    gathered = torch.cat([two[0]["bn_out"], two[1]["bn_out"]], 0)
    torch.testing.assert_close(gathered, full, rtol=1e-5, atol=1e-5)
    for k, v in one[0]["state"].items():
        torch.testing.assert_close(two[0]["state"][k].float(), v.float(), rtol=1e-5, atol=1e-5, msg=k)
        torch.testing.assert_close(two[1]["state"][k].float(), v.float(), rtol=1e-5, atol=1e-5, msg=k)
    # the noise is really there: the output is not plain BatchNorm of the global batch
    bn_in = torch.cat([two[0]["bn_in"], two[1]["bn_in"]], 0)
    torch.testing.assert_close(bn_in, one[0]["bn_in"], rtol=1e-5, atol=1e-5)
    plain = torch.nn.functional.batch_norm(bn_in, None, None, training=True)
    assert (gathered - plain).abs().max() > 1e-2
