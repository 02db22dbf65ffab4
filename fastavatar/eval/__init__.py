"""Evaluation: image metrics (:mod:`.metrics`), scoring a reconstruction against calibrated views
(:mod:`.evaluate`), and the fit-and-score protocol over subjects (:mod:`.protocol`, which runs
guided inference and so sits above :mod:`fastavatar.inference`)."""
