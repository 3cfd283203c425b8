"""The simulated 3D cohort with ground truth (written by `brainage simulate`).

A cohort is defined by a `CohortConfig`; `Cohort(config).subject(i)` is a pure function of
(config, i), so subjects can be made alone, in any order, on any worker, or served straight to
training without files. `write_cohort` writes a BIDS dataset:

  dataset_description.json, participants.tsv + .json (participant_id, age, sex, diabetes,
  hypertension, smoking, bmi; never the latent brain age),
  sub-XXXX/anat/sub-XXXX_{T1w,FLAIR,swi}.nii.gz (int16, template grid, skull-stripped),
  derivatives/simulation/: dataset_description.json, config.json (written first), cohort.json
  (written last: config, oracle MAE and what it conditions on), brain_age.tsv (latent brain age,
  risk shift, effect sizes and individual nuisance per subject), atlas.nii.gz + atlas.tsv
  (11 structures with region and lobe), atlas_regions.nii.gz + .tsv (cortical / subcortical /
  cerebellum, for regional models), sub-XXXX/anat/sub-XXXX_{seq}_ageingmask.nii.gz and
  sub-XXXX_lesionmask.nii.gz (uint8).
Every file is a deterministic function of the configuration: the same bytes on any machine,
with any number of workers.
`write_cohort(..., acquisition="raw")` writes the same subjects as acquired instead (skull and
scalp, scanner pose, grid and orientation, sidecars, sessions; `simulation.acquisition`) with
their true transforms and brain masks under derivatives/simulation/.

Model (see `simulation.population` and `simulation.render` for the formulas):
  - age a ~ U(age_min, age_max), sex, risk factors with age- and sex-dependent prevalence;
  - latent brain age b = a + R + N(0, sigma_brain_age), R the risk factors' shift (years);
  - ageing driven by b: ventricle enlargement, cortical thinning (frontal more, and faster with
    R), periventricular white-matter lesions (count steep in b), iron in the lentiform nucleus;
  - nuisance that is not age: individual ventricle size and cortical thickness, head size (by
    sex), rigid misalignment, smooth deformation, bias field, intensity scale, noise; T1w, FLAIR
    and SWI contrasts from the same tissue maps;
  - ground truth: per-sequence ageing masks |image(b) - image(b_ref)| > mask_threshold x scan
    unit (same nuisance, same noise), lesion masks, b and each effect's size; the oracle MAE.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from scipy import ndimage

from jax_brainage import fileio
from jax_brainage.data.anatomy import Atlas, TemplateAnatomy, load_anatomy
from jax_brainage.data.simulation import acquisition as raw_scans
from jax_brainage.data.simulation import population, render
from jax_brainage.data.simulation.config import SEQUENCES, CohortConfig
from jax_brainage.errors import DataError

__all__ = [
    "CohortConfig", "Cohort", "SimulatedSubject", "SEQUENCES", "write_cohort", "subject_id",
]

# Streams of one subject's randomness, each from SeedSequence([seed, index, stream]); raw
# acquisitions draw from `simulation.acquisition.STREAM_ACQUISITION` (2).
STREAM_POPULATION, STREAM_NUISANCE = 0, 1
ACQUISITIONS = ("template", "raw")
# Where a written cohort keeps its ground truth, relative to the dataset root.
DERIVATIVES = Path("derivatives") / "simulation"
FORMAT_VERSION = 1


def subject_id(index: int) -> str:
  """BIDS participant label of subject `index` (0-based): 'sub-0001' for index 0."""
  return f"sub-{index + 1:04d}"


@dataclasses.dataclass(frozen=True, eq=False)
class SimulatedSubject:
  """One simulated subject. Images are float32 `[X, Y, Z]` on the template grid (RAS+, `affine`),
  integer-valued arbitrary units (stored exactly as int16); masks are bool `[X, Y, Z]`.

  Attributes:
    index: 0-based position in the cohort; subject_id: 'sub-0001' for index 0.
    age: chronological age (years); sex: 'F' or 'M'.
    risk_factors: {'diabetes', 'hypertension', 'smoking': bool, 'bmi': float (kg/m^2)}.
    brain_age: latent brain age b (years); risk_shift: R (years), what risk factors add to b.
    effects: each ageing effect's size (see `simulation.render.aged_tissue`).
    nuisance: what is not age: ventricle_size_mm (individual outward displacement),
      cortex_thinner_by (individual GM fraction, either sign), head_scale, rotation_deg,
      translation_mm, intensity_scale per sequence.
    images, reference_images: seq -> image at b, and at the reference brain age (no ageing).
    ageing_masks: seq -> |images - reference_images| > mask_thresholds[seq].
    lesion_mask: voxels at least `LESION_MASK_FRACTION` white-matter lesion.
    brain_mask: the subject's brain (images are 0 outside).
  """

  index: int
  subject_id: str
  age: float
  sex: str
  risk_factors: dict[str, Any]
  brain_age: float
  risk_shift: float
  effects: dict[str, float]
  nuisance: dict[str, Any]
  images: dict[str, np.ndarray]
  reference_images: dict[str, np.ndarray]
  affine: np.ndarray
  ageing_masks: dict[str, np.ndarray]
  mask_thresholds: dict[str, float]
  lesion_mask: np.ndarray
  brain_mask: np.ndarray

  @property
  def brain_age_gap(self) -> float:
    """b - a (years): the true gap that risk factors and noise put in."""
    return self.brain_age - self.age


def stream(seed: int, index: int, which: int) -> np.random.Generator:
  """Subject `index`'s random stream `which` (STREAM_POPULATION or STREAM_NUISANCE): a pure
  function of (seed, index, which)."""
  return np.random.default_rng(np.random.SeedSequence([seed, index, which]))


def derivatives_dir(root: str | os.PathLike) -> Path:
  """`root`/derivatives/simulation: a written cohort's ground truth (config, masks, atlas)."""
  return Path(root) / DERIVATIVES


class Cohort:
  """A simulated cohort: random access to subjects, the atlas and the oracle MAE.

  `cohort.subject(i)` depends only on (config, i): the same bytes in any process, in any order.
  """

  def __init__(self, config: CohortConfig, anatomy: TemplateAnatomy | None = None):
    config.validate()
    self.config = config
    self._anatomy = anatomy

  def __len__(self) -> int:
    return self.config.n

  def __getitem__(self, index: int) -> SimulatedSubject:
    return self.subject(index)

  def __iter__(self) -> Iterator[SimulatedSubject]:
    return (self.subject(i) for i in range(len(self)))

  @property
  def anatomy(self) -> TemplateAnatomy:
    if self._anatomy is None:
      self._anatomy = load_anatomy(self.config.resolution_mm)
    return self._anatomy

  @property
  def atlas(self) -> Atlas:
    """Region atlas on the template grid (label image `[X, Y, Z]` + table)."""
    return self.anatomy.atlas

  @property
  def affine(self) -> np.ndarray:
    return self.anatomy.affine.copy()

  def volume(self, index: int) -> np.ndarray:
    """Images of subject `index` stacked as channels in `config.sequences` order: float32
    `[X, Y, Z, C]`, no ground truth computed (for serving straight to training)."""
    s = self.subject(index, ground_truth=False)
    return np.stack([s.images[q] for q in self.config.sequences], axis=-1)

  def participants(self, index: int) -> population.Participants:
    """Latent and observed variables of subject `index` (arrays of length 1); cheap, no images."""
    self._check_index(index)
    return population.sample_participants(
        self.config, 1, stream(self.config.seed, index, STREAM_POPULATION)
    )

  def latent_table(self) -> dict[str, np.ndarray]:
    """All subjects' latent variables without rendering: {'age', 'brain_age', ...} `[n]`."""
    rows = [self.participants(i) for i in range(len(self))]
    return {
        f.name: np.concatenate([getattr(p, f.name) for p in rows])
        for f in dataclasses.fields(population.Participants)
    }

  def nuisance(self, index: int) -> render.Nuisance:
    """What subject `index` has that is not age (pose, head size, individual anatomy...)."""
    p = self.participants(index)
    return render.draw_nuisance(self.config, self.anatomy, bool(p.male[0]),
                                stream(self.config.seed, index, STREAM_NUISANCE))

  def _check_index(self, index: int) -> None:
    if not isinstance(index, (int, np.integer)) or not 0 <= index < self.config.n:
      raise DataError(f"subject index {index!r} out of range for a cohort of {self.config.n}")

  def subject(
      self, index: int, brain_age: float | None = None, ground_truth: bool = True
  ) -> SimulatedSubject:
    """Subject `index`; `brain_age` (years) renders the same person at another latent brain age
    (a counterfactual: same nuisance, lesions nested) without changing its demographics.
    `ground_truth=False` leaves reference images and ageing masks empty (faster; the images,
    lesion mask and everything else are the same)."""
    p = self.participants(index)
    male = bool(p.male[0])
    anatomy = self.anatomy
    nuisance = self.nuisance(index)
    b = float(p.brain_age[0]) if brain_age is None else float(brain_age)
    out = render.render(self.config, anatomy, b, float(p.risk_shift[0]), nuisance, ground_truth)
    return SimulatedSubject(
        index=int(index),
        subject_id=subject_id(int(index)),
        age=float(p.age[0]),
        sex="M" if male else "F",
        risk_factors={
            "diabetes": bool(p.diabetes[0]),
            "hypertension": bool(p.hypertension[0]),
            "smoking": bool(p.smoking[0]),
            "bmi": float(p.bmi[0]),
        },
        brain_age=b,
        risk_shift=float(p.risk_shift[0]),
        effects=out.effects,
        nuisance={
            "ventricle_size_mm": nuisance.ventricle_base_mm,
            "cortex_thinner_by": nuisance.cortex_base,
            "head_scale": nuisance.head_scale,
            "rotation_deg": [float(v) for v in nuisance.rotation_deg],
            "translation_mm": [float(v) for v in nuisance.translation_mm],
            "intensity_scale": {s: nuisance.intensity_scale[s] for s in self.config.sequences},
        },
        images=out.images,
        reference_images=out.reference_images,
        affine=self.affine,
        ageing_masks=out.ageing_masks,
        mask_thresholds=out.mask_thresholds,
        lesion_mask=out.lesion_mask,
        brain_mask=out.brain_mask,
    )

  def subject_labels(self, index: int) -> np.ndarray:
    """The cohort atlas's labels on subject `index`'s own anatomy: int16 `[X, Y, Z]` on the
    subject's image grid (0 outside its brain).

    A subject is rendered by pulling template tissue through its warp (rotation, head size,
    smooth deformation) and through the ventricles' outward displacement at its brain age; the
    same pull applied to the atlas (nearest neighbour) labels the subject's structures.
    """
    config, anatomy = self.config, self.anatomy
    subject = self.subject(index, ground_truth=False)  # its effects, as rendered
    nuisance = self.nuisance(index)
    coords = render.template_coordinates(config, anatomy, nuisance).reshape(3, -1)
    r = float(anatomy.resolution_mm)
    brain = ndimage.map_coordinates(anatomy.brain, coords, order=1, mode="constant", cval=0.0,
                                    prefilter=False) >= 0.5
    shift = nuisance.ventricle_base_mm + subject.effects["ventricle_expansion_mm"]
    if shift != 0.0:
      disp = np.stack([ndimage.map_coordinates(anatomy.ventricle_field[a], coords, order=1,
                                               mode="constant", cval=0.0, prefilter=False)
                       for a in range(3)])
      coords = coords - (shift / r) * disp
    labels = ndimage.map_coordinates(anatomy.atlas.labels, coords, order=0, mode="constant",
                                     cval=0)
    labels = np.where(brain, labels, 0).astype(np.int16)
    return labels.reshape(anatomy.shape)

  def __getstate__(self):
    # Pickled to data-loader workers: send the config only; a worker reloads the anatomy (from
    # the in-process or on-disk cache) on first use.
    return {"config": self.config, "_anatomy": None}

  def oracle_mae(self, condition_on: str = "latent") -> float:
    """MAE (years) of the best possible predictor of age; see `simulation.population`.

    "latent" conditions on (b, sex, diabetes, hypertension, smoking, BMI): a floor for any model
    of images + participants.tsv. "brain_age" conditions on b alone. Cached per population model.
    """
    return population.oracle_mae(self.config, condition_on)


# ------------------------------------------------------------------------------------------------
# Writing a BIDS dataset.
# ------------------------------------------------------------------------------------------------

_PARTICIPANT_COLUMNS = (
    "participant_id", "age", "sex", "diabetes", "hypertension", "smoking", "bmi",
)
_EFFECT_COLUMNS = (
    "ventricle_expansion_mm", "cortical_thinning", "frontal_thinning", "frontal_risk_thinning",
    "lesion_count", "lesion_volume_ml", "iron_darkening",
)


def _nifti(data: np.ndarray, affine: np.ndarray, code: int):
  import nibabel as nib

  img = nib.Nifti1Image(data, affine)
  img.header.set_xyzt_units("mm")
  img.set_qform(affine, code=code)
  img.set_sform(affine, code=code)
  return img


def _write_subject(out_dir: Path, subject: SimulatedSubject, config: CohortConfig,
                   images: bool = True) -> None:
  sid = subject.subject_id
  anat = out_dir / sid / "anat"
  deriv = out_dir / DERIVATIVES / sid / "anat"
  for seq in config.sequences:
    if images:
      fileio.save_nifti(
          _nifti(subject.images[seq].astype(np.int16), subject.affine, code=1),
          anat / f"{sid}_{seq}.nii.gz",
      )
    fileio.save_nifti(
        _nifti(subject.ageing_masks[seq].astype(np.uint8), subject.affine, code=1),
        deriv / f"{sid}_{seq}_ageingmask.nii.gz",
    )
  fileio.save_nifti(
      _nifti(subject.lesion_mask.astype(np.uint8), subject.affine, code=1),
      deriv / f"{sid}_lesionmask.nii.gz",
  )


def _subject_row(s: SimulatedSubject) -> dict[str, Any]:
  return {
      "participant_id": s.subject_id,
      "age": s.age,
      "sex": s.sex,
      **{k: s.risk_factors[k] for k in ("diabetes", "hypertension", "smoking", "bmi")},
      "brain_age": s.brain_age,
      "risk_shift": s.risk_shift,
      **{k: s.effects[k] for k in _EFFECT_COLUMNS},
      "head_scale": s.nuisance["head_scale"],
      "ventricle_size_mm": s.nuisance["ventricle_size_mm"],
      "cortex_thinner_by": s.nuisance["cortex_thinner_by"],
  }


# Worker state: one Cohort per worker process, made once by the pool initializer.
_WORKER: dict[str, Any] = {}


def _init_worker(config_dict: dict[str, Any], anatomy: TemplateAnatomy, out_dir: str,
                 acquired: dict[str, Any] | None = None) -> None:
  config = CohortConfig.from_dict(config_dict)
  _WORKER.update(cohort=Cohort(config, anatomy), out_dir=Path(out_dir), acquired=acquired)


def _work(index: int) -> dict[str, Any]:
  cohort = _WORKER["cohort"]
  subject = cohort.subject(index)
  acquired = _WORKER.get("acquired")
  _write_subject(_WORKER["out_dir"], subject, cohort.config, images=not acquired)
  if acquired:  # raw scans instead of the template-space images (ground truth stays as it is)
    out_dir = _WORKER["out_dir"]
    raw_scans.write_raw_subject(
        out_dir, out_dir / DERIVATIVES, subject.subject_id, subject.images, subject.brain_mask,
        cohort.config, cohort.anatomy, cohort.nuisance(index), index, acquired["sessions"],
        subject.age)
  return _subject_row(subject)


def _fmt(v: Any) -> str:
  if isinstance(v, (bool, np.bool_)):
    return str(int(v))
  if isinstance(v, float):
    return f"{v:.4f}"
  return str(v)


def _tsv(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
  lines = ["\t".join(columns)]
  lines += ["\t".join(_fmt(row[c]) for c in columns) for row in rows]
  return "\n".join(lines) + "\n"


def _check_out_dir(out_dir: Path, config: CohortConfig, acquired: dict[str, Any] | None = None
                   ) -> None:
  """An output directory must be new, empty, or hold a (possibly interrupted) run of this exact
  configuration, recognised by derivatives/simulation/config.json (written first)."""
  if out_dir.exists() and not out_dir.is_dir():
    raise DataError(f"--out {out_dir} exists and is not a directory")
  if not out_dir.exists() or not any(out_dir.iterdir()):
    return
  config_json = out_dir / DERIVATIVES / "config.json"
  try:
    previous = json.loads(config_json.read_text())
  except (OSError, ValueError):
    raise DataError(
        f"--out {out_dir} is not empty and holds no simulated cohort ({config_json} missing); "
        "choose a new directory"
    ) from None
  acquisition_json = out_dir / DERIVATIVES / "acquisition.json"
  previous_acquired = (json.loads(acquisition_json.read_text()) if acquisition_json.exists()
                       else None)
  if (previous != json.loads(json.dumps(config.to_dict()))
      or previous_acquired != (acquired or None)):
    raise DataError(
        f"--out {out_dir} holds a simulated cohort with another configuration ({config_json}); "
        "choose a new directory"
    )


def write_cohort(
    out_dir: str | os.PathLike, config: CohortConfig, workers: int | None = None,
    progress: bool = False, acquisition: str = "template", sessions: int = 1,
) -> Path:
  """Writes the BIDS dataset of `config` to `out_dir` with `workers` processes; returns its path.

  Every file is written atomically; derivatives/simulation/config.json first, cohort.json last.
  A directory with this configuration and a cohort.json is complete and is returned as it is;
  an interrupted run of it (no cohort.json) is written again. Anything else is refused.

  `acquisition="raw"` writes scans as acquired instead (`simulation.acquisition`: head, pose,
  scanner grid and orientation, sidecars; `sessions` > 1 rescans in ses-1..ses-N, same day)
  with their true transforms and brain masks under derivatives/simulation/ and
  derivatives/simulation/acquisition.json; the ground-truth masks stay on the template grid.
  """
  config.validate()
  if acquisition not in ACQUISITIONS:
    raise DataError(f"--acquisition {acquisition!r}: choose {' or '.join(ACQUISITIONS)}")
  if int(sessions) < 1 or (sessions > 1 and acquisition != "raw"):
    raise DataError(f"--sessions {sessions}: at least 1, and more only with --acquisition raw")
  acquired = ({"acquisition": "raw", "sessions": int(sessions),
               "stream": raw_scans.STREAM_ACQUISITION}
              if acquisition == "raw" else None)
  out_dir = Path(out_dir)
  _check_out_dir(out_dir, config, acquired)
  if (out_dir / DERIVATIVES / "cohort.json").exists():
    return out_dir  # complete, same configuration (checked above)
  fileio.write_json(out_dir / DERIVATIVES / "config.json", config.to_dict())
  if acquired:
    fileio.write_json(out_dir / DERIVATIVES / "acquisition.json", acquired)
  workers = max(1, min(workers or os.cpu_count() or 1, config.n))
  anatomy = load_anatomy(config.resolution_mm)
  cohort = Cohort(config, anatomy)
  oracle = {c: cohort.oracle_mae(c) for c in ("latent", "brain_age")}

  indices = range(config.n)
  if workers == 1:
    _init_worker(config.to_dict(), anatomy, str(out_dir), acquired)
    rows = map(_work, indices)
    pool = None
  else:
    # spawn: safe with JAX or threads in the parent; workers get the anatomy once, pickled.
    pool = concurrent.futures.ProcessPoolExecutor(
        max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker, initargs=(config.to_dict(), anatomy, str(out_dir), acquired),
    )
    rows = pool.map(_work, indices, chunksize=max(1, min(8, config.n // (4 * workers))))
  try:
    if progress:
      from tqdm import tqdm

      rows = tqdm(rows, total=config.n, desc="simulate", unit="subject", file=sys.stderr)
    rows = list(rows)
  finally:
    if pool is not None:
      pool.shutdown(cancel_futures=True)

  deriv = out_dir / DERIVATIVES
  fileio.save_nifti(_nifti(cohort.atlas.labels, anatomy.affine, code=4), deriv / "atlas.nii.gz")
  fileio.write_text(deriv / "atlas.tsv", cohort.atlas.table_tsv())
  fileio.save_nifti(
      _nifti(cohort.atlas.region_labels(), anatomy.affine, code=4), deriv / "atlas_regions.nii.gz"
  )
  fileio.write_text(deriv / "atlas_regions.tsv", cohort.atlas.region_table_tsv())
  fileio.write_text(out_dir / "participants.tsv", _tsv(rows, _PARTICIPANT_COLUMNS))
  fileio.write_json(out_dir / "participants.json", _PARTICIPANTS_SIDECAR)
  latent_cols = ("participant_id", "age", "brain_age", "risk_shift", *_EFFECT_COLUMNS,
                 "head_scale", "ventricle_size_mm", "cortex_thinner_by")
  fileio.write_text(deriv / "brain_age.tsv", _tsv(rows, latent_cols))
  fileio.write_json(deriv / "dataset_description.json", {
      "Name": "jax-brainage simulation ground truth",
      "BIDSVersion": "1.9.0",
      "DatasetType": "derivative",
      "GeneratedBy": [{"Name": "jax-brainage", "Description": "brainage simulate"}],
  })
  fileio.write_json(deriv / "cohort.json", {
      "format_version": FORMAT_VERSION,
      "config": config.to_dict(),
      "oracle_mae": oracle["latent"],
      "oracle_mae_conditions_on": [
          "brain_age", "sex", "diabetes", "hypertension", "smoking", "bmi",
      ],
      "oracle_mae_brain_age_only": oracle["brain_age"],
      "reference_brain_age": config.brain_age_reference,
      "mask_threshold": config.mask_threshold,
      "lesion_mask_fraction": render.LESION_MASK_FRACTION,
      "affine": anatomy.affine.tolist(),
      "shape": list(anatomy.shape),
  })
  fileio.write_json(out_dir / "dataset_description.json", {
      "Name": f"jax-brainage simulated cohort (seed {config.seed}, n {config.n}, "
              f"{config.resolution_mm} mm)",
      "BIDSVersion": "1.9.0",
      "DatasetType": "raw",
      "GeneratedBy": [{"Name": "jax-brainage", "Description": "brainage simulate"}],
  })
  return out_dir


_PARTICIPANTS_SIDECAR = {
    "age": {"Description": "chronological age", "Units": "years"},
    "sex": {"Description": "sex", "Levels": {"F": "female", "M": "male"}},
    "diabetes": {"Description": "diabetes", "Levels": {"0": "no", "1": "yes"}},
    "hypertension": {"Description": "hypertension", "Levels": {"0": "no", "1": "yes"}},
    "smoking": {"Description": "current smoker", "Levels": {"0": "no", "1": "yes"}},
    "bmi": {"Description": "body-mass index", "Units": "kg/m^2"},
}
