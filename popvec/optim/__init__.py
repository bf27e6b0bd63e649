"""Vectorized optimizers over a population's stacked parameters.

Every hyperparameter is a float (shared) or one value per member (a length-N sequence or tensor),
stored as an ``[N]`` tensor in ``optimizer.hparams`` and broadcast as ``[N, 1, ...]``. State tensors
are stacked ``[N, ...]`` like the parameters, so ``select`` slices them with the same indices.
Each update is a handful of whole-stack tensor ops per parameter tensor: there is no loop over
members. The math matches ``torch.optim`` (SGD, Adam, AdamW) member by member.

``from_torch`` adapts an element-wise ``torch.optim`` factory instead: the stacked leaves are then
the optimizer's parameters, which is exact for optimizers whose update never mixes entries of a
tensor.
"""

from popvec.optim.base import HParam, Optimizer, PopulationOptimizer, as_member_values, clip_grad_norm, grad_norm
from popvec.optim.rules import OPTIMIZER_HPARAMS, OPTIMIZERS, SGD, Adam, AdamW, make
from popvec.optim.torch_adapter import ELEMENTWISE_TORCH_OPTIMIZERS, TorchOptimizer, build, from_torch

__all__ = [
    "Optimizer",
    "PopulationOptimizer",
    "SGD",
    "Adam",
    "AdamW",
    "TorchOptimizer",
    "from_torch",
    "ELEMENTWISE_TORCH_OPTIMIZERS",
    "HParam",
    "as_member_values",
    "clip_grad_norm",
    "grad_norm",
    "build",
    "make",
    "OPTIMIZERS",
    "OPTIMIZER_HPARAMS",
]
