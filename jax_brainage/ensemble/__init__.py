"""Ensembles of brain-age models: many members trained at once, sub-ensembles per sequence and
region, a multi-level linear head, bias correction of the brain-age gap, ensemble relevance.

Modules (one idea each):
  head.py        head models: least squares (optionally non-negative) and the multi-level head
  correction.py  bias correction of the brain-age gap (linear, degree-3 polynomial) and metrics
  store.py       the ensemble store W/ensemble (one orbax checkpoint + manifest), jitted forward
  relevance.py   LRP of every member in one jitted vmap; the ensemble's head-weighted relevance
  experiment.py  training an ensemble experiment (sub-ensembles, head, correction, store)
"""

from __future__ import annotations
