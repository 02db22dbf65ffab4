"""WEncoder: released key layout, released math, batch-of-one training."""

import torch
import torch.nn.functional as F

from fastavatar.models.w_encoder import WEncoder
from official_layout import official_shapes, random_state


def reference_forward_eval(sd, x):
    """Released ViewInvariantEncoder.forward in eval mode, from the spec (§1.3)."""
    h = F.normalize(x, dim=1)
    for lin, bn in ((0, 1), (4, 5), (8, 9)):
        h = h @ sd[f"projector.{lin}.weight"].T + sd[f"projector.{lin}.bias"]
        h = (h - sd[f"projector.{bn}.running_mean"]) / torch.sqrt(sd[f"projector.{bn}.running_var"] + 1e-5)
        h = F.relu(h * sd[f"projector.{bn}.weight"] + sd[f"projector.{bn}.bias"])
    return (h @ sd["projector.11.weight"].T + sd["projector.11.bias"]) * sd["temperature"]


def test_keys_and_shapes_match_official_layout():
    enc = WEncoder()
    ours = {k: list(v.shape) for k, v in enc.state_dict().items()}
    assert ours == official_shapes("encoder")
    assert sorted(ours) == sorted(official_shapes("encoder"))
    assert len(ours) == 24
    assert sum(p.numel() for p in enc.parameters()) == 1973505


def test_strict_load_and_released_math():
    sd = random_state("encoder", seed=2)
    enc = WEncoder.from_state_dict(sd).eval()
    x = torch.randn(4, 512) * 7.0  # raw (unnormalised) ArcFace embedding
    with torch.no_grad():
        out = enc(x)
    torch.testing.assert_close(out, reference_forward_eval(sd, x), rtol=1e-4, atol=1e-5)
    # input normalisation: the scale of the embedding does not matter
    torch.testing.assert_close(enc(x * 3.0), out, rtol=1e-4, atol=1e-5)


def test_batch_of_one_training_step_works_and_batch_stats_for_larger_batches():
    torch.manual_seed(0)
    enc = WEncoder().train()
    opt = torch.optim.Adam(enc.parameters(), lr=1e-3)
    before = enc.projector[1].running_mean.clone()
    w = enc(torch.randn(1, 512))
    loss = (1 - F.cosine_similarity(w, torch.randn(1, 512))).mean()
    loss.backward()
    assert all(p.grad is not None for p in enc.parameters())
    opt.step()
    # batch of one: running stats untouched (normalised with them instead)
    torch.testing.assert_close(enc.projector[1].running_mean, before)
    # batch of 8: ordinary BatchNorm (running stats updated, every param gets a grad)
    enc.zero_grad()
    out = enc(torch.randn(8, 512))
    out.square().mean().backward()
    assert not torch.allclose(enc.projector[1].running_mean, before)
    for name, p in enc.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_batch_of_one_in_train_mode_equals_eval_without_dropout():
    enc = WEncoder.from_state_dict(random_state("encoder", seed=4))
    x = torch.randn(1, 512)
    enc.eval()
    ref = enc(x)
    enc.train()
    for m in enc.modules():
        if isinstance(m, torch.nn.Dropout):
            m.eval()
    torch.testing.assert_close(enc(x), ref)
