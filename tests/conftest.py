"""Suite-wide set-up.

Without CUDA, Triton kernels can only run under Triton's CPU interpreter, which reads
TRITON_INTERPRET when kernels are decorated, so it is set here before any test imports `kernels`.
"""

import os

import torch

# open_server / strict_server: real servers shared by tests/v2 and tests/client.
pytest_plugins = ["tests.v2.servers"]

CUDA = torch.cuda.is_available()

if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
