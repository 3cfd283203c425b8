"""The training step of one model: schedule, optimiser, loss, state, jitted update and evaluation.

`build_setup(config, ...)` compiles everything one experiment needs on one mesh (`Setup`): the
flax model, the optax chain, the state's shardings, the update step (state donated, explicit
output shardings) and the evaluation step whose weighted sums `evaluate` turns into loss, MAE
and RMSE (years). The ensemble's member steps (`train.members`) vmap these same steps.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jax_brainage import models, sharding
from jax_brainage.models import losses
from jax_brainage.train import config as config_lib
from jax_brainage.train import finetune

# The metric "bad_step" of a step whose loss was finite: no step of a run reaches it.
NO_BAD_STEP = np.iinfo(np.int32).max


def make_schedule(opt: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Learning rate per step: optional linear warm-up from 0, then constant or cosine to 0."""
  lr, warmup = float(opt.learning_rate), int(opt.warmup_steps)
  if opt.schedule == "constant":
    main = optax.constant_schedule(lr)
  else:
    main = optax.cosine_decay_schedule(lr, decay_steps=max(total_steps - warmup, 1))
  if warmup == 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def make_optimizer(opt: ml_collections.ConfigDict,
                   schedule: optax.Schedule) -> optax.GradientTransformation:
  """optax chain from `config.optimizer` (Adam by default, as in the study); `optimizer_for`
  adds fine-tuning's frozen and slower layers."""
  if opt.name == "adam":
    tx = optax.adam(schedule)
  elif opt.name == "adamw":
    tx = optax.adamw(schedule, weight_decay=float(opt.weight_decay))
  else:
    tx = optax.sgd(schedule, momentum=float(opt.momentum))
  if opt.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(float(opt.grad_clip_norm)), tx)
  return tx


def optimizer_for(config: ml_collections.ConfigDict, schedule: optax.Schedule,
                  abstract_params: Any) -> optax.GradientTransformation:
  """The experiment's optimiser: `make_optimizer`, per layer label when fine-tuning freezes
  layers or slows the pretrained ones (`finetune.finetune_optimizer`; patterns checked against
  `abstract_params`, the model's parameter shapes)."""
  tx = make_optimizer(config.optimizer, schedule)
  if not finetune.is_active(config):
    return tx
  finetune.check_patterns(config, abstract_params)
  return finetune.finetune_optimizer(config, tx)


def per_example_loss(config: ml_collections.ConfigDict, model, outputs: jax.Array,
                     ages: jax.Array) -> jax.Array:
  """The configured loss per example `[batch]`: squared error (years^2), absolute error
  (years) or KL to Gaussian soft labels (nats)."""
  if config.loss == "soft_label":
    return losses.soft_label_kl_per_example(outputs, ages, model.bins.centers,
                                            config.soft_label_sigma)
  if config.loss == "mae":
    return losses.absolute_error_per_example(outputs, ages)
  return losses.squared_error_per_example(outputs, ages)


def init_state(model, tx: optax.GradientTransformation, image_shape: tuple[int, ...],
               channels: int, seed: int) -> dict[str, Any]:
  """Fresh training state: `step`, `params`, `model_state` (BatchNorm statistics or {}),
  `opt_state`, `rng` (raw uint32 [2] key; the step's dropout key is folded from it)."""
  init_key, rng = jax.random.split(jax.random.PRNGKey(seed))
  variables = model.init({"params": init_key, "dropout": init_key},
                         jnp.zeros((1, *image_shape, channels), jnp.float32), train=False)
  params = variables["params"]
  model_state = {k: v for k, v in variables.items() if k != "params"}
  return {"step": jnp.zeros((), jnp.int32), "params": params, "model_state": model_state,
          "opt_state": tx.init(params), "rng": rng}


def model_params(model, image_shape: tuple[int, ...], channels: int) -> Any:
  """The model's parameter shapes (nothing allocated)."""
  return jax.eval_shape(lambda: init_state(model, optax.identity(), tuple(image_shape), channels,
                                           0))["params"]


def make_train_step(config: ml_collections.ConfigDict, model,
                    tx: optax.GradientTransformation) -> Callable:
  """(state, batch) -> (state, metrics); not yet jitted (the caller decides shardings)."""

  def train_step(state, batch):
    images = batch["image"]  # float32 in [0, 1], augmented by the input pipeline
    dropout_key = jax.random.fold_in(state["rng"], state["step"])
    mutable = list(state["model_state"])

    def loss_fn(params):
      variables = {"params": params, **state["model_state"]}
      if mutable:
        outputs, new_model_state = model.apply(variables, images, train=True,
                                               rngs={"dropout": dropout_key}, mutable=mutable)
      else:
        outputs = model.apply(variables, images, train=True, rngs={"dropout": dropout_key})
        new_model_state = {}
      loss = jnp.mean(per_example_loss(config, model, outputs, batch["age"]))
      return loss, (outputs, dict(new_model_state))

    (loss, (outputs, new_model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"])
    # Fine-tuning: frozen layers keep their BatchNorm statistics too.
    new_model_state = finetune.keep_frozen_state(config, state["model_state"], new_model_state)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    age = models.predicted_age(model, outputs)
    metrics = {
        "loss": loss,
        "mae": jnp.mean(jnp.abs(age - batch["age"])),
        "grad_norm": optax.tree.norm(grads),
        # The first step whose loss was not finite (max int32 if none): found without a
        # host sync per step.
        "bad_step": jnp.where(jnp.isfinite(loss), NO_BAD_STEP, state["step"]),
    }
    new_state = {"step": state["step"] + 1, "params": params, "model_state": new_model_state,
                 "opt_state": opt_state, "rng": state["rng"]}
    return new_state, metrics

  return train_step


def make_eval_step(config: ml_collections.ConfigDict, model) -> Callable:
  """(state, batch) -> weighted sums {loss, abs_error, squared_error, count} over the batch."""

  def eval_step(state, batch):
    images = batch["image"]
    variables = {"params": state["params"], **state["model_state"]}
    outputs = model.apply(variables, images, train=False)
    age = models.predicted_age(model, outputs)
    w = batch["mask"].astype(jnp.float32)  # padding rows of the last batch count 0
    error = age - batch["age"]
    return {"loss": jnp.sum(w * per_example_loss(config, model, outputs, batch["age"])),
            "abs_error": jnp.sum(w * jnp.abs(error)),
            "squared_error": jnp.sum(w * jnp.square(error)),
            "count": jnp.sum(w)}

  return eval_step


def evaluate(eval_step: Callable, state: Any, pipeline: Any) -> dict[str, float]:
  """Mean loss, MAE and RMSE (years) over one pass of an evaluation pipeline (padding rows
  weigh 0)."""
  total: dict[str, Any] | None = None
  for batch in pipeline:
    sums = eval_step(state, batch)
    total = sums if total is None else jax.tree.map(jnp.add, total, sums)
    # Summing on device keeps the host out of the loop; one fetch at the end.
  total = sharding.to_host(total)
  count = float(total["count"])
  return {"loss": float(total["loss"]) / count, "mae": float(total["abs_error"]) / count,
          "rmse": math.sqrt(float(total["squared_error"]) / count), "n": int(count)}


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything compiled for one experiment on one mesh (see `build_setup`).

  Attributes:
    model: the flax module; tx, schedule: optimiser and learning rate per step.
    init: seed -> fresh training state (host-side, unsharded; see `init_state`).
    abstract_state: shapes, dtypes and shardings of the training state.
    state_sharding: the state's shardings (from `sharding.state_shardings`).
    train_step: jitted (state, batch) -> (state, metrics); the state is donated.
    eval_step: jitted (state, batch) -> weighted sums for `evaluate`.
  """

  model: Any
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  init: Callable[[int], Any]
  abstract_state: Any
  state_sharding: Any
  train_step: Callable
  eval_step: Callable


# Compiled setups kept per process (the few most recent experiments), by experiment and mesh.
MAX_SETUPS = 4
_SETUPS: dict[tuple[str, Any], Setup] = {}


def build_setup(config: ml_collections.ConfigDict, image_shape: tuple[int, int, int],
                channels: int, mean_age: float, total_steps: int, mesh, *,
                age_scale: float = 1.0) -> Setup:
  """Model, optimiser, shardings and jitted steps for an experiment on `mesh`.

  mean_age and age_scale (years) are the mean and, with `config.model.scale_output`, the standard
  deviation of the training ages (`artifact.train_age_scale`).

  Shapes come from `jax.eval_shape`; the update step is jitted with the state donated and
  explicit output shardings. Setups are kept for the few most recent experiments, so a run
  resumed in the same process (or trained again on other data of the same shape) does not
  compile again.
  """
  # The seed only enters through `init(seed)` and the data: runs with other seeds share a setup.
  experiment = {k: v for k, v in config_lib.fingerprint(config).items() if k != "seed"}
  # The conv lowering is resumable (not in the fingerprint) but compiles another program.
  key = (json.dumps([experiment, str(config.model.conv_lowering), list(image_shape), channels,
                     mean_age, age_scale, total_steps], sort_keys=True, default=str), mesh)
  if key in _SETUPS:
    return _SETUPS[key]
  model = models.get_model(config.model.name,
                           **config_lib.model_kwargs(config, mean_age, age_scale))
  schedule = make_schedule(config.optimizer, total_steps)
  tx = optimizer_for(config, schedule, model_params(model, image_shape, channels))
  init = functools.partial(init_state, model, tx, tuple(image_shape), channels)
  state_sharding = sharding.state_shardings(mesh, jax.eval_shape(init, 0))
  abstract_state = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      jax.eval_shape(init, 0), state_sharding)
  metric_sharding = sharding.replicated(mesh)
  setup = Setup(
      model=model, tx=tx, schedule=schedule, init=init, abstract_state=abstract_state,
      state_sharding=state_sharding,
      train_step=jax.jit(make_train_step(config, model, tx), donate_argnums=(0,),
                         out_shardings=(state_sharding, metric_sharding)),
      eval_step=jax.jit(make_eval_step(config, model), out_shardings=metric_sharding))
  if len(_SETUPS) >= MAX_SETUPS:
    _SETUPS.pop(next(iter(_SETUPS)))
  _SETUPS[key] = setup
  return setup
