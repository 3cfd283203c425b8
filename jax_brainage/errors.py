"""User-facing errors: one line that names the culprit (file, subject, key)."""


class BrainAgeError(Exception):
  """Base class for errors the CLI prints as one line (no traceback)."""


class DataError(BrainAgeError):
  """Bad input data: a missing, corrupt or inconsistent file, table row or image."""


class ConfigError(BrainAgeError):
  """Bad configuration: unknown key, wrong type, mismatched workdir or checkpoint."""


class SmallSampleWarning(UserWarning):
  """A result computed from too few subjects to trust (a bias correction fit on few scans, a
  group map of a handful of subjects, a regression with few residual degrees of freedom)."""
