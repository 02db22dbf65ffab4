"""gsplat's CUDA rasterizer against our torch backend on the GPU (forward and autograd.grad)."""

import math

import pytest
import torch

from fastavatar.render import rasterize, resolve_backend

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _scene(seed: int, n: int = 2000, cams: int = 2, width: int = 96, height: int = 80):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(n, 3, generator=g) * 0.6
    quats = torch.nn.functional.normalize(torch.randn(n, 4, generator=g), dim=-1)
    scales = torch.rand(n, 3, generator=g) * 0.05 + 0.005
    opacities = torch.rand(n, generator=g) * 0.9 + 0.05
    sh = torch.randn(n, 16, 3, generator=g) * 0.3
    viewmats = torch.eye(4).repeat(cams, 1, 1)
    viewmats[:, 2, 3] = 3.0
    for c in range(1, cams):
        angle = 0.4 * c
        viewmats[c, :3, :3] = torch.tensor(
            [[math.cos(angle), 0.0, math.sin(angle)], [0.0, 1.0, 0.0], [-math.sin(angle), 0.0, math.cos(angle)]]
        )
    Ks = torch.tensor([[100.0, 0.0, width / 2], [0.0, 100.0, height / 2], [0.0, 0.0, 1.0]]).repeat(cams, 1, 1)
    backgrounds = torch.rand(cams, 3, generator=g)
    dev = torch.device("cuda")
    params = [t.to(dev) for t in (means, quats, scales, opacities, sh)]
    return params, viewmats.to(dev), Ks.to(dev), backgrounds.to(dev), width, height


def test_auto_picks_gsplat_on_cuda():
    assert resolve_backend("auto", "cuda") == "gsplat"


@pytest.mark.parametrize("degree", [0, 3])
def test_gsplat_matches_torch_forward(degree):
    params, viewmats, Ks, bg, w, h = _scene(seed=degree)
    ours = rasterize(*params, viewmats, Ks, w, h, sh_degree=degree, backgrounds=bg, backend="torch")
    ref = rasterize(*params, viewmats, Ks, w, h, sh_degree=degree, backgrounds=bg, backend="gsplat")
    assert (ref.alpha > 0.5).float().mean() > 0.05
    torch.testing.assert_close(ours.rgb, ref.rgb, rtol=0, atol=5e-4)
    torch.testing.assert_close(ours.alpha, ref.alpha, rtol=0, atol=5e-4)
    drawn = ref.alpha > 0.05
    torch.testing.assert_close(ours.depth[drawn], ref.depth[drawn], rtol=1e-3, atol=1e-3)


def test_gsplat_matches_torch_gradients():
    params, viewmats, Ks, bg, w, h = _scene(seed=11)
    outs = {}
    grads = {}
    g = torch.Generator().manual_seed(5)
    cot_rgb = torch.randn(2, h, w, 3, generator=g).cuda()
    cot_alpha = torch.randn(2, h, w, 1, generator=g).cuda()
    for backend in ("torch", "gsplat"):
        leaves = [p.clone().requires_grad_(True) for p in params]
        out = rasterize(*leaves, viewmats, Ks, w, h, sh_degree=3, backgrounds=bg, backend=backend)
        outs[backend] = out
        grads[backend] = torch.autograd.grad([out.rgb, out.alpha], leaves, [cot_rgb, cot_alpha])
    for name, a, b in zip(["means", "quats", "scales", "opacities", "sh"], grads["torch"], grads["gsplat"]):
        scale = b.abs().max()
        assert scale > 0, name
        # float32 kernels with different summation orders: compare relative to the largest entry
        torch.testing.assert_close(a, b, rtol=1e-2, atol=2e-3 * scale, msg=f"gradient of {name}")
