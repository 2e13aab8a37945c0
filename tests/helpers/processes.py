"""Start worker scripts in subprocesses with a timeout: one process, or one process per simulated node.

The distributed tests run every multi-process job this way, so that a hang or a crash fails one test
with the workers' output instead of blocking the suite.

``run_nodes`` is Lightning's "launch every process yourself" mode of its default cluster environment
(``LightningEnvironment``): each process gets ``MASTER_ADDR``, ``MASTER_PORT``, ``NODE_RANK``,
``LOCAL_RANK`` and ``WORLD_SIZE``, as a job scheduler or ``torchrun`` would set them on each machine.
``LOCAL_RANK`` being set is what tells Lightning the processes are created externally (it launches no
children of its own); ``NODE_RANK`` and the Trainer's ``num_nodes`` and ``devices`` give the global rank
and the world size.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[2]
HELPERS = ROOT / "tests" / "helpers"

#: Variables of an enclosing launcher or scheduler that would make Lightning pick another cluster environment.
_LAUNCHER_PREFIXES = ("SLURM_", "TORCHELASTIC_", "LSB_", "JSM_", "OMPI_", "PMI_", "KUBERNETES_")
_LAUNCHER_VARIABLES = (
    "LOCAL_RANK",
    "NODE_RANK",
    "GROUP_RANK",
    "RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "PL_GLOBAL_SEED",
)


def worker_env(**extra: str) -> Dict[str, str]:
    """The test's environment without distributed or scheduler variables, with the repository importable.

    One intra-op thread per process: the workers' tensors are tiny and the processes share the cores.
    """
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARIABLES and not k.startswith(_LAUNCHER_PREFIXES)}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the rank-0 process binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _command(script: str, args: Sequence[object]) -> List[str]:
    return [sys.executable, str(HELPERS / script), *[str(a) for a in args]]


def _descendants(pid: int) -> List[int]:
    """Every process below ``pid``, children first (read from Linux's /proc; empty where there is none)."""
    children: Dict[int, List[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # the field after the command's ")"
        except (OSError, IndexError, ValueError):
            continue  # the process ended while the table was read
        children.setdefault(parent, []).append(int(stat.parent.name))
    found: List[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(proc: "subprocess.Popen[str]") -> None:
    """Kill ``proc`` and every process it started, also those in sessions of their own.

    Launchers start the ranks as children (Lightning's rank 1 below rank 0; torchrun's workers in new
    sessions), so killing only ``proc`` would leave hung ranks running after a timeout.
    """
    for pid in [*_descendants(proc.pid), proc.pid]:  # listed before any is killed: orphans move to init
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def run_command(command: Sequence[str], env: Dict[str, str], timeout: float) -> "subprocess.CompletedProcess[str]":
    """Run ``command`` with its output captured; after ``timeout`` seconds kill it with every process it
    started and fail with the output so far."""
    proc = subprocess.Popen(list(command), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        out, err = proc.communicate()
        raise AssertionError(
            f"{' '.join(command)} timed out after {timeout} s (killed with every process it started):\n"
            f"{out[-3000:]}\n{err[-3000:]}"
        ) from None
    return subprocess.CompletedProcess(list(command), proc.returncode, out, err)


def run_worker(script: str, *args: object, timeout: float = 240, env: Optional[Dict[str, str]] = None) -> None:
    """Run ``tests/helpers/<script> args...`` (and the ranks it launches); fail with its output if it
    fails or times out."""
    proc = run_command(_command(script, args), env or worker_env(), timeout)
    assert proc.returncode == 0, f"{script} {args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def run_nodes(script: str, *args: object, num_nodes: int = 2, timeout: float = 240) -> None:
    """Run one process of ``tests/helpers/<script> args...`` per simulated node, on this machine.

    Process ``i`` gets ``NODE_RANK=i``, ``LOCAL_RANK=0`` and ``WORLD_SIZE=num_nodes`` with a shared free
    ``MASTER_PORT`` on ``127.0.0.1``. All must exit with 0 within ``timeout`` seconds; otherwise every
    process still running is killed and the test fails with each process's output.
    """
    port = str(free_port())
    procs = []
    for node in range(num_nodes):
        env = worker_env(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            NODE_RANK=str(node),
            LOCAL_RANK="0",
            WORLD_SIZE=str(num_nodes),
        )
        procs.append(
            subprocess.Popen(
                _command(script, args), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    deadline = time.monotonic() + timeout
    outputs: List[str] = []
    timed_out = False
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            for other in procs:
                if other.poll() is None:
                    kill_tree(other)
            out, _ = proc.communicate()
        outputs.append(out)
    report = "\n".join(
        f"--- node {i} (exit {p.returncode}):\n{o[-3000:]}" for i, (p, o) in enumerate(zip(procs, outputs))
    )
    assert not timed_out, f"{script} {args} timed out after {timeout} s:\n{report}"
    assert all(p.returncode == 0 for p in procs), f"{script} {args} failed:\n{report}"
