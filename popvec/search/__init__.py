"""Hyperparameter search in one stack: search spaces, Hyperband/ASHA, PBT, staged fidelity, early stopping.

Entry points: ``popvec.search.hyperband.hyperband(...)``, ``popvec.search.pbt.pbt(...)`` and
``popvec.search.staged.run_staged(...)`` (the modules are also ``popvec.hyperband`` and ``popvec.pbt``).

Every trial is a member of one population with its own ``[N]`` hyperparameters; each method is a
selection policy (:mod:`popvec.selection`) that the one training loop consults.
"""

from popvec.search import hyperband, pbt
from popvec.search.early_stopping import EarlyStopping
from popvec.search.files import load_space
from popvec.search.hyperband import HyperbandPolicy, hyperband_brackets
from popvec.search.pbt import PBT
from popvec.search.run import SearchResult
from popvec.search.space import Choice, LogUniform, SearchSpace, Uniform
from popvec.search.staged import Stage, run_staged

__all__ = [
    "Choice",
    "EarlyStopping",
    "HyperbandPolicy",
    "LogUniform",
    "PBT",
    "SearchResult",
    "SearchSpace",
    "Stage",
    "Uniform",
    "hyperband",
    "hyperband_brackets",
    "load_space",
    "pbt",
    "run_staged",
]
