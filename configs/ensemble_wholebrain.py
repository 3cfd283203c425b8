"""The study's whole-brain ensemble: 3 sequences (T1w, FLAIR, SWI) x N members of MRInet at 2 mm,
a multi-level linear head fit by cross-validation on the validation predictions, and a linear
bias correction of the brain-age gap.

Command (simulates the study-sized cohort of 2637 subjects at 2 mm with all three sequences on
first use; or point it at a prepared cache with --config.data.cache DIR --config.data.simulate.n 0):

    brainage train --config configs/ensemble_wholebrain.py --workdir runs/ensemble_wholebrain

Argument: `configs/ensemble_wholebrain.py:N` sets the members per sequence (default 10, as in
the study); e.g. `:3` for a quick run.

Expected: W/sub/t1, W/sub/flair, W/sub/swi (each sub-ensemble's N members stacked and
trained at once: one vmapped step per batch, members spread over the devices' 'ensemble' axis,
as many per step as fit in device memory), then W/ensemble and W/metrics.json (member,
sub-ensemble and ensemble validation MAE, corrected MAE, Spearman gap-age). The study reports
ensemble MAEs of 3.37-3.86 years on LIFE (real data); on the simulated cohort the ensemble should
beat its best member. Budget: N x 3 single-model trainings of configs/mrinet_2mm.py worth of
compute, less the per-step overhead that training members at once saves (benchmarks/
bench_ensemble.py measures it); an accelerator is needed.
"""

from __future__ import annotations

from pathlib import Path

from jax_brainage.train.config_loading import import_config

# The members are the study's MRInet at 2 mm, trained as configs/mrinet_2mm.py trains one.
mrinet_2mm = import_config(Path(__file__).with_name("mrinet_2mm.py"))


def get_config(arg: str | None = None):
  members = int(arg) if arg else 10
  if members < 1:
    raise ValueError(f"argument {arg!r}: members per sequence must be >= 1")
  c = mrinet_2mm.get_config("3seq")
  # The same 2 mm cohort simulated with all three sequences (a directory of its own).
  c.data.simulate.out = "data/sim-2mm-3seq"
  c.data.cache = "data/sim-2mm-3seq-cache"
  c.ensemble.members = members
  c.ensemble.sub_ensembles = ("t1=T1w", "flair=FLAIR", "swi=swi")
  c.ensemble.head = "linear"
  c.ensemble.head_folds = 5
  c.ensemble.correction = "linear"
  return c
