"""jax-brainage: brain age from structural MRI with ensembles of 3D CNNs, explained with LRP.

Stages, in pipeline order: `data` (simulated cohort, NIfTI, cache, grain pipeline) -> models ->
train -> ensemble -> explain -> analyse. The LRP library is the separate top-level package `lrp`.
"""

__version__ = "0.1.0"
