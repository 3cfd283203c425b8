"""FreeSurfer and FastSurfer SUBJECTS_DIRs: one row per subject folder, its T1 image and mask.

    SUBJECTS_DIR/<subject>/mri/brain.finalsurfs.mgz   FreeSurfer recon-all (the study's input:
                                                       skull-stripped, intensity-normalised)
                          /mri/brainmask.mgz           skull-stripped T1 (the brain mask)
                          /mri/T1.mgz, orig.mgz        whole head
    SUBJECTS_DIR/<subject>/mri/orig_nu.mgz             FastSurfer: bias-corrected whole head
                          /mri/mask.mgz                FastSurfer's brain mask
                          /mri/aparc.DKTatlas+aseg.deep.mgz   (tells FastSurfer apart)

The image of a subject is the first of `IMAGES` its `mri/` holds (so a FastSurfer run with the
surface pipeline gives brain.finalsurfs.mgz as FreeSurfer does, a segmentation-only run
orig_nu.mgz); its brain mask the first of `MASKS` that is not the image itself. Ids are the
subject folders' names (unique by construction; `sub-01_ses-2` folders are read as BIDS subject
and session). `fsaverage*` and hidden folders are skipped. FreeSurfer keeps no ages: they come
from a participants-like TSV (`--participants FILE`: participant_id, age, sex, covariates, and
optionally session_id), or SUBJECTS_DIR/participants.tsv; the table is a look-up (rows without
a folder are ignored). Only T1w exists in these layouts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from jax_brainage.data import bids
from jax_brainage.errors import ConfigError, DataError

IMAGES = ("brain.finalsurfs.mgz", "brainmask.mgz", "orig_nu.mgz", "T1.mgz", "orig.mgz")
MASKS = ("brainmask.mgz", "mask.mgz")
FASTSURFER_MARKERS = ("aparc.DKTatlas+aseg.deep.mgz", "aseg.auto_noCCseg.mgz", "orig_nu.mgz")


def subject_folders(root: str | os.PathLike) -> list[Path]:
  """Subject folders of a SUBJECTS_DIR (those whose `mri/` holds one of `IMAGES`), sorted."""
  root = Path(root)
  if not root.is_dir():
    return []
  return [d for d in sorted(root.iterdir())
          if d.is_dir() and not d.name.startswith(".") and not d.name.startswith("fsaverage")
          and any((d / "mri" / name).is_file() for name in IMAGES)]


def detect(root: str | os.PathLike) -> str | None:
  """"fastsurfer", "freesurfer", or None when `root` is no SUBJECTS_DIR."""
  folders = subject_folders(root)
  if not folders:
    return None
  fast = any((d / "mri" / m).is_file() for d in folders for m in FASTSURFER_MARKERS)
  return "fastsurfer" if fast else "freesurfer"


def read_subjects_dir(
    root: str | os.PathLike,
    sequences: str | Sequence[str] = ("T1w",),
    *,
    participants: str | os.PathLike | None = None,
    session: str | None = None,
    require_age: bool = True,
    skip_bad: bool = False,
    age_range: str | Sequence[float] | None = None,
) -> bids.Dataset:
  """Reads a FreeSurfer/FastSurfer SUBJECTS_DIR (see the module docstring).

  Args:
    root: the SUBJECTS_DIR.
    sequences: must be T1w alone.
    participants: the ages' TSV (default root/participants.tsv when present).
    session: only folders of this session (`<sub>_ses-<session>`).
    require_age: every row needs an age (training); False for prediction.
    skip_bad: report and leave out rows with a problem instead of raising.
    age_range: plausible ages (years), as `bids.read_bids`.

  Raises:
    ConfigError: a sequence other than T1w.
    DataError: no subject folder; no table when ages are required; (unless `skip_bad`) a
      folder without a row or with a bad age.
  """
  sequences = bids.parse_sequences(sequences)
  if sequences != ("T1w",):
    raise ConfigError(f"{root}: a FreeSurfer/FastSurfer SUBJECTS_DIR gives T1w only, not "
                      f"{','.join(sequences)}")
  age_range = bids.parse_age_range(age_range)
  root = Path(root)
  layout = detect(root)
  if layout is None:
    raise DataError(f"{root}: no subject folder with mri/{IMAGES[0]} (or "
                    f"{', '.join(IMAGES[1:])})")
  table = Path(participants) if participants is not None else root / "participants.tsv"
  header: list[str] = ["participant_id"]
  rows: dict[tuple[str, str | None], Any] = {}
  if table.is_file():
    header, table_rows = bids.read_participants(table)
    has_session = "session_id" in header
    for row in table_rows:
      raw = row.values["session_id"] if has_session else ""
      key = (row.subject_id, None if raw.lower() in bids.MISSING else bids.session_label(raw))
      if key in rows:
        raise DataError(f"{table}: line {row.line}: {row.subject_id}: duplicated row (first on "
                        f"line {rows[key].line})")
      rows[key] = row
  elif require_age:
    raise DataError(f"{table}: participants table not found (FreeSurfer keeps no ages: pass "
                    "--participants FILE with participant_id and age)")
  age_col, sex_col, covariate_cols = bids.table_columns(header)
  if require_age and age_col is None:
    raise DataError(f"{table}: no 'age' column (columns: {', '.join(header)})")

  subjects, skipped = [], []
  for folder in subject_folders(root):
    mri = folder / "mri"
    image = next(mri / name for name in IMAGES if (mri / name).is_file())
    sid, ses = bids.ids_from_path(image)
    if session is not None and ses != bids.session_label(session):
      continue
    mask = next((mri / name for name in MASKS if name != image.name and (mri / name).is_file()),
                None)
    norm = bids.normalise_id(sid)
    row = rows.get((norm, ses)) or rows.get((norm, None))
    age, why, sex, covariates = None, None, None, {}
    if row is None:
      if require_age:
        why = f"{folder}: {sid}: no row in {table}"
    else:
      sex, covariates = bids.row_attributes(row.values, sex_col, covariate_cols)
      age, why = bids.check_age(row.values[age_col] if age_col else None,
                                f"{table}: line {row.line}: {sid}", require=require_age,
                                age_range=age_range)
    if why:
      if not skip_bad:
        raise DataError(why)
      skipped.append((sid, why))
      continue
    subjects.append(bids.Subject(subject_id=sid, images={"T1w": str(image)}, age=age, sex=sex,
                                 covariates=covariates, session=ses,
                                 mask=str(mask) if mask else None))
  if not subjects:
    detail = f" ({len(skipped)} skipped: {skipped[0][1]} ...)" if skipped else ""
    raise DataError(f"{root}: no usable subject folder{detail}")
  return bids.Dataset(root=str(root), sequences=sequences, subjects=tuple(subjects),
                      skipped=tuple(skipped), layout=layout)
