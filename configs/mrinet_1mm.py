"""The study's MRInet at 198^3 / 1 mm (FreeSurfer space in the study), 781,265 parameters (T1w).

Accelerator config (a 198^3 float32 batch of 8 is 250 MB of input alone). Command (simulates the
study-sized cohort at 1 mm on first use; or use a real cache with --config.data.cache DIR
--config.data.simulate.n 0):

    brainage train --config configs/mrinet_1mm.py --workdir runs/mrinet_1mm

Arguments: `:FLAIR`, `:swi` or `:3seq` pick the input sequence(s); `:bf16` (e.g. `:T1w-bf16`)
computes in bfloat16 with float32 parameters.

As in the study: Adam 5e-4, MSE, dropout 0.5, output bias = mean training age, best checkpoint
by validation loss. Expected on the simulated cohort: test MAE <= 1.15 x the oracle MAE (the
issue's target for the accelerator preset); the study reports 3.37-3.86 years on LIFE.
"""

from __future__ import annotations

from pathlib import Path

from jax_brainage.train.config_loading import import_config

# The same study recipe as at 2 mm (model, optimiser, batch, augmentation); what 1 mm changes
# is below.
mrinet_2mm = import_config(Path(__file__).with_name("mrinet_2mm.py"))


def get_config(arg: str | None = None):
  parts = (arg or "T1w").split("-")
  seq = parts[0] or "T1w"
  if seq not in ("T1w", "FLAIR", "swi", "3seq"):
    raise ValueError(f"argument {arg!r}: use T1w, FLAIR, swi or 3seq, optionally with -bf16")
  c = mrinet_2mm.get_config(seq)
  c.data.simulate.resolution = 1
  c.data.simulate.out = "data/sim-1mm"
  c.data.cache = "data/sim-1mm-cache"
  c.data.image_shape = (198, 198, 198)
  c.data.workers = 4
  c.model.compute_dtype = "bfloat16" if "bf16" in parts[1:] else "float32"
  c.augment.shift_voxels = 3
  c.num_epochs = 60
  c.patience = 12
  return c
