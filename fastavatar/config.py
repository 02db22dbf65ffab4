"""Typed dataclass configs -> argparse, with YAML defaults and a saved resolved config.

Precedence (lowest to highest): dataclass defaults < ``--config file.yaml`` < explicit CLI flags.
Every dataclass field becomes a ``--field_name`` flag whose help text is the field's comment
(given as ``field(metadata={"help": ...})`` or via :func:`option`). Booleans are
``--flag/--no-flag`` (never ``type=bool``). Lists take several values (``--subjects 306 369``).
The resolved config is written to ``<run_dir>/config.yaml`` (plain YAML, no pickled classes).
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Type, TypeVar

import yaml

T = TypeVar("T")


def option(default: Any = dataclasses.MISSING, help: str = "", **kwargs) -> Any:  # noqa: A002
    """A dataclass field with a help string (mutable defaults are copied per instance)."""
    if isinstance(default, (list, dict, tuple)) and not isinstance(default, str):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata={"help": help}, **kwargs)
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


def _unwrap_optional(tp):
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


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


def build_parser(config_cls: Type[T], description: str = "") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", type=Path, default=None, help="YAML file of defaults (CLI flags win)")
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        tp, _ = _unwrap_optional(hints[f.name])
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        kwargs: Dict[str, Any] = {"default": argparse.SUPPRESS, "help": f"{help_text} (default: {default})"}
        if tp is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, **kwargs)
            continue
        origin = typing.get_origin(tp)
        if origin in (list, List, tuple, Sequence):
            (item_tp,) = typing.get_args(tp)[:1] or (str,)
            parser.add_argument(f"--{f.name}", nargs="*", type=_scalar_parser(item_tp), **kwargs)
            continue
        if origin is typing.Literal:
            kwargs["choices"] = list(typing.get_args(tp))
        parser.add_argument(f"--{f.name}", type=_scalar_parser(tp), **kwargs)
    return parser


def config_from_dict(config_cls: Type[T], values: Dict[str, Any], source: str = "config") -> T:
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{source}: unknown config keys {unknown} for {config_cls.__name__}")
    hints = typing.get_type_hints(config_cls)
    converted = {}
    for key, value in values.items():
        tp, optional = _unwrap_optional(hints[key])
        if value is None and optional:
            converted[key] = None
        elif tp is Path and value is not None:
            converted[key] = Path(value)
        elif typing.get_origin(tp) is typing.Literal and value not in typing.get_args(tp):
            raise ValueError(f"{source}: {key}={value!r} must be one of {typing.get_args(tp)}")
        else:
            converted[key] = value
    return config_cls(**converted)


def load_yaml(path: Path) -> Dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: invalid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of config keys")
    return data


def parse_config(config_cls: Type[T], argv: Optional[Sequence[str]] = None, description: str = "",
                 default_yaml: Optional[Path] = None) -> T:
    """Parse ``argv`` into a ``config_cls`` instance (see module doc for precedence)."""
    parser = build_parser(config_cls, description)
    args = vars(parser.parse_args(argv))
    yaml_path = args.pop("config", None) or default_yaml
    values: Dict[str, Any] = {}
    if yaml_path is not None:
        values.update(load_yaml(yaml_path))
    values.update(args)
    return config_from_dict(config_cls, values, source=str(yaml_path or "command line"))


def config_to_dict(cfg: Any) -> Dict[str, Any]:
    """Plain, YAML/JSON-safe dict of a dataclass config."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def save_config(cfg: Any, run_dir: Path, name: str = "config.yaml") -> Path:
    """Write the resolved config to ``run_dir/name`` atomically; returns the path."""
    from fastavatar.utils.io import atomic_write_text

    path = Path(run_dir) / name
    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return path
