"""The one restricted unpickler: every pickle we read goes through here.

What it reads: torch checkpoints of every kind (through ``torch.load(..., pickle_module=...)``,
see :func:`torch_load`), FLAME ``.pkl`` files (chumpy / scipy layout, :func:`load_pickle_file`)
and object members of ``.npz`` files (:func:`load_npz`).

How: an ALLOWLIST. Only these globals resolve to real objects (after Python 2 name mapping):

* torch's tensor rebuild functions (``torch._utils._rebuild_tensor[_v2|_v3]``,
  ``_rebuild_parameter[_with_state]``), dtypes, ``torch.Size``, ``torch.device``, layouts and
  ``torch.UntypedStorage`` (typed storages are resolved by ``torch.load`` itself);
* numpy arrays, dtypes and scalars, under both the numpy 1.x (``numpy.core``) and 2.x
  (``numpy._core``) module paths;
* ``collections.OrderedDict``, ``builtins.set`` / ``frozenset`` / ``complex`` / ``bytearray`` /
  ``object``, ``_codecs.encode`` (latin-1 only: how protocol 2 stores ``bytes``) and
  ``copyreg._reconstructor`` (protocol 0/1 objects, which then become stand-ins).

Every other global, e.g. ``__main__.TrainingConfig`` in the released checkpoints, a chumpy
``Ch`` or ``os.system``, becomes a :class:`StandInGlobal`: nothing is imported, and calling it
(REDUCE / NEWOBJ / INST / OBJ) only builds a :class:`StandInObject` that records the name, the
arguments and the pickled state. The opcodes that can reach code are re-implemented:
REDUCE and INST call only allowlisted callables; NEWOBJ accepts only stand-ins; BUILD applies
state only to stand-ins, tensors, ``OrderedDict`` and numpy arrays / dtypes (never to a class or
function, whose attributes would otherwise be writable); APPEND/SETITEM/ADDITEMS target only
built-in containers and stand-ins; extension codes (EXT1/2/4) are refused. Python 2 module
names are mapped *before* the allowlist is consulted, so ``__builtin__.exec`` is checked as
``builtins.exec`` and ``commands.getoutput`` as ``subprocess.getoutput`` (both stand-ins).
There is no fallback to full unpickling anywhere.

Why not torch's ``weights_only=True`` unpickler (``torch/_weights_only_unpickler.py``)? It
is an allowlist too, but an unknown global is an ``UnpicklingError`` for the whole file, so
the released checkpoints (which pickle ``__main__.TrainingConfig``) cannot load at all. The way
around that, ``torch.serialization.add_safe_globals`` / ``safe_globals``, needs each exact name in
advance and mutates process-wide state; numpy arrays and chumpy objects are not covered, and
the unpickler cannot read FLAME pickles or ``.npz`` members. We keep its rules (the same
tensor rebuild functions, BUILD limited to known types) and add inert stand-ins.
:func:`torch_load` also refuses TorchScript archives, which ``torch.load`` would otherwise hand
to ``torch.jit.load`` (an interpreter, not data).
"""

from __future__ import annotations

import _compat_pickle
import codecs
import io
import os
import pickle
import sys
import types
import zipfile
from collections import OrderedDict
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import numpy as np

PathLike = Union[str, os.PathLike]


class RestrictedUnpicklingError(pickle.UnpicklingError):
    """A pickle tried an operation the restricted unpickler does not allow."""


# ---------------------------------------------------------------------------- stand-ins
class StandInGlobal:
    """A global that is not on the allowlist: its names only. Calling it runs nothing."""

    __slots__ = ("module", "name", "original")

    def __init__(self, module: str, name: str, original: Optional[Tuple[str, str]] = None):
        self.module = module  # module after Python 2 name mapping, e.g. "builtins"
        self.name = name  # attribute name, e.g. "exec"
        self.original = original  # (module, name) as written in the pickle, when it differs

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"

    def __call__(self, *args: Any, **kwargs: Any) -> "StandInObject":
        return StandInObject(self, args, kwargs)

    def __reduce__(self):
        raise TypeError(f"stand-in for {self.qualname} cannot be pickled again")

    def __repr__(self) -> str:
        return f"<stand-in global {self.qualname}>"


class StandInObject:
    """What a pickle built from a :class:`StandInGlobal`: records, never executes.

    ``args`` / ``kwargs`` are the constructor (or REDUCE) arguments, ``state`` what BUILD passed
    (for a dataclass or a chumpy ``Ch``: its ``__dict__``), ``items`` / ``listitems`` what
    SETITEM(S) / APPEND(S) added (dict and list subclasses). A pickle that calls a stand-in
    object (``getattr(__import__('os'), 'system')(...)``) gets another one, with ``callee`` set.
    """

    __slots__ = ("global_", "args", "kwargs", "state", "items", "listitems", "callee")

    def __init__(self, global_: StandInGlobal, args: tuple = (), kwargs: Optional[dict] = None,
                 callee: Optional["StandInObject"] = None):
        self.callee = callee
        self.global_ = global_
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})
        self.state: Any = None
        self.items: Dict[Any, Any] = {}
        self.listitems: list = []

    @property
    def module(self) -> str:
        return self.global_.module

    @property
    def name(self) -> str:
        return self.global_.name

    @property
    def qualname(self) -> str:
        return self.global_.qualname

    def state_dict(self) -> Dict[str, Any]:
        """The pickled attribute state as one dict (``__dict__`` and slots merged)."""
        state = self.state
        out: Dict[str, Any] = {}
        if isinstance(state, tuple) and len(state) == 2 and (state[0] is None or isinstance(state[0], dict)):
            out.update(state[0] or {})
            out.update(state[1] or {})
        elif isinstance(state, dict):
            out.update(state)
        elif state is not None:
            out["state"] = state
        return out

    def to_dict(self) -> Dict[str, Any]:
        """Plain view: the attribute state, else the arguments (``{"args": [...]}``)."""
        out = self.state_dict()
        if not out and self.items:
            out = dict(self.items)
        if not out and (self.args or self.kwargs):
            out = {"args": list(self.args), **self.kwargs}
        return out

    def __reduce__(self):
        raise TypeError(f"stand-in for {self.qualname} cannot be pickled again")

    def __repr__(self) -> str:
        return f"<stand-in {self.qualname}: state keys {sorted(map(str, self.state_dict()))}>"


def find_standins(obj: Any, limit: int = 1000) -> list:
    """All :class:`StandInObject` / :class:`StandInGlobal` reachable from ``obj`` (containers,
    stand-in state and arguments), e.g. to report what a file asked for."""
    found, seen, todo = [], set(), [obj]
    while todo and len(found) < limit:
        x = todo.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, (StandInObject, StandInGlobal)):
            found.append(x)
        if isinstance(x, StandInObject):
            todo.extend([x.global_, x.state, x.args, x.kwargs, x.items, x.listitems, x.callee])
        elif isinstance(x, Mapping):
            todo.extend(x.keys())
            todo.extend(x.values())
        elif isinstance(x, (list, tuple, set, frozenset)):
            todo.extend(x)
    return found


# ---------------------------------------------------------------------------- the allowlist
_TEXT_CODECS = ("latin1", "latin-1", "iso-8859-1", "iso8859-1", "utf-8", "utf8", "ascii")


def _latin1_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as protocol 2 uses it for ``bytes``: str -> bytes, text codecs only."""
    if not isinstance(obj, str) or str(encoding).lower().replace("_", "-") not in _TEXT_CODECS:
        raise RestrictedUnpicklingError(f"_codecs.encode with {type(obj).__name__} / {encoding!r} is not allowed")
    return codecs.encode(obj, encoding, errors)


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """``copyreg._reconstructor`` (protocol 0/1 objects): only stand-ins are rebuilt."""
    if isinstance(cls, StandInGlobal):
        obj = StandInObject(cls, ())
        if state is not None:
            obj.args = (state,)
        return obj
    raise RestrictedUnpicklingError(f"copyreg._reconstructor of {cls!r} is not allowed")


def _no_hooks(fn: Callable, hooks_at: int) -> Callable:
    """Wrap a torch rebuild function so pickled backward hooks are dropped (torch.save never
    stores real hooks; a pickle that does is hostile or broken)."""

    def rebuild(*args: Any) -> Any:
        args = list(args)
        if len(args) > hooks_at:
            args[hooks_at] = OrderedDict()
        return fn(*args)

    rebuild.__name__ = fn.__name__
    return rebuild


def _rebuild_parameter_with_state(data: Any, requires_grad: Any, backward_hooks: Any, state: Any) -> Any:
    import torch

    for part in (state if isinstance(state, tuple) else (state,)):
        for key in (part or {}):
            if not isinstance(key, str) or key.startswith("__"):
                raise RestrictedUnpicklingError(f"parameter attribute {key!r} is not allowed")
    return torch._utils._rebuild_parameter_with_state(data, requires_grad, OrderedDict(), state)


def _numpy_reconstruct(subtype: Any, shape: Any, dtype: Any) -> Any:
    if subtype is not np.ndarray:
        raise RestrictedUnpicklingError(f"numpy _reconstruct of {subtype!r} is not allowed")
    return _NP_RECONSTRUCT(subtype, shape, dtype)


_NP_RECONSTRUCT = np.zeros(1).__reduce__()[0]  # numpy.{_core,core}.multiarray._reconstruct
_NP_SCALAR = np.float64(0).__reduce__()[0]  # numpy.{_core,core}.multiarray.scalar, whichever exists
_NP_FROMBUFFER = np.zeros(2).__reduce_ex__(5)[0]  # numpy.{_core,core}.numeric._frombuffer


def _build_allowlist() -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(callables: name -> function REDUCE/INST may call, values: name -> object that may only
    appear as an argument)."""
    import torch

    calls: Dict[str, Any] = {
        "collections.OrderedDict": OrderedDict,
        "builtins.set": set,
        "builtins.frozenset": frozenset,
        "builtins.complex": complex,
        "builtins.bytearray": bytearray,
        "_codecs.encode": _latin1_encode,
        "copyreg._reconstructor": _reconstructor,
        "torch.Size": torch.Size,
        "torch.device": torch.device,
        "torch.serialization._get_layout": torch.serialization._get_layout,
        "torch._utils._rebuild_tensor": torch._utils._rebuild_tensor,
        "torch._utils._rebuild_tensor_v2": _no_hooks(torch._utils._rebuild_tensor_v2, 5),
        "torch._utils._rebuild_tensor_v3": _no_hooks(torch._utils._rebuild_tensor_v3, 5),
        "torch._utils._rebuild_parameter": _no_hooks(torch._utils._rebuild_parameter, 2),
        "torch._utils._rebuild_parameter_with_state": _rebuild_parameter_with_state,
    }
    for core in ("numpy.core", "numpy._core"):  # numpy 1.x and 2.x spell the same functions
        calls[f"{core}.multiarray._reconstruct"] = _numpy_reconstruct
        calls[f"{core}.multiarray.scalar"] = _NP_SCALAR
        calls[f"{core}.numeric._frombuffer"] = _NP_FROMBUFFER
    calls["numpy.dtype"] = np.dtype
    values: Dict[str, Any] = {
        "builtins.object": object,
        "numpy.ndarray": np.ndarray,
        "torch.UntypedStorage": torch.UntypedStorage,
    }
    for name in dir(torch):
        attr = getattr(torch, name, None)
        if isinstance(attr, (torch.dtype, torch.layout, torch.memory_format)):
            values[f"torch.{name}"] = attr
    return calls, values


_ALLOWED: Optional[Tuple[Dict[str, Any], Dict[str, Any]]] = None


def _allowlist() -> Tuple[Dict[str, Any], Dict[str, Any]]:
    global _ALLOWED
    if _ALLOWED is None:
        _ALLOWED = _build_allowlist()
    return _ALLOWED


def _buildable(inst: Any) -> bool:
    """Objects BUILD may apply state to (exact types: a subclass could define __setstate__)."""
    import torch

    return type(inst) in (torch.Tensor, torch.nn.Parameter, OrderedDict, np.ndarray) or isinstance(inst, np.dtype)


# ---------------------------------------------------------------------------- the unpickler
_dispatch = dict(pickle._Unpickler.dispatch)


class RestrictedUnpickler(pickle._Unpickler):
    """``pickle`` unpickler with an allowlist; see the module docstring for the rules.

    Built on the pure-Python unpickler so that every opcode that can reach code is ours to
    define (the C unpickler's BUILD / APPEND / SETITEM would call methods of any object).
    """

    dispatch = _dispatch

    def find_class(self, module: str, name: str) -> Any:
        sys.audit("pickle.find_class", module, name)
        original = (module, name)
        if self.proto < 3 and self.fix_imports:  # Python 2 names, mapped BEFORE the check
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        calls, values = _allowlist()
        full = f"{module}.{name}"
        if full in calls:
            return calls[full]
        if full in values:
            return values[full]
        return StandInGlobal(module, name, original if original != (module, name) else None)

    # -- opcodes that call things
    def _call(self, func: Any, args: tuple) -> Any:
        if isinstance(func, StandInGlobal):
            return func(*args)
        if isinstance(func, StandInObject):
            return StandInObject(func.global_, args, callee=func)
        calls, _ = _allowlist()
        if not any(func is f for f in calls.values()):
            raise RestrictedUnpicklingError(f"calling {func!r} is not allowed")
        return func(*args)

    def load_reduce(self) -> None:
        args = self.stack.pop()
        if not isinstance(args, tuple):
            raise RestrictedUnpicklingError("REDUCE arguments must be a tuple")
        self.stack[-1] = self._call(self.stack[-1], args)

    dispatch[pickle.REDUCE[0]] = load_reduce

    def load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        if not isinstance(cls, StandInGlobal):
            raise RestrictedUnpicklingError(f"NEWOBJ of {cls!r} is not allowed")
        self.append(cls(*args))

    dispatch[pickle.NEWOBJ[0]] = load_newobj

    def load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        if not isinstance(cls, StandInGlobal) or not isinstance(kwargs, dict):
            raise RestrictedUnpicklingError(f"NEWOBJ_EX of {cls!r} is not allowed")
        self.append(cls(*args, **kwargs))

    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex

    def load_inst(self) -> None:
        module = self.readline()[:-1].decode("ascii")
        name = self.readline()[:-1].decode("ascii")
        klass = self.find_class(module, name)
        self.append(self._call(klass, tuple(self.pop_mark())))

    dispatch[pickle.INST[0]] = load_inst

    def load_obj(self) -> None:
        args = self.pop_mark()
        klass = args.pop(0)
        self.append(self._call(klass, tuple(args)))

    dispatch[pickle.OBJ[0]] = load_obj

    def load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, StandInObject):
            inst.state = state
            return
        if not _buildable(inst):
            raise RestrictedUnpicklingError(f"setting the state of {type(inst).__name__} is not allowed")
        if type(inst) is OrderedDict:  # torch state dicts carry ``_metadata`` this way
            slots = None
            if isinstance(state, tuple) and len(state) == 2:
                state, slots = state
            for part in (state, slots):
                if part:
                    if not isinstance(part, dict) or not all(isinstance(k, str) and not k.startswith("__")
                                                             for k in part):
                        raise RestrictedUnpicklingError("OrderedDict state must be a dict of plain names")
                    inst.__dict__.update(part)
            return
        import torch

        if type(inst) is torch.Tensor:  # legacy tensor pickles
            inst.set_(*state)
            return
        inst.__setstate__(state)  # Parameter, ndarray, dtype: their own C-level setters

    dispatch[pickle.BUILD[0]] = load_build

    # -- opcodes that mutate containers
    def _container(self, obj: Any, kinds: tuple, op: str) -> Any:
        if isinstance(obj, StandInObject) or type(obj) in kinds:
            return obj
        raise RestrictedUnpicklingError(f"{op} on {type(obj).__name__} is not allowed")

    def load_append(self) -> None:
        value = self.stack.pop()
        target = self._container(self.stack[-1], (list,), "APPEND")
        (target.listitems if isinstance(target, StandInObject) else target).append(value)

    dispatch[pickle.APPEND[0]] = load_append

    def load_appends(self) -> None:
        items = self.pop_mark()
        target = self._container(self.stack[-1], (list,), "APPENDS")
        (target.listitems if isinstance(target, StandInObject) else target).extend(items)

    dispatch[pickle.APPENDS[0]] = load_appends

    def load_setitem(self) -> None:
        value = self.stack.pop()
        key = self.stack.pop()
        target = self._container(self.stack[-1], (dict, OrderedDict), "SETITEM")
        (target.items if isinstance(target, StandInObject) else target)[key] = value

    dispatch[pickle.SETITEM[0]] = load_setitem

    def load_setitems(self) -> None:
        items = self.pop_mark()
        target = self._container(self.stack[-1], (dict, OrderedDict), "SETITEMS")
        d = target.items if isinstance(target, StandInObject) else target
        for i in range(0, len(items), 2):
            d[items[i]] = items[i + 1]

    dispatch[pickle.SETITEMS[0]] = load_setitems

    def load_additems(self) -> None:
        items = self.pop_mark()
        target = self._container(self.stack[-1], (set,), "ADDITEMS")
        if isinstance(target, StandInObject):
            target.listitems.extend(items)
        else:
            target.update(items)

    dispatch[pickle.ADDITEMS[0]] = load_additems

    def _refuse_ext(self) -> None:
        raise RestrictedUnpicklingError("pickle extension codes (EXT1/2/4) are not allowed")

    for _op in (pickle.EXT1, pickle.EXT2, pickle.EXT4):
        dispatch[_op[0]] = _refuse_ext
    del _op


def load(file: Any, **kwargs: Any) -> Any:
    """``pickle.load`` with the allowlist (``fix_imports``, ``encoding``, ``errors`` as pickle)."""
    kwargs.pop("buffers", None)
    return RestrictedUnpickler(file, **kwargs).load()


def loads(data: bytes, **kwargs: Any) -> Any:
    """``pickle.loads`` with the allowlist."""
    return load(io.BytesIO(data), **kwargs)


#: Passed to ``torch.load(pickle_module=...)``: torch subclasses ``Unpickler`` (adding storage
#: lookups) and calls ``load`` for legacy-format headers.
pickle_module = types.ModuleType("fastavatar_restricted_pickle")
pickle_module.Unpickler = RestrictedUnpickler
pickle_module.load = load
pickle_module.loads = loads
pickle_module.UnpicklingError = pickle.UnpicklingError


# ---------------------------------------------------------------------------- entry points
def is_torchscript_archive(path: PathLike) -> bool:
    """True for a TorchScript zip (``torch.load`` would run it through ``torch.jit.load``)."""
    import torch

    try:
        with open(path, "rb") as fh:
            if fh.read(4) != b"PK\x03\x04":
                return False
        reader = torch._C.PyTorchFileReader(os.fspath(path))
        records = reader.get_all_records()
    except (OSError, RuntimeError):
        return False
    return "constants.pkl" in records or any(r.startswith("code/") for r in records)


def torch_load(path: PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load`` through the restricted unpickler (never ``weights_only=False`` with the
    real pickle). Unknown globals load as stand-ins. Raises :class:`RestrictedUnpicklingError`
    for a TorchScript archive or a forbidden operation; other damage raises what torch raises
    (callers turn it into one line, see :mod:`fastavatar.io.integrity`)."""
    import torch

    if is_torchscript_archive(path):
        raise RestrictedUnpicklingError(f"{path}: TorchScript archive (code, not a checkpoint); refusing to load")
    return torch.load(os.fspath(path), map_location=map_location, weights_only=False, pickle_module=pickle_module)


def load_pickle_file(path: PathLike, encoding: str = "latin1") -> Any:
    """A plain pickle file (e.g. FLAME ``generic_model.pkl``, Python 2, hence latin-1)."""
    with open(path, "rb") as fh:
        return RestrictedUnpickler(fh, encoding=encoding).load()


def load_npz(path: PathLike) -> Dict[str, Any]:
    """All members of an ``.npz``; object arrays are unpickled with the allowlist (numpy's own
    ``allow_pickle=True`` would use the full unpickler)."""
    from numpy.lib import format as npformat

    out: Dict[str, Any] = {}
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
            with zf.open(info) as fh:
                try:
                    arr = npformat.read_array(fh, allow_pickle=False)
                except ValueError as exc:
                    if "allow_pickle" not in str(exc):
                        raise ValueError(f"{path}: member {key}: {exc}") from None
                    arr = None
            if arr is None:  # an object array: its data is a pickle
                with zf.open(info) as fh:
                    version = npformat.read_magic(fh)
                    read_header = npformat.read_array_header_1_0 if version == (1, 0) else npformat.read_array_header_2_0
                    read_header(fh)
                    arr = RestrictedUnpickler(fh, encoding="latin1").load()
                if not isinstance(arr, np.ndarray):
                    raise RestrictedUnpicklingError(f"{path}: member {key} holds {type(arr).__name__}, not an array")
            out[key] = arr
    return out


__all__ = [
    "RestrictedUnpickler",
    "RestrictedUnpicklingError",
    "StandInGlobal",
    "StandInObject",
    "find_standins",
    "is_torchscript_archive",
    "load",
    "load_npz",
    "load_pickle_file",
    "loads",
    "pickle_module",
    "torch_load",
]
