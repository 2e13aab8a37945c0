"""Two "nodes" of one process each on this machine, and resuming with another number of processes.

Real processes (gloo on CPU), started by the test with Lightning's environment-variable cluster
(``MASTER_ADDR``, ``MASTER_PORT``, ``NODE_RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``) and
``Trainer(strategy="ddp", num_nodes=2, devices=1)``: both processes have local rank 0, so noise keyed
by the local rank would be identical on both. The fits, their data and what they record are described
in tests/helpers/multinode_worker.py; each stage runs in subprocesses with a timeout.

Tolerances. Bit-equality where the same computation runs in the same layout (a resume in the same
world size). Between 1 and 2 processes with ``sync=True`` only the float32 reduction order differs
(one process's sums against all-reduced partial sums, of the normalization moments and of the
gradients): after one step the outputs agree to 1e-5 (as tests/callbacks/test_ddp.py), and the
difference grows by about 2-3x per step through the noise's ``1 / scale`` and SGD with momentum; after
the 4 steps of these runs the weights differ by up to 6e-6 (docs/distributed.md, measured with
``pytest -s``), hence ``RUN_TOL = 5e-5``, still 500x below what a different noise stream changes
(``sync=False``: 0.03 to 0.3).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List

import pytest
import torch
from helpers.processes import run_nodes, run_worker

from lightning_ghostnoise.seeding import derive_seed

pytestmark = [pytest.mark.ddp, pytest.mark.slow]

STEP_TOL = 1e-5  # one step, 1 vs 2 processes (the tolerance of tests/callbacks/test_ddp.py)
RUN_TOL = 5e-5  # the 4 steps of a run (module docstring)
FULL_STEPS = 4  # the worker's 2 epochs of 2 global batches
RESUMED_STEPS = 2  # resumed from the end of epoch 0
BASE_SEED = 7  # seed_everything(7) in the first runs; the resumed runs call seed_everything(99)

Load = Callable[..., Dict[str, Any]]


def _loader(out: Path) -> Load:
    def load(fit: str, rank: int = 0) -> Dict[str, Any]:
        return torch.load(out / f"{fit}-rank{rank}.pt", weights_only=False)

    return load


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("multinode")


@pytest.fixture(scope="module")
def first(out: Path) -> Load:
    run_nodes("multinode_worker.py", "first", out, num_nodes=2)
    return _loader(out)


@pytest.fixture(scope="module")
def one(first: Load, out: Path) -> Load:
    run_worker("multinode_worker.py", "one", out)
    return _loader(out)


@pytest.fixture(scope="module")
def resumed(first: Load, one: Load, out: Path) -> Load:
    run_nodes("multinode_worker.py", "resume", out, num_nodes=2)
    return _loader(out)


def _max_diff(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def _assert_states_close(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor], tol: float, label: str) -> None:
    assert a.keys() == b.keys()
    print(f"{label}: weights differ by at most {_max_diff(a, b):.2g}")  # shown with pytest -s
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), rtol=tol, atol=tol, msg=k)


def _assert_states_equal(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k}: max difference {(a[k].double() - b[k].double()).abs().max().item()}"


def _seeds_for(base: int, rank: int, seeds: List[int]) -> int:
    """The batch counter ``c`` with ``seeds == [derive_seed(base, rank, c, layer) ...]``; fails if none."""
    for counter in range(4):
        if seeds == [derive_seed(base, rank, counter, layer) for layer in range(len(seeds))]:
            return counter
    raise AssertionError(f"seeds {seeds} are not derive_seed({base}, rank={rank}, counter, layer) for a first batch")


# --------------------------------------------------------------------------- #
# two nodes
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("fit", ["same", "F2", "T2"])
def test_two_nodes_run_on_lightnings_environment_cluster(first: Load, fit: str) -> None:
    for rank in (0, 1):
        rec = first(fit, rank)
        assert (rec["global_rank"], rec["node_rank"], rec["local_rank"]) == (rank, rank, 0)
        assert (rec["world_size"], rec["num_nodes"]) == (2, 2)
        assert rec["strategy"] == "DDPStrategy"
        assert rec["cluster_environment"] == "LightningEnvironment"
        assert rec["ghost_in_training"] and all(rec["ghost_in_training"])


def test_noise_differs_across_global_ranks(first: Load) -> None:
    # identical data and weights on both nodes, and local rank 0 on both: only noise seeded with the
    # global rank makes the layer outputs differ
    a, b = first("same", 0), first("same", 1)
    assert torch.equal(a["bn_in"][0], b["bn_in"][0])
    assert (a["bn_out"][0] - b["bn_out"][0]).abs().max() > 0.1
    seeds_a, seeds_b = a["seeds"][0], b["seeds"][0]
    assert len(seeds_a) == 2  # the BatchNorm and the LayerNorm
    assert all(x != y for x, y in zip(seeds_a, seeds_b))
    # the generators are seeded with (base seed, GLOBAL rank, batch counter, layer index)
    assert a["base_seed"] == b["base_seed"] == 123
    counter = _seeds_for(123, 0, seeds_a)
    assert seeds_b == [derive_seed(123, 1, counter, layer) for layer in range(2)]


def test_sync_two_nodes_match_one_process(first: Load, one: Load) -> None:
    two, single = [first("T2", r) for r in (0, 1)], one("T1")
    # one shared noise stream (seeded without the rank), the single process's
    assert two[0]["seeds"] == two[1]["seeds"] == single["seeds"]
    # rank r holds rows r*B .. (r+1)*B - 1 of the global batch
    gathered_in = torch.cat([two[0]["bn_in"][0], two[1]["bn_in"][0]], 0)
    torch.testing.assert_close(gathered_in, single["bn_in"][0], rtol=STEP_TOL, atol=STEP_TOL)
    gathered = torch.cat([two[0]["bn_out"][0], two[1]["bn_out"][0]], 0)
    print(
        f"2 nodes vs 1 process, sync=True: step-0 outputs differ by at most {(gathered - single['bn_out'][0]).abs().max().item():.2g}"
    )
    torch.testing.assert_close(gathered, single["bn_out"][0], rtol=STEP_TOL, atol=STEP_TOL)
    plain = torch.nn.functional.batch_norm(gathered_in, None, None, training=True)
    assert (gathered - plain).abs().max() > 1e-2  # the noise is there
    for rank in (0, 1):
        _assert_states_close(
            two[rank]["state"], single["state"], RUN_TOL, f"2 nodes (rank {rank}) vs 1 process, sync=True"
        )
    # DDP keeps the parameters identical on both nodes
    for k, v in two[0]["state"].items():
        assert torch.equal(v, two[1]["state"][k]), k


@pytest.mark.parametrize("fit", ["F2", "T2"])
def test_two_node_resume_is_bit_exact(first: Load, resumed: Load, fit: str) -> None:
    for rank in (0, 1):
        full, again = first(fit, rank), resumed(f"{fit}to2", rank)
        assert again["base_seed"] == full["base_seed"] == BASE_SEED  # from the checkpoint, not seed_everything(99)
        assert len(again["seeds"]) == RESUMED_STEPS and again["global_step"] == full["global_step"] == FULL_STEPS
        assert again["seeds"] == full["seeds"][-RESUMED_STEPS:]
        _assert_states_equal(again["state"], full["state"])


# --------------------------------------------------------------------------- #
# another number of processes on resume
# --------------------------------------------------------------------------- #
def test_sync_checkpoint_of_two_nodes_resumes_in_one_process(first: Load, one: Load) -> None:
    full, again = first("T2"), one("T2to1")
    assert again["world_size"] == 1 and again["base_seed"] == BASE_SEED
    assert again["seeds"] == full["seeds"][-RESUMED_STEPS:]  # the same noise stream, continued
    _assert_states_close(again["state"], full["state"], RUN_TOL, "2 -> 1 resumed vs uninterrupted 2 nodes, sync=True")


def test_sync_checkpoint_of_one_process_resumes_in_two_nodes(one: Load, resumed: Load) -> None:
    full = one("T1")
    for rank in (0, 1):
        again = resumed("T1to2", rank)
        assert again["world_size"] == 2 and again["base_seed"] == BASE_SEED
        assert again["seeds"] == full["seeds"][-RESUMED_STEPS:]
        _assert_states_close(
            again["state"],
            full["state"],
            RUN_TOL,
            f"1 -> 2 resumed (rank {rank}) vs uninterrupted 1 process, sync=True",
        )


def test_local_noise_streams_continue_per_global_rank_after_a_world_size_change(
    first: Load, one: Load, resumed: Load
) -> None:
    two = [first("F2", r) for r in (0, 1)]
    single = one("F1")
    # 2 -> 1: the single process continues rank 0's stream (over the whole global batch); rank 1's ends
    down = one("F2to1")
    assert down["base_seed"] == BASE_SEED
    assert down["seeds"] == two[0]["seeds"][-RESUMED_STEPS:]
    # 1 -> 2: rank 0 continues the single process's stream, rank 1 starts the stream rank 1 has in any
    # 2-process run at that step
    up = [resumed("F1to2", r) for r in (0, 1)]
    assert up[0]["seeds"] == single["seeds"][-RESUMED_STEPS:]
    assert up[1]["seeds"] == two[1]["seeds"][-RESUMED_STEPS:]
    assert all(rec["base_seed"] == BASE_SEED for rec in up)
    # but with local statistics and local ghost batches the runs are other runs, not the uninterrupted ones
    down_diff, up_diff = _max_diff(down["state"], two[0]["state"]), _max_diff(up[0]["state"], single["state"])
    apart = _max_diff(two[0]["state"], single["state"])
    print(f"sync=False: 2 nodes vs 1 process {apart:.2g}, 2 -> 1 resumed vs 2 nodes {down_diff:.2g}, ", end="")
    print(f"1 -> 2 resumed vs 1 process {up_diff:.2g}")
    assert down_diff > 100 * RUN_TOL
    assert up_diff > 100 * RUN_TOL
