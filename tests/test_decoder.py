"""GaussianDecoder: released key layout, released math, batching, chunking, gradients."""

import pytest
import torch
import torch.nn.functional as F

from fastavatar.models.decoder import DecoderConfig, GaussianDecoder, infer_decoder_config
from fastavatar.core.splats import validate_splats
from official_layout import OFFICIAL_N, official_shapes, random_decoder_state, random_template

N = 64


def reference_forward(sd, w):
    """The released CondGaussianSplatting.forward for B=1, written from the spec (§1.1-1.2)
    directly on the state-dict tensors: w.expand -> concat embeddings -> body -> heads."""
    emb = sd["gaussian_embeddings.weight"]
    x = torch.cat([w.expand(emb.shape[0], -1), emb], dim=1)
    for i in (0, 2, 4, 6, 8, 10):
        x = F.relu(x @ sd[f"conditioning_mlp.shared_body.{i}.weight"].T + sd[f"conditioning_mlp.shared_body.{i}.bias"])

    def head(name):
        p = f"conditioning_mlp.{name}_head."
        h = F.relu(x @ sd[p + "0.weight"].T + sd[p + "0.bias"])
        return h @ sd[p + "2.weight"].T + sd[p + "2.bias"]

    color = head("color")
    return {
        "means_delta": torch.tanh(head("means")) * 0.1,
        "quats": sd["base_rotations"] + head("rotation"),
        "scales": sd["base_scales"] + head("scale"),
        "sh0": sd["base_sh0"] + color[:, :3].view(-1, 1, 3),
        "shN": sd["base_shN"] + color[:, 3:].view(-1, 15, 3),
        "opacities": sd["base_opacity"] + head("opacity").squeeze(-1),
    }


def test_state_dict_keys_and_shapes_match_official_layout_exactly():
    dec = GaussianDecoder(random_template(N))
    ours = {k: list(v.shape) for k, v in dec.state_dict().items()}
    official = {k: [N if d == OFFICIAL_N else d for d in s] for k, s in official_shapes("decoder").items()}
    assert list(ours) == list(official)  # same keys, same order
    assert ours == official
    n_mlp = sum(p.numel() for p in dec.conditioning_mlp.parameters())
    assert n_mlp == 812603  # released Hypernet parameter count


def test_buffers_variant_keeps_names():
    dec = GaussianDecoder(random_template(N), DecoderConfig(optimize_base_gaussians=False))
    assert list(dec.state_dict()) == list(official_shapes("decoder"))
    assert "base_scales" in dict(dec.named_buffers())
    assert "base_scales" not in dict(dec.named_parameters())


def test_strict_load_and_matches_released_math():
    sd = random_decoder_state(N, seed=3)
    dec = GaussianDecoder.from_state_dict(sd).double()  # float64: compare the math, not rounding
    sd64 = {k: v.double() for k, v in sd.items()}
    w = torch.randn(1, 512, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        out = dec(w)
        ref = reference_forward(sd64, w)
    for key, value in ref.items():
        torch.testing.assert_close(out[key][0], value, rtol=1e-10, atol=1e-10, msg=key)
    # the deltas are not trivially zero with these weights
    assert out["raw_deltas"]["scales"].abs().mean() > 1e-3


def test_from_state_dict_needs_no_ply_and_infers_sizes():
    sd = random_decoder_state(N)
    cfg = infer_decoder_config(sd)
    assert cfg == dict(w_dim=512, embedding_dim=32, hidden_dim=256, body_layers=6, head_layers=1, sh_degree=3)
    dec = GaussianDecoder.from_state_dict(sd)
    assert dec.num_gaussians == N
    torch.testing.assert_close(dec.splats["means"], sd["splats.means"])


def test_batch_equals_single_calls_and_chunking_is_exact():
    sd = random_decoder_state(N, seed=5)
    dec = GaussianDecoder.from_state_dict(sd)
    chunked = GaussianDecoder.from_state_dict(sd, gaussians_per_round=10)  # 7 chunks, last partial
    w = torch.randn(3, 512, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        batch = dec(w)
        batch_chunked = chunked(w)
        for b in range(3):
            single = dec(w[b : b + 1])
            for key in ("means_delta", "quats", "scales", "sh0", "shN", "opacities"):
                torch.testing.assert_close(batch[key][b], single[key][0], rtol=1e-4, atol=1e-4)
    for key in ("means_delta", "quats", "scales", "sh0", "shN", "opacities"):
        torch.testing.assert_close(batch_chunked[key], batch[key], rtol=1e-4, atol=1e-4)
        assert batch[key].shape[:2] == (3, N)
    # the three identities give different outputs
    assert (batch["scales"][0] - batch["scales"][1]).abs().max() > 1e-4


def test_decode_adds_points_and_returns_valid_splats():
    sd = random_decoder_state(N, seed=7)
    dec = GaussianDecoder.from_state_dict(sd)
    w = torch.randn(2, 512)
    pts = torch.randn(2, N, 3)
    with torch.no_grad():
        out = dec(w)
        splats = dec.decode(w, pts)
        default = dec.decode(w[0])
    assert len(splats) == 2
    for b, s in enumerate(splats):
        assert validate_splats(s) == N
        torch.testing.assert_close(s["means"], pts[b] + out["means_delta"][b])
    assert out["means_delta"].abs().max() <= 0.1 + 1e-7
    torch.testing.assert_close(default[0]["means"], sd["splats.means"] + out["means_delta"][0])
    batched = dec.decode(w, pts[0], batched=True)
    assert batched["means"].shape == (2, N, 3)
    with pytest.raises(ValueError):
        dec.decode(w, torch.randn(N + 1, 3))
    with pytest.raises(ValueError):
        dec(torch.randn(2, 100))


def test_original_init_reproduces_template_and_zero_out_is_exact():
    tpl = random_template(N)
    for init in ("original", "zero_out"):
        dec = GaussianDecoder(tpl, DecoderConfig(init=init))
        with torch.no_grad():
            out = dec(torch.randn(2, 512))
        tol = 0.0 if init == "zero_out" else 1e-6
        assert (out["scales"] - tpl["scales"]).abs().max() <= tol
        assert (out["opacities"] - tpl["opacities"]).abs().max() <= tol
        assert out["means_delta"].abs().max() <= tol
    emb = GaussianDecoder(tpl).gaussian_embeddings.weight
    lo, hi = tpl["means"].min(0).values, tpl["means"].max(0).values
    torch.testing.assert_close(emb[:, :3], (tpl["means"] - lo) / (hi - lo))
    assert 0.01 < emb[:, 3:].std() < 0.03


def test_construction_is_deterministic_and_leaves_global_rng_alone():
    tpl = random_template(N)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = GaussianDecoder(tpl, DecoderConfig(seed=4))
    after = torch.rand(3)
    b = GaussianDecoder(tpl, DecoderConfig(seed=4))
    c = GaussianDecoder(tpl, DecoderConfig(seed=5))
    torch.testing.assert_close(after, expected)
    for (k, va), vb, vc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(va, vb), k
    assert not torch.equal(a.gaussian_embeddings.weight, c.gaussian_embeddings.weight)


def test_every_trainable_parameter_and_w_get_gradients():
    dec = GaussianDecoder.from_state_dict(random_decoder_state(N, seed=9))
    w = torch.randn(2, 512, requires_grad=True)
    out = dec(w)
    loss = sum(out[k].square().mean() for k in ("means_delta", "quats", "scales", "sh0", "shN", "opacities"))
    loss.backward()
    trainable = [(n, p) for n, p in dec.named_parameters() if p.requires_grad]
    assert len(trainable) == 5 + 1 + 2 * (6 + 5 * 2)  # base_* + embeddings + MLP
    for name, p in trainable:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert w.grad is not None and w.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in dec.named_parameters() if n.startswith("splats."))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    sd = random_decoder_state(N, seed=13)
    dec = GaussianDecoder.from_state_dict(sd)
    w = torch.randn(2, 512)
    with torch.no_grad():
        cpu = dec(w)
        gpu = dec.cuda()(w.cuda())
    for key in ("means_delta", "quats", "scales", "sh0", "shN", "opacities"):
        torch.testing.assert_close(gpu[key].cpu(), cpu[key], rtol=1e-3, atol=1e-3)


def test_template_splats_are_the_base_parameters_at_given_points():
    n = 20
    gen = torch.Generator().manual_seed(0)
    template = {"means": torch.randn(n, 3, generator=gen), "quats": torch.randn(n, 4, generator=gen),
                "scales": torch.randn(n, 3, generator=gen), "opacities": torch.randn(n, generator=gen),
                "sh0": torch.randn(n, 1, 3, generator=gen), "shN": torch.randn(n, 15, 3, generator=gen)}
    decoder = GaussianDecoder(template, DecoderConfig(hidden_dim=8, body_layers=1, gaussians_per_round=n))
    points = torch.randn(n, 3, generator=gen)
    out = decoder.template_splats(points)
    assert torch.equal(out["means"], points) and torch.equal(out["scales"], template["scales"])
    assert torch.equal(decoder.template_splats()["means"], template["means"])
    assert not any(v.requires_grad for v in out.values())
