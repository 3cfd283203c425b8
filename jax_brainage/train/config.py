"""Experiment configs: the base ConfigDict, loading `configs/*.py`, command-line overrides, checks.

A config file exposes `get_config(arg=None)` returning a locked `ml_collections.ConfigDict` built
on `base_config()`; so every experiment has the same keys and types, and a typo'd or mistyped key
is an error instead of a silently ignored setting. Overrides follow big_vision:

    brainage train --config configs/cpu.py:arg --workdir W --config.optimizer.learning_rate 1e-3

`fingerprint(config)` is the part of a config that defines the experiment (model, data, loss,
optimiser, seed, ...); a workdir stores it, and resuming with a different one is refused.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import math
import os
import re
import types
from pathlib import Path
from typing import Any, Sequence

import ml_collections

from jax_brainage.data.augment import AugmentConfig
from jax_brainage.data.intensity import SCALINGS
from jax_brainage.errors import ConfigError
from jax_brainage.models import MODELS
from jax_brainage.models.lowering import LOWERINGS
from jax_brainage.models.vit import POS_EMBEDDINGS

LOSSES = ("mse", "mae", "soft_label")
SCHEDULES = ("constant", "cosine")
OPTIMIZERS = ("adam", "adamw", "sgd")
COMPUTE_DTYPES = ("float32", "bfloat16")

# Settings that may change between an interrupted run and its resumption: how long and how
# verbosely to train, not what is trained.
RESUMABLE_KEYS = ("num_epochs", "patience", "log_every_steps", "checkpoint_every_steps",
                  "keep_checkpoints", "num_image_summaries", "init_from", "data.workers",
                  "data.mode", "eval_batch_size", "ensemble.vmap_width", "ensemble.mesh_size",
                  "model.conv_lowering")
ENSEMBLE_HEADS = ("linear", "nonnegative", "mean")
CORRECTIONS = ("none", "linear", "poly3")


def base_config() -> ml_collections.ConfigDict:
  """Every key an experiment may set, with the study's defaults (MRInet, Adam 5e-4, MSE)."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  # Input pipeline. Either a prepared cache (`brainage prepare`), or a simulated cohort that is
  # simulated into `simulate.out` and prepared into `cache` on first use.
  c.data = ml_collections.ConfigDict()
  c.data.cache = ""                  # directory written by `brainage prepare`
  c.data.sequences = ("T1w",)        # input channels, in this order, picked from the cache
  c.data.image_shape = (0, 0, 0)     # expected cube (voxels); (0, 0, 0) = whatever the cache has
  c.data.scaling = "minmax"          # caches this config prepares (simulated cohorts): "minmax"
                                     # (the study's, uint8 in [0, 1]) or "zscore" (brain voxels
                                     # standardised, float16); an existing cache is used as it is
  c.data.bias_sigma_mm = 0.0         # caches this config prepares: > 0 corrects each sequence's
                                     # bias field (homomorphic, Gaussian of this width in mm)
  c.data.split_seed = 0              # 80/10/10 train/validation/test split
  c.data.workers = 0                 # grain worker processes (0: in the main process)
  c.data.mode = "auto"               # host (grain) | device (cohort resident on accelerators) |
                                     # auto (device on an accelerator when it fits)
  c.data.simulate = ml_collections.ConfigDict()
  c.data.simulate.n = 0              # > 0: simulate this many subjects if `cache` is missing
                                     # (the config file's `cache`: a --config.data.cache
                                     # override must exist, unless the override also sets
                                     # data.simulate.n or .out; see apply_overrides)
  c.data.simulate.resolution = 4     # mm (1, 2, 3 or 4)
  c.data.simulate.seed = 0
  c.data.simulate.out = ""           # where the simulated BIDS dataset goes

  # Model: name from jax_brainage.models.MODELS; the rest are its fields.
  c.model = ml_collections.ConfigDict()
  c.model.name = "mrinet"
  c.model.dropout_rate = 0.5
  c.model.compute_dtype = "float32"  # "bfloat16": bf16 compute, float32 parameters
  c.model.conv_features = ()         # MRInet / SFCN channels; () = the published network
  c.model.conv_lowering = "auto"     # "auto" (im2col on CPU, XLA's conv elsewhere), "xla", "im2col"
  c.model.dense_features = 64        # MRInet hidden dense width
  c.model.patch_stem = 0             # MRInet: p > 1 replaces block 1 (conv 3^3 + max-pool) by
                                     # a p^3 conv of stride p; 0 = the study's network
  c.model.flip_average = False       # MRInet: at inference (validation, predict, maps) the mean
                                     # age of the volume and its left-right mirror
  c.model.scale_output = False       # MRInet: age = mean + SD * head (SD of the training ages,
                                     # years) instead of raw years; False is the study's network
  c.model.age_range = (15.0, 85.0)   # SFCN age bins (years)
  c.model.bin_width = 1.0            # SFCN bin width (years)
  c.model.vit = ml_collections.ConfigDict()  # ViT (models/vit.py); also uses dense_features,
  c.model.vit.patch_size = 5         # dropout_rate, flip_average, scale_output. Patch side (voxels)
  c.model.vit.width = 96             # token features (a multiple of num_heads)
  c.model.vit.depth = 4              # encoder blocks
  c.model.vit.num_heads = 4
  c.model.vit.mlp_dim = 192          # each block's MLP hidden width
  c.model.vit.pos_embedding = "learned"  # learned | sincos (fixed 3D sine-cosine)

  c.loss = "mse"                     # mse | mae | soft_label (SFCN's KL to Gaussian labels)
  c.soft_label_sigma = 1.0           # years

  c.augment = ml_collections.ConfigDict()
  c.augment.shift_voxels = 0
  c.augment.rotate_degrees = 0.0
  c.augment.flip_lr = False
  c.augment.noise_std = 0.0

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 5e-4   # the study's Adam learning rate
  c.optimizer.schedule = "constant"  # constant | cosine (decays to 0 at the last step)
  c.optimizer.warmup_steps = 0       # linear warm-up from 0 before the schedule
  c.optimizer.weight_decay = 0.0     # adamw only
  c.optimizer.momentum = 0.9         # sgd only
  c.optimizer.grad_clip_norm = 0.0   # 0: no clipping

  c.batch_size = 8                   # global batch (all devices, all processes)
  c.eval_batch_size = 0              # 0: same as batch_size
  c.num_epochs = 50
  c.patience = 10                    # epochs without a better validation loss; 0: never stop

  c.log_every_steps = 10
  c.checkpoint_every_steps = 0       # besides the end of every epoch; 0: epoch ends only
  c.keep_checkpoints = 1             # latest checkpoints kept (the best is kept apart)
  c.num_image_summaries = 2          # input mid-slices written to TensorBoard at the start
  c.init_from = ""                   # workdir whose model starts training (fine-tuning)
  c.finetune = ml_collections.ConfigDict()  # with init_from (jax_brainage.train.finetune)
  c.finetune.freeze = ()             # layers (fnmatch patterns, e.g. "conv[0-2]") not trained
  c.finetune.reinit = ()             # layers started afresh (the output layer is, when its
                                     # shape differs: another age range or bins)
  c.finetune.pretrained_lr_scale = 1.0  # learning rate of loaded layers / the fresh layers'

  # Ensembles (jax_brainage.ensemble): members of a sub-ensemble train at once (stacked
  # parameters, one vmapped, jitted step); member m is the model of a single run with seed + m.
  c.ensemble = ml_collections.ConfigDict()
  c.ensemble.members = 1             # base models per sub-ensemble
  c.ensemble.vmap_width = 0          # members per jitted step; 0 = as many as fit in device
                                     # memory; groups of vmap_width train one after another
  c.ensemble.mesh_size = 0           # size of the mesh's 'ensemble' axis; 0 = auto
  c.ensemble.bootstrap = False       # each member trains on its own bootstrap resample
  c.ensemble.sub_ensembles = ()      # "NAME=SEQ[+SEQ..][@REGION[+REGION..]]", e.g. "t1=T1w",
                                     # "t1_cerebellum=T1w@cerebellum"; () = one sub-ensemble
                                     # "all" over data.sequences, whole brain
  c.ensemble.head = "linear"         # linear (least squares) | nonnegative (NNLS) | mean
  c.ensemble.head_folds = 5          # cross-validation folds of the level-2 head
  c.ensemble.correction = "linear"   # none | linear | poly3 (bias correction of the gap)
  c.lock()
  return c


# ---------------------------------------------------------------------------------------------
# Loading and overriding.
# ---------------------------------------------------------------------------------------------


def import_config(path: str | os.PathLike) -> types.ModuleType:
  """The module of config file `path`, run but not called: for a config that builds on another,
  e.g. `mrinet_2mm = import_config(Path(__file__).with_name("mrinet_2mm.py"))`, then
  `c = mrinet_2mm.get_config("3seq")` in its own `get_config`.

  Raises ConfigError naming the file if it is missing or fails to run.
  """
  file = Path(path)
  if not file.is_file():
    raise ConfigError(f"config file {path} not found")
  module_name = f"_brainage_config_{abs(hash(str(file.resolve())))}"
  module_spec = importlib.util.spec_from_file_location(module_name, file)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except ConfigError:
    raise
  except Exception as e:  # A config is user code: report where it broke, in one line.
    raise ConfigError(f"config file {path}: {type(e).__name__}: {e}") from e
  return module


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads `path/to/file.py[:arg]` by calling its `get_config(arg)`; checks it.

  Raises ConfigError naming the file if it is missing, has no `get_config`, or fails checks.
  """
  path, _, arg = str(spec).partition(":")
  module = import_config(path)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path} defines no get_config(arg=None)")
  try:
    config = module.get_config(arg) if arg else module.get_config()
  except ConfigError:
    raise
  except Exception as e:  # e.g. an argument the config does not know (`file.py:bogus`)
    raise ConfigError(f"config file {path}: {type(e).__name__}: {e}") from e
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"config file {path}: get_config() must return an ml_collections.ConfigDict")
  check_keys(config, base_config(), source=path)
  validate(config)
  return config


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
    elif not _same_type(value, ref):
      raise ConfigError(f"{source}: config key {name!r} must be {type(ref).__name__}, "
                        f"got {value!r}")
  for key in reference.keys():
    if key not in config:
      raise ConfigError(f"{source}: config key {prefix}{key!r} is missing (start from "
                        "jax_brainage.train.config.base_config())")


def _same_type(value: Any, ref: Any) -> bool:
  if isinstance(ref, bool):
    return isinstance(value, bool)
  if isinstance(ref, float):
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if isinstance(ref, int):
    return isinstance(value, int) and not isinstance(value, bool)
  if isinstance(ref, (tuple, list)):
    return isinstance(value, (tuple, list))
  return isinstance(value, type(ref))


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Sequence[str]) -> ml_collections.ConfigDict:
  """Applies `--config.a.b VALUE` / `--config.a.b=VALUE` pairs (values as Python literals).

  Returns a checked copy; an unknown key, a missing value, a wrong type or a value `validate`
  refuses is a one-line ConfigError naming the key. A path the user names must exist
  (`check_named_paths`): an overridden `init_from`, and an overridden `data.cache` without a
  prepared cache there unless the overrides also ask to simulate (`data.simulate.n` or `.out`).
  """
  before = str(config.data.cache)
  config = ml_collections.ConfigDict(config.to_dict(), type_safe=True)
  items = list(overrides)
  named: set[str] = set()
  i = 0
  while i < len(items):
    flag = items[i]
    if not isinstance(flag, str) or not flag.startswith("--config."):
      raise ConfigError(f"unrecognised argument {flag!r} (overrides look like "
                        "--config.optimizer.learning_rate 1e-3)")
    if "=" in flag:
      flag, text = flag.split("=", 1)
      i += 1
    else:
      if i + 1 >= len(items):
        raise ConfigError(f"override {flag} has no value")
      text = items[i + 1]
      i += 2
    key = flag[len("--config."):]
    set_key(config, key, text)
    named.add(key)
  config.lock()
  validate(config)
  check_named_paths(config, named, before)
  return config


def check_named_paths(config: ml_collections.ConfigDict, named: set[str] | Sequence[str],
                      before: str) -> None:
  """Paths the user named on the command line must exist: `init_from` (a workdir), and
  `data.cache` (a prepared cache) unless the same overrides ask to simulate.

  A config that simulates (`data.simulate.n > 0`) prepares its cache on first use; that is for
  the path its file chose. A different path given as an override (`named` holds the overridden
  keys, `before` the file's `data.cache`) is where the user says a cache IS: preparing a
  simulated cohort there (the issue's `--config.data.cache /nonexistent`: 100 synthetic
  subjects trained on without a word) is only right when the same overrides ask to simulate
  (`data.simulate.n` or `data.simulate.out`).

  Raises:
    ConfigError: one line naming the key and the path.
  """
  named = set(named)
  # os.path (not Path) checks: they answer False for a name the OS refuses (too long, ...).
  if "init_from" in named and config.init_from and not os.path.isdir(config.init_from):
    raise ConfigError(f"config.init_from={config.init_from!r}: no such workdir")
  cache = str(config.data.cache)
  if ("data.cache" not in named or cache == before or config.data.simulate.n <= 0
      or named & {"data.simulate.n", "data.simulate.out"}):
    return
  if not os.path.isfile(os.path.join(cache, "index.json")):
    raise ConfigError(f"config.data.cache={cache!r}: no prepared cache there (no index.json); "
                      f"prepare one (brainage prepare --out {cache}), or to simulate the "
                      "config's cohort into it also set --config.data.simulate.n")


def set_key(config: ml_collections.ConfigDict, dotted: str, text: str | Any) -> None:
  """Sets `config.<dotted>` from a string (parsed as a Python literal) or a value."""
  *parents, leaf = dotted.split(".")
  node = config
  for i, part in enumerate(parents):
    if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
      raise ConfigError(f"unknown config key {'.'.join(parents[:i + 1])!r}")
    node = node[part]
  if leaf not in node or isinstance(node[leaf], ml_collections.ConfigDict):
    raise ConfigError(f"unknown config key {dotted!r}")
  ref = node[leaf]
  value = _parse(text, ref) if isinstance(text, str) else text
  if not _same_type(value, ref):
    raise ConfigError(f"config key {dotted!r} must be {type(ref).__name__}, got {text!r}")
  if isinstance(ref, float):
    value = float(value)
  if isinstance(ref, (tuple, list)):
    value = tuple(value)
  with node.unlocked():
    node[leaf] = value


def _parse(text: str, ref: Any) -> Any:
  if isinstance(ref, str):
    return text
  if isinstance(ref, bool):
    low = text.strip().lower()
    if low in ("true", "1", "yes"):
      return True
    if low in ("false", "0", "no"):
      return False
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError, TypeError, RecursionError, MemoryError):
    return text  # not a literal: the type check names the key
  if isinstance(ref, (tuple, list)) and not isinstance(value, (tuple, list)):
    value = (value,)
  return value


# ---------------------------------------------------------------------------------------------
# Checks.
# ---------------------------------------------------------------------------------------------


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

  for key, value in _flatten(config.to_dict()).items():
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


@dataclasses.dataclass(frozen=True)
class SubEnsembleSpec:
  """One sub-ensemble of an experiment: its input sequences and, optionally, atlas regions.

  Attributes:
    name: identifier (letters, digits, '_', '-'): the workdir W/sub/<name> and predictions'
      column pred_<name>.
    sequences: input channels, in order (names in the dataset, e.g. "T1w", "FLAIR").
    regions: atlas region names or labels kept (others zeroed); () = whole brain.
  """

  name: str
  sequences: tuple[str, ...]
  regions: tuple[str, ...] = ()

  def spec(self) -> str:
    text = f"{self.name}={'+'.join(self.sequences)}"
    return text + (f"@{'+'.join(self.regions)}" if self.regions else "")


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")


def parse_sub_ensembles(config: ml_collections.ConfigDict) -> tuple[SubEnsembleSpec, ...]:
  """`config.ensemble.sub_ensembles` as specs; () gives one "all" over `config.data.sequences`.

  Raises:
    ConfigError: naming the spec that is malformed, repeats a name, or names no sequence.
  """
  specs = tuple(config.ensemble.sub_ensembles)
  if not specs:
    return (SubEnsembleSpec("all", tuple(config.data.sequences)),)
  out: list[SubEnsembleSpec] = []
  for text in specs:
    def bad(what: str) -> ConfigError:
      return ConfigError(f"config.ensemble.sub_ensembles: {text!r}: {what} (expected "
                         "NAME=SEQ[+SEQ..][@REGION[+REGION..]], "
                         "e.g. 't1_cerebellum=T1w@cerebellum')")
    if not isinstance(text, str) or text.count("=") != 1:
      raise bad("not a spec")
    name, rest = (part.strip() for part in text.split("="))
    if not _NAME.match(name):
      raise bad(f"name {name!r} must be letters, digits, '_' or '-'")
    sequences_text, _, regions_text = rest.partition("@")
    sequences = tuple(s.strip() for s in sequences_text.split("+") if s.strip())
    regions = tuple(r.strip() for r in regions_text.split("+") if r.strip())
    if not sequences:
      raise bad("no sequence")
    if len(set(sequences)) != len(sequences):
      raise bad("names a sequence twice")
    if "@" in rest and not regions:
      raise bad("'@' but no region")
    if any(o.name == name for o in out):
      raise bad(f"sub-ensemble {name!r} is named twice")
    out.append(SubEnsembleSpec(name, sequences, regions))
  return tuple(out)


def _is_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _get(config: ml_collections.ConfigDict, dotted: str) -> Any:
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def model_kwargs(config: ml_collections.ConfigDict, mean_age: float,
                 age_scale: float = 1.0) -> dict[str, Any]:
  """The `get_model` fields this config sets for its model.

  Args:
    mean_age: the mean training age (years): the regression models' initial output.
    age_scale: the training ages' standard deviation (years); the output scale of a regression
      model when `config.model.scale_output` is on (ignored otherwise).
  """
  m = config.model
  dtype = {"float32": "float32", "bfloat16": "bfloat16"}[m.compute_dtype]
  kwargs: dict[str, Any] = {"dropout_rate": float(m.dropout_rate), "dtype": dtype,
                            "conv_lowering": str(m.conv_lowering)}
  if m.name == "mrinet":
    kwargs.update(mean_age=float(mean_age), dense_features=int(m.dense_features))
    if m.patch_stem:
      kwargs["patch_stem"] = int(m.patch_stem)
    if m.flip_average:
      kwargs["flip_average"] = True
    if m.conv_features:
      kwargs["conv_features"] = tuple(int(f) for f in m.conv_features)
    if m.scale_output:
      kwargs["age_scale"] = float(age_scale)
  elif m.name == "sfcn":
    kwargs.update(age_range=tuple(float(a) for a in m.age_range), bin_width=float(m.bin_width))
    if m.conv_features:
      kwargs["channels"] = tuple(int(f) for f in m.conv_features)
  elif m.name == "vit":
    kwargs.update(mean_age=float(mean_age), dense_features=int(m.dense_features),
                  **{k: (str(v) if k == "pos_embedding" else int(v)) for k, v in m.vit.items()})
    if m.flip_average:
      kwargs["flip_average"] = True
    if m.scale_output:
      kwargs["age_scale"] = float(age_scale)
  elif m.name == "sfcn_regression":
    kwargs["mean_age"] = float(mean_age)
    if m.conv_features:
      kwargs["channels"] = tuple(int(f) for f in m.conv_features)
    if m.scale_output:
      # A model without an `age_scale` field refuses it in get_model (one-line ConfigError).
      kwargs["age_scale"] = float(age_scale)
  return kwargs


def fingerprint(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The settings that define an experiment: all but `RESUMABLE_KEYS`, flattened to JSON."""
  flat = _flatten(config.to_dict())
  for key in RESUMABLE_KEYS:
    flat.pop(key, None)
  # Paths may be written differently (relative, symlinked) and still name the same data.
  for key in ("data.cache", "data.simulate.out"):
    if flat.get(key):
      flat[key] = os.path.realpath(flat[key])
  return flat


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  out: dict[str, Any] = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
  return out


def fingerprint_difference(stored: dict[str, Any], current: dict[str, Any]) -> str | None:
  """First key whose value differs, as 'key is A there, B here'; None if they agree."""
  # Keys added to base_config later (e.g. ensemble.*) are absent from older workdirs: there,
  # the default is what the experiment ran with.
  defaults = _flatten(base_config().to_dict())
  for key in sorted(set(stored) | set(current)):
    a, b = stored.get(key, "<unset>"), current.get(key, "<unset>")
    if key not in stored and key in defaults:
      a = defaults[key]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
      a, b = list(a), list(b)
    if a != b:
      return f"config.{key} is {a!r} there, {b!r} here"
  return None
