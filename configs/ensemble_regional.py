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

from jax_brainage.train.config import base_config

SEQUENCES = {"t1": "T1w", "flair": "FLAIR", "swi": "swi"}
REGIONS = ("cerebellum", "subcortical", "cortical")


def get_config(arg: str | None = None):
  members = int(arg) if arg else 3
  if members < 1:
    raise ValueError(f"argument {arg!r}: members per sub-ensemble must be >= 1")
  c = base_config()
  c.data.simulate.n = 2637
  c.data.simulate.resolution = 2
  c.data.simulate.seed = 0
  c.data.simulate.out = "data/sim-2mm-3seq"
  c.data.cache = "data/sim-2mm-3seq-cache"
  c.data.sequences = ("T1w", "FLAIR", "swi")
  c.data.image_shape = (98, 98, 98)
  c.model.name = "mrinet"
  c.augment.shift_voxels = 2
  c.augment.rotate_degrees = 5.0
  c.augment.flip_lr = True
  c.batch_size = 8
  c.num_epochs = 80
  c.patience = 15
  c.log_every_steps = 50
  c.ensemble.members = members
  c.ensemble.sub_ensembles = tuple(f"{short}_{region}={sequence}@{region}"
                                   for short, sequence in SEQUENCES.items()
                                   for region in REGIONS)
  c.ensemble.head = "linear"
  c.ensemble.head_folds = 5
  c.ensemble.correction = "linear"
  return c
