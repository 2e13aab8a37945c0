"""analyze_noise (lightning_ghostnoise.analysis.measure): the law, the effective N, a whole network, the plots."""

import json
import math

import pytest
import torch
from torch import nn

from lightning_ghostnoise.analysis import (
    analyze_noise,
    layer_noise,
    plot_histograms,
    plot_noise_vs_n,
)
from lightning_ghostnoise.layers import GhostBatchNorm2d


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


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


@pytest.mark.slow
def test_predicted_moments_are_exact_for_gni_on_correlated_non_gaussian_maps():
    """Over many draws on one batch, GNI's noise has the predicted per-channel moments (its derivation is
    exact for draws with replacement), here for skewed per-sample components plus correlated positions."""
    g = _gen(30)
    batch, channels, n = 128, 6, 8
    per_sample = torch.empty(batch, channels, 1, 1).exponential_(generator=g) * torch.linspace(
        0.3, 2, channels
    ).reshape(1, -1, 1, 1)
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
@pytest.mark.slow
def test_analyze_noise_on_a_resnet_and_plots(tmp_path):
    from lightning_ghostnoise.experiments.models import small_resnet

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
    from lightning_ghostnoise.experiments.models import TinyTransformer

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
