"""DinoTracker / DINOv2 ViT: released key layout, pose math, timm equivalence, losses, preprocessing."""

import math

import numpy as np
import pytest
import torch

from fastavatar.face.tracker_input import IMAGENET_MEAN, IMAGENET_STD, preprocess_for_tracker
from fastavatar.io.checkpoints.tracker import load_backbone_weights
from fastavatar.losses import geodesic_angle, tracker_loss
from fastavatar.models.tracker import DinoTracker, TrackerConfig, rotation_6d_to_matrix
from fastavatar.models.vit import DinoVisionTransformer, ViTConfig
from official_layout import TINY_VIT, official_shapes, random_state, tiny_tracker_config

N = 16


@pytest.fixture(scope="module")
def tiny_tracker():
    tr = DinoTracker(tiny_tracker_config(N, dropout=0.0))
    tr.load_state_dict(random_state("dino", n=N, tiny_vit=True, seed=1), strict=True)
    return tr.eval()


def test_full_size_keys_shapes_and_strict_load_of_official_layout():
    tr = DinoTracker(TrackerConfig())  # ViT-B/14, N = 10144
    ours = {k: list(v.shape) for k, v in tr.state_dict().items()}
    official = official_shapes("dino")
    assert len(ours) == 205
    assert list(ours) == list(official)  # same names, same order
    assert ours == official
    tr.load_state_dict(random_state("dino", seed=0), strict=True)
    assert isinstance(tr.encoder.learn_mean_shape, torch.nn.Parameter)
    assert "encoder.mean_shape" in dict(tr.named_buffers())


def test_forward_shapes_and_pose_is_rotation(tiny_tracker):
    x = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        out = tiny_tracker(x)
    assert out["points"].shape == (3, N, 3)
    assert out["camera_pose"].shape == (3, 4, 4)
    r = out["rotation_matrix"]
    torch.testing.assert_close(r.transpose(1, 2) @ r, torch.eye(3).expand(3, 3, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.linalg.det(r), torch.ones(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(out["camera_pose"][:, :3, :3], r)
    torch.testing.assert_close(out["camera_pose"][:, :3, 3], out["translation"])
    torch.testing.assert_close(out["camera_pose"][:, 3], torch.tensor([0.0, 0, 0, 1]).expand(3, 4))
    assert out["camera_pose_flat"].shape == (3, 12)
    # points = (mean_shape + learn_mean_shape) + 0.1 * head(cls)
    enc = tiny_tracker.encoder
    with torch.no_grad():
        head = enc.points_projector(out["features"]).view(3, N, 3)
    torch.testing.assert_close(out["points"], enc.mean_shape + enc.learn_mean_shape + 0.1 * head)
    # samples are independent (batch of 3 == single)
    with torch.no_grad():
        single = tiny_tracker(x[1:2])
    torch.testing.assert_close(single["points"][0], out["points"][1], atol=1e-5, rtol=1e-5)


def test_6d_rotation_stacks_basis_as_rows():
    d6 = torch.tensor([[0.0, 3.0, 0.0, 0.0, 0.5, 2.0]])  # a1 ~ y, a2 - proj -> z
    r = rotation_6d_to_matrix(d6)[0]
    # rows b1 = y, b2 = z, b3 = y x z = x (columns would give the transpose)
    torch.testing.assert_close(r, torch.tensor([[0.0, 1, 0], [0, 0, 1], [1, 0, 0]]))


def test_geodesic_loss_and_loss_dict():
    a = 0.5
    rz = torch.tensor([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    eye = torch.eye(3)
    torch.testing.assert_close(geodesic_angle(rz[None], eye[None]), torch.tensor([a]), atol=1e-4, rtol=0)
    pred = {"points": torch.zeros(2, N, 3, requires_grad=True), "rotation_matrix": torch.stack([rz, eye]),
            "translation": torch.zeros(2, 3)}
    tgt = {"points": torch.ones(2, N, 3), "rotation_matrix": torch.stack([eye, eye]),
           "translation": torch.ones(2, 3) * 2}
    loss = tracker_loss(pred, tgt)
    torch.testing.assert_close(loss["points"], torch.tensor(1.0))
    assert abs(loss["rotation"].item() - a / 2) < 1e-3  # batch mean of (0.5, ~0)
    torch.testing.assert_close(loss["translation"], torch.tensor(4.0))
    torch.testing.assert_close(loss["total"], loss["points"] + loss["rotation"] + loss["translation"])
    l1 = tracker_loss(pred, {**tgt, "points": torch.full((2, N, 3), -3.0)}, points_loss="l1")
    torch.testing.assert_close(l1["points"], torch.tensor(3.0))
    loss["total"].backward()
    assert pred["points"].grad is not None


def test_every_parameter_gets_a_gradient_and_freeze_dino():
    torch.manual_seed(0)
    tr = DinoTracker(tiny_tracker_config(N)).train()
    out = tr(torch.randn(2, 3, 56, 56))
    tgt = {"points": torch.randn(2, N, 3), "rotation_matrix": torch.eye(3).expand(2, 3, 3),
           "translation": torch.randn(2, 3)}
    tracker_loss(out, tgt)["total"].backward()
    for name, p in tr.named_parameters():
        if name.endswith("mask_token"):  # only used for masked-token pretraining
            assert p.grad is None
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    frozen = DinoTracker(tiny_tracker_config(N, freeze_dino=True))
    tracker_loss(frozen(torch.randn(2, 3, 28, 28)), tgt)["total"].backward()
    assert all(p.grad is None for p in frozen.backbone.parameters())
    assert frozen.encoder.pose_projector[0].weight.grad is not None


def _tiny_timm(img_size):
    timm_vit = pytest.importorskip("timm.models.vision_transformer")
    return timm_vit.VisionTransformer(
        img_size=img_size, patch_size=14, embed_dim=TINY_VIT["embed_dim"], depth=TINY_VIT["depth"],
        num_heads=TINY_VIT["num_heads"], init_values=1.0, num_classes=0, dynamic_img_size=True,
    ).eval()


def test_vit_matches_timm_at_native_grid_and_close_at_224():
    ours = DinoVisionTransformer(ViTConfig(**TINY_VIT)).eval()
    with torch.no_grad():
        ours.pos_embed.normal_(std=0.5)
    ref = _tiny_timm(TINY_VIT["img_size"])
    sd = ours.state_dict()
    sd.pop("mask_token")
    ref.load_state_dict(sd, strict=True)  # identical names minus mask_token
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        a = ours.forward_features(x)
        b = ref.forward_features(x)
    torch.testing.assert_close(a["x_norm_clstoken"], b[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a["x_norm_patchtokens"], b[:, 1:], atol=1e-5, rtol=1e-5)
    # At 224 px the pos_embed is resized: DINOv2 (ours) uses scale factor (g+0.1)/M and no
    # antialias, timm an exact size with antialias -> close but not identical.
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        a = ours.forward_features(x)["x_norm_clstoken"]
        b = ref.forward_features(x)[:, 0]
    assert a.shape == b.shape == (1, TINY_VIT["embed_dim"])
    diff = (a - b).abs().max().item()
    assert 0 < diff < 0.5 * a.abs().max().item()


@pytest.mark.slow
def test_vit_b14_matches_timm_dinov2_at_518():
    timm = pytest.importorskip("timm")
    ours = DinoVisionTransformer(ViTConfig.preset("dinov2_vitb14")).eval()
    ref = timm.create_model("vit_base_patch14_dinov2", pretrained=False, num_classes=0, dynamic_img_size=True).eval()
    sd = ours.state_dict()
    sd.pop("mask_token")
    ref.load_state_dict(sd, strict=True)
    x = torch.randn(1, 3, 518, 518)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x)["x_norm_clstoken"], ref.forward_features(x)[:, 0],
                                   atol=1e-5, rtol=1e-5)


def test_pos_embed_interpolation_uses_dinov2_offset():
    vit = DinoVisionTransformer(ViTConfig(**TINY_VIT))
    with torch.no_grad():
        vit.pos_embed.normal_()
    pe = vit.interpolate_pos_encoding(256, 224, 224)
    assert pe.shape == (1, 257, TINY_VIT["embed_dim"])
    torch.testing.assert_close(pe[:, 0], vit.pos_embed[:, 0])
    assert vit.interpolate_pos_encoding(4, 28, 28) is vit.pos_embed  # native grid: untouched
    exact = DinoVisionTransformer(ViTConfig(**{**TINY_VIT, "interpolate_offset": 0.0}))
    exact.load_state_dict(vit.state_dict())
    assert not torch.allclose(exact.interpolate_pos_encoding(256, 224, 224), pe)


def test_load_backbone_weights(tmp_path):
    tr = DinoTracker(tiny_tracker_config(N))
    with pytest.raises(FileNotFoundError, match=r"dinov2_vitb14_pretrain\.pth.*pretrained_weights/"):
        load_backbone_weights(tr.backbone, tmp_path / "dinov2_vitb14_pretrain.pth")
    src = DinoVisionTransformer(ViTConfig(**TINY_VIT))
    torch.save(src.state_dict(), tmp_path / "dinov2_vitb14_pretrain.pth")
    load_backbone_weights(tr.backbone, tmp_path / "dinov2_vitb14_pretrain.pth")
    torch.testing.assert_close(tr.backbone.blocks[3].attn.qkv.weight, src.blocks[3].attn.qkv.weight)
    wrong = DinoVisionTransformer(ViTConfig(**{**TINY_VIT, "embed_dim": 64}))
    torch.save(wrong.state_dict(), tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="shape mismatches"):
        load_backbone_weights(tr.backbone, tmp_path / "wrong.pth")


def test_preprocess_squash_and_pad():
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    tall = np.zeros((100, 50, 3), dtype=np.uint8)  # black, portrait
    sq = preprocess_for_tracker(tall)
    assert sq.shape == (3, 224, 224)
    torch.testing.assert_close(sq, ((0 - mean) / std).expand(3, 224, 224))  # all black, stretched
    pad = preprocess_for_tracker(tall, mode="pad")
    white = (1 - mean) / std
    torch.testing.assert_close(pad[:, :, :40], white.expand(3, 224, 40))  # white side bars
    torch.testing.assert_close(pad[:, :, 70:150], ((0 - mean) / std).expand(3, 224, 80))
    f = preprocess_for_tracker(np.full((30, 40, 3), 0.25, dtype=np.float32))
    u = preprocess_for_tracker(np.full((30, 40, 3), 64, dtype=np.uint8))
    torch.testing.assert_close(f, u, atol=0.01, rtol=0)
    with pytest.raises(ValueError):
        preprocess_for_tracker(tall, mode="crop")
    from PIL import Image

    torch.testing.assert_close(preprocess_for_tracker(Image.fromarray(tall)), sq)
