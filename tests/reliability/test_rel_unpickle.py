"""The restricted unpickler: malicious pickles of every kind run nothing; real files still load."""

from __future__ import annotations

import collections
import dataclasses
import pickle
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from fastavatar.io import unpickle as U
from fastavatar.io.integrity import CheckpointError, read_checkpoint
from rel_payloads import EXPECTED_GLOBAL, PAYLOAD_KINDS, fires_under_pickle, make_payload, raw_globals

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _qualnames(obj) -> set:
    return {s.qualname for s in U.find_standins(obj)}


def _decoder_like_checkpoint(config) -> dict:
    """The released decoder layout at toy size (model_dict, w_vectors Parameter, ids, config)."""
    return {
        "model_dict": collections.OrderedDict(
            [("splats.means", torch.randn(5, 3)), ("conditioning_mlp.shared_body.0.weight", torch.randn(4, 6))]
        ),
        "w_vectors": torch.nn.Parameter(torch.randn(2, 8)),
        "w_ids_to_idx": {"017": 0, "042": 1},
        "epoch": 3,
        "global_step": 30,
        "config": config,
    }


# ---------------------------------------------------------------------------- the payloads are real
@pytest.mark.parametrize("kind", PAYLOAD_KINDS)
def test_payload_fires_under_the_standard_unpickler(tmp_path, kind):
    """Control: without our loader each payload really runs (so 'marker absent' below means something)."""
    marker = tmp_path / "RAN"
    path = tmp_path / "p.pkl"
    path.write_bytes(pickle.dumps({"v_template": make_payload(kind, marker)}, protocol=2))
    assert fires_under_pickle(path, marker, "pickle")


def test_payload_fires_in_a_checkpoint_under_torch_load_weights_only_false(tmp_path):
    marker = tmp_path / "RAN"
    path = tmp_path / "decoder.pth"
    torch.save(_decoder_like_checkpoint(make_payload("cprofile_run", marker)), path)
    assert fires_under_pickle(path, marker, "torch")


def test_payload_fires_in_an_npz_under_numpy_allow_pickle(tmp_path):
    marker = tmp_path / "RAN"
    obj = np.empty(1, dtype=object)
    obj[0] = make_payload("os_system", marker)
    np.savez(tmp_path / "x.npz", extra=obj)
    assert fires_under_pickle(tmp_path / "x.npz", marker, "npz")


# ---------------------------------------------------------------------------- nothing runs
@pytest.mark.parametrize("kind", PAYLOAD_KINDS)
def test_checkpoint_config_payload_runs_nothing_and_weights_still_load(tmp_path, kind):
    marker = tmp_path / "RAN"
    path = tmp_path / "decoder.pth"
    ckpt = _decoder_like_checkpoint(make_payload(kind, marker))
    torch.save(ckpt, path)
    loaded = read_checkpoint(path)
    assert not marker.exists()
    assert EXPECTED_GLOBAL[kind] in _qualnames(loaded["config"])
    for k, v in ckpt["model_dict"].items():
        assert torch.equal(loaded["model_dict"][k], v)
    assert isinstance(loaded["w_vectors"], torch.nn.Parameter)
    assert torch.equal(loaded["w_vectors"], ckpt["w_vectors"])
    assert loaded["w_ids_to_idx"] == {"017": 0, "042": 1}


@pytest.mark.parametrize("kind", PAYLOAD_KINDS)
def test_bare_payload_as_checkpoint_runs_nothing(tmp_path, kind):
    marker = tmp_path / "RAN"
    path = tmp_path / "latest.pth"
    torch.save(make_payload(kind, marker), path)
    loaded = read_checkpoint(path)
    assert not marker.exists()
    assert EXPECTED_GLOBAL[kind] in _qualnames(loaded)


@pytest.mark.parametrize("kind", PAYLOAD_KINDS)
def test_flame_pickle_payload_runs_nothing(tmp_path, kind):
    marker = tmp_path / "RAN"
    path = tmp_path / "generic_model.pkl"
    path.write_bytes(pickle.dumps({"f": np.zeros((2, 3), np.uint32), "shapedirs": make_payload(kind, marker)},
                                  protocol=2))
    loaded = U.load_pickle_file(path)
    assert not marker.exists()
    assert EXPECTED_GLOBAL[kind] in _qualnames(loaded)
    assert np.array_equal(loaded["f"], np.zeros((2, 3), np.uint32))


@pytest.mark.parametrize("kind", PAYLOAD_KINDS)
def test_npz_object_member_payload_runs_nothing(tmp_path, kind):
    marker = tmp_path / "RAN"
    path = tmp_path / "flame.npz"
    obj = np.empty(1, dtype=object)
    obj[0] = make_payload(kind, marker)
    np.savez(path, v_template=np.arange(6.0).reshape(2, 3), extra=obj)
    loaded = U.load_npz(path)
    assert not marker.exists()
    assert np.array_equal(loaded["v_template"], np.arange(6.0).reshape(2, 3))
    assert EXPECTED_GLOBAL[kind] in _qualnames(list(loaded["extra"]))


def test_legacy_format_checkpoint_payload_runs_nothing(tmp_path):
    marker = tmp_path / "RAN"
    path = tmp_path / "old.pth"
    torch.save(_decoder_like_checkpoint(make_payload("os_system", marker)), path,
               _use_new_zipfile_serialization=False)
    loaded = read_checkpoint(path)
    assert not marker.exists()
    assert "posix.system" in _qualnames(loaded["config"]) or "nt.system" in _qualnames(loaded["config"])
    assert loaded["epoch"] == 3 and loaded["model_dict"]["splats.means"].shape == (5, 3)


# ---------------------------------------------------------------------------- protocol-2 name mapping
@pytest.mark.parametrize("kind,written", [("builtin_exec", "__builtin__ exec"),
                                          ("commands_getoutput", "commands getoutput")])
def test_python2_names_are_checked_after_mapping(tmp_path, kind, written):
    marker = tmp_path / "RAN"
    data = pickle.dumps(make_payload(kind, marker), protocol=2)
    assert written in raw_globals(data)  # the file really names the Python 2 spelling
    loaded = U.loads(data)
    assert isinstance(loaded, U.StandInObject)
    assert loaded.qualname == EXPECTED_GLOBAL[kind]
    assert loaded.global_.original == tuple(written.split(" "))
    assert not marker.exists()


def test_python2_allowed_names_still_resolve():
    data = pickle.dumps({"s": {1, 2}, "b": b"\x00\xffab"}, protocol=2)
    assert "__builtin__ set" in raw_globals(data) and "_codecs encode" in raw_globals(data)
    assert U.loads(data) == {"s": {1, 2}, "b": b"\x00\xffab"}


# ---------------------------------------------------------------------------- opcodes that could reach code
def test_calling_a_stand_in_result_records_the_chain(tmp_path):
    marker = tmp_path / "RAN"
    loaded = U.loads(pickle.dumps(make_payload("chained_getattr", marker), protocol=4))
    assert not marker.exists()
    assert loaded.callee is not None and loaded.callee.qualname == "builtins.getattr"
    assert loaded.args == (f"touch {marker}",)
    assert loaded.callee.args[0].qualname == "builtins.__import__" and loaded.callee.args[1] == "system"


def test_calling_an_allowed_value_is_refused():
    # numpy.ndarray is allowed only as an argument: GLOBAL numpy.ndarray; (); REDUCE
    with pytest.raises(U.RestrictedUnpicklingError, match="calling"):
        U.loads(b"\x80\x02cnumpy\nndarray\nK\x01\x85R.")


def test_build_on_an_allowed_class_or_function_is_refused():
    # GLOBAL collections.OrderedDict; {'__init__': 1}; BUILD -> would write a class attribute
    data = b"\x80\x02ccollections\nOrderedDict\n}X\x08\x00\x00\x00__init__K\x01sb."
    with pytest.raises(U.RestrictedUnpicklingError, match="state"):
        U.loads(data)
    assert callable(collections.OrderedDict.__init__)
    fn = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nN}X\x0c\x00\x00\x00__defaults__)s\x86b."
    with pytest.raises(U.RestrictedUnpicklingError, match="state"):
        U.loads(fn)
    assert torch._utils._rebuild_tensor_v2.__defaults__ == (None,)


def test_newobj_of_an_allowed_class_and_extension_codes_are_refused():
    newobj = b"\x80\x02ccollections\nOrderedDict\n)\x81."
    with pytest.raises(U.RestrictedUnpicklingError, match="NEWOBJ"):
        U.loads(newobj)
    with pytest.raises(U.RestrictedUnpicklingError, match="extension"):
        U.loads(b"\x80\x02\x82\x01.")


def test_setitems_on_a_non_container_is_refused():
    # torch.Size(()) then SETITEM
    data = b"\x80\x02ctorch\nSize\n)\x85RK\x01K\x02s."
    with pytest.raises(U.RestrictedUnpicklingError, match="SETITEM"):
        U.loads(data)


def test_codecs_encode_only_text_codecs():
    ok = b"\x80\x02c_codecs\nencode\nX\x02\x00\x00\x00abX\x06\x00\x00\x00latin1\x86R."
    assert U.loads(ok) == b"ab"
    bad = ok.replace(b"X\x06\x00\x00\x00latin1", b"X\x04\x00\x00\x00zlib")
    with pytest.raises(U.RestrictedUnpicklingError, match="_codecs"):
        U.loads(bad)


def test_stand_ins_are_inert():
    g = U.StandInGlobal("os", "system")
    obj = g("touch /nonexistent/should-not-run")
    assert isinstance(obj, U.StandInObject) and obj.args == ("touch /nonexistent/should-not-run",)
    with pytest.raises(TypeError):
        pickle.dumps(obj)
    with pytest.raises(TypeError):
        obj()  # a stand-in object is not callable
    with pytest.raises(AttributeError):
        obj.dtype  # noqa: B018 - no attribute invention


def test_torchscript_archive_is_refused(tmp_path):
    path = tmp_path / "scripted.pth"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    with pytest.raises(U.RestrictedUnpicklingError, match="TorchScript"):
        U.torch_load(path)
    with pytest.raises(CheckpointError, match="TorchScript") as err:
        read_checkpoint(path)
    assert str(path) in str(err.value)


# ---------------------------------------------------------------------------- real files still load
def test_released_checkpoint_with_main_config_loads_as_data(tmp_path, monkeypatch):
    """``__main__.TrainingConfig`` (as pickled by the released train_decoder.py) loads as a stand-in."""

    @dataclasses.dataclass
    class TrainingConfig:
        data_root: str = "/data/nersemble"
        mlp_lr: float = 1e-4
        w_lr: float = 1e-3
        lambda_lpips: float = 0.1
        subjects: list = dataclasses.field(default_factory=lambda: [17, 42])

    TrainingConfig.__module__ = "__main__"
    TrainingConfig.__qualname__ = "TrainingConfig"
    monkeypatch.setattr(sys.modules["__main__"], "TrainingConfig", TrainingConfig, raising=False)
    path = tmp_path / "decoder_neutral_flame.pth"
    ckpt = _decoder_like_checkpoint(TrainingConfig(mlp_lr=2e-4))
    torch.save(ckpt, path)
    monkeypatch.delattr(sys.modules["__main__"], "TrainingConfig")
    assert "__main__ TrainingConfig" in _zip_pickle_globals(path)
    loaded = read_checkpoint(path)
    cfg = loaded["config"]
    assert isinstance(cfg, U.StandInObject) and cfg.qualname == "__main__.TrainingConfig"
    assert cfg.to_dict() == {"data_root": "/data/nersemble", "mlp_lr": 2e-4, "w_lr": 1e-3,
                             "lambda_lpips": 0.1, "subjects": [17, 42]}
    assert torch.equal(loaded["w_vectors"], ckpt["w_vectors"]) and loaded["w_vectors"].requires_grad
    # torch's weights_only loader cannot read this file at all (why we do not build on it)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)


def _zip_pickle_globals(path: Path) -> set:
    with zipfile.ZipFile(path) as zf:
        name = next(n for n in zf.namelist() if n.endswith("data.pkl"))
        return raw_globals(zf.read(name))


def test_state_dict_metadata_optimizer_and_dtypes_roundtrip(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    obj = {"model": model.state_dict(), "opt": opt.state_dict(), "half": torch.ones(2, dtype=torch.float16),
           "bf16": torch.ones(3, dtype=torch.bfloat16), "long": torch.arange(4), "bool": torch.tensor([True]),
           "view": torch.arange(10.0)[2:6], "size": torch.Size([2, 3]), "dev": torch.device("cpu")}
    path = tmp_path / "state.pth"
    torch.save(obj, path)
    loaded = U.torch_load(path)
    assert loaded["model"]._metadata == obj["model"]._metadata
    model2 = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    model2.load_state_dict(loaded["model"])
    opt2 = torch.optim.Adam(model2.parameters(), lr=1e-3)
    opt2.load_state_dict(loaded["opt"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    for k in ("half", "bf16", "long", "bool", "view"):
        assert loaded[k].dtype == obj[k].dtype and torch.equal(loaded[k], obj[k])
    assert loaded["size"] == torch.Size([2, 3]) and loaded["dev"] == torch.device("cpu")


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_numpy_arrays_dtypes_and_scalars(protocol):
    obj = {"f": np.arange(12.0).reshape(3, 4), "fortran": np.asfortranarray(np.arange(6).reshape(2, 3)),
           "u32": np.array([4294967295], np.uint32), "rec": np.zeros(2, dtype=[("a", "<f4"), ("b", "<i8")]),
           "obj": np.array(["a", 1], dtype=object), "scalar": np.float32(2.5), "dt": np.dtype("<i2")}
    loaded = U.loads(pickle.dumps(obj, protocol=protocol))
    for k in ("f", "fortran", "u32", "rec", "obj"):
        assert loaded[k].dtype == obj[k].dtype and np.array_equal(loaded[k], obj[k])
    assert loaded["fortran"].flags.f_contiguous
    assert loaded["scalar"] == np.float32(2.5) and loaded["scalar"].dtype == np.float32
    assert loaded["dt"] == np.dtype("<i2")


def test_numpy_1x_module_paths_load():
    """Pickles written by numpy 1.x name ``numpy.core.multiarray``; numpy 2.x ``numpy._core``."""
    data = pickle.dumps({"a": np.arange(4.0), "s": np.int64(7)}, protocol=2)
    core = b"numpy._core" if b"numpy._core" in data else b"numpy.core"
    other = b"numpy.core" if core == b"numpy._core" else b"numpy._core"
    for blob in (data, data.replace(core, other)):
        loaded = U.loads(blob)
        assert np.array_equal(loaded["a"], np.arange(4.0)) and loaded["s"] == 7


def test_chumpy_flame_pickle_loads_as_readable_stand_ins(tmp_path):
    from flame_fixtures import make_tiny_flame, save_tiny_flame_pickle

    model = make_tiny_flame()
    path = save_tiny_flame_pickle(tmp_path / "generic_model.pkl", model)
    assert "chumpy.ch Ch" in raw_globals(path.read_bytes())
    loaded = U.load_pickle_file(path)
    ch = loaded["v_template"]
    assert isinstance(ch, U.StandInObject) and ch.qualname == "chumpy.ch.Ch"
    assert np.allclose(ch.state_dict()["x"], model.v_template.numpy())
    sparse = loaded["J_regressor"]
    assert isinstance(sparse, U.StandInObject) and sparse.module.startswith("scipy.sparse")
    assert {"data", "indices", "indptr"} <= set(sparse.state_dict())
    assert np.array_equal(loaded["kintree_table"][1], np.arange(5))


def test_npz_plain_and_object_members(tmp_path):
    path = tmp_path / "x.npz"
    obj = np.empty(2, dtype=object)
    obj[0], obj[1] = {"k": 1}, [1.5, "s"]
    np.savez(path, a=np.arange(6, dtype=np.int16).reshape(2, 3), f=np.asfortranarray(np.ones((2, 2))), o=obj)
    loaded = U.load_npz(path)
    assert loaded["a"].dtype == np.int16 and np.array_equal(loaded["a"], np.arange(6).reshape(2, 3))
    assert np.array_equal(loaded["f"], np.ones((2, 2)))
    assert loaded["o"][0] == {"k": 1} and loaded["o"][1] == [1.5, "s"]
