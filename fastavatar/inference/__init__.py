"""Inference: feed-forward single-photo reconstruction (:mod:`fastavatar.inference.feedforward`)."""

from fastavatar.inference.feedforward import (
    FeedForwardConfig,
    FeedForwardModels,
    FeedForwardResult,
    load_models,
    predicted_intrinsics,
    run,
    run_photo,
    splat_statistics,
)

__all__ = [
    "FeedForwardConfig",
    "FeedForwardModels",
    "FeedForwardResult",
    "load_models",
    "predicted_intrinsics",
    "run",
    "run_photo",
    "splat_statistics",
]
