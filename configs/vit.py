"""ViT preset: a small 3D vision transformer (models/vit.py) on the cpu preset's cohort (5000
subjects at 4 mm, T1w + FLAIR + SWI, bias-corrected and z-scored 40 x 50 x 40 box), sized for
2 CPU cores; the comparison with the cpu preset's MRInet (issue 24).

Command (the data settings are configs/cpu.py's: it simulates and prepares the same cohort on
first use; point data.cache at an existing cache of it, e.g. a cpu demo's, to skip that):

    brainage train --config configs/vit.py --workdir runs/vit
    brainage train --config configs/vit.py --workdir runs/vit --config.data.cache runs/demo/cache

Design: 10^3-voxel patches (40 mm at 4 mm) give a 4 x 5 x 4 grid of 80 tokens; 4 pre-norm
blocks of width 96 (4 heads of 24, MLP 192), learned position embedding, mean over tokens and
MRInet's head (dense 64 ReLU, scalar age scaled by the training ages' SD). Its size is set by
the CPU: attention over 640 tokens (5^3 patches) cost 0.34 s per step of 4 volumes even at
width 48 and depth 2, 175 tokens (8^3, padded) 0.25 s at width 96, 80 tokens 0.08 s (2-core CPU
under load). AdamW with warm-up and gradient clipping, as transformers are trained, on the cpu
preset's augmentation (1-voxel shifts, left-right flips) and test-time mirror average.

Expected (measured 2026-12-07 on 2 heavily shared CPU cores, benchmarks/RESULTS.md session 10):
61 minutes of training (12 volumes/s under load), validation MAE 2.65 years at epoch 10 (still
falling), test MAE 2.65 years on the 500 test subjects (RMSE 3.35, r 0.983), against 2.38 for
the cpu preset's MRInet after only 3 epochs (2.24 after its 30): MRInet stays the demo's
default. AttnLRP puts 0.63 of the positive relevance inside the ageing masks (CP-LRP 0.62, the
gradient 0.10; chance 0.145), at 0.69x the cost of an input gradient.
"""

from __future__ import annotations

from pathlib import Path

from jax_brainage.train.config_loading import import_config

cpu = import_config(Path(__file__).with_name("cpu.py"))


def get_config(arg: str | None = None):
  if arg not in (None, ""):
    raise ValueError(f"argument {arg!r}: configs/vit.py takes none")
  c = cpu.get_config()  # the cohort, cache, augmentation and batch size of the cpu preset
  c.model.name = "vit"
  c.model.vit.patch_size = 10
  c.model.vit.width = 96
  c.model.vit.depth = 4
  c.model.vit.num_heads = 4
  c.model.vit.mlp_dim = 192
  c.model.vit.pos_embedding = "learned"
  c.model.dense_features = 64
  c.model.dropout_rate = 0.0
  c.model.flip_average = True        # as MRInet in the cpu preset (trained with flip_lr)
  c.model.scale_output = True
  c.model.patch_stem = 0             # MRInet options, unused here
  c.model.conv_features = ()
  c.optimizer.name = "adamw"
  c.optimizer.learning_rate = 3e-4
  c.optimizer.weight_decay = 0.05
  c.optimizer.warmup_steps = 500
  c.optimizer.grad_clip_norm = 1.0
  c.optimizer.schedule = "cosine"
  c.num_epochs = 10                  # ~20 minutes on 2 CPU cores (0.08 s per step of 4)
  return c
