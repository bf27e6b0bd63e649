"""A command's configuration is a frozen dataclass; its flags, parsing and ``config.json`` come from it.

Each field is declared with :func:`flag`: default, help text and the parser that turns the flag's
text into a checked value (from :mod:`popvec.cli.argtypes`). From the class, :func:`add_flags`
adds the ``argparse`` flags (``num_models`` -> ``--num-models``), :func:`from_args` builds the
config from parsed flags, and :func:`to_json` / :func:`from_json` write and read the run folder's
``config.json``, checking every value with the same parsers. Keywords are typed once, in the class.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from popvec.report import write_json

__all__ = ["ConfigError", "Flag", "add_flags", "as_dict", "flag", "from_args", "from_json", "option", "override", "spec_of", "to_json"]

C = TypeVar("C")
_KEY = "popvec.flag"


class ConfigError(ValueError):
    """A ``config.json`` that does not hold a command's settings (the message is one line)."""


@dataclasses.dataclass(frozen=True)
class Flag:
    """How one config field appears on the command line.

    ``parse`` turns the flag's text into the value (raising ``ArgumentTypeError``); ``choices``
    lists the allowed words; ``aliases`` are other visible spellings, ``hidden_aliases`` old ones
    kept working but left out of ``--help``; ``repeat`` collects a repeatable flag into a tuple;
    ``resume_may_change`` lets ``--resume`` take the flag (settings that do not change the result);
    ``missing_ok``: a ``config.json`` written before the setting existed may lack it, and then holds
    its default (which must be what those runs did).
    """

    help: str
    parse: Callable[[str], Any] | None = None
    choices: tuple[str, ...] | None = None
    aliases: tuple[str, ...] = ()
    hidden_aliases: tuple[str, ...] = ()
    metavar: str | None = None
    positional: bool = False
    repeat: bool = False
    resume_may_change: bool = False
    missing_ok: bool = False


def flag(default: Any = dataclasses.MISSING, help: str = "", **spec: Any) -> Any:
    """A config field with its flag: ``lr: float = flag(0.001, "learning rate", parse=positive_float)``.

    A field without a default is a positional argument; a ``False`` default makes a switch.
    """
    if "choices" in spec:
        spec["choices"] = tuple(spec["choices"])
    return dataclasses.field(default=default, metadata={_KEY: Flag(help, positional=default is dataclasses.MISSING, **spec)})


def override(group: type, name: str, default: Any = dataclasses.MISSING, **changes: Any) -> Any:
    """Field ``name`` of the shared ``group`` with another default (and/or help, choices) for one command."""
    original = _fields(group)[name]
    spec = dataclasses.replace(original.metadata[_KEY], **changes)
    return dataclasses.field(default=original.default if default is dataclasses.MISSING else default, metadata={_KEY: spec})


def option(name: str) -> str:
    """The flag of field ``name``: ``num_models`` -> ``--num-models``."""
    return "--" + name.replace("_", "-")


def spec_of(field: dataclasses.Field[Any]) -> Flag:
    return field.metadata[_KEY]


def _fields(cls: type) -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _owner(cls: type, name: str) -> type:
    """The class that first declares field ``name``: a shared group, or the command's config itself."""
    return next(base for base in reversed(cls.__mro__) if name in inspect.get_annotations(base))


def _grouped(cls: type) -> list[tuple[str | None, dataclasses.Field[Any]]]:
    """The fields with their group titles (None: the command's own), the command's own first, then
    the groups in the order the config class lists them."""
    mro = cls.__mro__
    titled = []
    for index, field in enumerate(dataclasses.fields(cls)):
        owner = _owner(cls, field.name)
        titled.append((None if owner is cls else getattr(owner, "TITLE", None), mro.index(owner), index, field))
    rank: dict[str | None, int] = {}
    for title, position, _, _ in titled:
        rank[title] = min(rank.get(title, position), position)
    return [(title, field) for title, _, _, field in sorted(titled, key=lambda t: (rank[t[0]], t[2]))]


def _help(field: dataclasses.Field[Any], spec: Flag) -> str:
    default = field.default
    if default is dataclasses.MISSING or default is None or default is False:
        return spec.help
    shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
    return f"{spec.help} (default: {shown})" if spec.help else f"default: {shown}"


def add_flags(parser: argparse.ArgumentParser, cls: type, suppress_defaults: bool = False) -> dict[str, Any]:
    """Add a flag for every field of config class ``cls``, shared groups under their titles.

    ``suppress_defaults``: flags not given are left out of the parsed namespace (to see what was
    typed). Returns the argument groups by title.
    """
    groups: dict[str, Any] = {}
    for title, field in _grouped(cls):
        spec = spec_of(field)
        if title is not None and title not in groups:
            groups[title] = parser.add_argument_group(title)
        target = parser if title is None else groups[title]
        kwargs: dict[str, Any] = {"help": _help(field, spec)}
        if spec.positional:
            kwargs.update(metavar=spec.metavar)
            if suppress_defaults:
                kwargs.update(nargs="?", default=argparse.SUPPRESS)
            target.add_argument(field.name, **kwargs)
            continue
        if field.default is False:
            kwargs["action"] = "store_true"
        else:
            kwargs.update(type=spec.parse, choices=spec.choices, metavar=spec.metavar)
            if spec.repeat:
                kwargs["action"] = "append"
        kwargs["default"] = argparse.SUPPRESS if suppress_defaults else field.default
        target.add_argument(option(field.name), *spec.aliases, dest=field.name, **kwargs)
        if spec.hidden_aliases:
            hidden = {**kwargs, "help": argparse.SUPPRESS, "default": argparse.SUPPRESS}
            target.add_argument(*spec.hidden_aliases, dest=field.name, **hidden)
    return groups


def _freeze(value: Any) -> Any:
    """Lists (from argparse's ``append`` or from JSON) as tuples, so configs stay hashable."""
    return tuple(_freeze(v) for v in value) if isinstance(value, (list, tuple)) else value


def from_args(cls: type[C], args: argparse.Namespace) -> C:
    """The config of the flags in ``args`` (fields missing from ``args`` keep their defaults)."""
    given = vars(args)
    return cls(**{name: _freeze(given[name]) for name in _fields(cls) if name in given})


def as_dict(config: Any) -> dict[str, Any]:
    """``dataclasses.asdict(config)`` in ``--help``'s order: the command's own settings first."""
    values = dataclasses.asdict(config)
    return {field.name: values[field.name] for _, field in _grouped(type(config))}


def to_json(config: Any, path: str | Path) -> None:
    """Write ``config`` as a JSON object of its fields (atomically)."""
    write_json(path, as_dict(config))


def from_json(cls: type[C], path: str | Path) -> C:
    """Read a config written by :func:`to_json`, every value checked by its flag's parser.

    Unknown or missing keys and bad values raise :class:`ConfigError` naming the file.
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: cannot read it ({' '.join(str(err).split())})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object of settings, got {type(data).__name__}")
    fields = _fields(cls)
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r} (not a setting of {getattr(cls, 'COMMAND', cls.__name__)})")
    missing = [k for k in fields if k not in data and not spec_of(fields[k]).missing_ok]
    if missing:
        raise ConfigError(f"{path}: missing key {missing[0]!r}")
    return cls(**{name: _checked(fields[name], _freeze(data[name]), path) for name in fields if name in data})


def _checked(field: dataclasses.Field[Any], value: Any, path: str | Path) -> Any:
    """``value`` from a config file, run through the field's parser as if typed on the command line."""
    spec = spec_of(field)
    try:
        if value is None and field.default is None:
            return None
        if field.default is False:
            if not isinstance(value, bool):
                raise ValueError(f"must be true or false, got {value!r}")
            return value
        if isinstance(value, bool):
            raise ValueError(f"must not be {str(value).lower()}")
        if spec.repeat:
            if not isinstance(value, tuple):
                raise ValueError("must be a list")
            return tuple(_parse(spec, item) for item in value)
        return _parse(spec, value)
    except (argparse.ArgumentTypeError, ValueError, TypeError) as err:
        raise ConfigError(f"{path}: {field.name!r} {' '.join(str(err).split())}") from None


def _parse(spec: Flag, value: Any) -> Any:
    if value is None:
        raise ValueError("must not be null")
    text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
    if spec.choices is not None and text not in spec.choices:
        raise ValueError(f"must be one of {', '.join(spec.choices)}, got {text!r}")
    if spec.parse is not None:
        return spec.parse(text)
    if not isinstance(value, str):
        raise ValueError(f"must be text, got {value!r}")
    return value
