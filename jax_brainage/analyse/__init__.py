"""Brain-age-gap analysis and the HTML report.

tables:      reading TSVs keyed by participant_id, cell values, the predictions/participants join.
regression:  covariate coding, the design matrix and OLS (classical or HC3 SEs, CIs, p-values).
gap:         the gap against covariates (`brainage analyze`): fit, gap_effects.tsv/.json, forest.
truth:       on a simulated cohort, the effects the analysis should recover (generative, latent
             gap, oracle predictors).
forest:      forest plot, bias plot (PNG).
report:      one static HTML report (metrics, figures, tables) of a workdir.
"""

from __future__ import annotations

from jax_brainage.analyse.gap import gap_regression
from jax_brainage.analyse.regression import GapRegression, ols
from jax_brainage.analyse.report import write_report

__all__ = ["GapRegression", "gap_regression", "ols", "write_report"]
