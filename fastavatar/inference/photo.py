"""Camera-free photo mode: any photo with a face -> a refined Gaussian head, with no calibration.

Stages (each timed in ``summary.json``):

1. **face**: detection (largest face), 468 landmarks (:mod:`fastavatar.face.landmarks`);
2. **init**: W and geometry. With the official weights on disk: the W encoder's W (needs the
   insightface ``buffalo_l`` models) and the DINO tracker's points and pose. Without them: the
   decoder's mean W and the decoder template's points. The run says which it used;
3. **camera**: head pose and focal by PnP of the template landmarks (placed on the chosen points)
   against the photo's landmarks (:mod:`fastavatar.face.pose`); the tracker's pose, when present,
   is reported as a cross-check (angle between the two);
4. **framing**: the photo cropped and scaled like the training views and composited on white with
   the matte of the framed image (:mod:`fastavatar.face.framing`);
5. **refinement against the photo**: the camera (its rotation by default; position and focal on
   request; photometric + landmark terms),
   then W, then the hypernetwork (:func:`fastavatar.inference.refine.fit_to_views`), then the
   per-Gaussian stage (:func:`fastavatar.inference.per_gaussian.refine_gaussians`).

Outputs per photo (``<output_dir>/<photo stem>/``): ``input.png`` (framed photo on white),
``matte.png``, ``initial/splats.ply`` and ``final/splats.ply``, ``input_vs_render.png`` (photo |
initial | final), ``ring.png`` (novel views), ``turntable.gif``, ``camera.json``, ``w_*.npy``,
``summary.json``. The resolved config is saved once in ``output_dir``.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Literal, Optional

import numpy as np
import torch

from fastavatar.config import config_to_dict, option, save_config
from fastavatar.core.cameras import project_points
from fastavatar.core.splats import Splats, detach_splats
from fastavatar.face.embedding import FaceError
from fastavatar.face.framing import FramedPhoto, frame_photo
from fastavatar.face.images import ImageError, LoadedImage, list_images, load_rgb
from fastavatar.face.pose import estimate_camera, rotation_error_deg, yaw_pitch_roll_deg
from fastavatar.inference.per_gaussian import PerGaussianConfig, refine_gaussians
from fastavatar.inference.refine import FitConfig, fit_to_views, mean_w
from fastavatar.io.atomic import atomic_save_image, atomic_write_json
from fastavatar.runtime import progress, resolve_device, seed_everything


@dataclass
class CameraFitConfig:
    """The camera stage: PnP, then photometric + landmark refinement of the rotation (and, on request, the
    position and focal)."""

    focal: float = option(0.0, "photo focal length in pixels when known (0: estimate it by PnP)")
    camera_steps: int = option(20, "camera refinement steps against the photo, before W (0: keep the PnP camera)")
    camera_lr: float = option(1e-3, "camera refinement learning rate (radians / metres / log-focal units)")
    camera_rotation: bool = option(True, "refine the camera's rotation (about its centre)")
    camera_translation: bool = option(
        False, "also refine its position (off by default: on the bundled leave-one-out photos it cost 0.5 dB "
               "on unseen views, pulling the template's silhouette onto the person's)")
    camera_focal: bool = option(False, "also refine the focal length (off by default: it cost 0.2 dB there)")
    landmark_weight: float = option(
        0.05, "weight of the landmark reprojection term (mean error / image height) in the camera stage: keeps the "
              "photometric term from drifting the pose while letting it correct PnP")


@dataclass
class PhotoConfig:
    """Camera-free mode of ``scripts/inference_feedforward_full_guidance.py`` (``--image``)."""

    image: str = option("", "photo file or folder of photos (camera-free mode, instead of --data_root/--sample_id)")
    encoder_checkpoint: str = option("pretrained_weights/encoder_neutral_flame.pth",
                                     "W encoder checkpoint (optional: its W initialises the head; '': none)")
    decoder_checkpoint: str = option("pretrained_weights/decoder_neutral_flame.pth", "decoder checkpoint (required)")
    dino_checkpoint: str = option("pretrained_weights/dino_encoder.pth",
                                  "DINO tracker checkpoint (optional: its points and pose initialise the head; '': none)")
    insightface_root: str = option("", "insightface buffalo_l folder (for the encoder's W)")
    template_landmarks: str = option("", "template landmark file (default: the one shipped in fastavatar/face/assets)")
    camera: CameraFitConfig = option(CameraFitConfig(), "camera stage")
    fit: FitConfig = option(FitConfig(), "W then hypernetwork refinement (official: 150 W steps, then 150 MLP steps)")
    gaussians: PerGaussianConfig = option(
        PerGaussianConfig(), "per-Gaussian stage after W and the hypernetwork (its flags start with pg_; "
                             "--no-per_gaussian turns it off), as in the calibrated mode")
    lpips_net: Literal["alex", "vgg"] = option("alex", "LPIPS trunk for the losses")
    image_scale: float = option(1.0, "render size as a fraction of the training views' 550x802")
    ring_views: int = option(8, "novel views in ring.png (a +-60 degree arc around the head)")
    turntable_frames: int = option(36, "frames of turntable.gif (0: skip)")
    output_dir: str = option("results/photo", "output folder (one subfolder per photo)")
    device: str = option("auto", "auto, cpu or cuda")
    seed: int = option(42, "random seed")


class PhotoModeError(ValueError):
    """A photo cannot be reconstructed; the message is one line."""


@dataclass
class Initialisation:
    w: torch.Tensor  # [1, 512]
    points: torch.Tensor  # [N, 3]
    w_source: str  # "encoder" or "mean_w (<why>)"
    points_source: str  # "tracker" or "template (<why>)"
    tracker_c2w: Optional[np.ndarray] = None  # [4,4] the tracker's pose, when it ran


# ---------------------------------------------------------------------------------------------- stages
def initialise(cfg: PhotoConfig, decoder, w_vectors, image: LoadedImage, device: torch.device) -> Initialisation:
    """W and points: the official encoder / tracker when their files load, else the mean W / template points."""
    w, w_source = None, ""
    encoder_path = Path(cfg.encoder_checkpoint) if cfg.encoder_checkpoint else None  # "": none (e.g. the demo)
    if encoder_path is not None and encoder_path.is_file():
        from fastavatar.io.checkpoints import load_w_encoder

        # a given checkpoint that does not load is an error (never a silent fallback); missing face models are not
        encoder = load_w_encoder(encoder_path, device)
        try:
            from fastavatar.face.embedding import FaceEmbedder

            embedder = FaceEmbedder(cfg.insightface_root or None, device=device.type)
            embedding = embedder.embed_loaded(image).embedding
            with torch.no_grad():
                w = encoder(torch.as_tensor(np.asarray(embedding, dtype=np.float32), device=device)[None])
            w_source = "encoder"
        except Exception as exc:  # missing buffalo_l, no face for insightface, ...: fall back, and say why
            w_source = f"mean_w ({_first_line(exc)})"
    else:
        w_source = f"mean_w (no W-encoder checkpoint {'given' if encoder_path is None else f'at {encoder_path}'})"
    if w is None:
        w = mean_w(w_vectors, decoder.config.w_dim).to(device)
    points, points_source, tracker_c2w = None, "", None
    dino_path = Path(cfg.dino_checkpoint) if cfg.dino_checkpoint else None
    if dino_path is not None and dino_path.is_file():
        from fastavatar.face.tracker_input import preprocess_for_tracker
        from fastavatar.io.checkpoints import load_tracker

        tracker = load_tracker(dino_path, device)
        with torch.no_grad():
            pred = tracker(preprocess_for_tracker(image.rgb)[None].to(device))
        points = pred["points"][0].float()
        if points.shape[0] != decoder.num_gaussians:
            raise PhotoModeError(f"{dino_path}: tracker predicts {points.shape[0]} points, the decoder has "
                                 f"{decoder.num_gaussians} Gaussians")
        tracker_c2w = pred["camera_pose"][0].detach().cpu().double().numpy()
        points_source = "tracker"
    else:
        points_source = f"template (no tracker checkpoint {'given' if dino_path is None else f'at {dino_path}'})"
    if points is None:
        points = decoder.template_means.detach().float()
    return Initialisation(w=w.detach().reshape(1, -1), points=points.to(device), w_source=w_source,
                          points_source=points_source, tracker_c2w=tracker_c2w)


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def camera_c2w_K(base_c2w: torch.Tensor, base_K: torch.Tensor, rot: torch.Tensor, trans: torch.Tensor,
                 log_focal: torch.Tensor):
    """A camera perturbed in its own frame: c2w = base_c2w @ [R(rot) | trans], focal scaled by exp(log_focal)."""
    zero = torch.zeros((), dtype=rot.dtype, device=rot.device)
    skew = torch.stack([torch.stack([zero, -rot[2], rot[1]]), torch.stack([rot[2], zero, -rot[0]]),
                        torch.stack([-rot[1], rot[0], zero])])
    # matrix_exp is differentiable at rot = 0 (Rodrigues with a small-angle switch has zero gradient there)
    top = torch.cat([torch.linalg.matrix_exp(skew), trans[:, None]], dim=1)  # [3, 4]
    bottom = torch.tensor([[0.0, 0.0, 0.0, 1.0]], dtype=base_c2w.dtype, device=base_c2w.device)
    c2w = base_c2w @ torch.cat([top, bottom], dim=0)
    scale = torch.exp(log_focal)
    K = torch.stack([torch.stack([base_K[0, 0] * scale, base_K[0, 1], base_K[0, 2]]),
                     torch.stack([base_K[1, 0], base_K[1, 1] * scale, base_K[1, 2]]),
                     base_K[2]])
    return c2w, K


def refine_camera(splats: Splats, target: torch.Tensor, c2w: torch.Tensor, K: torch.Tensor, width: int, height: int,
                  landmarks_3d: torch.Tensor, landmarks_2d: torch.Tensor, cfg: PhotoConfig, lpips_model=None,
                  show_progress: bool = True):
    """Adam on a camera-frame rotation and, when ``cfg.camera`` says so, translation and log-focal, so the
    (fixed) splats' render and the landmark projections match the framed photo. Returns (c2w [4,4], K [3,3],
    losses)."""
    from fastavatar.losses import photometric_loss
    from fastavatar.render import render_splats

    device = target.device
    cam_cfg, fit = cfg.camera, cfg.fit
    rot = torch.zeros(3, device=device, requires_grad=cam_cfg.camera_rotation)
    trans = torch.zeros(3, device=device, requires_grad=cam_cfg.camera_translation)
    log_focal = torch.zeros((), device=device, requires_grad=cam_cfg.camera_focal)
    fixed = detach_splats(splats)
    losses: List[float] = []
    free = [p for p in (rot, trans, log_focal) if p.requires_grad]
    if cam_cfg.camera_steps <= 0 or not free:
        return c2w, K, losses
    # metres and radians move the image by similar amounts at ~1 m: one learning rate for both
    optimizer = torch.optim.Adam(free, lr=cam_cfg.camera_lr)
    for _ in progress(range(cam_cfg.camera_steps), show_progress, desc="fit camera", leave=False):
        c2w_i, K_i = camera_c2w_K(c2w, K, rot, trans, log_focal)
        rgb = render_splats(fixed, c2w_i, K_i, width, height, sh_degree=fit.sh_degree, backend=fit.render_backend).rgb
        parts = photometric_loss(rgb, target[None], fit.l1_weight, fit.ssim_weight, fit.lpips_weight, lpips_model)
        lm = (project_points(landmarks_3d, c2w_i, K_i) - landmarks_2d).norm(dim=1).mean() / height
        loss = parts["total"] + cam_cfg.landmark_weight * lm
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    with torch.no_grad():
        c2w_f, K_f = camera_c2w_K(c2w, K, rot, trans, log_focal)
    return c2w_f.detach(), K_f.detach(), losses


def per_gaussian_stage(cfg: PhotoConfig, splats: Splats, image: torch.Tensor, c2w: torch.Tensor, K: torch.Tensor,
                       width: int, height: int, template_points: torch.Tensor, lpips_model, show_progress: bool):
    """The per-Gaussian stage (:func:`fastavatar.inference.per_gaussian.refine_gaussians`) on the framed photo,
    with the run's view-dependent-colour choice, SH degree and renderer. Returns (splats, seconds, note)."""
    g = cfg.gaussians
    if not g.per_gaussian or g.pg_steps <= 0:
        return splats, 0.0, "off"
    result = refine_gaussians(splats, image[None], c2w[None], K[None], width, height, g,
                              template_points=template_points, lpips_model=lpips_model, show_progress=show_progress,
                              keep_view_dependent=cfg.fit.keep_view_dependent, sh_degree=cfg.fit.sh_degree,
                              render_backend=cfg.fit.render_backend)
    return result.splats, result.seconds, f"{g.pg_steps} steps, {int(result.movable.sum())} Gaussians movable"


# ---------------------------------------------------------------------------------------------- outputs
@torch.no_grad()
def render_image(splats: Splats, c2w: torch.Tensor, K: torch.Tensor, width: int, height: int, backend: str) -> np.ndarray:
    """[H,W,3] uint8 render on white."""
    from fastavatar.render import render_splats

    rgb = render_splats(splats, c2w, K, width, height, backend=backend).rgb[0]
    return (rgb.clamp(0, 1).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)


def head_orbit(c2w: torch.Tensor, target: torch.Tensor, num: int, max_deg: float) -> torch.Tensor:
    """[num,4,4] cameras on an arc (``max_deg`` < 180) or ring (180) around ``target`` through ``c2w``."""
    from fastavatar.core.cameras import orbit_cameras

    return orbit_cameras(c2w.cpu().float(), target.cpu().float(), num, max_azimuth_deg=max_deg)


def write_views(splats: Splats, c2w: torch.Tensor, K: torch.Tensor, width: int, height: int, out: Path,
                cfg: PhotoConfig) -> Dict[str, str]:
    """ring.png (novel views on a +-60 degree arc) and turntable.gif (360 degrees)."""
    import imageio.v2 as imageio

    from fastavatar.io.atomic import atomic_path

    written = {}
    target = splats["means"].detach().mean(0)
    dev = splats["means"].device
    if cfg.ring_views > 0:
        poses = head_orbit(c2w, target, cfg.ring_views, 60.0)
        tiles = [render_image(splats, p.to(dev), K, width, height, cfg.fit.render_backend) for p in poses]
        atomic_save_image(out / "ring.png", np.concatenate(tiles, axis=1))
        written["ring"] = str(out / "ring.png")
    if cfg.turntable_frames > 0:
        poses = head_orbit(c2w, target, cfg.turntable_frames, 180.0)
        frames = [render_image(splats, p.to(dev), K, width, height, cfg.fit.render_backend) for p in poses]
        path = out / "turntable.gif"
        with atomic_path(path, suffix=".gif") as tmp:
            imageio.mimsave(tmp, frames, format="GIF", duration=1.0 / 12, loop=0)
        written["turntable"] = str(path)
    return written


# ---------------------------------------------------------------------------------------------- one photo
@dataclass
class PhotoReconstruction:
    """Everything one photo produced (returned to callers such as the protocol)."""

    splats: Splats  # final raw splats (template/tracker frame)
    initial_splats: Splats
    fit_splats: Splats  # after the camera, W and hypernetwork stages (before the per-Gaussian stage)
    c2w: torch.Tensor  # [4,4] refined camera of the framed photo
    K: torch.Tensor  # [3,3]
    pnp_c2w: np.ndarray  # [4,4] camera straight from PnP (before photometric refinement)
    framed: FramedPhoto
    width: int
    height: int
    summary: dict


def reconstruct_photo(cfg: PhotoConfig, path: Path, decoder, w_vectors, face_stage, template_landmarks,
                      lpips_model, device: torch.device, out: Optional[Path], show_progress: bool = True
                      ) -> PhotoReconstruction:
    """One photo -> refined head (see module docstring). Raises ImageError / FaceError / PhotoModeError."""
    from fastavatar.io.ply import save_ply

    timings: Dict[str, float] = {}
    t_all = time.perf_counter()
    t = time.perf_counter()
    image = load_rgb(path)
    obs = face_stage.analyse(image.rgb, str(path), with_matte=False)
    timings["face"] = time.perf_counter() - t
    for note in obs.warnings:
        print(f"[photo] warning: {note}")

    t = time.perf_counter()
    init = initialise(cfg, decoder, w_vectors, image, device)
    timings["init"] = time.perf_counter() - t
    print(f"[photo] {path.name}: W from {init.w_source}; points from {init.points_source}")

    t = time.perf_counter()
    stable = template_landmarks.stable
    X_all = template_landmarks.apply(init.points.detach().double().cpu()).numpy()
    h, w = image.rgb.shape[:2]
    try:
        cam = estimate_camera(obs.landmarks[stable, :2], X_all[stable], w, h, focal=cfg.camera.focal * image.scale or None)
    except ValueError as exc:
        raise PhotoModeError(f"{path}: {exc}") from None
    yaw, pitch, roll = yaw_pitch_roll_deg(cam.w2c)
    head = init.points.detach().double().mean(0).cpu().numpy()
    framed = frame_photo(image.rgb, cam, head, cfg.image_scale, matte_fn=face_stage.matte)
    width, height = framed.rgb.shape[1], framed.rgb.shape[0]
    A = framed.similarity
    lm2d = obs.landmarks[stable, :2] @ A[:, :2].T + A[:, 2]
    timings["camera_pnp_and_framing"] = time.perf_counter() - t
    tracker_check = None
    if init.tracker_c2w is not None:
        tracker_check = rotation_error_deg(cam.c2w[:3, :3], init.tracker_c2w[:3, :3])
        print(f"[photo] tracker pose vs PnP: {tracker_check:.1f} degrees apart")

    target = torch.from_numpy(framed.composite).to(device)
    c2w0 = torch.from_numpy(framed.c2w).float().to(device)
    K0 = torch.from_numpy(framed.K).float().to(device)
    with torch.no_grad():
        initial = detach_splats(decoder.decode(init.w, init.points)[0])

    t = time.perf_counter()
    c2w, K, cam_losses = refine_camera(initial, target, c2w0, K0, width, height,
                                       torch.from_numpy(X_all[stable]).float().to(device),
                                       torch.from_numpy(lm2d).float().to(device), cfg, lpips_model, show_progress)
    timings["camera_refine"] = time.perf_counter() - t

    t = time.perf_counter()
    fit = fit_to_views(decoder, init.w, init.points, target[None], c2w[None], K[None], width, height,
                       cfg.fit, lpips_model, show_progress=show_progress)
    timings["w"] = fit.seconds.get("w", 0.0)
    timings["mlp"] = fit.seconds.get("mlp", 0.0)
    timings["w_and_mlp_total"] = time.perf_counter() - t
    final, pg_seconds, pg_note = per_gaussian_stage(cfg, fit.splats, target, c2w, K, width, height,
                                                    decoder.template_means.detach(), lpips_model, show_progress)
    timings["per_gaussian"] = pg_seconds
    timings["photo_to_splats"] = time.perf_counter() - t_all

    refined_shift = rotation_error_deg(c2w.double().cpu().numpy()[:3, :3], framed.c2w[:3, :3])
    camera = {"pnp": {"c2w": cam.c2w.tolist(), "focal_px_photo": cam.focal, "reprojection_px": cam.reprojection_px,
                      "inliers": cam.inliers, "yaw_pitch_roll_deg": [yaw, pitch, roll]},
              "framed": {"c2w": c2w.cpu().tolist(), "K": K.cpu().tolist(), "width": width, "height": height,
                         "photo_to_framed_scale": framed.scale},
              "refinement_rotation_deg": refined_shift, "tracker_vs_pnp_deg": tracker_check}
    summary = {"photo": str(path), "photo_size": [w, h], "faces_found": obs.num_faces, "warnings": obs.warnings,
               "detection_score": obs.detection.score, "landmark_score": obs.landmark_score,
               "initialisation": {"w": init.w_source, "points": init.points_source,
                                  "camera": "PnP of the template landmarks"
                                            + (" (tracker pose as cross-check)" if tracker_check is not None else ""),
                                  "focal": "given" if cfg.camera.focal else "estimated (PnP focal sweep)"},
               "camera": camera, "per_gaussian": pg_note,
               "losses": {"camera_first_last": cam_losses[:1] + cam_losses[-1:],
                          "fit_first_last": fit.losses[:1] + fit.losses[-1:]},
               "timings_s": timings, "device": str(device)}
    print(f"[photo] {path.name}: PnP yaw {yaw:.0f} pitch {pitch:.0f} roll {roll:.0f} deg, focal {cam.focal:.0f} px, "
          f"landmark error {cam.reprojection_px:.1f} px; camera refined by {refined_shift:.1f} deg; "
          f"photo -> splats {timings['photo_to_splats']:.1f} s")
    if out is not None:
        t = time.perf_counter()
        out.mkdir(parents=True, exist_ok=True)
        atomic_save_image(out / "input.png", framed.composite)
        atomic_save_image(out / "matte.png", np.repeat(framed.matte[..., None], 3, axis=2))
        save_ply(out / "initial" / "splats.ply", initial)
        save_ply(out / "final" / "splats.ply", final)
        np.save(out / "w_initial.npy", init.w.cpu().numpy())
        np.save(out / "w_final.npy", fit.w.cpu().numpy())
        side = [(framed.composite * 255 + 0.5).astype(np.uint8),
                render_image(initial, c2w, K, width, height, cfg.fit.render_backend),
                render_image(final, c2w, K, width, height, cfg.fit.render_backend)]
        atomic_save_image(out / "input_vs_render.png", np.concatenate(side, axis=1))
        summary["outputs"] = write_views(final, c2w, K, width, height, out, cfg)
        atomic_write_json(out / "camera.json", camera)
        timings["outputs"] = time.perf_counter() - t
        atomic_write_json(out / "summary.json", summary)
    return PhotoReconstruction(splats=final, initial_splats=initial, fit_splats=fit.splats, c2w=c2w, K=K, pnp_c2w=cam.c2w, framed=framed,
                               width=width, height=height, summary=summary)


# ---------------------------------------------------------------------------------------------- entry
def photo_paths(image: str) -> List[Path]:
    """A file, or the images directly inside a folder (one-line errors otherwise)."""
    path = Path(image)
    if path.is_dir():
        files = list_images(path)
        if not files:
            raise PhotoModeError(f"{path}: folder holds no image files")
        return files
    if not path.exists():
        raise PhotoModeError(f"{path}: --image file not found")
    return [path]


def load_photo_decoder(cfg: PhotoConfig, device):
    """(decoder, w_vectors); a missing file is a one-line error naming it and where it goes."""
    from fastavatar.io.checkpoints import load_decoder

    path = Path(cfg.decoder_checkpoint)
    if not path.is_file():
        raise PhotoModeError(f"decoder checkpoint not found: {path} (put the official decoder_neutral_flame.pth in "
                             "pretrained_weights/, or pass --decoder_checkpoint runs/<decoder>/checkpoints/latest.pth "
                             "from scripts/train_decoder.py)")
    decoder, w_vectors, _ = load_decoder(path, device=device)
    return decoder, w_vectors


def run_photo_mode(cfg: PhotoConfig, decoder=None, w_vectors=None, show_progress: bool = True,
                   face_stage=None, template_landmarks=None) -> dict:
    """Reconstruct every photo of ``cfg.image``; a photo that fails is reported in one line and skipped.

    Returns {"photos": [per-photo summary], "failed": {path: reason}}; writes summary.json in output_dir."""
    from fastavatar.face.landmarks import FaceStage
    from fastavatar.face.template_landmarks import load_template_landmarks
    from fastavatar.losses import load_lpips

    if not cfg.image:
        raise PhotoModeError("camera-free mode needs --image PATH (a photo or a folder of photos)")
    paths = photo_paths(cfg.image)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    if decoder is None:
        decoder, w_vectors = load_photo_decoder(cfg, device)
    decoder = decoder.to(device).eval()
    face_stage = face_stage or FaceStage()
    template_landmarks = template_landmarks or load_template_landmarks(Path(cfg.template_landmarks)
                                                                       if cfg.template_landmarks else None)
    if template_landmarks.num_points != decoder.num_gaussians:
        raise PhotoModeError(f"template landmarks refer to {template_landmarks.num_points} points, the decoder has "
                             f"{decoder.num_gaussians} Gaussians")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    lpips_model = load_lpips(cfg.lpips_net, device)
    records, failed = [], {}
    names = _unique_stems(paths)
    for path, name in zip(paths, names):
        try:
            rec = reconstruct_photo(cfg, path, copy.deepcopy(decoder) if len(paths) > 1 else decoder, w_vectors,
                                    face_stage, template_landmarks, lpips_model, device, out / name, show_progress)
            records.append(rec.summary)
        except (ImageError, FaceError, PhotoModeError) as exc:
            print(f"[photo] skipped: {exc}")
            failed[str(path)] = str(exc)
    summary = {"photos": records, "failed": failed, "config": config_to_dict(cfg)}
    atomic_write_json(out / "summary.json", summary)
    if not records:
        raise PhotoModeError(f"no photo could be reconstructed ({len(failed)} failed; see the lines above)")
    return summary


def _unique_stems(paths: List[Path]) -> List[str]:
    seen: Dict[str, int] = {}
    out = []
    for p in paths:
        n = seen.get(p.stem, 0)
        seen[p.stem] = n + 1
        out.append(p.stem if n == 0 else f"{p.stem}_{n}")
    return out


def yaw_camera(c2w: torch.Tensor, target: torch.Tensor, degrees: float) -> torch.Tensor:
    """``c2w`` [4,4] orbited by ``degrees`` about its own up axis through ``target``."""
    from fastavatar.core.cameras import axis_angle_to_matrix, look_at_c2w

    up = -c2w[:3, 1]
    rot = axis_angle_to_matrix(up * math.radians(degrees))
    eye = target + rot @ (c2w[:3, 3] - target)
    return look_at_c2w(eye, target, up)
