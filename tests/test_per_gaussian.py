"""The per-Gaussian refinement stage: template correspondences, visibility, and the optimisation."""

import pytest
import torch

from fastavatar.data import SubjectParser
from fastavatar.inference.per_gaussian import (
    PerGaussianConfig,
    gaussian_contribution,
    reflect_points,
    refine_gaussians,
    template_graph,
)
from fastavatar.losses import photometric_loss
from fastavatar.render import render_splats
from fastavatar.train.template import initial_splats

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def parser306(data_root):
    return SubjectParser(data_root / "306", image_scale=0.125)


def _random_rotation(seed: int) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(seed)))
    return q * torch.sign(torch.diagonal(r))


def test_mirror_is_an_involution_on_a_symmetric_point_set():
    gen = torch.Generator().manual_seed(0)
    half = torch.rand(300, 3, generator=gen) * torch.tensor([0.1, 0.2, 0.15]) + torch.tensor([0.01, 0.0, 0.0])
    other = half * torch.tensor([-1.0, 1.0, 1.0])  # exact mirror images across x = 0
    points = torch.cat([half, other])
    rot, shift = _random_rotation(3), torch.tensor([0.3, -0.2, 1.0])
    moved = points @ rot.T + shift  # the plane is no longer x = 0: it has to be found
    graph = template_graph(moved, num_neighbours=6)
    n = len(points)
    expected = torch.cat([torch.arange(300, 600), torch.arange(0, 300)])
    assert torch.equal(graph.mirror, expected)
    assert torch.equal(graph.mirror[graph.mirror], torch.arange(n))
    true_normal = rot @ torch.tensor([1.0, 0.0, 0.0])
    assert abs(float(graph.plane_normal @ true_normal)) > 0.999
    assert graph.residual < 1e-5
    assert torch.allclose(reflect_points(moved, graph.plane_normal, graph.plane_offset)[:300], moved[300:], atol=1e-5)


def test_mirror_maps_left_to_right_on_the_real_template(parser306):
    points = parser306.points  # the 10144 Gaussian positions of a bundled subject (FLAME-triangle centres)
    graph = template_graph(points)
    m = graph.mirror
    matched = torch.nonzero(m >= 0).squeeze(1)
    assert len(matched) > 0.5 * len(points)  # mutual matches only (the tracked head is not exactly symmetric)
    assert torch.equal(m[m[matched]], matched)  # involution wherever defined
    side = points @ graph.plane_normal - graph.plane_offset
    pairs = matched[m[matched] != matched]
    off_plane = side[pairs].abs() > 0.005
    # partners lie on opposite sides of the plane, at mirrored distances
    assert bool((torch.sign(side[pairs][off_plane]) == -torch.sign(side[m[pairs]][off_plane])).all())
    assert torch.allclose(side[pairs][off_plane], -side[m[pairs]][off_plane], atol=5e-3)
    assert graph.residual < 0.003  # metres: the head is close to mirror-symmetric


def test_neighbours_are_the_nearest_other_points():
    points = torch.rand(200, 3, generator=torch.Generator().manual_seed(1))
    graph = template_graph(points, num_neighbours=5)
    d = torch.cdist(points, points) + torch.eye(200) * 1e9
    expected = d.topk(5, largest=False).indices
    assert torch.equal(torch.sort(graph.neighbours, dim=1).values, torch.sort(expected, dim=1).values)
    assert not bool((graph.neighbours == torch.arange(200)[:, None]).any())


def test_contribution_matches_the_rendered_alpha(parser306):
    splats = initial_splats(parser306)
    c2w, K = parser306.c2w[8:9], parser306.Ks[8:9]
    contrib = gaussian_contribution(splats, c2w, K, parser306.width, parser306.height, backend="torch")
    alpha = render_splats(splats, c2w, K, parser306.width, parser306.height, background=None, backend="torch").alpha
    # sum_i sum_pixels a_i T_i is exactly the summed alpha image
    assert float(contrib.sum()) == pytest.approx(float(alpha.sum()), rel=1e-3)
    assert bool((contrib >= -1e-6).all())


def _stage(parser, cfg, view=8):
    splats = initial_splats(parser)
    with torch.no_grad():  # a prior that is off in colour, so the input view has something to fix
        splats["sh0"] = splats["sh0"] * 0.6
    image = parser.load_image(view)[None]
    c2w, K = parser.c2w[view:view + 1], parser.Ks[view:view + 1]
    result = refine_gaussians(splats, image, c2w, K, parser.width, parser.height, cfg,
                              template_points=parser.points, show_progress=False,
                              render_backend="torch")
    return splats, image, c2w, K, result


def _input_loss(splats, image, c2w, K, parser):
    with torch.no_grad():
        rgb = render_splats(splats, c2w, K, parser.width, parser.height, backend="torch").rgb
    return float(photometric_loss(rgb, image, 0.6, 0.3, 0.0)["total"])


@pytest.mark.slow
def test_stage_lowers_input_view_loss_and_leaves_unseen_gaussians_alone(parser306):
    cfg = PerGaussianConfig(pg_steps=15, pg_position_bound=0.002)
    splats, image, c2w, K, result = _stage(parser306, cfg)
    before = _input_loss(splats, image, c2w, K, parser306)
    after = _input_loss(result.splats, image, c2w, K, parser306)
    assert after < 0.95 * before  # 15 steps at the default (deliberately low) learning rates
    assert result.losses[-1] < result.losses[0]
    hidden = ~result.movable
    assert int(hidden.sum()) > 1000  # camera 08 sees the face, not the back of the head
    for key in splats:
        assert torch.equal(result.splats[key][hidden], splats[key][hidden]), key
    moved = (result.splats["sh0"] - splats["sh0"]).abs().amax(dim=(1, 2)) > 0
    assert int(moved[result.movable].sum()) > 0.5 * int(result.movable.sum())
    # position offsets stay inside the bound
    assert float((result.splats["means"] - splats["means"]).abs().max()) <= cfg.pg_position_bound + 1e-7


def test_flag_turns_the_stage_off(parser306):
    cfg = PerGaussianConfig(per_gaussian=False)
    splats, _, _, _, result = _stage(parser306, cfg)
    assert result.losses == []
    for key in splats:
        assert torch.equal(result.splats[key], splats[key]), key


def test_view_dependent_colour_stays_fixed_by_default(parser306):
    cfg = PerGaussianConfig(pg_steps=2)
    splats, _, _, _, result = _stage(parser306, cfg)
    assert torch.equal(result.splats["shN"], splats["shN"])
    assert not torch.equal(result.splats["sh0"], splats["sh0"])


def test_mismatched_images_are_a_clear_error(parser306):
    splats = initial_splats(parser306)
    with pytest.raises(ValueError, match="do not match"):
        refine_gaussians(splats, torch.zeros(1, 10, 10, 3), parser306.c2w[8:9], parser306.Ks[8:9], parser306.width,
                         parser306.height, PerGaussianConfig(pg_steps=1), show_progress=False, render_backend="torch")


def test_zero_position_bound_keeps_means_fixed(parser306):
    splats, _, _, _, result = _stage(parser306, PerGaussianConfig(pg_steps=2, pg_position_bound=0.0))
    assert torch.equal(result.splats["means"], splats["means"])
    assert not torch.equal(result.splats["sh0"], splats["sh0"])
