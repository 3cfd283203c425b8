"""Brain-age models (flax linen, channels last `[batch, x, y, z, channel]`) and their losses.

Configs pick a model by name: `get_model("mrinet" | "sfcn" | "sfcn_regression" | "vit",
**kwargs)`.
Every model is called as `model.apply(variables, x, train=..., rngs={"dropout": key},
mutable=[...])`; regression models return age `[batch]` (years), SFCN log-probabilities over
age bins `[batch, num_bins]`. `predicted_age` turns any model's output into years and
`training_loss` gives the loss each model was designed for (MSE, or KL to soft labels).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jax_brainage.errors import ConfigError
from jax_brainage.models import losses, lowering
from jax_brainage.models.mrinet import MRInet
from jax_brainage.models.sfcn import SFCN, AgeBins, SFCNRegression, expected_age
from jax_brainage.models.sfcn import variables_from_torch as sfcn_variables_from_torch
from jax_brainage.models.vit import ViT

__all__ = [
    "MRInet", "SFCN", "SFCNRegression", "ViT", "AgeBins", "MODELS", "get_model", "predicted_age",
    "expected_age", "training_loss", "num_parameters", "has_batch_stats", "losses", "lowering",
    "sfcn_variables_from_torch", "build_model", "variable_shapes", "check_shapes",
    "OUTPUT_LAYERS", "path_name",
]

MODELS: dict[str, type[nn.Module]] = {
    "mrinet": MRInet,
    "sfcn": SFCN,
    "sfcn_regression": SFCNRegression,
    "vit": ViT,
}

# The layers that map features to the output (years, or age bins): fine-tuning to another age
# range or other bins starts them afresh (`train.finetune`).
OUTPUT_LAYERS = ("age_head", "bin_head")

_DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16,
           "bf16": jnp.bfloat16, "float16": jnp.float16, "fp16": jnp.float16}


def _as_dtype(key: str, value: Any) -> Any:
  if isinstance(value, str):
    if value not in _DTYPES:
      raise ConfigError(f"model.{key}: unknown dtype {value!r} (use one of {sorted(_DTYPES)})")
    return _DTYPES[value]
  return value


def get_model(name: str, **kwargs: Any) -> nn.Module:
  """Builds a model by name; kwargs are its fields (e.g. mean_age=52.3, dtype="bfloat16").

  Dtypes may be given as strings ("float32", "bfloat16"); lists become tuples (configs hold
  lists). Unknown names or keys raise a one-line ConfigError naming them.
  """
  if name not in MODELS:
    raise ConfigError(f"model.name: unknown model {name!r} (choose one of {sorted(MODELS)})")
  cls = MODELS[name]
  fields = {f.name for f in dataclasses.fields(cls) if f.init} - {"parent", "name"}
  for key, value in kwargs.items():
    if key not in fields:
      raise ConfigError(f"model.{key}: not a field of {name} (fields: {sorted(fields)})")
  kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items()}
  for key in ("dtype", "param_dtype"):
    if key in kwargs:
      kwargs[key] = _as_dtype(key, kwargs[key])
  return cls(**kwargs)


def predicted_age(model: nn.Module, outputs: jnp.ndarray) -> jnp.ndarray:
  """Any model's output -> predicted age `[batch]` (years, float32).

  SFCN: expectation of the bin centres under the predicted distribution; regression models
  already output years.
  """
  if isinstance(model, SFCN):
    return model.predicted_age(outputs)
  return outputs.astype(jnp.float32)


def training_loss(model: nn.Module, outputs: jnp.ndarray, ages: jnp.ndarray,
                  weights: jnp.ndarray | None = None, sigma: float = 1.0) -> jnp.ndarray:
  """The loss each model is trained with: KL to Gaussian soft labels (sigma in years) for SFCN,
  MSE (years^2) for regression models. ages, weights: `[batch]`."""
  if isinstance(model, SFCN):
    return losses.soft_label_kl(outputs, ages, model.bins.centers, sigma, weights)
  return losses.mse(outputs, ages, weights)


def has_batch_stats(model: nn.Module) -> bool:
  """Whether the model keeps BatchNorm statistics (collection `batch_stats`, `mutable` in
  training)."""
  return isinstance(model, (SFCN, SFCNRegression))


def num_parameters(model: nn.Module, input_shape: tuple[int, ...]) -> int:
  """Trainable parameter count for inputs of `input_shape` `[batch, x, y, z, channel]`.

  Uses `jax.eval_shape`, so nothing is allocated. BatchNorm statistics are not parameters.
  """
  init: Callable[[], Any] = lambda: model.init(jax.random.key(0),
                                               jnp.zeros(input_shape, jnp.float32))
  shapes = jax.eval_shape(init)
  return sum(int(x.size) for x in jax.tree.leaves(shapes["params"]))


def build_model(manifest: Mapping[str, Any]) -> nn.Module:
  """The flax module a trained model's manifest describes (`artifact.model_manifest`: model,
  model_kwargs, image_shape, sequences, ...).

  With XLA's convolution, whatever lowering it was trained with: this is the module users
  explain (one lrp rule site per conv); batched prediction switches to im2col on CPU with
  `lowering.for_inference`.
  """
  return get_model(manifest["model"], **{**manifest["model_kwargs"], "conv_lowering": "xla"})


def variable_shapes(manifest: Mapping[str, Any], members: int | None = None) -> Any:
  """Shapes of a manifest's model variables ({"params": ..., **model_state}), with a leading
  member axis `[members, ...]` unless `members` is None. Nothing is allocated."""
  model = build_model(manifest)
  channels = len(manifest["sequences"])
  shapes = jax.eval_shape(
      lambda: model.init({"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(0)},
                         jnp.zeros((1, *manifest["image_shape"], channels), jnp.float32),
                         train=False))
  if members is None:
    return shapes
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct((members, *s.shape), s.dtype), shapes)


def check_shapes(stored: Any, expected: Any, where: Any) -> None:
  """ConfigError naming `where` (a checkpoint or store) and the first leaf whose tree path or
  array shape differs between `stored` and `expected` (e.g. `variable_shapes(manifest)`)."""
  def shape_map(tree: Any) -> dict[str, tuple[int, ...]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {path_name(p): tuple(getattr(x, "shape", np.shape(x))) for p, x in flat}

  have, want = shape_map(stored), shape_map(expected)
  for name in sorted(set(have) | set(want)):
    if have.get(name) != want.get(name):
      raise ConfigError(f"checkpoint {where} does not fit this model: {name} has shape "
                        f"{have.get(name, 'missing')} there, {want.get(name, 'missing')} here")


def path_name(path: tuple[Any, ...]) -> str:
  """A tree path as "conv1/kernel" (keys joined by "/")."""
  parts = []
  for p in path:
    for attr in ("key", "name", "idx"):
      if hasattr(p, attr):
        parts.append(str(getattr(p, attr)))
        break
    else:
      parts.append(str(p))
  return "/".join(parts)
