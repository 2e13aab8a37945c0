"""The counter-based generator used under torch.compile: exact integer math, uniformity, and the laws."""

import math
import random

import pytest
import torch
from scipy import stats

from lightning_ghostnoise import functional as GF
from lightning_ghostnoise.functional import counter_rng as CR


def test_mul32_is_exact_modular_multiplication_without_overflow():
    rng = random.Random(0)
    xs = [0, 1, 2**16 - 1, 2**16, 2**31, 2**32 - 1] + [rng.randrange(2**32) for _ in range(2000)]
    for c in (0x7FEB352D, 0x846CA68B, 2**32 - 1):
        got = CR._mul32(torch.tensor(xs, dtype=torch.int64), c)
        assert got.tolist() == [(x * c) % 2**32 for x in xs]


def test_hash32_matches_a_plain_python_lowbias32():
    def lowbias32(x):
        x &= 0xFFFFFFFF
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    xs = list(range(100)) + [2**32 - 1, 123456789, 2**31]
    assert CR.hash32(torch.tensor(xs)).tolist() == [lowbias32(x) for x in xs]


def test_draws_are_pure_functions_of_the_key():
    k1, k2 = CR.mix_key(torch.tensor(7), 0), CR.mix_key(torch.tensor(7), 1)
    assert torch.equal(CR.uniform_ints(k1, (50,), 100), CR.uniform_ints(k1, (50,), 100))
    assert not torch.equal(CR.uniform_ints(k1, (50,), 100), CR.uniform_ints(k2, (50,), 100))
    assert not torch.equal(CR.mix_key(torch.tensor(7)), CR.mix_key(torch.tensor(7 + 2**40)))
    # salts give independent streams from one key
    assert not torch.equal(CR.uniform(k1, (50,), salt=0), CR.uniform(k1, (50,), salt=1))


def test_global_rng_untouched():
    torch.manual_seed(3)
    a = torch.rand(4)
    torch.manual_seed(3)
    CR.normal(CR.mix_key(torch.tensor(1)), (1000,))
    assert torch.equal(torch.rand(4), a)


def test_uniform_ints_are_uniform():
    draws = CR.uniform_ints(CR.mix_key(torch.tensor(11)), (200_000,), 10)
    assert int(draws.min()) == 0 and int(draws.max()) == 9
    counts = torch.bincount(draws, minlength=10).numpy()
    assert stats.chisquare(counts).pvalue > 1e-3
    # consecutive pairs are independent (no lattice structure between neighbours)
    pairs = (draws[:-1] * 10 + draws[1:]).numpy()
    assert stats.chisquare(torch.bincount(torch.from_numpy(pairs), minlength=100).numpy()).pvalue > 1e-3


def test_uniform_and_normal_laws():
    key = CR.mix_key(torch.tensor(5), 3)
    u = CR.uniform(key, (50_000,))
    assert float(u.min()) > 0 and float(u.max()) < 1
    assert stats.kstest(u.numpy(), "uniform").pvalue > 1e-3
    z = CR.normal(key, (50_000,))
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-3
    # a wrong law is rejected: the test has power
    assert stats.kstest((z * 1.05).numpy(), "norm").pvalue < 1e-3


@pytest.mark.parametrize("n", [4, 16])
def test_counter_analytic_noise_follows_the_law(n):
    shift, scale = GF.analytic_noise(20_000, 2, n, key=CR.mix_key(torch.tensor(9)))
    assert abs(float(shift.std()) * math.sqrt(n) - 1) < 0.02
    assert stats.kstest((n * scale.square()).flatten().numpy(), stats.chi2(n - 1).cdf).pvalue > 1e-3
    assert stats.kstest((n * scale.square()).flatten().numpy(), stats.chi2(n).cdf).pvalue < 1e-3


def test_counter_ghost_indices_shape_and_range():
    idx = GF.ghost_indices(7, 5, key=CR.mix_key(torch.tensor(2)), num_rows=3)
    assert idx.shape == (3, 5) and idx.dtype == torch.int64
    assert int(idx.min()) >= 0 and int(idx.max()) < 7


def test_high_out_of_range_is_refused():
    with pytest.raises(ValueError, match="high"):
        CR.uniform_ints(torch.tensor(1), (3,), 0)
