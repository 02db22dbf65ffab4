"""Inference: feed-forward single-photo reconstruction (:mod:`.feedforward`), test-time
refinement of a decoded head (:mod:`.refine`), and FLAME-guided inference on a calibrated
subject (:mod:`.guided`)."""
