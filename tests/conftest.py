"""Set-up shared by every test module (environment, fixtures)."""

import os

import torch

# Without a GPU the Triton kernels (lightning_ghostnoise.kernels) run in Triton's interpreter, on CPU
# tensors, for the tests that ask for them. Triton reads this when the kernels are defined, i.e. before
# lightning_ghostnoise is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
