"""The pure-torch sparse rasterizer against the dense reference: forward and autograd.grad."""

import math
import subprocess
import sys

import pytest
import torch

from fastavatar.render import RenderOutput, TorchRasterConfig, rasterize, render_splats, resolve_backend
from fastavatar.render.rasterize_torch import rasterize_torch

import gsplat.cuda._torch_impl  # noqa: E402,F401  (the dense reference uses its projection and SH; pinned, so a move must fail loudly)

N = 100


def _scene(seed: int = 0, n: int = N, cams: int = 2, width: int = 32, height: int = 32):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(n, 3, generator=g) * 0.6
    means[:3, 2] = torch.tensor([-3.5, -3.0, -2.995])  # behind the camera or inside the near plane: culled
    quats = torch.nn.functional.normalize(torch.randn(n, 4, generator=g), dim=-1)
    scales = torch.rand(n, 3, generator=g) * 0.15 + 0.02
    opacities = torch.rand(n, generator=g) * 0.9 + 0.05
    opacities[3] = 0.002  # below 1/255: never drawn
    sh = torch.randn(n, 16, 3, generator=g) * 0.3
    viewmats = torch.eye(4).repeat(cams, 1, 1)
    viewmats[:, 2, 3] = 3.0
    for c in range(1, cams):
        angle = 0.5 * c
        viewmats[c, :3, :3] = torch.tensor(
            [[math.cos(angle), 0.0, math.sin(angle)], [0.0, 1.0, 0.0], [-math.sin(angle), 0.0, math.cos(angle)]]
        )
        viewmats[c, 0, 3] = 0.3 * c
    Ks = torch.tensor([[40.0, 0.0, width / 2], [0.0, 42.0, height / 2 - 1.0], [0.0, 0.0, 1.0]]).repeat(cams, 1, 1)
    backgrounds = torch.rand(cams, 3, generator=g)
    return [means, quats, scales, opacities, sh], viewmats, Ks, backgrounds


def _render(backend, params, viewmats, Ks, w, h, bg, degree=3, config=None, antialiased=False):
    return rasterize(
        *params, viewmats, Ks, w, h, sh_degree=degree, backgrounds=bg, backend=backend, torch_config=config,
        antialiased=antialiased,
    )


def _assert_outputs_close(a: RenderOutput, b: RenderOutput, atol=1e-4):
    torch.testing.assert_close(a.rgb, b.rgb, rtol=0, atol=atol)
    torch.testing.assert_close(a.alpha, b.alpha, rtol=0, atol=atol)
    drawn = b.alpha > 1e-3  # depth is divided by alpha: compare where something was drawn
    torch.testing.assert_close(a.depth[drawn], b.depth[drawn], rtol=1e-4, atol=atol)


@pytest.mark.parametrize("antialiased", [False, True])
@pytest.mark.parametrize("degree", [0, 1, 2, 3])
def test_forward_matches_dense(degree, antialiased):
    params, viewmats, Ks, bg = _scene(seed=degree)
    ours = _render("torch", params, viewmats, Ks, 32, 32, bg, degree, antialiased=antialiased)
    ref = _render("reference", params, viewmats, Ks, 32, 32, bg, degree, antialiased=antialiased)
    assert ours.rgb.shape == (2, 32, 32, 3)
    assert (ref.alpha > 0.5).float().mean() > 0.1  # the scene covers a good part of the image
    _assert_outputs_close(ours, ref)


@pytest.mark.parametrize("tile_width", [1, 3, 8])
def test_forward_odd_sizes_and_tile_widths(tile_width):
    # width not a multiple of the tile width, non-square image, three cameras
    params, viewmats, Ks, bg = _scene(seed=7, cams=3, width=29, height=23)
    cfg = TorchRasterConfig(tile_width=tile_width)
    ours = _render("torch", params, viewmats, Ks, 29, 23, bg, config=cfg)
    ref = _render("reference", params, viewmats, Ks, 29, 23, bg)
    assert ours.rgb.shape == (3, 23, 29, 3)
    _assert_outputs_close(ours, ref)


def _grads(out: RenderOutput, params, cotangents):
    return torch.autograd.grad([out.rgb, out.alpha, out.depth], params, cotangents)


@pytest.mark.parametrize("antialiased", [False, True])
@pytest.mark.parametrize("degree", [1, 3])
def test_gradients_match_dense(degree, antialiased):
    params, viewmats, Ks, bg = _scene(seed=10 + degree)
    params = [p.clone().requires_grad_(True) for p in params]
    ours = _render("torch", params, viewmats, Ks, 32, 32, bg, degree, antialiased=antialiased)
    ref = _render("reference", params, viewmats, Ks, 32, 32, bg, degree, antialiased=antialiased)
    g = torch.Generator().manual_seed(3)
    cots = [torch.randn(t.shape, generator=g) for t in (ref.rgb, ref.alpha, ref.depth)]
    cots[2] = cots[2] * (ref.alpha > 1e-3)  # depth / alpha is ill-conditioned where alpha ~ 0
    g_ours = _grads(ours, params, cots)
    g_ref = _grads(ref, params, cots)
    for name, a, b in zip(["means", "quats", "scales", "opacities", "sh"], g_ours, g_ref):
        scale = b.abs().max()
        assert scale > 0, name
        torch.testing.assert_close(a, b, rtol=1e-3, atol=2e-5 * scale, msg=f"gradient of {name}")
    # culled Gaussians get no gradient at all
    for a in g_ours[:4]:
        assert a[:4].abs().max() == 0
    # SH bands above the degree get no gradient
    if degree < 3:
        assert g_ours[4][:, (degree + 1) ** 2 :].abs().max() == 0


def test_chunked_bands_match_single_band():
    params, viewmats, Ks, bg = _scene(seed=21, cams=1)
    params = [p.clone().requires_grad_(True) for p in params]
    whole = _render("torch", params, viewmats, Ks, 32, 32, bg)
    banded = _render("torch", params, viewmats, Ks, 32, 32, bg, config=TorchRasterConfig(max_slots_per_chunk=300))
    _assert_outputs_close(banded, whole, atol=1e-6)
    cots = [torch.ones_like(whole.rgb), torch.ones_like(whole.alpha), torch.zeros_like(whole.depth)]
    for a, b in zip(_grads(banded, params, cots), _grads(whole, params, cots)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_index_add_path_matches_csr_path():
    params, viewmats, Ks, bg = _scene(seed=5, cams=1)
    params = [p.clone().requires_grad_(True) for p in params]
    csr = _render("torch", params, viewmats, Ks, 32, 32, bg, config=TorchRasterConfig(use_csr=True))
    plain = _render("torch", params, viewmats, Ks, 32, 32, bg, config=TorchRasterConfig(use_csr=False))
    _assert_outputs_close(csr, plain, atol=1e-6)
    cots = [torch.ones_like(csr.rgb), torch.ones_like(csr.alpha), torch.zeros_like(csr.depth)]
    for a, b in zip(_grads(csr, params, cots), _grads(plain, params, cots)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("where", ["behind", "off_screen"])
def test_empty_scene_backward_works(where):
    params, viewmats, Ks, bg = _scene(seed=2, cams=1)
    params = [p.clone() for p in params]
    if where == "behind":
        params[0][:, 2] = -10.0  # everything behind the camera
    else:
        params[0][:, 0] += 50.0  # in front of the camera, far to the right of the image
    params = [p.requires_grad_(True) for p in params]
    out = _render("torch", params, viewmats, Ks, 16, 16, bg)
    torch.testing.assert_close(out.rgb, bg[:, None, None, :].expand(1, 16, 16, 3))
    out.rgb.sum().backward()
    assert params[0].grad is not None and params[0].grad.abs().max() == 0


def test_render_splats_raw_parameters():
    params, viewmats, Ks, _ = _scene(seed=4, cams=1)
    means, quats, scales, opacities, sh = params
    splats = {
        "means": means,
        "quats": quats * 3.0,  # unnormalised: activate() normalises
        "scales": torch.log(scales),
        "opacities": torch.logit(opacities),
        "sh0": sh[:, :1].clone(),
        "shN": sh[:, 1:].clone(),
    }
    c2w = torch.inverse(viewmats[0])
    out = render_splats(splats, c2w, Ks[0], 32, 32, sh_degree=3, background=(1.0, 1.0, 1.0), backend="torch")
    ref = _render("reference", params, viewmats, Ks, 32, 32, torch.ones(1, 3))
    _assert_outputs_close(out, ref)
    black = render_splats(splats, c2w, Ks[0], 32, 32, background=None, backend="torch")
    torch.testing.assert_close(black.rgb, out.rgb - (1.0 - out.alpha), rtol=0, atol=1e-5)
    # differentiable w.r.t. the raw tensors
    raw = {k: v.clone().requires_grad_(True) for k, v in splats.items()}
    render_splats(raw, c2w, Ks[0], 32, 32, backend="torch").rgb.mean().backward()
    for k, v in raw.items():
        assert v.grad is not None and v.grad.abs().sum() > 0, k


def test_antialiased_compensation_is_gsplats():
    """Our compensation factor equals gsplat's (pure-torch reference) on random projected Gaussians."""
    from gsplat.cuda._torch_impl import _fully_fused_projection

    from fastavatar.render.projection import antialias_compensation, project_gaussians, quat_scale_to_covar

    params, viewmats, Ks, _ = _scene(seed=8)
    params[2] = params[2] * 0.2  # small Gaussians: factors well below 1
    covars = quat_scale_to_covar(params[1], params[2])
    proj = project_gaussians(params[0], covars, viewmats, Ks, 32, 32)
    radii, _, _, _, comp = _fully_fused_projection(params[0], covars, viewmats, Ks, 32, 32, calc_compensations=True)
    ok = proj.valid & (radii > 0).all(-1)
    ours = antialias_compensation(proj.covars2d)
    assert ok.sum() > 50 and comp[ok].min() < 0.5
    torch.testing.assert_close(ours[ok], comp[ok], rtol=1e-4, atol=1e-6)


def test_backend_resolution_on_cpu():
    try:
        import numba  # noqa: F401

        expected = "numba"
    except ImportError:
        expected = "torch"
    assert resolve_backend("auto", "cpu") == expected
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("cuda", "cpu")
    params, viewmats, Ks, bg = _scene(cams=1)
    with pytest.raises(RuntimeError, match="CUDA"):
        rasterize(*params, viewmats, Ks, 8, 8, backgrounds=bg, backend="gsplat")


def test_import_never_loads_gsplat_rendering():
    code = (
        "import sys, torch; import fastavatar.render as r;"
        "assert 'gsplat.rendering' not in sys.modules and 'gsplat' not in sys.modules;"
        "p = [torch.zeros(1, 3), torch.tensor([[1., 0, 0, 0]]), torch.ones(1, 3), torch.ones(1), torch.zeros(1, 1, 3)];"
        "p[0][0, 2] = 2.0;"
        "o = r.rasterize(*p, torch.eye(4)[None], torch.eye(3)[None] * 4, 4, 4, sh_degree=0);"
        "assert 'gsplat.rendering' not in sys.modules and 'gsplat.cuda._backend' not in sys.modules;"
        "print(o.alpha.max().item())"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert float(res.stdout.strip()) > 0.5


def test_sparse_work_not_dense():
    """The torch backend touches far fewer (pixel, Gaussian) slots than pixels x Gaussians."""
    import fastavatar.render.rasterize_torch as module
    params, viewmats, Ks, bg = _scene(seed=9, n=400, cams=1, width=64, height=64)
    params[2] = params[2] * 0.3  # small Gaussians
    seen = []
    original = module._Composite.apply

    def spy(xc, amp, q, feats, pieces):
        seen.append(pieces.x0.shape[0] * pieces.lanes.shape[1])
        return original(xc, amp, q, feats, pieces)

    module._Composite.apply = spy
    try:
        rasterize_torch(*params, viewmats, Ks, 64, 64, backgrounds=bg)
    finally:
        module._Composite.apply = original
    assert 0 < sum(seen) < 0.1 * 64 * 64 * 400


def test_float64_matches_dense_tightly():
    """In float64 the sparse and dense renderers agree to ~1e-9: the math is the same, not just close."""
    params, viewmats, Ks, bg = _scene(seed=12)
    params = [p.double().requires_grad_(True) for p in params]
    viewmats, Ks, bg = viewmats.double(), Ks.double(), bg.double()
    ours = _render("torch", params, viewmats, Ks, 32, 32, bg)
    ref = _render("reference", params, viewmats, Ks, 32, 32, bg)
    assert ours.rgb.dtype == torch.float64
    _assert_outputs_close(ours, ref, atol=1e-7)
    g = torch.Generator().manual_seed(1)
    cots = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in ref]
    cots[2] = cots[2] * (ref.alpha > 1e-3)
    names = ["means", "quats", "scales", "opacities", "sh"]
    for name, a, b in zip(names, _grads(ours, params, cots), _grads(ref, params, cots)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7 * b.abs().max(), msg=f"gradient of {name}")
