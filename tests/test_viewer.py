"""The viser web viewer: serves its page on loopback, holds the splats, sliders drive the rig."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from fastavatar.animate import build_rig
from fastavatar.flame import flame_forward
from fastavatar.flame.points import triangle_centres
from fastavatar.apps.viewer import SplatViewer, ViewerConfig, splats_to_viser
from flame_fixtures import make_tiny_flame, random_params, splats_on_mesh

pytest.importorskip("viser")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head():
    model = make_tiny_flame()
    params = random_params(model, seed=21)
    src = flame_forward(model, **params).vertices[0]
    splats = splats_on_mesh(src, model.faces)
    rig = build_rig(model, splats, params, anchors=triangle_centres(src, model.faces))
    return splats, rig


def _get(url: str, deadline: float = 10.0):
    start = time.time()
    while True:
        try:
            return urllib.request.urlopen(url, timeout=2.0)
        except (urllib.error.URLError, ConnectionError):
            if time.time() - start > deadline:
                raise
            time.sleep(0.1)


def test_splats_to_viser_arrays(head):
    splats, _ = head
    arrays = splats_to_viser(splats)
    n = splats["means"].shape[0]
    assert arrays["centers"].shape == (n, 3) and arrays["covariances"].shape == (n, 3, 3)
    assert arrays["rgbs"].shape == (n, 3) and arrays["opacities"].shape == (n, 1)
    # covariance = R diag(s^2) R^T: symmetric, eigenvalues are the squared scales
    eig = np.sort(np.linalg.eigvalsh(arrays["covariances"].astype(np.float64)), axis=1)
    expected = np.sort(np.exp(2 * splats["scales"].double().numpy()), axis=1)
    assert np.allclose(eig, expected, rtol=1e-4)
    assert arrays["rgbs"].min() >= 0 and arrays["rgbs"].max() <= 1


def test_viewer_serves_page_and_holds_splats(head):
    splats, rig = head
    port = _free_port()
    viewer = SplatViewer(splats, rig, ViewerConfig(host="127.0.0.1", port=port)).start()
    try:
        assert viewer.port == port
        with _get(f"http://127.0.0.1:{port}/") as resp:  # closed, so the server can stop promptly
            body = resp.read().decode("utf-8", "replace").lower()
            status, ctype = resp.status, resp.headers.get("Content-Type", "")
        assert status == 200 and "text/html" in ctype
        assert "<html" in body
        assert viewer.num_gaussians == splats["means"].shape[0]
        # sliders drive the rig: opening the jaw moves Gaussians, neutral puts them back at rest
        before = np.asarray(viewer.handle.centers).copy()
        updates = viewer.updates
        viewer.sliders["jaw"].value = 0.4
        assert viewer.updates > updates
        moved = np.asarray(viewer.handle.centers)
        assert np.abs(moved - before).max() > 1e-3
        viewer.sliders["jaw"].value = 0.0
        assert np.allclose(np.asarray(viewer.handle.centers), rig.rest["means"].float().numpy(), atol=1e-6)
    finally:
        viewer.stop()
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2.0)


def test_viewer_without_rig_has_no_sliders(head):
    splats, _ = head
    viewer = SplatViewer({k: v.clone() for k, v in splats.items()}, None, ViewerConfig(port=_free_port())).start()
    try:
        assert viewer.num_gaussians == splats["means"].shape[0] and viewer.sliders == {}
        assert torch.allclose(torch.from_numpy(np.asarray(viewer.handle.centers)), splats["means"])
    finally:
        viewer.stop()


def test_viewer_starting_at_source_shows_the_reconstruction(head):
    splats, rig = head
    viewer = SplatViewer(splats, rig, ViewerConfig(port=_free_port(), start_at_source=True)).start()
    try:
        shown = torch.from_numpy(np.asarray(viewer.handle.centers)).float()
        assert torch.allclose(shown, splats["means"], atol=1e-5)
    finally:
        viewer.stop()


def test_view_command_options_come_from_the_dataclasses():
    from pathlib import Path

    from fastavatar.apps.viewer import ViewCommandConfig, ViewerConfig
    from fastavatar.config import parse_config

    cfg = parse_config(ViewCommandConfig, ["head.ply", "--port", "9001", "--no_rig"])
    assert cfg.path == Path("head.ply") and cfg.no_rig and cfg.viewer == ViewerConfig(port=9001)
    with pytest.raises(SystemExit):
        parse_config(ViewCommandConfig, ["--port", "9001"])  # the PLY is required
