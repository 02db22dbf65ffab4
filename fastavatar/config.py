"""Typed dataclass configs -> argparse, with YAML defaults and a saved resolved config.

Precedence (lowest to highest): dataclass defaults < ``--config file.yaml`` < explicit CLI flags.

- Every field becomes a ``--field_name`` flag whose help text is the field's comment (given as
  ``field(metadata={"help": ...})`` or via :func:`option`). Booleans are ``--flag/--no-flag``
  (never ``type=bool``); lists take several values (``--subjects 306 369``); ``Literal`` fields
  accept only their choices. Prefix abbreviations are refused (``allow_abbrev=False``): a
  shortened flag is an error, never silently another option.
- A field whose type is a dataclass nests a config (``fit: FitConfig`` in ``GuidedConfig``). Its
  fields are flags of their own name (``--w_lr``; a name used twice in one tree is an error when
  the parser is built). In YAML a nested config is a mapping under its field name (as saved), or
  its fields are given by their flag names at the top level.
- A field without a default is required (``option(help=...)`` with no default; the dataclass is
  then ``kw_only``); ``option(..., positional=True)`` makes it a positional argument.
- Values are type-checked (``max_epochs: lots`` is an error naming the key) and a config with a
  ``check()`` method runs it after construction (range checks, one-line errors naming the flag).
  These are ``ValueError``s; scripts print them as one line (:func:`fastavatar.cli.run_script`).
- YAML files list only what they change; the resolved config is written to
  ``<run_dir>/config.yaml`` (plain, nested YAML, no pickled classes).
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Type, TypeVar

import yaml

T = TypeVar("T")


def option(default: Any = dataclasses.MISSING, help: str = "", positional: bool = False,  # noqa: A002
           aliases: Sequence[str] = (), **kwargs) -> Any:
    """A dataclass field with a help string (mutable defaults are copied per instance; a
    dataclass default is copied too). No default: a required option. ``aliases``: other flag
    names for the same field (e.g. the released code's ``--save_path`` for ``--output_dir``)."""
    metadata = {"help": help, "positional": positional, "aliases": tuple(aliases)}
    if dataclasses.is_dataclass(default) and not isinstance(default, type):
        value = default
        return dataclasses.field(default_factory=lambda: dataclasses.replace(value), metadata=metadata, **kwargs)
    if isinstance(default, (list, dict, tuple)) and not isinstance(default, str):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def _unwrap_optional(tp):
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _is_config(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _scalar_parser(tp):
    if tp is bool:
        return _parse_bool
    if tp in (int, float, str):
        return tp
    if tp is Path:
        return Path
    if typing.get_origin(tp) is typing.Literal:
        return type(typing.get_args(tp)[0])
    return str


def _parse_bool(text: str) -> bool:
    lowered = str(text).lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def flag_paths(config_cls: Type) -> Dict[str, str]:
    """Flag name -> dotted field path for every leaf field of ``config_cls`` (nested included)."""
    out: Dict[str, str] = {}

    def walk(cls, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp, _ = _unwrap_optional(hints[f.name])
            if _is_config(tp):
                walk(tp, f"{prefix}{f.name}.")
                continue
            if f.name in out:
                raise TypeError(f"{config_cls.__name__}: option name {f.name!r} is used by {out[f.name]!r} "
                                f"and {prefix}{f.name!r}; nested configs need distinct names")
            out[f.name] = f"{prefix}{f.name}"

    walk(config_cls, "")
    return out


def _field_of(config_cls: Type, path: str):
    """(dataclass field, its unwrapped type) at dotted ``path``."""
    cls = config_cls
    *parents, leaf = path.split(".")
    for name in parents:
        cls = _unwrap_optional(typing.get_type_hints(cls)[name])[0]
    f = {x.name: x for x in dataclasses.fields(cls)}[leaf]
    return f, _unwrap_optional(typing.get_type_hints(cls)[leaf])[0]


def build_parser(config_cls: Type[T], description: str = "") -> argparse.ArgumentParser:
    """argparse parser with one flag per leaf field of ``config_cls`` (``dest`` = dotted path)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--config", type=Path, default=None, help="YAML file of defaults (CLI flags win)")
    for name, path in flag_paths(config_cls).items():
        f, tp = _field_of(config_cls, path)
        default = _default_of(f)
        help_text = f.metadata.get("help", "")
        required = default is dataclasses.MISSING
        kwargs: Dict[str, Any] = {"help": help_text + ("" if required else f" (default: {default})")}
        if f.metadata.get("positional"):
            kwargs.update(nargs=None if required else "?", default=argparse.SUPPRESS)
            parser.add_argument(path, metavar=name.upper(), type=_scalar_parser(tp), **kwargs)
            continue
        kwargs["default"] = argparse.SUPPRESS
        if required:
            kwargs["required"] = True
        flags = [f"--{name}"] + [f"--{alias}" for alias in f.metadata.get("aliases", ())]
        if "." in path and typing.get_origin(tp) is not typing.Literal:
            kwargs["metavar"] = name.upper()
        if tp is bool:
            kwargs.pop("metavar", None)
            parser.add_argument(*flags, dest=path, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        origin = typing.get_origin(tp)
        if origin in (list, List, tuple, Sequence):
            (item_tp,) = typing.get_args(tp)[:1] or (str,)
            if typing.get_origin(item_tp) is typing.Literal:
                kwargs["choices"] = list(typing.get_args(item_tp))
            parser.add_argument(*flags, dest=path, nargs="*", type=_scalar_parser(item_tp), **kwargs)
            continue
        if origin is typing.Literal:
            kwargs["choices"] = list(typing.get_args(tp))
        parser.add_argument(*flags, dest=path, type=_scalar_parser(tp), **kwargs)
    return parser


def _nest(config_cls: Type, values: Dict[str, Any], source: str) -> Dict[str, Any]:
    """``values`` with nested mappings, dotted keys or flag names -> a nested dict (unknown keys: error)."""
    flags = flag_paths(config_cls)
    types = {f.name: _unwrap_optional(typing.get_type_hints(config_cls)[f.name])[0] for f in dataclasses.fields(config_cls)}
    flat: Dict[str, Any] = {}
    unknown = []
    for key, value in values.items():
        if key in types and _is_config(types[key]):
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                value = config_to_dict(value)
            if not isinstance(value, dict):
                raise ValueError(f"{source}: {key} must be a mapping of {types[key].__name__} options")
            for sub_path, sub_value in _flatten(_nest(types[key], value, f"{source}: {key}")).items():
                flat[f"{key}.{sub_path}"] = sub_value
        elif key in types:
            flat[key] = value
        elif key in flags:
            flat[flags[key]] = value
        elif key in flags.values():
            flat[key] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{source}: unknown config keys {sorted(unknown)} for {config_cls.__name__}")
    out: Dict[str, Any] = {}
    for path, value in flat.items():
        node = out
        *parents, leaf = path.split(".")
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return out


def _flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """Nested dict -> dotted keys (only nested configs are dicts here)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_from_dict(config_cls: Type[T], values: Dict[str, Any], source: str = "config") -> T:
    """Build ``config_cls`` from plain values (nested mappings, dotted keys or flag names).

    Paths become :class:`~pathlib.Path`, ``Literal`` values are checked; missing required fields
    and unknown keys are one-line ``ValueError``s naming ``source``."""
    nested = _nest(config_cls, dict(values), source)
    hints = typing.get_type_hints(config_cls)
    converted = {}
    for f in dataclasses.fields(config_cls):
        tp, optional = _unwrap_optional(hints[f.name])
        if f.name not in nested:
            if _default_of(f) is dataclasses.MISSING:
                raise ValueError(f"{source}: {f.name} is required")
            continue
        value = nested[f.name]
        if _is_config(tp):
            if not isinstance(value, tp):
                # a partial override starts from this field's own default (e.g. FitConfig(w_steps=30)), not
                # from the nested class's defaults: otherwise one flag would reset its siblings
                default = _default_of(f)
                base = _flatten(config_to_dict(default)) if isinstance(default, tp) else {}
                value = config_from_dict(tp, {**base, **_flatten(value)}, source)
            converted[f.name] = value
        elif value is None and optional:
            converted[f.name] = None
        elif tp is Path and value is not None:
            converted[f.name] = Path(value)
        elif typing.get_origin(tp) is typing.Literal and value not in typing.get_args(tp):
            raise ValueError(f"{source}: {f.name}={value!r} must be one of {typing.get_args(tp)}")
        else:
            converted[f.name] = _checked(value, tp, f.name, source)
    cfg = config_cls(**converted)
    if hasattr(cfg, "check"):  # the config's own range checks (one-line ValueError naming the flag)
        cfg.check()
    return cfg


def _checked(value: Any, tp: Any, key: str, source: str) -> Any:
    """``value`` (from YAML or the command line) checked against the field type ``tp``; ints are
    accepted for floats. Unknown annotations pass through unchanged."""

    def bad(expected: str) -> ValueError:
        return ValueError(f"{source}: {key} must be {expected}, got {value!r}")

    if tp is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        return float(value)
    elif tp is str:
        if not isinstance(value, str):
            raise bad("a string")
    elif typing.get_origin(tp) in (list, List, tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            raise bad("a list")
        item_tp, _ = _unwrap_optional((typing.get_args(tp) or (Any,))[0])
        if item_tp in (bool, int, float, str):
            return [_checked(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    return value


def load_yaml(path: Path) -> Dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValueError(f"{path}: invalid YAML{at} ({getattr(exc, 'problem', None) or type(exc).__name__})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read config ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of config keys")
    return data


def merge_values(config_cls: Type, base: Dict[str, Any], override: Dict[str, Any], source: str) -> Dict[str, Any]:
    """``override`` on top of ``base`` (both in any form :func:`config_from_dict` accepts), as
    dotted keys."""
    merged = _flatten(_nest(config_cls, base, source))
    merged.update(_flatten(_nest(config_cls, override, "command line")))
    return merged


def parse_config(config_cls: Type[T], argv: Optional[Sequence[str]] = None, description: str = "",
                 default_yaml: Optional[Path] = None) -> T:
    """Parse ``argv`` into a ``config_cls`` instance (see module doc for precedence)."""
    parser = build_parser(config_cls, description)
    args = vars(parser.parse_args(argv))
    yaml_path = args.pop("config", None) or default_yaml
    base = load_yaml(yaml_path) if yaml_path is not None else {}
    values = merge_values(config_cls, base, args, str(yaml_path or "command line"))
    return config_from_dict(config_cls, values, source=str(yaml_path or "command line"))


def config_to_dict(cfg: Any) -> Dict[str, Any]:
    """Plain, YAML/JSON-safe (nested) dict of a dataclass config."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = config_to_dict(value)
        elif isinstance(value, Path):
            value = str(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def save_config(cfg: Any, run_dir: Path, name: str = "config.yaml") -> Path:
    """Write the resolved config to ``run_dir/name`` atomically; returns the path."""
    from fastavatar.io.atomic import atomic_write_text

    path = Path(run_dir) / name
    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return path
