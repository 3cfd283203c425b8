"""Losses for brain-age regression and age-bin classification; all ages in years.

Every loss takes the model's predictions and the chronological ages `[batch]` (years) and an
optional per-example weight `[batch]` (>= 0). A weight of 0 removes an example, so a padded
evaluation batch does not count its padding; the reduced loss is the weighted mean
sum(w * loss) / sum(w), and 0 for a batch whose weights are all 0. The `*_per_example`
functions return the unreduced `[batch]` values, for metrics summed over many batches.

Soft labels (SFCN, Peng et al. 2021): a Gaussian of standard deviation `sigma` (years) centred on
the age, evaluated at the bin centres and normalised to sum to 1 over the bins; for ages inside
the range and sigma >= the bin width, the label's mean is the age and its variance sigma^2.
Ages outside the bin range: the Gaussian is still evaluated at the (in-range) centres and
normalised, i.e. the label is the renormalised tail of the Gaussian; computed as a softmax of
the log-density, an age far outside the range gives all mass to the nearest edge bin instead of
0 / 0. Since the expectation over bins cannot leave [first centre, last centre], choose the bin
range to cover the training ages with a margin of ~3 sigma.
(Peng et al.'s `num2vect` integrates the Gaussian over each bin and does not renormalise; with
1-year bins, sigma = 1 year and ages 3 sigma inside the range, the two differ by < 0.02 per bin.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.special import xlogy


def _check(predictions: jnp.ndarray, ages: jnp.ndarray, weights: jnp.ndarray | None) -> None:
  # Shapes must match exactly: a [batch, 1] vs [batch] broadcast would silently give a
  # [batch, batch] loss.
  if predictions.shape != ages.shape or ages.ndim != 1:
    raise ValueError(f"predictions {predictions.shape} and ages {ages.shape} must both be [batch]")
  if weights is not None and weights.shape != ages.shape:
    raise ValueError(f"weights {weights.shape} must be [batch] like ages {ages.shape}")


def weighted_mean(values: jnp.ndarray, weights: jnp.ndarray | None = None) -> jnp.ndarray:
  """sum(w * values) / sum(w) over `[batch]`; plain mean without weights; 0 if sum(w) == 0."""
  values = values.astype(jnp.float32)
  if weights is None:
    return jnp.mean(values)
  weights = weights.astype(jnp.float32)
  total = jnp.sum(weights)
  # Where-guard before dividing, so an all-padding batch gives 0 (and zero gradients), not NaN.
  return jnp.sum(weights * values) / jnp.where(total > 0, total, 1.0)


def squared_error_per_example(predictions: jnp.ndarray, ages: jnp.ndarray) -> jnp.ndarray:
  """(prediction - age)^2 `[batch]` (years^2)."""
  _check(predictions, ages, None)
  return jnp.square(predictions.astype(jnp.float32) - ages.astype(jnp.float32))


def absolute_error_per_example(predictions: jnp.ndarray, ages: jnp.ndarray) -> jnp.ndarray:
  """|prediction - age| `[batch]` (years)."""
  _check(predictions, ages, None)
  return jnp.abs(predictions.astype(jnp.float32) - ages.astype(jnp.float32))


def mse(predictions: jnp.ndarray, ages: jnp.ndarray,
        weights: jnp.ndarray | None = None) -> jnp.ndarray:
  """Mean squared error (years^2). predictions, ages, weights: `[batch]`."""
  _check(predictions, ages, weights)
  return weighted_mean(squared_error_per_example(predictions, ages), weights)


def mae(predictions: jnp.ndarray, ages: jnp.ndarray,
        weights: jnp.ndarray | None = None) -> jnp.ndarray:
  """Mean absolute error (years). predictions, ages, weights: `[batch]`."""
  _check(predictions, ages, weights)
  return weighted_mean(absolute_error_per_example(predictions, ages), weights)


def soft_labels(ages: jnp.ndarray, bin_centers: jnp.ndarray, sigma: float = 1.0) -> jnp.ndarray:
  """Gaussian soft labels over age bins (see the module docstring for out-of-range ages).

  Args:
    ages: `[batch]` years.
    bin_centers: `[num_bins]` years (e.g. `AgeBins.centers`).
    sigma: standard deviation of the Gaussian (years), > 0.
  Returns:
    `[batch, num_bins]` float32, each row non-negative and summing to 1.
  """
  if isinstance(sigma, (int, float)) and not sigma > 0:
    raise ValueError(f"soft labels: sigma must be > 0 years, got {sigma}")
  ages = jnp.asarray(ages, jnp.float32)
  centers = jnp.asarray(bin_centers, jnp.float32)
  if ages.ndim != 1 or centers.ndim != 1:
    raise ValueError(f"soft labels: ages {ages.shape} must be [batch] and bin_centers "
                     f"{centers.shape} [num_bins]")
  log_density = -0.5 * jnp.square((centers[None, :] - ages[:, None]) / sigma)
  return jax.nn.softmax(log_density, axis=-1)


def soft_label_kl_per_example(log_probs: jnp.ndarray, ages: jnp.ndarray,
                              bin_centers: jnp.ndarray, sigma: float = 1.0) -> jnp.ndarray:
  """KL(soft_labels(age) || softmax prediction) per example `[batch]` (nats).

  log_probs: `[batch, num_bins]` log-probabilities (SFCN output); ages `[batch]` (years).
  """
  if log_probs.ndim != 2 or log_probs.shape[0] != ages.shape[0] or ages.ndim != 1:
    raise ValueError(f"log_probs {log_probs.shape} must be [batch, num_bins] for ages "
                     f"{ages.shape} [batch]")
  if log_probs.shape[1] != jnp.shape(bin_centers)[0]:
    raise ValueError(f"log_probs has {log_probs.shape[1]} bins but bin_centers has "
                     f"{jnp.shape(bin_centers)[0]}")
  target = jax.lax.stop_gradient(soft_labels(ages, bin_centers, sigma))
  # xlogy(0, 0) = 0: bins whose label underflowed to 0 contribute nothing (no 1e-16 fudge).
  return jnp.sum(xlogy(target, target) - target * log_probs.astype(jnp.float32), axis=-1)


def soft_label_kl(log_probs: jnp.ndarray, ages: jnp.ndarray, bin_centers: jnp.ndarray,
                  sigma: float = 1.0, weights: jnp.ndarray | None = None) -> jnp.ndarray:
  """Mean KL divergence to Gaussian soft labels (Peng et al.'s loss: sum over bins, mean over
  the batch). log_probs `[batch, num_bins]`; ages, weights `[batch]`; sigma in years."""
  if weights is not None and weights.shape != ages.shape:
    raise ValueError(f"weights {weights.shape} must be [batch] like ages {ages.shape}")
  return weighted_mean(soft_label_kl_per_example(log_probs, ages, bin_centers, sigma), weights)
