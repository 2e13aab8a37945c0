"""The noise analysis' pure math (lightning_ghostnoise.analysis.noise_stats): KS tests and the laws against scipy."""

import math

import pytest
import torch

from lightning_ghostnoise.analysis import noise_stats as NS

scipy_stats = pytest.importorskip("scipy.stats")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_ks_matches_scipy():
    g = _gen(0)
    cases = [
        (torch.randn(300, generator=g, dtype=torch.float64), NS.normal_cdf, scipy_stats.norm.cdf),
        (torch.randn(2000, generator=g, dtype=torch.float64) * 1.1 + 0.05, NS.normal_cdf, scipy_stats.norm.cdf),
        (
            torch.randn(50, generator=g, dtype=torch.float64) / 4,
            lambda v: NS.shift_cdf(v, 16),
            lambda v: scipy_stats.norm.cdf(v, scale=0.25),
        ),
        (
            torch.rand(5000, generator=g, dtype=torch.float64) * 2,
            lambda v: NS.chi2_scale_cdf(v, 8),
            lambda v: scipy_stats.chi2.cdf(8 * v**2, 7),
        ),
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
