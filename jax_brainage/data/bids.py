"""Reading a BIDS dataset (raw, or fMRIPrep derivatives): participants plus anatomical images.

Layout (as BIDS, fMRIPrep and `brainage simulate` write it):

    DATA/participants.tsv                     participant_id, age, sex, other covariates
    DATA/sub-XXX/anat/sub-XXX_T1w.nii.gz      also _FLAIR, _swi; .nii, .nii.gz, .mgz, .mgh
    DATA/sub-XXX/ses-YY/anat/sub-XXX_ses-YY[_acq-A][_run-N]_T1w.nii.gz   + .json sidecars
    DATA/sub-XXX/sub-XXX_sessions.tsv         session_id, age (per session, optional)
    fMRIPrep: sub-XXX/[ses-YY/]anat/sub-XXX_space-MNI152NLin2009cAsym_desc-preproc_T1w.nii.gz,
              ..._space-MNI152NLin2009cAsym_desc-brain_mask.nii.gz (its brain mask)

The sequence is the file name's last `_` part (its BIDS suffix), matched case-insensitively to
the canonical names in `SEQUENCES` (T1w, FLAIR, swi, ...). Every (subject, session) is a row;
`row_id` (`sub-XXX_ses-YY`) names it uniquely. Among several images of one sequence the rule in
`jax_brainage.data.entities` picks one (or `--entities key=value,...`). Every problem gives a
one-line `DataError` naming the file (and line) and subject; with `skip_bad=True` problems that
concern one row are reported in `Dataset.skipped` and that row is left out instead.

`read_image_list` takes a plain list of image files instead (one row each, no age), for
predicting on new data; FreeSurfer/FastSurfer SUBJECTS_DIRs are `jax_brainage.data.freesurfer`,
and `jax_brainage.data.layouts` tells the layouts apart.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from jax_brainage.data.entities import (BIDS_PREFERENCES, FMRIPREP_PREFERENCES, Candidate, choose,
                                        parse_entities, parse_filter, read_sidecar,
                                        sidecar_covariates)
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
  layout: str = "bids"  # bids, fmriprep, freesurfer, fastsurfer or files (an image list)

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


def read_table(path: str | os.PathLike, id_column: str = "participant_id",
               what: str = "participants table") -> tuple[list[str], list[_Row]]:
  """Reads a BIDS TSV keyed by `id_column` -> (column names, rows with their line numbers).

  Row ids: participant ids normalised to `sub-<label>`; session ids to the bare label.
  """
  path = Path(path)
  if not path.is_file():
    raise DataError(f"{path}: {what} not found")
  try:
    with open(path, newline="", encoding="utf-8-sig") as f:
      reader = csv.reader(f, delimiter="\t")
      lines = [(reader.line_num, row) for row in reader]
  except (OSError, UnicodeDecodeError, csv.Error) as e:
    raise DataError(f"{path}: cannot read {what} ({e})") from e
  lines = [(n, row) for n, row in lines if any(cell.strip() for cell in row)]
  if not lines:
    raise DataError(f"{path}: empty {what}")
  header = [h.strip() for h in lines[0][1]]
  if id_column not in header:
    raise DataError(f"{path}: no {id_column!r} column (columns: {', '.join(header)})")
  rows = []
  for n, cells in lines[1:]:
    if len(cells) != len(header):
      raise DataError(f"{path}: line {n}: {len(cells)} tab-separated fields, header has "
                      f"{len(header)}")
    values = {h: c.strip() for h, c in zip(header, cells)}
    raw = values[id_column]
    key = normalise_id(raw) if id_column == "participant_id" else session_label(raw)
    rows.append(_Row(n, key, values))
  return header, rows


def read_participants(path: str | os.PathLike) -> tuple[list[str], list[_Row]]:
  """Reads participants.tsv -> (column names, rows with their line numbers)."""
  return read_table(path)


def session_label(raw: str) -> str:
  """`ses-2` or `2` -> `2`."""
  raw = raw.strip()
  return raw[len("ses-"):] if raw.startswith("ses-") else raw


def row_id(subject_id: str, session: str | None) -> str:
  """The id of one row (one scan): `sub-01`, or `sub-01_ses-2` when the dataset has sessions;
  unique within a dataset even where a subject has several sessions."""
  return subject_id + (f"_ses-{session}" if session else "")


def table_columns(header: Sequence[str]) -> tuple[str | None, str | None, list[str]]:
  """(age column, sex column, covariate columns) of a participants-like table's header."""
  age_col = next((h for h in header if h.lower() == "age"), None)
  sex_col = next((h for h in header if h.lower() in ("sex", "gender")), None)
  return age_col, sex_col, [h for h in header
                            if h not in ("participant_id", "session_id", age_col, sex_col)]


def row_attributes(values: Mapping[str, str], sex_col: str | None, covariate_cols: Sequence[str]
                   ) -> tuple[str | None, dict[str, Any]]:
  """(sex: "M", "F", another string or None; covariates: floats where numeric, None for n/a)."""
  sex = None
  if sex_col is not None and values[sex_col].lower() not in MISSING:
    sex = _SEX.get(values[sex_col].lower(), values[sex_col])
  covariates: dict[str, Any] = {}
  for col in covariate_cols:
    raw = values[col]
    value = None if raw.lower() in MISSING else _number(raw)
    covariates[col] = raw if value is None and raw.lower() not in MISSING else value
  return sex, covariates


def check_age(raw: str | None, where: str, *, require: bool, age_range: tuple[float, float]
              ) -> tuple[float | None, str | None]:
  """(age in years or None, the one-line problem or None) of a table cell; `where` names it."""
  if raw is None or raw.lower() in MISSING:
    return None, (f"{where}: missing age" if require else None)
  age = _number(raw)
  if age is None:
    return None, f"{where}: non-numeric or invalid age {raw!r} (years expected)"
  low, high = age_range
  if not low <= age <= high:
    return None, (f"{where}: implausible age {raw!r} (outside {low:g} to {high:g} years; "
                  "--age-range MIN,MAX)")
  return age, None


# ---------------------------------------------------------------------------------------------
# Images


def find_images(root: str | os.PathLike) -> dict[str, list[Candidate]]:
  """Image files per subject: {subject id: [Candidate]} under sub-*/[ses-*/]anat/."""
  root = Path(root)
  found: dict[str, list[Candidate]] = {}
  for sub_dir in sorted(root.glob("sub-*")):
    if not sub_dir.is_dir():
      continue
    anat_dirs = [(sub_dir / "anat", None)] + [
        (ses / "anat", session_label(ses.name)) for ses in sorted(sub_dir.glob("ses-*"))
        if ses.is_dir()]
    for anat, session in anat_dirs:
      if not anat.is_dir():
        continue
      for f in sorted(anat.iterdir()):
        # Hidden files are our own half-written temporaries (fileio) or system files.
        parts = split_image_name(f.name)
        if f.name.startswith(".") or parts is None or not f.is_file():
          continue
        found.setdefault(sub_dir.name, []).append(
            Candidate(f, session, parts[1], parse_entities(parts[0])))
  return found


def is_fmriprep(root: str | os.PathLike) -> bool:
  """Whether `root` is fMRIPrep output: dataset_description.json's GeneratedBy (or the older
  PipelineDescription) names fMRIPrep, or an anat file is named `*_desc-preproc_T1w.*`."""
  root = Path(root)
  description = root / "dataset_description.json"
  if description.is_file():
    try:
      meta = json.loads(description.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
      meta = {}
    if isinstance(meta, dict):
      generated = meta.get("GeneratedBy") or []
      names = [g.get("Name", "") for g in generated if isinstance(g, dict)]
      pipeline = meta.get("PipelineDescription")
      names += [pipeline.get("Name", "")] if isinstance(pipeline, dict) else []
      if any("fmriprep" in str(n).lower() for n in names):
        return True
  pattern = re.compile(r"_desc-preproc_T1w\.(nii|nii\.gz)$", re.IGNORECASE)
  return any(pattern.search(p.name) for p in root.glob("sub-*/anat/*")) or any(
      pattern.search(p.name) for p in root.glob("sub-*/ses-*/anat/*"))


def _session_ages(root: Path, sid: str) -> tuple[Path, dict[str, tuple[int, str]]]:
  """`sub-X/sub-X_sessions.tsv` -> (its path, {session label: (line, raw age)}); empty if none."""
  path = root / sid / f"{sid}_sessions.tsv"
  if not path.is_file():
    return path, {}
  header, rows = read_table(path, "session_id", "sessions table")
  age_col = next((h for h in header if h.lower() == "age"), None)
  if age_col is None:
    return path, {}
  return path, {r.subject_id: (r.line, r.values[age_col]) for r in rows}


def read_bids(
    root: str | os.PathLike,
    sequences: str | Sequence[str] = ("T1w",),
    *,
    session: str | None = None,
    require_age: bool = True,
    mask_suffix: str | None = None,
    skip_bad: bool = False,
    age_range: str | Sequence[float] | None = None,
    entities: str | Mapping[str, str | None] | None = None,
    participants: str | os.PathLike | None = None,
    fmriprep: bool | None = None,
) -> Dataset:
  """Reads and validates a BIDS-like dataset (raw BIDS or fMRIPrep derivatives).

  Every (subject, session) with images is a row: `Subject.session` is the session label (None
  without `ses-` folders); its age is `sub-X/sub-X_sessions.tsv`'s `age` for that session when
  given, else participants.tsv's. Among several images of one sequence, `entities.choose`'s rule
  picks one (raw BIDS prefers the native image, fMRIPrep the MNI152NLin2009cAsym `desc-preproc`
  one, then the lowest run). The first sequence's JSON sidecar adds `entities.SIDECAR_COVARIATES`
  (field strength in tesla, manufacturer, model) to the covariates.

  Args:
    root: dataset directory (holds sub-*/ and usually participants.tsv).
    sequences: sequence names (case-insensitive), e.g. "T1w,FLAIR"; they become channels.
    session: use only images of session `ses-<session>`.
    require_age: every row needs a numeric age (training); False for prediction.
    mask_suffix: also find a brain mask per row in the image's space, e.g. "mask" for
      `sub-01_desc-brain_mask`; fMRIPrep: "mask" by default (the row keeps none if absent).
    skip_bad: report and leave out rows with a problem instead of raising.
    age_range: plausible ages (years, inclusive), "MIN,MAX" or a pair; default
      `DEFAULT_AGE_RANGE` (0 to 120). An age outside is a subject problem.
    entities: `--entities`, e.g. "space=MNI152NLin2009cAsym,desc=preproc" (every sequence).
    participants: a participants-like TSV to use instead of root/participants.tsv (fMRIPrep
      derivatives have none); a look-up: its rows without images are left out. Without either,
      prediction takes the sub-* folders, ages unknown.
    fmriprep: the layout (None: `is_fmriprep(root)`).

  Returns:
    `Dataset` with rows in participants.tsv order, sessions in label order.

  Raises:
    ConfigError: unknown sequence name, malformed `entities`.
    DataError: missing root or table, a table without participant_id (or age when required), or
      (unless `skip_bad`) a row problem: duplicated id, missing, non-numeric or implausible
      age, a subject without images, images without a row, several candidate images.
  """
  sequences = parse_sequences(sequences)
  min_age, max_age = parse_age_range(age_range)
  required = parse_filter(entities)
  root = Path(root)
  if not root.is_dir():
    raise DataError(f"{root}: dataset directory not found")
  if fmriprep is None:
    fmriprep = is_fmriprep(root)
  preferred = FMRIPREP_PREFERENCES if fmriprep else BIDS_PREFERENCES
  mask_optional = fmriprep and mask_suffix is None
  if mask_optional:
    mask_suffix = "mask"
  images = find_images(root)
  table = Path(participants) if participants is not None else root / "participants.tsv"
  if table.is_file() or require_age:
    if not table.is_file():
      raise DataError(f"{table}: participants table not found (ages are needed; pass "
                      "--participants FILE" + (", the raw dataset's participants.tsv: fMRIPrep "
                                               "derivatives have none)" if fmriprep else ")"))
    header, rows = read_participants(table)
  else:
    header = ["participant_id"]
    rows = [_Row(0, sid, {"participant_id": sid}) for sid in images]
  age_col, sex_col, covariate_cols = table_columns(header)
  if require_age and age_col is None:
    raise DataError(f"{table}: no 'age' column (columns: {', '.join(header)})")

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

  def parse_age(raw: str | None, where: str) -> tuple[float | None, str | None]:
    return check_age(raw, where, require=require_age, age_range=(min_age, max_age))

  wanted = {s.lower() for s in sequences}
  json_names: dict[Path, list[str]] = {}  # sidecar folders listed once
  subjects = []
  for row in rows:
    sid = row.subject_id
    if sid in duplicated:
      continue  # Reported above, on its second row.
    where = f"{table}: line {row.line}: {sid}" if row.line else f"{root / sid}: {sid}"
    sex, covariates = row_attributes(row.values, sex_col, covariate_cols)

    files = images.get(sid, [])
    if participants is not None and not files:
      continue  # A table given with --participants is a look-up (e.g. the raw dataset's).
    if session is not None:
      sessions = [session_label(session)]
    else:
      sessions = sorted({c.session for c in files if c.suffix.lower() in wanted},
                        key=lambda s: (s is not None, s or "")) or [None]
    try:
      sessions_tsv, session_ages = _session_ages(root, sid) if files else (None, {})
    except DataError as e:
      problem(sid, str(e))
      continue
    for ses in sessions:
      line, raw_age = session_ages.get(ses, (0, ""))
      if raw_age.lower() not in MISSING:
        age, why = parse_age(raw_age, f"{sessions_tsv}: line {line}: {sid} ses-{ses}")
      else:
        age, why = parse_age(row.values[age_col] if age_col else None, where)
      if why:
        problem(sid, why)
        continue
      try:
        chosen = _choose_row(files, sid, ses, sequences, mask_suffix, mask_optional, required,
                             preferred, root, row.line, table.name)
        paths = {seq: str(c.path) for seq, c in chosen.items() if seq in sequences}
        mask = str(chosen["mask"].path) if "mask" in chosen else None
        meta = read_sidecar(chosen[sequences[0]], root, json_names)
      except DataError as e:
        problem(sid, str(e))
        continue
      subjects.append(Subject(
          subject_id=sid, images=paths, age=age, sex=sex,
          covariates={**covariates, **sidecar_covariates(meta)}, session=ses, mask=mask))

  # Images without a row (only those of the chosen sequences matter for this dataset).
  for sid, files in images.items():
    if sid in first_line:
      continue
    relevant = [c.path for c in files if c.suffix.lower() in wanted]
    if relevant:
      problem(sid, f"{relevant[0]}: {sid}: image without a row in {table}")

  if not subjects:
    detail = f" ({len(skipped)} skipped: {skipped[0][1]} ...)" if skipped else ""
    raise DataError(f"{root}: no usable subject for sequences {','.join(sequences)}{detail}")
  return Dataset(root=str(root), sequences=sequences, subjects=uniform_covariates(subjects),
                 skipped=tuple(skipped), layout="fmriprep" if fmriprep else "bids")


def _choose_row(files: list[Candidate], sid: str, ses: str | None, sequences: tuple[str, ...],
                mask_suffix: str | None, mask_optional: bool, required, preferred,
                root: Path, line: int, table_name: str) -> dict[str, Candidate]:
  """{sequence: image, "mask": mask} of one row; DataError naming the row on any problem."""
  who = f"{root / sid}: {sid}" + (f" ses-{ses}" if ses else "")
  chosen: dict[str, Candidate] = {}
  for seq in sequences:
    cands = [c for c in files if c.session == ses and c.suffix.lower() == seq.lower()]
    pick = choose(cands, required, preferred, who, f"{seq} image", root)
    if pick is None:
      anat = root / sid / (f"ses-{ses}" if ses else "") / "anat"
      in_ses = f" in session ses-{ses}" if ses else ""
      row = f" for the row on line {line} of {table_name}" if line else ""
      raise DataError(f"{anat}: {sid}: no {seq} image{in_ses} ({sid}[_ses-*]_{seq}.nii[.gz]|"
                      f".mgz){row}")
    chosen[seq] = pick
  if mask_suffix:
    # The mask must be on the reference image's grid family: same space entity.
    space = chosen[sequences[0]].entities.get("space")
    cands = [c for c in files if c.session == ses and c.suffix.lower() == mask_suffix.lower()
             and c.entities.get("space") == space]
    pick = choose(cands, {}, {"desc": "brain"}, who, "brain mask", root)
    if pick is None and not mask_optional:
      raise DataError(f"{who}: no brain mask ({mask_suffix}" + (f", space-{space}" if space else "")
                      + ") beside its images")
    if pick is not None:
      chosen["mask"] = pick
  return chosen


def uniform_covariates(subjects: Sequence[Subject]) -> tuple[Subject, ...]:
  """Every subject with the same covariate keys (None where a subject's table or sidecar has
  no value), in first-seen order, so downstream tables have one set of columns."""
  keys: list[str] = []
  for s in subjects:
    keys += [k for k in s.covariates if k not in keys]
  return tuple(s if list(s.covariates) == keys else dataclasses.replace(
      s, covariates={k: s.covariates.get(k) for k in keys}) for s in subjects)


def ids_from_path(path: str | os.PathLike) -> tuple[str, str | None]:
  """(subject id, session) of an image file.

  BIDS names give `sub-XX` and their `ses-` entity (or a `ses-*` folder above); a file in a
  FreeSurfer/FastSurfer `mri/` folder (`SUBJECT/mri/brain.finalsurfs.mgz`) takes the subject
  folder's name (read as BIDS entities when it has them, e.g. `sub-01_ses-2`); any other file its
  name without the extension.
  """
  path = Path(path)
  parts = split_image_name(path.name)
  stem = parts[0] if parts and parts[0] else (parts[1] if parts else path.name)
  if parts is not None and path.parent.name == "mri" and path.parent.parent.name:
    folder = path.parent.parent.name
    found = parse_entities(folder)
    # Only a folder named by sub/ses entities alone is read as BIDS (`sub-01_ses-2`); any other
    # name is the id as it is (`sub-01_long` must not collide with `sub-01`).
    if "sub" in found and set(found) <= {"sub", "ses"} and len(found) == folder.count("_") + 1:
      return f"sub-{found['sub']}", found.get("ses")
    return folder, None
  found = parse_entities(stem)
  if "sub" in found:
    ses = found.get("ses") or next((session_label(p.name) for p in path.parents
                                    if p.name.startswith("ses-")), None)
    return f"sub-{found['sub']}", ses
  if parts is not None:
    stem = path.name[: -len(next(e for e in IMAGE_EXTENSIONS if path.name.lower().endswith(e)))]
  return stem, None


def subject_id_from_path(path: str | os.PathLike) -> str:
  """The row id (`row_id`) of an image file: `sub-XX[_ses-YY]` if BIDS-named, the subject
  folder of a FreeSurfer `mri/` file, else the name without extension."""
  return row_id(*ids_from_path(path))


def _disambiguate(paths: Sequence[Path], ids: list[tuple[str, str | None]]
                  ) -> list[tuple[str, str | None]]:
  """Non-BIDS ids that collide (`a/scan.nii`, `b/scan.nii`) get their folders' names prefixed,
  the fewest levels that make them unique (`a_scan`, `b_scan`); BIDS ids are kept."""
  out = list(ids)
  groups: dict[tuple[str, str | None], list[int]] = {}
  for i, key in enumerate(ids):
    groups.setdefault(key, []).append(i)
  for key, members in groups.items():
    if len(members) < 2 or key[0].startswith("sub-"):
      continue
    folders = [[p.name for p in reversed(paths[i].resolve().parents) if p.name] for i in members]
    if paths[members[0]].parent.name == "mri":
      folders = [f[:-2] for f in folders]  # the subject folder is the id already
    for depth in range(1, max(len(f) for f in folders) + 1):
      named = ["_".join(f[-depth:] + [key[0]]) for f in folders]
      if len(set(named)) == len(named):
        for i, name in zip(members, named):
          out[i] = (name, key[1])
        break
  return out


def read_image_list(
    paths: Iterable[str | os.PathLike],
    sequence: str = "T1w",
    *,
    skip_bad: bool = False,
) -> Dataset:
  """A dataset from a plain list of image files: one row each, no age (for prediction).

  Ids come from `ids_from_path` (subject and session), made unique by `_disambiguate`; the same
  file twice, or two BIDS files of one subject and session, is a duplicated id (DataError).
  """
  sequence = canonical_sequence(sequence)
  paths = [Path(p) for p in paths]
  ids = _disambiguate(paths, [ids_from_path(p) for p in paths])
  subjects, skipped, seen = [], [], {}
  for p, (sid, ses) in zip(paths, ids):
    rid = row_id(sid, ses)
    message = None
    if not p.is_file():
      message = f"{p}: {rid}: file not found"
    elif split_image_name(p.name) is None:
      message = f"{p}: {rid}: not an image file ({', '.join(IMAGE_EXTENSIONS)})"
    elif rid in seen:
      message = f"{p}: {rid}: duplicated subject id (also {seen[rid]})"
    if message:
      if not skip_bad:
        raise DataError(message)
      skipped.append((rid, message))
      continue
    seen[rid] = p
    subjects.append(Subject(subject_id=sid, images={sequence: str(p)}, session=ses))
  if not subjects:
    raise DataError("no usable image in the list" + (f" ({skipped[0][1]})" if skipped else ""))
  return Dataset(root="", sequences=(sequence,), subjects=tuple(subjects), skipped=tuple(skipped),
                 layout="files")
