"""CPU preset: the study's MRInet on a simulated cohort at 4 mm, sized for 2 CPU cores.

Command (simulates 400 subjects into data/sim-4mm-400 and prepares its cache on first use):

    brainage train --config configs/cpu.py --workdir runs/cpu

Use `configs/cpu.py:3seq` for all three sequences (T1w, FLAIR, SWI) as input channels.

Expected: sized for about 30 minutes on 2 quiet CPU cores (8,000 training volumes at 50^3; not
yet timed on a quiet machine) with a validation MAE that approaches the cohort's oracle MAE
(in data/sim-4mm-400/derivatives/simulation/cohort.json); the CPU demo's goal is a test MAE
<= 1.5 x oracle MAE. On the tiny preset MRInet needed ~200 Adam steps before leaving the mean
age, so do not judge this run by its first epochs.
"""

from __future__ import annotations

from jax_brainage.train.config import base_config


def get_config(arg: str | None = None):
  c = base_config()
  sequences = ("T1w", "FLAIR", "swi") if arg == "3seq" else ("T1w",)
  c.data.simulate.n = 400
  c.data.simulate.resolution = 4
  c.data.simulate.seed = 0
  c.data.simulate.out = "data/sim-4mm-400"
  c.data.cache = "data/sim-4mm-400-cache"
  c.data.sequences = sequences
  c.data.mode = "host"
  c.model.name = "mrinet"          # the study's channels (16, 16, 32, 64, 32), dropout 0.5
  c.augment.shift_voxels = 1
  c.augment.flip_lr = True
  c.optimizer.learning_rate = 1e-3
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_steps = 100
  c.batch_size = 4
  c.num_epochs = 25
  c.patience = 10
  c.log_every_steps = 20
  return c
