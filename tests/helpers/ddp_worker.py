"""Worker for the real multi-process tests (run by tests/callbacks/test_ddp.py in a subprocess, never by pytest).

Usage: python tests/helpers/ddp_worker.py MODE OUT_DIR [WORLD]
  rewrite: 2-process DDP, local sampling, identical data on both ranks; records, per rank, the layer
           types seen in LightningModule.setup (before the DDP wrap) and the first ghost layer output.
  sync:    WORLD processes (1 or 2) with GhostNoise(sync=True); rank r holds rows r*B..(r+1)*B-1 of one
           fixed global batch of 16; records the first BN output and the weights after one step (the
           model also has a LayerNorm over tokens, which GhostNoise rewrites too).
"""

import os
import sys
import warnings
from datetime import timedelta

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch import nn

from lightning_ghostnoise import GhostNoise
from lightning_ghostnoise.layers import is_ghost_layer

warnings.filterwarnings("ignore")
GLOBAL_BATCH = 16


class Net(pl.LightningModule):
    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.out_dir = out_dir
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.ln = nn.LayerNorm(4)  # over the channels of each position (tokens): GhostLayerNorm, fused path
        self.head = nn.Linear(4, 3)
        self.record = {}
        self.bn_outputs = []
        self.bn_inputs = []

    def setup(self, stage: str) -> None:  # after Callback.setup, before the DDP wrap
        self.record["types_at_setup"] = [type(m).__name__ for m in self.modules() if isinstance(m, nn.BatchNorm2d)]
        self.record["ghost_at_setup"] = is_ghost_layer(self.bn)
        self.record["ln_ghost_at_setup"] = is_ghost_layer(self.ln)

    def forward(self, x):
        c = self.conv(x)
        h = self.bn(c)
        if self.training:
            self.bn_inputs.append(c.detach().clone())
            self.bn_outputs.append(h.detach().clone())
        tokens = torch.relu(h).flatten(2).transpose(1, 2)  # (B, H*W, C)
        return self.head(self.ln(tokens).mean(1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        self.record["wrapped_at_optimizers"] = type(self.trainer.strategy.model).__name__
        return torch.optim.SGD(self.parameters(), lr=0.5)

    def on_train_end(self) -> None:
        rank = self.trainer.global_rank
        self.record["bn_out"] = self.bn_outputs[0]
        self.record["bn_in"] = self.bn_inputs[0]
        self.record["state"] = {k: v.detach().clone() for k, v in self.state_dict().items()}
        self.record["world"] = self.trainer.world_size
        torch.save(self.record, os.path.join(self.out_dir, f"rank{rank}.pt"))


def main() -> None:
    mode, out_dir = sys.argv[1], sys.argv[2]
    world = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    torch.manual_seed(0)
    x = torch.randn(GLOBAL_BATCH, 3, 6, 6) * 2 + 1
    y = torch.randint(0, 3, (GLOBAL_BATCH,))
    pl.seed_everything(7, verbose=False)
    model = Net(out_dir)
    if mode == "rewrite":
        data = torch.utils.data.TensorDataset(x, y)  # the same data on both ranks
        batch = GLOBAL_BATCH
        cb = GhostNoise(ghost_batch_size=4, seed=123)
        steps = 2
    else:
        rank = int(os.environ.get("LOCAL_RANK", 0))
        local = GLOBAL_BATCH // world
        data = torch.utils.data.TensorDataset(
            x[rank * local : (rank + 1) * local], y[rank * local : (rank + 1) * local]
        )
        batch = local
        cb = GhostNoise(ghost_batch_size=4, seed=123, sync=True)
        steps = 1
    strategy = DDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=60)) if world > 1 else "auto"
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=world,
        strategy=strategy,
        max_steps=steps,
        callbacks=[cb],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        default_root_dir=out_dir,
    )
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=batch, shuffle=False))


if __name__ == "__main__":
    from clean_exit import run_then_destroy  # same directory, run as a script

    run_then_destroy(main)
