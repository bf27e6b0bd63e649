"""Studies built on populations: linear mode connectivity, instability, warm-starting, ensembles.

Each study is a population (an interpolation path, spawned copies, arms of a warm-start
experiment, an ensemble's members) trained and evaluated with the core's one loop and one
vmapped evaluation.
"""

from popvec.studies import ensemble, lmc, warmstart

__all__ = ["ensemble", "lmc", "warmstart"]
