"""Photo-mode protocol (leave one subject out): one calibrated view used as a plain photo.

For each held-out subject:

1. the decoder trained on the *other* subjects (``loo_decoders``, a path pattern with
   ``{subject}``) and template landmarks triangulated from the other subjects only (the shipped
   file used all three bundled subjects, so it is rebuilt here without the held-out one);
2. the input view's image file is **copied alone** (no camera, no mask, no points) and
   reconstructed by the camera-free mode (:mod:`fastavatar.inference.photo`);
3. the result lives in the template's frame: a similarity (Procrustes with scale) from its
   Gaussian means to the subject's points3D (Gaussian *i* <-> triangle *i*) maps it to the subject.
   Instead of moving the splats, the subject's cameras are moved by the inverse similarity,
   which renders exactly the same images (a pinhole projection is invariant to a common scale)
   and keeps view-dependent colour right without rotating SH coefficients;
4. the other views are scored (PSNR / SSIM / LPIPS, masked) beside two baselines on the same
   decoder: the template alone at the subject's points, and the calibrated single-view fit
   (guided inference from the same view, with the subject's cameras and points);
5. the camera: rotation error of the PnP pose and of the refined pose against the true camera
   (after the same similarity);
6. identity: ArcFace cosine similarity between the photo and renders at the input camera and at
   +-30 degrees yaw, when the insightface ``buffalo_l`` models are present (a one-line "absent"
   otherwise).

Writes ``photo_table.json`` and ``photo_table.md`` in the output folder.
"""

from __future__ import annotations

import copy
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from fastavatar.config import option
from fastavatar.data import SubjectParser, discover_subjects, subject_id_from_dir
from fastavatar.eval.evaluate import evaluate_reconstruction
from fastavatar.eval.metrics import mean_metrics
from fastavatar.face.pose import rotation_error_deg
from fastavatar.inference.photo import PhotoConfig, PhotoReconstruction, reconstruct_photo, yaw_camera
from fastavatar.io.atomic import atomic_write_json, atomic_write_text

IDENTITY_YAWS = (0.0, -30.0, 30.0)
"""Yaw offsets (degrees) of the identity renders: the input camera, then +-30 degrees."""


@dataclass
class PhotoProtocolConfig:
    """Options of the photo-mode protocol (``scripts/evaluate.py --protocol --photo``)."""

    photo: PhotoConfig = option(PhotoConfig(), "camera-free reconstruction settings (the same flags as --image mode)")
    data_root: str = option("data/nersemble", "folder of calibrated subject folders")
    subjects: List[str] = option(["128", "306", "369"], "subjects, each held out in turn")
    input_view: str = option("8", "the view used as the plain photo (index or camera suffix)")
    loo_decoders: str = option("outputs/loo/{subject}/decoder_run/checkpoints/latest.pth",
                               "decoder trained without {subject} (a path pattern)")
    calibrated_baseline: bool = option(True, "also run the calibrated single-view fit on the same decoder")


def similarity_to(src: np.ndarray, dst: np.ndarray):
    """Least-squares similarity dst ~ s R src + t (Umeyama). src, dst [N,3] -> (s, R [3,3], t [3])."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    a, b = src - mu_s, dst - mu_d
    U, S, Vt = np.linalg.svd(b.T @ a / len(src))
    D = np.eye(3)
    D[2, 2] = np.sign(np.linalg.det(U @ Vt))
    R = U @ D @ Vt
    s = float((S * np.diag(D)).sum() / (a ** 2).sum(axis=1).mean())
    return s, R, mu_d - s * R @ mu_s


def cameras_into_source_frame(c2w: np.ndarray, s: float, R: np.ndarray, t: np.ndarray) -> np.ndarray:
    """[V,4,4] cameras of the destination frame -> the source frame of ``dst = s R src + t``.

    Rendering source-frame splats with the returned cameras gives the images of the transformed
    splats seen by the original cameras (same intrinsics)."""
    out = np.array(c2w, dtype=np.float64, copy=True)
    out[:, :3, :3] = R.T @ out[:, :3, :3]
    out[:, :3, 3] = ((out[:, :3, 3] - t) @ R) / s
    return out


def _with_cameras(parser: SubjectParser, c2w: np.ndarray) -> SubjectParser:
    moved = copy.copy(parser)
    moved.c2w = torch.from_numpy(c2w.astype(np.float32))
    return moved


def copy_as_plain_photo(parser: SubjectParser, view: int, folder: Path) -> Path:
    """Copy view ``view``'s image file alone (no camera, mask or points) into ``folder``; returns the copy."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / parser.image_paths[view].name
    shutil.copyfile(parser.image_paths[view], path)
    return path


def score_photo_reconstruction(rec: PhotoReconstruction, parser: SubjectParser, view: int, lpips_model, backend: str,
                               device, out_dir: Optional[Path] = None) -> Dict[str, object]:
    """Score a camera-free reconstruction of view ``view`` of ``parser``'s subject on its other views.

    Procrustes with scale from the result's Gaussian means [N,3] to the subject's points3D [N,3]
    (Gaussian *i* <-> triangle *i*); the subject's cameras are moved by the inverse similarity (see
    the module docstring). ``out_dir``: renders and per-view JSON of the final head. Returns
    ``{"photo", "photo_before_per_gaussian"}`` (unseen-view means), the PnP and refined camera
    rotation errors (degrees) against the true camera, ``"alignment"`` (scale, RMSE in metres) and
    ``"aligned_parser"`` (the subject with the moved cameras, for further renders)."""
    means = rec.splats["means"].detach().double().cpu().numpy()
    points = parser.points.double().numpy()
    s, R, t = similarity_to(means, points)
    aligned_rmse = float(np.sqrt((((s * means @ R.T + t) - points) ** 2).sum(1).mean()))
    moved = _with_cameras(parser, cameras_into_source_frame(parser.c2w.double().numpy(), s, R, t))
    photo_scores = evaluate_reconstruction(rec.splats, moved, out_dir, [view], lpips_model, backend, device)["unseen"]
    before_pg = evaluate_reconstruction(rec.fit_splats, moved, None, [view], lpips_model, backend, device)["unseen"]
    true_R = parser.c2w[view].double().numpy()[:3, :3]
    return {"photo": photo_scores, "photo_before_per_gaussian": before_pg,
            "pnp_rotation_error_deg": rotation_error_deg(R @ rec.pnp_c2w[:3, :3], true_R),
            "refined_rotation_error_deg": rotation_error_deg(R @ rec.c2w.double().cpu().numpy()[:3, :3], true_R),
            "alignment": {"scale": s, "rmse_m": aligned_rmse}, "aligned_parser": moved}


def identity_scores(photo_path: Path, splats, c2w: torch.Tensor, K: torch.Tensor, width: int, height: int,
                    backend: str, insightface_root: str, device) -> Dict[str, object]:
    """ArcFace cosine similarity photo vs renders at the input camera and +-30 degrees yaw, or why not."""
    from fastavatar.face.embedding import FaceEmbedder, FaceError, FaceModelsMissingError
    from fastavatar.face.images import LoadedImage, load_rgb
    from fastavatar.inference.photo import render_image

    try:
        embedder = FaceEmbedder(insightface_root or None, device=torch.device(device).type)
    except (FaceModelsMissingError, FileNotFoundError, ImportError) as exc:
        return {"status": f"absent ({str(exc).splitlines()[0]})"}
    ref = np.asarray(embedder.embed_loaded(load_rgb(photo_path)).embedding, dtype=np.float64)
    ref /= np.linalg.norm(ref)
    target = splats["means"].detach().mean(0).cpu()
    scores = {}
    for yaw in IDENTITY_YAWS:
        pose = yaw_camera(c2w.cpu().float(), target.float(), yaw).to(splats["means"].device)
        rgb = render_image(splats, pose, K, width, height, backend)
        image = LoadedImage(rgb=rgb, path=Path(f"render_yaw{yaw:+.0f}"), original_size=(width, height), scale=1.0,
                            source_mode="RGB")
        try:
            emb = np.asarray(embedder.embed_loaded(image).embedding, dtype=np.float64)
            scores[f"{yaw:+.0f}"] = float(emb @ ref / np.linalg.norm(emb))
        except FaceError as exc:
            scores[f"{yaw:+.0f}"] = f"no face in render ({str(exc).splitlines()[0]})"
    return {"status": "ok", "cosine": scores}


def loo_template_landmarks(data_root: str, subjects: List[str], cache: Path, stage):
    """Template landmarks triangulated from ``subjects`` only (cached in ``cache``)."""
    from fastavatar.face.template_landmarks import load_template_landmarks
    from fastavatar.inference.landmark_views import build_template_landmark_file

    if not cache.is_file():
        build_template_landmark_file(data_root, subjects, cache, stage=stage)
    return load_template_landmarks(cache)


def run_photo_protocol(cfg: PhotoProtocolConfig, show_progress: bool = True) -> dict:
    """Leave-one-out photo-mode scores over ``cfg.subjects`` (see module docstring)."""
    from fastavatar.face.landmarks import FaceStage
    from fastavatar.inference.guided import GuidedConfig, run_guided
    from fastavatar.inference.photo import load_photo_decoder
    from fastavatar.losses import load_lpips
    from fastavatar.runtime import resolve_device, seed_everything

    pc = cfg.photo
    device = resolve_device(pc.device)
    root = Path(pc.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    stage = FaceStage()
    lpips_model = load_lpips(pc.lpips_net, device)
    rows = []
    for sid in cfg.subjects:
        seed_everything(pc.seed)
        # landmarks from every bundled subject but the held-out one (not only those listed in --subjects)
        others = [subject_id_from_dir(d) for d in discover_subjects(cfg.data_root) if subject_id_from_dir(d) != sid]
        decoder_path = cfg.loo_decoders.format(subject=sid)
        decoder, w_vectors = load_photo_decoder(replace(pc, decoder_checkpoint=decoder_path), device)
        parser = SubjectParser(discover_subjects(cfg.data_root, [sid])[0], image_scale=pc.image_scale)
        view = parser.view_index(int(cfg.input_view) if str(cfg.input_view).isdigit() else cfg.input_view)
        sub_dir = root / f"subject_{sid}"
        tl = loo_template_landmarks(cfg.data_root, others, sub_dir / f"template_landmarks_from_{'_'.join(others)}.npz",
                                    stage)
        photo_path = copy_as_plain_photo(parser, view, sub_dir / "photo_input")
        print(f"[photo-protocol] subject {sid}: photo {photo_path} (decoder {decoder_path}, landmarks from {others})")
        rec = reconstruct_photo(pc, photo_path, decoder, w_vectors, stage, tl, lpips_model, device,
                                sub_dir / "photo", show_progress)
        scored = score_photo_reconstruction(rec, parser, view, lpips_model, pc.fit.render_backend, device,
                                            sub_dir / "photo" / "scored")
        photo_scores, pnp_err, refined_err = (scored["photo"], scored["pnp_rotation_error_deg"],
                                              scored["refined_rotation_error_deg"])
        identity = identity_scores(photo_path, rec.splats, rec.c2w, rec.K, rec.width, rec.height,
                                   pc.fit.render_backend, pc.insightface_root, device)
        row = {"subject": sid, **{k: v for k, v in scored.items() if k != "aligned_parser"},
               "identity": identity, "photo_seconds": rec.summary["timings_s"],
               "initialisation": rec.summary["initialisation"], "decoder": decoder_path}
        if cfg.calibrated_baseline:
            gcfg = GuidedConfig(data_root=cfg.data_root, sample_id=sid, encoder_checkpoint=pc.encoder_checkpoint,
                                decoder_checkpoint=decoder_path, insightface_root=pc.insightface_root, fit=pc.fit,
                                gaussians=pc.gaussians,
                                lpips_net=pc.lpips_net, input_views=[str(cfg.input_view)], joint=True,
                                image_scale=pc.image_scale, output_dir=str(sub_dir / "calibrated"), device=pc.device,
                                seed=pc.seed)
            t0 = time.perf_counter()
            summary = run_guided(gcfg, decoder=decoder, w_vectors=w_vectors, show_progress=show_progress,
                                 score_template=True)
            row["template"] = summary["template"]
            row["calibrated_fit"] = summary["runs"][0]["final"]["unseen"]
            row["calibrated_seconds"] = time.perf_counter() - t0
        else:
            row["template"] = evaluate_reconstruction(decoder.template_splats(parser.points.to(device)), parser, None,
                                                      [view], lpips_model, pc.fit.render_backend, device)["unseen"]
        id_line = (" ".join(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}"
                            for k, v in identity.get("cosine", {}).items()) or identity["status"])
        print(f"[photo-protocol] subject {sid}: photo mode {photo_scores['psnr']:.2f} dB"
              + (f", calibrated fit {row['calibrated_fit']['psnr']:.2f} dB" if "calibrated_fit" in row else "")
              + f", template {row['template']['psnr']:.2f} dB; PnP rotation error {pnp_err:.1f} deg "
              f"(refined {refined_err:.1f}); identity {id_line}")
        rows.append(row)
        atomic_write_json(sub_dir / "photo_row.json", row)
    keys = ["template", "photo_before_per_gaussian", "photo"] + (["calibrated_fit"] if cfg.calibrated_baseline else [])
    overall = {k: mean_metrics([r[k] for r in rows]) for k in keys}
    table = {"subjects": rows, "overall": overall, "input_view": cfg.input_view, "image_scale": pc.image_scale,
             "loo_decoders": cfg.loo_decoders, "lpips": lpips_model is not None, "device": str(device)}
    atomic_write_json(root / "photo_table.json", table)
    atomic_write_text(root / "photo_table.md", photo_table_markdown(table))
    return table


def photo_table_markdown(table: dict) -> str:
    def cell(m: Optional[dict]) -> str:
        if not m:
            return "–"
        lp = "–" if m.get("lpips") is None else f"{m['lpips']:.3f}"
        return f"{m['psnr']:.2f} / {m['ssim']:.3f} / {lp}"

    def ident(r):
        cos = r["identity"].get("cosine")
        if not cos:
            return "absent"
        return " / ".join(f"{v:.2f}" if isinstance(v, float) else "no face" for v in cos.values())

    lines = ["| held-out subject | template | calibrated fit | photo, W+MLP | **photo mode** | PnP rot. err (°) | "
             "refined (°) | photo→splats (s) | ArcFace 0/−30/+30° |", "|---|---|---|---|---|---|---|---|---|"]
    for r in table["subjects"]:
        lines.append(f"| {r['subject']} | {cell(r['template'])} | {cell(r.get('calibrated_fit'))} | "
                     f"{cell(r['photo_before_per_gaussian'])} | {cell(r['photo'])} | "
                     f"{r['pnp_rotation_error_deg']:.1f} | {r['refined_rotation_error_deg']:.1f} | "
                     f"{r['photo_seconds']['photo_to_splats']:.1f} | {ident(r)} |")
    o = table["overall"]
    lines.append(f"| **mean** | {cell(o['template'])} | {cell(o.get('calibrated_fit'))} | "
                 f"{cell(o['photo_before_per_gaussian'])} | {cell(o['photo'])} | | | | |")
    return ("Photo mode, leave one subject out: PSNR (dB) / SSIM / LPIPS on the 15 views not used as the photo "
            f"(photo = view {table['input_view']}, image scale {table['image_scale']}, device {table['device']})\n\n"
            + "\n".join(lines) + "\n")


def photo_protocol_main(argv, description: str = "") -> int:
    """``scripts/evaluate.py --protocol --photo ...``: one-line errors, exit code."""
    import sys

    from fastavatar.config import parse_config
    from fastavatar.face.embedding import FaceError
    from fastavatar.face.images import ImageError
    from fastavatar.inference.photo import PhotoModeError

    args = [a for a in argv if a not in ("--protocol", "--photo")]
    try:
        cfg = parse_config(PhotoProtocolConfig, args, description=description)
        table = run_photo_protocol(cfg)
    except (FileNotFoundError, ValueError, ImportError, ImageError, FaceError, PhotoModeError) as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1
    print((Path(cfg.photo.output_dir) / "photo_table.md").read_text())
    return 0 if table["subjects"] else 1
