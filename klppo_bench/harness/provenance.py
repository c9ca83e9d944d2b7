"""What a run records about where and how it ran."""

from __future__ import annotations

import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path

PACKAGES = ("klppo-bench", "torch", "torchrl", "tensordict", "gymnasium", "mujoco", "numpy",
            "pandas", "rliable")


def git_commit() -> dict:
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                    cwd=root, capture_output=True, text=True,
                                    timeout=10).stdout.strip())
        return {"commit": commit, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}


def versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def provenance(device: str) -> dict:
    import torch

    info = {
        "git": git_commit(),
        "versions": versions(),
        "device": device,
        "cuda_device_name": torch.cuda.get_device_name(device)
        if device.startswith("cuda") and torch.cuda.is_available() else None,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "processor": platform.processor() or platform.machine(),
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "torch_threads": torch.get_num_threads(),
        "command": " ".join(sys.argv),
    }
    return info
