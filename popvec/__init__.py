"""popvec: train whole populations of neural networks at once, one vmapped step for all N members."""

from popvec import data, engine, lmc, lr_schedules, models, optim
from popvec.population import Population
from popvec.trainer import MultipleInitializationsTrainer, PopulationTrainer

__all__ = [
    "Population",
    "PopulationTrainer",
    "MultipleInitializationsTrainer",
    "data",
    "engine",
    "lmc",
    "lr_schedules",
    "models",
    "optim",
]
__version__ = "0.1.0"
