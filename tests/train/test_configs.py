"""Experiment configs: every file in configs/ loads and validates; overrides and their errors."""

from __future__ import annotations

from pathlib import Path

import ml_collections
import numpy as np
import pytest

from jax_brainage.errors import ConfigError
from jax_brainage import models
from jax_brainage.models import get_model, num_parameters
from jax_brainage.train import config as config_lib
from jax_brainage.train import config_checks
from jax_brainage.train import config_loading
from jax_brainage.train import data as data_lib

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.py"))
ARGS = {"mrinet_2mm.py": ["FLAIR", "3seq"], "mrinet_1mm.py": ["3seq-bf16", "swi"],
        "sfcn.py": ["1mm", "regression", "1mm-regression"], "cpu.py": ["study", "t1"],
        "ensemble_tiny.py": ["regions", "3"], "ensemble_wholebrain.py": ["3"],
        "ensemble_regional.py": ["2"]}


def test_there_are_configs_for_every_experiment():
  names = {p.name for p in CONFIGS}
  assert {"tiny.py", "cpu.py", "vit.py", "mrinet_1mm.py", "mrinet_2mm.py", "sfcn.py", "ensemble_tiny.py",
          "ensemble_wholebrain.py", "ensemble_regional.py"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_validates_and_documents_its_command(path):
  text = path.read_text()
  assert f"brainage train --config configs/{path.name}" in text, "docstring states the command"
  assert "Expected" in text, "docstring states the expected result"
  for arg in [None] + ARGS.get(path.name, []):
    config = config_loading.load_config(str(path) + (f":{arg}" if arg else ""))
    assert config.is_locked
    config_checks.validate(config)
    kwargs = config_lib.model_kwargs(config, mean_age=50.0)
    get_model(config.model.name, **kwargs)  # every model field the config sets exists


def test_study_configs_build_the_study_networks():
  """MRInet parameter counts from the study (paper.md): 781,265 at 198^3, 209,873 at 98^3."""
  for name, side, expected in (("mrinet_1mm.py", 198, 781_265), ("mrinet_2mm.py", 98, 209_873)):
    config = config_loading.load_config(str(ROOT / "configs" / name))
    assert tuple(config.data.image_shape) == (side,) * 3
    model = get_model("mrinet", **config_lib.model_kwargs(config, 50.0))
    assert num_parameters(model, (1, side, side, side, 1)) == expected
    assert config.optimizer.name == "adam" and config.optimizer.learning_rate == 5e-4
    assert config.loss == "mse" and config.model.dropout_rate == 0.5


def test_vit_config_is_the_cpu_presets_cohort_with_a_small_vit():
  """configs/vit.py trains on configs/cpu.py's data (same cohort, cache, split, augmentation)
  and builds the ViT it documents: 10^3 patches of 3 channels, 80 tokens, width 96, 4 blocks."""
  vit = config_loading.load_config(str(ROOT / "configs" / "vit.py"))
  cpu = config_loading.load_config(str(ROOT / "configs" / "cpu.py"))
  assert vit.data.to_dict() == cpu.data.to_dict() and vit.augment.to_dict() == \
      cpu.augment.to_dict() and vit.batch_size == cpu.batch_size
  model = get_model(vit.model.name, **config_lib.model_kwargs(vit, 50.0, 10.0))
  assert isinstance(model, models.ViT) and model.flip_average and model.age_scale == 10.0
  w, m, p, c, tokens, hidden, depth = 96, 192, 10, 3, 4 * 5 * 4, 64, 4
  block = 4 * w + 4 * (w * w + w) + (w * m + m) + (m * w + w)
  expected = (p ** 3 * c * w + w) + tokens * w + depth * block + 2 * w + (w * hidden + hidden) \
      + hidden + 1
  assert num_parameters(model, (1, 40, 50, 40, 3)) == expected == 601_377


def test_overrides_set_typed_values():
  config = config_loading.load_config(str(ROOT / "configs" / "tiny.py"))
  config = config_loading.apply_overrides(config, [
      "--config.optimizer.learning_rate", "1e-3", "--config.batch_size=4",
      "--config.data.sequences", "('T1w', 'FLAIR')", "--config.augment.flip_lr", "true",
      "--config.model.name", "sfcn_regression", "--config.optimizer.warmup_steps", "10"])
  assert config.optimizer.learning_rate == 1e-3 and isinstance(config.optimizer.learning_rate,
                                                               float)
  assert config.batch_size == 4 and config.data.sequences == ("T1w", "FLAIR")
  assert config.augment.flip_lr is True and config.model.name == "sfcn_regression"
  # An integer where a float is expected is accepted and stored as float.
  config = config_loading.apply_overrides(config, ["--config.optimizer.learning_rate", "1"])
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
  config = config_loading.load_config(str(ROOT / "configs" / "tiny.py"))
  with pytest.raises(ConfigError, match=match) as info:
    config_loading.apply_overrides(config, overrides)
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
    config_loading.load_config(str(unknown))
  mistyped = tmp_path / "mistyped.py"
  mistyped.write_text("import ml_collections\n"
                      "from jax_brainage.train.config import base_config\n"
                      "def get_config(arg=None):\n"
                      "  c = base_config().to_dict()\n"
                      "  c['num_epochs'] = 'many'\n"
                      "  return ml_collections.ConfigDict(c)\n")
  with pytest.raises(ConfigError, match=r"config key 'num_epochs' must be int, got 'many'"):
    config_loading.load_config(str(mistyped))
  # Setting an unknown key on a locked base config fails at once (ml_collections' own check).
  with pytest.raises(AttributeError):
    config_lib.base_config().optimizer.lr = 1.0
  with pytest.raises(ConfigError, match="config file .*missing.py not found"):
    config_loading.load_config(str(tmp_path / "missing.py"))
  broken = tmp_path / "broken.py"
  broken.write_text("def get_config(arg=None):\n  return 1 / 0\n")
  with pytest.raises(ConfigError, match="broken.py: ZeroDivisionError"):
    config_loading.load_config(str(broken))


def test_fingerprint_ignores_run_length_and_logging_but_not_the_experiment():
  a = config_lib.base_config()
  a.data.cache = "cache"
  b = config_loading.apply_overrides(a, ["--config.num_epochs", "99", "--config.patience", "3",
                                     "--config.log_every_steps", "7", "--config.data.workers",
                                     "2"])
  assert config_lib.fingerprint_difference(config_lib.fingerprint(a),
                                           config_lib.fingerprint(b)) is None
  c = config_loading.apply_overrides(a, ["--config.model.dense_features", "32"])
  assert config_lib.fingerprint_difference(config_lib.fingerprint(a), config_lib.fingerprint(c)) \
      == "config.model.dense_features is 64 there, 32 here"
  assert isinstance(a, ml_collections.ConfigDict)


# ---------------------------------------------------------------------------------------------
# Paths the user names; a seeded fuzz over config values.

TINY = str(ROOT / "configs" / "tiny.py")


def test_a_cache_named_on_the_command_line_must_exist_unless_simulating(tmp_path):
  """`--config.data.cache /nonexistent` with the tiny preset used to simulate 100 subjects there
  and train on them (exit 0); the preset's own cache path is still prepared on first use."""
  config = config_loading.load_config(TINY)
  missing = str(tmp_path / "nonexistent")
  with pytest.raises(ConfigError, match=rf"config.data.cache='{missing}': no prepared cache "
                                        r"there") as info:
    config_loading.apply_overrides(config, ["--config.data.cache", missing])
  assert "\n" not in str(info.value)
  # Asking to simulate into it, restating the preset's path, or naming a prepared cache is fine.
  for overrides in (["--config.data.cache", missing, "--config.data.simulate.n", "20"],
                    [f"--config.data.cache={missing}", "--config.data.simulate.out",
                     str(tmp_path / "sim")],
                    ["--config.data.cache", config.data.cache], []):
    assert config_loading.apply_overrides(config, overrides).data.cache in (missing,
                                                                        config.data.cache)
  prepared = tmp_path / "cache"
  prepared.mkdir()
  (prepared / "index.json").write_text("{}")
  assert config_loading.apply_overrides(config, ["--config.data.cache", str(prepared)]) \
      .data.cache == str(prepared)
  # A workdir to start from must be there.
  with pytest.raises(ConfigError, match=rf"config.init_from='{missing}': no such workdir"):
    config_loading.apply_overrides(config, ["--config.init_from", missing])
  assert config_loading.apply_overrides(config, ["--config.init_from", str(tmp_path)]).init_from \
      == str(tmp_path)
  # Without simulation a missing cache is a ConfigError naming the key (before any training).
  plain = config_loading.apply_overrides(config_lib.base_config(), [
      "--config.data.cache", missing])
  with pytest.raises(ConfigError, match=rf"config.data.cache='{missing}': no such directory"):
    data_lib.open_training_data(plain)


FUZZ_VALUES = {
    "wrong type": ["'abc'", "abc", "True", "None", "[1, 2]", "{'a': 1}", "(1, 'x')", "b'x'",
                   "1j", "((1,),)", "(True, False)", "set()", "...", "lambda: 0"],
    "negative": ["-1", "-0.5", "-99999999999", "(-1, -2, -3)", "-1e-300"],
    "not finite": ["nan", "inf", "-inf", "1e999", "-1e999", "(nan,)", "(1e999, 2)",
                   "float('nan')"],
    "huge": ["1" + "0" * 30, "1e308", "9" * 5000, "2147483648", "(4096, 4096, 4096)",
             "(1e308, 1e308)"],
    "empty": ["", " ", "()", "(,)", "''", "('',)", "('', '')"],
    "garbage": ["(((", "[" * 300 + "]" * 300, "a\nb", "\x00", "/dev/null\x00x", "0x", "1_0",
                "--config.seed", "=", "(0, 0, 32)"],
}


def _leaves(config, prefix=""):
  for key in config.keys():
    value = config[key]
    if isinstance(value, ml_collections.ConfigDict):
      yield from _leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def _fuzz_cases(seed: int = 0, n: int = 400):
  """(category, overrides) pairs: a known key with a bad value, or an unknown key."""
  rng = np.random.default_rng(seed)
  keys = [k for k, _ in _leaves(config_lib.base_config())]
  cases = []
  for _ in range(n):
    category = list(FUZZ_VALUES)[rng.integers(len(FUZZ_VALUES))]
    value = FUZZ_VALUES[category][rng.integers(len(FUZZ_VALUES[category]))]
    key = keys[rng.integers(len(keys))]
    if rng.random() < 0.15:  # an unknown key: a typo, a made-up leaf, a group, a blank part
      category = "unknown key"
      parts = key.split(".")
      key = rng.choice([key + "x", key[:-1], f"{key}.sub", ".".join(parts[:-1]) or "data",
                        key.upper(), key.replace(".", ".."), "", f"model.{parts[-1]}_"])
    form = rng.integers(2)
    overrides = ([f"--config.{key}", value] if form == 0 else [f"--config.{key}={value}"])
    cases.append((category, key, overrides))
  return cases


def _check_sane(config):
  """What an accepted config promises: it validates, every float is finite, ints bounded."""
  config_checks.validate(config)
  for key, value in _leaves(config):
    for v in (value if isinstance(value, tuple) else (value,)):
      if isinstance(v, float):
        assert np.isfinite(v), key
      if isinstance(v, int) and not isinstance(v, bool):
        assert abs(v) <= config_checks.MAX_INT, key


def test_config_value_fuzz_gives_one_line_config_errors():
  """A seeded fuzz over `--config.KEY VALUE` overrides of the tiny preset: wrong types,
  negative numbers, NaN/inf, huge values, empty strings, garbage and unknown keys. Every case is
  a one-line ConfigError or a config whose values can work; never another exception."""
  base = config_loading.load_config(TINY)
  outcomes = {"refused": 0, "accepted": 0}
  for category, key, overrides in _fuzz_cases():
    try:
      config = config_loading.apply_overrides(base, overrides)
    except ConfigError as e:
      assert "\n" not in str(e) and str(e), (overrides, str(e))
      outcomes["refused"] += 1
      continue
    # Unknown keys and values that are no number at all are never accepted.
    assert category != "unknown key", overrides
    assert category != "not finite" or not isinstance(
        dict(_leaves(base)).get(key), (int, float, tuple)), overrides
    _check_sane(config)
    outcomes["accepted"] += 1
  assert outcomes["refused"] > 300 and outcomes["accepted"] > 0, outcomes


# Config files that set a bad value themselves (past the command line's literal parsing: NaN,
# infinities, wrong element types).
FILE_MUTATIONS = [
    ("optimizer.momentum", "float('nan')"), ("optimizer.grad_clip_norm", "float('inf')"),
    ("soft_label_sigma", "float('inf')"), ("model.bin_width", "-float('inf')"),
    ("data.bias_sigma_mm", "float('nan')"), ("model.age_range", "(float('nan'), 80.0)"),
    ("model.age_range", "(15.0,)"), ("model.age_range", "('a', 'b')"),
    ("data.image_shape", "('a', 'b', 'c')"), ("data.image_shape", "(1.5, 2, 3)"),
    ("data.image_shape", "(10**9, 10, 10)"), ("model.conv_features", "('4',)"),
    ("model.conv_features", "(4.5, 8)"), ("data.sequences", "(1, 2)"),
    ("data.sequences", "('T1w', '')"), ("seed", "-1"), ("data.split_seed", "-3"),
    ("batch_size", "2**40"), ("data.simulate.n", "-5"), ("data.cache", "'a\\x00b'"),
    ("ensemble.sub_ensembles", "(1, 2)"), ("augment.noise_std", "float('nan')"),
    ("num_epochs", "'many'"), ("model", "1"),
]


def test_config_files_with_bad_values_give_one_line_config_errors(tmp_path):
  path = tmp_path / "mutated.py"
  lines = ["from jax_brainage.train.config import base_config", "import ml_collections",
           "MUTATIONS = [" + ", ".join(f"({k!r}, lambda: {v})" for k, v in FILE_MUTATIONS) + "]",
           "def get_config(arg=None):",
           "  c = base_config().to_dict()",
           "  c['data']['cache'] = 'cache'",
           "  key, value = MUTATIONS[int(arg)]",
           "  *parents, leaf = key.split('.')",
           "  node = c",
           "  for p in parents:",
           "    node = node[p]",
           "  node[leaf] = value()",
           "  return ml_collections.ConfigDict(c)"]
  path.write_text("\n".join(lines) + "\n")
  for i, (key, value) in enumerate(FILE_MUTATIONS):
    with pytest.raises(ConfigError) as info:
      config_loading.load_config(f"{path}:{i}")
    assert "\n" not in str(info.value), (key, value)
    assert key.split(".")[0] in str(info.value), (key, value, str(info.value))
