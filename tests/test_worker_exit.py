"""The multi-process test workers end their gloo process group safely (tests/helpers/clean_exit.py).

A worker that leaves its gloo group up at shutdown, or destroys it while a DDP wrapper is alive, can
abort or hang after a run that succeeded; both failures are intermittent, so these tests check the
rule itself: every worker script ends through ``run_then_destroy``, and ``end_process_group`` refuses
while DDP is alive.
"""

from __future__ import annotations

import ast
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers.processes import HELPERS, free_port, run_command, worker_env

WORKERS = sorted(HELPERS.glob("*_worker.py"))


def _main_block(tree: ast.Module) -> ast.If:
    for node in tree.body:
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            return node
    raise AssertionError("no `if __name__ == '__main__':` block")


@pytest.mark.parametrize("worker", WORKERS, ids=lambda p: p.name)
def test_every_worker_ends_through_run_then_destroy(worker: Path) -> None:
    block = _main_block(ast.parse(worker.read_text()))
    calls = [n.func.id for n in ast.walk(block) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]
    assert "run_then_destroy" in calls, f"{worker.name}: run its main through clean_exit.run_then_destroy"


def test_there_are_workers_to_check() -> None:
    assert {p.name for p in WORKERS} >= {"ddp_worker.py", "fabric_worker.py", "multinode_worker.py"}


@pytest.mark.ddp
def test_end_process_group_refuses_while_ddp_is_alive(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import torch, torch.distributed as dist
        from clean_exit import end_process_group, run_then_destroy

        dist.init_process_group("gloo", rank=0, world_size=1)
        ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))
        try:
            end_process_group()
        except RuntimeError as error:
            print("REFUSED:", error)
        assert dist.is_initialized()
        del ddp
        end_process_group()
        assert not dist.is_initialized()

        def main():
            dist.init_process_group("gloo", rank=0, world_size=1)
            kept = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))
            kept.cycle = [kept]  # only the garbage collector frees it

        run_then_destroy(main)
        assert not dist.is_initialized()
        print("ENDED")
        """
    )
    env = worker_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    env["PYTHONPATH"] = str(HELPERS) + ":" + env["PYTHONPATH"]
    proc = run_command([sys.executable, "-c", script], env, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "REFUSED: 1 DistributedDataParallel object(s) still alive" in proc.stdout
    assert proc.stdout.rstrip().endswith("ENDED")


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has ended, only its parent has not reaped it yet


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from Linux's /proc")
def test_a_timed_out_command_is_killed_with_every_process_it_started(tmp_path: Path) -> None:
    """A hung launcher's ranks must not outlive the test, even in a session of their own (torchrun's)."""
    pid_file = tmp_path / "grandchild.pid"
    script = textwrap.dedent(
        f"""
        import subprocess, sys, time
        child = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(60)"],
            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,  # not our pipes
        )
        open({str(pid_file)!r}, "w").write(str(child.pid))
        time.sleep(60)
        """
    )
    with pytest.raises(AssertionError, match="timed out after 5 s"):
        run_command([sys.executable, "-c", script], worker_env(), timeout=5)
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(pid), f"process {pid}, started by the timed-out command, is still running"
