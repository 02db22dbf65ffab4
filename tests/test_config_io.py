import dataclasses
from typing import List, Literal

import pytest
import torch
import yaml

from fastavatar.config import config_from_dict, option, parse_config, save_config
from fastavatar.io.atomic import atomic_path, atomic_torch_save, atomic_write_json


@dataclasses.dataclass
class Cfg:
    lr: float = option(1e-4, "learning rate")
    name: str = option("run", "run name")
    subjects: List[str] = option(["306"], "ids")
    flag: bool = option(True, "a switch")


def test_precedence_defaults_yaml_cli(tmp_path):
    assert parse_config(Cfg, []) == Cfg()
    (tmp_path / "c.yaml").write_text("lr: 0.5\nname: from_yaml\n")
    cfg = parse_config(Cfg, ["--config", str(tmp_path / "c.yaml"), "--name", "cli", "--subjects", "1", "2", "--no-flag"])
    assert cfg.lr == 0.5 and cfg.name == "cli" and cfg.subjects == ["1", "2"] and cfg.flag is False


def test_unknown_yaml_key_is_a_clear_error(tmp_path):
    (tmp_path / "bad.yaml").write_text("lrr: 1\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: unknown config keys \['lrr'\]"):
        parse_config(Cfg, ["--config", str(tmp_path / "bad.yaml")])


def test_resolved_config_saved_as_plain_yaml(tmp_path):
    cfg = Cfg(lr=0.25, subjects=["7"])
    path = save_config(cfg, tmp_path)
    data = yaml.safe_load(path.read_text())
    assert data == {"lr": 0.25, "name": "run", "subjects": ["7"], "flag": True}
    assert config_from_dict(Cfg, data) == cfg


def test_mutable_defaults_are_not_shared():
    a, b = Cfg(), Cfg()
    a.subjects.append("x")
    assert b.subjects == ["306"]


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "ckpt.pth"
    atomic_torch_save({"a": torch.ones(2)}, target)
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("crash mid-write")
    assert torch.equal(torch.load(target)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]  # no temp file left behind
    atomic_write_json(tmp_path / "x.json", {"v": 1})
    assert (tmp_path / "x.json").read_text().strip().startswith("{")


def test_bundled_yaml_configs_list_only_what_they_change(repo_root):
    """Every configs/*.yaml loads into its dataclass and each key it sets differs from the default."""
    from fastavatar.config import _flatten, _nest, config_to_dict, load_yaml
    from fastavatar.train.decoder import DecoderTrainConfig

    from fastavatar.eval.protocol import EvaluateConfig
    from fastavatar.inference.photo import PhotoConfig
    from fastavatar.train.blendshapes import BlendshapeTrainConfig

    owners = {"blendshapes_cpu_small.yaml": BlendshapeTrainConfig, "decoder_cpu_small.yaml": DecoderTrainConfig,
              "photo_cpu.yaml": PhotoConfig, "protocol_loo.yaml": EvaluateConfig}
    files = sorted(p.name for p in (repo_root / "configs").glob("*.yaml"))
    assert files == sorted(owners), f"register new config files here: {files}"
    for name, cls in owners.items():
        values = load_yaml(repo_root / "configs" / name)
        config_from_dict(cls, values, source=name)  # loads: known keys, right types
        given = _flatten(_nest(cls, values, name))  # nested mappings and flag names -> dotted paths
        defaults = _flatten(config_to_dict(cls()))
        for path, value in given.items():
            assert defaults[path] != value, f"{name}: {path}: {value!r} is the default; list only what changes"
    cfg = config_from_dict(DecoderTrainConfig, load_yaml(repo_root / "configs" / "decoder_cpu_small.yaml"))
    assert cfg.hidden_dim == 128 and cfg.mlp_lr == 1e-3 and cfg.output_dir == "runs/decoder_cpu"


@dataclasses.dataclass
class Inner:
    w_lr: float = option(1e-4, "inner learning rate")
    mode: Literal["a", "b"] = option("a", "a choice")


@dataclasses.dataclass
class Outer:
    fit: Inner = option(Inner(), "a nested config")
    name: str = option("run", "run name")


def test_nested_config_flags_yaml_and_saved_form(tmp_path):
    cfg = parse_config(Outer, ["--w_lr", "0.5", "--mode", "b"])
    assert cfg.fit == Inner(w_lr=0.5, mode="b") and cfg.name == "run"
    (tmp_path / "nested.yaml").write_text("fit:\n  w_lr: 2.0\nname: y\n")
    (tmp_path / "flat.yaml").write_text("w_lr: 3.0\n")
    assert parse_config(Outer, ["--config", str(tmp_path / "nested.yaml")]).fit.w_lr == 2.0
    assert parse_config(Outer, ["--config", str(tmp_path / "flat.yaml"), "--w_lr", "4"]).fit.w_lr == 4.0
    saved = yaml.safe_load(save_config(Outer(fit=Inner(mode="b")), tmp_path).read_text())
    assert saved == {"fit": {"w_lr": 1e-4, "mode": "b"}, "name": "run"}
    assert config_from_dict(Outer, saved) == Outer(fit=Inner(mode="b"))
    with pytest.raises(ValueError, match=r"mode='c' must be one of"):
        config_from_dict(Outer, {"fit": {"mode": "c"}})


def test_abbreviated_flags_are_refused(capsys):
    with pytest.raises(SystemExit):
        parse_config(Cfg, ["--na", "x"])  # would be --name with argparse's default prefix matching
    assert "unrecognized arguments: --na" in capsys.readouterr().err
