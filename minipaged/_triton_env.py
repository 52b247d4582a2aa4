"""Switch Triton to its interpreter on a machine without a CUDA device, before triton is imported.

Triton runs kernels on CPU tensors only through its interpreter, and the switch, the environment
variable TRITON_INTERPRET=1, is read when triton and its kernels are defined: once triton is imported
it is too late. transformers imports triton, so minipaged's first import does this, and only when it
is safe: triton is installed, no CUDA device is present (so nothing could run compiled anyway), the
variable is unset, and triton has not been imported yet. Otherwise minipaged.fast says what to set.

Asking torch whether there is a device costs its import (a second or more), and `import minipaged`
must stay fast (`minipaged --help` loads no torch): so a Linux machine with no GPU device file is
known to have no device without asking; torch is asked only where a device file exists, or off Linux.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys

# Where a GPU driver shows its devices on Linux: NVIDIA (/dev/nvidiactl, /dev/nvidia0, ...), AMD ROCm
# (/dev/kfd) and WSL2 (/dev/dxg). A process, in a container or not, can reach a GPU only through them.
GPU_DEVICE_FILES = ("/dev/nvidia*", "/dev/kfd", "/dev/dxg")


def no_gpu_device_file() -> bool:
    """True on Linux when none of GPU_DEVICE_FILES exists: no process here can use a GPU."""
    return sys.platform.startswith("linux") and not any(
        glob.glob(pattern) for pattern in GPU_DEVICE_FILES
    )


def cuda_device_present() -> bool:
    """Whether torch sees a CUDA device; imports torch only where a GPU device file exists (or off Linux)."""
    if no_gpu_device_file():
        return False
    import torch

    return torch.cuda.is_available()


def use_triton_interpreter_without_gpu() -> bool:
    """Set TRITON_INTERPRET=1 if it is safe (see the module docstring); return whether it was set."""
    if (
        "TRITON_INTERPRET" in os.environ
        or "triton" in sys.modules
        or importlib.util.find_spec("triton") is None
        or cuda_device_present()
    ):
        return False
    os.environ["TRITON_INTERPRET"] = "1"
    return True
