"""Worker for the multi-process GhostNoiseMonitor test (run by tests/test_monitor.py in a subprocess, never by pytest).

Usage: python tests/helpers/monitor_ddp_worker.py OUT_DIR [WORLD]
  WORLD processes (gloo) train one step of a model whose first layer is a BatchNorm2d on the raw input,
  with GhostNoise(method="gbn") and GhostNoiseMonitor(every_n_steps=1) logging to a CSVLogger in OUT_DIR.
  Rank r gets its own data: rank 0 independent pixels (weak ghost noise), rank 1 a value per image and
  channel (strong ghost noise), so statistics merged across ranks differ from either rank's own.
  Each rank saves the BatchNorm input it saw at step 0 to OUT_DIR/rank{r}.pt.
"""

import os
import sys
import warnings
from datetime import timedelta

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DDPStrategy
from torch import nn

from lightning_ghostnoise import GhostNoise
from lightning_ghostnoise.callbacks import GhostNoiseMonitor

warnings.filterwarnings("ignore")
BATCH = 16


class Net(pl.LightningModule):
    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.out_dir = out_dir
        self.bn = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)
        self.inputs = []

    def forward(self, x):
        if self.training:
            self.inputs.append(x.detach().clone())
        return self.head(torch.relu(self.conv(self.bn(x))).mean((2, 3)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def on_train_end(self) -> None:
        torch.save(
            {"bn_in": self.inputs[0], "world": self.trainer.world_size},
            os.path.join(self.out_dir, f"rank{self.trainer.global_rank}.pt"),
        )


def data(rank: int):
    g = torch.Generator().manual_seed(100 + rank)
    if rank == 0:
        x = torch.randn(BATCH, 3, 6, 6, generator=g)
    else:
        x = torch.randn(BATCH, 3, 1, 1, generator=g).expand(BATCH, 3, 6, 6) * 3 + 0.1 * torch.randn(
            BATCH, 3, 6, 6, generator=g
        )
    return torch.utils.data.TensorDataset(x.contiguous(), torch.randint(0, 3, (BATCH,), generator=g))


def main() -> None:
    out_dir = sys.argv[1]
    world = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    pl.seed_everything(7, verbose=False)
    model = Net(out_dir)
    rank = int(os.environ.get("LOCAL_RANK", 0))
    strategy = DDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=60)) if world > 1 else "auto"
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=world,
        strategy=strategy,
        max_steps=1,
        callbacks=[GhostNoise(ghost_batch_size=4, method="gbn", seed=1), GhostNoiseMonitor(every_n_steps=1)],
        logger=CSVLogger(out_dir, name="logs", version=0),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        default_root_dir=out_dir,
    )
    trainer.fit(model, torch.utils.data.DataLoader(data(rank), batch_size=BATCH, shuffle=False))


if __name__ == "__main__":
    from clean_exit import run_then_destroy  # same directory, run as a script

    run_then_destroy(main)
