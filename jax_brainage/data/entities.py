"""BIDS file-name entities, the rule that picks one image among candidates, and JSON sidecars.

A BIDS name is `key-value` entities joined by `_`, then the suffix: `sub-01_ses-2_acq-mprage_
run-1_T1w.nii.gz` has {sub: 01, ses: 2, acq: mprage, run: 1} and suffix T1w; fMRIPrep adds
`space-` and `desc-` (`sub-01_space-MNI152NLin2009cAsym_desc-preproc_T1w.nii.gz`,
`sub-01_space-MNI152NLin2009cAsym_desc-brain_mask.nii.gz`).

The choice among several images of one subject, session and sequence (`choose`):
  1. keep the files matching every `--entities key=value` the user gave (value `none`: the
     entity is absent), strictly: none left is an error;
  2. then each of the layout's preferences (`BIDS_PREFERENCES`: no `space-`, i.e. the native
     image; `FMRIPREP_PREFERENCES`: `space-MNI152NLin2009cAsym`, `desc-preproc`, the template-space
     image the models expect) narrows the files only where at least one file has it;
  3. then the lowest `run-` (a file without `run-` counts as the first run);
  4. more than one file left is a one-line DataError naming the subject and the candidates and
     the entities that tell them apart.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from jax_brainage.errors import ConfigError, DataError

# The entities a user may not pick with --entities (they have their own options).
RESERVED = ("sub", "ses")
ABSENT = "none"  # --entities value meaning "without this entity"
BIDS_PREFERENCES: dict[str, str | None] = {"space": None}
FMRIPREP_SPACE = "MNI152NLin2009cAsym"
FMRIPREP_PREFERENCES: dict[str, str | None] = {"space": FMRIPREP_SPACE, "desc": "preproc"}
# Sidecar fields kept as covariates (per scan, from the first sequence's image).
SIDECAR_COVARIATES = ("MagneticFieldStrength", "Manufacturer", "ManufacturersModelName")
_KEY = re.compile(r"[A-Za-z][A-Za-z0-9]*")


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One image file of a subject: path, session (None: no `ses-` folder), suffix, entities."""

  path: Path
  session: str | None
  suffix: str
  entities: dict[str, str]


def parse_entities(stem: str) -> dict[str, str]:
  """`sub-01_ses-2_run-1` -> {"sub": "01", "ses": "2", "run": "1"} (parts without `-` skipped)."""
  out = {}
  for part in stem.split("_"):
    key, sep, value = part.partition("-")
    if sep and key and value:
      out[key] = value
  return out


def parse_filter(spec: str | Mapping[str, str | None] | None) -> dict[str, str | None]:
  """`"space=MNI152NLin2009cAsym,desc=preproc"` (or a mapping) -> {key: value or None (absent)}.

  Raises:
    ConfigError: an item not `key=value`, a key twice, or `sub`/`ses` (use --session).
  """
  if spec is None:
    return {}
  items = (list(spec.items()) if isinstance(spec, Mapping) else
           [item.partition("=")[::2] for item in spec.split(",") if item.strip()])
  out: dict[str, str | None] = {}
  for key, value in items:
    key, value = key.strip(), (value or "").strip() if value is not None else ABSENT
    if not _KEY.fullmatch(key) or not value:
      raise ConfigError(f"--entities {spec}: expected key=value,... (e.g. "
                        f"space={FMRIPREP_SPACE},desc=preproc; value '{ABSENT}' for absent)")
    if key in RESERVED:
      raise ConfigError(f"--entities {spec}: {key!r} is not chosen here (subjects are rows; "
                        "sessions: --session)")
    if key in out:
      raise ConfigError(f"--entities {spec}: {key!r} given twice")
    out[key] = None if value.lower() == ABSENT else value
  return out


def _matches(c: Candidate, key: str, value: str | None) -> bool:
  return c.entities.get(key) == value if value is not None else key not in c.entities


def _run(c: Candidate) -> tuple[int, str]:
  run = c.entities.get("run", "")
  return (int(run), "") if run.isdigit() else (0, run) if not run else (1 << 30, run)


def describe_filter(wanted: Mapping[str, str | None]) -> str:
  return ",".join(f"{k}={ABSENT if v is None else v}" for k, v in wanted.items())


def choose(candidates: Sequence[Candidate], required: Mapping[str, str | None],
           preferred: Mapping[str, str | None], who: str, label: str, root: Path
           ) -> Candidate | None:
  """The one image the rule in the module docstring picks; None when there is no candidate.

  Args:
    candidates: the files of one subject, session and suffix.
    required: the user's `--entities`; preferred: the layout's preferences.
    who: subject (and session) for the error; label: e.g. "T1w image"; root: names are relative.
  Raises:
    DataError: the required entities leave nothing, or several files remain.
  """
  if not candidates:
    return None
  names = lambda cs: ", ".join(sorted(_relative(c.path, root) for c in cs))  # noqa: E731
  left = [c for c in candidates if all(_matches(c, k, v) for k, v in required.items())]
  if not left:
    raise DataError(f"{who}: no {label} with --entities {describe_filter(required)} "
                    f"(candidates: {names(candidates)})")
  for key, value in preferred.items():
    if key in required:
      continue
    narrowed = [c for c in left if _matches(c, key, value)]
    left = narrowed or left
  lowest = min(_run(c) for c in left)
  left = [c for c in left if _run(c) == lowest]
  if len(left) > 1:
    differ = sorted({k for c in left for k in c.entities
                     if len({d.entities.get(k) for d in left}) > 1})
    hint = ", ".join(f"{k}=..." for k in differ) or "key=value"
    raise DataError(f"{who}: {len(left)} candidate {label}s ({names(left)}); pick one with "
                    f"--entities {hint}")
  return left[0]


def _relative(path: Path, root: Path) -> str:
  try:
    return str(path.relative_to(root))
  except ValueError:
    return str(path)


def _load_json(path: Path) -> dict[str, Any]:
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f)
  except (OSError, UnicodeDecodeError, ValueError) as e:
    raise DataError(f"{path}: cannot read JSON sidecar ({e})") from None
  if not isinstance(value, dict):
    raise DataError(f"{path}: JSON sidecar is not an object")
  return value


def read_sidecar(image: Candidate, root: Path,
                 listing: dict[Path, list[str]] | None = None) -> dict[str, Any]:
  """The image's JSON metadata after BIDS inheritance: every `*_<suffix>.json` from `root` down to
  the image's folder whose entities all agree with the image's, the deeper winning.
  `listing` caches the JSON names per folder across calls (one listing of root per dataset,
  not per image). DataError naming a sidecar that is not a JSON object."""
  listing = {} if listing is None else listing
  folders = []
  folder = image.path.parent
  while True:
    folders.append(folder)
    if folder == root or folder.parent == folder or root not in folder.parents:
      break
    folder = folder.parent
  meta: dict[str, Any] = {}
  for folder in reversed(folders):
    if folder not in listing:
      try:
        listing[folder] = sorted(p.name for p in folder.iterdir() if p.name.endswith(".json"))
      except OSError:
        listing[folder] = []
    for name in listing[folder]:
      path = folder / name
      stem = name[: -len(".json")]
      entities, _, suffix = stem.rpartition("_")
      if suffix.lower() != image.suffix.lower() and stem.lower() != image.suffix.lower():
        continue
      own = parse_entities(entities)
      if all(image.entities.get(k) == v for k, v in own.items()):
        meta.update(_load_json(path))
  return meta


def sidecar_covariates(meta: Mapping[str, Any]) -> dict[str, Any]:
  """`SIDECAR_COVARIATES` found in a sidecar: numbers as floats (MagneticFieldStrength in tesla),
  names as strings."""
  out: dict[str, Any] = {}
  for key in SIDECAR_COVARIATES:
    value = meta.get(key)
    if isinstance(value, bool) or value is None:
      continue
    if isinstance(value, (int, float)):
      out[key] = float(value)
    elif isinstance(value, str) and value.strip():
      out[key] = value.strip()
  return out
