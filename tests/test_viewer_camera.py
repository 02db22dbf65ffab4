"""The viewer opens facing the face: camera in front of the displayed head, for every client."""

from __future__ import annotations

import socket
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fastavatar.animate import build_rig
from fastavatar.apps.viewer import SplatViewer, ViewerConfig, front_view
from fastavatar.flame import flame_forward
from flame_fixtures import make_tiny_flame, splats_on_mesh

pytest.importorskip("viser")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _eyes_and_back(model, params):
    """World positions of the eye joints (the face) and of the back of the head for FLAME(params)."""
    out = flame_forward(model, **params)
    eyes = out.joints[0, 3:5].mean(0)
    verts = out.vertices[0]
    centre = verts.mean(0)
    back = centre - (eyes - centre)  # the point opposite the eyes through the head centre
    return eyes, back


@pytest.mark.parametrize("yaw", [0.0, 1.4, -2.5])
def test_front_view_faces_the_face(yaw):
    model = make_tiny_flame()
    params = {"rotation": torch.tensor([[0.0, yaw, 0.0]], dtype=torch.float64)}
    src = flame_forward(model, **params).vertices[0]
    splats = splats_on_mesh(src, model.faces)
    rig = build_rig(model, splats, params, rest_mode="mesh")
    eyes, back = _eyes_and_back(model, params)
    eyes0, back0 = _eyes_and_back(model, {})
    for shown, rig_arg, at_source, (e, b) in (("source", rig, True, (eyes, back)), ("rest", rig, False, (eyes0, back0))):
        position, look_at, up = (torch.as_tensor(v) for v in front_view(splats, rig_arg, at_source))
        # the face (eyes) is nearer the camera than the back of the head, by most of the head's depth
        assert (position - e).norm() < (position - b).norm() - 0.05, (shown, yaw)
        view = torch.nn.functional.normalize(look_at - position, dim=0)
        # looking at the face: within 25 deg of the centre-to-eyes direction (the eyes sit 19 deg above the centre here)
        assert float(view @ torch.nn.functional.normalize(e - b, dim=0)) < -0.9
        assert abs(float(up @ view)) < 1e-6 and up[1] > 0.1  # upright (head y up)


def test_viewer_sets_initial_and_per_client_cameras_in_front():
    model = make_tiny_flame()
    splats = splats_on_mesh(flame_forward(model).vertices[0], model.faces)
    viewer = SplatViewer(splats, None, ViewerConfig(port=_free_port())).start()
    try:
        eyes, back = _eyes_and_back(model, {})
        initial = torch.as_tensor(np.asarray(viewer.server.initial_camera.position), dtype=torch.float64)
        assert (initial - eyes).norm() < (initial - back).norm() - 0.05
        # a connecting client gets its own camera set in world coordinates (after the scene's up direction)
        client = SimpleNamespace(camera=SimpleNamespace(position=None, look_at=None, up_direction=None))
        viewer._on_connect(client)
        assert np.allclose(client.camera.position, viewer.server.initial_camera.position)
        assert np.allclose(client.camera.look_at, viewer.server.initial_camera.look_at)
        assert np.allclose(client.camera.up_direction, (0.0, 1.0, 0.0))
    finally:
        viewer.stop()
