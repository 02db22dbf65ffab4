"""The bundled end-to-end demo (README command 1), CPU-sized:

1. build a canonical template from the training subjects (306, 369) with our renderer;
2. train a small decoder (hypernetwork + W per subject) on their views;
3. reconstruct the held-out subject 128 from ONE view by test-time optimisation (W, then MLP,
   then the per-Gaussian stage of :mod:`fastavatar.inference.per_gaussian`);
4. reconstruct the same subject from a PLAIN PHOTO: the input view's image file copied alone (no
   camera, mask or points) through the camera-free mode of :mod:`fastavatar.inference.photo`
   (face landmarks, PnP camera, camera / W / MLP / per-Gaussian refinement against the photo),
   with template landmarks triangulated from the training subjects only; the result is aligned
   to the subject by Procrustes and scored on the same 15 views
   (:func:`fastavatar.eval.photo_protocol.score_photo_reconstruction`);
5. write ``reconstruction/`` and ``photo/`` (``splats.ply``, renders of all 16 views, a turntable
   GIF, metrics) and print PSNR/SSIM/LPIPS on the 15 views neither reconstruction saw, next to the
   template alone and the decoder before fitting.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from fastavatar.config import config_to_dict, option, save_config
from fastavatar.data import SubjectParser, discover_subjects
from fastavatar.eval.evaluate import evaluate_reconstruction, save_turntable
from fastavatar.inference.per_gaussian import PerGaussianConfig, refine_gaussians
from fastavatar.inference.photo import CameraFitConfig
from fastavatar.inference.refine import FitConfig, fit_to_views, mean_w
from fastavatar.losses import load_lpips
from fastavatar.io.ply import save_ply
from fastavatar.train.template import TemplateFitConfig, build_template
from fastavatar.runtime import resolve_device, seed_everything
from fastavatar.train.decoder import DecoderTrainConfig, train_decoder
from fastavatar.io.atomic import atomic_save_image, atomic_write_json


@dataclass
class DemoPhotoConfig:
    """The photo stage of the demo. Its W / hypernetwork steps, learning rates, loss weights, renderer and
    per-Gaussian stage are the calibrated fit's (``DemoConfig.fit`` / ``gaussians``, as configs/photo_cpu.yaml)."""

    photo: bool = option(True, "also reconstruct the test subject from a plain photo (a copy of its input-view image, "
                               "no calibration) by the camera-free mode; needs the [face] extra (--no-photo: skip)")
    camera: CameraFitConfig = option(CameraFitConfig(), "the photo mode's camera stage (PnP, then the camera's rotation against the photo)")


@dataclass
class DemoConfig:
    data_root: str = option("data/nersemble", "bundled sample data")
    train_subjects: List[str] = option(["306", "369"], "subjects the decoder is trained on")
    test_subject: str = option("128", "held-out subject reconstructed from one view")
    input_view: int = option(8, "the single view the reconstruction sees (8: near-frontal)")
    image_scale: float = option(0.25, "image scale for every stage (0.25: 138x200)")
    output_dir: str = option("outputs/demo", "where everything is written")
    overwrite: bool = option(False, "replace the decoder run of an earlier demo in output_dir (refused otherwise)")
    template_iterations: int = option(150, "template fit steps per training subject")
    decoder_epochs: int = option(
        48, "decoder training epochs (15 views x subjects per epoch; held-out PSNR still rose from 16 to 48: 18.0 -> 23.1 dB "
            "on the training subjects' camera 08)")
    decoder_hidden_dim: int = option(128, "hypernetwork width for the demo (official: 256)")
    decoder_body_layers: int = option(4, "hypernetwork depth for the demo (official: 6)")
    views_per_subject: int = option(3, "views rendered per decoder pass during training")
    decoder_mlp_lr: float = option(1e-3, "decoder MLP learning rate (larger than official for a short CPU run)")
    decoder_w_lr: float = option(1e-2, "decoder W learning rate")
    fit: FitConfig = option(FitConfig(w_steps=30, mlp_steps=0, w_lr=1e-2, mlp_lr=1e-3),
                            "the single-view fit, calibrated and photo (no hypernetwork phase: the per-Gaussian stage "
                            "does better, README 'Evaluation protocol'; renderer for every stage: --render_backend)")
    gaussians: PerGaussianConfig = option(PerGaussianConfig(), "per-Gaussian stage after the fit (--no-per_gaussian: off)")
    photo: DemoPhotoConfig = option(DemoPhotoConfig(), "the same subject from a plain photo (camera-free mode)")
    turntable_frames: int = option(36, "frames in the turntable GIF")
    device: str = option("auto", "auto, cpu or cuda")
    seed: int = option(0, "random seed")


def build_demo_decoder(cfg: DemoConfig, device) -> Tuple[Path, Path, Dict[str, float]]:
    """Stages 1-2: the template from ``cfg.train_subjects`` and the decoder trained on them (camera
    ``cfg.input_view`` held out) under ``cfg.output_dir``. Returns (template.ply, decoder run folder,
    timings). Also the leave-one-out decoders of :mod:`fastavatar.apps.loo`."""
    out = Path(cfg.output_dir)
    backend = cfg.fit.render_backend
    timings = {}
    print(f"[demo] 1/5 template from subjects {cfg.train_subjects} at scale {cfg.image_scale}")
    t0 = time.time()
    train_parsers = [SubjectParser(p, image_scale=cfg.image_scale)
                     for p in discover_subjects(cfg.data_root, cfg.train_subjects, verbose=True)]
    template = build_template(train_parsers, TemplateFitConfig(iterations=cfg.template_iterations, render_backend=backend,
                                                               seed=cfg.seed), device=device)
    template_path = out / "template.ply"
    save_ply(template_path, template)
    timings["template_s"] = time.time() - t0

    print(f"[demo] 2/5 decoder training ({cfg.decoder_epochs} epochs)")
    t0 = time.time()
    train_cfg = DecoderTrainConfig(
        data_root=cfg.data_root, subjects=list(cfg.train_subjects), image_scale=cfg.image_scale, val_views=[cfg.input_view],
        ply_file_path=str(template_path), hidden_dim=cfg.decoder_hidden_dim, body_layers=cfg.decoder_body_layers,
        max_epochs=cfg.decoder_epochs, views_per_subject=cfg.views_per_subject, mlp_lr=cfg.decoder_mlp_lr,
        w_lr=cfg.decoder_w_lr,
        output_dir=str(out / "decoder_run"), eval_every=max(cfg.decoder_epochs // 2, 1), save_every=cfg.decoder_epochs,
        device=str(device), render_backend=backend, seed=cfg.seed, w_init_std=0.1, lpips_weight=0.1,
        overwrite=cfg.overwrite,
    )
    run_dir = train_decoder(train_cfg)
    timings["decoder_training_s"] = time.time() - t0
    return template_path, Path(run_dir), timings


def check_photo_stage(cfg: DemoConfig):
    """Before any training: the photo stage's face runtime and models load (one-line errors otherwise).
    Returns the face stage, or None with ``--no-photo``."""
    if not cfg.photo.photo:
        return None
    from fastavatar.face.landmarks import INSTALL_HINT, FaceRuntimeMissingError, FaceStage, runtime_available

    if not runtime_available():
        raise FaceRuntimeMissingError(
            "the demo starts from a photo and its face stage needs the tflite runtime 'ai-edge-litert': "
            f"{INSTALL_HINT} (or run python scripts/demo.py --no-photo for the calibrated part only)")
    return FaceStage()


def reconstruct_from_photo(cfg: DemoConfig, decoder, w_vectors, test: SubjectParser, face_stage, lpips_model,
                           device, out: Path):
    """Stage 4: subject ``test`` from a plain copy of its input-view image (camera-free mode), aligned to the
    subject by Procrustes and scored on its other views. Landmarks are triangulated from the training
    subjects only. Returns (reconstruction, scores of ``score_photo_reconstruction``, photo path, timings)."""
    from fastavatar.eval.photo_protocol import copy_as_plain_photo, score_photo_reconstruction
    from fastavatar.face.template_landmarks import load_template_landmarks
    from fastavatar.inference.landmark_views import build_template_landmark_file
    from fastavatar.inference.photo import PhotoConfig, reconstruct_photo

    timings = {}
    view = cfg.input_view
    photo_path = copy_as_plain_photo(test, view, out / "photo_input")  # the image alone: no camera, mask or points
    print(f"[demo] 4/5 reconstruct subject {cfg.test_subject} from the plain photo {photo_path} (no calibration)")
    t0 = time.time()
    landmarks_file = out / f"template_landmarks_from_{'_'.join(cfg.train_subjects)}.npz"
    build_template_landmark_file(cfg.data_root, list(cfg.train_subjects), landmarks_file, stage=face_stage)
    template_landmarks = load_template_landmarks(landmarks_file)
    timings["photo_landmarks_s"] = time.time() - t0
    # the demo's decoder has its own W space: no official W encoder or tracker (mean W, template points)
    photo_cfg = PhotoConfig(image=str(photo_path), encoder_checkpoint="", dino_checkpoint="",
                            camera=cfg.photo.camera, gaussians=cfg.gaussians, lpips_net="alex",
                            fit=cfg.fit,
                            image_scale=cfg.image_scale, output_dir=str(out), device=cfg.device, seed=cfg.seed)
    seed_everything(cfg.seed)
    t0 = time.time()
    rec = reconstruct_photo(photo_cfg, photo_path, decoder, w_vectors, face_stage, template_landmarks, lpips_model,
                            device, out=None)
    timings["photo_to_splats_s"] = time.time() - t0
    save_ply(out / "splats.ply", rec.splats)
    save_ply(out / "splats_before_per_gaussian.ply", rec.fit_splats)
    atomic_save_image(out / "input.png", rec.framed.composite)
    atomic_write_json(out / "camera.json", rec.summary["camera"])
    t0 = time.time()
    scored = score_photo_reconstruction(rec, test, view, lpips_model, cfg.fit.render_backend, device, out)
    save_turntable(rec.splats, scored["aligned_parser"], out / "turntable.gif", reference_view=view,
                   num_frames=cfg.turntable_frames, backend=cfg.fit.render_backend, device=device)
    timings["photo_evaluation_s"] = time.time() - t0
    return rec, scored, photo_path, timings


def check_output_folder(cfg: DemoConfig) -> None:
    """Before any work: an earlier demo's decoder in ``output_dir`` is replaced only with ``--overwrite``
    (training would refuse it after the template stage otherwise)."""
    from fastavatar.train.safety import RunFolderError, existing_checkpoints

    found = existing_checkpoints(Path(cfg.output_dir) / "decoder_run" / "checkpoints")
    if found and not cfg.overwrite:
        raise RunFolderError(f"{cfg.output_dir} holds an earlier demo (decoder_run/checkpoints/{found[0].name}); "
                             "pass --overwrite to replace it, or choose another --output_dir")


def run_demo(cfg: DemoConfig) -> dict:
    t_start = time.time()
    out = Path(cfg.output_dir)
    check_output_folder(cfg)
    face_stage = check_photo_stage(cfg)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    backend = cfg.fit.render_backend
    template_path, run_dir, timings = build_demo_decoder(cfg, device)

    print(f"[demo] 3/5 reconstruct subject {cfg.test_subject} from view {cfg.input_view} only (its calibrated camera)")
    t0 = time.time()
    from fastavatar.io.checkpoints import load_decoder

    decoder, w_vectors, _ = load_decoder(run_dir / "checkpoints" / "latest.pth", device=device)
    test = SubjectParser(discover_subjects(cfg.data_root, [cfg.test_subject])[0], image_scale=cfg.image_scale)
    lpips_model = load_lpips("alex", device)
    points = test.points.to(device)
    view = cfg.input_view
    image = test.load_image(view).to(device)[None]
    w0 = mean_w(w_vectors).to(device)
    result = fit_to_views(decoder, w0, points, image, test.c2w[view:view + 1].to(device),
                          test.Ks[view:view + 1].to(device), test.width, test.height, cfg.fit, lpips_model)
    timings["fit_s"] = time.time() - t0
    t0 = time.time()
    stage = refine_gaussians(result.splats, image, test.c2w[view:view + 1].to(device), test.Ks[view:view + 1].to(device),
                             test.width, test.height, cfg.gaussians, template_points=decoder.template_means,
                             lpips_model=lpips_model, keep_view_dependent=cfg.fit.keep_view_dependent,
                             sh_degree=cfg.fit.sh_degree, render_backend=backend)
    timings["per_gaussian_s"] = time.time() - t0
    final = stage.splats
    recon = out / "reconstruction"
    save_ply(recon / "splats.ply", final)
    save_ply(recon / "splats_before_per_gaussian.ply", result.splats)
    torch.save(result.w.cpu(), recon / "w_vector.pt")

    photo: Optional[tuple] = None
    photo_dir = out / "photo"
    if face_stage is not None:
        photo = reconstruct_from_photo(cfg, decoder, w_vectors, test, face_stage, lpips_model, device, photo_dir)
        timings.update(photo[3])
    else:
        print("[demo] 4/5 photo stage skipped (--no-photo)")

    print("[demo] 5/5 evaluation on the unseen views")
    t0 = time.time()
    template_splats = decoder.template_splats(points)
    scores = {
        "final": evaluate_reconstruction(final, test, recon, [view], lpips_model, backend, device),
        "fit": evaluate_reconstruction(result.splats, test, None, [view], lpips_model, backend, device),
        "decoder_mean_w": evaluate_reconstruction(result.initial_splats, test, None, [view], lpips_model,
                                                  backend, device),
        "template": evaluate_reconstruction(template_splats, test, None, [view], lpips_model, backend, device),
    }
    gif = save_turntable(final, test, recon / "turntable.gif", reference_view=view,
                         num_frames=cfg.turntable_frames, backend=backend, device=device)
    timings["evaluation_s"] = time.time() - t0
    unseen = {name: s["unseen"] for name, s in scores.items()}
    outputs = {"splats": str(recon / "splats.ply"), "renders": str(recon / "renders"),
               "turntable": str(gif), "metrics": str(recon / "results.json")}
    photo_summary = None
    if photo is not None:
        rec, scored, photo_path, _ = photo
        unseen["photo_w_mlp"] = scored["photo_before_per_gaussian"]
        unseen["photo"] = scored["photo"]
        photo_summary = {
            "photo": str(photo_path), "copied_from": str(test.image_paths[view]),
            "calibration_used": "none (the image file alone; template landmarks from subjects "
                                f"{', '.join(cfg.train_subjects)}; the subject's cameras only to score, after alignment)",
            "initialisation": rec.summary["initialisation"],
            "unseen_views": {**{k: unseen[k] for k in ("template", "decoder_mean_w", "photo_w_mlp", "photo")},
                             "calibrated_fit": unseen["final"]},
            "pnp_rotation_error_deg": scored["pnp_rotation_error_deg"],
            "refined_rotation_error_deg": scored["refined_rotation_error_deg"],
            "alignment": scored["alignment"], "camera": rec.summary["camera"], "per_gaussian": rec.summary["per_gaussian"],
            "warnings": rec.summary["warnings"], "timings_s": rec.summary["timings_s"],
            "outputs": {"splats": str(photo_dir / "splats.ply"), "renders": str(photo_dir / "renders"),
                        "turntable": str(photo_dir / "turntable.gif"), "input": str(photo_dir / "input.png"),
                        "metrics": str(photo_dir / "results.json")},
        }
        atomic_write_json(photo_dir / "summary.json", photo_summary)
        outputs.update({"photo_splats": str(photo_dir / "splats.ply"), "photo_renders": str(photo_dir / "renders"),
                        "photo_turntable": str(photo_dir / "turntable.gif"),
                        "photo_summary": str(photo_dir / "summary.json")})
    outputs.update({"decoder_run": str(run_dir), "template": str(template_path)})
    timings["total_s"] = time.time() - t_start
    summary = {
        "test_subject": cfg.test_subject,
        "input_view": test.image_names[view],
        "image_size": [test.width, test.height],
        "num_unseen_views": len(test) - 1,
        "device": str(device),
        "unseen_views": unseen,
        "input_view_scores": {name: s["seen"] for name, s in scores.items()},
        "fit_beats_template_psnr": scores["final"]["unseen"]["psnr"] > scores["template"]["unseen"]["psnr"],
        "photo_beats_template_psnr": (None if photo is None
                                      else unseen["photo"]["psnr"] > scores["template"]["unseen"]["psnr"]),
        "photo_mode": None if photo_summary is None else {
            k: photo_summary[k] for k in ("photo", "calibration_used", "pnp_rotation_error_deg",
                                          "refined_rotation_error_deg", "alignment", "initialisation")},
        "per_gaussian": "off" if not cfg.gaussians.per_gaussian else (
            f"{cfg.gaussians.pg_steps} steps, {int(stage.movable.sum())} of {stage.movable.numel()} Gaussians movable"),
        "timings": timings,
        "outputs": outputs,
        "config": config_to_dict(cfg),
    }
    atomic_write_json(out / "summary.json", summary)
    print_summary(summary)
    return summary


def print_summary(summary: dict) -> None:
    def fmt(m):
        lp = "n/a" if m.get("lpips") is None else f"{m['lpips']:.4f}"
        return f"PSNR {m['psnr']:6.2f} dB  SSIM {m['ssim']:.4f}  LPIPS {lp}"

    unseen = summary["unseen_views"]
    print("\n[demo] results on the %d unseen views of subject %s (%dx%d):" % (
        summary["num_unseen_views"], summary["test_subject"], *summary["image_size"]))
    print("  baselines (at the subject's FLAME points):")
    for name, label in (("template", "template alone     "), ("decoder_mean_w", "decoder, mean W    ")):
        print(f"    {label} {fmt(unseen[name])}")
    photo = summary.get("photo_mode")
    if photo is not None:
        print("  from a plain photo (camera-free: no camera, mask or points; aligned to the subject by Procrustes):")
        for name, label in (("photo_w_mlp", "photo, W/MLP fit   "), ("photo", "photo mode         ")):
            print(f"    {label} {fmt(unseen[name])}")
        print(f"    camera: PnP rotation error {photo['pnp_rotation_error_deg']:.1f} deg "
              f"(refined {photo['refined_rotation_error_deg']:.1f}); photo beats template: "
              f"{summary['photo_beats_template_psnr']}")
    print("  from the calibrated view (its camera and the subject's points):")
    for name, label in (("fit", "W/MLP fit          "), ("final", "+ per-Gaussian     ")):
        print(f"    {label} {fmt(unseen[name])}")
    print(f"    fit beats template: {summary['fit_beats_template_psnr']}")
    print("[demo] outputs:")
    for key, value in summary["outputs"].items():
        print(f"  {key:15s} {value}")
    print(f"[demo] total {summary['timings']['total_s']:.0f} s  " + json.dumps(
        {k: round(v, 1) for k, v in summary["timings"].items()}))
