"""PNG plots of a search history (see :mod:`popvec.plots`: Agg canvas, no pyplot, atomic writes).

Hyperband: validation loss of every member at each rung, one colour per bracket. PBT: each
hyperparameter's trajectory per member, and the lineage (who copied whom, when).
Each function returns the written path, or raises :class:`~popvec.plots.MissingMatplotlib` when
matplotlib is not installed (``pip install popvec[plot]``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from popvec.plots import MissingMatplotlib, new_figure, save_figure

__all__ = ["MissingMatplotlib", "plot_hyperband", "plot_pbt_hparams", "plot_pbt_lineage"]


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def plot_hyperband(history: dict[str, Any], path: str | Path, metric: str = "val_loss") -> Path:
    """Each member's ``metric`` at each rung it reached (lines per member, colour per bracket)."""
    fig = new_figure(8, 5)
    from matplotlib import colormaps

    members = history["members"]
    series: dict[int, list[tuple[int, float, bool]]] = {}
    for record in history["rounds"]:
        for row in record["members"]:
            if _finite(row.get(metric)):
                series.setdefault(row["id"], []).append((record["step"], row[metric], row["kept"]))
    brackets = sorted({m["bracket"] for m in members.values()}, reverse=True)
    colours = colormaps["viridis"](list(i / max(1, len(brackets) - 1) for i in range(len(brackets))))
    colour = dict(zip(brackets, colours))
    ax = fig.subplots()
    for member, points in series.items():
        s = members[str(member)]["bracket"]
        steps, values, kept = zip(*points)
        ax.plot(steps, values, "-", color=colour[s], alpha=0.35, lw=0.8)
        if not kept[-1]:
            ax.plot(steps[-1], values[-1], "x", color=colour[s], ms=4)
    for s in brackets:
        ax.plot([], [], "-", color=colour[s], label=f"bracket s={s}")
    ax.set_xscale("log")
    if all(v > 0 for points in series.values() for _, v, _ in points):
        ax.set_yscale("log")  # a diverged member would flatten everyone else
    ax.set_xlabel("training steps (log)")
    ax.set_ylabel(f"{metric} (log)")
    ax.set_title("Hyperband: validation loss per rung (x = pruned there)")
    ax.legend()
    return save_figure(fig, path)


def plot_pbt_hparams(history: dict[str, Any], path: str | Path) -> Path:
    """Each explored hyperparameter's value per member over time (one panel per hyperparameter)."""
    names = list(history["config"]["space"])
    trajectory = history["trajectory"]
    fig = new_figure(8, 2.6 * len(names))
    axes = fig.subplots(len(names), 1, squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        per: dict[int, list[tuple[int, float]]] = {}
        for snap in trajectory:
            for p, member in enumerate(snap["ids"]):
                if name in snap["hparams"]:
                    per.setdefault(member, []).append((snap["step"], snap["hparams"][name][p]))
        for member, points in sorted(per.items()):
            steps, values = zip(*points)
            ax.step(steps, values, where="post", lw=1, label=str(member))
        spec = history["config"]["space"][name]
        if spec.get("distribution") == "loguniform":
            ax.set_yscale("log")
        ax.set_ylabel(name)
    axes[-1, 0].set_xlabel("training steps")
    axes[0, 0].set_title("PBT: hyperparameter trajectories per member")
    return save_figure(fig, path)


def plot_pbt_lineage(history: dict[str, Any], path: str | Path) -> Path:
    """Members as rows over time; an arrow from donor to recipient at every exploit."""
    steps = history["config"]["steps"]
    ids = sorted({m for snap in history["trajectory"] for m in snap["ids"]})
    fig = new_figure(8, max(3, 0.3 * len(ids) + 1))
    ax = fig.subplots()
    for member in ids:
        ax.hlines(member, 0, steps, color="0.85", lw=1)
    for event in history["lineage"]:
        ax.annotate(
            "",
            xy=(event["step"], event["recipient"]),
            xytext=(event["step"], event["donor"]),
            arrowprops={"arrowstyle": "->", "color": "tab:blue", "lw": 0.8},
        )
    ax.set_xlim(0, steps)
    ax.set_yticks(ids)
    ax.set_xlabel("training steps")
    ax.set_ylabel("member id")
    ax.set_title("PBT lineage: arrows point from donor to recipient (exploit)")
    return save_figure(fig, path)
