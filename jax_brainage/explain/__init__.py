"""Explanations of brain-age estimates: relevance maps, region tables, figures, ground-truth scores.

Modules (one idea each):
  maps.py        METHODS (every lrp composite + gradient baselines), `relevance` / `Explainer`
                 (jitted, batched, data-parallel), ensembles (`ensemble_maps`: members by vmap,
                 sub-ensembles and the ensemble weighted by the head), `to_subject_space`
  regions.py     mean / sum / positive relevance per atlas label, per subject and group (bincount)
  figures.py     the study's colour map, slice montages over the anatomy, glass brains, TensorBoard
  groups.py      groups of subjects (age bands, participants columns) and their mean maps
  derivative.py  `Target` (a trained workdir and how new data becomes its inputs) and
                 `explain_dataset`: the BIDS derivative `brainage explain` writes (subject-space
                 NIfTI maps, group maps, region tables, figures, an index JSON)
  truth.py       the simulated cohort's ground-truth masks carried into the network's cube
  scoring.py     scores of maps: mass / rank accuracy, region perturbation, the sanity check, and
                 their tables, JSON record and plot
  evaluate.py    `evaluate` / `evaluate_explanations`: prepare, explain and score held-out
                 simulated subjects with every method (`brainage evaluate-explanations`)
The command lines are jax_brainage/commands/explain.py and evaluate_explanations.py.
"""

from __future__ import annotations
