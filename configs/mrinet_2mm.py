"""The study's MRInet at 98^3 / 2 mm (MNI 2 mm space in the study), 209,873 parameters (T1w).

Command (simulates the study-sized cohort of 2637 subjects at 2 mm on first use; or point it at
a real prepared cache with --config.data.cache DIR --config.data.simulate.n 0):

    brainage train --config configs/mrinet_2mm.py --workdir runs/mrinet_2mm

Arguments: `configs/mrinet_2mm.py:FLAIR` (or `:swi`, `:3seq`) picks the input sequence(s).

As in the study: Adam 5e-4, MSE, batch 8 (the study's batch size is uncertain), dropout 0.5,
output bias = mean training age, best checkpoint by validation loss, 80/10/10 split.
Expected: on an accelerator (H100) minutes per epoch; on the simulated cohort a test MAE within
~1.15 x the oracle MAE. The study reports MAE 3.37-3.86 years on LIFE (real data, ensembles).
"""

from __future__ import annotations

from jax_brainage.train.config import base_config


def get_config(arg: str | None = None):
  c = base_config()
  if arg in (None, "", "T1w", "FLAIR", "swi"):
    sequences = (arg or "T1w",)
  elif arg == "3seq":
    sequences = ("T1w", "FLAIR", "swi")
  else:
    raise ValueError(f"argument {arg!r}: use T1w, FLAIR, swi or 3seq")
  c.data.simulate.n = 2637
  c.data.simulate.resolution = 2
  c.data.simulate.seed = 0
  c.data.simulate.out = "data/sim-2mm"
  c.data.cache = "data/sim-2mm-cache"
  c.data.sequences = sequences
  c.data.image_shape = (98, 98, 98)
  c.model.name = "mrinet"
  c.augment.shift_voxels = 2
  c.augment.rotate_degrees = 5.0
  c.augment.flip_lr = True
  c.batch_size = 8
  c.num_epochs = 80
  c.patience = 15
  c.log_every_steps = 50
  return c
