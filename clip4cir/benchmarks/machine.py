"""A description of the machine a benchmark ran on: CPU, cores, GPU and library versions."""
from __future__ import annotations

import os
import platform

import faiss
import gradio
import numpy as np
import open_clip
import torch


def machine() -> dict:
    """CPU model, cores, torch threads, GPU name (None without one) and the versions of the main libraries."""
    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "gpu": None,
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "open_clip": open_clip.__version__, "faiss": faiss.__version__, "gradio": gradio.__version__,
                         "numpy": np.__version__}}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
