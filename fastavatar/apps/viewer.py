"""Local web viewer for a splats.ply (viser), with live FLAME controls when a rig is present.

``python scripts/view.py out/splats.ply`` serves http://127.0.0.1:8080 (viser ships its web client,
nothing is fetched from the internet). The browser does the splat rendering; colours sent to it are
the view-independent SH DC term (band 0). With a rig (``rig.npz`` beside the PLY or ``--rig``),
GUI sliders drive the first expression coefficients, jaw opening and head yaw/pitch/roll through
the blendshape rig (:func:`fastavatar.animate.evaluate_rig`), and the splats update live.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from fastavatar.config import option, parse_config
from fastavatar.core.splats import Splats, activate, sh0_to_rgb


@dataclass
class ViewerConfig:
    """Viewer options."""

    host: str = option("127.0.0.1", "bind address (loopback by default; use 0.0.0.0 to share on a LAN)")
    port: int = option(8080, "HTTP/websocket port")
    num_expr_sliders: int = option(10, "expression coefficients exposed as sliders")
    expr_range: float = option(3.0, "slider range ± for expression coefficients")
    jaw_max: float = option(0.6, "radians, jaw slider maximum")
    head_max: float = option(0.8, "radians, head yaw/pitch/roll slider range ±")
    start_at_source: bool = option(False, "sliders act on top of the source frame's pose/expression (else on neutral)")


def front_view(splats: Splats, rig=None, start_at_source: bool = False):
    """(camera position [3], look-at [3], up [3]) facing the displayed head, in world coordinates.

    FLAME faces +z with y up. The viewer shows the rig's rest pose (facing +z) when a rig drives it from
    neutral; otherwise the PLY as reconstructed, whose facing is the rig's source-frame global rotation
    applied to +z (without a rig: +z, FLAME's convention). The distance is 8 head radii (RMS distance of
    the means from their centre; 0.8 m for a life-size head).
    """
    from fastavatar.core.cameras import axis_angle_to_matrix

    means = splats["means"].detach().double().cpu()
    shown_rest = rig is not None and not start_at_source
    centre = (rig.rest["means"].detach().double().cpu() if shown_rest else means).mean(0)
    rot = torch.eye(3, dtype=torch.float64)
    if rig is not None and not shown_rest and "rotation" in rig.source:
        rot = axis_angle_to_matrix(rig.source["rotation"].detach().double().cpu().reshape(3))
    radius = float((means - means.mean(0)).norm(dim=-1).pow(2).mean().sqrt())
    forward, up = rot @ torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64), rot @ torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    position = centre + forward * 8.0 * max(radius, 1e-3)
    return position.numpy(), centre.numpy(), up.numpy()


def splats_to_viser(splats: Splats) -> Dict[str, np.ndarray]:
    """Raw splats -> viser arrays: centers [N,3], covariances [N,3,3], rgbs [N,3] (0..1), opacities [N,1]."""
    from fastavatar.core.rotations import quat_to_matrix

    act = activate({k: v.detach().float().cpu() for k, v in splats.items()})
    rot = quat_to_matrix(act["quats"])
    cov = rot @ torch.diag_embed(act["scales"] ** 2) @ rot.transpose(-1, -2)
    rgb = sh0_to_rgb(splats["sh0"].detach().float().cpu()[:, 0]).clamp(0.0, 1.0)
    return {
        "centers": act["means"].numpy().astype(np.float32),
        "covariances": cov.numpy().astype(np.float32),
        "rgbs": rgb.numpy().astype(np.float32),
        "opacities": act["opacities"][:, None].numpy().astype(np.float32),
    }


def check_listen_address(host: str, port: int) -> None:
    """Raise ValueError (one line naming the flag) unless ``host:port`` can be listened on now.

    viser reports a bad host or port only inside its server thread (and then waits forever), and
    silently moves to the next port when the asked one is in use; so we check first."""
    import ipaddress
    import socket

    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"--port {port}: must be 0..65535 (0 picks a free port)")
    looks_numeric = host.replace(".", "").isdigit() or ":" in host
    if looks_numeric:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"--host {host}: not a valid IP address") from None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise ValueError(f"--host {host}: cannot resolve it ({exc.args[-1] if exc.args else exc})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            raise ValueError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc})") from None


class SplatViewer:
    """A viser server showing one Gaussian head; optional rig sliders."""

    def __init__(self, splats: Splats, rig=None, cfg: ViewerConfig = ViewerConfig()):
        self.cfg = cfg
        self.splats = splats
        self.rig = rig.to(torch.float32) if rig is not None else None
        self.server = None
        self.handle = None
        self.sliders: Dict[str, object] = {}
        self._lock = threading.Lock()
        self._packed = None  # the rig packed for evaluate_rig, on first use
        self.updates = 0  # number of live re-evaluations (for tests/diagnostics)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "SplatViewer":
        import viser

        check_listen_address(self.cfg.host, self.cfg.port)
        self.server = viser.ViserServer(host=self.cfg.host, port=self.cfg.port, verbose=False)
        if self.cfg.port and int(self.server.get_port()) != self.cfg.port:  # viser moved on to a free port
            moved = self.server.get_port()
            self.stop()
            raise ValueError(f"--port {self.cfg.port}: in use (viser would have moved to {moved}); pick another port")
        self.server.scene.set_up_direction("+y")  # FLAME/VHAP world: y up, face towards +z
        self.view = front_view(self.splats, self.rig, self.cfg.start_at_source)
        position, look_at, up = (tuple(float(c) for c in v) for v in self.view)
        try:  # "Reset View" target (and the first view, when the client applies it after the scene's up direction)
            self.server.initial_camera.position = position
            self.server.initial_camera.look_at = look_at
            self.server.initial_camera.up = up
        except AttributeError:  # older viser
            pass

        def face_the_head(client) -> None:
            """Each new client's own camera, set after it has the scene (and its up-direction rotation): the
            initial camera alone can be applied before that rotation, which left the camera behind the head."""
            client.camera.up_direction = up
            client.camera.position = position
            client.camera.look_at = look_at

        self._on_connect = face_the_head
        self.server.on_client_connect(face_the_head)
        arrays = splats_to_viser(self.splats)
        self.handle = self.server.scene.add_gaussian_splats("/head", **arrays)
        self.server.gui.add_markdown(f"**{arrays['centers'].shape[0]} Gaussians**")
        if self.rig is not None:
            self._add_rig_gui()
        return self

    @property
    def port(self) -> int:
        return int(self.server.get_port()) if self.server is not None else self.cfg.port

    @property
    def num_gaussians(self) -> int:
        """Gaussians currently held by the scene handle."""
        return int(np.asarray(self.handle.centers).shape[0]) if self.handle is not None else 0

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    # ------------------------------------------------------------------ rig controls
    def _add_rig_gui(self) -> None:
        cfg, rig = self.cfg, self.rig
        gui = self.server.gui
        source = rig.source if cfg.start_at_source else {}
        expr0 = source.get("expr", torch.zeros(1, rig.num_expr)).reshape(-1)
        with gui.add_folder("Expression"):
            for k in range(min(cfg.num_expr_sliders, rig.num_expr)):
                init = float(expr0[k]) if k < expr0.numel() else 0.0
                init = max(-cfg.expr_range, min(cfg.expr_range, init))
                self.sliders[f"expr{k}"] = gui.add_slider(f"expr {k}", -cfg.expr_range, cfg.expr_range, 0.05, init)
        with gui.add_folder("Pose"):
            self.sliders["jaw"] = gui.add_slider("jaw open", 0.0, cfg.jaw_max, 0.01, 0.0)
            for name in ("yaw", "pitch", "roll"):
                self.sliders[name] = gui.add_slider(f"head {name}", -cfg.head_max, cfg.head_max, 0.01, 0.0)
        reset = gui.add_button("Neutral")

        @reset.on_click
        def _(_event) -> None:
            for slider in self.sliders.values():
                slider.value = 0.0

        for slider in self.sliders.values():
            slider.on_update(lambda _event: self.refresh())
        self.refresh()

    def slider_params(self) -> Dict[str, torch.Tensor]:
        """Current slider values as VHAP frame parameters (on top of the source frame if start_at_source)."""
        rig = self.rig
        base = {k: v.reshape(1, -1).float().clone() for k, v in rig.source.items()} if self.cfg.start_at_source else {}
        expr = torch.zeros(1, rig.num_expr)
        if "expr" in base:
            width = min(rig.num_expr, base["expr"].shape[1])
            expr[:, :width] = base["expr"][:, :width]
        for k in range(min(self.cfg.num_expr_sliders, rig.num_expr)):
            expr[0, k] = float(self.sliders[f"expr{k}"].value)
        rotation = torch.tensor([[float(self.sliders["pitch"].value), float(self.sliders["yaw"].value),
                                  float(self.sliders["roll"].value)]])
        jaw = torch.tensor([[float(self.sliders["jaw"].value), 0.0, 0.0]])
        params = dict(base)
        params["expr"] = expr
        params["rotation"] = base.get("rotation", torch.zeros(1, 3)) + rotation
        params["jaw_pose"] = base.get("jaw_pose", torch.zeros(1, 3)) + jaw
        return params

    def set_params(self, params: Dict[str, torch.Tensor]) -> None:
        """Drive the rig with ``params`` and push the new splats to the scene."""
        from fastavatar.animate.blendshapes import evaluate_rig, pack_rig

        with self._lock, torch.no_grad():
            if self._packed is None:
                self._packed = pack_rig(self.rig)
            splats = evaluate_rig(self._packed, params, rotate_colours=False)  # viewer shows DC colour only
            self.handle.set_gaussians(**splats_to_viser(splats))
            self.updates += 1

    def refresh(self) -> None:
        if self.rig is not None and self.handle is not None:
            self.set_params(self.slider_params())


def serve(splats: Splats, rig=None, cfg: ViewerConfig = ViewerConfig(), block: bool = True) -> SplatViewer:
    """Start the viewer; with ``block`` wait until Ctrl-C, then stop the server."""
    viewer = SplatViewer(splats, rig, cfg).start()
    print(f"viewer: http://{cfg.host}:{viewer.port}  ({viewer.num_gaussians} Gaussians"
          f"{', rig sliders on' if rig is not None else ''}); Ctrl-C to stop")
    if block:
        import signal
        import time

        def _stop(_signum, _frame):
            raise KeyboardInterrupt

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _stop)  # `kill` stops it cleanly too, like Ctrl-C
        try:
            while True:
                time.sleep(1.0)
        except KeyboardInterrupt:
            pass
        finally:
            viewer.stop()
    return viewer


def locate_rig(ply_path, rig_path=None):
    """``rig_path`` if given, else ``rig.npz`` beside the PLY when it exists, else None."""
    if rig_path is not None:
        return Path(rig_path)
    candidate = Path(ply_path).with_name("rig.npz")
    return candidate if candidate.is_file() else None


@dataclass(kw_only=True)
class ViewCommandConfig:
    """``scripts/view.py``."""

    path: Path = option(help="splats PLY (standard 3DGS layout)", positional=True)
    rig: Optional[Path] = option(None, "rig.npz (default: rig.npz beside the PLY, if present)")
    no_rig: bool = option(False, "ignore a rig beside the PLY")
    viewer: ViewerConfig = option(ViewerConfig(), "viewer options")


def view_main(argv: Optional[Sequence[str]] = None, description: str = "") -> int:
    """CLI of ``scripts/view.py``: serve until Ctrl-C; errors are one line on stderr (exit code 2)."""
    from fastavatar.animate.rig import load_rig, run_rig_script
    from fastavatar.io.ply import load_ply

    def run() -> int:
        cfg = parse_config(ViewCommandConfig, argv, description=description)
        splats = load_ply(cfg.path)
        rig_path = None if cfg.no_rig else locate_rig(cfg.path, cfg.rig)
        rig = load_rig(rig_path, num_gaussians=splats["means"].shape[0]) if rig_path is not None else None
        serve(splats, rig, cfg.viewer, block=True)
        return 0

    return run_rig_script(run)


__all__: List[str] = ["ViewerConfig", "ViewCommandConfig", "SplatViewer", "check_listen_address", "front_view", "serve",
                      "splats_to_viser", "locate_rig", "view_main"]
