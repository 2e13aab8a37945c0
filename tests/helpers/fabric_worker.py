"""Worker for the Fabric and Trainer comparison (run by tests/test_controller.py in a subprocess, never by pytest).

Usage: python tests/helpers/fabric_worker.py MODE OUT_DIR
  fabric:  Lightning Fabric, 2 CPU processes (DDP, gloo), a plain loop driving a GhostNoiseController.
  trainer: the Trainer, 2 CPU processes (DDP, gloo), with the GhostNoise callback.
  torch:   plain PyTorch under torchrun (``python -m torch.distributed.run --standalone --nproc_per_node 2
           fabric_worker.py torch OUT_DIR``): DistributedDataParallel, a DistributedSampler, no Lightning;
           the controller reads the rank from torch.distributed.
All three train the same network from the same seed on the same data (each rank its DistributedSampler
shard) for 2 epochs, and save per rank: every layer's noise seed at every step, the first
BatchNorm output, the final weights and the base seed. The fabric mode also draws a seed with no
global seed set, to show that every process ends with rank 0's.
"""

import os
import sys
import warnings
from datetime import timedelta

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_ghostnoise import GhostNoise, GhostNoiseController, ghost_layers

warnings.filterwarnings("ignore")
EPOCHS = 2
BATCH = 8


class Body(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.ln = nn.LayerNorm(4)
        self.head = nn.Linear(4, 3)
        self.bn_outputs = []

    def forward(self, x):
        h = self.bn(self.conv(x))
        if self.training and not self.bn_outputs:
            self.bn_outputs.append(h.detach().clone())
            self.first_x = x.detach().clone()
            self.first_w = self.conv.weight.detach().clone()
        tokens = torch.relu(h).flatten(2).transpose(1, 2)
        return self.head(self.ln(tokens).mean(1))


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 6, 6, generator=g) * 2 + 1
    y = torch.randint(0, 3, (64,), generator=g)
    return torch.utils.data.TensorDataset(x, y)


def seeds_now(model):
    return [layer.seed for _, layer in ghost_layers(model)]


def save_record(out_dir: str, rank: int, body: Body, seeds, base_seed, **extra) -> None:
    """What every mode saves for the comparison: per-step seeds, first input/weight/BN output, final weights."""
    record = {
        "seeds": seeds,
        "bn_out": body.bn_outputs[0],
        "x": body.first_x,
        "w": body.first_w,
        "state": {k: v.detach().clone() for k, v in body.state_dict().items()},
        "base_seed": base_seed,
        "global_rank": rank,
        **extra,
    }
    torch.save(record, os.path.join(out_dir, f"rank{rank}.pt"))


class Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.body = Body()
        self.seeds = []

    def training_step(self, batch, batch_idx):
        self.seeds.append(seeds_now(self.body))
        x, y = batch
        return nn.functional.cross_entropy(self.body(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2)


def run_trainer(out_dir: str) -> None:
    from lightning.pytorch.strategies import DDPStrategy

    pl.seed_everything(7, verbose=False)
    module = Module()
    cb = GhostNoise(ghost_batch_size=4)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=DDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=60)),
        max_epochs=EPOCHS,
        callbacks=[cb],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out_dir,
    )
    trainer.fit(module, torch.utils.data.DataLoader(data(), batch_size=BATCH, shuffle=True))
    save_record(out_dir, trainer.global_rank, module.body, module.seeds, cb.base_seed)


def run_fabric(out_dir: str) -> None:
    from clean_exit import end_process_group  # same directory
    from lightning.fabric import Fabric
    from lightning.fabric.strategies import DDPStrategy

    fabric = Fabric(
        accelerator="cpu",
        devices=2,
        strategy=DDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=60)),
    )
    fabric.launch()
    fabric.seed_everything(7)
    # the model as the Trainer run builds it: Module() creates its Body first
    body = Body()
    controller = GhostNoiseController(ghost_batch_size=4)
    loader = fabric.setup_dataloaders(torch.utils.data.DataLoader(data(), batch_size=BATCH, shuffle=True))
    body = controller.apply(body, max_epochs=EPOCHS, steps_per_epoch=len(loader))
    optimizer = torch.optim.SGD(body.parameters(), lr=0.2)
    model, optimizer = fabric.setup(body, optimizer)
    seeds = []
    for epoch in range(EPOCHS):
        for batch_idx, (x, y) in enumerate(loader):
            controller.on_step(epoch, batch_idx, rank=fabric.global_rank)
            seeds.append(seeds_now(body))
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            fabric.backward(loss)
            optimizer.step()
    body = controller.revert(body)
    del model  # the DDP wrapper, freed before the process group (as docs/usage.md shows)
    # no global seed: a seed drawn on each process, replaced by rank 0's
    os.environ.pop("PL_GLOBAL_SEED", None)
    drawn = GhostNoiseController().resolve_seed()
    save_record(
        out_dir,
        fabric.global_rank,
        body,
        seeds,
        controller.base_seed,
        drawn_seed=drawn,
        plain_types=[type(m).__name__ for m in body.modules()],
    )
    end_process_group()


def run_torch(out_dir: str) -> None:
    import torch.distributed as dist
    from clean_exit import end_process_group  # same directory
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader, DistributedSampler

    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    torch.manual_seed(7)
    body = Body()
    dataset = data()
    # the sampler Lightning builds: shuffled, seeded with the global seed, one epoch per set_epoch
    sampler = DistributedSampler(dataset, shuffle=True, seed=7)
    loader = DataLoader(dataset, batch_size=BATCH, sampler=sampler)
    controller = GhostNoiseController(ghost_batch_size=4, seed=7)
    body = controller.apply(body, max_epochs=EPOCHS, steps_per_epoch=len(loader))  # before the DDP wrap
    model = DistributedDataParallel(body)
    optimizer = torch.optim.SGD(body.parameters(), lr=0.2)
    seeds = []
    for epoch in range(EPOCHS):
        sampler.set_epoch(epoch)
        for batch_idx, (x, y) in enumerate(loader):
            controller.on_step(epoch, batch_idx)  # rank from torch.distributed
            seeds.append(seeds_now(body))
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    body = controller.revert(body)
    save_record(out_dir, rank, body, seeds, controller.base_seed)
    del model  # DDP's reducer holds the process group: free it first (as docs/usage.md shows)
    end_process_group()


if __name__ == "__main__":
    from clean_exit import run_then_destroy  # same directory, run as a script

    mode, out = sys.argv[1], sys.argv[2]
    run_then_destroy(lambda: {"fabric": run_fabric, "trainer": run_trainer, "torch": run_torch}[mode](out))
