"""Shared pieces of the benchmark scripts: device synchronization, environment facts, result files."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import torch

import popvec

RESULTS = Path(__file__).parent / "results"


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock timings cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def environment(device: torch.device) -> dict[str, Any]:
    """Device name, thread count and versions recorded with every result."""
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "device_type": device.type,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "popvec": popvec.__version__,
    }


def write_report(report: dict[str, Any], out: str | Path | None, default_name: str) -> Path:
    """Write ``report`` as JSON to ``out`` (default ``benchmarks/results/<default_name>``)."""
    path = Path(out) if out else RESULTS / default_name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")
    return path
