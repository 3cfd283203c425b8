"""Checks of an experiment config: `check_keys` (every key of the base config, with its type, and no
other) and `validate` (every value can work); both raise a one-line ConfigError naming the key.
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections

from jax_brainage.data.augment import AugmentConfig
from jax_brainage.data.intensity import SCALINGS
from jax_brainage.errors import ConfigError
from jax_brainage.models import MODELS
from jax_brainage.models.lowering import LOWERINGS
from jax_brainage.models.vit import POS_EMBEDDINGS
from jax_brainage.train.config import (COMPUTE_DTYPES, CORRECTIONS, ENSEMBLE_HEADS, LOSSES,
                                       OPTIMIZERS, SCHEDULES, flatten, parse_sub_ensembles)

# Integers are bounded so that nothing downstream overflows (step counters and seeds are
# int32/uint32 on the device); cube sides are bounded so that a typo cannot size a memmap of
# petabytes.
MAX_INT = 2**31 - 1
MAX_CUBE_SIDE = 2048  # voxels
PATH_KEYS = ("data.cache", "data.simulate.out", "init_from")


def validate(config: ml_collections.ConfigDict) -> None:
  """One-line ConfigError for the first value that cannot work (names the key).

  Besides each key's own rule: every float is finite (no NaN or infinity, which JSON cannot
  store and no optimiser survives), every int lies in [-MAX_INT, MAX_INT], seeds are >= 0,
  paths hold no NUL byte, tuples hold the element type their key needs.
  """
  def need(ok: bool, key: str, what: str) -> None:
    if not ok:
      raise ConfigError(f"config.{key}={_get(config, key)!r}: {what}")

  for key, value in flatten(config.to_dict()).items():
    for v in (value if isinstance(value, (list, tuple)) else [value]):
      if isinstance(v, float):
        need(math.isfinite(v), key, "must be a finite number")
      elif isinstance(v, int) and not isinstance(v, bool):
        need(-MAX_INT <= v <= MAX_INT, key, f"must lie in [-{MAX_INT}, {MAX_INT}]")
  for key in ("seed", "data.split_seed", "data.simulate.seed"):
    need(_get(config, key) >= 0, key, "must be >= 0")
  need(config.seed + config.ensemble.members <= MAX_INT, "seed",
       f"seed + ensemble.members must stay <= {MAX_INT} (member m trains with seed + m)")
  for key in PATH_KEYS:
    need("\0" not in str(_get(config, key)), key, "a path cannot hold a NUL byte")

  need(config.model.name in MODELS, "model.name", f"unknown model (one of {sorted(MODELS)})")
  need(config.loss in LOSSES, "loss", f"unknown loss (one of {LOSSES})")
  need((config.loss == "soft_label") == (config.model.name == "sfcn"), "loss",
       "soft_label goes with model.name='sfcn' (age-bin output) and only with it")
  need(config.soft_label_sigma > 0, "soft_label_sigma", "must be > 0 years")
  need(config.finetune.pretrained_lr_scale >= 0, "finetune.pretrained_lr_scale", "must be >= 0")
  for key in ("finetune.freeze", "finetune.reinit"):
    need(all(isinstance(p, str) and p for p in _get(config, key)), key,
         "layer name patterns (strings), e.g. ('conv0', 'bn*')")
  need(config.model.compute_dtype in COMPUTE_DTYPES, "model.compute_dtype",
       f"one of {COMPUTE_DTYPES}")
  need(0.0 <= config.model.dropout_rate < 1.0, "model.dropout_rate", "must be in [0, 1)")
  need(all(_is_int(f) and f > 0 for f in config.model.conv_features), "model.conv_features",
       "channel counts must be positive integers")
  need(config.data.scaling in SCALINGS, "data.scaling", f"must be one of {SCALINGS}")
  need(0 <= config.data.bias_sigma_mm < 1000, "data.bias_sigma_mm",
       "must be 0 (no correction) or a Gaussian width in mm")
  need(config.model.conv_lowering in LOWERINGS, "model.conv_lowering",
       f"must be one of {LOWERINGS}")
  need(config.model.dense_features > 0, "model.dense_features", "must be > 0")
  need(config.model.patch_stem == 0 or (config.model.patch_stem > 1
                                        and config.model.name == "mrinet"),
       "model.patch_stem", "must be 0, or a patch side > 1 for model.name='mrinet'")
  need(not config.model.flip_average or config.model.name in ("mrinet", "vit"),
       "model.flip_average", "is an MRInet option (and ViT's: model.name='mrinet' or 'vit')")
  v = config.model.vit
  for key in ("patch_size", "width", "depth", "num_heads", "mlp_dim"):
    need(v[key] > 0, f"model.vit.{key}", "must be > 0")
  need(v.width % v.num_heads == 0, "model.vit.width", "must be a multiple of model.vit.num_heads")
  need(v.pos_embedding in POS_EMBEDDINGS, "model.vit.pos_embedding", f"one of {POS_EMBEDDINGS}")
  need(not config.model.scale_output or config.model.name != "sfcn", "model.scale_output",
       "scales a regression output in years; sfcn predicts age bins")
  age_range = tuple(config.model.age_range)
  need(len(age_range) == 2 and all(_is_number(a) for a in age_range)
       and age_range[0] < age_range[1], "model.age_range", "must be (youngest, oldest) years")
  need(config.model.bin_width > 0, "model.bin_width", "must be > 0 years")
  need(config.optimizer.name in OPTIMIZERS, "optimizer.name", f"one of {OPTIMIZERS}")
  need(config.optimizer.schedule in SCHEDULES, "optimizer.schedule", f"one of {SCHEDULES}")
  need(math.isfinite(config.optimizer.learning_rate) and config.optimizer.learning_rate > 0,
       "optimizer.learning_rate", "must be > 0")
  need(config.optimizer.warmup_steps >= 0, "optimizer.warmup_steps", "must be >= 0")
  need(config.optimizer.grad_clip_norm >= 0, "optimizer.grad_clip_norm", "must be >= 0")
  need(config.optimizer.weight_decay >= 0, "optimizer.weight_decay", "must be >= 0")
  need(0 <= config.optimizer.momentum < 1, "optimizer.momentum", "must be in [0, 1)")
  need(config.batch_size > 0, "batch_size", "must be > 0")
  need(config.eval_batch_size >= 0, "eval_batch_size", "must be >= 0 (0: batch_size)")
  need(config.num_epochs > 0, "num_epochs", "must be > 0")
  need(config.patience >= 0, "patience", "must be >= 0 (0: no early stopping)")
  need(config.log_every_steps > 0, "log_every_steps", "must be > 0")
  need(config.checkpoint_every_steps >= 0, "checkpoint_every_steps", "must be >= 0")
  need(config.keep_checkpoints > 0, "keep_checkpoints", "must be > 0")
  need(config.num_image_summaries >= 0, "num_image_summaries", "must be >= 0")
  need(config.data.mode in ("auto", "host", "device"), "data.mode", "auto, host or device")
  need(config.data.workers >= 0, "data.workers", "must be >= 0")
  need(len(config.data.sequences) > 0 and all(isinstance(s, str) and s.strip()
                                              for s in config.data.sequences),
       "data.sequences", "a tuple of sequence names, e.g. ('T1w', 'FLAIR')")
  need(len(set(config.data.sequences)) == len(config.data.sequences), "data.sequences",
       "names a sequence twice")
  shape = tuple(config.data.image_shape)
  need(len(shape) == 3 and all(_is_int(s) and 0 <= s <= MAX_CUBE_SIDE for s in shape)
       and (all(shape) or not any(shape)), "data.image_shape",
       f"(x, y, z) voxels (each 1..{MAX_CUBE_SIDE}), or (0, 0, 0) for the cache's shape")
  need(config.data.simulate.n >= 0, "data.simulate.n", "must be >= 0 (0: no simulation)")
  need(bool(config.data.cache) or config.data.simulate.n > 0, "data.cache",
       "set data.cache to a prepared cache (brainage prepare), or data.simulate.n > 0")
  if config.data.simulate.n > 0:
    need(config.data.simulate.resolution in (1, 2, 3, 4), "data.simulate.resolution",
         "1, 2, 3 or 4 mm")
    need(bool(config.data.cache) and bool(config.data.simulate.out), "data.simulate.out",
         "a simulated cohort needs data.simulate.out and data.cache directories")
  e = config.ensemble
  need(e.members >= 1, "ensemble.members", "must be >= 1")
  need(e.vmap_width >= 0, "ensemble.vmap_width", "must be >= 0 (0: as many as fit in memory)")
  need(e.mesh_size >= 0, "ensemble.mesh_size", "must be >= 0 (0: auto)")
  need(e.mesh_size == 0 or e.members % e.mesh_size == 0, "ensemble.mesh_size",
       f"must divide ensemble.members={e.members}")
  need(e.vmap_width == 0 or e.mesh_size == 0 or e.vmap_width % e.mesh_size == 0,
       "ensemble.vmap_width", f"must be a multiple of ensemble.mesh_size={e.mesh_size}")
  need(not e.bootstrap or e.members > 1, "ensemble.bootstrap",
       "resamples the training split per member: needs ensemble.members > 1")
  need(e.head in ENSEMBLE_HEADS, "ensemble.head", f"one of {ENSEMBLE_HEADS}")
  need(e.head_folds >= 2, "ensemble.head_folds", "must be >= 2")
  need(e.correction in CORRECTIONS, "ensemble.correction", f"one of {CORRECTIONS}")
  parse_sub_ensembles(config)  # Raises a one-line ConfigError naming the bad spec.
  AugmentConfig.from_config(config.augment)  # Raises its own one-line ConfigError.


def check_keys(config: ml_collections.ConfigDict, reference: ml_collections.ConfigDict,
               source: str = "config", prefix: str = "") -> None:
  """Every key of `config` exists in `reference` with a compatible type, and vice versa."""
  for key in config.keys():
    name = f"{prefix}{key}"
    if key not in reference:
      raise ConfigError(f"{source}: unknown config key {name!r}")
    value, ref = config[key], reference[key]
    if isinstance(ref, ml_collections.ConfigDict):
      if not isinstance(value, ml_collections.ConfigDict):
        raise ConfigError(f"{source}: config key {name!r} must be a group of keys")
      check_keys(value, ref, source, prefix=f"{name}.")
    elif not same_type(value, ref):
      raise ConfigError(f"{source}: config key {name!r} must be {type(ref).__name__}, "
                        f"got {value!r}")
  for key in reference.keys():
    if key not in config:
      raise ConfigError(f"{source}: config key {prefix}{key!r} is missing (start from "
                        "jax_brainage.train.config.base_config())")


def same_type(value: Any, ref: Any) -> bool:
  """Whether `value` may stand where the base config has `ref` (an int for a float, a list for a
  tuple; never a bool for a number)."""
  if isinstance(ref, bool):
    return isinstance(value, bool)
  if isinstance(ref, float):
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if isinstance(ref, int):
    return isinstance(value, int) and not isinstance(value, bool)
  if isinstance(ref, (tuple, list)):
    return isinstance(value, (tuple, list))
  return isinstance(value, type(ref))


def _is_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _get(config: ml_collections.ConfigDict, dotted: str) -> Any:
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node
