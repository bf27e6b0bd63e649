"""Shared pieces of the benchmark scripts: device synchronization, environment facts, result files,
side-by-side timing, and the three ways to train N models ((a) loop, (b) naive torch.func, (c) popvec)."""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad_and_value, stack_module_state, vmap

import popvec
from popvec import Population, PopulationTrainer

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
        "load_avg_1_5_15": list(os.getloadavg()),
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


def median_seconds(fn: Callable[[], None], device: torch.device, repeats: int, inner: int, warmup: int) -> float:
    """Median over ``repeats`` of the mean time of ``inner`` consecutive calls."""
    return interleaved_medians({"fn": fn}, device, repeats, {"fn": inner}, warmup)["fn"]


def interleaved_medians(
    fns: dict[str, Callable[[], None]], device: torch.device, repeats: int, inner: dict[str, int], warmup: int
) -> dict[str, float]:
    """Seconds per call of each of ``fns``: the median over ``repeats`` rounds, each round timing
    ``inner[name]`` consecutive calls of every function in turn (side by side, so that a change of
    load on a shared machine hits all of them alike)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(inner[name]):
                fn()
            sync(device)
            samples[name].append((time.perf_counter() - start) / inner[name])
    return {name: statistics.median(s) for name, s in samples.items()}


def make_models(model_fn: Callable[[], torch.nn.Module], n: int, device: torch.device) -> list[torch.nn.Module]:
    """``n`` models, model i built after ``torch.manual_seed(i)``."""
    models = []
    for i in range(n):
        torch.manual_seed(i)
        models.append(model_fn().to(device))
    return models


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` to ``dtype`` on ``device`` (no-op for None: full float32)."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def loop_step(models: list[torch.nn.Module], x: torch.Tensor, y: torch.Tensor, amp: torch.dtype | None = None) -> Callable[[], None]:
    """(a) The loop a user writes: N models, N ``torch.optim.Adam``, forward/backward/step per model
    (under ``torch.autocast(amp)`` when given; float32 weights and optimizer state)."""
    optimizers = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in models]

    def step() -> None:
        for model, opt in zip(models, optimizers):
            opt.zero_grad(set_to_none=True)
            with _autocast(x.device, amp):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()

    return step


def naive_step(models: list[torch.nn.Module], x: torch.Tensor, y: torch.Tensor, amp: torch.dtype | None = None) -> Callable[[], None]:
    """(b) The naive torch.func recipe: ``stack_module_state`` + ``vmap(grad)`` + ``torch.optim.Adam``
    on the stacked leaves (PyTorch's model-ensembling tutorial); forward under ``torch.autocast(amp)``."""
    params, buffers = stack_module_state(models)  # type: ignore[arg-type]
    params = {k: v.detach().requires_grad_(False) for k, v in params.items()}
    base = copy.deepcopy(models[0]).to("meta")

    def loss(p, b, x, y):  # type: ignore[no-untyped-def]
        with _autocast(x.device, amp):
            return F.cross_entropy(functional_call(base, (p, b), (x,)), y)

    grad_fn = vmap(grad_and_value(loss), in_dims=(0, 0, None, None), randomness="different")
    leaves = list(params.values())
    opt = torch.optim.Adam(leaves, lr=1e-3)

    def step() -> None:
        grads, _ = grad_fn(params, buffers, x, y)
        for leaf, name in zip(leaves, params):
            leaf.grad = grads[name]
        opt.step()

    return step


def popvec_supports_precision() -> bool:
    """Whether this popvec's ``TrainStep`` takes ``precision=`` (mixed precision)."""
    from popvec.engine import TrainStep

    return "precision" in inspect.signature(TrainStep).parameters


def popvec_step(
    models: list[torch.nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    compile: bool = False,
    member_chunk_size: int | str | None = None,
    precision: str = "fp32",
) -> Callable[[], None]:
    """(c) popvec: ``PopulationTrainer.step`` (vmapped step + ``popvec.optim.Adam``)."""
    pop = Population.from_modules(models)
    extra: dict[str, Any] = {}
    if precision != "fp32":
        # The one place popvec's mixed precision is switched on: TrainStep(precision=...), passed
        # through PopulationTrainer. Callers check popvec_supports_precision() first.
        extra["precision"] = precision
    trainer = PopulationTrainer(
        pop, popvec.optim.Adam(pop, lr=1e-3), compile=compile, progress=False, member_chunk_size=member_chunk_size, **extra
    )
    return lambda: trainer.step(x, y)
