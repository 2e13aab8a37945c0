"""GhostNoiseController: a plain loop and a Fabric run inject the callback's noise; state, seeds, errors."""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any, Dict, List

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers.processes import run_command, worker_env
from helpers.tiny_lightning import BATCHES_PER_EPOCH, make_loader, one_thread, trainer_kwargs  # noqa: F401
from torch import nn

from lightning_ghostnoise import GhostNoise, GhostNoiseController, ghost_layers
from lightning_ghostnoise.layers import is_ghost_layer
from lightning_ghostnoise.schedules import Cosine, Linear
from lightning_ghostnoise.seeding import derive_seed

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 3


def body() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 16, 8),
        nn.LayerNorm(8),
        nn.Linear(8, 2),
    )


class Wrapped(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = body()
        self.values: List[Dict[str, Any]] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        layer = next(layer for _, layer in ghost_layers(self.net))
        self.values.append({"ghost_batch_size": layer.ghost_batch_size, "strength": layer.strength})
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


CONFIGS = {
    "gni-step-schedule": dict(ghost_batch_size=4, strength=Linear(0.0, 1.0, end=2)),
    "gbn-fraction-schedule": dict(method="gbn", ghost_batch_size=Linear(8, 4, end=0.5, unit="fraction")),
    "analytic-cosine": dict(method="analytic", ghost_batch_size=4, strength=Cosine(0.2, 1.0, end=3)),
}


def plain_loop(config: Dict[str, Any], seed: int = 5) -> tuple:
    """The documented plain-PyTorch loop."""
    net = body()
    loader = make_loader()
    controller = GhostNoiseController(seed=seed, **config)
    net = controller.apply(net, max_epochs=EPOCHS, steps_per_epoch=len(loader))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    values = []
    for epoch in range(EPOCHS):
        for batch_idx, (x, y) in enumerate(loader):
            values.append(controller.on_step(epoch, batch_idx))
            loss = F.cross_entropy(net(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    net = controller.revert(net)
    return net, values, controller


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_plain_loop_injects_the_callbacks_noise(tmp_path: Path, name: str) -> None:
    config = CONFIGS[name]
    net, values, _ = plain_loop(config)
    # the callback's run, with the same seed, batches and steps
    module = Wrapped()
    cb = GhostNoise(seed=5, log_values=False, **config)
    pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=EPOCHS, callbacks=[cb])).fit(module, make_loader())
    assert values == module.values
    assert len({(v["ghost_batch_size"], v["strength"]) for v in values}) > 1  # the schedule moved
    for key, value in module.net.state_dict().items():
        assert torch.equal(value, net.state_dict()[key]), key
    if config.get("method") != "gbn":  # GBN's contiguous ghost batches draw nothing
        # the noise mattered: a run with another seed ends elsewhere
        other, _, _ = plain_loop(config, seed=6)
        assert not torch.equal(other[0].weight, net[0].weight)


def test_resume_from_state_dict_is_exact() -> None:
    config = CONFIGS["gni-step-schedule"]
    whole, _, _ = plain_loop(config)
    # the same loop, stopped after one epoch and continued with fresh objects from saved state
    net, loader = body(), make_loader()
    controller = GhostNoiseController(seed=5, **config)
    net = controller.apply(net, max_epochs=EPOCHS, steps_per_epoch=len(loader))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    for batch_idx, (x, y) in enumerate(loader):
        controller.on_step(0, batch_idx)
        optimizer.zero_grad()
        F.cross_entropy(net(x), y).backward()
        optimizer.step()
    saved = copy.deepcopy({"model": net.state_dict(), "noise": controller.state_dict()})
    assert saved["noise"]["batches"] == BATCHES_PER_EPOCH

    net2 = body()
    controller2 = GhostNoiseController(**config)  # no seed given: the saved one is taken
    net2 = controller2.apply(net2, max_epochs=EPOCHS, steps_per_epoch=len(loader))
    net2.load_state_dict(saved["model"])
    controller2.load_state_dict(saved["noise"])
    assert controller2.base_seed == 5
    optimizer2 = torch.optim.SGD(net2.parameters(), lr=0.1)
    for epoch in range(1, EPOCHS):
        for batch_idx, (x, y) in enumerate(loader):
            controller2.on_step(epoch, batch_idx)
            optimizer2.zero_grad()
            F.cross_entropy(net2(x), y).backward()
            optimizer2.step()
    net2 = controller2.revert(net2)
    for key, value in whole.state_dict().items():
        assert torch.equal(value, net2.state_dict()[key]), key


def test_on_step_reseeds_by_seed_rank_count_and_layer() -> None:
    controller = GhostNoiseController(ghost_batch_size=4, seed=11)
    net = controller.apply(body())
    controller.on_step(0, 0, rank=3)
    assert [layer.seed for _, layer in ghost_layers(net)] == [derive_seed(11, 3, 1, i) for i in range(2)]
    controller.on_step(0, 1, rank=3, batch_count=41)
    assert [layer.seed for _, layer in ghost_layers(net)] == [derive_seed(11, 3, 41, i) for i in range(2)]
    assert controller.batches == 41
    controller.on_step(0, 2)  # no process group: rank 0, the count continues
    assert [layer.seed for _, layer in ghost_layers(net)] == [derive_seed(11, 0, 42, i) for i in range(2)]
    synced = GhostNoiseController(ghost_batch_size=4, seed=11, sync=True)
    net2 = synced.apply(body())
    synced.on_step(0, 0, rank=3)  # one stream for every process
    assert [layer.seed for _, layer in ghost_layers(net2)] == [derive_seed(11, 0, 1, i) for i in range(2)]


def test_different_ranks_inject_different_noise() -> None:
    x = torch.randn(16, 3, 4, 4)
    outs = []
    for rank in (0, 1):
        controller = GhostNoiseController(ghost_batch_size=4, seed=2)
        net = controller.apply(body())
        controller.on_step(0, 0, rank=rank)
        outs.append(net(x))
    assert not torch.allclose(outs[0], outs[1])


def test_schedule_values_and_run_length() -> None:
    controller = GhostNoiseController(strength=Linear(0.0, 1.0, end=2))
    controller.steps_per_epoch = 4
    assert controller.schedule_values(1, 2)["strength"] == pytest.approx(0.75)
    fraction = GhostNoiseController(ghost_batch_size=Linear(8, 4, end=0.5, unit="fraction"), seed=0)
    fraction.apply(body())
    with pytest.raises(ValueError, match="max_epochs"):
        fraction.on_step(0, 0)
    fraction.max_epochs = 4
    assert fraction.on_step(2, 0)["ghost_batch_size"] == 4


def test_apply_revert_and_ddp_ignore_list() -> None:
    controller = GhostNoiseController(seed=0)
    net = body()
    net._ddp_params_and_buffers_to_ignore = ["0.weight"]  # the user's own entry stays
    net = controller.apply(net)
    assert controller.report.num_replaced == 2 and len(controller.layers) == 2
    ignored = set(net._ddp_params_and_buffers_to_ignore)
    assert {"0.weight", "1._ghost_strength", "1._ghost_state", "5._ghost_state"} <= ignored
    net = controller.revert(net)
    assert net._ddp_params_and_buffers_to_ignore == ["0.weight"]
    assert not any(is_ghost_layer(m) for m in net.modules())
    with pytest.raises(RuntimeError, match="apply"):
        controller.on_step(0, 0)
    with pytest.raises(RuntimeError, match="apply"):
        GhostNoiseController().on_step(0, 0)


def test_model_without_norm_layers_steps_without_error() -> None:
    controller = GhostNoiseController(seed=0)
    with pytest.warns(UserWarning, match="no effect"):
        net = controller.apply(nn.Linear(3, 3))
    assert controller.on_step(0, 0) == {"ghost_batch_size": 16, "strength": 1.0}
    assert isinstance(net, nn.Linear)


def test_seed_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PL_GLOBAL_SEED", "123")
    assert GhostNoiseController().resolve_seed() == 123
    assert GhostNoiseController(seed=9).resolve_seed() == 9
    monkeypatch.delenv("PL_GLOBAL_SEED")
    drawn = GhostNoiseController()
    first = drawn.resolve_seed()
    assert drawn.resolve_seed() == first  # drawn once
    assert GhostNoiseController().resolve_seed(broadcast=lambda seed: 77) == 77  # rank 0's value wins


def test_state_dict_and_seed_conflict() -> None:
    controller = GhostNoiseController(seed=3)
    assert controller.state_dict() == {"base_seed": 3, "method": "gni", "batches": 0, "version": 2}
    with pytest.warns(UserWarning, match="keeping seed=4"):
        GhostNoiseController(seed=4).load_state_dict({"base_seed": 3, "batches": 7})
    restored = GhostNoiseController()
    restored.load_state_dict({"base_seed": 3, "method": "gni", "version": 1})  # the callback's former state
    assert restored.base_seed == 3 and restored.batches == 0


def test_bad_configuration_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="sync=True supports"):
        GhostNoiseController(method="gbn", sync=True)
    with pytest.raises(ValueError):
        GhostNoiseController(method="xbn", ghost_batch_size=1)
    with pytest.raises(ValueError, match="seed"):
        GhostNoiseController(seed=-1)


def test_callback_is_built_on_a_controller() -> None:
    cb = GhostNoise(ghost_batch_size=8, method="gbn", seed=1)
    assert isinstance(cb.controller, GhostNoiseController)
    assert (cb.method, cb.ghost_batch_size, cb.seed, cb.base_seed) == ("gbn", cb.controller.ghost_batch_size, 1, 1)
    assert cb.state_dict() == cb.controller.state_dict()


@pytest.mark.ddp
@pytest.mark.slow
def test_fabric_and_torchrun_loops_match_the_trainer_on_two_processes(tmp_path: Path) -> None:
    env = worker_env()
    worker = str(ROOT / "tests" / "helpers" / "fabric_worker.py")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    records = {}
    for mode in ("fabric", "trainer", "torch"):
        out = tmp_path / mode
        out.mkdir()
        launch = torchrun if mode == "torch" else [sys.executable]
        proc = run_command([*launch, worker, mode, str(out)], env, timeout=240)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        records[mode] = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    trainer = records["trainer"]
    for mode in ("fabric", "torch"):
        for rank in range(2):
            f, t = records[mode][rank], trainer[rank]
            assert f["global_rank"] == t["global_rank"] == rank
            assert f["base_seed"] == t["base_seed"] == 7  # seed_everything's seed, or the controller's seed=7
            assert f["seeds"] == t["seeds"] and len(f["seeds"]) == 8
            assert torch.equal(f["x"], t["x"])  # the same shard of the same data
            assert torch.equal(f["bn_out"], t["bn_out"])
            for key, value in t["state"].items():
                assert torch.equal(f["state"][key], value), (mode, key)
    fabric = records["fabric"]
    assert "BatchNorm2d" in fabric[0]["plain_types"] and not any(
        n.startswith("Ghost") for n in fabric[0]["plain_types"]
    )
    # distinct noise per global rank, one drawn seed shared by both processes
    assert fabric[0]["seeds"][0] != fabric[1]["seeds"][0]
    assert fabric[0]["drawn_seed"] == fabric[1]["drawn_seed"]


def test_fabric_saves_and_loads_the_controller_as_state(tmp_path: Path) -> None:
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=1)
    controller = GhostNoiseController(ghost_batch_size=4, seed=5)
    net = controller.apply(body())
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    model, optimizer = fabric.setup(net, optimizer)
    controller.on_step(0, 0)
    controller.on_step(0, 1)
    fabric.save(tmp_path / "ckpt", {"model": model, "optimizer": optimizer, "ghost_noise": controller})

    restored = GhostNoiseController(ghost_batch_size=4)
    net2 = restored.apply(body())
    optimizer2 = torch.optim.SGD(net2.parameters(), lr=0.1)
    model2, optimizer2 = fabric.setup(net2, optimizer2)
    fabric.load(tmp_path / "ckpt", {"model": model2, "optimizer": optimizer2, "ghost_noise": restored})
    assert (
        restored.state_dict()
        == controller.state_dict()
        == {
            "base_seed": 5,
            "method": "gni",
            "batches": 2,
            "version": 2,
        }
    )
    restored.on_step(0, 2)
    controller.on_step(0, 2)
    assert [layer.seed for layer in restored.layers] == [layer.seed for layer in controller.layers]
