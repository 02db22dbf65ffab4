"""Tiny stand-ins for the insightface ``buffalo_l`` pack, built by the tests themselves.

Nothing here is a real face model. The two ONNX files have the *interfaces* of the real ones
so that the production code path (``insightface.model_zoo.get_model`` -> ``SCRFD.detect`` /
``ArcFaceONNX.get`` -> onnxruntime) runs unchanged:

- ``det_10g.onnx``: an SCRFD-shaped detector (9 outputs: scores / box distances / keypoint
  distances for strides 8, 16, 32, two anchors per location). It "detects" one face centred
  on the non-black content of the (letter-boxed) detector input, sized from the content
  extent, with the five ArcFace template landmarks placed inside the box. A uniform image
  (no texture) gives no detection.
- ``w600k_r50.onnx``: 112x112 BGR crop -> 512-d vector (a strided conv + linear layer with
  fixed random weights), so different crops give different embeddings.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

# ArcFace 5-point template in the 112x112 crop (eye, eye, nose, mouth corner, mouth corner).
_ARCFACE_TEMPLATE = torch.tensor(
    [[38.29, 51.70], [73.53, 51.50], [56.03, 71.74], [41.55, 92.37], [70.73, 92.20]]
)


class _TinySCRFD(nn.Module):
    """[1, 3, H, W] normalised RGB -> 9 SCRFD outputs (see module docstring)."""

    strides = (8, 16, 32)
    sigma = 20.0  # anchor-to-centre fall-off (pixels): the anchors nearest the centre fire

    def forward(self, x: torch.Tensor):
        # Letter-box padding is exactly 0 after (0 - 127.5) / 128 -> about -1 per channel.
        mask = (x.sum(dim=1) > -2.95).float()  # [1, H, W]
        ones = torch.ones_like(mask)
        ys = ones.cumsum(dim=1) - 1.0
        xs = ones.cumsum(dim=2) - 1.0
        area = mask.sum().clamp_min(1.0)
        cx = (xs * mask).sum() / area
        cy = (ys * mask).sum() / area
        width_c = (xs * mask).amax() + 1.0
        height_c = (ys * mask).amax() + 1.0
        mean = (x * mask[:, None]).sum() / (3.0 * area)
        var = (((x - mean) ** 2) * mask[:, None]).sum() / (3.0 * area)
        gate = torch.sigmoid((var.clamp_min(0.0).sqrt() - 0.05) * 200.0)

        box_w = 0.5 * torch.minimum(width_c, height_c)
        box_h = 1.2 * box_w
        x0 = cx - 0.5 * box_w
        y0 = cy - 0.5 * box_h
        x1 = cx + 0.5 * box_w
        y1 = cy + 0.5 * box_h
        tmpl = _ARCFACE_TEMPLATE.to(x) / 112.0
        kx = x0 + tmpl[:, 0] * box_w  # [5]
        ky = y0 + tmpl[:, 1] * box_h  # [5]

        scores, boxes, kpss = [], [], []
        for stride in self.strides:
            grid = ones[:, ::stride, ::stride]
            ay = ((grid.cumsum(dim=1) - 1.0) * stride).reshape(-1)
            ax = ((grid.cumsum(dim=2) - 1.0) * stride).reshape(-1)
            ax = torch.stack([ax, ax], dim=-1).reshape(-1, 1)  # two anchors per location
            ay = torch.stack([ay, ay], dim=-1).reshape(-1, 1)
            dist2 = (ax - cx) ** 2 + (ay - cy) ** 2
            score = torch.exp(-dist2 / (2.0 * self.sigma**2)) * gate
            if stride != 32:
                score = score * 0.0
            scores.append(score)
            boxes.append(torch.cat([ax - x0, ay - y0, x1 - ax, y1 - ay], dim=1) / stride)
            kp = torch.stack([kx[None, :] - ax, ky[None, :] - ay], dim=-1).reshape(-1, 10)
            kpss.append(kp / stride)
        return tuple(scores + boxes + kpss)


class _TinyArcFace(nn.Module):
    """[B, 3, 112, 112] -> [B, 512]."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, kernel_size=4, stride=4)
        self.fc = nn.Linear(8 * 28 * 28, 512)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


def build_tiny_detector(path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = [f"{kind}_{s}" for kind in ("score", "bbox", "kps") for s in (8, 16, 32)]
    dyn = {"input.1": {2: "height", 3: "width"}}
    dyn.update({n: {0: f"n_{n}"} for n in names})
    torch.onnx.export(
        _TinySCRFD().eval(),
        (torch.zeros(1, 3, 640, 640),),
        str(path),
        input_names=["input.1"],
        output_names=names,
        dynamic_axes=dyn,
        opset_version=17,
        dynamo=False,
    )
    return path


def build_tiny_recognizer(path: Path, seed: int = 0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = _TinyArcFace().eval()
    torch.onnx.export(
        model,
        (torch.zeros(1, 3, 112, 112),),
        str(path),
        input_names=["input.1"],
        output_names=["embedding"],
        dynamic_axes={"input.1": {0: "batch"}, "embedding": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    return path


def build_tiny_buffalo(model_dir: Path) -> Path:
    """Write ``det_10g.onnx`` + ``w600k_r50.onnx`` stand-ins into ``model_dir``; return it."""
    model_dir = Path(model_dir)
    build_tiny_detector(model_dir / "det_10g.onnx")
    build_tiny_recognizer(model_dir / "w600k_r50.onnx")
    return model_dir


def insightface_sample_image(name: str) -> Path:
    """Path of a face photo shipped inside the insightface wheel (t1.jpg, Tom_Hanks_54745.png)."""
    import insightface

    return Path(insightface.__file__).parent / "data" / "images" / name
