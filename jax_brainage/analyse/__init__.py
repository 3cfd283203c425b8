"""Brain-age-gap analysis and the HTML report.

gap:      `brainage analyze`: OLS of the (bias-corrected) gap on covariates, CIs and p-values.
truth:    on a simulated cohort, the effects the analysis should recover (generative, latent gap,
          oracle predictors).
forest:   forest plot, bias plot (PNG).
report:   one static HTML report (metrics, figures, tables) of a workdir.
"""

from __future__ import annotations

from jax_brainage.analyse.gap import GapRegression, gap_regression, ols
from jax_brainage.analyse.report import write_report

__all__ = ["GapRegression", "gap_regression", "ols", "write_report"]
