"""Search configuration files: TOML or YAML read into plain dicts, and search spaces loaded from them.

TOML needs Python 3.11+ (``tomllib``) or the ``tomli`` package; YAML needs PyYAML. A space file::

    [space]
    lr = { distribution = "loguniform", low = 1e-4, high = 1e-1 }
    momentum = { distribution = "choice", values = [0.0, 0.9] }
    beta2 = 0.99            # a plain number: fixed for every member
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from popvec.search.space import SearchSpace

__all__ = ["load_config", "load_space"]


def load_config(path: str | Path) -> dict[str, Any]:
    """A TOML (``.toml``) or YAML (``.yaml``/``.yml``) file as a dict, with clear errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} {'is a directory, not a file' if path.is_dir() else 'does not exist'}")
    suffix = path.suffix.lower()
    if suffix == ".toml":
        try:
            import tomllib as toml_module  # Python 3.11+
        except ModuleNotFoundError:  # pragma: no cover - Python 3.10
            try:
                import tomli as toml_module  # type: ignore[no-redef]
            except ModuleNotFoundError:
                raise RuntimeError(f"reading {path} needs Python 3.11+ (tomllib) or the tomli package: pip install tomli") from None
        try:
            data = toml_module.loads(path.read_text())
        except toml_module.TOMLDecodeError as err:
            raise ValueError(f"{path}: invalid TOML: {err}") from None
    elif suffix in (".yaml", ".yml"):
        try:
            import yaml  # type: ignore[import-untyped]
        except ModuleNotFoundError:
            raise RuntimeError(f"reading {path} needs PyYAML: pip install pyyaml (or write the file as TOML)") from None
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: invalid YAML: {err}") from None
    else:
        raise ValueError(f"config file {path} must end in .toml, .yaml or .yml")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level must be a table/mapping, got {type(data).__name__}")
    return data


def load_space(path: str | Path) -> SearchSpace:
    """The ``[space]`` table of a config file (or the whole file when it has no ``space`` key)."""
    data = load_config(path)
    spec = data.get("space", data)
    try:
        return SearchSpace.from_dict(spec)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
