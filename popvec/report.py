"""Progress bars, leaderboards and history files: the I/O edge of a run."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

__all__ = ["make_progress", "round_table", "leaderboard_table", "write_json", "atomic_write_bytes"]


def make_progress(console: Console | None = None, disable: bool = False) -> Progress:
    """A step progress bar: description, bar, steps done/total, elapsed, remaining."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=disable,
        transient=False,
    )


def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def round_table(record: dict[str, Any]) -> Table:
    """One elimination round: id, train loss, val loss, val acc, kept/eliminated; best first."""
    table = Table(title=f"Round {record['round']} (step {record['step']})", title_justify="left")
    for name, justify in [("id", "right"), ("train loss", "right"), ("val loss", "right"), ("val acc", "right"), ("status", "left")]:
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for row in sorted(record["members"], key=lambda r: (not r["kept"], _nan_last(r["val_loss"]), r["id"])):
        status = "[green]kept" if row["kept"] else "[red]eliminated"
        table.add_row(str(row["id"]), _fmt(row["train_loss"]), _fmt(row["val_loss"]), f"{100 * row['val_accuracy']:.2f}%", status)
    return table


def leaderboard_table(rows: Sequence[dict[str, Any]], title: str = "Leaderboard") -> Table:
    """Any list of flat dicts as a table (columns from the first row)."""
    table = Table(title=title, title_justify="left")
    if not rows:
        return table
    for name in rows[0]:
        table.add_column(str(name), justify="right")
    for row in rows:
        table.add_row(*(_fmt(v) for v in row.values()))
    return table


def _nan_last(value: float) -> float:
    return math.inf if math.isnan(value) else value


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    """Atomic JSON file with NaN/inf written as null."""
    atomic_write_bytes(path, json.dumps(_json_safe(obj), indent=2).encode())


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj
