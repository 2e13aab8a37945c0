"""Noise seeding: reproducible, exact on resume, never touching the global RNG (single process)."""

import os
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_ghostnoise import GhostNoise
from lightning_ghostnoise.seeding import derive_seed, validate_seed


class StatefulLoader:
    """A minimal resumable loader: Lightning saves its position mid-epoch and restores it."""

    def __init__(self, x, y, batch_size):
        self.x, self.y, self.bs, self.start, self.pos = x, y, batch_size, 0, 0

    def __len__(self):
        return len(self.x) // self.bs

    def __iter__(self):
        start, self.start = self.start, 0
        for k in range(start, len(self)):
            self.pos = k + 1
            yield self.x[k * self.bs : (k + 1) * self.bs], self.y[k * self.bs : (k + 1) * self.bs]
        self.pos = 0

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.start = state["pos"]


class Net(pl.LightningModule):
    def __init__(self, dropout=0.3):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(4, 3)
        self.global_draws = []

    def training_step(self, batch, batch_idx):
        self.global_draws.append(torch.rand(2))  # what dropout/augmentation would see
        x, y = batch
        h = self.drop(torch.relu(self.bn(self.conv(x))).mean((2, 3)))
        return nn.functional.cross_entropy(self.head(h), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(96, 1, 8, 8, generator=g), torch.randint(0, 3, (96,), generator=g)


class StopAt(pl.Callback):
    def __init__(self, step, path):
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True


def _fit(tmp_path, callbacks, max_epochs=2, ckpt_path=None, seed=11, dropout=0.3):
    pl.seed_everything(seed, verbose=False)
    model = Net(dropout)
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        accelerator="cpu",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, StatefulLoader(*_data(), batch_size=16), ckpt_path=ckpt_path)
    return model


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(autouse=True)
def _clean_seed_env():
    old = os.environ.pop("PL_GLOBAL_SEED", None)
    yield
    os.environ.pop("PL_GLOBAL_SEED", None)
    if old is not None:
        os.environ["PL_GLOBAL_SEED"] = old


def test_same_seed_same_training(tmp_path):
    a = _fit(tmp_path, [GhostNoise(4, seed=5)])
    b = _fit(tmp_path, [GhostNoise(4, seed=5)])
    _assert_equal(_weights(a), _weights(b))
    c = _fit(tmp_path, [GhostNoise(4, seed=6)])
    assert not torch.equal(_weights(a)["conv.weight"], _weights(c)["conv.weight"])


def test_seed_defaults_to_lightning_global_seed(tmp_path):
    cb = GhostNoise(4)
    _fit(tmp_path, [cb], max_epochs=1, seed=11)
    assert cb.base_seed == 11


def test_noise_changes_training(tmp_path):
    plain = _fit(tmp_path, [])
    noisy = _fit(tmp_path, [GhostNoise(4, seed=5)])
    assert not torch.equal(_weights(plain)["conv.weight"], _weights(noisy)["conv.weight"])


def test_global_rng_stream_untouched(tmp_path):
    plain = _fit(tmp_path, [])
    for method in ("gni", "analytic", "gbn"):
        noisy = _fit(tmp_path, [GhostNoise(4, method=method)])
        assert len(noisy.global_draws) == len(plain.global_draws) == 12
        for p, n in zip(plain.global_draws, noisy.global_draws):
            assert torch.equal(p, n), method


def test_resume_mid_epoch_is_bit_exact(tmp_path):
    # no dropout here: Lightning checkpoints carry no global RNG state, so dropout masks would differ
    full = _weights(_fit(tmp_path, [GhostNoise(4)], max_epochs=3, dropout=0.0))
    ckpt = str(tmp_path / "stop.ckpt")
    _fit(tmp_path, [GhostNoise(4), StopAt(3, ckpt)], max_epochs=3, dropout=0.0)  # 6 batches per epoch
    state = torch.load(ckpt, weights_only=False)
    saved_seed = next(v for k, v in state["callbacks"].items() if "GhostNoise" in k)["base_seed"]
    assert saved_seed == 11
    # another global seed on resume: the noise seed comes from the checkpoint
    cb = GhostNoise(4)
    resumed = _weights(_fit(tmp_path, [cb], max_epochs=3, ckpt_path=ckpt, seed=99, dropout=0.0))
    assert cb.base_seed == 11
    _assert_equal(full, resumed)


def test_resume_end_of_epoch_is_bit_exact(tmp_path):
    saver = ModelCheckpoint(dirpath=tmp_path / "ck", save_top_k=-1, every_n_epochs=1, save_on_train_epoch_end=True)
    full = _weights(_fit(tmp_path, [GhostNoise(4), saver], max_epochs=3, dropout=0.0))
    first_epoch = sorted((tmp_path / "ck").glob("epoch=0*.ckpt"))[0]
    resumed = _weights(_fit(tmp_path, [GhostNoise(4)], max_epochs=3, ckpt_path=str(first_epoch), seed=99, dropout=0.0))
    _assert_equal(full, resumed)


def test_drawn_seed_is_saved_and_restored(tmp_path):
    cb = GhostNoise(4)
    os.environ.pop("PL_GLOBAL_SEED", None)
    torch.manual_seed(0)
    model = Net()
    trainer = pl.Trainer(
        max_steps=2,
        callbacks=[cb],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, StatefulLoader(*_data(), batch_size=16))
    assert cb.base_seed is not None and 0 <= cb.base_seed < 2**32
    restored = GhostNoise(4)
    restored.load_state_dict(cb.state_dict())
    assert restored.base_seed == cb.base_seed


def test_sync_without_process_group_is_local(tmp_path):
    a = _fit(tmp_path, [GhostNoise(4, seed=3, sync=True)])
    b = _fit(tmp_path, [GhostNoise(4, seed=3, sync=False)])
    _assert_equal(_weights(a), _weights(b))


def test_seed_validation():
    with pytest.raises(ValueError, match="uint32"):
        GhostNoise(4, seed=2**32)
    with pytest.raises(ValueError, match="uint32"):
        GhostNoise(4, seed=-1)
    with pytest.raises(ValueError, match="integer"):
        validate_seed(1.5)


def test_derive_seed_separates_every_part():
    base = derive_seed(1, 0, 10, 2)
    assert base == derive_seed(1, 0, 10, 2)
    others = {derive_seed(2, 0, 10, 2), derive_seed(1, 1, 10, 2), derive_seed(1, 0, 11, 2), derive_seed(1, 0, 10, 3)}
    assert base not in others and len(others) == 4
    assert all(0 <= s < 2**63 for s in others)
