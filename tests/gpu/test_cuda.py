"""Correctness checks that need a CUDA GPU (CI has none): skipped without one.

pytest -m gpu tests/gpu
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_ghostnoise import apply_ghost_noise, backends, config, ghost_layers
from lightning_ghostnoise import functional as GF
from lightning_ghostnoise.seeding import derive_seed

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

METHODS = ("gni", "gbn", "xbn", "analytic")
dev = torch.device("cuda")


def small_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 8),
        nn.BatchNorm1d(8),
        nn.LayerNorm(8),
        nn.Linear(8, 10),
    )


def test_no_sync() -> None:
    """no host-device synchronization while training (sync debug mode 'error'), every method, with per-step reseeding."""
    for method in METHODS:
        model = apply_ghost_noise(small_net(), 8, method=method, seed=1).to(dev)
        x = torch.randn(32, 3, 16, 16, device=dev)
        model(x).sum().backward()  # warm-up (lazy CUDA init may sync)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for step in range(3):
                for index, (_, layer) in enumerate(ghost_layers(model)):
                    layer.reseed(derive_seed(1, 0, step, index))
                    layer.strength = 0.5 + 0.1 * step
                model(x).sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()


def test_fused_matches() -> None:
    """fused and plain-autograd paths agree on CUDA (outputs and gradients), every BN method."""
    torch.manual_seed(0)
    x = (torch.randn(24, 8, 6, 6, device=dev) * 2 + 1).requires_grad_()
    w = torch.randn(8, device=dev, requires_grad=True)
    b = torch.randn(8, device=dev, requires_grad=True)
    idx = GF.ghost_indices(24, 6, generator=torch.Generator(dev).manual_seed(3))
    fns = {
        "gbn": lambda f: backends.ghost_batch_norm(x, 6, None, None, w, b, strength=0.7, fused=f),
        "xbn": lambda f: backends.exclusive_batch_norm(x, 6, None, None, w, b, fused=f),
        "gni": lambda f: backends.ghost_noise_batch_norm(
            x, lambda m, v: GF.ghost_noise(m, v, idx), None, None, w, b, fused=f
        ),
    }
    g = torch.randn_like(x)
    for name, fn in fns.items():
        outs = []
        for fused in (True, False):
            y = fn(fused)
            outs.append((y, *torch.autograd.grad(y, (x, w, b), g)))
        for a, c in zip(*outs):
            torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-4, msg=name)


def test_normalized_native() -> None:
    """LayerNorm/GroupNorm on CUDA: the native-statistics path, float32 and under bf16 autocast (a bf16 input, cast by autocast), agrees with plain autograd."""
    torch.manual_seed(0)
    cases = [
        (backends.NativeLayerNorm((32,)), (16, 10, 32), -1, None),
        (backends.NativeGroupNorm(4), (16, 8, 5, 5), 1, None),
        (backends.NativeGroupNorm(4), (16, 8, 5, 5), 1, torch.channels_last),
    ]
    for norm, shape, channel_dim, fmt in cases:
        x = torch.randn(shape, device=dev) * 2 + 1
        x = x.to(memory_format=fmt) if fmt is not None else x
        channels = shape[channel_dim]
        w = torch.rand(channels, device=dev) + 0.5
        b = torch.randn(channels, device=dev)
        idx = GF.ghost_indices(shape[0], 4, generator=torch.Generator(dev).manual_seed(1), device=dev)
        g = torch.randn(shape, device=dev)
        for autocast in (False, True):
            outs = []
            for fused in (None, False):
                xr, wr, br = (t.clone().requires_grad_() for t in ((x.bfloat16() if autocast else x), w, b))
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                    y = backends.normalized_noise(
                        xr, norm, GF.GhostDraws(indices=idx), wr, br, channel_dim=channel_dim, fused=fused
                    )
                outs.append((y.float(), *(t.float() for t in torch.autograd.grad(y, (xr, wr, br), g.to(y.dtype)))))
            tol = 5e-2 if autocast else 1e-4
            for a, c in zip(*outs):
                torch.testing.assert_close(a, c, rtol=tol, atol=tol, msg=f"{type(norm).__name__} autocast={autocast}")


def test_counter_rng_device_independent() -> None:
    """counter-based generator (torch.compile's source) gives the same draws on CUDA as on CPU."""
    from lightning_ghostnoise.functional import counter_rng

    key_cpu = counter_rng.mix_key(torch.tensor(123456789012), 3)
    key_gpu = counter_rng.mix_key(torch.tensor(123456789012, device=dev), 3)
    assert torch.equal(
        counter_rng.uniform_ints(key_cpu, (64, 16), 256), counter_rng.uniform_ints(key_gpu, (64, 16), 256).cpu()
    )
    torch.testing.assert_close(counter_rng.normal(key_cpu, (1000,)), counter_rng.normal(key_gpu, (1000,)).cpu())


def test_bf16() -> None:
    """bf16 autocast + channels_last on CUDA: finite, channels_last kept, every method."""
    for method in METHODS:
        layer = apply_ghost_noise(nn.BatchNorm2d(16), 8, method=method).to(dev)
        x = torch.randn(32, 16, 8, 8, device=dev).to(memory_format=torch.channels_last).requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer(x.to(torch.bfloat16))
        y.float().sum().backward()
        assert torch.isfinite(y.float()).all() and torch.isfinite(x.grad).all(), method
        assert y.is_contiguous(memory_format=torch.channels_last), method


def test_compile() -> None:
    """torch.compile (inductor) on CUDA: every method runs and matches eager with the same draws."""
    for method in METHODS:
        model = apply_ghost_noise(small_net(), 8, method=method, seed=2).to(dev)
        x = torch.randn(32, 3, 16, 16, device=dev)
        eager_model = copy.deepcopy(model)
        for _, layer in ghost_layers(eager_model):
            layer.counter_rng = True  # the generator torch.compile uses
        compiled = torch.compile(model)
        for (_, a), (_, b) in zip(ghost_layers(model), ghost_layers(eager_model)):
            a.reseed(5)
            b.reseed(5)
        y_c = compiled(x)
        y_e = eager_model(x)
        assert torch.isfinite(y_c).all(), method
        torch.testing.assert_close(y_c, y_e, rtol=2e-3, atol=2e-3, msg=method)
        y_c.sum().backward()


def test_cudagraphs() -> None:
    """CUDA graphs: torch.compile(mode='reduce-overhead'), 3 SGD steps match eager, coefficient kernels in the graph on and off."""
    from lightning_ghostnoise.backends.triton import launcher

    for in_graph in ("1", "0"):
        if in_graph == "1":
            config.enable_compiled_kernels(True)
        config.settings().compiled_kernels = in_graph == "1"
        for method in ("gni", "gbn"):
            torch._dynamo.reset()
            model = apply_ghost_noise(small_net(), 8, method=method, seed=2).to(dev)
            eager_model = copy.deepcopy(model)
            for _, layer in ghost_layers(eager_model):
                layer.counter_rng = True  # the generator torch.compile uses
            calls: list[bool] = []  # per coefficient-kernel launch: whether the compiled model was running
            active = [False]
            name = "_gni_coefficients_kernel" if method == "gni" else "_ghost_stats_coefficients_kernel"
            real = launcher.launch

            def launch(fn, *args, _real=real, _name=name, _calls=calls, _active=active, **meta):
                if fn.__name__ == _name:
                    _calls.append(_active[0])
                return _real(fn, *args, **meta)

            launcher.launch = launch
            try:
                compiled = torch.compile(model, mode="reduce-overhead")
                opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (model, eager_model)]
                x = torch.randn(32, 3, 16, 16, device=dev)
                for _ in range(3):
                    torch.compiler.cudagraph_mark_step_begin()
                    outs = []
                    for net, opt in zip((compiled, eager_model), opts):
                        active[0] = net is compiled
                        opt.zero_grad()
                        y = net(x)
                        y.square().mean().backward()
                        opt.step()
                        outs.append(y.detach().clone())
                    active[0] = False
                    torch.testing.assert_close(outs[0], outs[1], rtol=2e-3, atol=2e-3, msg=f"{method} {in_graph}")
                torch.testing.assert_close(model[1].running_mean, eager_model[1].running_mean, rtol=1e-3, atol=1e-4)
                torch.testing.assert_close(model[0].weight, eager_model[0].weight, rtol=1e-3, atol=1e-4)
                # with the variable set the graph called the kernel (while recording); without, never
                assert any(calls) == (in_graph == "1"), (method, in_graph, calls)
            finally:
                launcher.launch = real
    config.settings().compiled_kernels = False


def test_lightning() -> None:
    """Lightning fit on one GPU with GhostNoise (bf16-mixed), every method."""
    import lightning.pytorch as pl

    from lightning_ghostnoise import GhostNoise

    class M(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = small_net()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.TensorDataset(torch.randn(128, 3, 16, 16), torch.randint(0, 10, (128,)))
    for method in METHODS:
        trainer = pl.Trainer(
            accelerator="gpu",
            devices=1,
            precision="bf16-mixed",
            max_steps=4,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[GhostNoise(8, method=method, seed=0)],
        )
        trainer.fit(M(), torch.utils.data.DataLoader(data, batch_size=32))


def test_fast_launch_takes_the_compiled_launcher_with_the_same_bits() -> None:
    """The cached launch (Triton and torch internals) is taken on CUDA and gives the same bits as Triton's own."""
    from lightning_ghostnoise.backends.triton import launcher

    assert launcher.internals_present()
    outs = []
    for fast in (False, True):
        with config.override(fast_launch=fast):
            layer = apply_ghost_noise(nn.BatchNorm2d(16), 8, method="gbn").to(dev)
            x = torch.randn(32, 16, 8, 8, device=dev, generator=torch.Generator(dev).manual_seed(0)).requires_grad_()
            for _ in range(2):  # the second call goes through the cache
                y = layer(x)
            y.sum().backward()
            outs.append((y.detach(), x.grad))
    assert any(hit for kept in launcher._LAUNCHERS.values() for hit in kept.cache.values()), "fast path not taken"
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
