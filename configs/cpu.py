"""CPU preset: one MRInet (an ensemble with `--config.ensemble.members N`) on a 5000-subject,
3-sequence simulated cohort at 4 mm, sized for 2 CPU cores (the demo's default where there is
no accelerator).

Command (simulates 5000 subjects with T1w, FLAIR and SWI into data/sim-4mm-5000 and prepares
its bias-corrected, z-scored 40 x 50 x 40 cache on first use, ~3 minutes):

    brainage train --config configs/cpu.py --workdir runs/cpu
    brainage demo --workdir runs/demo                     # the whole demo (default preset)

Use `configs/cpu.py:study` for the study's MRInet (widths 16, 16, 32, 64, 32, dropout 0.5, no
patch stem: 174 against 54 ms per step on a CPU), `configs/cpu.py:t1` for T1w only.

Design: the three sequences are the input channels of one MRInet. Its first block is a 2^3
patch stem (a 2 x 2 x 2 convolution with stride 2, computed as a space-to-depth matmul) in
place of the study's full-resolution conv + pool, the most expensive block on a CPU: a
training step takes 54 instead of 118 ms, and the trainer runs 2.7x faster (63 against 23
volumes/s), so 30 epochs of 4000 subjects (30000 steps) fit where 36 epochs of 800 did.
More subjects, not more epochs, is what closed the gap to the oracle: 1000 subjects scored
1.76x the oracle, 3000 1.57x, 4000 1.50x, 5000 1.45x. The test-time prediction averages the
scan and its left-right mirror (the model trains with mirrored scans; 0.05-0.07 years better).
Each sequence is bias-field corrected (20 mm) and z-scored, in a brain-centred 40 x 50 x 40 box.
The `brainage` command runs itself again with glibc's transparent huge pages for malloc
(`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`) where the kernel offers them only on request: the
CPU trainer's buffers otherwise cost ~18 million page faults per epoch, a third of its time.
`--config.ensemble.members 2` trains the 2-member ensemble with a non-negative head and linear
bias correction fit on the 500 validation subjects.

Expected (measured 2026-11-24 18:45 on 2 otherwise idle CPU cores, this configuration as
overrides of the earlier preset, benchmarks/RESULTS.md sessions 6-7): 26.9 minutes for the
whole demo (simulate 104 s, prepare 78 s, train 1383 s at 97 volumes/s, predict, explain and
evaluate 34 s). Test MAE 2.24 years on 500 subjects (RMSE 2.77, r 0.988; validation 2.14 at
the best checkpoint, epoch 27), 1.45x the cohort's oracle MAE of 1.54 years: the goal of 1.5x
is met. LRP relevance mass accuracy 0.79 (gradient 0.27).
"""

from __future__ import annotations

from jax_brainage.train.config import base_config


def get_config(arg: str | None = None):
  c = base_config()
  if arg not in (None, "", "study", "t1"):
    raise ValueError(f"argument {arg!r}: use study or t1")
  # 5000 subjects (4000 / 500 / 500): simulated and prepared in ~3 minutes at 4 mm. Fewer
  # subjects overfit sooner (320 for 90 epochs: training MAE 1.6, validation 2.3 years), and
  # 500 test subjects measure a MAE to +-0.1 years (100 to +-0.2, 40 to +-0.35).
  c.data.simulate.n = 5000
  c.data.simulate.resolution = 4
  c.data.simulate.seed = 0
  c.data.simulate.out = "data/sim-4mm-5000"
  c.data.cache = "data/sim-4mm-5000-zscore-bias20-box-cache"
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
    # A 2^3 patch stem replaces block 1 (conv 3^3 + pool at full resolution): 54 against 118 ms
    # per step of 4 volumes (benchmarks/bench_stem.py). On 3000 subjects it scored as well as the
    # full block at 2.7x the speed (test MAE 2.42 in 30 epochs against 2.44 in 12 in the same
    # time).
    c.model.patch_stem = 2
    # Average the prediction for the scan and its mirror image (a test-time augmentation that
    # matches training with flip_lr): 2.42 -> 2.36 years on 400 test subjects.
    c.model.flip_average = True
    # The study's widths (16, 16, 32, 64, 32) except the first block at half; dense1 as wide as
    # the study's (64). One member, 10 epochs: 2.7 years validation MAE against 3.0 for
    # (8, 8, 16, 16, 8) + dense 16, at the same speed. Wider deep blocks (16, 48, 96, 48) cost
    # 30% more per epoch and were no better by epoch 16.
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
  c.num_epochs = 30                  # validation MAE still fell at epochs 25-27
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
