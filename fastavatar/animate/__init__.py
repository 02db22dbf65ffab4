"""Animate a reconstructed head with FLAME: binding, Gaussian blendshapes, rig I/O, sequences."""

from fastavatar.animate.binding import Binding, bind_splats, place_splats, rotate_sh  # noqa: F401
from fastavatar.animate.blendshapes import build_rig, evaluate_rig, mesh_rig_splats, source_exact_rest  # noqa: F401
from fastavatar.animate.rig import RIG_VERSION, Rig, RigError, load_rig, save_rig  # noqa: F401
from fastavatar.animate.sequence import (  # noqa: F401
    AnimateConfig,
    DemoConfig,
    demo_sequence,
    load_flame_sequence,
    render_sequence,
)
