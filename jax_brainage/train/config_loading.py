"""Loading experiment configs: `configs/*.py` files (`load_config`, `import_config`) and
command-line overrides (`apply_overrides`, `set_key`). Overrides follow big_vision:

    brainage train --config configs/cpu.py:arg --workdir W --config.optimizer.learning_rate 1e-3

Everything loaded is checked (`train.config_checks`): a config file must have exactly the keys of
`train.config.base_config()`, with their types, and values that can work.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import types
from pathlib import Path
from typing import Any, Sequence

import ml_collections

from jax_brainage.errors import ConfigError
from jax_brainage.train.config import base_config
from jax_brainage.train.config_checks import check_keys, same_type, validate

def import_config(path: str | os.PathLike) -> types.ModuleType:
  """The module of config file `path`, run but not called: for a config that builds on another,
  e.g. `mrinet_2mm = import_config(Path(__file__).with_name("mrinet_2mm.py"))`, then
  `c = mrinet_2mm.get_config("3seq")` in its own `get_config`.

  Raises ConfigError naming the file if it is missing or fails to run.
  """
  file = Path(path)
  if not file.is_file():
    raise ConfigError(f"config file {path} not found")
  module_name = f"_brainage_config_{abs(hash(str(file.resolve())))}"
  module_spec = importlib.util.spec_from_file_location(module_name, file)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except ConfigError:
    raise
  except Exception as e:  # A config is user code: report where it broke, in one line.
    raise ConfigError(f"config file {path}: {type(e).__name__}: {e}") from e
  return module


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads `path/to/file.py[:arg]` by calling its `get_config(arg)`; checks it.

  Raises ConfigError naming the file if it is missing, has no `get_config`, or fails checks.
  """
  path, _, arg = str(spec).partition(":")
  module = import_config(path)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path} defines no get_config(arg=None)")
  try:
    config = module.get_config(arg) if arg else module.get_config()
  except ConfigError:
    raise
  except Exception as e:  # e.g. an argument the config does not know (`file.py:bogus`)
    raise ConfigError(f"config file {path}: {type(e).__name__}: {e}") from e
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"config file {path}: get_config() must return an ml_collections.ConfigDict")
  check_keys(config, base_config(), source=path)
  validate(config)
  return config


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Sequence[str]) -> ml_collections.ConfigDict:
  """Applies `--config.a.b VALUE` / `--config.a.b=VALUE` pairs (values as Python literals).

  Returns a checked copy; an unknown key, a missing value, a wrong type or a value `validate`
  refuses is a one-line ConfigError naming the key. A path the user names must exist
  (`check_named_paths`): an overridden `init_from`, and an overridden `data.cache` without a
  prepared cache there unless the overrides also ask to simulate (`data.simulate.n` or `.out`).
  """
  before = str(config.data.cache)
  config = ml_collections.ConfigDict(config.to_dict(), type_safe=True)
  items = list(overrides)
  named: set[str] = set()
  i = 0
  while i < len(items):
    flag = items[i]
    if not isinstance(flag, str) or not flag.startswith("--config."):
      raise ConfigError(f"unrecognised argument {flag!r} (overrides look like "
                        "--config.optimizer.learning_rate 1e-3)")
    if "=" in flag:
      flag, text = flag.split("=", 1)
      i += 1
    else:
      if i + 1 >= len(items):
        raise ConfigError(f"override {flag} has no value")
      text = items[i + 1]
      i += 2
    key = flag[len("--config."):]
    set_key(config, key, text)
    named.add(key)
  config.lock()
  validate(config)
  check_named_paths(config, named, before)
  return config


def check_named_paths(config: ml_collections.ConfigDict, named: set[str] | Sequence[str],
                      before: str) -> None:
  """Paths the user named on the command line must exist: `init_from` (a workdir), and
  `data.cache` (a prepared cache) unless the same overrides ask to simulate.

  A config that simulates (`data.simulate.n > 0`) prepares its cache on first use; that is for
  the path its file chose. A different path given as an override (`named` holds the overridden
  keys, `before` the file's `data.cache`) is where the user says a cache IS: preparing a
  simulated cohort there (the issue's `--config.data.cache /nonexistent`: 100 synthetic
  subjects trained on without a word) is only right when the same overrides ask to simulate
  (`data.simulate.n` or `data.simulate.out`).

  Raises:
    ConfigError: one line naming the key and the path.
  """
  named = set(named)
  # os.path (not Path) checks: they answer False for a name the OS refuses (too long, ...).
  if "init_from" in named and config.init_from and not os.path.isdir(config.init_from):
    raise ConfigError(f"config.init_from={config.init_from!r}: no such workdir")
  cache = str(config.data.cache)
  if ("data.cache" not in named or cache == before or config.data.simulate.n <= 0
      or named & {"data.simulate.n", "data.simulate.out"}):
    return
  if not os.path.isfile(os.path.join(cache, "index.json")):
    raise ConfigError(f"config.data.cache={cache!r}: no prepared cache there (no index.json); "
                      f"prepare one (brainage prepare --out {cache}), or to simulate the "
                      "config's cohort into it also set --config.data.simulate.n")


def set_key(config: ml_collections.ConfigDict, dotted: str, text: str | Any) -> None:
  """Sets `config.<dotted>` from a string (parsed as a Python literal) or a value."""
  *parents, leaf = dotted.split(".")
  node = config
  for i, part in enumerate(parents):
    if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
      raise ConfigError(f"unknown config key {'.'.join(parents[:i + 1])!r}")
    node = node[part]
  if leaf not in node or isinstance(node[leaf], ml_collections.ConfigDict):
    raise ConfigError(f"unknown config key {dotted!r}")
  ref = node[leaf]
  value = _parse(text, ref) if isinstance(text, str) else text
  if not same_type(value, ref):
    raise ConfigError(f"config key {dotted!r} must be {type(ref).__name__}, got {text!r}")
  if isinstance(ref, float):
    value = float(value)
  if isinstance(ref, (tuple, list)):
    value = tuple(value)
  with node.unlocked():
    node[leaf] = value


def _parse(text: str, ref: Any) -> Any:
  if isinstance(ref, str):
    return text
  if isinstance(ref, bool):
    low = text.strip().lower()
    if low in ("true", "1", "yes"):
      return True
    if low in ("false", "0", "no"):
      return False
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError, TypeError, RecursionError, MemoryError):
    return text  # not a literal: the type check names the key
  if isinstance(ref, (tuple, list)) and not isinstance(value, (tuple, list)):
    value = (value,)
  return value
