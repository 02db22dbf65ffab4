"""Animate a reconstructed head with FLAME: binding, Gaussian blendshapes, rig I/O, sequences."""

from fastavatar.animate.binding import Binding, bind_splats, place_splats, rotate_sh  # noqa: F401
from fastavatar.animate.blendshapes import (  # noqa: F401
    PackedRig,
    build_rig,
    evaluate_rig,
    evaluate_rig_reference,
    mesh_rig_splats,
    pack_rig,
    source_exact_rest,
)
from fastavatar.animate.rig import RIG_VERSION, Rig, RigError, load_rig, save_rig  # noqa: F401
from fastavatar.animate.sequence import (  # noqa: F401
    AnimateConfig,
    DemoSequenceConfig,
    demo_sequence,
    load_flame_sequence,
    render_sequence,
)
