"""Relevance maps of brain-age models: which voxels made the estimate older or younger.

    from jax_brainage.explain import maps
    from jax_brainage.train import artifact
    model = artifact.load("runs/tiny")              # any trained workdir: an Ensemble
    R = maps.relevance(model, volumes)              # [n, X, Y, Z, C] cube space
    img = maps.to_subject_space(R[0, ..., 0], inverse)   # the subject's own grid and affine

Methods (`METHODS`, by snake_case name): every LRP composite of `lrp.composites` and four
gradient baselines. LRP starts from the predicted age itself (years), so positive relevance pushes
the estimate older and negative younger (relative to what biases absorb, e.g. the output bias at
the mean training age); the baselines take the gradient of the predicted age.

Inputs are the cache's stored cubes (uint8 for minmax scaling, float16 for z-scores) or network
inputs (float32); they are scaled to network inputs on the device exactly as in training, so
relevance is with respect to the network input (intensities in [0, 1] for minmax caches). One
jitted function per (model, method) computes fixed-size batches split over the devices (the last
batch is padded and the padding dropped); random methods (SmoothGrad) draw their noise from
`fold_in(PRNGKey(seed), row)`, so a subject's map does not depend on its batch.

Every trained model is an `ensemble.model.Ensemble` (a single model is an ensemble of one), and
`ensemble_maps` is the one implementation: every member of every sub-ensemble is explained
in one jitted `vmap` over its stacked parameters; a sub-ensemble's map is its level-1 head's
weighted sum of its members' maps and the ensemble's map the sum of all members' maps weighted by
their effective weights in the multi-level head (exact for a linear head: the intercept gets no
relevance). Sub-ensembles may read different sequences: the ensemble's map has one channel per
sequence of any sub-ensemble (`EnsembleMaps.sequences`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np

import lrp
from jax_brainage import models, sharding
from jax_brainage.data import intensity, nifti, prune
from jax_brainage.errors import ConfigError, DataError

# ---------------------------------------------------------------------------------------------
# Methods.

Attribute = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class Method:
  """One attribution method.

  Attributes:
    name: snake_case name (the `--composite` value).
    kind: "lrp" (a composite of `lrp.composites`) or "baseline" (gradient-based).
    summary: one line on what it does.
    attribute: `attribute(apply_fn, variables, x [n, ...], *, keys [n, 2] uint32, low, high)
      -> [n, ...]`, traceable; `low`/`high` bound the input (for ZBox), broadcastable to x.
      With `references`, it also takes `baseline` `[n, k, ...]` (k reference inputs per sample)
      and explains f(x) against their mean prediction, and optionally `fraction` `[n, k]` in
      [0, 1]: each path starts only that far along from x towards its reference (0: no path).
    references: whether it explains against reference inputs (`--target gap`, integrated
      gradients from each reference scan) instead of against its own fixed baseline.
  """

  name: str
  kind: str
  summary: str
  attribute: Attribute
  references: bool = False


def _lrp(make_composite: Callable[[Any, Any], Any]) -> Attribute:
  def attribute(apply_fn, variables, x, *, keys, low, high):
    del keys
    return lrp.relevance(apply_fn, variables, x, composite=make_composite(low, high))
  return attribute


def composite_method(composite, name: str = "custom") -> Method:
  """A `Method` of any `lrp.composites.Composite` instance (e.g. one with other epsilons), for
  `Explainer`, `ensemble_maps` and `relevance`. Keep the instance: one compiled function per
  method."""
  return Method(name, "lrp", f"custom composite {type(composite).__name__}",
                _lrp(lambda lo, hi: composite))


def _per_sample(fn: Callable) -> Attribute:
  """A baseline whose randomness must not depend on the batch: one sample at a time (vmap)."""
  def attribute(apply_fn, variables, x, *, keys, low, high):
    del low, high
    return jax.vmap(lambda xi, k: fn(apply_fn, variables, xi[None], k)[0])(x, keys)
  return attribute


def _gradient(apply_fn, variables, x, *, keys, low, high):
  del keys, low, high
  return lrp.attribution.gradient(apply_fn, variables, x)


def _gradient_x_input(apply_fn, variables, x, *, keys, low, high):
  del keys, low, high
  return lrp.attribution.gradient_x_input(apply_fn, variables, x)


IG_STEPS = 32


def _integrated_gradients(apply_fn, variables, x, *, keys, low, high, baseline=None,
                          fraction=None):
  del keys, low, high
  if baseline is None:
    # Baseline: the all-zero input (background intensity of a minmax cube), 32 midpoint steps.
    return lrp.attribution.integrated_gradients(apply_fn, variables, x, n_steps=IG_STEPS)
  # k reference inputs per sample `[n, k, ...]`: the mean of the paths from each (expected
  # gradients over the reference set, Erion et al. 2021), the 32 gradient evaluations shared
  # out (at least 4 per path); sums to f(x) - mean_j f(x_j) up to the midpoint rule's error.
  steps = max(4, IG_STEPS // baseline.shape[1])
  weight = None
  if fraction is not None:
    # Shortened paths (`--reference expected`): from x'_k = x + t_k (x_k - x) to x. t_k = 0 is
    # a path of length 0 (x'_k == x exactly: a zero map); the mean is over the paths with
    # t_k > 0, so the map sums to the mean of f(x) - f(x'_k) over them.
    t = fraction.astype(x.dtype)
    tb = t.reshape(t.shape + (1,) * (x.ndim - 1))
    baseline = x[:, None] + tb * (baseline - x[:, None])
    used = (t > 0).astype(x.dtype)
    weight = used / jnp.maximum(1.0, jnp.sum(used, axis=1, keepdims=True))  # [n, k]

  def one(b):
    return lrp.attribution.integrated_gradients(apply_fn, variables, x, baseline=b,
                                                n_steps=steps)

  per_path = jax.lax.map(one, jnp.moveaxis(baseline, 1, 0))  # [k, n, ...]
  if weight is None:
    return jnp.mean(per_path, axis=0)
  w = jnp.moveaxis(weight, 1, 0).reshape(weight.shape[::-1] + (1,) * (x.ndim - 1))
  return jnp.sum(per_path * w, axis=0)


_C = lrp.composites
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("epsilon_plus_flat", "lrp",
           "ZPlus on convolutions, Epsilon on dense layers, Flat on the first layer",
           _lrp(lambda lo, hi: _C.EpsilonPlusFlat())),
    Method("epsilon_plus", "lrp", "ZPlus on convolutions, Epsilon on dense layers",
           _lrp(lambda lo, hi: _C.EpsilonPlus())),
    Method("epsilon_gamma_box", "lrp",
           "Gamma(0.25) on convolutions, Epsilon on dense layers, ZBox(input bounds) first",
           _lrp(lambda lo, hi: _C.EpsilonGammaBox(lo, hi))),
    Method("epsilon_alpha2_beta1", "lrp", "AlphaBeta(2, 1) on convolutions, Epsilon on dense",
           _lrp(lambda lo, hi: _C.EpsilonAlpha2Beta1())),
    Method("epsilon_alpha2_beta1_flat", "lrp",
           "AlphaBeta(2, 1) on convolutions, Epsilon on dense, Flat on the first layer",
           _lrp(lambda lo, hi: _C.EpsilonAlpha2Beta1Flat())),
    Method("sequential_preset_a", "lrp",
           "the study's preset: AlphaBeta(1, 0) on convolutions, Epsilon(0.1) on dense layers",
           _lrp(lambda lo, hi: _C.SequentialPresetA())),
    Method("epsilon_all", "lrp", "Epsilon(1e-6) on every layer (close to gradient x input)",
           _lrp(lambda lo, hi: _C.EpsilonAll())),
    Method("attn_lrp", "lrp",
           "AttnLRP (Achtibat et al. 2024) for transformers: Epsilon on linear layers, softmax "
           "and attention matmuls by their AttnLRP rules, LayerNorm scale constant",
           _lrp(lambda lo, hi: _C.AttnLRP())),
    Method("cp_lrp", "lrp",
           "CP-LRP (Ali et al. 2022) for transformers: attention weights and LayerNorm scales "
           "as constants, Epsilon on linear layers",
           _lrp(lambda lo, hi: _C.CPLRP())),
    Method("gradient", "baseline", "gradient of the predicted age (years per unit intensity)",
           _gradient),
    Method("gradient_x_input", "baseline", "input times the gradient of the predicted age",
           _gradient_x_input),
    Method("smoothgrad", "baseline",
           "mean gradient over 16 noisy copies (noise SD 10% of the intensity range)",
           _per_sample(lambda f, v, x, k: lrp.attribution.smoothgrad(
               f, v, x, key=k, n_samples=16, noise_level=0.1))),
    Method("integrated_gradients", "baseline",
           "Integrated Gradients from the all-zero input (--target gap: from each reference "
           "scan), 32 midpoint steps", _integrated_gradients, references=True),
)}
# Chosen by `brainage evaluate-explanations` on the simulated cohort (README, "Default
# composite"): tied best on ageing-mask mass/rank accuracy and ABPC with LRP-epsilon everywhere,
# which reproduces gradient x input; the z+ composites (epsilon_plus*, the study's preset A)
# scored at or below chance there.
DEFAULT_METHOD = "epsilon_alpha2_beta1"


def get_method(name: str) -> Method:
  """The method called `name`; ConfigError naming the known ones otherwise."""
  key = str(name).strip().lower().replace("-", "_")
  if key not in METHODS:
    raise ConfigError(f"--composite {name!r}: unknown method; choose one of "
                      f"{', '.join(METHODS)}")
  return METHODS[key]


# ---------------------------------------------------------------------------------------------
# Models: what is explained.


def regression_apply(model) -> Callable:
  """`apply_fn(variables, x [n, X, Y, Z, C] float32) -> predicted age [n]` (years) of a
  regression model, the function every method explains."""
  if isinstance(model, models.SFCN):
    raise ConfigError(f"{type(model).__name__}: relevance maps explain regression models "
                      "(mrinet, sfcn_regression); SFCN's age-bin distribution has no single "
                      "output to start from")
  # One rule site per convolution: a model trained with im2col is explained with XLA's conv.
  model = models.lowering.for_relevance(model)

  def apply_fn(variables, x):
    return model.apply(variables, x, train=False).astype(jnp.float32)

  return apply_fn


def input_bounds(x: jax.Array, stored_dtype: np.dtype) -> tuple[Any, Any]:
  """Input bounds for ZBox: [0, 1] for minmax (uint8) cubes, else each sample's and channel's
  range `[n, 1, 1, 1, C]`."""
  if stored_dtype == np.uint8:
    return 0.0, 1.0
  axes = tuple(range(1, x.ndim - 1))
  return jnp.min(x, axis=axes, keepdims=True), jnp.max(x, axis=axes, keepdims=True)


def _network_input(volumes: jax.Array) -> jax.Array:
  return intensity.to_unit_float(volumes)


class Explainer:
  """Jitted, data-parallel relevance of fixed-size batches for one model or a member stack.

  Explainers of the same model, method and devices share one compiled function.

  Args:
    model: the flax module (a regression model).
    variables: its variables; with `stacked=True` every leaf has a leading member axis [M, ...].
    method: a `Method` or its name.
    batch_size: volumes per call (rounded up to a multiple of the devices).
    seed: seed of the random methods (SmoothGrad); may be changed between calls (the noise keys
      are made on the host, nothing is compiled again).
    stacked: explain every member of a stack at once (one vmap).
    devices: devices to split batches over (default: this process's).
  """

  def __init__(self, model, variables, method: Method | str = DEFAULT_METHOD, *,
               batch_size: int = 8, seed: int = 0, stacked: bool = False,
               devices: Sequence[jax.Device] | None = None):
    self.method = get_method(method) if isinstance(method, str) else method
    self.mesh = sharding.make_mesh(devices=list(devices or jax.local_devices()))
    n = sharding.data_size(self.mesh)
    self.batch_size = max(n, int(math.ceil(max(1, batch_size) / n)) * n)
    self.stacked = stacked
    self.seed = int(seed)
    self._batch_sharding = sharding.batch_sharding(self.mesh)
    self._variables = sharding.put_replicated(self.mesh, variables)
    self._model = model
    self._fn_ref: dict[str, Callable] = {}  # compiled on first use with reference inputs
    self._fn = _compiled(model, self.method, stacked, self.mesh)

  def __call__(self, volumes: np.ndarray, rows: np.ndarray | None = None,
               references: np.ndarray | None = None, fractions: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """Relevance and predicted age of volumes `[n, X, Y, Z, C]`.

    Args:
      volumes: uint8 / float16 cubes as stored, or float32 network inputs.
      rows: int `[n]` identities of the volumes for the random methods' keys (default 0..n-1).
      references: `[n, k, X, Y, Z, C]` reference inputs per volume (stored like `volumes`), for
        methods with `Method.references` (relevance of f(x) against their mean prediction).
      fractions: `[n, k]` in [0, 1] with `references`: each path runs from
        x + t (reference - x) to x (0: none; `reference.path_fractions`).
    Returns:
      (relevance float32 `[n, X, Y, Z, C]` (`[M, n, ...]` for a stack), predicted age float32
      `[n]` (`[M, n]`), years).
    """
    volumes = np.asarray(volumes)
    if volumes.ndim != 5:
      raise DataError(f"volumes must be [n, X, Y, Z, C], got shape {volumes.shape}")
    rows = np.arange(len(volumes)) if rows is None else np.asarray(rows)
    if references is not None:
      if not self.method.references:
        raise ConfigError(f"{self.method.name}: explains against its own baseline, not against "
                          "reference inputs")
      references = np.asarray(references)
      if references.shape[:1] + references.shape[2:] != volumes.shape:
        raise DataError(f"references must be [n, k, X, Y, Z, C] for volumes {volumes.shape}, "
                        f"got {references.shape}")
      if fractions is not None:
        fractions = np.asarray(fractions, np.float32)
        if fractions.shape != references.shape[:2]:
          raise DataError(f"fractions must be [n, k] = {list(references.shape[:2])}, got "
                          f"{list(fractions.shape)}")
      mode = "references" if fractions is None else "paths"
      if mode not in self._fn_ref:
        self._fn_ref[mode] = _compiled(self._model, self.method, self.stacked, self.mesh, mode)
    elif fractions is not None:
      raise DataError("fractions need references")
    rel, pred = [], []
    for start in range(0, len(volumes), self.batch_size):
      window = slice(start, start + self.batch_size)
      r, p = self._batch(volumes[window], rows[window],
                         None if references is None else references[window],
                         None if fractions is None else fractions[window])
      rel.append(r)
      pred.append(p)
    axis = 1 if self.stacked else 0
    if not rel:
      return (np.zeros(volumes.shape, np.float32), np.zeros((0,), np.float32))
    return np.concatenate(rel, axis=axis), np.concatenate(pred, axis=axis)

  def _batch(self, chunk: np.ndarray, rows: np.ndarray, refs: np.ndarray | None,
             fractions: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    k = len(chunk)
    if k < self.batch_size:  # one compiled shape: pad with zero volumes, dropped below
      chunk = np.concatenate([chunk, np.zeros((self.batch_size - k, *chunk.shape[1:]),
                                              chunk.dtype)])
      rows = np.concatenate([rows, np.zeros(self.batch_size - k, rows.dtype)])
      if refs is not None:
        refs = np.concatenate([refs, np.zeros((self.batch_size - k, *refs.shape[1:]),
                                              refs.dtype)])
      if fractions is not None:
        fractions = np.concatenate([fractions, np.zeros((self.batch_size - k,
                                                         fractions.shape[1]), np.float32)])
    base = jax.random.PRNGKey(self.seed)
    keys = jax.vmap(lambda r: jax.random.fold_in(base, r))(jnp.asarray(rows, jnp.uint32))
    volumes = jax.device_put(np.ascontiguousarray(chunk), self._batch_sharding)
    keys = jax.device_put(keys, self._batch_sharding)
    if refs is None:
      r, p = jax.device_get(self._fn(self._variables, volumes, keys))
    elif fractions is None:
      refs = jax.device_put(np.ascontiguousarray(refs), self._batch_sharding)
      r, p = jax.device_get(self._fn_ref["references"](self._variables, volumes, keys, refs))
    else:
      refs = jax.device_put(np.ascontiguousarray(refs), self._batch_sharding)
      t = jax.device_put(np.ascontiguousarray(fractions), self._batch_sharding)
      r, p = jax.device_get(self._fn_ref["paths"](self._variables, volumes, keys, refs, t))
    if self.stacked:
      return np.asarray(r)[:, :k], np.asarray(p)[:, :k]
    return np.asarray(r)[:k], np.asarray(p)[:k]


@functools.lru_cache(maxsize=32)
def _compiled(model, method: Method, stacked: bool, mesh, mode: str = "plain") -> Callable:
  """The jitted `(variables, volumes, keys[, references[, fractions]]) -> (relevance, predicted
  age)` of a model and method (mode "plain", "references" or "paths"), shared by every
  Explainer of the same model, method and mesh (compiled once per shape)."""
  apply_fn = regression_apply(model)
  attribute = method.attribute

  def one(variables, volumes, keys, references=None, fractions=None):
    x = _network_input(volumes)
    low, high = input_bounds(x, volumes.dtype)
    extra = {} if references is None else {"baseline": _network_input(references)}
    if fractions is not None:
      extra["fraction"] = fractions
    r = attribute(apply_fn, variables, x, keys=keys, low=low, high=high, **extra)
    return r.astype(jnp.float32), apply_fn(variables, x)

  n_data = {"plain": 2, "references": 3, "paths": 4}[mode]
  fn = jax.vmap(one, in_axes=(0,) + (None,) * n_data) if stacked else one
  return jax.jit(fn, out_shardings=sharding.replicated(mesh))


# ---------------------------------------------------------------------------------------------
# Ensembles.


@dataclasses.dataclass(frozen=True)
class EnsembleMaps:
  """Relevance of an ensemble, cube space, float32.

  Attributes:
    members: sub-ensemble name -> `[M, n, X, Y, Z, C_sub]` (each member's own map).
    subs: sub-ensemble name -> `[n, X, Y, Z, C_sub]` (level-1 head-weighted sum of its members).
    ensemble: `[n, X, Y, Z, len(sequences)]` (members weighted by their effective weights).
    sequences: the ensemble map's channels (every sub-ensemble's sequences, first seen first).
    sub_sequences: sub-ensemble name -> its channels.
    member_predictions: sub-ensemble name -> `[M, n]` predicted ages (years).
  """

  members: dict[str, np.ndarray]
  subs: dict[str, np.ndarray]
  ensemble: np.ndarray
  sequences: tuple[str, ...]
  sub_sequences: dict[str, tuple[str, ...]]
  member_predictions: dict[str, np.ndarray]


def ensemble_sequences(ensemble) -> tuple[str, ...]:
  """Every sub-ensemble's sequences, in first-seen order (the ensemble map's channels)."""
  out: list[str] = []
  for sub in ensemble.subs:
    out += [s for s in sub.sequences if s not in out]
  return tuple(out)


def _sub_inputs(ensemble, inputs) -> dict[str, np.ndarray]:
  names = [sub.name for sub in ensemble.subs]
  if isinstance(inputs, Mapping):
    missing = [n for n in names if n not in inputs]
    if missing:
      raise DataError(f"no input volumes for sub-ensemble {missing[0]!r}")
    return {n: np.asarray(inputs[n]) for n in names}
  inputs = np.asarray(inputs)
  for sub in ensemble.subs:
    if tuple(sub.sequences) != tuple(ensemble.subs[0].sequences):
      raise DataError("the sub-ensembles read different sequences: give the inputs as "
                      "{sub-ensemble name: volumes}")
  return {n: inputs for n in names}


def _member_groups(sub, method, *, batch_size: int, seed: int,
                   members_per_call: int) -> list[tuple[Explainer, int]]:
  """Explainers over groups of a sub-ensemble's members: [(explainer, members it holds)]. Every
  group has the same size (the last is padded by repeating its final member), so all share one
  compiled function."""
  m = int(sub.members)
  g = m if members_per_call <= 0 else min(m, int(members_per_call))
  out = []
  for start in range(0, m, g):
    take = np.minimum(np.arange(start, start + g), m - 1)
    variables = jax.tree.map(lambda a, t=take: np.asarray(a)[t], sub.variables)
    out.append((Explainer(sub.model, variables, method, batch_size=batch_size, seed=seed,
                          stacked=True), min(g, m - start)))
  return out


def ensemble_maps(ensemble, inputs, method: Method | str = DEFAULT_METHOD, *,
                  batch_size: int = 8, seed: int = 0, rows: np.ndarray | None = None,
                  members_per_call: int = 0,
                  explainers: dict[str, list] | None = None,
                  references: Mapping[str, np.ndarray] | None = None,
                  fractions: np.ndarray | None = None) -> EnsembleMaps:
  """Relevance of every member, sub-ensemble and the ensemble.

  Args:
    ensemble: an `ensemble.model.Ensemble` (`artifact.load`; a single model is an ensemble of
      one).
    inputs: {sub-ensemble name: volumes `[n, X, Y, Z, C_sub]`}, or one array for all when
      every sub-ensemble reads the same sequences.
    method, batch_size, seed, rows: as for `Explainer`.
    members_per_call: members explained by one jitted call (0 = all of a sub-ensemble); fewer
      bound device memory at study-sized volumes (M x batch maps and activations per call).
    explainers: reuse explainers across calls ({sub name: [(Explainer, members)]}, filled in).
    references: {sub-ensemble name: `[n, k, X, Y, Z, C_sub]`} reference inputs per volume, for a
      method with `Method.references` (`Explainer`).
    fractions: `[n, k]` with `references`: how far along each path starts (the same for every
      sub-ensemble: one path in the joint input space; `Explainer`).
  """
  inputs = _sub_inputs(ensemble, inputs)
  weights_total = ensemble.head.member_weights()
  sequences = ensemble_sequences(ensemble)
  explainers = {} if explainers is None else explainers
  members, subs, preds, sub_seq = {}, {}, {}, {}
  total = None
  for sub in ensemble.subs:
    if sub.name not in explainers:
      explainers[sub.name] = _member_groups(sub, method, batch_size=batch_size, seed=seed,
                                            members_per_call=members_per_call)
    refs = None if references is None else references[sub.name]
    parts = [(e(inputs[sub.name], rows, refs, fractions), k) for e, k in explainers[sub.name]]
    r = np.concatenate([rp[0][:k] for rp, k in parts])  # [M, n, ...]
    p = np.concatenate([rp[1][:k] for rp, k in parts])  # [M, n]
    level1 = np.asarray(ensemble.head.level1[sub.name].weights, np.float64)
    w = np.asarray(weights_total[sub.name], np.float64)
    if r.shape[0] != len(w) or len(level1) != len(w):
      raise ConfigError(f"sub-ensemble {sub.name}: {r.shape[0]} members, but the head weighs "
                        f"{len(w)}")
    members[sub.name], preds[sub.name] = r, p
    subs[sub.name] = np.tensordot(level1, r, axes=1).astype(np.float32)
    contribution = np.tensordot(w, r, axes=1)  # [n, X, Y, Z, C_sub]
    if total is None:
      total = np.zeros(contribution.shape[:-1] + (len(sequences),), np.float64)
    sub_seq[sub.name] = tuple(sub.sequences)
    for c, s in enumerate(sub.sequences):
      total[..., sequences.index(s)] += contribution[..., c]
  return EnsembleMaps(members=members, subs=subs, ensemble=total.astype(np.float32),
                      sequences=sequences, sub_sequences=sub_seq, member_predictions=preds)


# ---------------------------------------------------------------------------------------------
# The one-call entry point.


def relevance(ensemble, volumes, method: Method | str = DEFAULT_METHOD, *,
              batch_size: int = 8, seed: int = 0) -> np.ndarray:
  """Cube-space relevance of a trained model, batched and jitted (`ensemble_maps(...).ensemble`).

  Args:
    ensemble: the trained model (`artifact.load`: an `Ensemble`, of one for a single model).
    volumes: `[n, X, Y, Z, C]` cubes (uint8/float16 as cached, or float32 network inputs); for
      an ensemble whose sub-ensembles read different sequences, {sub name: volumes}.
    method: a name of `METHODS` (default `DEFAULT_METHOD`) or a `Method`.
    batch_size: volumes per jitted call; seed: seed of the random methods.
  Returns:
    float32 `[n, X, Y, Z, C]` (`C` = `ensemble_sequences`), positive = older.
  """
  return ensemble_maps(ensemble, volumes, method, batch_size=batch_size, seed=seed).ensemble


# ---------------------------------------------------------------------------------------------
# Back to the subject.


# The NIfTI header of every relevance map (`relevance_image`): a viewer shows what the map is.
RELEVANCE_INTENT = ("estimate", "years/voxel")


def relevance_description(method: str | None) -> str:
  """The header `descrip` of a relevance map of `method` (<= 80 characters)."""
  return f"LRP relevance, {method or 'relevance'}, positive = older, years per voxel"


def relevance_image(data: np.ndarray, affine: np.ndarray,
                    method: str | None = None) -> nib.Nifti1Image:
  """A float32 NIfTI relevance map `[X, Y, Z(, k)]` (years of predicted age per voxel) with
  units mm, intent "estimate" (name "years/voxel") and `relevance_description(method)`."""
  return nifti.make_image(np.asarray(data, np.float32), affine,
                          description=relevance_description(method), intent=RELEVANCE_INTENT)


def to_subject_space(relevance_cube: np.ndarray, cube_inverse, *,
                     preserve_sum: bool = True, method: str | None = None) -> nib.Nifti1Image:
  """A cube-space map `[X, Y, Z]` (or `[X, Y, Z, k]`) on the subject's own grid and affine.

  The exact inverse of the preprocessing's crop/pad and reorientation (`prune.to_subject_space`):
  without resampling every cube voxel lands on the voxel it came from, with its value, and voxels
  outside the cube are 0. If the cube was resampled from the subject's grid (`--voxel-size`),
  the map is interpolated (linear) and, with `preserve_sum`, scaled by the ratio of the voxel
  volumes so that relevance summed over a region keeps its meaning (years).

  Returns:
    float32 `Nifti1Image` `[*original_shape(, k)]` with the original affine, its header naming
    `method` (`relevance_image`).
  """
  img = prune.to_subject_space(np.asarray(relevance_cube, np.float32), cube_inverse, order=1)
  data = np.asarray(img.dataobj, np.float32)
  if cube_inverse.resampled and preserve_sum:
    cube_voxel = abs(np.linalg.det(np.asarray(cube_inverse.grid_affine)[:3, :3]))
    own_voxel = abs(np.linalg.det(np.asarray(cube_inverse.original_affine)[:3, :3]))
    data = data * np.float32(own_voxel / cube_voxel)
  return relevance_image(data, np.asarray(cube_inverse.original_affine, np.float64), method)
