"""Figures for popvec's PNG files: one convention for every plot.

:func:`new_figure` draws on matplotlib's Agg canvas through the object API: no pyplot, and the
global backend is never switched, so plotting from popvec leaves a notebook or GUI session as
it was. :func:`save_figure` writes through a temporary file and a rename, so a killed write never
leaves half a PNG. matplotlib is optional (the ``plot`` extra); without it both raise
:class:`MissingMatplotlib`, whose message says how to install it.
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING

from popvec.report import atomic_write_bytes

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["MissingMatplotlib", "new_figure", "save_figure"]


class MissingMatplotlib(ImportError):
    """matplotlib is not installed (plots are optional): the message says ``pip install popvec[plot]``."""

    def __init__(self, message: str = "plotting needs matplotlib: pip install popvec[plot]") -> None:
        super().__init__(message, name="matplotlib")


def new_figure(width: float, height: float) -> Figure:
    """An empty ``width`` x ``height`` inch figure (constrained layout) drawn by the Agg canvas.

    Add axes with ``figure.subplots(...)``; nothing is registered with pyplot, so there is
    nothing to close: the figure is freed with its last reference.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ModuleNotFoundError as err:
        if (err.name or "").partition(".")[0] != "matplotlib":
            raise  # matplotlib is there but one of its own dependencies is not: show the real problem
        raise MissingMatplotlib() from None
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Write ``figure`` to ``path`` atomically (format from the suffix, PNG without one); returns the path."""
    path = Path(path)
    buffer = BytesIO()
    figure.savefig(buffer, format=path.suffix[1:].lower() or "png", dpi=dpi)
    atomic_write_bytes(path, buffer.getvalue())
    return path
