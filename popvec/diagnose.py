"""Clear errors for what ``torch.func.vmap`` cannot batch: which module failed, which operation, and the fix.

torch.func reports its limits as low-level dispatcher errors. :func:`innermost_module` finds the
``nn.Module`` of a skeleton that was running (from the error's traceback), and :func:`explain` turns
a failure into one message naming that module, the torch operation and a known fix.
"""

from __future__ import annotations

import re

from torch import nn

__all__ = ["RANDOMNESS", "innermost_module", "VmapError", "check_randomness", "explain"]

#: ``randomness`` values popvec passes to ``vmap``: an independent draw per member, or one shared draw.
RANDOMNESS = ("different", "same")


class VmapError(RuntimeError):
    """What torch.func.vmap could not batch, explained: the module, the operation and a known fix."""


def check_randomness(randomness: str) -> str:
    if randomness not in RANDOMNESS:
        raise ValueError(f"randomness must be one of {RANDOMNESS}, got {randomness!r}")
    return randomness


def innermost_module(error: BaseException, root: nn.Module) -> str | None:
    """The deepest module of ``root`` whose code was running when ``error`` was raised (from its traceback).

    Reads the ``self`` of each frame of the traceback; ``None`` when no frame belongs to ``root``.
    """
    names = {id(m): name for name, m in root.named_modules()}
    found: nn.Module | None = None
    tb = error.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in names:
            found = owner
        tb = tb.tb_next
    if found is None:
        return None
    name = names[id(found)]
    return f"{type(found).__name__} (module {name!r})" if name else f"{type(found).__name__} (the model's own forward)"


_FIXES: list[tuple[str, str]] = [
    (
        "inplace randomness",
        "the module draws random numbers in place into a tensor shared by all members (as torchvision's "
        "StochasticDepth does); use randomness='same' (all members share masks) or replace the in-place dropout "
        "with an out-of-place one",
    ),
    (
        "lstm",
        "torch.func has no batching rule for LSTM outside gradient computation (evaluation, torch.no_grad); "
        "member_chunk_size does not avoid it (chunks are still vmapped): evaluate the members one at a time in a "
        "loop over population.member(i)",
    ),
    (
        "nested",
        "the TransformerEncoder fast path turns padded batches into nested tensors, which vmap cannot batch; build "
        "the TransformerEncoder with enable_nested_tensor=False",
    ),
    (
        "inplace arithmetic",
        "an in-place operation writes member-specific values into a tensor shared by all members (in-place "
        "dropout draws a different mask per member); use the out-of-place operation, or for in-place dropout "
        "randomness='same' (all members share masks)",
    ),
]


def _operation(message: str) -> str | None:
    found = re.search(r"aten::\w+(?:\.\w+)?", message)
    return found.group(0) if found else None


def explain(error: BaseException, where: str | None, stage: str) -> str:
    """One message for a vmap failure in ``stage``: the module ``where`` it happened, the operation, a fix."""
    message = str(error).strip()
    first = message.splitlines()[0] if message else type(error).__name__
    if len(first) > 300:
        first = first[:300] + "..."
    lowered = message.lower()
    fix = next((text for key, text in _FIXES if key in lowered), None)
    op = _operation(message)
    parts = [f"popvec could not run the {stage} under torch.func.vmap (all members in one batched call)"]
    parts.append(f"in {where}" if where else "outside any submodule")
    if op:
        parts.append(f"operation {op}")
    text = ", ".join(parts) + f": {type(error).__name__}: {first}"
    return text + (f"\nFix: {fix}." if fix else "")
