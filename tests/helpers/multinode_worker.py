"""Worker for tests/callbacks/test_multinode.py (run in subprocesses by tests/helpers/processes.py, never by pytest).

Usage: python tests/helpers/multinode_worker.py STAGE OUT_DIR

With ``WORLD_SIZE=2`` in the environment (``processes.run_nodes``) the process is one of two "nodes"
(``Trainer(strategy="ddp", num_nodes=2, devices=1)``, gloo, Lightning's environment-variable cluster);
without it, a single process (``devices=1``). Each stage runs several short fits in the same processes
and saves, per fit and rank, a record ``OUT_DIR/<fit>-rank<r>.pt``:

  first  (2 nodes): ``same``: identical data on both ranks, one step, GhostNoise(seed=123);
                    ``F2``/``T2``: sync=False/True, 2 epochs, checkpoints at every epoch end in
                    ``OUT_DIR/ckpt-<fit>/``.
  one    (1 process): ``F1``/``T1``: as F2/T2 in one process with the global batch; ``F2to1``/``T2to1``:
                    resume F2/T2's epoch-0 checkpoint in one process.
  resume (2 nodes): ``F2to2``/``T2to2``: resume F2/T2's epoch-0 checkpoint in 2 nodes; ``F1to2``/``T1to2``:
                    resume F1/T1's epoch-0 checkpoint in 2 nodes.

Data: ``BATCHES`` global batches of ``GLOBAL_BATCH`` samples per epoch; with ``k`` processes, process ``r``
holds rows ``r*B .. (r+1)*B - 1`` of every global batch (``B = GLOBAL_BATCH / k``), the layout
``GhostNoise(sync=True)`` needs to match one process. The first runs seed with ``seed_everything(7)``
(the noise's base seed, since ``GhostNoise(seed=None)``); resumed runs with ``seed_everything(99)``, so
their noise matches only if the base seed comes from the checkpoint.
"""

import os
import sys
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any, Dict, List, Optional

import lightning.pytorch as pl
import torch
from ddp_worker import GLOBAL_BATCH, Net  # the model of the 2-process tests (same directory)
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader, TensorDataset

from lightning_ghostnoise import GhostNoise, ghost_layers
from lightning_ghostnoise.layers import is_ghost_layer

warnings.filterwarnings("ignore")
BATCHES = 2  # global batches per epoch
EPOCHS = 2
GHOST_BATCH_SIZE = 4


class Recorder(Net):
    """``ddp_worker.Net`` that records, per training step, the ghost layers' seeds and the BatchNorm's input/output."""

    def __init__(self, out_dir: str, fit: str) -> None:
        super().__init__(out_dir)
        self.fit = fit
        self.seeds: List[List[int]] = []
        self.ghost_in_training: List[bool] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.seeds.append([int(layer.seed) for _, layer in ghost_layers(self)])
        self.ghost_in_training.append(is_ghost_layer(self.bn) and is_ghost_layer(self.ln))
        return super().training_step(batch, batch_idx)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # momentum: the resumed runs must restore the optimizer's state too
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def on_train_end(self) -> None:
        trainer = self.trainer
        cb = next(c for c in trainer.callbacks if isinstance(c, GhostNoise))
        record: Dict[str, Any] = {
            "global_rank": trainer.global_rank,
            "local_rank": trainer.local_rank,
            "node_rank": trainer.node_rank,
            "world_size": trainer.world_size,
            "num_nodes": trainer.num_nodes,
            "strategy": type(trainer.strategy).__name__,
            "cluster_environment": type(getattr(trainer.strategy, "cluster_environment", None)).__name__,
            "base_seed": cb.base_seed,
            "global_step": trainer.global_step,
            "seeds": self.seeds,
            "ghost_in_training": self.ghost_in_training,
            "bn_in": self.bn_inputs,
            "bn_out": self.bn_outputs,
            "state": {k: v.detach().clone() for k, v in self.state_dict().items()},
        }
        torch.save(record, os.path.join(self.out_dir, f"{self.fit}-rank{trainer.global_rank}.pt"))


def global_data(same: bool = False) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    n = GLOBAL_BATCH if same else BATCHES * GLOBAL_BATCH
    x = torch.randn(n, 3, 6, 6, generator=g) * 2 + 1
    y = torch.randint(0, 3, (n,), generator=g)
    return TensorDataset(x, y)


def loader(rank: int, world: int, same: bool = False) -> DataLoader:
    data = global_data(same)
    if same:
        return DataLoader(data, batch_size=GLOBAL_BATCH, shuffle=False)
    local = GLOBAL_BATCH // world
    x, y = data.tensors
    # rows r*B .. (r+1)*B - 1 of every global batch
    x = x.view(BATCHES, world, local, *x.shape[1:])[:, rank].reshape(-1, *x.shape[1:])
    y = y.view(BATCHES, world, local)[:, rank].reshape(-1)
    return DataLoader(TensorDataset(x, y), batch_size=local, shuffle=False)


def fit(
    name: str,
    out: Path,
    world: int,
    sync: bool,
    *,
    same: bool = False,
    steps: int = -1,
    seed: Optional[int] = None,
    ckpt_path: Optional[Path] = None,
) -> None:
    pl.seed_everything(7 if ckpt_path is None else 99, verbose=False)
    model = Recorder(str(out), name)
    callbacks: List[pl.Callback] = [GhostNoise(ghost_batch_size=GHOST_BATCH_SIZE, seed=seed, sync=sync)]
    if ckpt_path is None and not same:
        callbacks.append(
            ModelCheckpoint(
                dirpath=out / f"ckpt-{name}",
                filename="{epoch}",
                save_top_k=-1,
                every_n_epochs=1,
                save_on_train_epoch_end=True,
            )
        )
    if world > 1:
        strategy: Any = DDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=60))
        nodes = {"num_nodes": world}
    else:
        strategy, nodes = "auto", {}
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=strategy,
        max_epochs=EPOCHS,
        max_steps=steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=ckpt_path is None and not same,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        default_root_dir=str(out),
        **nodes,
    )
    rank = int(os.environ.get("NODE_RANK", 0))  # one process per node: the global rank is the node rank
    trainer.fit(model, loader(rank, world, same), ckpt_path=None if ckpt_path is None else str(ckpt_path))


def main() -> None:
    stage, out = sys.argv[1], Path(sys.argv[2])
    world = int(os.environ.get("WORLD_SIZE", 1))  # read once: Lightning's environment removes it at teardown
    first_epoch = "epoch=0.ckpt"
    if stage == "first":
        fit("same", out, world, sync=False, same=True, steps=1, seed=123)
        fit("F2", out, world, sync=False)
        fit("T2", out, world, sync=True)
    elif stage == "one":
        fit("F1", out, world, sync=False)
        fit("T1", out, world, sync=True)
        fit("F2to1", out, world, sync=False, ckpt_path=out / "ckpt-F2" / first_epoch)
        fit("T2to1", out, world, sync=True, ckpt_path=out / "ckpt-T2" / first_epoch)
    elif stage == "resume":
        fit("F2to2", out, world, sync=False, ckpt_path=out / "ckpt-F2" / first_epoch)
        fit("T2to2", out, world, sync=True, ckpt_path=out / "ckpt-T2" / first_epoch)
        fit("F1to2", out, world, sync=False, ckpt_path=out / "ckpt-F1" / first_epoch)
        fit("T1to2", out, world, sync=True, ckpt_path=out / "ckpt-T1" / first_epoch)
    else:
        raise SystemExit(f"unknown stage {stage!r}: use first, one or resume")


if __name__ == "__main__":
    from clean_exit import run_then_destroy  # same directory, run as a script

    run_then_destroy(main)
