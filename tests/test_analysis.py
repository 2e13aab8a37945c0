"""Noise analysis: GBN/XBN decomposition, GNI/analytic noise on live layers, laws, effective N, KS, the command."""

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import _noise_reference as ref  # noqa: E402

from lightning_ghostnoise import apply_ghost_noise, ghost_layers  # noqa: E402
from lightning_ghostnoise import noise_stats as NS  # noqa: E402
from lightning_ghostnoise.analysis import (  # noqa: E402
    NoiseRecorder,
    analyze_noise,
    layer_noise,
    plot_histograms,
    plot_noise_vs_n,
)
from lightning_ghostnoise.analyze import load_model, main  # noqa: E402
from lightning_ghostnoise.layers import GhostBatchNorm1d, GhostBatchNorm2d, GhostGroupNorm, GhostLayerNorm  # noqa: E402

scipy_stats = pytest.importorskip("scipy.stats")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _with_affine(module: nn.Module, seed: int = 0) -> nn.Module:
    g = _gen(seed)
    with torch.no_grad():
        module.weight.copy_(torch.rand(module.weight.shape, generator=g) + 0.5)
        module.bias.copy_(torch.randn(module.bias.shape, generator=g))
    return module


def _record(model: nn.Module, x: torch.Tensor) -> dict:
    """The noise each ghost layer of ``model`` injects into one forward, and the output. Gradients are
    recorded, as in training: the layers take their fused paths (``fused=True``)."""
    seen = {}
    with NoiseRecorder(ghost_layers(model), lambda name, layer, noise: seen.__setitem__(name, noise)):
        y = model(x)
    seen["__out__"] = y.detach()
    return seen


# --------------------------------------------------------------------------- KS, laws
def test_ks_matches_scipy():
    g = _gen(0)
    cases = [
        (torch.randn(300, generator=g, dtype=torch.float64), NS.normal_cdf, scipy_stats.norm.cdf),
        (torch.randn(2000, generator=g, dtype=torch.float64) * 1.1 + 0.05, NS.normal_cdf, scipy_stats.norm.cdf),
        (torch.randn(50, generator=g, dtype=torch.float64) / 4, lambda v: NS.shift_cdf(v, 16),
         lambda v: scipy_stats.norm.cdf(v, scale=0.25)),
        (torch.rand(5000, generator=g, dtype=torch.float64) * 2, lambda v: NS.chi2_scale_cdf(v, 8),
         lambda v: scipy_stats.chi2.cdf(8 * v**2, 7)),
        (torch.randn(400, generator=g, dtype=torch.float64) * 1.15, NS.normal_cdf, scipy_stats.norm.cdf),  # p ~ 0.03
        (torch.randn(100, generator=g, dtype=torch.float64) + 0.3, NS.normal_cdf, scipy_stats.norm.cdf),  # p ~ 0.01
    ]
    small = 0
    for values, ours, theirs in cases:
        d, p = NS.ks_test(values, ours)
        d_asymp, p_asymp = NS.ks_test(values, ours, correction=False)
        asymp = scipy_stats.kstest(values.numpy(), theirs, method="asymp")
        exact = scipy_stats.kstest(values.numpy(), theirs, method="exact")
        assert d == d_asymp == pytest.approx(asymp.statistic, abs=1e-12)
        assert p_asymp == pytest.approx(asymp.pvalue, rel=1e-9, abs=1e-300)
        # Stephens' corrected p-value is close to the exact one, closest where it matters
        if exact.pvalue < 0.05:
            small += 1
            assert p == pytest.approx(exact.pvalue, rel=0.02)
        else:
            assert p == pytest.approx(exact.pvalue, abs=0.015 if values.numel() < 100 else 0.01)
        assert abs(p - exact.pvalue) <= abs(p_asymp - exact.pvalue) + 1e-12
    assert small >= 2  # the cases above do reach small p-values


def test_kolmogorov_sf_matches_scipy_over_its_range():
    x = torch.cat([torch.linspace(0.0, 0.3, 7), torch.linspace(0.31, 3.5, 60)]).double()
    expected = torch.tensor(scipy_stats.kstwobign.sf(x.numpy()))
    torch.testing.assert_close(NS.kolmogorov_sf(x), expected, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("n", [2, 4, 16, 64, 7.5])
def test_law_cdfs_and_moments_match_scipy(n):
    s = torch.linspace(0.01, 2.5, 80, dtype=torch.float64)
    torch.testing.assert_close(NS.chi2_scale_cdf(s, n), torch.tensor(scipy_stats.chi2.cdf(n * s.numpy() ** 2, n - 1)))
    torch.testing.assert_close(NS.shift_cdf(s - 1, n), torch.tensor(scipy_stats.norm.cdf(s.numpy() - 1, scale=n**-0.5)))
    # moment-matched law at N_eff: scale**2 ~ mean / d * chi2(d)
    mean = 0.9
    torch.testing.assert_close(
        NS.chi2_scale_cdf(s, n, mean), torch.tensor(scipy_stats.chi2.cdf(s.numpy() ** 2, n - 1, scale=mean / (n - 1)))
    )
    law = NS.law_moments(n, mean)
    d, a = n - 1, mean / (n - 1)
    chi = scipy_stats.chi(d, scale=math.sqrt(a))  # scale = sqrt(a * chi2(d))
    assert float(law["scale_mean"]) == pytest.approx(chi.mean(), rel=1e-9)
    assert float(law["scale_std"]) == pytest.approx(chi.std(), rel=1e-7)
    assert float(law["log_scale_mean"]) == pytest.approx(chi.expect(math.log), rel=1e-6, abs=1e-9)
    log_var = chi.expect(lambda v: math.log(v) ** 2) - chi.expect(math.log) ** 2
    assert float(law["log_scale_std"]) == pytest.approx(math.sqrt(log_var), rel=1e-5)
    assert float(NS.law_moments(n)["shift_std"]) == pytest.approx(n**-0.5)


# --------------------------------------------------------------------------- the noise of live layers
@pytest.mark.parametrize("method", ["gbn", "xbn"])
@pytest.mark.parametrize("batch,n", [(16, 4), (18, 4), (13, 5), (3, 8)])
@pytest.mark.parametrize("fused", [True, False])
def test_gbn_xbn_decomposition_reproduces_the_layer(method, batch, n, fused):
    """BN output + measured noise == the GBN/XBN layer's output, and the noise equals a plain loop's."""
    layer = GhostBatchNorm2d.from_module(_with_affine(nn.BatchNorm2d(3)), method=method, ghost_batch_size=n, fused=fused)
    x = torch.randn(batch, 3, 4, 5, generator=_gen(batch)) * 2 + 1
    model = nn.Sequential(layer).train()
    seen = _record(model, x)
    noise = seen["0"]
    shift, scale = ref.ghost_statistics_noise(x, n, method == "xbn", layer.eps)
    torch.testing.assert_close(noise.shift.double(), shift, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(noise.scale.double(), scale, rtol=1e-4, atol=1e-5)
    rebuilt = ref.with_noise(ref.batch_normalized(x, layer.eps), noise.shift.double(), noise.scale.double(),
                             layer.weight, layer.bias, 1.0)
    torch.testing.assert_close(seen["__out__"].double(), rebuilt, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_gbn_with_strength_is_bn_plus_scaled_noise(strength):
    layer = GhostBatchNorm2d.from_module(_with_affine(nn.BatchNorm2d(4)), method="gbn", ghost_batch_size=4, strength=strength)
    x = torch.randn(16, 4, 3, 3, generator=_gen(1))
    seen = _record(nn.Sequential(layer).train(), x)
    noise = seen["0"]
    shift, scale = noise.injected()
    rebuilt = ref.with_noise(ref.batch_normalized(x, layer.eps), shift.double(), scale.double(), layer.weight, layer.bias, 1.0)
    torch.testing.assert_close(seen["__out__"].double(), rebuilt, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fused", [True, False])
def test_gni_noise_is_the_layers_with_the_same_draws(fused):
    """The recorder's GNI noise equals a plain loop over samples with the layer's own draws, and rebuilds its output."""
    batch, n, seed = 12, 5, 1234
    layer = GhostBatchNorm2d.from_module(_with_affine(nn.BatchNorm2d(3)), method="gni", ghost_batch_size=n, seed=seed, fused=fused)
    x = torch.randn(batch, 3, 3, 4, generator=_gen(2)) * 3 - 1
    seen = _record(nn.Sequential(layer).train(), x)
    indices = torch.randint(0, batch, (batch, n), generator=_gen(seed))  # the layer's first draw after seeding
    x_hat = ref.batch_normalized(x, layer.eps)
    shift, scale = ref.gni_noise(x_hat, indices, layer.noise_eps)
    torch.testing.assert_close(seen["0"].shift.double(), shift, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(seen["0"].scale.double(), scale, rtol=1e-4, atol=1e-5)
    rebuilt = ref.with_noise(x_hat, shift, scale, layer.weight, layer.bias, 1.0)
    torch.testing.assert_close(seen["__out__"].double(), rebuilt, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["gni", "gbn", "xbn", "analytic"])
def test_noise_rebuilds_the_output_of_the_triton_kernel_path(method, monkeypatch):
    """The CUDA kernels (here in Triton's interpreter) compute the noise inside the kernel; the recorder's
    noise, recomputed from the input and the draws, still rebuilds their output."""
    pytest.importorskip("triton")
    from lightning_ghostnoise import kernels

    monkeypatch.setattr(kernels, "ALLOW_CPU", True)
    monkeypatch.delenv("GHOSTNOISE_TRITON", raising=False)
    calls = []
    real = kernels.affine
    monkeypatch.setattr(kernels, "affine", lambda *a: calls.append(1) or real(*a))
    layer = GhostBatchNorm2d.from_module(_with_affine(nn.BatchNorm2d(3)), method=method, ghost_batch_size=4, strength=0.7)
    x = torch.randn(10, 3, 3, 4, generator=_gen(8)) * 2 + 1
    seen = {}
    with NoiseRecorder([("0", layer)], lambda name, layer, noise: seen.__setitem__(name, noise)):
        seen["__out__"] = layer.train()(x).detach()  # with gradients recorded: the fused (kernel) path
    assert calls, "the kernel path was not taken"
    shift, scale = seen["0"].injected()
    rebuilt = ref.with_noise(ref.batch_normalized(x, layer.eps), shift.double(), scale.double(), layer.weight, layer.bias, 1.0)
    torch.testing.assert_close(seen["__out__"].double(), rebuilt, rtol=1e-4, atol=1e-4)


def test_analytic_noise_is_the_layers_with_the_same_draws():
    batch, n, seed = 10, 6, 77
    layer = GhostBatchNorm1d.from_module(_with_affine(nn.BatchNorm1d(5)), method="analytic", ghost_batch_size=n, seed=seed)
    x = torch.randn(batch, 5, generator=_gen(3))
    seen = _record(nn.Sequential(layer).train(), x)
    g = _gen(seed)
    normal = torch.randn(batch, 5, generator=g)
    gamma = torch._standard_gamma(torch.full((batch, 5), (n - 1) / 2), generator=g)
    torch.testing.assert_close(seen["0"].shift, normal / math.sqrt(n))
    torch.testing.assert_close(seen["0"].scale, torch.sqrt(2 * gamma / n))
    rebuilt = ref.with_noise(ref.batch_normalized(x, layer.eps), seen["0"].shift.double(), seen["0"].scale.double(),
                             layer.weight, layer.bias, 1.0)
    torch.testing.assert_close(seen["__out__"].double(), rebuilt, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["layernorm", "groupnorm"])
def test_gni_after_layernorm_and_groupnorm(kind):
    batch, n, seed = 8, 4, 5
    if kind == "layernorm":
        plain, x, channel_dim = nn.LayerNorm(6), torch.randn(batch, 5, 6, generator=_gen(4)), -1
        layer = GhostLayerNorm.from_module(_with_affine(plain), ghost_batch_size=n, seed=seed)
        x_hat = torch.nn.functional.layer_norm(x.double(), (6,), eps=plain.eps)
    else:
        plain, x, channel_dim = nn.GroupNorm(2, 4), torch.randn(batch, 4, 3, 3, generator=_gen(4)), 1
        layer = GhostGroupNorm.from_module(_with_affine(plain), ghost_batch_size=n, seed=seed)
        x_hat = torch.nn.functional.group_norm(x.double(), 2, eps=plain.eps)
    seen = _record(nn.Sequential(layer).train(), x)
    indices = torch.randint(0, batch, (batch, n), generator=_gen(seed))
    shift, scale = ref.gni_noise(x_hat, indices, layer.noise_eps, channel_dim)
    torch.testing.assert_close(seen["0"].shift.double(), shift, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(seen["0"].scale.double(), scale, rtol=1e-4, atol=1e-5)
    rebuilt = ref.with_noise(x_hat, shift, scale, layer.weight, layer.bias, 1.0, channel_dim)
    torch.testing.assert_close(seen["__out__"].double(), rebuilt, rtol=1e-4, atol=1e-4)


def test_recorder_leaves_nothing_behind_and_sees_inactive_layers():
    model = apply_ghost_noise(nn.Sequential(nn.BatchNorm1d(4), nn.BatchNorm1d(4)), 4, warn=False)
    model[1].strength = 0.0
    seen = []
    recorder = NoiseRecorder(ghost_layers(model), lambda name, layer, noise: seen.append((name, noise is None)))
    with torch.no_grad(), recorder:
        model.train()(torch.randn(8, 4))
        assert all("noise_observer" in layer.__dict__ for layer in model)
    assert seen == [("0", False), ("1", True)]
    for layer in model:
        assert "noise_observer" not in layer.__dict__ and layer.noise_observer is None
        assert not layer._forward_hooks
        assert "noise_observer" not in layer.to_plain().__dict__
    model(torch.randn(8, 4))
    assert len(seen) == 2


def test_the_idle_observer_keeps_compiled_graphs_whole():
    """With no recorder attached (``noise_observer`` None) the ghost layers compile without a graph break."""
    torch._dynamo.reset()
    model = nn.Sequential(
        GhostBatchNorm2d.from_module(nn.BatchNorm2d(3), method="gni", ghost_batch_size=2),
        nn.Flatten(2),
        GhostLayerNorm.from_module(nn.LayerNorm(4), method="analytic", ghost_batch_size=2),
    ).train()
    try:
        explanation = torch._dynamo.explain(model)(torch.randn(4, 3, 2, 2))
        assert explanation.graph_break_count == 0, explanation.break_reasons
    finally:
        torch._dynamo.reset()


def test_isolated_mode_passes_on_the_plain_output():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
    x = torch.randn(16, 2, 5, 5, generator=_gen(5))
    with torch.no_grad():
        expected = plain.train()(x)
    ghost = apply_ghost_noise(__import__("copy").deepcopy(plain), 4, "gbn", warn=False).train()
    with torch.no_grad(), NoiseRecorder(ghost_layers(ghost), lambda *a: None, plain_output=True):
        torch.testing.assert_close(ghost(x), expected)


# --------------------------------------------------------------------------- the law, effective N
def _bn1d(channels: int) -> nn.Module:
    return nn.Sequential(nn.BatchNorm1d(channels))


@pytest.mark.parametrize("n", [4, 16, 64])
def test_one_gaussian_value_per_sample_follows_the_law(n):
    """GNI and analytic GNI on one Gaussian value per (sample, channel): KS against the law at N passes."""
    x = torch.randn(512, 32, generator=_gen(10 + n))
    result = analyze_noise(_bn1d(32), x, [n], ["gni", "analytic", "gbn", "xbn"], seed=n)
    for method in ("gni", "analytic"):
        s = result.summary(method, n, "0")
        assert s.ks_shift[1] > 0.01 and s.ks_scale[1] > 0.01, (method, s.ks_shift, s.ks_scale)
        assert s.shift_std == pytest.approx(n**-0.5, rel=0.05)
        assert s.log_scale_std == pytest.approx(s.law["log_scale_std"], rel=0.06)
        assert s.n_eff_shift == pytest.approx(n, rel=0.01)
        assert s.n_eff_scale == pytest.approx(n, rel=0.1)
    # GBN and XBN draw without replacement (and XBN from N - 1 others): their law at N_eff fits
    for method in ("gbn", "xbn"):
        s = result.summary(method, n, "0")
        assert s.ks_count == 32 * (512 // n)  # one value per ghost batch and channel
        assert s.ks_shift_eff[1] > 0.01 and s.ks_scale_eff[1] > 0.01, (method, s.ks_shift_eff, s.ks_scale_eff)
    assert result.summary("xbn", n, "0").n_eff_shift == pytest.approx((n - 1) * 510 / (512 - n), rel=0.01)


def test_xbn_small_ghost_batches_fail_the_law_at_n():
    """The test has power: XBN(4) averages 3 samples, and KS against the law at N = 4 rejects it."""
    result = analyze_noise(_bn1d(32), torch.randn(512, 32, generator=_gen(3)), [4], ["xbn"])
    s = result.summary("xbn", 4, "0")
    assert s.ks_shift[1] < 1e-4 and s.ks_scale[1] < 1e-4
    assert s.shift_std == pytest.approx(3**-0.5, rel=0.05)


@pytest.mark.parametrize("n", [4, 16])
def test_independent_positions_give_the_weaker_noise_pooling_predicts(n):
    positions = 16
    x = torch.randn(256, 16, 4, 4, generator=_gen(20 + n))
    result = analyze_noise(nn.Sequential(nn.BatchNorm2d(16)), x, [n], ["gni", "gbn"], seed=1)
    s = result.summary("gni", n, "0")
    assert s.positions == positions
    assert s.rho == pytest.approx(1 / positions, rel=0.1)
    assert s.n_eff_shift == pytest.approx(n * positions, rel=0.1)
    assert s.n_eff_scale == pytest.approx(n * positions, rel=0.15)
    assert s.shift_std == pytest.approx((n * positions) ** -0.5, rel=0.05)
    assert s.ks_shift[1] < 1e-10 and s.ks_scale[1] < 1e-10  # far weaker than the law at N
    assert s.ks_shift_eff[1] > 0.01 and s.ks_scale_eff[1] > 0.01  # the law at N_eff fits
    g = result.summary("gbn", n, "0")
    assert g.shift_std == pytest.approx(g.law_eff["shift_std"], rel=0.1)
    assert g.ks_shift_eff[1] > 0.01 and g.ks_scale_eff[1] > 0.01


def test_predicted_moments_are_exact_for_gni_on_correlated_non_gaussian_maps():
    """Over many draws on one batch, GNI's noise has the predicted per-channel moments (its derivation is
    exact for draws with replacement), here for skewed per-sample components plus correlated positions."""
    g = _gen(30)
    batch, channels, n = 128, 6, 8
    per_sample = torch.empty(batch, channels, 1, 1).exponential_(generator=g) * torch.linspace(0.3, 2, channels).reshape(1, -1, 1, 1)
    x = per_sample + torch.randn(batch, channels, 5, 5, generator=g).cumsum(-1) * 0.3
    layer = GhostBatchNorm2d.from_module(nn.BatchNorm2d(channels), method="gni", ghost_batch_size=n, seed=3)
    shifts, scales2 = [], []
    for _ in range(300):
        noise = layer_noise(layer, x)
        shifts.append(noise.standardized_shift().double())
        scales2.append(noise.scale.double().square())
    z, s2 = torch.cat(shifts), torch.cat(scales2)
    pred = noise.prediction()
    assert 0.2 < float(pred.rho.mean()) < 0.9  # neither one value per sample nor independent positions
    torch.testing.assert_close(z.var(0, correction=0), pred.shift_var, rtol=0.05, atol=0)
    torch.testing.assert_close(s2.mean(0), pred.scale2_mean, rtol=0.01, atol=0)
    torch.testing.assert_close(s2.var(0, correction=0), pred.scale2_var, rtol=0.08, atol=0)


# --------------------------------------------------------------------------- analyze_noise on a network
def test_analyze_noise_on_a_resnet_and_plots(tmp_path):
    from lightning_ghostnoise.models import small_resnet

    torch.manual_seed(0)
    net = small_resnet(8, 4)
    x = torch.randn(64, 1, 12, 12, generator=_gen(6))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    for mode in ("live", "isolated"):
        result = analyze_noise(net, [(x, None), (x.flip(0), None)], [4, 8], num_batches=2, mode=mode)
        assert len(result.layers) == 7 and result.methods == ["gni", "gbn", "xbn", "analytic"]
        assert len(result.summaries) == 4 * 2 * 7
        for s in result.summaries:
            assert s.mode == mode and s.count == 2 * 64 * s.channels
            assert math.isfinite(s.shift_std) and s.scale_mean > 0
        data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
        assert len(data["results"]) == len(result.summaries)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k  # the model itself is untouched
    plot_histograms(result, tmp_path / "h.png", 4)
    plot_noise_vs_n(result, tmp_path / "s.png", "shift_std")
    plot_noise_vs_n(result, tmp_path / "l.png", "log_scale_std")
    for name in ("h.png", "s.png", "l.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_analyze_noise_skips_gbn_without_batchnorm_and_validates():
    from lightning_ghostnoise.models import TinyTransformer

    net = TinyTransformer(dim=8, depth=1, heads=2, image_size=8, patch_size=4)
    result = analyze_noise(net, torch.randn(16, 1, 8, 8), [4], ["gni", "gbn"])
    assert "gbn" in result.skipped and result.methods == ["gni"]
    assert len(result.layers) == 3  # two LayerNorms in the block and the final one
    with pytest.raises(ValueError, match=">= 2"):
        analyze_noise(net, torch.randn(16, 1, 8, 8), [1])
    with pytest.raises(ValueError, match="unknown method"):
        analyze_noise(net, torch.randn(16, 1, 8, 8), [4], ["bn"])
    with pytest.raises(ValueError, match="mode"):
        analyze_noise(net, torch.randn(16, 1, 8, 8), [4], mode="both")
    with pytest.raises(TypeError, match="batch must be"):
        analyze_noise(net, [{"x": 1}], [4])


# --------------------------------------------------------------------------- the command
_TINY = ["--model-kwargs", '{"width": 4}', "--batch-size", "32", "--batches", "1", "--ghost-batch-sizes", "4,8",
         "--train-steps", "2", "--train-batch-size", "16"]


def test_command_writes_plots_and_json(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_TINY + ["--out-dir", str(out), "--dpi", "30"]) == 0
    names = sorted(os.listdir(out))
    assert names == sorted([
        "noise_analysis.json", "histograms_N8.png", "shift_std_vs_n.png", "log_scale_std_vs_n.png",
        "histograms_N8_isolated.png", "shift_std_vs_n_isolated.png", "log_scale_std_vs_n_isolated.png",
    ])
    data = json.loads((out / "noise_analysis.json").read_text())
    assert data["meta"]["train_steps"] == 2 and data["meta"]["model"] == "resnet8"
    assert {r["mode"] for r in data["live"]["results"]} == {"live"}
    assert len(data["isolated"]["results"]) == 4 * 2 * 7
    assert "Wrote" in capsys.readouterr().out


def test_command_validates_before_any_work(tmp_path, capsys):
    out = tmp_path / "never"
    for args, message in [
        (["--methods", "gni,bn"], "unknown method"),
        (["--ghost-batch-sizes", "1,4"], ">= 2"),
        (["--ghost-batch-sizes", "4,x"], "integers"),
        (["--batch-size", "1"], ">= 2"),
        (["--checkpoint", str(tmp_path / "missing.ckpt")], "no such file"),
        (["--model", "vgg"], "unknown model"),
        (["--model-kwargs", "[1]"], "JSON object"),
        (["--ghost-batch-sizes", "4,8", "--hist-ghost-batch-size", "32"], "not among"),
        (["--modes", "live,both"], "modes"),
    ]:
        assert main(args + ["--out-dir", str(out)]) == 2, args
        assert message in capsys.readouterr().err, args
    assert not out.exists()


def test_command_reads_checkpoints_and_explains_bad_ones(tmp_path, capsys):
    net, info = load_model(None, "resnet8", {"width": 4})
    lightning_like = {"state_dict": {f"model.{k}": v for k, v in net.state_dict().items()},
                      "hyper_parameters": {"model": "resnet8", "model_kwargs": {"width": 4}, "num_classes": 10}}
    torch.save(lightning_like, tmp_path / "a.ckpt")
    loaded, info = load_model(str(tmp_path / "a.ckpt"))
    assert info["name"] == "resnet8" and info["kwargs"] == {"width": 4}
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, net.state_dict()[k])
    torch.save(net.state_dict(), tmp_path / "b.pt")
    loaded, _ = load_model(str(tmp_path / "b.pt"), "resnet8", {"width": 4})
    assert torch.equal(loaded.stem.weight, net.stem.weight)
    # a checkpoint with ghost noise layers in it loads into the plain model (same keys)
    ghost = apply_ghost_noise(net, 4, warn=False)
    torch.save(ghost.state_dict(), tmp_path / "g.pt")
    load_model(str(tmp_path / "g.pt"), "resnet8", {"width": 4})

    (tmp_path / "bad.ckpt").write_bytes(b"not a checkpoint")
    assert main(["--checkpoint", str(tmp_path / "bad.ckpt"), "--out-dir", str(tmp_path / "o")]) == 2
    assert "cannot read checkpoint" in capsys.readouterr().err
    assert main(["--checkpoint", str(tmp_path / "b.pt"), "--out-dir", str(tmp_path / "o")]) == 2  # width 16 by default
    err = capsys.readouterr().err
    assert "do not fit model 'resnet8'" in err and "shape mismatches" in err and "--model-kwargs" in err
