"""User-facing errors: one line that names the culprit (file, subject, key)."""


class BrainAgeError(Exception):
  """Base class for errors the CLI prints as one line (no traceback)."""


class DataError(BrainAgeError):
  """Bad input data: a missing, corrupt or inconsistent file, table row or image."""


class ConfigError(BrainAgeError):
  """Bad configuration: unknown key, wrong type, mismatched workdir or checkpoint."""
