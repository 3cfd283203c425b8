"""Experiment configs: every file in configs/ loads and validates; overrides and their errors."""

from __future__ import annotations

from pathlib import Path

import ml_collections
import pytest

from jax_brainage.errors import ConfigError
from jax_brainage.models import get_model, num_parameters
from jax_brainage.train import config as config_lib

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.py"))
ARGS = {"mrinet_2mm.py": ["FLAIR", "3seq"], "mrinet_1mm.py": ["3seq-bf16", "swi"],
        "sfcn.py": ["1mm", "regression", "1mm-regression"], "cpu.py": ["study", "t1"],
        "ensemble_tiny.py": ["regions", "3"], "ensemble_wholebrain.py": ["3"],
        "ensemble_regional.py": ["2"]}


def test_there_are_configs_for_every_experiment():
  names = {p.name for p in CONFIGS}
  assert {"tiny.py", "cpu.py", "mrinet_1mm.py", "mrinet_2mm.py", "sfcn.py", "ensemble_tiny.py",
          "ensemble_wholebrain.py", "ensemble_regional.py"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_validates_and_documents_its_command(path):
  text = path.read_text()
  assert f"brainage train --config configs/{path.name}" in text, "docstring states the command"
  assert "Expected" in text, "docstring states the expected result"
  for arg in [None] + ARGS.get(path.name, []):
    config = config_lib.load_config(str(path) + (f":{arg}" if arg else ""))
    assert config.is_locked
    config_lib.validate(config)
    kwargs = config_lib.model_kwargs(config, mean_age=50.0)
    get_model(config.model.name, **kwargs)  # every model field the config sets exists


def test_study_configs_build_the_study_networks():
  """MRInet parameter counts from the study (paper.md): 781,265 at 198^3, 209,873 at 98^3."""
  for name, side, expected in (("mrinet_1mm.py", 198, 781_265), ("mrinet_2mm.py", 98, 209_873)):
    config = config_lib.load_config(str(ROOT / "configs" / name))
    assert tuple(config.data.image_shape) == (side,) * 3
    model = get_model("mrinet", **config_lib.model_kwargs(config, 50.0))
    assert num_parameters(model, (1, side, side, side, 1)) == expected
    assert config.optimizer.name == "adam" and config.optimizer.learning_rate == 5e-4
    assert config.loss == "mse" and config.model.dropout_rate == 0.5


def test_overrides_set_typed_values():
  config = config_lib.load_config(str(ROOT / "configs" / "tiny.py"))
  config = config_lib.apply_overrides(config, [
      "--config.optimizer.learning_rate", "1e-3", "--config.batch_size=4",
      "--config.data.sequences", "('T1w', 'FLAIR')", "--config.augment.flip_lr", "true",
      "--config.model.name", "sfcn_regression", "--config.optimizer.warmup_steps", "10"])
  assert config.optimizer.learning_rate == 1e-3 and isinstance(config.optimizer.learning_rate,
                                                               float)
  assert config.batch_size == 4 and config.data.sequences == ("T1w", "FLAIR")
  assert config.augment.flip_lr is True and config.model.name == "sfcn_regression"
  # An integer where a float is expected is accepted and stored as float.
  config = config_lib.apply_overrides(config, ["--config.optimizer.learning_rate", "1"])
  assert config.optimizer.learning_rate == 1.0 and isinstance(config.optimizer.learning_rate,
                                                              float)


@pytest.mark.parametrize("overrides,match", [
    (["--config.optimizer.learnig_rate", "1e-3"], r"unknown config key 'optimizer.learnig_rate'"),
    (["--config.optimiser.learning_rate", "1e-3"], r"unknown config key 'optimiser'"),
    (["--config.batch_size", "eight"], r"config key 'batch_size' must be int, got 'eight'"),
    (["--config.batch_size", "2.5"], r"config key 'batch_size' must be int"),
    (["--config.augment.flip_lr", "maybe"], r"config key 'augment.flip_lr' must be bool"),
    (["--config.batch_size"], r"override --config.batch_size has no value"),
    (["--lr", "1"], r"unrecognised argument '--lr'"),
    (["--config.loss", "huber"], r"config.loss='huber': unknown loss"),
    (["--config.loss", "soft_label"], r"soft_label goes with model.name='sfcn'"),
    (["--config.optimizer.learning_rate", "-1"], r"optimizer.learning_rate=-1.0: must be > 0"),
    (["--config.model.name", "resnet"], r"model.name='resnet': unknown model"),
    (["--config.augment.rotate_degrees", "90"], r"augment.rotate_degrees must lie in"),
    (["--config.data.scaling", "robust"], r"data.scaling='robust': must be one of"),
    (["--config.model.conv_lowering", "fft"], r"model.conv_lowering='fft': must be one of"),
    (["--config.model.patch_stem", "1"], r"model.patch_stem=1: must be 0, or a patch side > 1"),
    (["--config.model.name", "sfcn", "--config.loss", "soft_label", "--config.model.patch_stem",
      "2"], r"model.patch_stem=2: .* for model.name='mrinet'"),
    (["--config.model.name", "sfcn_regression", "--config.model.flip_average", "true"],
     r"model.flip_average=True: is an MRInet option"),
])
def test_bad_overrides_give_one_line_errors(overrides, match):
  config = config_lib.load_config(str(ROOT / "configs" / "tiny.py"))
  with pytest.raises(ConfigError, match=match) as info:
    config_lib.apply_overrides(config, overrides)
  assert "\n" not in str(info.value)


def test_config_file_with_unknown_or_mistyped_key_is_refused(tmp_path):
  unknown = tmp_path / "unknown.py"
  unknown.write_text("from jax_brainage.train.config import base_config\n"
                     "def get_config(arg=None):\n"
                     "  c = base_config()\n"
                     "  with c.unlocked():\n"
                     "    c.optimizer.lr = 1e-3\n"
                     "  return c\n")
  with pytest.raises(ConfigError, match=r"unknown.py: unknown config key 'optimizer.lr'"):
    config_lib.load_config(str(unknown))
  mistyped = tmp_path / "mistyped.py"
  mistyped.write_text("import ml_collections\n"
                      "from jax_brainage.train.config import base_config\n"
                      "def get_config(arg=None):\n"
                      "  c = base_config().to_dict()\n"
                      "  c['num_epochs'] = 'many'\n"
                      "  return ml_collections.ConfigDict(c)\n")
  with pytest.raises(ConfigError, match=r"config key 'num_epochs' must be int, got 'many'"):
    config_lib.load_config(str(mistyped))
  # Setting an unknown key on a locked base config fails at once (ml_collections' own check).
  with pytest.raises(AttributeError):
    config_lib.base_config().optimizer.lr = 1.0
  with pytest.raises(ConfigError, match="config file .*missing.py not found"):
    config_lib.load_config(str(tmp_path / "missing.py"))
  broken = tmp_path / "broken.py"
  broken.write_text("def get_config(arg=None):\n  return 1 / 0\n")
  with pytest.raises(ConfigError, match="broken.py: ZeroDivisionError"):
    config_lib.load_config(str(broken))


def test_fingerprint_ignores_run_length_and_logging_but_not_the_experiment():
  a = config_lib.base_config()
  a.data.cache = "cache"
  b = config_lib.apply_overrides(a, ["--config.num_epochs", "99", "--config.patience", "3",
                                     "--config.log_every_steps", "7", "--config.data.workers",
                                     "2"])
  assert config_lib.fingerprint_difference(config_lib.fingerprint(a),
                                           config_lib.fingerprint(b)) is None
  c = config_lib.apply_overrides(a, ["--config.model.dense_features", "32"])
  assert config_lib.fingerprint_difference(config_lib.fingerprint(a), config_lib.fingerprint(c)) \
      == "config.model.dense_features is 64 there, 32 here"
  assert isinstance(a, ml_collections.ConfigDict)
