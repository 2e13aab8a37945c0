"""The ``ghostnoise`` application: experiments built on the plugin, never imported by it.

* :mod:`~lightning_ghostnoise.experiments.cli`: the ``ghostnoise`` command (``fit`` and the other
  LightningCLI subcommands, ``compare``, ``analyze``);
* :mod:`~lightning_ghostnoise.experiments.compare` (with ``compare_methods``, ``compare_run``,
  ``compare_stats``, ``compare_plots``): ``ghostnoise compare``;
* :mod:`~lightning_ghostnoise.experiments.analyze`: ``ghostnoise analyze``;
* :mod:`~lightning_ghostnoise.experiments.flags`: the flag vocabulary the subcommands share;
* :mod:`~lightning_ghostnoise.experiments.data` and
  :mod:`~lightning_ghostnoise.experiments.fashion_mnist`: Fashion-MNIST as a ``LightningDataModule``;
* :mod:`~lightning_ghostnoise.experiments.models`: the bundled models and the ``Classifier``.

Everything here needs Lightning; the plugin (``lightning_ghostnoise`` outside this package) works
without this package.

Example:
    >>> from lightning_ghostnoise.experiments.models import build_model
    >>> build_model("resnet8", width=4).__class__.__name__
    'PreActResNet'
"""
