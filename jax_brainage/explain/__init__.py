"""Explanations of brain-age estimates: relevance maps, region tables, figures, `brainage explain`.

Modules (one idea each):
  maps.py      METHODS (every lrp composite + gradient baselines), `relevance` / `Explainer`
               (jitted, batched, data-parallel), ensembles (`ensemble_maps`: members by vmap,
               sub-ensembles and the ensemble weighted by the head), `to_subject_space`
  regions.py   mean / sum / positive relevance per atlas label, per subject and group (bincount)
  figures.py   the study's colour map, slice montages over the anatomy, glass brains, TensorBoard
  command.py   `brainage explain`: subject-space NIfTI maps, group maps (age bands, participants
               columns), region tables, figures and an index JSON
  evaluate.py  ground-truth evaluation of explanation methods on the simulated cohort
"""

from __future__ import annotations
