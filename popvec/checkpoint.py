"""Checkpoints: one file per run, written atomically, checksummed, read back with ``weights_only=True``.

Every file :func:`save_checkpoint` writes gets a sha256 sidecar ``NAME.sha256`` in the
``sha256sum`` format (``<hex>  NAME``), so ``sha256sum -c NAME.sha256`` checks it too, and the
checkpoint itself stays a plain torch file that ``torch.load`` (or ``popvec lmc``) reads as it is.
A header inside the file would break that, which is why the hash sits next to it.

Two files cannot be replaced in one atomic step, so the sidecar is written three times, each
write atomic: first with the hashes of both the old and the new file, then the checkpoint,
then the sidecar with the new hash alone. Whatever moment a crash hits, the sidecar lists the
hash of the checkpoint on disk, so a crash never turns into a false mismatch that blocks a
resume; a flipped bit (which ``torch.load`` does not notice: it skips the zip CRCs) always does.

:func:`load_checkpoint` verifies the hash when the sidecar is there (plain torch files from
elsewhere have none and are read unverified) and turns every unreadable file (truncated, empty,
not a torch file, not a dict) into a :class:`CheckpointError` whose message is one line naming it.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import torch

from popvec.report import atomic_write_bytes

__all__ = ["CheckpointError", "checksum_path", "save_checkpoint", "load_checkpoint", "verify_checkpoint", "rng_state", "set_rng_state"]

CHECKSUM_SUFFIX = ".sha256"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: corrupted, unreadable or not popvec's; the message is one line naming the file."""


def checksum_path(path: str | Path) -> Path:
    """The sidecar holding the sha256 of checkpoint ``path``: ``path`` + ``.sha256``."""
    path = Path(path)
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_sidecar(path: Path, hashes: list[str]) -> None:
    atomic_write_bytes(checksum_path(path), "".join(f"{h}  {path.name}\n" for h in hashes).encode())


def _read_sidecar(path: Path) -> list[str] | None:
    """The hashes the sidecar of ``path`` accepts (one, or two while a save was under way); None without one."""
    sidecar = checksum_path(path)
    try:
        text = sidecar.read_text(encoding="ascii")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"checkpoint {path} is corrupted: its checksum file {sidecar} is unreadable ({_one_line(err)})") from None
    hashes = [line.split()[0] for line in text.splitlines() if line.strip()]
    if not hashes or not all(len(h) == 64 and all(c in "0123456789abcdef" for c in h) for h in hashes):
        raise CheckpointError(f"checkpoint {path} is corrupted: its checksum file {sidecar} holds no sha256")
    return hashes


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Serialize ``state`` (tensors, numbers, strings, lists, dicts) to ``path`` via temp file + rename,
    with its sha256 in ``path.sha256`` (see the module docstring for the crash-safe order)."""
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    new = _sha256(data)
    old: list[str] = []
    if path.is_file():  # the hash of the file now on disk: from its sidecar (cheap), else computed
        try:
            old = _read_sidecar(path) or [_sha256(path.read_bytes())]
        except CheckpointError:
            old = [_sha256(path.read_bytes())]
    _write_sidecar(path, [new, *[h for h in old if h != new]])  # accepts the file on disk and the one coming
    atomic_write_bytes(path, data)
    _write_sidecar(path, [new])


def verify_checkpoint(path: str | Path) -> bytes:
    """The bytes of checkpoint ``path``, checked against its sidecar when it has one (:class:`CheckpointError` if not)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    data = path.read_bytes()
    if not data:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    expected = _read_sidecar(path)
    if expected is not None:
        got = _sha256(data)
        if got not in expected:
            raise CheckpointError(f"checkpoint {path} is corrupted: sha256 mismatch (expected {expected[0]}, got {got})")
    return data


def load_checkpoint(path: str | Path, map_location: torch.device | str | None = None) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (no arbitrary code is unpickled).

    ``FileNotFoundError`` without a file; :class:`CheckpointError` for a sha256 mismatch, an
    empty, truncated or non-torch file, or one that does not hold a dict.
    """
    path = Path(path)
    data = verify_checkpoint(path)
    try:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as err:  # truncated zip, pickle of something else, JSON renamed .pt, ...
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated or not a torch file): {_one_line(err)}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} is not a popvec checkpoint (it holds a {type(state).__name__}, not a dict)")
    return state


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def rng_state() -> dict[str, Any]:
    """The global torch RNG states (CPU and every CUDA device) that dropout and DataLoaders draw from."""
    return {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
