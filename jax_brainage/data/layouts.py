"""Which layout `--data` is, and the one reader every command uses for it.

    detect(path)  ->  "bids"        sub-*/[ses-*/]anat/ images (participants.tsv)
                      "fmriprep"    fMRIPrep derivatives (dataset_description.json or the
                                    `*_desc-preproc_T1w` names): the MNI image and its brain mask
                      "freesurfer"  SUBJECTS_DIR/<subject>/mri/brain.finalsurfs.mgz ...
                      "fastsurfer"  SUBJECTS_DIR/<subject>/mri/orig_nu.mgz, mask.mgz ...
    a list of image files (or one file): "files", one row each, no age.

`read_dataset` dispatches to `bids.read_bids`, `freesurfer.read_subjects_dir` or
`bids.read_image_list`; the returned `Dataset.layout` says which.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

from jax_brainage.data import bids, freesurfer
from jax_brainage.errors import ConfigError, DataError

LAYOUTS = ("bids", "fmriprep", "freesurfer", "fastsurfer", "files")


def detect(data: Sequence[str | os.PathLike]) -> str:
  """The layout of `--data` (one directory, or image files); DataError for a missing directory.
  A directory of no known layout reads as BIDS (whose errors name participants.tsv)."""
  data = [Path(d) for d in data]
  if len(data) != 1 or bids.split_image_name(data[0].name) is not None:
    return "files"
  root = data[0]
  if not root.is_dir():
    raise DataError(f"{root}: dataset directory not found")
  if any(root.glob("sub-*/anat")) or any(root.glob("sub-*/ses-*/anat")):
    return "fmriprep" if bids.is_fmriprep(root) else "bids"
  layout = freesurfer.detect(root)
  if layout is not None:
    return layout
  return "bids"  # Anything else: the BIDS reader's errors say what is missing.


def read_dataset(
    data: Sequence[str | os.PathLike],
    sequences: str | Sequence[str] = ("T1w",),
    *,
    require_age: bool = True,
    session: str | None = None,
    entities: str | Mapping[str, str | None] | None = None,
    participants: str | os.PathLike | None = None,
    mask_suffix: str | None = None,
    skip_bad: bool = False,
    age_range: str | Sequence[float] | None = None,
) -> bids.Dataset:
  """Rows of `--data` in whichever layout it is (see the module docstring).

  Args:
    data: one dataset directory, or image files.
    sequences: the channels, e.g. "T1w,FLAIR" (one for files and SUBJECTS_DIRs).
    require_age: every row needs an age (training, `prepare`); False for prediction.
    session, entities, participants, mask_suffix, skip_bad, age_range: as `bids.read_bids`
      (entities and mask_suffix are for BIDS/fMRIPrep; participants for all but files).

  Raises:
    ConfigError: an option that the layout cannot use, unknown sequences.
    DataError: as the layout's reader.
  """
  layout = detect(data)
  sequences = bids.parse_sequences(sequences)
  if layout == "files":
    if len(sequences) != 1:
      raise ConfigError(f"a list of image files gives one sequence, not {len(sequences)} "
                        f"({','.join(sequences)}); pass a dataset directory")
    return bids.read_image_list(data, sequences[0], skip_bad=skip_bad)
  root = Path(data[0])
  if layout in ("freesurfer", "fastsurfer"):
    if entities or mask_suffix:
      raise ConfigError(f"{root}: --entities and --mask-suffix are for BIDS/fMRIPrep datasets; "
                        f"a {layout} SUBJECTS_DIR uses mri/{freesurfer.IMAGES[0]} (see README)")
    return freesurfer.read_subjects_dir(root, sequences, participants=participants,
                                        session=session, require_age=require_age,
                                        skip_bad=skip_bad, age_range=age_range)
  return bids.read_bids(root, sequences, session=session, require_age=require_age,
                        mask_suffix=mask_suffix, skip_bad=skip_bad, age_range=age_range,
                        entities=entities, participants=participants,
                        fmriprep=layout == "fmriprep")
