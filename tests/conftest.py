"""Set for every test directory before any test module is imported.

Triton reads TRITON_INTERPRET when a kernel module is first imported, and test modules outside
tests/runtime import the runtime too (through loraplane.testing), so the choice is made here,
once. Only where no GPU exists: on a GPU machine the kernels run for real.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
