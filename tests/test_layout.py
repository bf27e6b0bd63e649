"""The package's front door: every wing reachable from ``popvec``, and old module paths still import."""

from __future__ import annotations

import importlib

import pytest

import popvec

OLD_PATHS = {
    "popvec.lr_schedules": "popvec.schedules",
    "popvec.sources": "popvec.loaders",
    "popvec.search_space": "popvec.search.space",
    "popvec.hyperband": "popvec.search.hyperband",
    "popvec.pbt": "popvec.search.pbt",
    "popvec.staged": "popvec.search.staged",
    "popvec.early_stopping": "popvec.search.early_stopping",
    "popvec.search_run": "popvec.search.run",
    "popvec.search_plots": "popvec.search.plots",
    "popvec.lmc": "popvec.studies.lmc",
    "popvec.warmstart": "popvec.studies.warmstart",
    "popvec.ensemble": "popvec.studies.ensemble",
}


@pytest.mark.parametrize("old,new", sorted(OLD_PATHS.items()))
def test_old_module_paths_import_the_new_modules(old: str, new: str) -> None:
    assert importlib.import_module(old) is importlib.import_module(new)


def test_front_door_reaches_every_wing() -> None:
    for name in (
        "Population",
        "PopulationTrainer",
        "MultipleInitializationsTrainer",
        "optim",
        "data",
        "loaders",
        "models",
        "engine",
        "schedules",
        "selection",
        "search",
        "studies",
        "hyperband",
        "pbt",
        "lmc",
        "warmstart",
        "ensemble",
    ):
        assert hasattr(popvec, name), name
    assert callable(popvec.hyperband.hyperband) and callable(popvec.pbt.pbt)
    assert callable(popvec.lmc.interpolate) and callable(popvec.warmstart.run_study)


def test_readme_import_lines_still_work() -> None:
    from popvec.data import DeviceLoader, iterate_batches, load_dataset  # noqa: F401  (DeviceLoader moved to loaders)
    from popvec.ensemble import JointTrainer, make_fusion  # noqa: F401
    from popvec.hyperband import hyperband, hyperband_brackets  # noqa: F401
    from popvec.lr_schedules import cosine, warmup  # noqa: F401
    from popvec.pbt import pbt  # noqa: F401
    from popvec.search_space import Choice, LogUniform, SearchSpace, Uniform, load_space  # noqa: F401
    from popvec.staged import Stage, load_stages, run_staged  # noqa: F401
    from popvec.warmstart import Arm, run_study  # noqa: F401
