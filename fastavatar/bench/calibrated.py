"""The calibrated single-view fit targets (``scripts/benchmark_calibrated_fit.py``), as JSON.

Reads two leave-one-out protocol tables (``scripts/evaluate.py --protocol`` with a ``{subject}``
decoder pattern): the candidate (e.g. W + MLP + per-Gaussian stage) and the baseline ("today's fit").
Targets (issue 11, bundled subjects, 1/4 scale, camera 08 as input): unseen-view PSNR at least
``min_psnr`` on every held-out subject, and at least ``min_gain`` dB above the baseline's fit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from fastavatar.config import option, parse_config


@dataclass
class CalibratedTargetsConfig:
    table: str = option("results/protocol_loo_pg/table.json", "candidate protocol table.json")
    baseline_table: str = option("results/protocol_loo_today/table.json",
                                 "baseline protocol table.json (today's fit; its 'full' column is compared)")
    min_psnr: float = option(20.0, "target: unseen-view PSNR (dB) on every held-out subject")
    min_gain: float = option(2.0, "target: dB above the baseline's fit on every held-out subject")


def _load(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no protocol table (run scripts/evaluate.py --protocol first)")
    return json.loads(p.read_text())


def calibrated_targets(cfg: CalibratedTargetsConfig) -> dict:
    """Per subject: candidate and baseline PSNR, gain, and whether each target is met."""
    cand, base = _load(cfg.table), _load(cfg.baseline_table)
    base_rows = {r["subject"]: r for r in base["subjects"]}
    rows = []
    for r in cand["subjects"]:
        b = base_rows.get(r["subject"])
        if b is None:
            raise ValueError(f"{cfg.baseline_table}: no row for subject {r['subject']}")
        psnr, baseline = r["full"]["psnr"], b["full"]["psnr"]
        rows.append({"subject": r["subject"], "psnr": round(psnr, 3), "baseline_psnr": round(baseline, 3),
                     "gain_db": round(psnr - baseline, 3), "meets_min_psnr": psnr >= cfg.min_psnr,
                     "meets_min_gain": psnr - baseline >= cfg.min_gain,
                     "refine_seconds": round(r.get("refine_seconds", 0.0), 1)})
    return {"targets": {"min_psnr": cfg.min_psnr, "min_gain_db": cfg.min_gain}, "subjects": rows,
            "all_min_psnr": all(r["meets_min_psnr"] for r in rows), "all_min_gain": all(r["meets_min_gain"] for r in rows),
            "table": cfg.table, "baseline_table": cfg.baseline_table}


def calibrated_targets_main(argv: Optional[Sequence[str]] = None, description: str = "") -> int:
    cfg = parse_config(CalibratedTargetsConfig, argv, description=description)
    print(json.dumps(calibrated_targets(cfg), indent=2))
    return 0
