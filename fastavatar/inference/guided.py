"""FLAME-guided inference ("nersemble-style", spec §6.2): reconstruct a subject from one input
view with known geometry (its FLAME-triangle centres) and calibrated cameras, refine it by
test-time optimisation, and score every other view.

Differences from the released ``inference_feedforward_full_guidance.py`` (bug fixes in
:mod:`fastavatar.inference.refine`): ``--input_views`` picks the input view(s) (default: camera 8, the
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
from typing import List, Literal, Tuple

import numpy as np
import torch

from fastavatar.config import config_to_dict, option, save_config
from fastavatar.data import SubjectParser, discover_subjects
from fastavatar.eval.evaluate import evaluate_reconstruction
from fastavatar.inference.per_gaussian import PerGaussianConfig, refine_gaussians
from fastavatar.inference.refine import FitConfig, fit_to_views, mean_w
from fastavatar.losses import load_lpips
from fastavatar.io.ply import save_ply
from fastavatar.runtime import resolve_device, seed_everything
from fastavatar.eval.metrics import mean_metrics
from fastavatar.io.atomic import atomic_write_json


@dataclass
class GuidedConfig:
    """Guided inference on one calibrated subject; the refinement itself is ``fit`` (its options are
    flags of their own name: ``--w_steps``, ``--w_lr``, ...)."""

    data_root: str = option("data/nersemble", "folder of subject folders")
    sample_id: str = option("306", "subject to reconstruct")
    encoder_checkpoint: str = option("pretrained_weights/encoder_neutral_flame.pth", "W encoder checkpoint (optional)")
    decoder_checkpoint: str = option("pretrained_weights/decoder_neutral_flame.pth", "decoder checkpoint")
    insightface_root: str = option("", "insightface buffalo_l folder (for the encoder's start W)")
    fit: FitConfig = option(FitConfig(), "test-time refinement (official: 150 W steps, then 150 MLP steps)")
    gaussians: PerGaussianConfig = option(
        PerGaussianConfig(), "per-Gaussian stage after W and the hypernetwork (its flags start with pg_; "
                             "--no-per_gaussian turns it off)")
    lpips_net: Literal["alex", "vgg"] = option("alex", "LPIPS trunk for loss and metric")
    input_views: List[str] = option(["8"], "input view indices (e.g. 8 or 0 8), or 'all' to fit each view in turn")
    joint: bool = option(False, "fit several input views jointly instead of one after another")
    image_scale: float = option(1.0, "image scale (1: 550x802)")
    allow_resize: bool = option(False, "resize images / masks whose size differs from their COLMAP camera (else an error)")
    points_from: Literal["colmap", "flame"] = option(
        "colmap", "geometry: 'colmap' (sparse/0 points3D) or 'flame' (needs --flame_model)")
    flame_model: str = option("", "FLAME model file for points_from=flame (licence-gated, never bundled)")
    output_dir: str = option("results/guided", "output folder", aliases=("save_path",))
    device: str = option("auto", "auto, cpu or cuda")
    seed: int = option(42, "random seed")
    save_images: bool = option(True, "save renders of all views (initial and final) beside ground truth")


def initial_w(cfg: GuidedConfig, parser: SubjectParser, view: int, w_vectors, device) -> Tuple[torch.Tensor, str]:
    """The start W and where it came from ("encoder" or "mean_w: <reason>")."""
    encoder_path = Path(cfg.encoder_checkpoint)
    if not encoder_path.is_file():
        return mean_w(w_vectors).to(device), f"mean_w (no encoder checkpoint at {encoder_path})"
    from fastavatar.io.checkpoints import load_w_encoder

    # a given checkpoint that is damaged, hostile or of another kind is an error, never a fallback
    encoder = load_w_encoder(encoder_path, device)
    encoder.eval()
    try:
        from fastavatar.face.embedding import FaceEmbedder

        embedder = FaceEmbedder(cfg.insightface_root or None, device=device.type)
        embedding = embedder.embed_file(parser.image_paths[view]).embedding
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
    if cfg.points_from != "flame":  # the dataclass does not check values passed in code
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
    """``--input_views`` (indices, image names, or ``all``) -> view indices; one-line errors."""
    if len(spec) == 1 and spec[0] == "all":
        return list(range(len(parser)))
    if not spec:
        raise ValueError("--input_views: give at least one view (an index, an image name, or 'all')")
    views = []
    for s in spec:
        try:
            views.append(parser.view_index(int(s) if str(s).isdigit() else s))
        except (IndexError, KeyError) as exc:
            reason = exc.args[0] if exc.args else type(exc).__name__
            raise ValueError(f"--input_views {s!r}: {reason}") from None
    return views


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
        from fastavatar.io.checkpoints import load_decoder

        decoder, w_vectors, _ = load_decoder(cfg.decoder_checkpoint, device=device)
    decoder = decoder.to(device)
    parser = SubjectParser(discover_subjects(cfg.data_root, [cfg.sample_id])[0], image_scale=cfg.image_scale,
                           allow_resize=cfg.allow_resize)
    points = subject_points(cfg, parser).to(device)
    lpips_model = load_lpips(cfg.lpips_net, device)
    views = resolve_input_views(cfg.input_views, parser)
    groups = [views] if cfg.joint else [[v] for v in views]
    runs = []
    for group in groups:
        runs.append(_fit_and_score(cfg, decoder, w_vectors, parser, points, group, lpips_model, device, out,
                                   show_progress))
    summary = {
        "sample_id": parser.subject_id,
        "image_size": [parser.width, parser.height],
        "device": str(device),
        "runs": [{k: r[k] for k in ("input_views", "w_init", "initial", "fit", "final", "seconds", "output_dir")}
                 for r in runs],
        "mean_unseen": {
            stage: mean_metrics([r[stage]["unseen"] for r in runs]) for stage in ("initial", "fit", "final")
        },
        "config": config_to_dict(cfg),
    }
    if score_template:
        seen = sorted({v for group in groups for v in group})
        summary["template"] = evaluate_reconstruction(decoder.template_splats(points), parser, None, seen, lpips_model,
                                                      cfg.fit.render_backend, device)["unseen"]
    atomic_write_json(out / "summary.json", summary)
    return summary


def _fit_and_score(cfg, decoder, w_vectors, parser, points, views, lpips_model, device, out, show_progress):
    tag = "input" + "_".join(f"{v:02d}" for v in views)
    run_dir = out / f"sample_{parser.subject_id}" / tag
    w0, source = initial_w(cfg, parser, views[0], w_vectors, device)
    print(f"[guided] subject {parser.subject_id}, input view(s) {[parser.image_names[v] for v in views]}: start W from {source}")
    images = torch.stack([parser.load_image(v) for v in views]).to(device)
    t0 = time.perf_counter()
    c2w, Ks = parser.c2w[views].to(device), parser.Ks[views].to(device)
    result = fit_to_views(decoder, w0, points, images, c2w, Ks, parser.width, parser.height, cfg.fit, lpips_model,
                          show_progress=show_progress)
    stage = refine_gaussians(result.splats, images, c2w, Ks, parser.width, parser.height, cfg.gaussians,
                             template_points=decoder.template_means, lpips_model=lpips_model,
                             show_progress=show_progress, keep_view_dependent=cfg.fit.keep_view_dependent,
                             sh_degree=cfg.fit.sh_degree, render_backend=cfg.fit.render_backend)
    seconds = {**{f"{k}_phase": v for k, v in result.seconds.items()}, "per_gaussian_phase": stage.seconds,
               "refine_total": time.perf_counter() - t0}
    save_ply(run_dir / "initial" / "splats.ply", result.initial_splats)
    save_ply(run_dir / "fit" / "splats.ply", result.splats)  # after W and the hypernetwork
    save_ply(run_dir / "final" / "splats.ply", stage.splats)  # after the per-Gaussian stage (= fit when off)
    np.save(run_dir / "w_initial.npy", w0.detach().cpu().numpy())
    np.save(run_dir / "w_final.npy", result.w.cpu().numpy())
    scores = {}
    for name, splats in (("initial", result.initial_splats), ("fit", result.splats), ("final", stage.splats)):
        res = evaluate_reconstruction(splats, parser, run_dir / name, views, lpips_model, cfg.fit.render_backend, device,
                                      save_images=cfg.save_images and name != "fit")
        scores[name] = {"input": res["seen"], "unseen": res["unseen"]}
    record = {"input_views": [parser.image_names[v] for v in views], "w_init": source, **scores, "seconds": seconds,
              "per_gaussian": ("off" if not cfg.gaussians.per_gaussian else
                               f"{cfg.gaussians.pg_steps} steps, {int(stage.movable.sum())} of "
                               f"{stage.movable.numel()} Gaussians movable"),
              "losses_first_last": [result.losses[0], result.losses[-1]] if result.losses else [],
              "output_dir": str(run_dir)}
    atomic_write_json(run_dir / "metrics.json", record)
    print(f"[guided]   unseen views: PSNR {scores['initial']['unseen']['psnr']:.2f} (start) -> "
          f"{scores['fit']['unseen']['psnr']:.2f} (W + MLP) -> {scores['final']['unseen']['psnr']:.2f} dB "
          f"(per-Gaussian stage: {record['per_gaussian']}; refinement {seconds['refine_total']:.1f} s)")
    return record
