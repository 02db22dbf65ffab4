"""Files: atomic writes, PLY, plain-data configs, unpickling, state-dict checks, media, and (in
:mod:`fastavatar.io.checkpoints`, above the networks) the checkpoint readers and writers.

Import the submodules directly; this package imports nothing, so lower layers can use
:mod:`fastavatar.io.atomic` without pulling in the networks.
"""
