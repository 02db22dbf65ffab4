"""Checkpoint I/O for the decoder, the W-encoder and the tracker.

Reads the released FastAvatar files unchanged and writes files that keep the released
top-level keys (so the released scripts could read ours) while being loadable with
``torch.load(..., weights_only=True)``:

* decoder (``decoder_neutral_flame.pth``): ``model_dict``, ``w_vectors [S,512]``,
  ``w_ids_to_idx {'%03d' id: row}``, ``epoch``, ``global_step``, ``config`` — ours adds
  ``optimizer_states``, ``model_config``, ``extra`` and ``format: "fastavatar-decoder-v1"``;
* W-encoder (``encoder_neutral_flame.pth``): ``model_dict``, ``optimizer_dict``,
  ``scheduler_dict``, ``epoch``, ``global_step``, ``config`` (+ ``format``, ...);
* tracker (``dino_encoder.pth``): ``model_state_dict`` (``encoder.``-prefixed) (+ ours).

``config`` is always a plain dict in files we write (no pickled classes). Released files
pickle ``__main__.TrainingConfig`` dataclasses; :func:`load_checkpoint_file` first tries
``weights_only=True`` and only then falls back to a full unpickle in which classes that
cannot be imported become harmless :class:`PickledStandIn` objects, and a short list of
dangerous callables (os/subprocess/eval/...) is refused. Only load files you trust.
"""

from __future__ import annotations

import io
import os
import pickle
import types
from dataclasses import asdict, is_dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

from fastavatar.models.decoder import DecoderConfig, GaussianDecoder, infer_decoder_config
from fastavatar.models.tracker import (
    DinoTracker,
    TrackerConfig,
    infer_tracker_config,
    read_tracker_sidecars,
)
from fastavatar.models.vit import ViTConfig
from fastavatar.models.w_encoder import WEncoder
from fastavatar.splats import SPLAT_KEYS
from fastavatar.utils.io import atomic_torch_save

PathLike = Union[str, os.PathLike]
WEIGHTS_README = "pretrained_weights/README.md"
DECODER_FORMAT = "fastavatar-decoder-v1"
W_ENCODER_FORMAT = "fastavatar-w-encoder-v1"
TRACKER_FORMAT = "fastavatar-tracker-v1"

KIND_NAMES = {
    "decoder": "decoder",
    "w_encoder": "W-encoder",
    "tracker": "DINO tracker",
    "dinov2_backbone": "bare DINOv2 backbone",
    "unknown": "unrecognised",
}


# ---------------------------------------------------------------------------- lenient unpickling
class PickledStandIn:
    """Stand-in for a pickled object whose class cannot be imported (e.g. ``__main__.TrainingConfig``).

    Keeps the pickled state in ``__dict__``; :meth:`to_dict` returns it as a plain dict.
    """

    _pickled_module = "?"
    _pickled_name = "?"

    def __init__(self, *args, **kwargs):
        if args:
            self.__dict__["_args"] = args
        self.__dict__.update(kwargs)

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2 and (state[0] is None or isinstance(state[0], dict)):
            state, slots = state
            self.__dict__.update(slots or {})
        if isinstance(state, dict):
            self.__dict__.update(state)
        elif state is not None:
            self.__dict__["_state"] = state

    def to_dict(self) -> dict:
        return {k: to_plain(v) for k, v in self.__dict__.items()}

    def __repr__(self) -> str:
        return f"<stand-in for {self._pickled_module}.{self._pickled_name}: {sorted(self.__dict__)}>"


_STANDINS: Dict[Tuple[str, str], type] = {}
_REFUSED_MODULES = {"os", "posix", "nt", "subprocess", "sys", "shutil", "importlib", "runpy", "socket",
                    "pty", "code", "ctypes", "multiprocessing", "webbrowser", "pickle", "marshal"}
_REFUSED_BUILTINS = {"eval", "exec", "compile", "__import__", "open", "getattr", "setattr", "delattr",
                     "globals", "locals", "vars", "input", "breakpoint", "help", "exit", "quit"}


def _standin(module: str, name: str) -> type:
    key = (module, name)
    if key not in _STANDINS:
        _STANDINS[key] = type(name, (PickledStandIn,), {"_pickled_module": module, "_pickled_name": name,
                                                         "__module__": "fastavatar.checkpoints"})
    return _STANDINS[key]


class _LenientUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        root = module.split(".")[0]
        if root in _REFUSED_MODULES or (root == "builtins" and name in _REFUSED_BUILTINS):
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return _standin(module, name)


_lenient_pickle = types.ModuleType("fastavatar_lenient_pickle")
_lenient_pickle.Unpickler = _LenientUnpickler
_lenient_pickle.load = lambda f, **kw: _LenientUnpickler(f, **kw).load()
_lenient_pickle.loads = lambda b, **kw: _LenientUnpickler(io.BytesIO(b), **kw).load()
_lenient_pickle.__name__ = "fastavatar_lenient_pickle"


def load_checkpoint_file(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> Any:
    """``torch.load`` a checkpoint: ``weights_only=True`` first, then a lenient full unpickle.

    Raises FileNotFoundError (naming the file and pretrained_weights/README.md) when missing,
    ValueError when the file is not a readable torch checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint not found: {path} (see {WEIGHTS_README} for the files and where to put them)"
        )
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        pass  # released files pickle dataclass configs: fall through to the lenient loader
    except Exception as e:  # corrupt / not a torch file
        raise ValueError(f"{path}: not a readable torch checkpoint ({_short(e)})") from None
    try:
        return torch.load(path, map_location=map_location, weights_only=False, pickle_module=_lenient_pickle)
    except Exception as e:
        raise ValueError(f"{path}: could not unpickle checkpoint ({_short(e)})") from None


def _short(e: BaseException) -> str:
    lines = str(e).splitlines()
    return f"{type(e).__name__}: {lines[0][:200] if lines else ''}"


def to_plain(obj: Any) -> Any:
    """Best-effort conversion of a (possibly stand-in) config object to plain Python data."""
    if isinstance(obj, PickledStandIn):
        return obj.to_dict()
    if is_dataclass(obj) and not isinstance(obj, type):
        return {k: to_plain(v) for k, v in asdict(obj).items()}
    if isinstance(obj, Mapping):
        return {str(k) if not isinstance(k, (int, float, bool)) else k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, Enum):
        return to_plain(obj.value)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        try:
            return obj.item()
        except Exception:
            pass
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return repr(obj)


def _plain_config(config: Any, where: str, allow_tensors: bool = False) -> dict:
    """Config for saving: a dataclass or mapping -> plain dict (strict: unknown objects are an
    error). ``allow_tensors`` keeps tensors (still ``weights_only``-loadable) for ``extra``."""
    if config is None:
        return {}
    if is_dataclass(config) and not isinstance(config, type):
        config = asdict(config)
    if not isinstance(config, Mapping):
        raise TypeError(f"{where}: config must be a dict or dataclass, got {type(config).__name__}")

    def conv(v: Any, key: str) -> Any:
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, Mapping):
            return {str(k): conv(x, f"{key}.{k}") for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [conv(x, f"{key}[{i}]") for i, x in enumerate(v)]
        if is_dataclass(v) and not isinstance(v, type):
            return conv(asdict(v), key)
        if isinstance(v, Enum):
            return conv(v.value, key)
        if isinstance(v, os.PathLike):
            return os.fspath(v)
        if isinstance(v, torch.Tensor):
            if allow_tensors:
                return v.detach().cpu().clone()
            if v.numel() == 1:
                return v.item()
        if type(v).__module__ == "numpy" and hasattr(v, "item"):
            return v.item()
        raise TypeError(f"{where}: config entry {key!r} has type {type(v).__name__}, not plain data")

    return {str(k): conv(v, str(k)) for k, v in config.items()}


# ---------------------------------------------------------------------------- kinds and checks
def _state_of(ckpt: Any, keys: Iterable[str]) -> Optional[Mapping[str, torch.Tensor]]:
    if not isinstance(ckpt, Mapping):
        return None
    for k in keys:
        if isinstance(ckpt.get(k), Mapping):
            return ckpt[k]
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return ckpt
    return None


def detect_checkpoint_kind(ckpt: Any) -> str:
    """'decoder', 'w_encoder', 'tracker', 'dinov2_backbone' or 'unknown'."""
    state = _state_of(ckpt, ("model_dict", "model_state_dict", "state_dict", "model"))
    if state is None:
        return "unknown"
    keys = set(state)
    if any(k.startswith("conditioning_mlp.") for k in keys):
        return "decoder"
    if "temperature" in keys and any(k.startswith("projector.") for k in keys):
        return "w_encoder"
    if any(k.startswith("encoder.dino.") for k in keys) or "encoder.points_projector.0.weight" in keys:
        return "tracker"
    if "cls_token" in keys and "pos_embed" in keys:
        return "dinov2_backbone"
    return "unknown"


def _first(items: List[str], n: int = 4) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return "[" + ", ".join(items[:n]) + "]" + more


def state_dict_mismatch(model_or_keys: Union[nn.Module, Mapping[str, torch.Tensor]],
                        state: Mapping[str, torch.Tensor]) -> Tuple[List[str], List[str], List[str]]:
    """(missing keys, unexpected keys, 'key: file [..] vs model [..]' shape mismatches)."""
    expected = model_or_keys.state_dict() if isinstance(model_or_keys, nn.Module) else model_or_keys
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: file {list(state[k].shape)} vs model {list(expected[k].shape)}"
        for k in expected
        if k in state and isinstance(state[k], torch.Tensor) and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    return missing, unexpected, shapes


def check_state_dict(model_or_keys, state: Mapping[str, torch.Tensor], path: PathLike, kind: str,
                     found_kind: Optional[str] = None, names_only: bool = False) -> None:
    """Raise a one-line ValueError naming ``path`` when ``state`` does not fit the model exactly
    (missing / unexpected keys, and shape mismatches unless ``names_only``)."""
    missing, unexpected, shapes = state_dict_mismatch(model_or_keys, state)
    if names_only:
        shapes = []
    if not (missing or unexpected or shapes):
        return
    parts = []
    if missing:
        parts.append(f"missing keys {_first(missing)}")
    if unexpected:
        parts.append(f"unexpected keys {_first(unexpected)}")
    if shapes:
        parts.append(f"shape mismatches {_first(shapes, 3)}")
    name = KIND_NAMES.get(kind, kind)
    if found_kind and found_kind != kind:
        head = f"not a {name} checkpoint (it looks like a {KIND_NAMES[found_kind]} checkpoint)"
    else:
        head = f"{name} weights do not fit the model"
    raise ValueError(f"{path}: {head}: " + "; ".join(parts))


def _reference_keys(kind: str) -> Dict[str, torch.Tensor]:
    """State dict of a tiny model of ``kind`` with the released key names (for error messages)."""
    if kind == "decoder":
        tpl = {"means": torch.zeros(1, 3), "quats": torch.zeros(1, 4), "scales": torch.zeros(1, 3),
               "opacities": torch.zeros(1), "sh0": torch.zeros(1, 1, 3), "shN": torch.zeros(1, 15, 3)}
        return GaussianDecoder(tpl, DecoderConfig(gaussians_per_round=1)).state_dict()
    if kind == "w_encoder":
        return WEncoder().state_dict()
    if kind == "tracker":
        vit = ViTConfig(img_size=14, embed_dim=8, depth=12, num_heads=1)
        return DinoTracker(TrackerConfig(vit=vit, max_points=1, hidden_dim=4)).state_dict()
    raise ValueError(kind)


def _require_kind(ckpt: Any, path: Path, kind: str, state_keys: Tuple[str, ...]) -> Mapping[str, torch.Tensor]:
    found = detect_checkpoint_kind(ckpt)
    state = _state_of(ckpt, state_keys)
    if found == kind and state is not None:
        return state
    if state is None:
        top = _first(sorted(map(str, ckpt))) if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise ValueError(
            f"{path}: not a {KIND_NAMES[kind]} checkpoint: no {' / '.join(repr(k) for k in state_keys)} entry "
            f"(top-level keys: {top}; looks like a {KIND_NAMES[found]} checkpoint)"
        )
    check_state_dict(_reference_keys(kind), state, path, kind, found, names_only=True)
    raise ValueError(f"{path}: not a {KIND_NAMES[kind]} checkpoint (looks like a {KIND_NAMES[found]} checkpoint)")


# ---------------------------------------------------------------------------- subject ids
def normalize_subject_id(subject_id: Union[str, int]) -> str:
    """'6' / 6 / '006' -> '006' (released: ``str(id).zfill(3)``)."""
    return str(subject_id).strip().zfill(3)


def make_w_ids_to_idx(subject_ids: Iterable[Union[str, int]]) -> Dict[str, int]:
    """Subject ids -> {'%03d' id: row}, rows assigned in sorted integer-id order (released rule;
    non-numeric ids sort after numeric ones, by string)."""
    ids = sorted({normalize_subject_id(s) for s in subject_ids},
                 key=lambda s: (0, int(s), s) if s.isdigit() else (1, 0, s))
    return {s: i for i, s in enumerate(ids)}


def subject_ids_to_rows(w_ids_to_idx: Mapping[str, int], subject_ids: Iterable[Union[str, int]]) -> torch.Tensor:
    """Subject ids -> LongTensor of W rows; ValueError listing unknown ids."""
    ids = [normalize_subject_id(s) for s in subject_ids]
    unknown = [s for s in ids if s not in w_ids_to_idx]
    if unknown:
        known = _first(sorted(w_ids_to_idx), 6)
        raise ValueError(f"subject ids not in the W table: {_first(unknown, 6)} (known: {known})")
    return torch.tensor([int(w_ids_to_idx[s]) for s in ids], dtype=torch.long)


def rows_to_subject_ids(w_ids_to_idx: Mapping[str, int]) -> List[str]:
    """Inverse table: row i -> subject id."""
    out = [""] * (max(w_ids_to_idx.values()) + 1 if w_ids_to_idx else 0)
    for s, i in w_ids_to_idx.items():
        out[int(i)] = s
    return out


# ---------------------------------------------------------------------------- loaders
def load_decoder(
    path: PathLike, device: Union[str, torch.device] = "cpu", config: Optional[DecoderConfig] = None
) -> Tuple[GaussianDecoder, Optional[torch.Tensor], Optional[Dict[str, int]]]:
    """Decoder checkpoint (released or ours) -> (decoder in eval mode, w_vectors [S,512] or None,
    w_ids_to_idx or None). Needs no template PLY: sizes and template come from the file."""
    path = Path(path)
    ckpt = load_checkpoint_file(path)
    state = _require_kind(ckpt, path, "decoder", ("model_dict", "state_dict"))
    base = config
    if base is None and isinstance(ckpt.get("model_config"), Mapping):
        known = DecoderConfig.__dataclass_fields__
        base = DecoderConfig(**{k: v for k, v in ckpt["model_config"].items() if k in known})
    try:
        cfg = DecoderConfig(**{**(asdict(base) if base is not None else {}), **infer_decoder_config(state)})
        decoder = GaussianDecoder({k: state[f"splats.{k}"] for k in SPLAT_KEYS}, cfg)
    except (ValueError, KeyError, RuntimeError) as e:
        check_state_dict(_reference_keys("decoder"), state, path, "decoder", names_only=True)
        raise ValueError(f"{path}: inconsistent decoder state dict ({_short(e)})") from None
    check_state_dict(decoder, state, path, "decoder")
    decoder.load_state_dict(state, strict=True)
    w_vectors = ckpt.get("w_vectors") if isinstance(ckpt, Mapping) else None
    if w_vectors is not None:
        w_vectors = torch.as_tensor(w_vectors).detach().float().clone()
        if w_vectors.dim() != 2 or w_vectors.shape[1] != decoder.config.w_dim:
            raise ValueError(
                f"{path}: w_vectors has shape {list(w_vectors.shape)}, expected [S, {decoder.config.w_dim}]"
            )
        w_vectors = w_vectors.to(device)
    ids = ckpt.get("w_ids_to_idx") if isinstance(ckpt, Mapping) else None
    if ids is not None:
        ids = {normalize_subject_id(k): int(v) for k, v in dict(ids).items()}
        if w_vectors is not None and ids and max(ids.values()) >= w_vectors.shape[0]:
            raise ValueError(
                f"{path}: w_ids_to_idx refers to row {max(ids.values())} but w_vectors has {w_vectors.shape[0]} rows"
            )
    return decoder.to(device).eval(), w_vectors, ids


def load_w_encoder(path: PathLike, device: Union[str, torch.device] = "cpu") -> WEncoder:
    """W-encoder checkpoint (released full or slim file, or ours) -> WEncoder in eval mode."""
    path = Path(path)
    ckpt = load_checkpoint_file(path)
    state = _require_kind(ckpt, path, "w_encoder", ("model_dict", "state_dict"))
    try:
        model = WEncoder.from_state_dict(state, load=False)
    except (RuntimeError, ValueError, IndexError, KeyError) as e:
        check_state_dict(_reference_keys("w_encoder"), state, path, "w_encoder", names_only=True)
        raise ValueError(f"{path}: could not load W-encoder ({_short(e)})") from None
    check_state_dict(model, state, path, "w_encoder")
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


def load_tracker(
    path: PathLike,
    device: Union[str, torch.device] = "cpu",
    backbone_only_ok: bool = False,
    config: Optional[TrackerConfig] = None,
    use_sidecars: bool = True,
) -> DinoTracker:
    """Tracker checkpoint -> DinoTracker in eval mode.

    Accepts the released ``dino_encoder.pth`` (``model_state_dict``, optional metadata.json /
    args.json sidecars, see :func:`read_tracker_sidecars`) and ours. With
    ``backbone_only_ok=True`` a bare DINOv2 backbone file (e.g. ``dinov2_vitb14_pretrain.pth``)
    is also accepted: the backbone is loaded and the heads stay randomly initialised (a
    starting point for tracker training).
    """
    path = Path(path)
    ckpt = load_checkpoint_file(path)
    kind = detect_checkpoint_kind(ckpt)
    if kind == "dinov2_backbone" and backbone_only_ok:
        tracker = DinoTracker(config or TrackerConfig())
        state = _state_of(ckpt, ("model", "state_dict"))
        check_state_dict(tracker.backbone, state, path, "dinov2_backbone")
        tracker.backbone.load_state_dict(state, strict=True)
        return tracker.to(device).eval()
    state = _require_kind(ckpt, path, "tracker", ("model_state_dict", "state_dict"))
    base = config
    if base is None and isinstance(ckpt.get("model_config"), Mapping):
        base = TrackerConfig.from_dict(ckpt["model_config"])
    # Sidecars belong to released runs; our files carry their config and mean shape themselves.
    ours = isinstance(ckpt, Mapping) and ckpt.get("format") == TRACKER_FORMAT
    sidecars = read_tracker_sidecars(path) if (use_sidecars and not ours) else {}
    mean_shape = sidecars.pop("mean_shape", None)
    if base is None:
        base = TrackerConfig.from_dict({**sidecars, "dropout": 0.0})
    try:
        cfg = infer_tracker_config(state, base)
        tracker = DinoTracker(cfg)
    except (ValueError, KeyError, IndexError) as e:
        raise ValueError(f"{path}: could not build tracker ({_short(e)})") from None
    check_state_dict(tracker, state, path, "tracker")
    tracker.load_state_dict(state, strict=True)
    if mean_shape is not None:
        tracker.set_mean_shape(torch.tensor(mean_shape, dtype=torch.float32))
    return tracker.to(device).eval()


# ---------------------------------------------------------------------------- writers
def _cpu_state(module: nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def save_decoder_checkpoint(
    path: PathLike,
    decoder: GaussianDecoder,
    w_vectors: Optional[torch.Tensor],
    w_ids_to_idx: Optional[Mapping[str, int]],
    epoch: int,
    global_step: int,
    config: Any = None,
    optimizer_states: Optional[Mapping[str, Any]] = None,
    extra: Optional[Mapping[str, Any]] = None,
) -> None:
    """Atomically write a decoder checkpoint (released keys + ours; weights_only-loadable)."""
    if w_vectors is not None and (w_vectors.dim() != 2 or w_vectors.shape[1] != decoder.config.w_dim):
        raise ValueError(f"{path}: w_vectors must be [S, {decoder.config.w_dim}], got {list(w_vectors.shape)}")
    ids = {normalize_subject_id(k): int(v) for k, v in dict(w_ids_to_idx).items()} if w_ids_to_idx is not None else None
    if ids and w_vectors is not None and max(ids.values()) >= w_vectors.shape[0]:
        raise ValueError(
            f"{path}: w_ids_to_idx refers to row {max(ids.values())} but w_vectors has {w_vectors.shape[0]} rows"
        )
    obj = {
        "model_dict": _cpu_state(decoder),
        "w_vectors": w_vectors.detach().cpu().clone() if w_vectors is not None else None,
        "w_ids_to_idx": ids,
        "epoch": int(epoch),
        "global_step": int(global_step),
        "config": _plain_config(config, str(path)),
        "optimizer_states": dict(optimizer_states) if optimizer_states is not None else None,
        "model_config": decoder.config.to_dict(),
        "format": DECODER_FORMAT,
        "extra": _plain_config(extra, str(path), allow_tensors=True) if extra is not None else None,
    }
    atomic_torch_save(obj, path)


def _save_trained_model(
    path: PathLike,
    model_key: str,
    module: nn.Module,
    model_config: dict,
    fmt: str,
    epoch: int,
    global_step: int,
    config: Any,
    optimizer_dict: Optional[Mapping[str, Any]],
    scheduler_dict: Optional[Mapping[str, Any]],
    extra: Optional[Mapping[str, Any]],
) -> None:
    """The W-encoder / tracker checkpoint layout: weights under ``model_key`` (as released), then
    optimizer / scheduler state, progress, run config, model config, ``format`` and ``extra``."""
    obj = {
        model_key: _cpu_state(module),
        "optimizer_dict": dict(optimizer_dict) if optimizer_dict is not None else None,
        "scheduler_dict": dict(scheduler_dict) if scheduler_dict is not None else None,
        "epoch": int(epoch),
        "global_step": int(global_step),
        "config": _plain_config(config, str(path)),
        "model_config": model_config,
        "format": fmt,
        "extra": _plain_config(extra, str(path), allow_tensors=True) if extra is not None else None,
    }
    atomic_torch_save(obj, path)


def save_w_encoder_checkpoint(
    path: PathLike,
    encoder: WEncoder,
    epoch: int,
    global_step: int,
    config: Any = None,
    optimizer_dict: Optional[Mapping[str, Any]] = None,
    scheduler_dict: Optional[Mapping[str, Any]] = None,
    extra: Optional[Mapping[str, Any]] = None,
) -> None:
    """Atomically write a W-encoder checkpoint (released keys + ours)."""
    _save_trained_model(
        path, "model_dict", encoder, encoder.config.to_dict(), W_ENCODER_FORMAT,
        epoch, global_step, config, optimizer_dict, scheduler_dict, extra,
    )


def save_tracker_checkpoint(
    path: PathLike,
    tracker: DinoTracker,
    epoch: int,
    global_step: int,
    config: Any = None,
    optimizer_dict: Optional[Mapping[str, Any]] = None,
    scheduler_dict: Optional[Mapping[str, Any]] = None,
    extra: Optional[Mapping[str, Any]] = None,
) -> None:
    """Atomically write a tracker checkpoint (``model_state_dict`` as released + ours)."""
    _save_trained_model(
        path, "model_state_dict", tracker, _plain_config(tracker.config.to_dict(), str(path)), TRACKER_FORMAT,
        epoch, global_step, config, optimizer_dict, scheduler_dict, extra,
    )


def checkpoint_config(ckpt: Mapping[str, Any]) -> dict:
    """The ``config`` entry of a loaded checkpoint as a plain dict (works for released pickled
    dataclasses, which load as :class:`PickledStandIn`)."""
    cfg = ckpt.get("config") if isinstance(ckpt, Mapping) else None
    plain = to_plain(cfg) if cfg is not None else {}
    return plain if isinstance(plain, dict) else {"value": plain}


__all__ = [
    "PickledStandIn",
    "check_state_dict",
    "checkpoint_config",
    "detect_checkpoint_kind",
    "load_checkpoint_file",
    "load_decoder",
    "load_tracker",
    "load_w_encoder",
    "make_w_ids_to_idx",
    "normalize_subject_id",
    "rows_to_subject_ids",
    "save_decoder_checkpoint",
    "save_tracker_checkpoint",
    "save_w_encoder_checkpoint",
    "state_dict_mismatch",
    "subject_ids_to_rows",
    "to_plain",
]
