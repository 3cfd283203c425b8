"""CPU preset: one MRInet (an ensemble with `--config.ensemble.members N`) on a 1000-subject,
3-sequence simulated cohort at 4 mm, sized for 2 CPU cores (the demo's default where there is
no accelerator).

Command (simulates 1000 subjects with T1w, FLAIR and SWI into data/sim-4mm-1000 and prepares
its bias-corrected, z-scored 40 x 50 x 40 cache on first use, ~40 s):

    brainage train --config configs/cpu.py --workdir runs/cpu
    brainage demo --workdir runs/demo                     # the whole demo (default preset)

Use `configs/cpu.py:study` for the study's MRInet widths (16, 16, 32, 64, 32) with dropout 0.5
(conv1 twice as wide: the slowest layer on a CPU), `configs/cpu.py:t1` for T1w only.

Design: the three sequences are the input channels of one MRInet with conv1 at half the study's
width (an ensemble per sequence, as in the study, costs 3x the training on 2 cores; an ensemble
of 2 vmapped members trained half as many epochs in the same time and scored worse), its
convolutions as im2col matmuls and its max-pool gradients separable on the CPU. Each sequence
is bias-field corrected (20 mm) and z-scored, in a brain-centred 40 x 50 x 40 box rather than
the 50^3 cube. 36 epochs of 800 subjects (7200 steps) fill ~23 minutes of 2 CPU cores.
`--config.ensemble.members 2` trains the 2-member ensemble with a non-negative head and linear
bias correction fit on the 100 validation subjects.

Expected (measured 2026-11-24 12:13 on 2 otherwise idle CPU cores, `brainage demo --preset
cpu`): 24.0 minutes for the whole demo, 1362 s of it training at 23.0 volumes/s. Test MAE 2.71
years on 100 subjects (r 0.99; validation 2.76 at the best checkpoint, epoch 7), 1.76x the
cohort's oracle MAE of 1.54 years. The goal of 1.5x the oracle (2.3 years) is not reached.
The same net on 400 subjects (50^3, 56 epochs) scored 2.69 on 40 test subjects, with
validation 2.15 on 40: that split was optimistic (benchmarks/RESULTS.md, session 5).
"""

from __future__ import annotations

from jax_brainage.train.config import base_config


def get_config(arg: str | None = None):
  c = base_config()
  if arg not in (None, "", "study", "t1"):
    raise ValueError(f"argument {arg!r}: use study or t1")
  # 1000 subjects (800 / 100 / 100): simulated and prepared in ~40 s at 4 mm. 320 training
  # subjects for 90 epochs overfit (training MAE 1.6, validation 2.3 years), and 40 test
  # subjects measure a MAE to +-0.35 years; 100 to +-0.2.
  c.data.simulate.n = 1000
  c.data.simulate.resolution = 4
  c.data.simulate.seed = 0
  c.data.simulate.out = "data/sim-4mm-1000"
  c.data.cache = "data/sim-4mm-1000-zscore-bias20-box-cache"
  # A brain-centred 40 x 50 x 40 box (160 x 200 x 160 mm) instead of the 50^3 cube (200 mm):
  # 1.7x faster steps (26 against 15 volumes/s). The box holds every simulated brain except a
  # 4 mm slice at the edge of ~3% of them (`brainage prepare` warns which).
  c.data.image_shape = (40, 50, 40)
  # z-scored inputs (centred brain intensities): a member leaves the mean age in the first epoch
  # instead of the third and is 1 year better after 10 (3.3 vs 4.3 years validation MAE); with
  # minmax [0, 1] inputs, all positive, conv1 filters with a negative weight sum start dead and
  # one member of 2 stayed at the mean age for 11 epochs.
  c.data.scaling = "zscore"
  # Bias-field correction before z-scoring (the study's inputs were FreeSurfer-normalised): the
  # simulated scans carry an 8% smooth field that scales the SWI iron contrast as much as ~10
  # years of ageing. 10 epochs of one member on a cohort without bias fields reached 2.8 years
  # validation MAE against 3.3 with them; corrected at 30 mm, 3.0.
  c.data.bias_sigma_mm = 20.0
  c.data.sequences = ("T1w",) if arg == "t1" else ("T1w", "FLAIR", "swi")
  c.data.mode = "host"
  c.model.name = "mrinet"
  if arg == "study":
    c.model.dropout_rate = 0.5       # the study's widths (16, 16, 32, 64, 32) and dropout
  else:
    # The study's widths (16, 16, 32, 64, 32) except conv1 at half (the full-resolution block
    # dominates the CPU time; the deeper ones at 25^3 and below cost little); dense1 as wide as
    # the study's (64). One member, 10 epochs: 2.7 years validation MAE against 3.0 for
    # (8, 8, 16, 16, 8) + dense 16, at the same speed.
    c.model.conv_features = (8, 16, 32, 64, 32)
    c.model.dense_features = 64
    c.model.dropout_rate = 0.0
  c.model.scale_output = True        # age = mean + SD * head: leaves the mean age sooner
  c.augment.shift_voxels = 1
  c.augment.flip_lr = True
  c.optimizer.learning_rate = 5e-4   # the study's; 1e-3 left the output at the mean age
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_steps = 100
  c.batch_size = 4
  c.num_epochs = 36
  c.patience = 0
  c.log_every_steps = 20
  # One MRInet rather than an ensemble: on the earlier 400-subject, 50^3 setup one model for 56
  # epochs beat 2 vmapped members for 24 in the same 23 minutes (test MAE 2.69 against 3.01
  # years); on a CPU one model trains at 14.7 volumes/s against 11.9 member-volumes/s for the
  # pair. The head and correction below apply with `--config.ensemble.members N` (N > 1).
  c.ensemble.members = 1
  c.ensemble.head = "nonnegative"
  c.ensemble.head_folds = 5
  c.ensemble.correction = "linear"
  return c
