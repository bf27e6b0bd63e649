"""Per-member data augmentation on the device: random crop with padding and horizontal flip.

An :class:`Augment` is a pure transform of a batch and its random draws: :meth:`Augment.draw`
makes the draws of one stream (a seed and an epoch) on the CPU with NumPy, one row
``(dy, dx, flip)`` per sample slot, and :meth:`Augment.apply` applies draws ``[..., B, 3]`` to
images ``[..., B, C, H, W]`` on the images' device: the images are padded once (and once
mirrored) and every member's every crop is then copied by one gather indexed by ``[N, B]``
tensors, with no Python loop over members or samples.
Applying member ``i``'s draws to member ``i``'s images alone gives bit for bit what the batched
call gives for member ``i`` (a gather copies values; it does no arithmetic).

popvec's datasets are normalized once at load time (per channel). Cropping and flipping move
pixels and per-channel normalization maps each pixel on its own, so the two commute: augmenting
normalized images equals the CIFAR recipe (augment the raw image, then normalize) provided the
padding holds the normalized value of black, which :meth:`Augment.for_data` sets. For images
that are not normalized yet, ``normalize=(mean, std)`` normalizes after the crop and flip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from popvec import checks

__all__ = ["Augment"]

# Third entry of the NumPy seed sequence: augmentation draws never coincide with the sample
# orders, which :mod:`popvec.loaders` draws from ``default_rng([seed, epoch])``.
_STREAM = 0xA06


def _channel_values(name: str, values: float | tuple[float, ...], positive: bool = False) -> tuple[float, ...]:
    """One float or a tuple of them (one per channel), each finite (and > 0 with ``positive``)."""
    items = tuple(values) if isinstance(values, (tuple, list)) else (values,)
    if not items:
        raise ValueError(f"{name} must hold at least one value, got ()")
    low = 0.0 if positive else -math.inf
    return tuple(checks.number(name, v, low=low, low_open=positive) for v in items)


@dataclass(frozen=True)
class Augment:
    """Random crop with ``crop_padding`` pixels of padding (``fill``), then a random horizontal flip.

    ``crop_padding=4, flip=True`` is the CIFAR standard (torchvision's ``RandomCrop(32, padding=4)``
    and ``RandomHorizontalFlip()``). ``fill`` is the padding value, one float or one per channel;
    ``normalize=(mean, std)`` (per channel) is applied after the crop and flip, for images not
    normalized at load time. Use :meth:`for_data` for popvec's (normalized) datasets.
    """

    crop_padding: int = 4
    flip: bool = True
    fill: float | tuple[float, ...] = 0.0
    normalize: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    def __post_init__(self) -> None:
        checks.integer("crop_padding", self.crop_padding, minimum=0)
        _channel_values("fill", self.fill)
        if self.normalize is not None:
            mean, std = self.normalize
            _channel_values("normalize mean", mean)
            _channel_values("normalize std", std, positive=True)

    @classmethod
    def for_data(cls, data: Any, crop_padding: int = 4, flip: bool = True) -> Augment:
        """For a :class:`~popvec.data.DatasetSplits` normalized at load time: pad with its normalized black."""
        stats = getattr(data, "normalization", None)
        if stats is None:
            return cls(crop_padding=crop_padding, flip=flip)
        mean, std = stats
        return cls(crop_padding=crop_padding, flip=flip, fill=tuple(-m / s for m, s in zip(mean, std)))

    def config(self) -> dict[str, Any]:
        """Plain values (for checkpoints: a loader refuses to resume under other settings)."""
        fill = self.fill if isinstance(self.fill, tuple) else (self.fill,)
        norm = None if self.normalize is None else [list(self.normalize[0]), list(self.normalize[1])]
        return {"crop_padding": self.crop_padding, "flip": self.flip, "fill": [float(v) for v in fill], "normalize": norm}

    # ------------------------------------------------------------------ draws
    def draw(self, seed: int, epoch: int, count: int) -> Tensor:
        """CPU ``int16 [count, 3]`` draws ``(dy, dx, flip)`` of stream ``(seed, epoch)``.

        ``dy, dx`` in ``[0, 2 * crop_padding]`` are the top-left corner of the crop in the padded
        image (``crop_padding`` means no shift); ``flip`` is 0 or 1 (always 0 with ``flip=False``).
        """
        rng = np.random.default_rng([seed % 2**64, epoch, _STREAM])
        draws = np.zeros((count, 3), dtype=np.int16)
        draws[:, :2] = rng.integers(0, 2 * self.crop_padding + 1, size=(count, 2))
        if self.flip:
            draws[:, 2] = rng.integers(0, 2, size=count)
        return torch.from_numpy(draws)

    # ------------------------------------------------------------------ the transform
    def apply(self, x: Tensor, draws: Tensor) -> Tensor:
        """Images ``x [*Lx, C, H, W]`` augmented by ``draws [*L, 3]`` -> ``[*L, C, H, W]``.

        ``Lx`` must broadcast to ``L``: per-member images ``[N, B, ...]`` with draws
        ``[N, B, 3]``, or one shared batch ``[B, ...]`` seen by every member through its own
        draws ``[N, B, 3]`` (each member gets its own view of the same samples).
        """
        if x.dim() < 4:
            raise ValueError(f"x must be images [..., B, C, H, W], got shape {tuple(x.shape)}")
        lead_x, (c, h, w) = x.shape[:-3], x.shape[-3:]
        lead = torch.broadcast_shapes(lead_x, draws.shape[:-1])
        p = self.crop_padding
        fill = torch.tensor(_channel_values("fill", self.fill), dtype=x.dtype, device=x.device)
        if fill.numel() not in (1, c):
            raise ValueError(f"fill must hold 1 or {c} values (the channels), got {fill.numel()}")
        # Pad each image once, as it is and mirrored: a flipped crop at dx is the crop of the mirrored
        # image at 2p - dx. unfold makes every crop a view, so one gather with [*L] indices copies them.
        flat = x.reshape(-1, c, h, w)
        padded = flat.new_empty(2, flat.shape[0], c, h + 2 * p, w + 2 * p)
        padded.copy_(fill.view(-1, 1, 1).expand(c, h + 2 * p, w + 2 * p))
        padded[0, :, :, p : p + h, p : p + w] = flat
        padded[1, :, :, p : p + h, p : p + w] = flat.flip(-1)
        draws = draws.to(x.device, torch.int64).expand(*lead, 3)
        flip, dy = draws[..., 2], draws[..., 0]
        dx = torch.where(flip.bool(), 2 * p - draws[..., 1], draws[..., 1])
        sample = torch.arange(flat.shape[0], device=x.device).view(lead_x).expand(lead)
        windows = padded.unfold(3, h, 1).unfold(4, w, 1)  # [2, K, C, 2p + 1, 2p + 1, H, W], a view
        out = windows[flip, sample, :, dy, dx]  # [*L, C, H, W]
        if self.normalize is not None:
            mean, std = (torch.tensor(v, dtype=x.dtype, device=x.device).view(-1, 1, 1) for v in self.normalize)
            out = (out - mean) / std
        return out
