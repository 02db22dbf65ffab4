"""Fitting FLAME (shape, pose, scale, rigid transform) to Gaussian means: recovery of planted values."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from fastavatar.flame import flame_forward
from fastavatar.flame.fit import FlameFitConfig, fit_flame_to_means, scale_flame_model, umeyama
from fastavatar.flame.points import triangle_centres
from flame_fixtures import make_tiny_flame

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _rotation(axis_angle):
    from fastavatar.core.cameras import axis_angle_to_matrix

    return axis_angle_to_matrix(torch.as_tensor(axis_angle, dtype=torch.float64))


def _planted(model, noise, seed=0):
    """Means of a planted head: s * FLAME(shape, expr, pose) with a global rotation/translation, + noise."""
    g = torch.Generator().manual_seed(seed)
    truth = {
        "shape": torch.tensor([[1.2, -0.8, 0.5]], dtype=torch.float64),
        "expr": torch.tensor([[0.7, -1.1, 0.4]], dtype=torch.float64),
        "jaw_pose": torch.tensor([[0.25, 0.0, 0.0]], dtype=torch.float64),
        "neck_pose": torch.tensor([[0.1, -0.15, 0.05]], dtype=torch.float64),
        "rotation": torch.tensor([[0.3, -1.0, 0.2]], dtype=torch.float64),
        "translation": torch.tensor([[0.2, -0.1, 1.5]], dtype=torch.float64),
    }
    scale = 1.7
    verts = flame_forward(scale_flame_model(model, scale), **truth).vertices[0]
    centres = triangle_centres(verts, model.faces)
    means = centres + noise * torch.randn(centres.shape, generator=g, dtype=torch.float64)
    return truth, scale, verts, means


def test_scaled_model_is_the_scaled_head():
    model = make_tiny_flame()
    p = {"shape": torch.randn(1, 3, dtype=torch.float64), "jaw_pose": torch.tensor([[0.3, 0.1, 0.0]], dtype=torch.float64),
         "rotation": torch.tensor([[0.2, 0.5, -0.1]], dtype=torch.float64)}
    a = flame_forward(scale_flame_model(model, 2.5), **p).vertices
    b = 2.5 * flame_forward(model, **p).vertices
    assert torch.allclose(a, b, atol=1e-12)


def test_umeyama_recovers_similarity():
    g = torch.Generator().manual_seed(3)
    src = torch.randn(50, 3, generator=g, dtype=torch.float64)
    rot = _rotation([0.4, -1.2, 2.0])
    dst = 0.6 * src @ rot.T + torch.tensor([1.0, 2.0, -3.0], dtype=torch.float64)
    s, r, t = umeyama(src, dst)
    assert s == pytest.approx(0.6, abs=1e-10) and torch.allclose(r, rot, atol=1e-10)
    assert torch.allclose(t, torch.tensor([1.0, 2.0, -3.0], dtype=torch.float64), atol=1e-10)


def test_fit_recovers_planted_head_from_noisy_means():
    model = make_tiny_flame()
    noise = 1e-3  # 1 mm per axis on a 10 cm head, x1.7
    truth, scale, verts, means = _planted(model, noise)
    fit = fit_flame_to_means(model, means, FlameFitConfig(noise_std=noise))
    # residual at the noise level: E|n|^2 = 3 sigma^2 minus the ~(3+3+12+7) fitted dof out of 3*288
    assert fit.rms == pytest.approx(math.sqrt(3) * noise, rel=0.15)
    assert fit.scale == pytest.approx(scale, rel=2e-3)
    assert torch.allclose(fit.params["shape"], truth["shape"], atol=0.1)
    assert torch.allclose(fit.params["expr"], truth["expr"], atol=0.1)
    assert torch.allclose(fit.params["jaw_pose"], truth["jaw_pose"], atol=0.03)
    rot_err = (_rotation(fit.params["rotation"][0]) @ _rotation(truth["rotation"][0]).T)
    assert math.acos(max(-1.0, min(1.0, (float(torch.trace(rot_err)) - 1) / 2))) < 0.01
    # the whole mesh, not only the coefficients: vertices within ~noise of the truth
    fitted = flame_forward(scale_flame_model(model, fit.scale), **fit.params).vertices[0]
    assert float((fitted - verts).norm(dim=-1).max()) < 2.5 * noise
    assert not fit.large(FlameFitConfig(noise_std=noise))


def test_fit_warns_when_means_do_not_follow_flame():
    model = make_tiny_flame()
    _, _, _, means = _planted(model, 0.0)
    shuffled = means[torch.randperm(means.shape[0], generator=torch.Generator().manual_seed(1))]
    with pytest.warns(UserWarning, match="residual is large"):
        fit = fit_flame_to_means(model, shuffled, FlameFitConfig(iterations=30))
    assert fit.rms_model_units > 5e-3


def test_fit_uses_only_flame_faces_of_a_longer_head_and_rejects_a_shorter_one():
    model = make_tiny_flame()
    truth, scale, _, means = _planted(model, 0.0)
    extra = torch.cat([means, torch.full((7, 3), 9.0, dtype=torch.float64)])  # like 168 teeth Gaussians without teeth faces
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit = fit_flame_to_means(model, extra, FlameFitConfig(noise_std=1e-4))
    assert fit.num_fitted == model.num_faces and fit.rms < 1e-4  # noise-free: only the prior's pull remains
    assert fit.scale == pytest.approx(scale, rel=1e-3)
    with pytest.raises(ValueError, match="Gaussians but FLAME") as info:
        fit_flame_to_means(model, means[:-1])
    assert "\n" not in str(info.value)


def test_teeth_faces_are_reported_not_fitted_by_default():
    from fastavatar.flame.teeth import add_teeth

    model = add_teeth(make_tiny_flame(), list(range(81, 96)), list(range(97, 112)))
    truth, scale, _, means = _planted(model, 0.0)
    n_flame = model.num_faces - model.num_teeth_faces
    means = means.clone()
    means[n_flame:] += 0.01  # teeth Gaussians 1.7 cm off our re-created teeth (VHAP's differ from ours)
    fit = fit_flame_to_means(model, means, FlameFitConfig(noise_std=1e-4))
    assert fit.num_fitted == n_flame and fit.rms < 1e-4
    assert fit.rms_teeth == pytest.approx(0.01 * math.sqrt(3), rel=0.05)
    assert fit.centres.shape == (model.num_faces, 3)
    weighted = fit_flame_to_means(model, means, FlameFitConfig(noise_std=1e-4, teeth_weight=1.0))
    assert weighted.num_fitted == model.num_faces and weighted.rms > fit.rms  # the offset teeth now pull the fit
