"""Worker for the sharded-strategy tests (tests/gpu/test_fsdp.py, tests/callbacks/test_model_parallel.py).

Run in a subprocess, never by pytest:

    python tests/helpers/sharded_worker.py MODEL OUT_DIR ACCELERATOR DEVICES

MODEL:
  ``fsdp``: Lightning's ``FSDPStrategy`` auto-wrapping every block (``auto_wrap_policy={Block, ConvBlock}``,
      ``state_dict_type="full"``); CUDA only.
  ``model_parallel``: Lightning's ``ModelParallelStrategy``; ``configure_model`` applies torch's
      ``fully_shard`` (FSDP2) to every block, then to the whole model. Runs on CUDA and on CPU (gloo).
  ``model_parallel_late``: the same, with the blocks built inside ``configure_model`` (GhostNoise rewrites
      them at ``on_fit_start``, after they were sharded).

``Trainer(accelerator=ACCELERATOR, devices=DEVICES)``: Lightning starts the other processes. A small
pre-norm transformer (two LayerNorm blocks around a GroupNorm block) trains 3 steps with GhostNoise on
the same data on every rank, so that only the noise can differ between ranks. Rank r saves
``OUT_DIR/rank<r>.pt``: every normalization layer (ghost or not, the sharded units around it, its
parameters' types), the ghost layers' seeds at step 0, and the first ghost layer's input and output at
step 0. Rank 0 writes two checkpoints (one file each, the full state dict): ``in_fit.ckpt`` at the end of
training (ghost layers in place) and ``after_fit.ckpt`` after ``fit`` returned (plain layers put back);
the process the test started saves the initial weights in ``initial.pt``.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any, Dict, List, Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ghostnoise import GhostNoise, ghost_layers
from lightning_ghostnoise.layers import is_ghost_layer

TOKENS, FEATURES, WIDTH, CLASSES, SAMPLES, BATCH, STEPS = 8, 6, 16, 3, 64, 16, 3


class Attention(nn.Module):
    def __init__(self, width: int, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-norm transformer block (two LayerNorms)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = Attention(width)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ConvBlock(nn.Module):
    """A convolution over the tokens with GroupNorm (channels first)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(width, width, 3, padding=1)
        self.norm = nn.GroupNorm(2, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.gelu(self.norm(self.conv(x.transpose(1, 2)))).transpose(1, 2)


BLOCKS = (Block, ConvBlock)


def make_blocks() -> nn.ModuleList:
    return nn.ModuleList([Block(WIDTH), ConvBlock(WIDTH), Block(WIDTH)])


class Transformer(pl.LightningModule):
    """The plain model (its ``state_dict`` is what every checkpoint must match)."""

    def __init__(self, build_blocks: bool = True) -> None:
        super().__init__()
        self.embed = nn.Linear(FEATURES, WIDTH)
        self.blocks: Optional[nn.ModuleList] = make_blocks() if build_blocks else None
        self.head = nn.Linear(WIDTH, CLASSES)
        self.record: Dict[str, Any] = {}
        self._hooks: List[Any] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.blocks is not None
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h.mean(1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if batch_idx == 0:
            self.record["seeds"] = [int(layer.seed) for _, layer in ghost_layers(self)]
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)

    def on_train_start(self) -> None:
        # after the strategy wrapped or sharded the model
        self.record["layers"] = describe_norm_layers(self)
        first = next(layer for _, layer in ghost_layers(self))

        def keep(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            if "first_out" not in self.record:
                self.record["first_in"] = args[0].detach().float().cpu().clone()
                self.record["first_out"] = output.detach().float().cpu().clone()

        self._hooks.append(first.register_forward_hook(keep))

    def on_train_end(self) -> None:
        for hook in self._hooks:
            hook.remove()
        trainer = self.trainer
        self.record.update(
            global_rank=trainer.global_rank, world_size=trainer.world_size, strategy=type(trainer.strategy).__name__
        )
        torch.save(self.record, os.path.join(sys.argv[2], f"rank{trainer.global_rank}.pt"))


class ShardedTransformer(Transformer):
    """For ModelParallelStrategy: ``configure_model`` applies FSDP2 to every block, then to the whole model."""

    def configure_model(self) -> None:
        if self.blocks is None:
            self.blocks = make_blocks()
        fully_shard = import_fully_shard()
        mesh = self.device_mesh["data_parallel"]
        for block in self.blocks:
            if sharded_class(block) is None:
                fully_shard(block, mesh=mesh)
        if sharded_class(self) is None:
            fully_shard(self, mesh=mesh)


def import_fully_shard() -> Any:
    try:  # torch >= 2.6
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch 2.4, 2.5
        from torch.distributed._composable.fsdp import fully_shard
    return fully_shard


def sharded_class(module: nn.Module) -> Optional[str]:
    """The class name of the module a sharded unit holds (FSDP1's wrapper, or a module ``fully_shard`` was
    applied to, whose class becomes ``FSDP<Class>``); ``None`` for any other module."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    if isinstance(module, FullyShardedDataParallel):
        return type(module.module).__name__
    mro = type(module).__mro__
    if any(cls.__name__ == "FSDPModule" for cls in mro):
        return next(cls.__name__ for cls in mro if not cls.__name__.startswith("FSDP"))
    return None


def describe_norm_layers(model: nn.Module) -> Dict[str, Dict[str, Any]]:
    """Every LayerNorm/GroupNorm by its plain qualified name: ghost or not, the classes of the sharded units
    around it (innermost last, the root excluded) and its parameters' types."""
    out: Dict[str, Dict[str, Any]] = {}

    def walk(module: nn.Module, prefix: str, units: List[str]) -> None:
        for name, child in module.named_children():
            if name == "_fsdp_wrapped_module":  # inside FSDP1's wrapper: the same qualified name
                walk(child, prefix, units)
                continue
            qualified = prefix + name
            if isinstance(child, (nn.LayerNorm, nn.GroupNorm)):
                out[qualified] = {
                    "ghost": is_ghost_layer(child),
                    "units": list(units),
                    "param_types": sorted({type(p).__name__ for p in child.parameters(recurse=False)}),
                }
            unit = sharded_class(child)
            walk(child, qualified + ".", units + [unit] if unit else units)

    walk(model, "", [])
    return out


def strategy_for(model: str) -> Any:
    if model == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        return FSDPStrategy(auto_wrap_policy=set(BLOCKS), state_dict_type="full")
    from lightning.pytorch.strategies import ModelParallelStrategy

    return ModelParallelStrategy(save_distributed_checkpoint=False)


class SaveInFit(pl.Callback):
    """Save a checkpoint at the end of training, while the ghost layers are in place (every rank takes part)."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.save_checkpoint(os.path.join(sys.argv[2], "in_fit.ckpt"))


def main() -> None:
    warnings.filterwarnings("ignore")
    kind, out, accelerator, devices = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    if kind not in ("fsdp", "model_parallel", "model_parallel_late"):
        raise SystemExit(f"unknown model {kind!r}: use fsdp, model_parallel or model_parallel_late")
    pl.seed_everything(7, verbose=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SAMPLES, TOKENS, FEATURES, generator=g) * 2 + 1
    y = torch.randint(0, CLASSES, (SAMPLES,), generator=g)
    if "LOCAL_RANK" not in os.environ:  # the process the test started (Lightning starts the others)
        torch.save(Transformer().state_dict(), os.path.join(out, "initial.pt"))
        pl.seed_everything(7, verbose=False)
    model = Transformer() if kind == "fsdp" else ShardedTransformer(build_blocks=kind == "model_parallel")
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=devices,
        strategy=strategy_for(kind),
        max_steps=STEPS,
        callbacks=[GhostNoise(ghost_batch_size=4, seed=123), SaveInFit()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,  # the same data on every rank: only the noise differs
        default_root_dir=out,
    )
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=False))
    trainer.save_checkpoint(os.path.join(out, "after_fit.ckpt"))


if __name__ == "__main__":
    from clean_exit import run_then_destroy  # same directory, run as a script

    run_then_destroy(main)
