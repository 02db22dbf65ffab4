"""Nested config defaults under partial overrides (fastavatar.config)."""

from fastavatar.config import parse_config


def test_one_nested_flag_keeps_the_field_default_siblings(tmp_path):
    """A parent whose nested default is not the nested class's defaults (TuningConfig.fit is
    FitConfig(w_steps=30, w_lr=1e-2, ...)): overriding one nested field, on the command line or in YAML,
    keeps the other values of that default instead of resetting them to FitConfig's."""
    from fastavatar.eval.tuning import TuningConfig
    from fastavatar.inference.refine import FitConfig

    default = TuningConfig().fit
    assert (default.w_steps, default.w_lr) != (FitConfig().w_steps, FitConfig().w_lr)  # the case under test
    cfg = parse_config(TuningConfig, ["--mlp_steps", "0"])
    assert cfg.fit.mlp_steps == 0
    assert (cfg.fit.w_steps, cfg.fit.w_lr, cfg.fit.mlp_lr) == (default.w_steps, default.w_lr, default.mlp_lr)
    path = tmp_path / "tune.yaml"
    path.write_text("fit:\n  w_steps: 7\n")
    cfg = parse_config(TuningConfig, ["--config", str(path)])
    assert (cfg.fit.w_steps, cfg.fit.w_lr, cfg.fit.mlp_steps) == (7, default.w_lr, default.mlp_steps)
