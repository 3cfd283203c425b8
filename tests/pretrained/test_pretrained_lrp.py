"""LRP on an imported SFCN against zennit on the PyTorch original (same weights file): the
imported workdir's model (`artifact.load`, its LAS input orientation included) explained by
`lrp` with EpsilonPlus and BatchNorm folding, zennit's EpsilonPlus with BatchNorm merged on the
torch module, both started from the log-probability of one age bin."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from jax_brainage.models import orientation
from jax_brainage.pretrained import workdir as pretrained
from jax_brainage.train import artifact

HERE = Path(__file__).resolve().parent
lrp = pytest.importorskip("lrp")


def _load(name: str, path: Path):
  if name not in sys.modules:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
  return sys.modules[name]


def test_lrp_on_imported_sfcn_matches_zennit(tmp_path):
  torch = pytest.importorskip("torch", reason="torch is not installed")
  nets = _load("_pretrained_source_nets", HERE / "source_nets.py")
  torch_nets = _load("_lrp_zennit_torch_nets", HERE.parent / "lrp" / "torch_nets.py")
  try:
    zennit = torch_nets.import_zennit()
  except ImportError as error:
    pytest.skip(f"zennit cannot be imported ({error})")
  net = nets.torch_sfcn(seed=5, bins=10, channels=(4, 6, 8, 8, 8, 4))
  path = tmp_path / "sfcn.p"
  torch.save(torch.nn.DataParallel(net).state_dict(), path)
  w = tmp_path / "W"
  pretrained.import_model("sfcn-torch", path, w, image_shape=(32, 32, 32))
  sub = artifact.load(w).subs[0]
  x = np.random.default_rng(0).random((2, 32, 32, 32, 1)).astype(np.float32)
  seed = np.zeros((2, 10), np.float32)
  seed[:, 3] = 1.0  # relevance of bin 3's log-probability
  composite = lrp.composites.EpsilonPlus(epsilon=torch_nets.EPSILON,
                                         stabilizer=torch_nets.STABILIZER,
                                         canonizers=[lrp.canonizers.BatchNormFold()])
  ours = np.asarray(lrp.relevance(sub.model.apply, sub.member_variables(0), x,
                                  composite=composite, seed=lambda out: out * seed))
  source = np.moveaxis(np.asarray(orientation.from_ras(jnp.asarray(x), "LAS")), -1, 1)
  inputs = torch.from_numpy(source.copy()).requires_grad_(True)
  with zennit.attribution.Gradient(
      net, torch_nets.zennit_composite("EpsilonPlus", canonize=True)) as attributor:
    _, relevance = attributor(inputs, lambda out: out * torch.from_numpy(seed))
  theirs = np.flip(np.moveaxis(relevance.detach().numpy(), 1, -1), axis=1)  # LAS -> RAS
  for i in range(2):
    scale = np.abs(theirs[i]).max()
    assert scale > 0
    assert np.abs(ours[i] - theirs[i]).max() <= 1e-4 * scale
