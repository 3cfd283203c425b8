"""Experiment configs: the base ConfigDict (every key, its type and default), and what is read off
a config: sub-ensemble specs, model fields, the experiment's fingerprint.

A config file exposes `get_config(arg=None)` returning a locked `ml_collections.ConfigDict` built
on `base_config()`; so every experiment has the same keys and types, and a typo'd or mistyped key
is an error instead of a silently ignored setting. Loading files and command-line overrides is
`train.config_loading`; the checks of keys and values are `train.config_checks`.

`fingerprint(config)` is the part of a config that defines the experiment (model, data, loss,
optimiser, seed, ...); a workdir stores it, and resuming with a different one is refused.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import ml_collections

from jax_brainage.errors import ConfigError

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
  flat = flatten(config.to_dict())
  for key in RESUMABLE_KEYS:
    flat.pop(key, None)
  # Paths may be written differently (relative, symlinked) and still name the same data.
  for key in ("data.cache", "data.simulate.out"):
    if flat.get(key):
      flat[key] = os.path.realpath(flat[key])
  return flat


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  """Nested dicts as one dict of dotted keys (`"optimizer.learning_rate"`); tuples as lists."""
  out: dict[str, Any] = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
  return out


def fingerprint_difference(stored: dict[str, Any], current: dict[str, Any]) -> str | None:
  """First key whose value differs, as 'key is A there, B here'; None if they agree."""
  # Keys added to base_config later (e.g. ensemble.*) are absent from older workdirs: there,
  # the default is what the experiment ran with.
  defaults = flatten(base_config().to_dict())
  for key in sorted(set(stored) | set(current)):
    a, b = stored.get(key, "<unset>"), current.get(key, "<unset>")
    if key not in stored and key in defaults:
      a = defaults[key]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
      a, b = list(a), list(b)
    if a != b:
      return f"config.{key} is {a!r} there, {b!r} here"
  return None
