"""Reading a BIDS-like dataset: participants.tsv plus per-subject anatomical images.

Layout (as BIDS and `brainage simulate` write it):

    DATA/participants.tsv                     participant_id, age, sex, other covariates
    DATA/sub-XXX/anat/sub-XXX_T1w.nii.gz      also _FLAIR, _swi; .nii, .nii.gz, .mgz, .mgh
    DATA/sub-XXX/ses-YY/anat/sub-XXX_ses-YY_T1w.nii.gz

The sequence is the file name's last `_` part (its BIDS suffix), matched case-insensitively to
the canonical names in `SEQUENCES` (T1w, FLAIR, swi, ...). Every problem gives a one-line
`DataError` naming the file (and line) and subject; with `skip_bad=True` problems that concern
one subject are reported in `Dataset.skipped` and that subject is left out instead.

`read_image_list` takes a plain list of image files instead (one subject each, no age), for
predicting on new data.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

from jax_brainage.errors import ConfigError, DataError

# Canonical sequence names (BIDS suffixes); the study used T1w, FLAIR and swi.
SEQUENCES = ("T1w", "T2w", "FLAIR", "PDw", "T2starw", "swi")
IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".mgz", ".mgh")
MISSING = ("", "n/a", "na", "nan", "none")
# Plausible chronological ages (years, inclusive); `read_bids(age_range=...)`, `prepare
# --age-range MIN,MAX`. An age outside is a typo or a unit mistake (months, days), not a person.
DEFAULT_AGE_RANGE = (0.0, 120.0)
_SEX = {"m": "M", "male": "M", "f": "F", "female": "F"}


@dataclasses.dataclass(frozen=True)
class Subject:
  """One subject (one row of participants.tsv, or one file of a plain list).

  Attributes:
    subject_id: BIDS participant id, `sub-<label>`.
    images: sequence name -> image path, in the dataset's sequence order.
    age: chronological age in years (None when unknown, e.g. for prediction).
    sex: "M", "F", another string from the table, or None.
    covariates: the table's other columns (floats where numeric; None for n/a).
    session: the BIDS session the images come from (None when there are no sessions).
    mask: path of a brain mask image, when the dataset provides one.
  """

  subject_id: str
  images: dict[str, str]
  age: float | None = None
  sex: str | None = None
  covariates: dict[str, Any] = dataclasses.field(default_factory=dict)
  session: str | None = None
  mask: str | None = None


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Validated subjects of a dataset, in participants.tsv order, plus the skipped ones."""

  root: str
  sequences: tuple[str, ...]
  subjects: tuple[Subject, ...]
  skipped: tuple[tuple[str, str], ...] = ()  # (subject id, one-line reason)

  def __len__(self) -> int:
    return len(self.subjects)


def canonical_sequence(name: str) -> str:
  """Canonical spelling of a sequence name (case-insensitive); ConfigError if unknown."""
  for known in SEQUENCES:
    if name.strip().lower() == known.lower():
      return known
  raise ConfigError(f"unknown sequence {name!r}; known sequences: {', '.join(SEQUENCES)}")


def parse_sequences(spec: str | Sequence[str]) -> tuple[str, ...]:
  """`"T1w,FLAIR"` or a list -> canonical names, in order; ConfigError on unknown/duplicates."""
  items = spec.split(",") if isinstance(spec, str) else list(spec)
  names = tuple(canonical_sequence(s) for s in items if s.strip())
  if not names:
    raise ConfigError("no sequence given (e.g. --sequences T1w,FLAIR)")
  if len(set(names)) != len(names):
    raise ConfigError(f"sequence listed twice in {','.join(names)}")
  return names


def split_image_name(name: str) -> tuple[str, str] | None:
  """`sub-01_ses-2_T1w.nii.gz` -> (`sub-01_ses-2`, `T1w`); None if not an image file name."""
  lower = name.lower()
  for ext in IMAGE_EXTENSIONS:
    if lower.endswith(ext):
      stem = name[: -len(ext)]
      entities, _, suffix = stem.rpartition("_")
      return entities, suffix
  return None


def _entity(entities: str, key: str) -> str | None:
  match = re.search(rf"(?:^|_){key}-([A-Za-z0-9]+)", entities)
  return match.group(1) if match else None


def normalise_id(raw: str) -> str:
  """`01` or `sub-01` -> `sub-01`."""
  raw = raw.strip()
  return raw if raw.startswith("sub-") else f"sub-{raw}"


def parse_age_range(spec: str | Sequence[float] | None) -> tuple[float, float]:
  """`"MIN,MAX"` or a pair of years -> (min, max); None -> `DEFAULT_AGE_RANGE`.

  Raises:
    ConfigError: not two finite numbers with min < max.
  """
  if spec is None:
    return DEFAULT_AGE_RANGE
  items = spec.split(",") if isinstance(spec, str) else list(spec)
  try:
    low, high = (float(v) for v in items)
  except (TypeError, ValueError):
    raise ConfigError(f"age range must be MIN,MAX in years, got {spec!r}") from None
  if not (math.isfinite(low) and math.isfinite(high) and low < high):
    raise ConfigError(f"age range must be two finite numbers of years with MIN < MAX, got "
                      f"{spec!r}")
  return low, high


# A plain decimal number in ASCII (Python's float() also takes "3_5", "inf" and non-ASCII digits,
# which in a table are typos, not numbers).
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def _number(text: str) -> float | None:
  """A finite number from a plain decimal string, else None."""
  if not _DECIMAL.fullmatch(text):
    return None
  value = float(text)
  return value if math.isfinite(value) else None


# ---------------------------------------------------------------------------------------------
# participants.tsv


@dataclasses.dataclass(frozen=True)
class _Row:
  line: int
  subject_id: str
  values: dict[str, str]


def read_participants(path: str | os.PathLike) -> tuple[list[str], list[_Row]]:
  """Reads participants.tsv -> (column names, rows with their line numbers)."""
  path = Path(path)
  if not path.is_file():
    raise DataError(f"{path}: participants table not found")
  try:
    with open(path, newline="", encoding="utf-8-sig") as f:
      reader = csv.reader(f, delimiter="\t")
      lines = [(reader.line_num, row) for row in reader]
  except (OSError, UnicodeDecodeError, csv.Error) as e:
    raise DataError(f"{path}: cannot read participants table ({e})") from e
  lines = [(n, row) for n, row in lines if any(cell.strip() for cell in row)]
  if not lines:
    raise DataError(f"{path}: empty participants table")
  header = [h.strip() for h in lines[0][1]]
  if "participant_id" not in header:
    raise DataError(f"{path}: no 'participant_id' column (columns: {', '.join(header)})")
  rows = []
  for n, cells in lines[1:]:
    if len(cells) != len(header):
      raise DataError(f"{path}: line {n}: {len(cells)} tab-separated fields, header has "
                      f"{len(header)}")
    values = {h: c.strip() for h, c in zip(header, cells)}
    rows.append(_Row(n, normalise_id(values["participant_id"]), values))
  return header, rows


# ---------------------------------------------------------------------------------------------
# Images


def find_images(root: str | os.PathLike) -> dict[str, list[tuple[Path, str | None, str]]]:
  """Image files per subject: {subject id: [(path, session, suffix)]} under sub-*/[ses-*/]anat/."""
  root = Path(root)
  found: dict[str, list[tuple[Path, str | None, str]]] = {}
  for sub_dir in sorted(root.glob("sub-*")):
    if not sub_dir.is_dir():
      continue
    anat_dirs = [(sub_dir / "anat", None)] + [
        (ses / "anat", ses.name[len("ses-"):]) for ses in sorted(sub_dir.glob("ses-*"))
        if ses.is_dir()]
    for anat, session in anat_dirs:
      if not anat.is_dir():
        continue
      for f in sorted(anat.iterdir()):
        # Hidden files are our own half-written temporaries (fileio) or system files.
        parts = split_image_name(f.name)
        if f.name.startswith(".") or parts is None or not f.is_file():
          continue
        found.setdefault(sub_dir.name, []).append((f, session, parts[1]))
  return found


def _pick(
    files: list[tuple[Path, str | None, str]],
    suffix: str,
    session: str | None,
) -> tuple[list[Path], str | None]:
  matches = [(p, s) for p, s, sfx in files if sfx.lower() == suffix.lower()]
  if session is not None:
    matches = [(p, s) for p, s in matches if s == session]
  return [p for p, _ in matches], (matches[0][1] if len(matches) == 1 else None)


def read_bids(
    root: str | os.PathLike,
    sequences: str | Sequence[str] = ("T1w",),
    *,
    session: str | None = None,
    require_age: bool = True,
    mask_suffix: str | None = None,
    skip_bad: bool = False,
    age_range: str | Sequence[float] | None = None,
) -> Dataset:
  """Reads and validates a BIDS-like dataset.

  Args:
    root: dataset directory (holds participants.tsv and sub-*/).
    sequences: sequence names (case-insensitive), e.g. "T1w,FLAIR"; they become channels.
    session: use only images of session `ses-<session>` (needed when subjects have several).
    require_age: every subject needs a numeric age (training); False for prediction.
    mask_suffix: also find a brain mask per subject, e.g. "mask" for `sub-01_desc-brain_mask`.
    skip_bad: report and leave out subjects with a problem instead of raising.
    age_range: plausible ages (years, inclusive), "MIN,MAX" or a pair; default
      `DEFAULT_AGE_RANGE` (0 to 120). An age outside is a subject problem.

  Returns:
    `Dataset` with subjects in participants.tsv order.

  Raises:
    ConfigError: unknown sequence name.
    DataError: missing root or table, a table without participant_id (or age when required), or
      (unless `skip_bad`) a subject problem: duplicated id, missing, non-numeric or implausible
      age, a subject without images, images without a row, several candidate images.
  """
  sequences = parse_sequences(sequences)
  min_age, max_age = parse_age_range(age_range)
  root = Path(root)
  if not root.is_dir():
    raise DataError(f"{root}: dataset directory not found")
  table = root / "participants.tsv"
  header, rows = read_participants(table)
  age_col = next((h for h in header if h.lower() == "age"), None)
  if require_age and age_col is None:
    raise DataError(f"{table}: no 'age' column (columns: {', '.join(header)})")
  sex_col = next((h for h in header if h.lower() in ("sex", "gender")), None)
  covariate_cols = [h for h in header if h not in ("participant_id", age_col, sex_col)]

  skipped: list[tuple[str, str]] = []

  def problem(subject_id: str, message: str) -> None:
    if not skip_bad:
      raise DataError(message)
    skipped.append((subject_id, message))

  # Duplicated ids: every row of the id is bad (which one is right is the user's call).
  first_line: dict[str, int] = {}
  duplicated: set[str] = set()
  for row in rows:
    if row.subject_id in first_line:
      duplicated.add(row.subject_id)
      problem(row.subject_id, f"{table}: line {row.line}: {row.subject_id}: duplicated "
                              f"participant_id (first on line {first_line[row.subject_id]})")
    else:
      first_line[row.subject_id] = row.line

  images = find_images(root)
  subjects = []
  for row in rows:
    sid = row.subject_id
    if sid in duplicated:
      continue  # Reported above, on its second row.
    where = f"{table}: line {row.line}: {sid}"
    age = None
    if age_col is not None:
      raw = row.values[age_col]
      if raw.lower() in MISSING:
        if require_age:
          problem(sid, f"{where}: missing age")
          continue
      else:
        age = _number(raw)
        if age is None:
          problem(sid, f"{where}: non-numeric or invalid age {raw!r} (years expected)")
          continue
        if not min_age <= age <= max_age:
          problem(sid, f"{where}: implausible age {raw!r} (outside {min_age:g} to {max_age:g} "
                       "years; --age-range MIN,MAX)")
          continue
    sex = None
    if sex_col is not None and row.values[sex_col].lower() not in MISSING:
      sex = _SEX.get(row.values[sex_col].lower(), row.values[sex_col])
    covariates = {}
    for col in covariate_cols:
      raw = row.values[col]
      value = None if raw.lower() in MISSING else _number(raw)
      covariates[col] = raw if value is None and raw.lower() not in MISSING else value

    files = images.get(sid, [])
    anat = root / sid / "anat"
    paths: dict[str, str] = {}
    sessions = set()
    bad = False
    for seq in sequences + ((mask_suffix,) if mask_suffix else ()):
      found, ses = _pick(files, seq, session)
      label = "brain mask" if seq == mask_suffix and seq not in sequences else f"{seq} image"
      if not found:
        where_ses = f" in session ses-{session}" if session else ""
        problem(sid, f"{anat}: {sid}: no {label}{where_ses} "
                     f"({sid}[_ses-*]_{seq}.nii[.gz]|.mgz) for the row on line {row.line} "
                     f"of {table.name}")
        bad = True
        break
      if len(found) > 1:
        names = ", ".join(str(p.relative_to(root)) for p in found)
        problem(sid, f"{root / sid}: {sid}: {len(found)} candidate {label}s ({names}); "
                     f"choose a session (--session) or keep one")
        bad = True
        break
      paths[seq] = str(found[0])
      sessions.add(ses)
    if bad:
      continue
    if len(sessions) > 1:
      problem(sid, f"{root / sid}: {sid}: sequences come from different sessions "
                   f"({', '.join(sorted(s or 'none' for s in sessions))}); pass --session")
      continue
    mask = paths.pop(mask_suffix) if mask_suffix and mask_suffix not in sequences else None
    subjects.append(Subject(
        subject_id=sid, images={s: paths[s] for s in sequences}, age=age, sex=sex,
        covariates=covariates, session=sessions.pop(), mask=mask))

  # Images without a row (only those of the chosen sequences matter for this dataset).
  wanted = {s.lower() for s in sequences}
  for sid, files in images.items():
    if sid in first_line:
      continue
    relevant = [p for p, _, sfx in files if sfx.lower() in wanted]
    if relevant:
      problem(sid, f"{relevant[0]}: {sid}: image without a row in {table}")

  if not subjects:
    detail = f" ({len(skipped)} skipped: {skipped[0][1]} ...)" if skipped else ""
    raise DataError(f"{root}: no usable subject for sequences {','.join(sequences)}{detail}")
  return Dataset(root=str(root), sequences=sequences, subjects=tuple(subjects),
                 skipped=tuple(skipped))


def subject_id_from_path(path: str | os.PathLike) -> str:
  """A subject id from an image file name: BIDS entities `sub-XX[_ses-YY]`, else the stem."""
  name = Path(path).name
  parts = split_image_name(name)
  stem = parts[0] if parts and parts[0] else (parts[1] if parts else name)
  sub = _entity(stem, "sub")
  if sub is not None:
    ses = _entity(stem, "ses")
    return f"sub-{sub}" + (f"_ses-{ses}" if ses else "")
  if parts is not None:
    stem = name[: -len(next(e for e in IMAGE_EXTENSIONS if name.lower().endswith(e)))]
  return stem


def read_image_list(
    paths: Iterable[str | os.PathLike],
    sequence: str = "T1w",
    *,
    skip_bad: bool = False,
) -> Dataset:
  """A dataset from a plain list of image files: one subject each, no age (for prediction).

  Subject ids come from the file names (`sub-XX[_ses-YY]` if BIDS-named, else the name without
  extension); they must be unique. Raises DataError for a missing file or a duplicated id.
  """
  sequence = canonical_sequence(sequence)
  subjects, skipped, seen = [], [], {}
  for p in paths:
    p = Path(p)
    sid = subject_id_from_path(p)
    message = None
    if not p.is_file():
      message = f"{p}: {sid}: file not found"
    elif split_image_name(p.name) is None:
      message = f"{p}: {sid}: not an image file ({', '.join(IMAGE_EXTENSIONS)})"
    elif sid in seen:
      message = f"{p}: {sid}: duplicated subject id (also {seen[sid]})"
    if message:
      if not skip_bad:
        raise DataError(message)
      skipped.append((sid, message))
      continue
    seen[sid] = p
    subjects.append(Subject(subject_id=sid, images={sequence: str(p)}))
  if not subjects:
    raise DataError("no usable image in the list" + (f" ({skipped[0][1]})" if skipped else ""))
  return Dataset(root="", sequences=(sequence,), subjects=tuple(subjects), skipped=tuple(skipped))
