"""Tiny ensemble: 2 sub-ensembles (T1w, FLAIR) x 2 members of a narrow MRInet at 4 mm.

Command (simulates 120 subjects with T1w + FLAIR into data/sim-4mm-2seq and prepares
data/sim-4mm-2seq-cache on first use):

    brainage train --config configs/ensemble_tiny.py --workdir runs/ensemble_tiny

Arguments: `configs/ensemble_tiny.py:regions` trains T1w on the cerebellum and on the
subcortical region instead (a regional cache is prepared beside the cache from the cohort's
atlas); `:3` gives 3 members per sub-ensemble.

Expected: W/sub/t1 and W/sub/flair (each member stacked, trained in one vmapped step
per batch), then W/ensemble (the store `brainage predict --workdir W` reads) and
W/metrics.json with every member's, sub-ensemble's and the ensemble's validation MAE, the
bias-corrected MAE and the Spearman correlation of the gap with age. Like configs/tiny.py
this shows that the path works end to end on 2 CPU cores in minutes; it does not show
what MRInet can reach (4 mm cubes, 96 training subjects).
"""

from __future__ import annotations

from jax_brainage.train.config import base_config


def get_config(arg: str | None = None):
  c = base_config()
  c.data.simulate.n = 120
  c.data.simulate.resolution = 4
  c.data.simulate.seed = 0
  c.data.simulate.out = "data/sim-4mm-2seq"
  c.data.cache = "data/sim-4mm-2seq-cache"
  c.data.sequences = ("T1w", "FLAIR")
  c.data.mode = "host"
  c.model.name = "mrinet"
  c.model.conv_features = (8, 8, 16, 16, 8)
  c.model.dense_features = 16
  c.model.dropout_rate = 0.0
  c.model.scale_output = True       # as configs/tiny.py: leaves the mean age sooner
  c.optimizer.learning_rate = 5e-4
  c.optimizer.warmup_steps = 50
  c.batch_size = 4
  c.num_epochs = 20
  c.patience = 0
  c.log_every_steps = 5
  c.ensemble.members = 2
  c.ensemble.sub_ensembles = ("t1=T1w", "flair=FLAIR")
  c.ensemble.head = "linear"
  c.ensemble.head_folds = 4         # 12 validation subjects
  c.ensemble.correction = "linear"
  if arg == "regions":
    c.ensemble.sub_ensembles = ("t1_cerebellum=T1w@cerebellum",
                                "t1_subcortical=T1w@subcortical")
  elif arg == "3":
    c.ensemble.members = 3
  elif arg:
    raise ValueError(f"argument {arg!r}: use regions or 3")
  return c
