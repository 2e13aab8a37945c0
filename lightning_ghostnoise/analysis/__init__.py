"""Measure the noise that live ghost layers inject, and compare it with theory.

Per layer, per method and per ghost batch size ``N``, :func:`analyze_noise` runs a copy of the model
with ghost noise in training mode and records the shift and scale each (sample, channel) receives;
it then reports moments, the effective ghost batch size ``N_eff`` and Kolmogorov-Smirnov tests
against the law at ``N`` and at ``N_eff``; :func:`plot_histograms` and :func:`plot_noise_vs_n` draw
the results (matplotlib, the ``plot`` extra). The command ``ghostnoise analyze``
(:mod:`lightning_ghostnoise.experiments.analyze`) runs all of it on the bundled model and Fashion-MNIST.

The package, one idea per module:

* :mod:`~lightning_ghostnoise.analysis.noise_stats`: the pure math (GBN/XBN as BN plus noise, the
  laws, ``N_eff``, KS tests);
* :mod:`~lightning_ghostnoise.analysis.recorder`: observing live layers' draws
  (:class:`NoiseRecorder`, :func:`layer_noise`);
* :mod:`~lightning_ghostnoise.analysis.report`: per-layer summaries against the laws, tables, JSON
  (:class:`NoiseAnalysis`);
* :mod:`~lightning_ghostnoise.analysis.measure`: :func:`analyze_noise`;
* :mod:`~lightning_ghostnoise.analysis.plots`: the figures;
* :mod:`~lightning_ghostnoise.analysis.outputs`: result files written atomically (also used by the
  ``ghostnoise`` command).

Example (a whole measurement: :func:`~lightning_ghostnoise.analysis.measure.analyze_noise`):
    >>> from lightning_ghostnoise.analysis.noise_stats import law_moments
    >>> round(float(law_moments(16)["shift_std"]), 2)  # the law's shift std at N = 16: 1 / sqrt(16)
    0.25
"""

from lightning_ghostnoise.analysis.measure import analyze_noise
from lightning_ghostnoise.analysis.plots import plot_histograms, plot_noise_vs_n
from lightning_ghostnoise.analysis.recorder import (
    LayerNoise,
    NoiseRecorder,
    layer_noise,
)
from lightning_ghostnoise.analysis.report import LayerNoiseSummary, NoiseAnalysis

__all__ = [
    "LayerNoise",
    "LayerNoiseSummary",
    "NoiseAnalysis",
    "NoiseRecorder",
    "analyze_noise",
    "layer_noise",
    "plot_histograms",
    "plot_noise_vs_n",
]
