"""Compression of MoE models: calibration (:mod:`.calibrate`), expert pruning (:mod:`.prune`) and merging
(:mod:`.merge`); quantisation lives in ``quant*.py`` beside them.

Import the submodules (``from moekit.compress import calibrate``; ``calibrate.calibrate(model, batches)``):
the package does not re-export their functions, so the module names stay modules.
"""
