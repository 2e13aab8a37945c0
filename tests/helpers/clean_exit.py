"""End a worker's gloo process group safely, before the interpreter shuts down.

Two failures of torch's gloo teardown, both intermittent, both after a run that succeeded:

- A process group still alive at interpreter shutdown can abort the process ("terminate called
  without an active exception", SIGABRT) while gloo's worker threads still hold finished work.
  Lightning destroys the default group at exit only for NCCL, so gloo runs must do it themselves.
- ``destroy_process_group()`` while a ``DistributedDataParallel`` is alive leaves the last reference
  to the group in DDP's reducer; freeing the reducer later runs the group's destructor with the GIL
  held, which deadlocks when a gloo thread is releasing finished work that needs the GIL.

So: free every DDP wrapper first, then wait for every rank, then destroy the group.
"""

import gc
from typing import Callable

import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def end_process_group() -> None:
    """Destroy the default process group after a barrier; refuse while a DDP wrapper is still alive."""
    # the type's MRO, not isinstance: isinstance on every live object trips deprecated objects' hooks
    alive = [o for o in gc.get_objects() if DistributedDataParallel in type(o).__mro__]
    if alive:
        raise RuntimeError(
            f"{len(alive)} DistributedDataParallel object(s) still alive: delete them (and run gc.collect() "
            "if a reference cycle holds them) before destroying the process group"
        )
    dist.barrier()
    dist.destroy_process_group()


def run_then_destroy(main: Callable[[], None]) -> None:
    """Run ``main``; then, if it left a process group up, free what it dropped and end the group.

    Only after a ``main`` that returned: a rank that raised exits at once (its peers time out) rather
    than waiting at a barrier the others may never reach.
    """
    main()
    if dist.is_available() and dist.is_initialized():
        gc.collect()  # wrappers kept alive by reference cycles (the Trainer's, Fabric's)
        end_process_group()
