"""Fine-tuning: start training from another workdir's model, with frozen or slower layers.

`brainage train --config.init_from W` starts from the trained model of W: any workdir that
`artifact.load` reads (a trained single model, a sub-ensemble's workdir, an imported model). The
parameters (and BatchNorm statistics) are copied leaf by leaf; optimiser state and step start
fresh. Layers are matched by their flax path (`conv0/kernel`, `bn3/scale`, `age_head/bias`):

- the model's output layer (`models.OUTPUT_LAYERS`: MRInet's `age_head`, SFCN's `bin_head`) starts
  afresh when its shape differs, e.g. SFCN fine-tuned with other age bins
  (`--config.model.age_range`), so a new output range needs no other setting;
- `config.finetune.reinit` lists further layers (fnmatch patterns) that start afresh;
- any other difference (another architecture, width or input shape) is a one-line error naming
  the first layer that does not fit.

The optimiser (`finetune_optimizer`) gives each parameter one of three labels and an
`optax.multi_transform` a rule per label (discriminative learning rates, as ULMFiT):

- "frozen" (`config.finetune.freeze` patterns): no update, and their BatchNorm statistics stay
  as loaded (`keep_frozen_state`), so a frozen block computes exactly what it did;
- "pretrained" (every other loaded layer): the optimiser's update times
  `config.finetune.pretrained_lr_scale` (1 = one learning rate for all);
- "fresh" (the output layer and `reinit` layers): the full learning rate.

With no freeze and a scale of 1 the optimiser is the plain one of `steps.make_optimizer`.
A member axis is handled: an ensemble fine-tunes member m from the source's member m, or every
member from a single source model.
"""

from __future__ import annotations

import fnmatch
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jax_brainage import models
from jax_brainage.errors import ConfigError
from jax_brainage.train import artifact
from jax_brainage.train import checkpoint as ckpt_lib

FROZEN, PRETRAINED, FRESH = "frozen", "pretrained", "fresh"


def matches(name: str, patterns: tuple[str, ...] | list[str]) -> bool:
  """Whether a leaf path ("conv0/kernel") lies in a layer one of the fnmatch patterns names
  ("conv0", "conv[0-2]", "bn*", "dense1/kernel")."""
  return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, f"{p}/*")
             for p in patterns)


def is_active(config: ml_collections.ConfigDict) -> bool:
  """Whether the optimiser differs from the plain one (something frozen or slower)."""
  return bool(config.finetune.freeze) or float(config.finetune.pretrained_lr_scale) != 1.0


def check_patterns(config: ml_collections.ConfigDict, params: Any) -> None:
  """ConfigError naming a `finetune.freeze`/`reinit` pattern that matches no layer of the model
  (a typo would otherwise train everything in silence), listing the layers there are."""
  names = [models.path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  layers = sorted({n.split("/")[0] for n in names})
  for key in ("freeze", "reinit"):
    for pattern in config.finetune[key]:
      if not any(matches(n, (pattern,)) for n in names):
        raise ConfigError(f"config.finetune.{key}: {pattern!r} matches no layer of "
                          f"{config.model.name} (layers: {', '.join(layers)})")
  both = [n for n in names if matches(n, config.finetune.freeze)
          and (matches(n, config.finetune.reinit) or _is_output(n))]
  if both:
    raise ConfigError(f"config.finetune.freeze: {both[0]} would be frozen at a fresh "
                      "initialisation (it is an output or reinit layer)")


def _is_output(name: str) -> bool:
  return name.split("/")[0] in models.OUTPUT_LAYERS


def param_labels(config: ml_collections.ConfigDict, params: Any) -> Any:
  """A tree like `params` of "frozen" | "pretrained" | "fresh" (see the module docstring)."""
  def label(path, _):
    name = models.path_name(path)
    if matches(name, config.finetune.freeze):
      return FROZEN
    if _is_output(name) or matches(name, config.finetune.reinit):
      return FRESH
    return PRETRAINED
  return jax.tree_util.tree_map_with_path(label, params)


def finetune_optimizer(config: ml_collections.ConfigDict,
                       tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """`tx` (the configured optimiser) per label: frozen layers get no update, pretrained ones
  `tx`'s update scaled by `finetune.pretrained_lr_scale`, fresh ones `tx` itself."""
  scale = float(config.finetune.pretrained_lr_scale)
  pretrained = tx if scale == 1.0 else optax.chain(tx, optax.scale(scale))
  return optax.multi_transform(
      {FROZEN: optax.set_to_zero(), PRETRAINED: pretrained, FRESH: tx},
      lambda params: param_labels(config, params))


def keep_frozen_state(config: ml_collections.ConfigDict, old: Any, new: Any) -> Any:
  """The model state (BatchNorm statistics) after a step, with frozen layers' entries kept as
  they were: `old`, `new` are {"batch_stats": {layer: ...}} trees of the same structure."""
  patterns = tuple(config.finetune.freeze)
  if not patterns or not new:
    return new

  def pick(path, o, n):
    # model_state paths start with the collection ("batch_stats/bn0/mean"): match the rest.
    name = models.path_name(path).split("/", 1)[-1]
    return o if matches(name, patterns) else n
  return jax.tree_util.tree_map_with_path(pick, old, new)


def _source_variables(source: str) -> tuple[Any, dict[str, Any]]:
  """(variables {"params": ..., **model_state} stacked [S, ...], manifest) of the one
  sub-ensemble of workdir `source` (its best checkpoint, else its latest)."""
  try:
    ensemble = artifact.load(source, ckpt_lib.BEST)
  except ConfigError:
    try:
      ensemble = artifact.load(source, ckpt_lib.LATEST)
    except ConfigError as e:
      raise ConfigError(f"config.init_from={source!r}: {e}") from None
  if len(ensemble.subs) != 1:
    names = ", ".join(s.name for s in ensemble.subs)
    raise ConfigError(f"config.init_from={source!r}: holds {len(ensemble.subs)} sub-ensembles "
                      f"({names}); fine-tune from one of them ({source}/sub/<name>)")
  sub = ensemble.subs[0]
  return sub.variables, dict(sub.manifest)


def load_pretrained(config: ml_collections.ConfigDict, state: dict[str, Any],
                    state_sharding: Any, members: int | None = None) -> dict[str, Any]:
  """`state` with params and model state from `config.init_from` (see the module docstring).

  Args:
    state: a fresh training state (params `[members, ...]` when `members` is not None).
    state_sharding: its shardings (the loaded arrays are placed like the fresh ones).
    members: the ensemble's member count M, or None for a single model. The source's S members
      map one to one (S == M), or its one model starts every member (S == 1).

  Raises:
    ConfigError: one line naming the source workdir and the first layer that does not fit.
  """
  source = str(config.init_from)
  variables, manifest = _source_variables(source)
  if manifest.get("model") != config.model.name:
    raise ConfigError(f"config.init_from={source!r}: holds a {manifest.get('model')} model, "
                      f"this experiment trains {config.model.name}")
  s = int(jax.tree.leaves(variables)[0].shape[0])
  if members is None:
    if s != 1:
      raise ConfigError(f"config.init_from={source!r}: holds {s} members; a single model "
                        "starts from one (train an ensemble with --config.ensemble.members "
                        f"{s}, or fine-tune from one member's workdir)")
    take = lambda x: x[0]
  elif s in (1, members):
    take = lambda x: np.broadcast_to(x, (members, *x.shape[1:])) if s == 1 else x
  else:
    raise ConfigError(f"config.init_from={source!r}: holds {s} members, this ensemble has "
                      f"{members} (use as many, or a single source model)")
  check_patterns(config, state["params"])
  fresh = {"params": state["params"], **state["model_state"]}
  flat_src = {models.path_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(variables)[0]}
  names = {models.path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(fresh)[0]}
  extra = sorted(set(flat_src) - names)
  if extra:
    raise ConfigError(f"config.init_from={source!r}: layer {extra[0]} there has no counterpart "
                      f"in this {config.model.name}")
  reinit = tuple(config.finetune.reinit)

  def take_leaf(path, x):
    name = models.path_name(path)
    layer = name.split("/", 1)[-1] if name.split("/")[0] != "params" else name[len("params/"):]
    if name not in flat_src:
      raise ConfigError(f"config.init_from={source!r}: has no {name} for this "
                        f"{config.model.name}")
    if matches(layer, reinit):
      return x
    src = take(np.asarray(flat_src[name]))
    if src.shape != x.shape:
      if _is_output(layer):
        return x  # a new output range or bins: the output layer starts afresh
      raise ConfigError(f"config.init_from={source!r}: {name} has shape {tuple(src.shape)} "
                        f"there, {tuple(x.shape)} here (list the layer in "
                        "--config.finetune.reinit to start it afresh)")
    return jnp.asarray(src, x.dtype)

  loaded = jax.tree_util.tree_map_with_path(take_leaf, fresh)
  params = loaded.pop("params")
  placed = jax.device_put({"params": params, "model_state": loaded},
                          {"params": state_sharding["params"],
                           "model_state": state_sharding["model_state"]})
  return dict(state, **placed)
