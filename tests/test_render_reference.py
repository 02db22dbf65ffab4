"""Projection, SH and the dense reference renderer, checked against gsplat's pure-torch reference
(``gsplat.cuda._torch_impl``, CPU) and against closed-form scenes."""

import math

import pytest
import torch

from fastavatar.render import rasterize
from fastavatar.render.projection import camera_centers, project_gaussians, quat_scale_to_covar
from fastavatar.core.sh import eval_sh, sh_to_rgb

torch_impl = pytest.importorskip("gsplat.cuda._torch_impl")


def _random_gaussians(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(n, 3, generator=g) * 0.7
    quats = torch.nn.functional.normalize(torch.randn(n, 4, generator=g), dim=-1)
    scales = torch.rand(n, 3, generator=g) * 0.15 + 0.02
    return means, quats, scales


def _cameras():
    viewmats = torch.eye(4).repeat(3, 1, 1)
    viewmats[:, 2, 3] = 3.0
    viewmats[1, 0, 3] = 0.8  # shifted sideways: part of the scene leaves the image
    angle = 0.6
    viewmats[2, :3, :3] = torch.tensor(
        [[math.cos(angle), 0.0, math.sin(angle)], [0.0, 1.0, 0.0], [-math.sin(angle), 0.0, math.cos(angle)]]
    )
    Ks = torch.tensor([[40.0, 0.0, 16.0], [0.0, 44.0, 15.0], [0.0, 0.0, 1.0]]).repeat(3, 1, 1)
    return viewmats, Ks


def test_covariance_matches_gsplat():
    _, quats, scales = _random_gaussians(200, 0)
    ours = quat_scale_to_covar(quats, scales)
    ref, _ = torch_impl._quat_scale_to_covar_preci(quats, scales, True, False, triu=False)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)


def test_projection_matches_gsplat():
    means, quats, scales = _random_gaussians(300, 1)
    viewmats, Ks = _cameras()
    covars = quat_scale_to_covar(quats, scales)
    proj = project_gaussians(means, covars, viewmats, Ks, 32, 30)
    radii, means2d, depths, conics, _ = torch_impl._fully_fused_projection(means, covars, viewmats, Ks, 32, 30)
    torch.testing.assert_close(proj.depths, depths)
    # gsplat's radii also drop Gaussians entirely off-screen; on-screen ones must all be valid for us
    on_screen = (radii > 0).all(-1)
    assert on_screen.any() and (proj.valid | ~on_screen).all()
    torch.testing.assert_close(proj.means2d[on_screen], means2d[on_screen], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(proj.conics[on_screen], conics[on_screen], rtol=1e-4, atol=1e-6)


def test_projection_culls_behind_camera():
    means = torch.tensor([[0.0, 0.0, -1.0], [0.0, 0.0, 0.005], [0.0, 0.0, 2.0], [0.0, 0.0, 50.0]])
    covars = torch.eye(3).repeat(4, 1, 1) * 0.01
    viewmats = torch.eye(4)[None]
    Ks = torch.tensor([[[30.0, 0.0, 16.0], [0.0, 30.0, 16.0], [0.0, 0.0, 1.0]]])
    proj = project_gaussians(means, covars, viewmats, Ks, 32, 32, near_plane=0.01, far_plane=10.0)
    assert proj.valid[0].tolist() == [False, False, True, False]
    assert torch.isfinite(proj.conics).all() and torch.isfinite(proj.means2d).all()


@pytest.mark.parametrize("degree", [0, 1, 2, 3])
def test_sh_matches_gsplat(degree):
    g = torch.Generator().manual_seed(degree)
    dirs = torch.randn(500, 3, generator=g) * 3.0  # not unit length: both normalise
    coeffs = torch.randn(500, 16, 3, generator=g)
    ours = eval_sh(degree, dirs, coeffs)
    ref = torch_impl._spherical_harmonics(degree, dirs, coeffs[:, : (degree + 1) ** 2])
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    # higher bands must not leak into a lower-degree evaluation
    coeffs2 = coeffs.clone()
    coeffs2[:, (degree + 1) ** 2 :] += 10.0
    torch.testing.assert_close(eval_sh(degree, dirs, coeffs2), ours)


def test_sh_to_rgb_convention():
    coeffs = torch.zeros(2, 1, 3)
    coeffs[0, 0] = torch.tensor([1.0, 0.0, -5.0])
    rgb = sh_to_rgb(0, torch.randn(2, 3), coeffs)
    expected0 = torch.tensor([0.28209479177387814 + 0.5, 0.5, 0.0])  # -5 * C0 + 0.5 < 0 -> clamped
    torch.testing.assert_close(rgb[0], expected0)
    torch.testing.assert_close(rgb[1], torch.full((3,), 0.5))


def test_camera_centers():
    viewmats, _ = _cameras()
    centers = camera_centers(viewmats)
    torch.testing.assert_close(centers, torch.inverse(viewmats)[:, :3, 3], rtol=1e-5, atol=1e-6)


def _single_gaussian_scene(opacity: float, rgb, sigma_px: float = 2.0):
    """One isotropic Gaussian whose mean projects exactly onto the centre of pixel (8, 10)."""
    fx = 20.0
    z = 2.0
    # pixel (row 8, col 10) has centre (10.5, 8.5); K maps x/z * fx + cx
    cx, cy = 16.0, 16.0
    mean = torch.tensor([[(10.5 - cx) * z / fx, (8.5 - cy) * z / fx, z]])
    quats = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    scales = torch.full((1, 3), sigma_px * z / fx)
    opacities = torch.tensor([opacity])
    sh = torch.zeros(1, 1, 3)
    sh[0, 0] = (torch.tensor(rgb) - 0.5) / 0.28209479177387814
    viewmats = torch.eye(4)[None]
    Ks = torch.tensor([[[fx, 0.0, cx], [0.0, fx, cy], [0.0, 0.0, 1.0]]])
    return mean, quats, scales, opacities, sh, viewmats, Ks


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_background_composited_once(backend):
    color = (0.9, 0.2, 0.1)
    bg = torch.tensor([[0.1, 0.5, 1.0]])
    scene = _single_gaussian_scene(opacity=0.6, rgb=color)
    out = rasterize(*scene, 32, 32, sh_degree=0, backgrounds=bg, backend=backend)
    alpha = out.alpha[0, 8, 10, 0]
    torch.testing.assert_close(alpha, torch.tensor(0.6), rtol=1e-5, atol=1e-6)  # sigma = 0 at the mean
    expected = torch.tensor(color) * alpha + (1.0 - alpha) * bg[0]
    torch.testing.assert_close(out.rgb[0, 8, 10], expected, rtol=1e-5, atol=1e-6)
    # everywhere: rgb = premultiplied colour + (1 - alpha) * background
    black = rasterize(*scene, 32, 32, sh_degree=0, backgrounds=None, backend=backend)
    torch.testing.assert_close(out.rgb, black.rgb + (1.0 - black.alpha) * bg[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(black.rgb, torch.tensor(color) * black.alpha, rtol=1e-5, atol=1e-6)
    # depth is the normalised expected z where something was drawn
    drawn = black.alpha[..., 0] > 1e-3
    torch.testing.assert_close(out.depth[0][drawn[0]], torch.full((int(drawn.sum()), 1), 2.0))
    # far corner: alpha below 1/255 is skipped, so the corner shows the pure background
    torch.testing.assert_close(out.rgb[0, 31, 0], bg[0])


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_empty_scene_is_background(backend):
    bg = torch.tensor([[0.3, 0.6, 0.9], [1.0, 1.0, 1.0]])
    scene = list(_single_gaussian_scene(opacity=0.9, rgb=(1.0, 0.0, 0.0)))
    scene[0] = scene[0].clone()
    scene[0][:, 2] = -2.0  # behind the camera: culled
    viewmats = scene[5].repeat(2, 1, 1)
    Ks = scene[6].repeat(2, 1, 1)
    out = rasterize(*scene[:5], viewmats, Ks, 12, 9, sh_degree=0, backgrounds=bg, backend=backend)
    assert out.rgb.shape == (2, 9, 12, 3) and out.alpha.shape == (2, 9, 12, 1) and out.depth.shape == (2, 9, 12, 1)
    torch.testing.assert_close(out.rgb, bg[:, None, None, :].expand(2, 9, 12, 3))
    assert out.alpha.abs().max() == 0 and out.depth.abs().max() == 0


def test_alpha_clamp_and_early_stop():
    """Ten opaque Gaussians on top of each other: alpha 0.999 each, the pixel stops before T <= 1e-4."""
    mean, quats, scales, _, sh, viewmats, Ks = _single_gaussian_scene(opacity=1.0, rgb=(0.2, 0.4, 0.6))
    means = mean.repeat(10, 1)
    means[:, 2] += torch.arange(10) * 0.01  # distinct depths
    out = rasterize(
        means, quats.repeat(10, 1), scales.repeat(10, 1), torch.ones(10), sh.repeat(10, 1, 1),
        viewmats, Ks, 32, 32, sh_degree=0, backend="reference",
    )
    # the first pair takes T to 1e-3, the second would take it to 1e-6 <= 1e-4, so it is dropped
    torch.testing.assert_close(out.alpha[0, 8, 10, 0], torch.tensor(0.999), rtol=0, atol=1e-6)
