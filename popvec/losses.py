"""Loss functions that take per-member hyperparameters as tensors (usable inside ``vmap``).

``torch.nn.functional.cross_entropy`` wants ``label_smoothing`` as a Python float, which a vmapped
per-member value (a 0-d tensor) is not. :func:`cross_entropy` computes the same loss with the
smoothing as a tensor, so ``PopulationTrainer(..., loss_fn=cross_entropy,
loss_hparams={"label_smoothing": [0.0, 0.1, ...]})`` gives every member its own smoothing.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

__all__ = ["cross_entropy", "LOSS_HPARAMS", "LOSS_HPARAM_RANGES"]

#: per-member loss hyperparameters :func:`cross_entropy` understands
LOSS_HPARAMS: tuple[str, ...] = ("label_smoothing",)
#: the values each accepts (keywords of :func:`popvec.checks.member_values`)
LOSS_HPARAM_RANGES: dict[str, dict[str, Any]] = {"label_smoothing": {"low": 0.0, "high": 1.0}}


def cross_entropy(out: Tensor, y: Tensor, label_smoothing: Tensor | float = 0.0) -> Tensor:
    """Mean cross-entropy with label smoothing ``s`` (a float or a 0-d tensor).

    Equals ``F.cross_entropy(out, y, label_smoothing=s)``: ``(1 - s) * nll + s * mean_c(-log p_c)``,
    averaged over the batch. Integer class targets ``y``; ``out`` is ``[B, C]``.
    """
    logp = F.log_softmax(out, dim=-1)
    nll = -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    uniform = -logp.mean(dim=-1)
    return ((1 - label_smoothing) * nll + label_smoothing * uniform).mean()
