"""FLAME-guided inference ("nersemble-style", spec §6.2): reconstruct a subject from one input
view with known geometry (its FLAME-triangle centres) and calibrated cameras, refine it by
test-time optimisation, and score every other view.

Differences from the released ``inference_feedforward_full_guidance.py`` (bug fixes in
:mod:`fastavatar.fit`): ``--input_views`` picks the input view(s) (default: camera 8, the
near-frontal one, which is the paper's single-view protocol; ``all`` fits each view in turn
like the original), the render size follows the data (``--image_scale``), metrics are computed
(the original computed none), and W and the splats are saved before and after refinement.

The start W is the W encoder's prediction for the input photo when its checkpoint and the
insightface models are available, otherwise the decoder table's mean W (the run says which).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Tuple

import numpy as np
import torch

from fastavatar.config import config_to_dict, option, save_config
from fastavatar.data import SubjectParser, discover_subjects
from fastavatar.evaluate import evaluate_reconstruction
from fastavatar.fit import FitConfig, fit_to_views, mean_w
from fastavatar.losses import load_lpips
from fastavatar.ply import save_ply
from fastavatar.train.common import resolve_device, seed_everything
from fastavatar.metrics import mean_metrics
from fastavatar.utils.io import atomic_write_json, atomic_write_text


@dataclass
class GuidedConfig:
    data_root: str = option("data/nersemble", "folder of subject folders")
    sample_id: str = option("306", "subject to reconstruct")
    encoder_checkpoint: str = option("pretrained_weights/encoder_neutral_flame.pth", "W encoder checkpoint (optional)")
    decoder_checkpoint: str = option("pretrained_weights/decoder_neutral_flame.pth", "decoder checkpoint")
    insightface_root: str = option("", "insightface buffalo_l folder (for the encoder's start W)")
    max_epochs: int = option(301, "refinement steps: step 0 is the initial decode, then half W, half MLP (official)")
    mlp_lr: float = option(1e-4, "hypernetwork learning rate")
    w_lr: float = option(1e-4, "W learning rate")
    base_lr: float = option(0.0, "template learning rate (kept frozen, as the official run)")
    embedding_lr: float = option(0.0, "embedding learning rate (kept frozen, as the official run)")
    l1_weight: float = option(0.6, "L1 weight")
    ssim_weight: float = option(0.3, "1-SSIM weight")
    lpips_weight: float = option(0.1, "LPIPS weight (skipped without the LPIPS trunk)")
    scale_reg: float = option(0.0, "weight of mean |Δ log-scale|")
    pos_reg: float = option(0.0, "weight of mean |Δ position|")
    grad_clip: float = option(1.0, "gradient-norm clip (the original had none)")
    precision: str = option("auto", "decoder precision while refining: fp32, bf16 or auto (see fastavatar.fit)")
    keep_view_dependent: bool = option(True, "keep SH bands 1-3 from the start (one view cannot constrain them)")
    lpips_net: str = option("alex", "LPIPS trunk for loss and metric: alex or vgg")
    input_views: List[str] = option(["8"], "input view indices (e.g. 8 or 0 8), or 'all' to fit each view in turn")
    joint: bool = option(False, "fit several input views jointly instead of one after another")
    image_scale: float = option(1.0, "image scale (1: 550x802)")
    points_from: str = option("colmap", "geometry: 'colmap' (sparse/0 points3D) or 'flame' (needs --flame_model)")
    flame_model: str = option("", "FLAME model file for points_from=flame (licence-gated, never bundled)")
    output_dir: str = option("results/guided", "output folder")
    device: str = option("auto", "auto, cpu or cuda")
    backend: str = option("auto", "renderer backend")
    seed: int = option(42, "random seed")
    save_images: bool = option(True, "save renders of all views (initial and final) beside ground truth")


def initial_w(cfg: GuidedConfig, parser: SubjectParser, view: int, w_vectors, device) -> Tuple[torch.Tensor, str]:
    """The start W and where it came from ("encoder" or "mean_w: <reason>")."""
    encoder_path = Path(cfg.encoder_checkpoint)
    if not encoder_path.is_file():
        return mean_w(w_vectors).to(device), f"mean_w (no encoder checkpoint at {encoder_path})"
    try:
        from fastavatar.checkpoints import load_w_encoder
        from fastavatar.face.embedding import FaceEmbedder

        embedder = FaceEmbedder(cfg.insightface_root or None, device=device.type)
        embedding = embedder.embed_file(parser.image_paths[view]).embedding
        encoder = load_w_encoder(encoder_path, device)
        encoder.eval()
        with torch.no_grad():
            w = encoder(torch.from_numpy(np.asarray(embedding, dtype=np.float32))[None].to(device))
        return w, "encoder"
    except Exception as exc:  # missing face models, no face found, ...: fall back, and say why
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return mean_w(w_vectors).to(device), f"mean_w ({reason})"


def subject_points(cfg: GuidedConfig, parser: SubjectParser) -> torch.Tensor:
    """[N,3] geometry: points3D, or our FLAME forward from the frame's tracked parameters."""
    if cfg.points_from == "colmap":
        return parser.points
    if cfg.points_from != "flame":
        raise ValueError(f"points_from must be 'colmap' or 'flame', got {cfg.points_from!r}")
    from fastavatar.flame.model import load_flame_model
    from fastavatar.flame.points import points_from_flame_file

    if parser.flame_param_path is None:
        raise FileNotFoundError(f"{parser.subject_dir}: no flame_param/*.npz for points_from=flame")
    model = load_flame_model(cfg.flame_model or None)
    # teeth triangles missing from a plain FLAME file fall back to points3D, and the run says so
    points = points_from_flame_file(model, parser.flame_param_path, fallback_points=parser.points)
    error = float((points - parser.points).norm(dim=1).max())
    borrowed = points.shape[0] - model.num_faces
    print(f"[guided] points from FLAME ({cfg.flame_model or 'default location'}): max distance to points3D {error:.2e} m"
          + (f" ({borrowed} trailing points from points3D)" if borrowed > 0 else ""))
    return points


def resolve_input_views(spec: List[str], parser: SubjectParser) -> List[int]:
    if len(spec) == 1 and spec[0] == "all":
        return list(range(len(parser)))
    return [parser.view_index(int(s) if str(s).isdigit() else s) for s in spec]


def run_guided(cfg: GuidedConfig, decoder=None, w_vectors=None, show_progress: bool = True,
               score_template: bool = False) -> dict:
    """Reconstruct ``cfg.sample_id`` from each input view (or jointly) and score all views.

    With ``score_template`` the summary also holds ``template``: the decoder template alone at the
    subject's points, scored on the views not used as input (the protocol's baseline)."""
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    if decoder is None:
        from fastavatar.checkpoints import load_decoder

        decoder, w_vectors, _ = load_decoder(cfg.decoder_checkpoint, device=device)
    decoder = decoder.to(device)
    parser = SubjectParser(discover_subjects(cfg.data_root, [cfg.sample_id])[0], image_scale=cfg.image_scale)
    points = subject_points(cfg, parser).to(device)
    lpips_model = load_lpips(cfg.lpips_net, device)
    half = max(cfg.max_epochs - 1, 0) // 2
    fit_cfg = FitConfig(w_steps=half, mlp_steps=max(cfg.max_epochs - 1 - half, 0), w_lr=cfg.w_lr, mlp_lr=cfg.mlp_lr,
                        l1_weight=cfg.l1_weight, ssim_weight=cfg.ssim_weight, lpips_weight=cfg.lpips_weight,
                        scale_reg=cfg.scale_reg, pos_reg=cfg.pos_reg, grad_clip=cfg.grad_clip, backend=cfg.backend,
                        precision=cfg.precision, keep_view_dependent=cfg.keep_view_dependent)
    views = resolve_input_views(cfg.input_views, parser)
    groups = [views] if cfg.joint else [[v] for v in views]
    runs = []
    for group in groups:
        runs.append(_fit_and_score(cfg, decoder, w_vectors, parser, points, group, fit_cfg, lpips_model, device, out,
                                   show_progress))
    summary = {
        "sample_id": parser.subject_id,
        "image_size": [parser.width, parser.height],
        "device": str(device),
        "runs": [{k: r[k] for k in ("input_views", "w_init", "initial", "final", "seconds", "output_dir")} for r in runs],
        "mean_unseen": {
            stage: mean_metrics([r[stage]["unseen"] for r in runs]) for stage in ("initial", "final")
        },
        "config": config_to_dict(cfg),
    }
    if score_template:
        seen = sorted({v for group in groups for v in group})
        summary["template"] = evaluate_reconstruction(decoder.template_splats(points), parser, None, seen, lpips_model,
                                                      cfg.backend, device)["unseen"]
    atomic_write_json(out / "summary.json", summary)
    return summary


def _fit_and_score(cfg, decoder, w_vectors, parser, points, views, fit_cfg, lpips_model, device, out, show_progress):
    tag = "input" + "_".join(f"{v:02d}" for v in views)
    run_dir = out / f"sample_{parser.subject_id}" / tag
    w0, source = initial_w(cfg, parser, views[0], w_vectors, device)
    print(f"[guided] subject {parser.subject_id}, input view(s) {[parser.image_names[v] for v in views]}: start W from {source}")
    images = torch.stack([parser.load_image(v) for v in views]).to(device)
    t0 = time.perf_counter()
    result = fit_to_views(decoder, w0, points, images, parser.c2w[views].to(device), parser.Ks[views].to(device),
                          parser.width, parser.height, fit_cfg, lpips_model, show_progress=show_progress)
    seconds = {**{f"{k}_phase": v for k, v in result.seconds.items()}, "refine_total": time.perf_counter() - t0}
    save_ply(run_dir / "initial" / "splats.ply", result.initial_splats)
    save_ply(run_dir / "final" / "splats.ply", result.splats)
    np.save(run_dir / "w_initial.npy", w0.detach().cpu().numpy())
    np.save(run_dir / "w_final.npy", result.w.cpu().numpy())
    scores = {}
    for stage, splats in (("initial", result.initial_splats), ("final", result.splats)):
        res = evaluate_reconstruction(splats, parser, run_dir / stage, views, lpips_model, cfg.backend, device,
                                      save_images=cfg.save_images)
        scores[stage] = {"input": res["seen"], "unseen": res["unseen"]}
    record = {"input_views": [parser.image_names[v] for v in views], "w_init": source, **scores, "seconds": seconds,
              "losses_first_last": [result.losses[0], result.losses[-1]] if result.losses else [],
              "output_dir": str(run_dir)}
    atomic_write_json(run_dir / "metrics.json", record)
    print(f"[guided]   unseen views: PSNR {scores['initial']['unseen']['psnr']:.2f} -> {scores['final']['unseen']['psnr']:.2f} dB"
          f" (refinement {seconds['refine_total']:.1f} s)")
    return record


def run_protocol(cfg: GuidedConfig, subjects: List[str], show_progress: bool = True) -> dict:
    """The evaluation protocol: for each subject, fit from ``cfg.input_views`` and score the unseen
    views, next to two baselines: the decoder template alone (at the subject's points) and the
    feed-forward result before refinement. Writes ``table.md`` and ``table.json`` in output_dir."""
    from fastavatar.checkpoints import load_decoder

    device = resolve_device(cfg.device)
    decoder, w_vectors, _ = load_decoder(cfg.decoder_checkpoint, device=device)
    lpips_model = load_lpips(cfg.lpips_net, device)
    root = Path(cfg.output_dir)
    rows = []
    for sid in subjects:
        sub_cfg = GuidedConfig(**{**config_to_dict(cfg), "sample_id": sid, "joint": True,
                                  "output_dir": str(root / f"subject_{sid}")})
        summary = run_guided(sub_cfg, decoder=decoder, w_vectors=w_vectors, show_progress=show_progress,
                             score_template=True)
        run = summary["runs"][0]
        rows.append({"subject": sid, "template": summary["template"], "feed_forward": run["initial"]["unseen"],
                     "full": run["final"]["unseen"], "w_init": run["w_init"],
                     "refine_seconds": run["seconds"]["refine_total"]})
    overall = {m: mean_metrics([r[m] for r in rows]) for m in ("template", "feed_forward", "full")}
    table = {"subjects": rows, "overall": overall, "input_views": cfg.input_views, "image_scale": cfg.image_scale,
             "decoder_checkpoint": cfg.decoder_checkpoint, "lpips": lpips_model is not None}
    atomic_write_json(root / "table.json", table)
    atomic_write_text(root / "table.md", protocol_markdown(table))
    return table


def protocol_markdown(table: dict) -> str:
    def cell(m):
        lp = "–" if m.get("lpips") is None else f"{m['lpips']:.3f}"
        return f"{m['psnr']:.2f} / {m['ssim']:.3f} / {lp}"

    lines = ["| subject | template | feed-forward | full (refined) |", "|---|---|---|---|"]
    for r in table["subjects"]:
        lines.append(f"| {r['subject']} | {cell(r['template'])} | {cell(r['feed_forward'])} | {cell(r['full'])} |")
    o = table["overall"]
    lines.append(f"| **mean** | {cell(o['template'])} | {cell(o['feed_forward'])} | {cell(o['full'])} |")
    return ("PSNR (dB) / SSIM / LPIPS on the views not used as input "
            f"(input views {table['input_views']}, image scale {table['image_scale']})\n\n" + "\n".join(lines) + "\n")
