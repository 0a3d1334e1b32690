"""Which torch device a run uses: shared by inference (model/captioner.py) and training."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")  # one entry per GPU the NVIDIA driver sees
CPU_QUOTA = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" or "max <period>"


def usable_cpus(quota_file: Path = CPU_QUOTA) -> int:
    """The cores this process may run on at once: its CPU affinity, capped by its cgroup's CPU
    quota (`docker run --cpus 1.5` gives 2), so that a container does not start a thread per
    core of its host."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = quota_file.read_text().split()[:2]
        return max(1, min(cores, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):  # no cgroup v2 file, or "max": no quota
        return cores


def resolve_device(device: str = "auto") -> torch.device:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("DEVICE=cuda but no CUDA device is available")
    return torch.device(device)


class TorchMissing(RuntimeError):
    """Something needs torch, and this install leaves it out; str() says what and what to do."""


def require_torch(what: str):
    """torch, or a TorchMissing error that says `what` needs it where this install leaves it out (a
    serving-only install such as the Docker image, which serves from a prebuilt bundle)."""
    try:
        import torch
    except ImportError:
        raise TorchMissing(
            f"{what} needs torch, which this install leaves out: it serves only the weights "
            "whose serving bundle was built in (the Docker image builds it from weights/; "
            "rebuild the image with the weights you want, or install torch)"
        ) from None
    return torch


def serving_device(device: str = "auto") -> str:
    """`resolve_device` for inference, as a string, without importing torch (506 MB of resident
    memory) where there is no NVIDIA GPU to ask CUDA about: "auto" is then "cpu"."""
    if device == "cpu" or (
        device == "auto" and not (NVIDIA_GPUS.is_dir() and any(NVIDIA_GPUS.iterdir()))
    ):
        return "cpu"
    return str(resolve_device(device))
