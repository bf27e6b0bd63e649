"""One plotting convention (``popvec.plots``): Agg canvas without pyplot or a global backend switch,
atomic writes, and one ``MissingMatplotlib`` (with the install hint) when matplotlib is absent."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from popvec import cli, lmc
from popvec.cli.warmstart import plot_result
from popvec.plots import MissingMatplotlib, new_figure, save_figure
from popvec.search.plots import plot_hyperband, plot_pbt_hparams, plot_pbt_lineage

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

HYPERBAND = {
    "members": {"0": {"bracket": 1}, "1": {"bracket": 1}, "2": {"bracket": 0}},
    "rounds": [
        {"step": 10, "members": [{"id": 0, "val_loss": 1.2, "kept": True}, {"id": 1, "val_loss": 1.5, "kept": False}]},
        {"step": 30, "members": [{"id": 0, "val_loss": 0.9, "kept": True}, {"id": 2, "val_loss": 1.1, "kept": True}]},
    ],
}
PBT = {
    "config": {"steps": 40, "space": {"lr": {"distribution": "loguniform"}}},
    "trajectory": [{"step": 0, "ids": [0, 1], "hparams": {"lr": [0.1, 0.01]}}, {"step": 20, "ids": [0, 1], "hparams": {"lr": [0.1, 0.12]}}],
    "lineage": [{"step": 20, "donor": 0, "recipient": 1}],
}


class _WarmStartCurves:
    """Stands in for a WarmStartResult: ``plot_result`` only reads ``curves()``."""

    def curves(self) -> dict[str, dict[str, list[float]]]:
        return {"cold": {"samples": [100, 200], "test_accuracy": [0.5, 0.7], "steps": [10, 8]}}


def interpolation_result() -> lmc.InterpolationResult:
    alphas = torch.linspace(0, 1, 5)
    curve = torch.tensor([0.5, 0.8, 0.9, 0.7, 0.4])
    return lmc.InterpolationResult(alphas, curve, curve / 2, curve, curve / 2, 0.9, 0.45, 3.0, "keep")


def instability_result() -> lmc.InstabilityResult:
    values = torch.tensor([0.3, 0.1, 0.0])
    return lmc.InstabilityResult([0, 5, 50], 100, 2, values, values / 3, values * 10, values, branches=None)  # type: ignore[arg-type]


def every_plot(folder: Path) -> list[Path]:
    """Every PNG popvec writes, each through popvec.plots."""
    return [
        interpolation_result().plot(folder / "lmc.png"),
        instability_result().plot(folder / "instability.png"),
        plot_hyperband(HYPERBAND, folder / "hyperband.png"),
        plot_pbt_hparams(PBT, folder / "pbt_hparams.png"),
        plot_pbt_lineage(PBT, folder / "pbt_lineage.png"),
        plot_result(_WarmStartCurves(), folder / "warmstart.png", title="t"),  # type: ignore[arg-type]
    ]


@pytest.fixture
def no_matplotlib(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if matplotlib were not installed (a None entry makes its import fail)."""
    names = {name for name in sys.modules if name.partition(".")[0] == "matplotlib"}
    for name in names | {"matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"}:
        monkeypatch.setitem(sys.modules, name, None)


def test_every_plot_is_a_png_without_pyplot_or_a_backend_switch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mpl = pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    backend = dict.__getitem__(mpl.rcParams, "backend")  # the raw value: rcParams["backend"] may resolve it via pyplot
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)  # importing pyplot now fails
    monkeypatch.setattr(mpl, "use", lambda *args, **kwargs: pytest.fail("the global backend was switched"))
    for path in every_plot(tmp_path / "plots"):
        assert path.read_bytes()[:8] == PNG_MAGIC
        height, width, _ = imread(path).shape
        assert width > 500 and height > 200
    assert dict.__getitem__(mpl.rcParams, "backend") == backend
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(
        ["lmc.png", "instability.png", "hyperband.png", "pbt_hparams.png", "pbt_lineage.png", "warmstart.png"]
    )  # no temporary files left behind


def test_save_figure_keeps_the_old_file_when_drawing_fails(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "plot.png"
    path.write_bytes(b"old")
    figure = new_figure(4, 3)
    figure.subplots().plot([0, 1], [1, 0])

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("killed while drawing")

    figure.savefig = broken  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="killed"):
        save_figure(figure, path)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["plot.png"]


@pytest.mark.usefixtures("no_matplotlib")
def test_without_matplotlib_every_plot_says_how_to_install_it(tmp_path: Path) -> None:
    assert issubclass(MissingMatplotlib, ImportError)
    for call in (
        lambda: new_figure(1, 1),
        lambda: interpolation_result().plot(tmp_path / "a.png"),
        lambda: instability_result().plot(tmp_path / "b.png"),
        lambda: plot_hyperband(HYPERBAND, tmp_path / "c.png"),
    ):
        with pytest.raises(MissingMatplotlib, match=r"pip install popvec\[plot\]"):
            call()
    assert plot_result(_WarmStartCurves(), tmp_path / "d.png") is None  # type: ignore[arg-type]
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.usefixtures("no_matplotlib")
def test_warmstart_cli_without_matplotlib_prints_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [
        "warmstart",
        "--replicates",
        "1",
        "--max-steps",
        "2",
        "--check-every",
        "1",
        "--chunks",
        "2",
        "--no-cold",
        "--sp",
        "0.5,0.1",
        "--device",
        "cpu",
        "--no-progress",
        "--out",
        str(tmp_path / "ws"),
    ]
    assert cli.main(args) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "matplotlib" in line]
    assert lines == ["No plot written (plotting needs matplotlib: pip install popvec[plot])"]
    assert not (tmp_path / "ws" / "warmstart.png").exists()


@pytest.mark.usefixtures("no_matplotlib")
def test_lmc_and_search_clis_print_the_install_hint_intact(tmp_path: Path) -> None:
    """The hint's ``[plot]`` must survive rich's markup."""
    from io import StringIO

    from rich.console import Console

    from popvec.cli.common import save_plots

    console = Console(file=StringIO(), width=200)
    save_plots(console, [(interpolation_result().plot, (tmp_path / "lmc.png",))])
    save_plots(console, [(plot_hyperband, (HYPERBAND, tmp_path / "hyperband.png"))])
    assert (
        console.file.getvalue().splitlines()
        == [  # type: ignore[attr-defined]
            "No plot written (plotting needs matplotlib: pip install popvec[plot])",
        ]
        * 2
    )
