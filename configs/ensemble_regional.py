"""The study's regional ensemble: 3 sequences (T1w, FLAIR, SWI) x 3 regions (cerebellum,
subcortical, cortical) = 9 sub-ensembles of MRInet at 2 mm, each trained on its region only
(voxels outside it zeroed), combined by a multi-level linear head with a linear bias correction.

Command (simulates the 2637-subject cohort at 2 mm with three sequences on first use, then
prepares one regional cache per region beside data/sim-2mm-3seq-cache from the cohort's atlas,
derivatives/simulation/atlas*.nii.gz):

    brainage train --config configs/ensemble_regional.py --workdir runs/ensemble_regional

Argument: `configs/ensemble_regional.py:N` sets the members per sub-ensemble (default 3).

Expected: W/sub/<sequence>_<region> for the 9 sub-ensembles, then W/ensemble and
W/metrics.json (member, sub-ensemble and ensemble validation MAE, corrected MAE, Spearman
gap-age). Each regional model alone is less accurate than a whole-brain one; the multi-level
head weighs the regions (its member weights are in the store's manifest), and
`brainage explain` on this workdir shows which region drives each subject's estimate.
An accelerator is needed (9 x N trainings of configs/mrinet_2mm.py worth of compute).
"""

from __future__ import annotations

from pathlib import Path

from jax_brainage.train.config_loading import import_config

# The whole-brain ensemble's cohort, members, head and correction; sub-ensembles per region.
ensemble_wholebrain = import_config(Path(__file__).with_name("ensemble_wholebrain.py"))

SEQUENCES = {"t1": "T1w", "flair": "FLAIR", "swi": "swi"}
REGIONS = ("cerebellum", "subcortical", "cortical")


def get_config(arg: str | None = None):
  members = int(arg) if arg else 3
  if members < 1:
    raise ValueError(f"argument {arg!r}: members per sub-ensemble must be >= 1")
  c = ensemble_wholebrain.get_config(str(members))
  c.ensemble.sub_ensembles = tuple(f"{short}_{region}={sequence}@{region}"
                                   for short, sequence in SEQUENCES.items()
                                   for region in REGIONS)
  return c
