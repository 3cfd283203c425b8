"""Ensembles of brain-age models: many members trained at once, sub-ensembles per sequence and
region, a multi-level linear head, bias correction of the brain-age gap.

Modules (one idea each):
  head.py        head models: least squares (optionally non-negative) and the multi-level head
  correction.py  bias correction of the brain-age gap (linear, degree-3 polynomial) and metrics
  model.py       the ensemble as a model (sub-ensembles, head, correction; jitted forward); a
                 single trained model is an ensemble of one
  store.py       the ensemble store W/ensemble (one orbax checkpoint + manifest)

Nothing here trains: `jax_brainage.train.experiment` trains an ensemble experiment (sub-ensembles
of stacked members, head, correction, store). Loading any trained workdir is
`jax_brainage.train.artifact.load`; ensemble relevance is `jax_brainage.explain.maps.ensemble_maps`.
"""

from __future__ import annotations

from jax_brainage.ensemble.correction import Correction, fit_correction, gap_metrics
from jax_brainage.ensemble.head import (LinearHead, MultiLevelHead, fit_linear_head,
                                        fit_multilevel, member_spread)
from jax_brainage.ensemble.model import (Ensemble, EnsemblePrediction, SubEnsemble,
                                         ensemble_metrics, fit_ensemble,
                                         fit_ensemble_from_predictions)
from jax_brainage.ensemble.store import is_ensemble_workdir, load_ensemble, save_ensemble

__all__ = [
    "Correction", "fit_correction", "gap_metrics",
    "LinearHead", "MultiLevelHead", "fit_linear_head", "fit_multilevel", "member_spread",
    "Ensemble", "EnsemblePrediction", "SubEnsemble", "ensemble_metrics", "fit_ensemble",
    "fit_ensemble_from_predictions", "is_ensemble_workdir", "load_ensemble", "save_ensemble",
]
