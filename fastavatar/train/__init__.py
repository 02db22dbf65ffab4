"""Training: the decoder, W-encoder and tracker trainers, what they share (:mod:`.common`), and the
canonical-template fit (:mod:`.template`)."""
