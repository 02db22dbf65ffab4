import pytest
import torch

from fastavatar import losses
from fastavatar.eval.metrics import image_metrics, mean_metrics, psnr


def test_psnr_known_value_and_mask():
    a = torch.zeros(4, 4, 3)
    b = torch.full((4, 4, 3), 0.1)
    assert psnr(a, b) == pytest.approx(20.0, abs=1e-4)
    mask = torch.zeros(4, 4, 1)
    mask[:2] = 1
    b2 = b.clone()
    b2[2:] = 0.5  # error outside the mask is ignored
    assert psnr(a, b2, mask) == pytest.approx(20.0, abs=1e-4)


def test_ssim_identical_is_one_and_loss_parts():
    img = torch.rand(1, 32, 32, 3)
    assert float(losses.ssim(img, img)) == pytest.approx(1.0, abs=1e-5)
    parts = losses.photometric_loss(img, img * 0.5, 0.6, 0.3, 0.1, None)
    assert "lpips" not in parts
    expected = 0.6 * parts["l1"] + 0.3 * parts["ssim"]
    assert torch.allclose(parts["total"], expected)


def test_regularisers_pull_toward_zero():
    deltas = {"scales": torch.tensor([[-1.0, 1.0, 0.0]]), "means": torch.tensor([[0.02, -0.02, 0.0]])}
    regs = losses.delta_regularisers(deltas, scale_reg=2.0, pos_reg=1.0)
    assert regs["scale_reg"] == pytest.approx(2.0 * 2 / 3)
    assert regs["pos_reg"] == pytest.approx(0.04 / 3)
    zero = losses.delta_regularisers({"scales": torch.zeros(1, 3), "means": torch.zeros(1, 3)}, 1.0, 1.0)
    assert float(zero["scale_reg"]) == 0.0  # the original's mean(exp(Δ)) would be 1 here


def test_lpips_absent_trunk_message(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    losses._LPIPS_CACHE.clear()
    assert losses.load_lpips("alex") is None
    out = capsys.readouterr().out
    assert "alexnet-owt-7be5be79.pth" in out and str(tmp_path) in out
    with pytest.raises(FileNotFoundError, match="alexnet-owt-7be5be79.pth"):
        losses._LPIPS_CACHE.clear()
        losses.load_lpips("alex", required=True)


def test_lpips_loads_trunk_from_hub_cache_and_uses_minus_one_one(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    losses._LPIPS_CACHE.clear()
    trunk = torchvision.models.alexnet(weights=None)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(trunk.state_dict(), tmp_path / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth")
    model = losses.load_lpips("alex")
    assert model is not None
    assert torch.equal(model.net.slice1[0].weight, trunk.features[0].weight)
    assert torch.equal(getattr(model.net.slice5, "10").weight, trunk.features[10].weight)
    a, b = torch.rand(1, 64, 64, 3), torch.rand(1, 64, 64, 3)
    d = losses.lpips_distance(model, a, b)
    direct = model(a.permute(0, 3, 1, 2) * 2 - 1, b.permute(0, 3, 1, 2) * 2 - 1).mean()
    assert torch.allclose(d, direct, atol=1e-6)
    assert float(losses.lpips_distance(model, a, a)) == pytest.approx(0.0, abs=1e-6)
    m = image_metrics(a[0], b[0], None, model)
    assert m["lpips"] == pytest.approx(float(d), abs=1e-5)
    losses._LPIPS_CACHE.clear()


def test_mean_metrics_handles_missing_lpips():
    rows = [{"psnr": 20.0, "ssim": 0.5, "lpips": None}, {"psnr": 30.0, "ssim": 0.7, "lpips": None}]
    assert mean_metrics(rows) == {"psnr": 25.0, "ssim": pytest.approx(0.6), "lpips": None}
