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

from jax_brainage.ensemble.correction import Correction, fit_correction, gap_metrics
from jax_brainage.ensemble.head import (LinearHead, MultiLevelHead, fit_linear_head,
                                        fit_multilevel, member_spread)
from jax_brainage.ensemble.relevance import (EnsembleRelevance, ensemble_relevance,
                                             member_relevance)
from jax_brainage.ensemble.store import (Ensemble, EnsemblePrediction, SubEnsemble,
                                         ensemble_metrics, fit_ensemble,
                                         fit_ensemble_from_predictions, is_ensemble_workdir,
                                         load_ensemble, load_sub_ensemble, save_ensemble)

__all__ = [
    "Correction", "fit_correction", "gap_metrics",
    "LinearHead", "MultiLevelHead", "fit_linear_head", "fit_multilevel", "member_spread",
    "EnsembleRelevance", "ensemble_relevance", "member_relevance",
    "Ensemble", "EnsemblePrediction", "SubEnsemble", "ensemble_metrics", "fit_ensemble",
    "fit_ensemble_from_predictions", "is_ensemble_workdir", "load_ensemble", "load_sub_ensemble",
    "save_ensemble",
]
