import math

import torch

from fastavatar.core.cameras import axis_angle_to_matrix, c2w_to_w2c, look_at_c2w, opengl_to_opencv_c2w, orbit_cameras


def test_w2c_inverse():
    R = axis_angle_to_matrix(torch.tensor([0.3, -0.2, 0.5]))
    c2w = torch.eye(4)
    c2w[:3, :3] = R
    c2w[:3, 3] = torch.tensor([0.1, 0.2, 1.0])
    assert torch.allclose(c2w_to_w2c(c2w) @ c2w, torch.eye(4), atol=1e-6)


def test_look_at_points_forward_opencv():
    eye = torch.tensor([0.0, 0.0, -1.0])
    c2w = look_at_c2w(eye, torch.zeros(3), torch.tensor([0.0, 1.0, 0.0]))
    assert torch.allclose(c2w[:3, 2], torch.tensor([0.0, 0.0, 1.0]), atol=1e-6)  # +z forward
    assert torch.allclose(c2w[:3, 1], torch.tensor([0.0, -1.0, 0.0]), atol=1e-6)  # +y down = world down
    assert torch.allclose(torch.det(c2w[:3, :3]), torch.tensor(1.0), atol=1e-6)


def test_opengl_conversion_flips_y_z():
    gl = torch.eye(4)
    cv = opengl_to_opencv_c2w(gl)
    assert torch.allclose(cv[:3, :3], torch.diag(torch.tensor([1.0, -1.0, -1.0])))


def test_orbit_keeps_distance_and_starts_at_reference():
    ref = look_at_c2w(torch.tensor([0.3, -0.2, 1.1]), torch.zeros(3), torch.tensor([0.0, -1.0, 0.0]))
    poses = orbit_cameras(ref, torch.zeros(3), 8)
    assert poses.shape == (8, 4, 4)
    assert torch.allclose(poses[:, :3, 3].norm(dim=1), ref[:3, 3].norm().expand(8), atol=1e-5)
    assert torch.allclose(poses[0], ref, atol=1e-5)
    # every camera looks at the target
    to_target = -poses[:, :3, 3] / poses[:, :3, 3].norm(dim=1, keepdim=True)
    assert torch.allclose((poses[:, :3, 2] * to_target).sum(1), torch.ones(8), atol=1e-5)
    assert math.isclose(float(axis_angle_to_matrix(torch.zeros(3)).trace()), 3.0)
