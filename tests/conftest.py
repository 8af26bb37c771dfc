"""Suite-wide set-up.

Without CUDA, Triton kernels can only run under Triton's CPU interpreter, which reads
TRITON_INTERPRET when kernels are decorated, so it is set here before any test imports `kernels`.
"""

import os

import torch

CUDA = torch.cuda.is_available()

if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
