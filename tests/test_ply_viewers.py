"""Our splats.ply must open in PlayCanvas splat-transform (SuperSplat's loader).

Runs when node and splat-transform are present (`.ci/run` installs it into tools/splat-transform).
"""

import numpy as np
import pytest
import torch

from fastavatar.io.ply import save_ply
from viewer_check import find_splat_transform, read_with_splat_transform

pytestmark = pytest.mark.skipif(find_splat_transform() is None,
                                reason="node/splat-transform not installed (npm install --prefix tools/splat-transform)")


def test_splat_transform_reads_every_column_we_wrote(tmp_path):
    g = torch.Generator().manual_seed(3)
    n = 64
    quats = torch.nn.functional.normalize(torch.randn(n, 4, generator=g), dim=1)
    splats = {"means": torch.randn(n, 3, generator=g), "quats": torch.where(quats[:, :1] < 0, -quats, quats),
              "scales": torch.randn(n, 3, generator=g) - 4, "opacities": torch.randn(n, generator=g),
              "sh0": torch.randn(n, 1, 3, generator=g), "shN": torch.randn(n, 15, 3, generator=g) * 0.2}
    save_ply(tmp_path / "splats.ply", splats)
    cols = read_with_splat_transform(tmp_path / "splats.ply")
    assert len(cols["x"]) == n
    np.testing.assert_allclose(np.stack([cols[c] for c in "xyz"], 1), splats["means"].numpy(), atol=1e-5)
    np.testing.assert_allclose(cols["opacity"], splats["opacities"].numpy(), atol=1e-5)
    np.testing.assert_allclose(np.stack([cols[f"scale_{i}"] for i in range(3)], 1), splats["scales"].numpy(), atol=1e-5)
    np.testing.assert_allclose(np.stack([cols[f"rot_{i}"] for i in range(4)], 1), splats["quats"].numpy(), atol=1e-5)
    np.testing.assert_allclose(np.stack([cols[f"f_dc_{i}"] for i in range(3)], 1), splats["sh0"][:, 0].numpy(), atol=1e-5)
    # channel-major f_rest: f_rest_15 is the first green coefficient
    np.testing.assert_allclose(cols["f_rest_15"], splats["shN"][:, 0, 1].numpy(), atol=1e-5)
    np.testing.assert_allclose(cols["f_rest_44"], splats["shN"][:, 14, 2].numpy(), atol=1e-5)


def test_sample_template_scale_ply_opens(tmp_path, data_root):
    from fastavatar.data import SubjectParser
    from fastavatar.train.template import initial_splats

    parser = SubjectParser(data_root / "306", image_scale=0.125)
    splats = initial_splats(parser)
    save_ply(tmp_path / "splats.ply", splats)
    cols = read_with_splat_transform(tmp_path / "splats.ply")
    assert len(cols["x"]) == 10144
