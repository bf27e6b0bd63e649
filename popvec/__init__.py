"""popvec: train whole populations of neural networks at once, one vmapped step for all N members.

The front door. The core (flat): :class:`Population`, :mod:`~popvec.optim`, :mod:`~popvec.schedules`,
:mod:`~popvec.engine`, :mod:`~popvec.data`, :mod:`~popvec.loaders`, :mod:`~popvec.augment`, :mod:`~popvec.models`,
:mod:`~popvec.selection`, :class:`PopulationTrainer`. Three wings: :mod:`popvec.search`
(Hyperband, PBT, staged fidelity), :mod:`popvec.studies` (LMC, instability, warm-starting,
ensembles) and :mod:`popvec.cli` (the ``popvec`` command).
"""

import sys as _sys

from popvec import augment, data, engine, loaders, models, optim, schedules, search, selection, studies
from popvec.population import Population
from popvec.search import hyperband, pbt
from popvec.studies import ensemble, lmc, warmstart
from popvec.trainer import MultipleInitializationsTrainer, PopulationTrainer

__all__ = [
    "MultipleInitializationsTrainer",
    "Population",
    "PopulationTrainer",
    "augment",
    "data",
    "engine",
    "ensemble",
    "hyperband",
    "lmc",
    "loaders",
    "models",
    "optim",
    "pbt",
    "schedules",
    "search",
    "selection",
    "studies",
    "warmstart",
]
__version__ = "0.1.0"

#: Module paths of earlier releases (a flat package) and where each lives now; ``import`` of the old
#: path keeps working.
_MOVED_MODULES = {
    "lr_schedules": "popvec.schedules",
    "sources": "popvec.loaders",
    "search_space": "popvec.search.space",
    "hyperband": "popvec.search.hyperband",
    "pbt": "popvec.search.pbt",
    "staged": "popvec.search.staged",
    "early_stopping": "popvec.search.early_stopping",
    "search_run": "popvec.search.run",
    "search_plots": "popvec.search.plots",
    "lmc": "popvec.studies.lmc",
    "warmstart": "popvec.studies.warmstart",
    "ensemble": "popvec.studies.ensemble",
}
for _old, _new in _MOVED_MODULES.items():
    _sys.modules.setdefault(f"{__name__}.{_old}", _sys.modules[_new] if _new in _sys.modules else __import__(_new, fromlist=["_"]))
lr_schedules = schedules
del _old, _new
