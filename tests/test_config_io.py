import dataclasses
from typing import List

import pytest
import torch
import yaml

from fastavatar.config import config_from_dict, option, parse_config, save_config
from fastavatar.utils.io import atomic_path, atomic_torch_save, atomic_write_json


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


def test_bundled_yaml_configs_load_into_their_dataclasses(repo_root):
    from fastavatar.config import load_yaml
    from fastavatar.demo import DemoConfig
    from fastavatar.guided import GuidedConfig
    from fastavatar.train.decoder import DecoderTrainConfig

    for name, cls in {"decoder.yaml": DecoderTrainConfig, "decoder_cpu_small.yaml": DecoderTrainConfig,
                      "demo.yaml": DemoConfig, "guided.yaml": GuidedConfig}.items():
        cfg = config_from_dict(cls, load_yaml(repo_root / "configs" / name), source=name)
        assert isinstance(cfg, cls)
    assert config_from_dict(DecoderTrainConfig, load_yaml(repo_root / "configs" / "decoder.yaml")).mlp_lr == 1e-4
