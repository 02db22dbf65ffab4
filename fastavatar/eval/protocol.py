"""The evaluation protocol: fit each subject from its input view(s) with guided inference and
score the unseen views, next to the baselines (the decoder template alone at the subject's
points, the feed-forward result before refinement, and the W + hypernetwork fit before the
per-Gaussian stage). Writes ``table.md`` and ``table.json``.

Leave one subject out: give ``--decoder_checkpoint`` with a ``{subject}`` placeholder (e.g.
``outputs/loo/{subject}/decoder_run/checkpoints/latest.pth`` from ``scripts/train_loo_decoders.py``)
and each subject is scored with the decoder trained without it.
Also the ``scripts/evaluate.py`` command (:func:`evaluate_main`).

The top of :mod:`fastavatar.eval`: it runs :mod:`fastavatar.inference.guided`, which itself scores
with :mod:`fastavatar.eval.evaluate`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import List, Optional, Sequence

from fastavatar.config import option, parse_config
from fastavatar.data import SubjectParser, discover_subjects
from fastavatar.eval.evaluate import evaluate_reconstruction
from fastavatar.eval.metrics import mean_metrics
from fastavatar.inference.guided import GuidedConfig, run_guided
from fastavatar.io.atomic import atomic_write_json, atomic_write_text
from fastavatar.io.checkpoints import load_decoder
from fastavatar.io.ply import load_ply
from fastavatar.losses import load_lpips
from fastavatar.runtime import resolve_device


def run_protocol(cfg: GuidedConfig, subjects: List[str], show_progress: bool = True) -> dict:
    """The evaluation protocol: for each subject, fit from ``cfg.input_views`` and score the unseen
    views, next to the baselines: the decoder template alone (at the subject's points), the
    feed-forward result before refinement, and the W + hypernetwork fit before the per-Gaussian stage.
    A ``{subject}`` placeholder in ``cfg.decoder_checkpoint`` loads one decoder per subject (leave one out).
    Writes ``table.md`` and ``table.json`` in output_dir."""
    device = resolve_device(cfg.device)
    per_subject = "{subject}" in cfg.decoder_checkpoint
    if not per_subject:
        decoder, w_vectors, _ = load_decoder(cfg.decoder_checkpoint, device=device)
    lpips_model = load_lpips(cfg.lpips_net, device)
    root = Path(cfg.output_dir)
    rows = []
    for sid in subjects:
        checkpoint = cfg.decoder_checkpoint.format(subject=sid) if per_subject else cfg.decoder_checkpoint
        if per_subject:
            decoder, w_vectors, _ = load_decoder(checkpoint, device=device)
        sub_cfg = replace(cfg, sample_id=sid, joint=True, decoder_checkpoint=checkpoint,
                          output_dir=str(root / f"subject_{sid}"))
        summary = run_guided(sub_cfg, decoder=decoder, w_vectors=w_vectors, show_progress=show_progress,
                             score_template=True)
        run = summary["runs"][0]
        seconds = run["seconds"]
        rows.append({"subject": sid, "decoder_checkpoint": checkpoint, "template": summary["template"],
                     "feed_forward": run["initial"]["unseen"], "fit": run["fit"]["unseen"],
                     "full": run["final"]["unseen"], "w_init": run["w_init"],
                     "fit_seconds": seconds.get("w_phase", 0.0) + seconds.get("mlp_phase", 0.0),
                     "per_gaussian_seconds": seconds.get("per_gaussian_phase", 0.0),
                     "refine_seconds": seconds["refine_total"]})
    overall = {m: mean_metrics([r[m] for r in rows]) for m in ("template", "feed_forward", "fit", "full")}
    table = {"subjects": rows, "overall": overall, "input_views": cfg.input_views, "image_scale": cfg.image_scale,
             "decoder_checkpoint": cfg.decoder_checkpoint, "per_gaussian": cfg.gaussians.per_gaussian,
             "lpips": lpips_model is not None}
    atomic_write_json(root / "table.json", table)
    atomic_write_text(root / "table.md", protocol_markdown(table))
    return table


def protocol_markdown(table: dict) -> str:
    def cell(m):
        lp = "–" if m.get("lpips") is None else f"{m['lpips']:.3f}"
        return f"{m['psnr']:.2f} / {m['ssim']:.3f} / {lp}"

    last = "full (+ per-Gaussian stage)" if table.get("per_gaussian", True) else "full (per-Gaussian stage off)"
    lines = [f"| subject | template | feed-forward | W + MLP fit | {last} | seconds (fit + per-Gaussian) |",
             "|---|---|---|---|---|---|"]
    for r in table["subjects"]:
        lines.append(f"| {r['subject']} | {cell(r['template'])} | {cell(r['feed_forward'])} | {cell(r['fit'])} | "
                     f"{cell(r['full'])} | {r['fit_seconds']:.0f} + {r['per_gaussian_seconds']:.0f} |")
    o = table["overall"]
    lines.append(f"| **mean** | {cell(o['template'])} | {cell(o['feed_forward'])} | {cell(o['fit'])} | "
                 f"{cell(o['full'])} | |")
    return ("PSNR (dB) / SSIM / LPIPS on the views not used as input "
            f"(input views {table['input_views']}, image scale {table['image_scale']})\n\n" + "\n".join(lines) + "\n")


@dataclass
class EvaluateConfig:
    """``scripts/evaluate.py``: score one reconstruction (``--splats``) or run the protocol (``--protocol``)."""

    guided: GuidedConfig = option(GuidedConfig(), "subject, data, refinement and output options (guided inference)")
    splats: Optional[Path] = option(None, "a splats.ply to score (single-reconstruction mode)")
    seen_views: List[int] = option([], "views the reconstruction saw (single-reconstruction mode)")
    protocol: bool = option(False, "run the fit-and-score protocol over --subjects")
    subjects: List[str] = option(["128", "306"], "subjects for --protocol")


def evaluate_main(argv: Optional[Sequence[str]] = None, description: str = "") -> int:
    """CLI of ``scripts/evaluate.py``; returns the exit code (one-line errors, no traceback)."""
    cfg = parse_config(EvaluateConfig, argv, description=description)
    g = cfg.guided
    try:
        if cfg.protocol:
            table = run_protocol(g, cfg.subjects)
            print((Path(g.output_dir) / "table.md").read_text())
            return 0 if table["subjects"] else 1
        if cfg.splats is None:
            raise ValueError("give --splats PLY (one reconstruction) or --protocol")
        device = resolve_device(g.device)
        subject = SubjectParser(discover_subjects(g.data_root, [g.sample_id])[0], image_scale=g.image_scale)
        results = evaluate_reconstruction(load_ply(cfg.splats, device), subject, Path(g.output_dir), cfg.seen_views,
                                          load_lpips(g.lpips_net, device), g.fit.render_backend, device)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for key in ("unseen", "seen", "all"):
        if results[key]:
            m = results[key]
            lp = "n/a" if m["lpips"] is None else f"{m['lpips']:.4f}"
            print(f"[evaluate] {key:6s} PSNR {m['psnr']:.2f} dB  SSIM {m['ssim']:.4f}  LPIPS {lp}")
    print(f"[evaluate] wrote {g.output_dir}/results.json and per_view.json")
    return 0
