"""Primitives every layer shares, with their conventions written once: splats (raw tensors,
activated in one place), rotations (quaternions wxyz), cameras (OpenCV c2w, pixel intrinsics)
and the real spherical-harmonics basis. Imports torch only."""
