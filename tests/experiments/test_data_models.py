"""Tests of the data module, the idx reader, the models and the Classifier (fast, CPU)."""

import os
import warnings

import numpy as np
import pytest
import torch
from helpers.fake_data import write_idx
from lightning.pytorch import Trainer

from lightning_ghostnoise import apply_ghost_noise, ghost_layers
from lightning_ghostnoise.experiments.data import (
    DEFAULT_DATA_DIR,
    FASHION_MNIST_FILES,
    FashionMNISTDataModule,
    load_idx,
)
from lightning_ghostnoise.experiments.models import (
    Classifier,
    SmallCNN,
    TinyTransformer,
    build_model,
    resnet18_cifar,
    small_resnet,
)

HAVE_FASHION = all(os.path.isfile(os.path.join(DEFAULT_DATA_DIR, f)) for f in FASHION_MNIST_FILES.values())
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning:lightning.pytorch.utilities._pytree")
needs_fashion = pytest.mark.skipif(not HAVE_FASHION, reason=f"Fashion-MNIST not installed in {DEFAULT_DATA_DIR}")


def _trainer(**kwargs):
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    defaults.update(kwargs)
    return Trainer(**defaults)


# --------------------------------------------------------------------------- load_idx
@pytest.mark.parametrize("compress", [True, False])
def test_load_idx_roundtrip(tmp_path, compress):
    data = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / ("a.idx.gz" if compress else "a.idx")
    write_idx(path, data, compress=compress)
    out = load_idx(str(path))
    np.testing.assert_array_equal(out, data)
    assert out.dtype == np.uint8 and not out.flags.writeable
    assert load_idx(str(path)) is out  # cached per process


def test_load_idx_other_dtypes(tmp_path):
    shorts = np.array([-3, 0, 1000], dtype=np.int16)
    write_idx(tmp_path / "s.gz", shorts, code=0x0B)
    np.testing.assert_array_equal(load_idx(str(tmp_path / "s.gz")), shorts)
    floats = np.array([[0.5, -2.0]], dtype=np.float32)
    write_idx(tmp_path / "f.gz", floats, code=0x0D)
    out = load_idx(str(tmp_path / "f.gz"))
    assert out.dtype == np.float32 and out.dtype.isnative
    np.testing.assert_array_equal(out, floats)


def test_load_idx_bad_magic(tmp_path):
    path = tmp_path / "bad.gz"
    write_idx(path, np.zeros((2, 2), np.uint8), magic=b"\x12\x34\x08\x02")
    with pytest.raises(ValueError, match="bad idx magic number"):
        load_idx(str(path))
    path = tmp_path / "badtype.gz"
    write_idx(path, np.zeros((2, 2), np.uint8), magic=b"\x00\x00\x07\x02")
    with pytest.raises(ValueError, match="bad idx magic number"):
        load_idx(str(path))


def test_load_idx_size_mismatch_and_bad_gzip(tmp_path):
    path = tmp_path / "short.gz"
    write_idx(path, np.zeros(5, np.uint8), shape=(2, 3))
    with pytest.raises(ValueError, match="size mismatch"):
        load_idx(str(path))
    path = tmp_path / "plain.gz"
    path.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="cannot decompress"):
        load_idx(str(path))
    with pytest.raises(FileNotFoundError):
        load_idx(str(tmp_path / "missing.gz"))


# --------------------------------------------------------------------------- the data module
@needs_fashion
def test_fashion_mnist_real_data():
    dm = FashionMNISTDataModule(batch_size=64)
    dm.setup("fit")
    assert dm.dataset_name == "fashion-mnist"
    assert len(dm.train_indices) == 60000 and len(dm.test_dataloader().dataset) == 10000
    assert dm.mean == pytest.approx(72.94, abs=0.01) and dm.std == pytest.approx(90.02, abs=0.01)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 1, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and int(y.min()) >= 0 and int(y.max()) < 10
    xt, yt = next(iter(dm.test_dataloader()))
    assert xt.shape[1:] == (1, 28, 28) and abs(float(xt.mean())) < 0.2
    assert dm.val_dataloader() == []


@needs_fashion
def test_subset_balanced_reproducible_and_val_split_disjoint():
    a = FashionMNISTDataModule(train_subset=1005, val_fraction=0.1, seed=0)
    a.setup()
    counts = a.class_counts("train")
    assert counts.sum() == 1005 and counts.max() - counts.min() <= 1
    np.testing.assert_array_equal(a.class_counts("val"), np.full(10, 600))
    assert len(np.intersect1d(a.train_indices, a.val_indices)) == 0
    b = FashionMNISTDataModule(train_subset=1005, val_fraction=0.1, seed=0)
    b.setup()
    np.testing.assert_array_equal(a.train_indices, b.train_indices)
    np.testing.assert_array_equal(a.val_indices, b.val_indices)
    c = FashionMNISTDataModule(train_subset=1005, val_fraction=0.1, seed=1)
    c.setup()
    assert not np.array_equal(a.train_indices, c.train_indices)


@needs_fashion
def test_augmentation_seeded_and_leaves_global_rng_alone():
    def first_batch(seed):
        dm = FashionMNISTDataModule(train_subset=500, augment=True, seed=seed, batch_size=100)
        dm.setup()
        return next(iter(dm.train_dataloader()))

    state = torch.get_rng_state()
    x1, y1 = first_batch(0)
    assert torch.equal(torch.get_rng_state(), state)  # shuffling and augmentation use their own generators
    x2, y2 = first_batch(0)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    x3, _ = first_batch(1)
    assert not torch.equal(x1, x3)
    # the augmented images differ from the plain ones, but keep their pixel values
    dm = FashionMNISTDataModule(train_subset=500, augment=False, seed=0, batch_size=100)
    dm.setup()
    x0, y0 = next(iter(dm.train_dataloader()))
    assert torch.equal(y0, y1) and not torch.equal(x0, x1)


def test_fallback_to_digits_with_warning(tmp_path):
    dm = FashionMNISTDataModule(data_dir=str(tmp_path / "missing"), batch_size=32, train_subset=500)
    with pytest.warns(UserWarning, match="apt-get install dataset-fashion-mnist"):
        dm.setup("fit")
    assert dm.dataset_name == "digits"
    assert (dm.image_size, dm.num_classes, dm.in_channels) == (28, 10, 1)
    counts = dm.class_counts("train")
    assert counts.sum() == 500 and counts.max() - counts.min() <= 1
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 28, 28) and int(y.max()) < 10
    assert len(dm.test_dataloader().dataset) > 300
    # more than there is: all of it, with a warning
    big = FashionMNISTDataModule(data_dir=str(tmp_path / "missing"), train_subset=10**6)
    with pytest.warns(UserWarning) as record:
        big.setup()
    assert any("exceeds" in str(w.message) for w in record)
    assert len(big.train_indices) == len(big._dataset("train"))


def test_no_fallback_raises(tmp_path):
    dm = FashionMNISTDataModule(data_dir=str(tmp_path), fallback=False)
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        dm.setup()


def test_corrupt_file_is_an_error_not_a_fallback(tmp_path):
    for key, name in FASHION_MNIST_FILES.items():
        n = 3
        arr = np.zeros((n, 28, 28) if "images" in key else (n,), np.uint8)
        write_idx(tmp_path / name, arr, magic=b"\x00\x00\x08\x09" if key == "train_labels" else None)
    dm = FashionMNISTDataModule(data_dir=str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="train-labels"):
            dm.setup()


def test_bad_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        FashionMNISTDataModule(batch_size=0)
    with pytest.raises(ValueError, match="train_subset"):
        FashionMNISTDataModule(train_subset=0)
    with pytest.raises(ValueError, match="val_fraction"):
        FashionMNISTDataModule(val_fraction=1.0)


# --------------------------------------------------------------------------- models
@pytest.mark.parametrize(
    "model",
    [
        SmallCNN(width=8),
        SmallCNN(num_classes=3, in_channels=3, width=4),
        small_resnet(8, 8),
        small_resnet(14, 4),
        TinyTransformer(dim=16, depth=1, heads=2),
    ],
    ids=["cnn", "cnn-rgb", "resnet8", "resnet14", "transformer"],
)
def test_model_forward_shapes(model):
    in_ch = model.features[0][0].in_channels if isinstance(model, SmallCNN) else 1
    classes = model.head.out_features
    out = model(torch.randn(4, in_ch, 28, 28))
    assert out.shape == (4, classes)


def test_model_errors_and_registry():
    with pytest.raises(ValueError, match="6n \\+ 2"):
        small_resnet(depth=10)
    with pytest.raises(ValueError, match="Unknown model"):
        build_model("vgg")
    assert type(build_model("resnet8", width=4)).__name__ == "PreActResNet"
    assert resnet18_cifar(num_classes=7, width=4)(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    tokens = TinyTransformer(num_classes=5, dim=16, heads=2, vocab_size=50, max_tokens=12)
    assert tokens(torch.randint(0, 50, (3, 12))).shape == (3, 5)


def test_models_take_ghost_noise():
    torch.manual_seed(0)
    cnn = apply_ghost_noise(SmallCNN(width=4), ghost_batch_size=4)
    assert len(ghost_layers(cnn)) == 5
    assert cnn(torch.randn(8, 1, 28, 28)).shape == (8, 10)
    tr = apply_ghost_noise(TinyTransformer(dim=16, depth=1, heads=2), ghost_batch_size=4)
    assert {type(m).__name__ for _, m in ghost_layers(tr)} == {"GhostLayerNorm"}
    assert tr(torch.randn(8, 1, 28, 28)).shape == (8, 10)


# --------------------------------------------------------------------------- Classifier
@pytest.mark.parametrize("scheduler", ["cosine", "onecycle"])
def test_classifier_fast_dev_run(tmp_path, scheduler):
    torch.manual_seed(0)
    dm = FashionMNISTDataModule(
        data_dir=DEFAULT_DATA_DIR if HAVE_FASHION else str(tmp_path / "missing"),
        batch_size=16,
        eval_batch_size=16,
        train_subset=64,
        val_fraction=0.1,
    )
    model = Classifier("small_cnn", model_kwargs={"width": 4}, scheduler=scheduler)
    trainer = _trainer(fast_dev_run=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a fallback warning without the real data
        trainer.fit(model, datamodule=dm)
    for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
        assert key in trainer.callback_metrics, key
    assert 0.0 <= float(trainer.callback_metrics["train_acc"]) <= 1.0
    result = trainer.test(model, datamodule=dm, verbose=False)
    assert 0.0 <= result[0]["test_acc"] <= 1.0


def test_classifier_with_module_and_ghost_noise_callback(tmp_path):
    from lightning_ghostnoise.callback import GhostNoise

    torch.manual_seed(0)
    dm = FashionMNISTDataModule(data_dir=str(tmp_path / "missing"), batch_size=16, train_subset=64)
    model = Classifier(TinyTransformer(dim=16, depth=1, heads=2), lr=0.01)
    assert "model" not in model.hparams
    cb = GhostNoise(ghost_batch_size=4, seed=0)
    trainer = _trainer(fast_dev_run=2, callbacks=[cb])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, datamodule=dm)
    assert cb.report.num_replaced == 3  # two blocks' LayerNorms + the final one
    assert not ghost_layers(model)  # reverted at the end of fit
