"""fastavatar: one photo of a face in, a 3D Gaussian-splat head out.

Importing the package never needs CUDA; gsplat is loaded lazily by the renderer.
"""

__version__ = "0.1.0"

NUM_TEMPLATE_GAUSSIANS = 10144
"""One Gaussian per triangle of VHAP's FLAME-with-teeth mesh (9976 FLAME + 168 teeth faces)."""
