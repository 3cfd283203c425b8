"""Voxel-axis orientation of a model's input: the cube is RAS+, a pretrained model may want
another array orientation (FreeSurfer's LIA for the study's MRInets, FSL's MNI LAS for SFCN).

A model with `input_orientation` other than "RAS" permutes and flips its `[batch, x, y, z,
channel]` input from RAS+ into that orientation first: a permutation of voxels (no
interpolation), so predictions equal the source framework's on the source's array, and LRP
relevance flows back through it onto the RAS+ cube unchanged.
"""

from __future__ import annotations

import jax.numpy as jnp

from jax_brainage.errors import ConfigError

_AXIS = {"R": 0, "L": 0, "A": 1, "P": 1, "S": 2, "I": 2}


def check(codes: str, who: str) -> None:
  """ConfigError unless `codes` are three axis codes, one per world axis (e.g. "LIA")."""
  codes = str(codes).upper()
  if len(codes) != 3 or any(c not in _AXIS for c in codes) or (
      sorted(_AXIS[c] for c in codes) != [0, 1, 2]):
    raise ConfigError(f"{who}: input_orientation must be three axis codes such as RAS, LIA or "
                      f"LAS (one of R/L, A/P, S/I each), got {codes!r}")


def from_ras(x: jnp.ndarray, codes: str) -> jnp.ndarray:
  """`[batch, x, y, z, channel]` in RAS+ -> the same voxels in orientation `codes`.

  Output axis j is RAS axis `_AXIS[codes[j]]`, reversed where the code is L, P or I.
  """
  codes = str(codes).upper()
  if codes == "RAS":
    return x
  x = jnp.transpose(x, (0, *(_AXIS[c] + 1 for c in codes), 4))
  flips = tuple(j + 1 for j, c in enumerate(codes) if c in "LPI")
  return jnp.flip(x, flips) if flips else x


def ras_shape(shape: tuple[int, int, int], codes: str) -> tuple[int, int, int]:
  """The RAS+ cube shape whose voxels fill an array of `shape` in orientation `codes`."""
  codes = str(codes).upper()
  out = [0, 0, 0]
  for j, c in enumerate(codes):
    out[_AXIS[c]] = int(shape[j])
  return tuple(out)
