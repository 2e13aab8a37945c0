"""Tiny LightningModules, data and Trainer settings shared by the callback and CLI tests.

Everything here is small on purpose (a few hundred parameters, 64 samples of 3x4x4) so that a fit
takes well under a second on a CPU.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

N_SAMPLES = 64
BATCH_SIZE = 16
BATCHES_PER_EPOCH = N_SAMPLES // BATCH_SIZE


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Any:
    """Tiny tensors: intra-op threads only add contention on a busy 2-core machine (import it to use it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_dataset(n: int = N_SAMPLES, seed: int = 1234) -> TensorDataset:
    """A fixed random classification set of 3x4x4 images and 2 classes (independent of global RNG)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 4, 4, generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    return TensorDataset(x, y)


def make_loader(batch_size: int = BATCH_SIZE, n: int = N_SAMPLES, seed: int = 1234) -> DataLoader:
    """A deterministic loader: fixed data, ``shuffle=False``, no worker processes."""
    return DataLoader(make_dataset(n, seed), batch_size=batch_size, shuffle=False, num_workers=0)


def trainer_kwargs(tmp_path: Any, **overrides: Any) -> Dict[str, Any]:
    """Fast, quiet, deterministic Trainer settings for tests."""
    kwargs: Dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=str(tmp_path),
        deterministic=True,
    )
    kwargs.update(overrides)
    return kwargs


def make_trainer(tmp_path: Any, callbacks: Optional[List[pl.Callback]] = None, **overrides: Any) -> pl.Trainer:
    return pl.Trainer(callbacks=list(callbacks or []), **trainer_kwargs(tmp_path, **overrides))


def param_ids(params: Any) -> set:
    return {id(p) for p in params}


def optimizer_param_ids(optimizer: torch.optim.Optimizer) -> set:
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


class BNModel(pl.LightningModule):
    """conv-BN2d-relu-conv-BN2d-relu-pool-linear, with two BatchNorm2d layers named ``bn1``/``bn2``.

    Records what tests need in plain Python lists (not part of the state dict):
    ``losses`` (training losses), ``train_norm_types`` / ``val_norm_types`` / ``test_norm_types``
    (the types of ``bn1``, ``bn2`` seen in each step), ``opt_norm_types`` (seen in
    ``configure_optimizers``) and ``opt_ids_match`` (whether the optimizer holds exactly the model's
    parameters at each training step).
    """

    def __init__(self, lr: float = 0.1, momentum: float = 0.0, width: int = 4) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.head = nn.Linear(width, 2)
        self.reset_records()

    def reset_records(self) -> None:
        self.losses: List[torch.Tensor] = []
        self.train_norm_types: List[tuple] = []
        self.val_norm_types: List[tuple] = []
        self.test_norm_types: List[tuple] = []
        self.opt_norm_types: List[tuple] = []
        self.opt_ids_match: List[bool] = []
        self.opt_ids_at_configure: List[bool] = []

    def norm_types(self) -> tuple:
        return (type(self.bn1), type(self.bn2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean((2, 3)))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.losses.append(loss.detach().clone())
        self.train_norm_types.append(self.norm_types())
        self.opt_ids_match.append(optimizer_param_ids(self.trainer.optimizers[0]) == param_ids(self.parameters()))
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.val_norm_types.append(self.norm_types())
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.test_norm_types.append(self.norm_types())
        x, y = batch
        self.log("test_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        self.opt_norm_types.append(self.norm_types())
        opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.get("momentum", 0.0))
        self.opt_ids_at_configure.append(optimizer_param_ids(opt) == param_ids(self.parameters()))
        return opt

    def train_dataloader(self) -> DataLoader:
        return make_loader()

    def val_dataloader(self) -> DataLoader:
        return make_loader(n=32)

    def test_dataloader(self) -> DataLoader:
        return make_loader(n=32)


class LinearModel(BNModel):
    """No normalization layer at all."""

    def __init__(self, lr: float = 0.1) -> None:
        pl.LightningModule.__init__(self)
        self.save_hyperparameters({"lr": lr})
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(48, 8), nn.ReLU(), nn.Linear(8, 2))
        self.reset_records()

    def norm_types(self) -> tuple:
        return ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class ConfigureModelBN(BNModel):
    """Builds every layer (BatchNorm included) in an idempotent ``configure_model``."""

    def __init__(self, lr: float = 0.1) -> None:
        pl.LightningModule.__init__(self)
        self.save_hyperparameters({"lr": lr})
        self.net: Optional[nn.Sequential] = None
        self.reset_records()

    def configure_model(self) -> None:
        if self.net is not None:
            return
        self.net = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1, bias=False),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(64, 8),
            nn.BatchNorm1d(8),
            nn.ReLU(),
            nn.Linear(8, 2),
        )

    def norm_types(self) -> tuple:
        assert self.net is not None
        return (type(self.net[1]), type(self.net[5]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.net is not None
        return self.net(x)


def state_tensors(module: nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_states_equal(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def states_equal(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
