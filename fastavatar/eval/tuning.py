"""Tuning the single-view refinement without scoring on what was tuned: a grid over fit and
per-Gaussian settings, scored per held-out subject, and a nested leave-one-out choice.

Every subject is reconstructed from its input view with the decoder trained without it (as the
protocol, :mod:`fastavatar.eval.protocol`), once per grid point, and scored on its unseen views.
The choice for subject *s* is the grid point with the best mean unseen-view PSNR over the *other*
subjects; the score reported for *s* is its own at that point, so no subject's views pick its own
settings. ``selection.md`` lists both, and the grid point that is best over all subjects (the
candidate for the defaults) with how often the nested choice agreed with it.

Writes ``rows.jsonl`` (one line per subject and grid point, appended as they finish, so a rerun
skips what is done), ``selection.json``, ``selection.md`` and the resolved config.
Also the ``scripts/tune_refinement.py`` command (:func:`tune_main`).
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence


from fastavatar.config import option, parse_config, save_config
from fastavatar.data import SubjectParser, discover_subjects
from fastavatar.eval.evaluate import evaluate_reconstruction
from fastavatar.inference.per_gaussian import PerGaussianConfig, refine_gaussians, template_graph
from fastavatar.inference.refine import FitConfig, fit_to_views, mean_w
from fastavatar.io.atomic import atomic_write_json, atomic_write_text
from fastavatar.runtime import resolve_device, seed_everything

DEFAULT_GRID = ('{"mlp_steps": [0, 30], "pg_steps": [100, 200, 300], "pg_lr_sh0": [0.003, 0.01]}')


@dataclass
class TuningConfig:
    """``scripts/tune_refinement.py``: grid, subjects and the fixed part of the refinement."""

    data_root: str = option("data/nersemble", "folder of subject folders")
    subjects: List[str] = option(["128", "306", "369"], "held-out subjects (at least two for the nested choice)")
    loo_decoders: str = option("outputs/loo/{subject}/decoder_run/checkpoints/latest.pth",
                               "decoder trained without {subject} (a path pattern; scripts/train_loo_decoders.py)")
    input_view: str = option("08", "the input view (a camera suffix, image name or index)")
    image_scale: float = option(0.25, "image scale of fitting and scoring")
    grid: str = option(DEFAULT_GRID, "JSON object: FitConfig or PerGaussianConfig field -> list of values")
    fit: FitConfig = option(FitConfig(w_steps=30, mlp_steps=30, w_lr=1e-2, mlp_lr=1e-3),
                            "fit settings the grid does not set")
    gaussians: PerGaussianConfig = option(PerGaussianConfig(), "per-Gaussian settings the grid does not set")
    output_dir: str = option("results/tuning", "output folder")
    device: str = option("auto", "auto, cpu or cuda")
    seed: int = option(42, "random seed (the same for every grid point)")


def parse_grid(text: str) -> Dict[str, list]:
    """The ``--grid`` JSON -> {field: [values]}; one-line errors for bad JSON or unknown fields."""
    try:
        grid = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--grid is not valid JSON ({exc})") from None
    if not isinstance(grid, dict) or not grid:
        raise ValueError("--grid must be a non-empty JSON object of field -> list of values")
    known = {f.name for f in fields(FitConfig)} | {f.name for f in fields(PerGaussianConfig)}
    for key, values in grid.items():
        if key not in known:
            raise ValueError(f"--grid: {key!r} is not a FitConfig or PerGaussianConfig field")
        if not isinstance(values, list) or not values:
            raise ValueError(f"--grid: {key!r} needs a non-empty list of values")
    return grid


def grid_points(grid: Dict[str, list]) -> List[Dict[str, object]]:
    """All combinations, in a fixed order."""
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def point_key(point: Dict[str, object]) -> str:
    return json.dumps(point, sort_keys=True)


def nested_choice(rows: List[dict], subjects: Sequence[str]) -> dict:
    """Leave-one-subject-out choice of grid point (see module docstring).

    ``rows``: ``{"subject", "point", "unseen_psnr"}``. Only grid points scored on every subject
    count. Returns ``{"per_subject": [{subject, chosen, chosen_on, psnr}], "best_overall",
    "best_overall_mean", "agreement"}``."""
    scores: Dict[str, Dict[str, float]] = {}
    for r in rows:
        scores.setdefault(point_key(r["point"]), {})[r["subject"]] = float(r["unseen_psnr"])
    complete = {k: v for k, v in scores.items() if all(s in v for s in subjects)}
    if not complete or len(subjects) < 2:
        raise ValueError("nested choice needs at least two subjects and one grid point scored on all of them")

    def best(on: Sequence[str]) -> str:
        return max(sorted(complete), key=lambda k: sum(complete[k][s] for s in on) / len(on))

    per_subject = []
    for s in subjects:
        others = [o for o in subjects if o != s]
        k = best(others)
        per_subject.append({"subject": s, "chosen": json.loads(k), "chosen_on": others, "psnr": complete[k][s]})
    overall = best(subjects)
    return {"per_subject": per_subject, "best_overall": json.loads(overall),
            "best_overall_mean": sum(complete[overall].values()) / len(subjects),
            "agreement": sum(point_key(p["chosen"]) == overall for p in per_subject)}


def _read_rows(path: Path) -> List[dict]:
    if not path.is_file():
        return []
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise ValueError(f"{path}: line {n} is not JSON (delete the file to start over)") from None
    return rows


def run_tuning(cfg: TuningConfig) -> dict:
    """Run the grid (skipping rows already in ``rows.jsonl``), then the nested choice."""
    from fastavatar.io.checkpoints import load_decoder

    if len(set(cfg.subjects)) < 2:
        raise ValueError(f"--subjects {cfg.subjects}: the nested choice needs at least two held-out subjects")
    grid = parse_grid(cfg.grid)
    points = grid_points(grid)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    rows_path = out / "rows.jsonl"
    rows = _read_rows(rows_path)
    done = {(r["subject"], point_key(r["point"])) for r in rows}
    device = resolve_device(cfg.device)
    fit_keys = {f.name for f in fields(FitConfig)}
    for sid in cfg.subjects:
        todo = [p for p in points if (sid, point_key(p)) not in done]
        if not todo:
            continue
        parser = SubjectParser(discover_subjects(cfg.data_root, [sid])[0], image_scale=cfg.image_scale)
        decoder, w_vectors, _ = load_decoder(cfg.loo_decoders.format(subject=sid), device=device)
        view = parser.view_index(int(cfg.input_view) if cfg.input_view.isdigit() else cfg.input_view)
        image = parser.load_image(view)[None].to(device)
        c2w, K = parser.c2w[view][None].to(device), parser.Ks[view][None].to(device)
        points3d = parser.points.to(device)
        graph = template_graph(decoder.template_means.detach().cpu(), cfg.gaussians.pg_num_neighbours)
        fits = {}  # grid points that share the fit settings share the fit
        for i, point in enumerate(todo, 1):
            fit_cfg = replace(cfg.fit, **{k: v for k, v in point.items() if k in fit_keys})
            pg_cfg = replace(cfg.gaussians, **{k: v for k, v in point.items() if k not in fit_keys})
            t0 = time.perf_counter()
            fk = point_key({k: v for k, v in point.items() if k in fit_keys})
            if fk not in fits:
                seed_everything(cfg.seed)
                fits[fk] = fit_to_views(decoder, mean_w(w_vectors).to(device), points3d, image, c2w, K, parser.width,
                                        parser.height, fit_cfg, None, show_progress=False).splats
            seed_everything(cfg.seed)
            stage = refine_gaussians(fits[fk], image, c2w, K, parser.width, parser.height, pg_cfg, graph=graph,
                                     show_progress=False, keep_view_dependent=fit_cfg.keep_view_dependent,
                                     sh_degree=fit_cfg.sh_degree, render_backend=fit_cfg.render_backend)
            scored = evaluate_reconstruction(stage.splats, parser, None, [view], None, fit_cfg.render_backend, device,
                                             save_images=False)
            row = {"subject": sid, "point": point, "unseen_psnr": scored["unseen"]["psnr"],
                   "unseen_ssim": scored["unseen"]["ssim"], "input_psnr": scored["seen"]["psnr"],
                   "seconds": time.perf_counter() - t0}
            with rows_path.open("a") as f:  # one complete line per finished point: a killed run resumes
                f.write(json.dumps(row) + "\n")
            rows.append(row)
            print(f"[tune] subject {sid} {i}/{len(todo)} {point}: unseen PSNR {row['unseen_psnr']:.2f} dB", flush=True)
    wanted = {point_key(p) for p in points}
    rows = [r for r in rows if point_key(r["point"]) in wanted and r["subject"] in cfg.subjects]
    selection = {**nested_choice(rows, cfg.subjects), "grid": grid, "subjects": cfg.subjects,
                 "input_view": cfg.input_view, "image_scale": cfg.image_scale, "device": str(device)}
    atomic_write_json(out / "selection.json", selection)
    atomic_write_text(out / "selection.md", selection_markdown(selection))
    return selection


def selection_markdown(sel: dict) -> str:
    lines = [f"Nested leave-one-out choice over {sel['grid']} (input view {sel['input_view']}, "
             f"image scale {sel['image_scale']}; unseen-view PSNR dB)", "",
             "| held-out subject | chosen on | chosen setting | its PSNR |", "|---|---|---|---|"]
    for p in sel["per_subject"]:
        lines.append(f"| {p['subject']} | {' + '.join(p['chosen_on'])} | `{json.dumps(p['chosen'])}` | {p['psnr']:.2f} |")
    lines += ["", f"Best over all subjects: `{json.dumps(sel['best_overall'])}` (mean {sel['best_overall_mean']:.2f} dB); "
                  f"the nested choice agreed with it for {sel['agreement']} of {len(sel['per_subject'])} subjects.", ""]
    return "\n".join(lines)


def tune_main(argv: Optional[Sequence[str]] = None, description: str = "") -> int:
    cfg = parse_config(TuningConfig, argv, description=description)
    try:
        run_tuning(cfg)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print((Path(cfg.output_dir) / "selection.md").read_text())
    return 0
