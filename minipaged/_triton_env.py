"""Switch Triton to its interpreter on a machine without a CUDA device, before triton is imported.

Triton runs kernels on CPU tensors only through its interpreter, and the switch, the environment
variable TRITON_INTERPRET=1, is read when triton and its kernels are defined: once triton is imported
it is too late. transformers imports triton, so minipaged's first import does this, and only when it
is safe: triton is installed, no CUDA device is present (so nothing could run compiled anyway), the
variable is unset, and triton has not been imported yet. Otherwise minipaged.fast says what to set.
"""

from __future__ import annotations

import importlib.util
import os
import sys


def use_triton_interpreter_without_gpu() -> bool:
    """Set TRITON_INTERPRET=1 if it is safe (see the module docstring); return whether it was set."""
    if (
        "TRITON_INTERPRET" in os.environ
        or "triton" in sys.modules
        or importlib.util.find_spec("triton") is None
    ):
        return False
    import torch

    if torch.cuda.is_available():
        return False
    os.environ["TRITON_INTERPRET"] = "1"
    return True
