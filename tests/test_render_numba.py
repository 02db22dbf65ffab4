"""The compiled (numba) CPU rasterizer against the dense reference and the torch rasterizer:
forward and autograd gradients, antialiasing, culling, empty tiles, backend resolution."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastavatar.render import NumbaRasterConfig, rasterize, resolve_backend

pytest.importorskip("numba")
import gsplat.cuda._torch_impl  # noqa: E402,F401  (the dense reference uses its projection and SH; pinned, so a move must fail loudly)

from test_render_torch import _assert_outputs_close, _grads, _scene  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NAMES = ["means", "quats", "scales", "opacities", "sh"]


def _render(backend, params, viewmats, Ks, w, h, bg, degree=3, antialiased=False, tile=16):
    return rasterize(*params, viewmats, Ks, w, h, sh_degree=degree, backgrounds=bg, backend=backend,
                     antialiased=antialiased, numba_config=NumbaRasterConfig(tile=tile))


def _random_cotangents(ref, seed=3):
    g = torch.Generator().manual_seed(seed)
    cots = [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in (ref.rgb, ref.alpha, ref.depth)]
    cots[2] = cots[2] * (ref.alpha > 1e-3)  # depth / alpha is ill-conditioned where alpha ~ 0
    return cots


@pytest.mark.parametrize("antialiased", [False, True])
@pytest.mark.parametrize("degree", [0, 1, 2, 3])
def test_forward_matches_dense(degree, antialiased):
    params, viewmats, Ks, bg = _scene(seed=degree)
    ours = _render("numba", params, viewmats, Ks, 32, 32, bg, degree, antialiased)
    ref = _render("reference", params, viewmats, Ks, 32, 32, bg, degree, antialiased)
    assert ours.rgb.shape == (2, 32, 32, 3)
    assert (ref.alpha > 0.5).float().mean() > 0.1  # the scene covers a good part of the image
    _assert_outputs_close(ours, ref, atol=2e-5)


def test_antialiasing_changes_the_image():
    params, viewmats, Ks, bg = _scene(seed=1)
    params[2] = params[2] * 0.1  # small Gaussians: compensation well below 1
    plain = _render("numba", params, viewmats, Ks, 32, 32, bg)
    aa = _render("numba", params, viewmats, Ks, 32, 32, bg, antialiased=True)
    assert (plain.alpha - aa.alpha).max() > 0.05  # dimmer with antialiasing
    _assert_outputs_close(aa, _render("reference", params, viewmats, Ks, 32, 32, bg, antialiased=True), atol=2e-5)


@pytest.mark.parametrize("background", ["random", "black", "white"])
def test_backgrounds_and_odd_sizes(background):
    params, viewmats, Ks, bg = _scene(seed=7, cams=3, width=29, height=23)
    bg = {"random": bg, "black": None, "white": torch.ones(3, 3)}[background]
    ours = _render("numba", params, viewmats, Ks, 29, 23, bg, tile=8)
    ref = _render("reference", params, viewmats, Ks, 29, 23, bg)
    assert ours.rgb.shape == (3, 23, 29, 3)
    _assert_outputs_close(ours, ref, atol=2e-5)


@pytest.mark.parametrize("antialiased", [False, True])
@pytest.mark.parametrize("degree", [1, 3])
def test_gradients_match_dense(degree, antialiased):
    params, viewmats, Ks, bg = _scene(seed=10 + degree)
    params = [p.clone().requires_grad_(True) for p in params]
    ours = _render("numba", params, viewmats, Ks, 32, 32, bg, degree, antialiased)
    ref = _render("reference", params, viewmats, Ks, 32, 32, bg, degree, antialiased)
    cots = _random_cotangents(ref)
    g_ours = _grads(ours, params, cots)
    for name, a, b in zip(NAMES, g_ours, _grads(ref, params, cots)):
        scale = b.abs().max()
        assert scale > 0, name
        torch.testing.assert_close(a, b, rtol=1e-3, atol=2e-5 * scale, msg=f"gradient of {name}")
    for a in g_ours[:4]:  # culled Gaussians (behind the camera, below 1/255 opacity) get no gradient
        assert a[:4].abs().max() == 0
    if degree < 3:
        assert g_ours[4][:, (degree + 1) ** 2 :].abs().max() == 0


def test_float64_matches_dense_tightly():
    params, viewmats, Ks, bg = _scene(seed=12)
    params = [p.double().requires_grad_(True) for p in params]
    viewmats, Ks, bg = viewmats.double(), Ks.double(), bg.double()
    ours = _render("numba", params, viewmats, Ks, 32, 32, bg)
    ref = _render("reference", params, viewmats, Ks, 32, 32, bg)
    assert ours.rgb.dtype == torch.float64
    _assert_outputs_close(ours, ref, atol=1e-7)
    cots = _random_cotangents(ref, seed=1)
    for name, a, b in zip(NAMES, _grads(ours, params, cots), _grads(ref, params, cots)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7 * b.abs().max(), msg=f"gradient of {name}")


def test_tile_sizes_agree():
    params, viewmats, Ks, bg = _scene(seed=5, cams=1, width=37, height=30)
    params = [p.clone().requires_grad_(True) for p in params]
    outs = [_render("numba", params, viewmats, Ks, 37, 30, bg, tile=t) for t in (4, 16, 64)]
    cots = _random_cotangents(outs[0])
    grads = [_grads(o, params, cots) for o in outs]
    for other, g_other in zip(outs[1:], grads[1:]):
        _assert_outputs_close(other, outs[0], atol=1e-6)
        for a, b in zip(g_other, grads[0]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * b.abs().max())


def test_empty_tiles_and_off_screen():
    """Gaussians in one corner (most tiles empty), some far off screen, some behind the camera."""
    params, viewmats, Ks, bg = _scene(seed=2, cams=1, width=64, height=48)
    params = [p.clone() for p in params]
    params[0][:, :2] = params[0][:, :2] * 0.15 - 0.6  # top-left corner of the image
    params[0][10:20, 0] += 40.0  # in front of the camera, far right of the image
    params[0][20:30, 2] = -6.0  # behind the camera
    params = [p.requires_grad_(True) for p in params]
    ours = _render("numba", params, viewmats, Ks, 64, 48, bg)
    ref = _render("reference", params, viewmats, Ks, 64, 48, bg)
    _assert_outputs_close(ours, ref, atol=2e-5)
    assert (ours.alpha[0, 24:, 32:] == 0).all()  # the empty tiles show the background exactly
    torch.testing.assert_close(ours.rgb[0, 24:, 32:], bg[0].expand(24, 32, 3), rtol=0, atol=0)
    cots = _random_cotangents(ref)
    g_ours, g_ref = _grads(ours, params, cots), _grads(ref, params, cots)
    for name, a, b in zip(NAMES, g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=2e-5 * b.abs().max(), msg=f"gradient of {name}")
    assert g_ours[0][10:30].abs().max() == 0


@pytest.mark.parametrize("where", ["behind", "off_screen"])
def test_nothing_visible_backward_works(where):
    params, viewmats, Ks, bg = _scene(seed=2, cams=1)
    params = [p.clone() for p in params]
    if where == "behind":
        params[0][:, 2] = -10.0
    else:
        params[0][:, 0] += 50.0
    params = [p.requires_grad_(True) for p in params]
    out = _render("numba", params, viewmats, Ks, 16, 16, bg)
    torch.testing.assert_close(out.rgb, bg[:, None, None, :].expand(1, 16, 16, 3))
    out.rgb.sum().backward()
    assert params[0].grad is not None and params[0].grad.abs().max() == 0


def _fused_vs_unfused(params, viewmats, Ks, w, h, bg, degree=3, antialiased=False):
    """Render with the fused (compiled projection + SH) path and the torch-projection path; compare
    images (rgb, alpha within 1e-5; depth 2e-5 relative where alpha > 1e-3) and gradients of all five
    Gaussian tensors (1e-4 of each gradient's largest entry) under random cotangents."""
    runs = []
    for fused in (True, False):
        leaves = [p.detach().clone().requires_grad_(True) for p in params]
        out = rasterize(*leaves, viewmats, Ks, w, h, sh_degree=degree, backgrounds=bg, backend="numba",
                        antialiased=antialiased, numba_config=NumbaRasterConfig(fused=fused))
        runs.append((out, leaves))
    (fused, leaves_f), (plain, leaves_p) = runs
    torch.testing.assert_close(fused.rgb, plain.rgb, rtol=0, atol=1e-5)
    torch.testing.assert_close(fused.alpha, plain.alpha, rtol=0, atol=1e-5)
    drawn = plain.alpha > 1e-3
    torch.testing.assert_close(fused.depth * drawn, plain.depth * drawn, rtol=2e-5, atol=1e-6)
    cots = _random_cotangents(plain)
    g_f, g_p = _grads(fused, leaves_f, cots), _grads(plain, leaves_p, cots)
    for name, a, b in zip(NAMES, g_f, g_p):
        scale = b.abs().max()
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4 * scale + 1e-12, msg=f"gradient of {name}")
    return fused, g_f


@pytest.mark.parametrize("antialiased", [False, True])
@pytest.mark.parametrize("degree", [0, 1, 2, 3])
def test_fused_projection_matches_torch_projection(degree, antialiased):
    params, viewmats, Ks, bg = _scene(seed=20 + degree)
    _, grads = _fused_vs_unfused(params, viewmats, Ks, 32, 32, bg, degree, antialiased)
    for g in grads[:4]:  # culled Gaussians (behind the camera, below 1/255 opacity) get no gradient
        assert g[:4].abs().max() == 0
    if degree < 3:
        assert grads[4][:, (degree + 1) ** 2 :].abs().max() == 0


@pytest.mark.parametrize("background", ["random", "black", "white"])
def test_fused_projection_backgrounds_off_screen_and_empty_tiles(background):
    params, viewmats, Ks, bg = _scene(seed=2, cams=2, width=64, height=48)
    params = [p.clone() for p in params]
    params[0][:, :2] = params[0][:, :2] * 0.15 - 0.6  # one corner: most tiles empty
    params[0][10:20, 0] += 40.0  # in front of the camera, far off screen
    params[0][20:30, 2] = -6.0  # behind the camera
    params[1] = params[1] * 3.0  # unnormalised quaternions (the rotation normalises them)
    bg = {"random": bg, "black": None, "white": torch.ones(2, 3)}[background]
    out, grads = _fused_vs_unfused(params, viewmats, Ks, 64, 48, bg, antialiased=background == "white")
    assert (out.alpha[0, 24:, 32:] == 0).all()
    assert grads[0][20:30].abs().max() == 0


def test_cameras_with_gradients_take_the_torch_projection():
    params, viewmats, Ks, bg = _scene(seed=4, cams=1)
    viewmats = viewmats.clone().requires_grad_(True)
    out = _render("numba", params, viewmats, Ks, 32, 32, bg)
    out.rgb.sum().backward()
    assert viewmats.grad is not None and viewmats.grad.abs().max() > 0


def _template_view(scale):
    """Subject 306's template points as Gaussians, seen from camera 08 (scripts/benchmark_render.py's scene)."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from benchmark_render import load_scene, make_splats
    finally:
        sys.path.pop(0)
    from fastavatar.core.cameras import c2w_to_w2c
    from fastavatar.core.splats import activate

    subject = REPO / "data" / "nersemble" / "306"
    if not (subject / "sparse" / "0").is_dir():
        pytest.skip("bundled subject 306 not present")
    points, c2w, K, width, height = load_scene(subject, "00000_08.png", scale)
    act = activate(make_splats(points))
    params = [act[k].detach() for k in NAMES]
    return params, c2w_to_w2c(c2w[None]), K[None], width, height


@pytest.mark.parametrize("antialiased", [False, True])
def test_matches_torch_rasterizer_on_template_view(antialiased):
    params, viewmats, Ks, w, h = _template_view(0.125)
    params = [p.clone().requires_grad_(True) for p in params]
    bg = torch.tensor([[1.0, 1.0, 1.0]])
    ours = _render("numba", params, viewmats, Ks, w, h, bg, antialiased=antialiased)
    theirs = _render("torch", params, viewmats, Ks, w, h, bg, antialiased=antialiased)
    assert (theirs.alpha > 0.5).float().mean() > 0.2  # the head fills a good part of the view
    torch.testing.assert_close(ours.rgb, theirs.rgb, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.alpha, theirs.alpha, rtol=0, atol=1e-5)
    cots = _random_cotangents(theirs)
    for name, a, b in zip(NAMES, _grads(ours, params, cots), _grads(theirs, params, cots)):
        scale = b.abs().max()
        if name == "quats" and scale == 0:  # isotropic Gaussians: the rotation has no effect
            assert a.abs().max() < 1e-6
            continue
        assert scale > 0, name
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4 * scale, msg=f"gradient of {name}")


def test_auto_picks_numba_on_cpu():
    assert resolve_backend("auto", "cpu") == "numba"
    assert resolve_backend("torch", "cpu") == "torch"
    with pytest.raises(RuntimeError, match="CPU"):
        resolve_backend("numba", "cuda")


def test_auto_says_once_when_numba_is_missing(monkeypatch, capsys):
    import fastavatar.render as render
    import fastavatar.render.rasterize_numba as rn

    monkeypatch.setattr(rn, "numba_status", lambda: (False, "numba is not importable: No module named 'numba'"))
    monkeypatch.setattr(render, "_said", set())
    assert resolve_backend("auto", "cpu") == "torch"
    assert resolve_backend("auto", "cpu") == "torch"
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "No module named 'numba'" in lines[0] and "torch" in lines[0]
    with pytest.raises(RuntimeError, match="pip install numba"):
        resolve_backend("numba", "cpu")


def test_gsplat_build_failure_is_loud(monkeypatch, capsys):
    """auto on CUDA falls back with one line naming the build error; backend='gsplat' fails instead."""
    import types

    import fastavatar.render as render
    import fastavatar.render.gsplat_backend as gb

    class Broken(types.ModuleType):
        def __getattr__(self, name):
            raise RuntimeError("Error building extension 'gsplat_cuda': nvcc fatal\nsecond line\nthird")

    monkeypatch.setitem(sys.modules, "gsplat.cuda._backend", Broken("gsplat.cuda._backend"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(render, "_said", set())
    gb._gsplat_check.cache_clear()
    try:
        assert resolve_backend("auto", "cuda") == "torch"
        resolve_backend("auto", "cuda")
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1
        assert "Error building extension 'gsplat_cuda': nvcc fatal" in lines[0] and "second line" not in lines[0]
        with pytest.raises(RuntimeError, match="nvcc fatal"):
            resolve_backend("gsplat", "cuda")
    finally:
        gb._gsplat_check.cache_clear()


@pytest.mark.slow
def test_compiles_once_then_loads_from_cache(tmp_path):
    """A fresh numba cache: the first process says it compiles, the second one loads silently."""
    code = (
        "import torch; from fastavatar.render import rasterize;"
        "p = [torch.zeros(1, 3), torch.tensor([[1., 0, 0, 0]]), torch.ones(1, 3), torch.ones(1), torch.zeros(1, 1, 3)];"
        "p[0][0, 2] = 2.0;"
        "o = rasterize(*p, torch.eye(4)[None], torch.eye(3)[None] * 4, 4, 4, sh_degree=0, backend='numba');"
        "print(o.alpha.max().item())"
    )
    env = {**__import__("os").environ, "NUMBA_CACHE_DIR": str(tmp_path), "PYTHONPATH": str(REPO)}
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env,
                           cwd=tmp_path) for _ in range(2)]
    for res in runs:
        assert res.returncode == 0, res.stderr
        assert float(res.stdout.strip()) > 0.5
    assert "compiling numba kernel" in runs[0].stderr
    assert "compil" not in runs[1].stderr


def test_fused_background_gradient_matches_torch_projection():
    params, viewmats, Ks, bg = _scene(seed=6, cams=2)
    grads = []
    for fused in (True, False):
        bg_leaf = bg.clone().requires_grad_(True)
        out = rasterize(*params, viewmats, Ks, 32, 32, sh_degree=3, backgrounds=bg_leaf, backend="numba",
                        numba_config=NumbaRasterConfig(fused=fused))
        (out.rgb * torch.linspace(-1.0, 2.0, 3)).sum().backward()
        grads.append(bg_leaf.grad)
    assert grads[1].abs().max() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-5)


def test_float32_exp_polynomial_matches_math_exp():
    """The vectorisable float32 exp(-s) of the pixel loops against math.exp over the range that matters."""
    import numba
    import numpy as np

    from fastavatar.render import _numba_kernels as k

    @numba.njit
    def run(s, out):
        for i in range(s.shape[0]):
            out[i] = k.exp_neg(s[i])

    s = np.linspace(0.0, 12.0, 200001).astype(np.float32)
    out = np.empty_like(s)
    run(s, out)
    ref = np.exp(-s.astype(np.float64))
    assert np.max(np.abs(out - ref) / ref) < 2e-7
    assert k.exp_neg(0.5) == pytest.approx(np.exp(-0.5), rel=1e-15)  # float64 (and no-JIT): math.exp
