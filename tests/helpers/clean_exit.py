"""End a worker's process group before the interpreter shuts down.

Lightning destroys the default process group at exit only for NCCL. A gloo process group left alive
at interpreter shutdown can abort the process ("terminate called without an active exception",
SIGABRT) while gloo's worker threads still hold tensors, an intermittent failure after a run that
succeeded. Every multi-process worker runs its ``main`` through :func:`run_then_destroy`.
"""

from typing import Callable

import torch.distributed as dist


def run_then_destroy(main: Callable[[], None]) -> None:
    """Run ``main``; then, if a process group is up, wait for every rank and destroy it.

    Only after a ``main`` that returned: a rank that raised exits at once (its peers time out) rather
    than waiting at a barrier the others may never reach.
    """
    main()
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
