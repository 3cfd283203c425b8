"""Fine-tuning (`config.init_from` + `config.finetune`): what is loaded, frozen, slowed, renewed."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jax_brainage import models
from jax_brainage.errors import ConfigError
from jax_brainage.train import artifact, finetune, trainer
from jax_brainage.train import data as data_lib

from tests.train.conftest import blob_cohort, tiny_config


@pytest.fixture(scope="module")
def source(tmp_path_factory, blob_data):
  """A tiny MRInet trained for 2 epochs: the pretrained model."""
  workdir = tmp_path_factory.mktemp("source")
  trainer.train_and_evaluate(tiny_config(), workdir, data=blob_data, quiet=True)
  return workdir, artifact.load(workdir).subs[0].variables


def _flat(tree):
  return {models.path_name(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_optimizer_scales_freezes_and_keeps_fresh_layers_at_full_rate():
  # SGD without momentum: the update is -lr * scale * grad, analytically.
  config = tiny_config(**{"optimizer.name": "sgd", "optimizer.momentum": 0.0,
                          "finetune.freeze": ("conv0",), "finetune.reinit": ("dense1",),
                          "finetune.pretrained_lr_scale": 0.25})
  params = {"conv0": {"kernel": jnp.ones((2, 2))}, "conv1": {"kernel": jnp.ones(3)},
            "dense1": {"bias": jnp.ones(2)}, "age_head": {"kernel": jnp.ones(1)}}
  grads = jax.tree.map(lambda x: 2.0 * jnp.ones_like(x), params)
  tx = finetune.finetune_optimizer(config, optax.sgd(0.1, momentum=None))
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["conv0"]["kernel"], 0.0)
  np.testing.assert_allclose(updates["conv1"]["kernel"], -0.1 * 0.25 * 2.0)
  np.testing.assert_allclose(updates["dense1"]["bias"], -0.1 * 2.0)
  np.testing.assert_allclose(updates["age_head"]["kernel"], -0.1 * 2.0)


def test_layer_patterns_match_whole_layer_names():
  assert finetune.matches("conv1/kernel", ("conv[0-2]",))
  assert not finetune.matches("conv10/kernel", ("conv1",))
  assert finetune.matches("bn3/scale", ("bn*",))
  assert finetune.matches("dense1/kernel", ("dense1/kernel",))


def test_pretrained_layers_start_from_the_source_and_only_the_head_moves(source, blob_data,
                                                                         tmp_path):
  workdir, src = source
  config = tiny_config(init_from=str(workdir), **{"finetune.pretrained_lr_scale": 0.0,
                                                   "optimizer.learning_rate": 5e-3})
  result = trainer.train_and_evaluate(config, tmp_path, data=blob_data, quiet=True)
  assert result["step"] == 8  # a fresh step counter: 2 epochs of 4 steps, not a resumption
  tuned = _flat(artifact.load(tmp_path, "latest").subs[0].variables)
  before = _flat(src)
  assert tuned.keys() == before.keys()
  for name, value in before.items():
    if name.startswith("params/age_head"):
      assert not np.allclose(tuned[name], value), name  # the output layer trains
    else:
      np.testing.assert_array_equal(tuned[name], value, err_msg=name)


def test_an_ensemble_starts_every_member_from_one_source_model(source, blob_data, tmp_path):
  workdir, src = source
  config = tiny_config(init_from=str(workdir), num_epochs=1,
                       **{"ensemble.members": 2, "finetune.freeze": ("conv*", "dense1")})
  trainer.train_and_evaluate(config, tmp_path, data=blob_data, quiet=True)
  _, variables, _ = artifact.load_members(tmp_path, "latest")
  tuned, before = _flat(variables), _flat(src)
  for name, value in before.items():
    if not name.startswith("params/age_head"):
      for m in range(2):
        np.testing.assert_array_equal(tuned[name][m], value[0], err_msg=f"{name} member {m}")


@pytest.mark.slow
def test_sfcn_with_other_bins_renews_its_bin_head_and_frozen_batchnorm_stays(tmp_path):
  images, ages = blob_cohort(n=24, side=32, seed=1)
  data = data_lib.from_arrays(images, ages, ("T1w",), split_seed=0)
  sfcn = {"model.name": "sfcn", "loss": "soft_label", "model.conv_features": (2, 2, 2, 2, 2, 4),
          "num_epochs": 1, "model.dropout_rate": 0.0}
  trainer.train_and_evaluate(tiny_config(**sfcn, **{"model.age_range": (20.0, 80.0)}),
                             tmp_path / "a", data=data, quiet=True)
  src = _flat(artifact.load(tmp_path / "a", "latest").subs[0].variables)
  config = tiny_config(**sfcn, init_from=str(tmp_path / "a"),
                       **{"model.age_range": (20.0, 90.0), "finetune.freeze": ("conv1", "bn1")})
  trainer.train_and_evaluate(config, tmp_path / "b", data=data, quiet=True)
  tuned = _flat(artifact.load(tmp_path / "b", "latest").subs[0].variables)
  assert src["params/bin_head/kernel"].shape[-1] == 60
  assert tuned["params/bin_head/kernel"].shape[-1] == 70  # 1-year bins over 20-90 years
  for name in ("params/conv1/kernel", "params/bn1/scale", "batch_stats/bn1/mean",
               "batch_stats/bn1/var"):
    np.testing.assert_array_equal(tuned[name], src[name], err_msg=name)
  assert not np.allclose(tuned["params/conv2/kernel"], src["params/conv2/kernel"])
  assert not np.allclose(tuned["batch_stats/bn2/mean"], src["batch_stats/bn2/mean"])


@pytest.mark.parametrize("overrides,match", [
    ({"model.dense_features": 32},
     r"params/dense1/bias has shape \(16,\) there, \(32,\) here .*finetune.reinit"),
    ({"finetune.freeze": ("conv9",)}, r"finetune.freeze: 'conv9' matches no layer of mrinet "
                                       r"\(layers: age_head, conv1"),
    ({"finetune.freeze": ("age_head",)}, r"age_head/.* would be frozen at a fresh"),
    ({"ensemble.members": 3}, None),
])
def test_what_does_not_fit_is_one_line_naming_the_layer(source, blob_data, tmp_path, overrides,
                                                        match):
  workdir, _ = source
  config = tiny_config(init_from=str(workdir), **overrides)
  if match is None:  # one source model starts any number of members
    trainer.train_and_evaluate(config, tmp_path, data=blob_data, quiet=True, max_steps=1)
    return
  with pytest.raises(ConfigError, match=match) as info:
    trainer.train_and_evaluate(config, tmp_path, data=blob_data, quiet=True)
  assert "\n" not in str(info.value)


def test_a_multi_member_source_into_a_single_model_is_refused(source, blob_data, tmp_path):
  workdir, _ = source
  two = tmp_path / "two"
  trainer.train_and_evaluate(tiny_config(num_epochs=1, **{"ensemble.members": 2}), two,
                             data=blob_data, quiet=True)
  with pytest.raises(ConfigError, match=r"holds 2 members; a single model starts from one"):
    trainer.train_and_evaluate(tiny_config(init_from=str(two)), tmp_path / "one",
                               data=blob_data, quiet=True)
