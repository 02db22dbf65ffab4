"""The calibrated-fit target check (fastavatar.bench.calibrated) on hand-written protocol tables."""

import json

import pytest

from fastavatar.bench.calibrated import CalibratedTargetsConfig, calibrated_targets


def _table(path, psnrs):
    rows = [{"subject": s, "full": {"psnr": p, "ssim": 0.9, "lpips": None}, "refine_seconds": 10.0}
            for s, p in psnrs.items()]
    path.write_text(json.dumps({"subjects": rows}))
    return str(path)


def test_targets_per_subject(tmp_path):
    cand = _table(tmp_path / "c.json", {"128": 21.5, "306": 20.2})
    base = _table(tmp_path / "b.json", {"128": 19.0, "306": 19.0})
    out = calibrated_targets(CalibratedTargetsConfig(table=cand, baseline_table=base))
    by = {r["subject"]: r for r in out["subjects"]}
    assert by["128"]["meets_min_psnr"] and by["128"]["meets_min_gain"] and by["128"]["gain_db"] == 2.5
    assert by["306"]["meets_min_psnr"] and not by["306"]["meets_min_gain"]
    assert out["all_min_psnr"] and not out["all_min_gain"]


def test_missing_table_and_subject_are_clear_errors(tmp_path):
    cand = _table(tmp_path / "c.json", {"128": 21.0})
    with pytest.raises(FileNotFoundError, match="no protocol table"):
        calibrated_targets(CalibratedTargetsConfig(table=cand, baseline_table=str(tmp_path / "none.json")))
    base = _table(tmp_path / "b.json", {"306": 19.0})
    with pytest.raises(ValueError, match="no row for subject 128"):
        calibrated_targets(CalibratedTargetsConfig(table=cand, baseline_table=base))
