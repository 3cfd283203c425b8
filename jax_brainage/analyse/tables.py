"""Tables of the analysis: reading TSVs keyed by participant, cell values, the predictions join.

    read_tsv(path) -> (columns, rows)     rows are {column: text}, ids normalised to `sub-...`
    join_tables(predictions, participants) -> (one row per prediction row, unmatched ids)

A cell is text as read ("n/a" or empty = missing, see `MISSING`) or a number when a caller built
the table in Python; `is_missing` and `number` read either kind the same way.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from jax_brainage.data import bids
from jax_brainage.errors import DataError

ID_COLUMN = "participant_id"
# Cell texts that mean "no value" (compared stripped and lower-cased).
MISSING = frozenset({"", "n/a", "na", "nan", "none"})


def read_tsv(path: str | os.PathLike,
             what: str = "table") -> tuple[list[str], list[dict[str, str]]]:
  """(columns, rows) of a TSV with a participant_id column (ids normalised to `sub-...`).

  Args:
    path: the TSV (participants.tsv, a predictions TSV, brain_age.tsv...).
    what: what the file is, for the error when it does not exist.
  Raises:
    DataError: one line naming the file: missing, unreadable, no participant_id column, or a
      line with another number of fields than the header.
  """
  if not Path(path).is_file():
    raise DataError(f"{path}: {what} not found")
  header, rows = bids.read_participants(path)
  return header, [dict(r.values, **{ID_COLUMN: r.subject_id}) for r in rows]


def as_rows(table) -> list[Mapping[str, Any]]:
  """Rows (dicts) from a list of dicts or a columnar mapping {column: [n] values}.

  Raises:
    DataError: columns of different lengths.
  """
  if isinstance(table, Mapping):
    columns = {k: list(v) for k, v in table.items()}
    n = {len(v) for v in columns.values()}
    if len(n) > 1:
      raise DataError(f"table columns differ in length ({sorted(n)})")
    return [{k: v[i] for k, v in columns.items()} for i in range(n.pop() if n else 0)]
  return [dict(row) for row in table]


def is_missing(value: Any) -> bool:
  """True for None, a non-finite float and the texts of `MISSING` ("n/a", empty...)."""
  if value is None:
    return True
  if isinstance(value, (float, np.floating)):
    return not math.isfinite(float(value))
  return isinstance(value, str) and value.strip().lower() in MISSING


def number(value: Any) -> float | None:
  """The finite float a cell holds (booleans as 0/1), or None (missing, text, non-finite)."""
  if isinstance(value, (bool, np.bool_)):
    return float(value)
  try:
    x = float(value)
  except (TypeError, ValueError):
    return None
  return x if math.isfinite(x) else None


def subject_id(row: Mapping[str, Any], i: int) -> str:
  """Row `i`'s participant id, or "row {i + 1}" where it has none (for messages and records)."""
  return str(row.get(ID_COLUMN) or f"row {i + 1}")


def join_tables(predictions: Sequence[Mapping[str, str]], participants: Sequence[Mapping[str, str]],
                *, where: str = "participants.tsv") -> tuple[list[dict[str, str]], list[str]]:
  """One row per prediction row with its participant's columns (the prediction's own columns
  win where both have one, e.g. age). Returns (rows, prediction rows without a participant).

  Raises:
    DataError: a participant listed twice in `where`.
  """
  by_id: dict[str, Mapping[str, str]] = {}
  for row in participants:
    pid = row[ID_COLUMN]
    if pid in by_id:
      raise DataError(f"{where}: participant {pid} listed twice")
    by_id[pid] = row
  joined, unmatched = [], []
  for row in predictions:
    other = by_id.get(row[ID_COLUMN])
    if other is None:
      unmatched.append(row[ID_COLUMN])
      joined.append(dict(row))
    else:
      # A missing value in the prediction row does not hide the participant's one.
      joined.append({**other, **{k: v for k, v in row.items()
                                 if not (is_missing(v) and k in other)}})
  return joined, unmatched
