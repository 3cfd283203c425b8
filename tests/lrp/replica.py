"""Independent references for the lrp tests: LRP rules as textbook formulas on dense matrices.

A tiny layer's linear map is written as a matrix M [out, in] (the jacobian of the layer without
its bias, float64); every rule is then the formula of lrp.md in numpy on flat vectors.
"""

from __future__ import annotations

import numpy as np


def stab(z, eps=1e-6):
  return z + eps * np.where(z >= 0, 1.0, -1.0)


def pos(a):
  return np.maximum(a, 0)


def neg(a):
  return np.minimum(a, 0)


def epsilon(M, b, x, R, eps=1e-6):
  return x * (M.T @ (R / stab(M @ x + b, eps)))


def zplus(M, b, x, R, eps=1e-6):
  s = R / stab(pos(M) @ pos(x) + neg(M) @ neg(x) + pos(b), eps)
  return pos(x) * (pos(M).T @ s) + neg(x) * (neg(M).T @ s)


def alpha_beta(M, b, x, R, alpha, beta, eps=1e-6):
  Mp, Mn, xp, xn = pos(M), neg(M), pos(x), neg(x)
  sa = R / stab(Mp @ xp + Mn @ xn + pos(b), eps)
  sb = R / stab(Mn @ xp + Mp @ xn + neg(b), eps)
  return (alpha * (xp * (Mp.T @ sa) + xn * (Mn.T @ sa))
          - beta * (xp * (Mn.T @ sb) + xn * (Mp.T @ sb)))


def gamma(M, b, x, R, g, eps=1e-6):
  Mgp, Mgn = M + g * pos(M), M + g * neg(M)
  bgp, bgn = b + g * pos(b), b + g * neg(b)
  xp, xn = pos(x), neg(x)
  z = M @ x + b
  zp = Mgp @ xp + Mgn @ xn + bgp
  zn = Mgn @ xp + Mgp @ xn + bgn
  sp = (z > 0) * R / stab(zp, eps)
  sn = (z < 0) * R / stab(zn, eps)
  return xp * (Mgp.T @ sp) + xn * (Mgn.T @ sp) + xp * (Mgn.T @ sn) + xn * (Mgp.T @ sn)


def zbox(M, b, x, R, low, high, eps=1e-6):
  l = np.full_like(x, low)
  h = np.full_like(x, high)
  s = R / stab(M @ x - pos(M) @ l - neg(M) @ h, eps)
  return x * (M.T @ s) - l * (pos(M).T @ s) - h * (neg(M).T @ s)


def wsquare(M, b, x, R, eps=1e-6):
  M2 = M ** 2
  return M2.T @ (R / stab(M2 @ np.ones_like(x) + b ** 2, eps))


def flat(M1, x, R, eps=1e-6):
  """M1: the layer's connectivity (the jacobian with every weight set to one)."""
  return M1.T @ (R / stab(M1 @ np.ones_like(x), eps))
