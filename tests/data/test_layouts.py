"""Dataset layouts (issue 20): BIDS with sessions, runs and acquisitions, sidecars; fMRIPrep
derivatives; FreeSurfer and FastSurfer SUBJECTS_DIRs. Each is built here from small volumes
(nibabel; .mgz via MGHImage) and every id, session, age and chosen file is checked against
what was built."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from jax_brainage.cli import main as cli
from jax_brainage.data import bids, freesurfer, layouts, preprocess
from jax_brainage.data import cache as cache_lib
from jax_brainage.data import splits as splits_lib
from jax_brainage.errors import ConfigError, DataError

MNI = "MNI152NLin2009cAsym"
AFFINE_4MM = np.diag([4.0, 4.0, 4.0, 1.0])


def _volume(seed: int = 0, shape=(12, 12, 12), skull: bool = False) -> np.ndarray:
  """A bright random 'brain' box in a zero background (a dim shell around it with `skull`)."""
  rng = np.random.default_rng(seed)
  data = np.zeros(shape, np.float32)
  data[3:-3, 3:-3, 3:-3] = rng.uniform(100, 200, tuple(s - 6 for s in shape))
  if skull:
    data[1:-1, 1:-1, 1:-1] += np.where(data[1:-1, 1:-1, 1:-1] == 0, 60.0, 0.0)
  return data


def _save(path: Path, data: np.ndarray | None = None, seed: int = 0) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  data = _volume(seed) if data is None else data
  if path.name.endswith(".mgz"):
    nib.save(nib.MGHImage(data, AFFINE_4MM), path)
  else:
    nib.save(nib.Nifti1Image(data, AFFINE_4MM), path)
  return path


def _tsv(path: Path, header: str, *rows: str) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("\n".join((header,) + rows) + "\n")
  return path


def _one_line_error(exc, fn, *args, names=(), **kw) -> str:
  with pytest.raises(exc) as e:
    fn(*args, **kw)
  message = str(e.value)
  assert "\n" not in message, message
  for name in names:
    assert str(name) in message, (name, message)
  return message


def _rows(ds) -> list[tuple]:
  return [(s.subject_id, s.session, s.age) for s in ds.subjects]


# ---------------------------------------------------------------------------------------------
# BIDS: sessions, runs, acquisitions, sidecars


def sessions_dataset(root: Path, subjects: int = 3) -> dict[tuple[str, str | None], float]:
  """sub-01: ses-1/ses-2 with ages in its sessions.tsv; sub-02: ses-1 only, age from
  participants.tsv; sub-03 (and more): no sessions. Returns the true (id, session) -> age."""
  truth = {("sub-01", "1"): 40.5, ("sub-01", "2"): 43.25, ("sub-02", "1"): 61.0}
  for ses in ("1", "2"):
    _save(root / "sub-01" / f"ses-{ses}" / "anat" / f"sub-01_ses-{ses}_T1w.nii.gz", seed=int(ses))
  _tsv(root / "sub-01" / "sub-01_sessions.tsv", "session_id\tage\tacq_time",
       "ses-1\t40.5\t2020-01-01", "ses-2\t43.25\t2022-10-01")
  _save(root / "sub-02" / "ses-1" / "anat" / "sub-02_ses-1_T1w.nii.gz", seed=3)
  rows = ["sub-01\t39\tF", "sub-02\t61\tM"]
  for i in range(3, subjects + 1):
    sid = f"sub-{i:02d}"
    _save(root / sid / "anat" / f"{sid}_T1w.nii.gz", seed=10 + i)
    truth[(sid, None)] = 20.0 + 3 * i
    rows.append(f"{sid}\t{20 + 3 * i}\t{'F' if i % 2 else 'M'}")
  _tsv(root / "participants.tsv", "participant_id\tage\tsex", *rows)
  return truth


def test_every_session_is_a_row_with_its_own_age(tmp_path):
  root = tmp_path / "ds"
  truth = sessions_dataset(root)
  ds = bids.read_bids(root, "T1w")
  assert ds.layout == "bids"
  assert _rows(ds) == [(sid, ses, age) for (sid, ses), age in truth.items()]
  for s in ds.subjects:
    name = f"{s.subject_id}" + (f"_ses-{s.session}" if s.session else "") + "_T1w.nii.gz"
    assert Path(s.images["T1w"]).name == name
  assert len({bids.row_id(s.subject_id, s.session) for s in ds.subjects}) == len(ds)
  # --session picks one; subjects without it are reported (skip mode) or refused.
  _one_line_error(DataError, bids.read_bids, root, "T1w", session="2",
                  names=("sub-02", "ses-2", "no T1w image"))
  ds = bids.read_bids(root, "T1w", session="ses-2", skip_bad=True)
  assert _rows(ds) == [("sub-01", "2", 43.25)]
  assert [sid for sid, _ in ds.skipped] == ["sub-02", "sub-03"]
  # A bad age in sessions.tsv names that file and line.
  _tsv(root / "sub-01" / "sub-01_sessions.tsv", "session_id\tage", "ses-1\t40.5", "ses-2\t430")
  _one_line_error(DataError, bids.read_bids, root, "T1w",
                  names=("sub-01_sessions.tsv", "line 3", "ses-2", "implausible age"))


def test_runs_acquisitions_and_spaces(tmp_path):
  root = tmp_path / "ds"
  anat = {sid: root / sid / "anat" for sid in ("sub-01", "sub-02", "sub-03")}
  run1 = _save(anat["sub-01"] / "sub-01_run-1_T1w.nii.gz")
  _save(anat["sub-01"] / "sub-01_run-2_T1w.nii.gz")
  mprage = _save(anat["sub-02"] / "sub-02_acq-mprage_T1w.nii.gz")
  space = _save(anat["sub-02"] / "sub-02_acq-space_T1w.nii.gz")
  native = _save(anat["sub-03"] / "sub-03_T1w.nii.gz")
  mni = _save(anat["sub-03"] / f"sub-03_space-{MNI}_T1w.nii.gz")
  _tsv(root / "participants.tsv", "participant_id\tage", "sub-01\t30", "sub-02\t40", "sub-03\t50")
  # Two acquisitions: the one-line error names the subject, both files and the entity.
  _one_line_error(DataError, bids.read_bids, root, "T1w",
                  names=("sub-02", mprage.name, space.name, "--entities acq="))
  ds = bids.read_bids(root, "T1w", entities="acq=space", skip_bad=True)
  # acq=space is required of every row: sub-01 and sub-03 have no such file.
  assert [s.images["T1w"] for s in ds.subjects] == [str(space)]
  ds = bids.read_bids(root, "T1w", skip_bad=True)
  chosen = {s.subject_id: s.images["T1w"] for s in ds.subjects}
  assert chosen == {"sub-01": str(run1), "sub-03": str(native)}  # lowest run; native space
  ds = bids.read_bids(root, "T1w", entities=f"space={MNI}", skip_bad=True)
  assert {s.subject_id: s.images["T1w"] for s in ds.subjects} == {"sub-03": str(mni)}
  ds = bids.read_bids(root, "T1w", entities="acq=mprage,run=none", skip_bad=True)
  assert [s.images["T1w"] for s in ds.subjects] == [str(mprage)]
  for bad in ("acq", "ses=1", "acq=a,acq=b"):
    _one_line_error(ConfigError, bids.read_bids, root, "T1w", entities=bad, names=(bad,))


def test_sidecars_become_covariates(tmp_path):
  root = tmp_path / "ds"
  for i in (1, 2, 3):
    _save(root / f"sub-0{i}" / "anat" / f"sub-0{i}_T1w.nii.gz")
  # BIDS inheritance: the top-level T1w.json holds for all, sub-02's own sidecar wins.
  (root / "T1w.json").write_text(json.dumps(
      {"MagneticFieldStrength": 3, "Manufacturer": "Siemens", "RepetitionTime": 2.3}))
  (root / "sub-02" / "anat" / "sub-02_T1w.json").write_text(json.dumps(
      {"MagneticFieldStrength": 1.5, "Manufacturer": "GE", "ManufacturersModelName": "Signa"}))
  _tsv(root / "participants.tsv", "participant_id\tage\tsite",
       "sub-01\t30\tA", "sub-02\t40\tB", "sub-03\t50\tA")
  ds = bids.read_bids(root, "T1w")
  got = [s.covariates for s in ds.subjects]
  assert got == [
      {"site": "A", "MagneticFieldStrength": 3.0, "Manufacturer": "Siemens",
       "ManufacturersModelName": None},
      {"site": "B", "MagneticFieldStrength": 1.5, "Manufacturer": "GE",
       "ManufacturersModelName": "Signa"},
      {"site": "A", "MagneticFieldStrength": 3.0, "Manufacturer": "Siemens",
       "ManufacturersModelName": None}]
  (root / "sub-03" / "anat" / "sub-03_T1w.json").write_text("{not json")
  _one_line_error(DataError, bids.read_bids, root, "T1w", names=("sub-03_T1w.json", "JSON"))


# ---------------------------------------------------------------------------------------------
# fMRIPrep


def fmriprep_dataset(root: Path, describe: bool = True) -> dict[str, tuple[Path, Path]]:
  """fMRIPrep-like anat outputs for sub-01 (no session) and sub-02 (ses-1); returns the true
  MNI (image, mask) per row id."""
  truth = {}
  for sid, ses in (("sub-01", None), ("sub-02", "1")):
    anat = root / sid / (f"ses-{ses}" if ses else "") / "anat"
    prefix = sid + (f"_ses-{ses}" if ses else "")
    _save(anat / f"{prefix}_desc-preproc_T1w.nii.gz", _volume(1, skull=True))
    _save(anat / f"{prefix}_desc-brain_mask.nii.gz", (_volume(1) > 0).astype(np.float32))
    image = _save(anat / f"{prefix}_space-{MNI}_desc-preproc_T1w.nii.gz", _volume(2, skull=True))
    mask = _save(anat / f"{prefix}_space-{MNI}_desc-brain_mask.nii.gz",
                 (_volume(2) > 0).astype(np.float32))
    _save(anat / f"{prefix}_space-{MNI}_dseg.nii.gz")
    _save(anat / f"{prefix}_space-{MNI}_label-GM_probseg.nii.gz")
    (anat / f"{prefix}_from-T1w_to-{MNI}_mode-image_xfm.h5").write_bytes(b"")
    truth[bids.row_id(sid, ses)] = (image, mask)
  if describe:
    (root / "dataset_description.json").write_text(json.dumps(
        {"Name": "fMRIPrep - fMRI PREProcessing workflow", "DatasetType": "derivative",
         "GeneratedBy": [{"Name": "fMRIPrep", "Version": "23.2.1"}]}))
  return truth


@pytest.mark.parametrize("describe", [True, False], ids=["description", "file-names"])
def test_fmriprep_template_image_and_its_mask(tmp_path, describe):
  root = tmp_path / "fmriprep"
  truth = fmriprep_dataset(root, describe)
  assert layouts.detect([root]) == "fmriprep"
  # fMRIPrep writes no participants.tsv: prediction goes without ages, prepare asks for them.
  ds = layouts.read_dataset([root], "T1w", require_age=False)
  assert ds.layout == "fmriprep"
  assert {bids.row_id(s.subject_id, s.session): (Path(s.images["T1w"]), Path(s.mask))
          for s in ds.subjects} == truth
  assert all(s.age is None for s in ds.subjects)
  _one_line_error(DataError, layouts.read_dataset, [root], "T1w",
                  names=("participants.tsv", "--participants"))
  # The raw dataset's table lists sub-03 too, whom fMRIPrep did not process: a look-up.
  table = _tsv(tmp_path / "raw" / "participants.tsv", "participant_id\tage", "sub-01\t33",
               "sub-02\t44", "sub-03\t55")
  ds = layouts.read_dataset([root], "T1w", participants=table)
  assert _rows(ds) == [("sub-01", None, 33.0), ("sub-02", "1", 44.0)]
  # The native image on request, with the native mask.
  ds = layouts.read_dataset([root], "T1w", participants=table, entities="space=none")
  for s in ds.subjects:
    assert "space-" not in Path(s.images["T1w"]).name and "space-" not in Path(s.mask).name
    assert Path(s.mask).name.endswith("desc-brain_mask.nii.gz")


def test_fmriprep_mask_strips_the_head(tmp_path):
  """The desc-preproc image keeps the skull; with fMRIPrep's brain mask the cube holds the brain
  alone (the mask as nibabel reads it, resampled by nothing: same grid)."""
  root = tmp_path / "fmriprep"
  fmriprep_dataset(root)
  s = layouts.read_dataset([root], "T1w", require_age=False).subjects[0]
  prep = preprocess.Preprocessing(shape=(12, 12, 12))
  with_mask, _ = preprocess.preprocess_subject(s.images, prep, mask=s.mask)
  without, _ = preprocess.preprocess_subject(s.images, prep)
  brain = np.asanyarray(nib.load(s.mask).dataobj) > 0
  assert np.count_nonzero(with_mask) <= np.count_nonzero(brain)
  assert np.count_nonzero(without) > np.count_nonzero(brain)  # the shell came along


# ---------------------------------------------------------------------------------------------
# FreeSurfer / FastSurfer SUBJECTS_DIR


def subjects_dir(root: Path, fast: bool = False) -> dict[str, tuple[str, str | None, Path, Path]]:
  """bert, sub-02 and sub-03_ses-2 (+ fsaverage, skipped); returns folder -> (id, session,
  image, mask) as FreeSurfer (brain.finalsurfs + brainmask) or FastSurfer (orig_nu + mask;
  sub-02 also ran the surface pipeline: brain.finalsurfs) lay them out."""
  truth = {}
  for i, (folder, sid, ses) in enumerate((("bert", "bert", None), ("sub-02", "sub-02", None),
                                          ("sub-03_ses-2", "sub-03", "2"))):
    mri = root / folder / "mri"
    _save(mri / "orig.mgz", _volume(i, skull=True))
    if fast:
      _save(mri / "orig_nu.mgz", _volume(i, skull=True))
      _save(mri / "mask.mgz", (_volume(i) > 0).astype(np.float32))
      _save(mri / "aparc.DKTatlas+aseg.deep.mgz")
      image, mask = mri / "orig_nu.mgz", mri / "mask.mgz"
      if folder == "sub-02":
        image = _save(mri / "brain.finalsurfs.mgz", _volume(i))
    else:
      _save(mri / "T1.mgz", _volume(i, skull=True))
      image = _save(mri / "brain.finalsurfs.mgz", _volume(i))
      mask = _save(mri / "brainmask.mgz", _volume(i))
    truth[folder] = (sid, ses, image, mask)
  _save(root / "fsaverage" / "mri" / "orig.mgz")
  return truth


@pytest.mark.parametrize("fast", [False, True], ids=["freesurfer", "fastsurfer"])
def test_subjects_dir(tmp_path, fast):
  root = tmp_path / "subjects"
  truth = subjects_dir(root, fast)
  layout = "fastsurfer" if fast else "freesurfer"
  assert layouts.detect([root]) == layout
  table = _tsv(tmp_path / "ages.tsv", "participant_id\tsession_id\tage\tsex",
               "bert\tn/a\t50\tM", "sub-02\tn/a\t61\tF", "sub-03\tses-1\t68\tF",
               "sub-03\tses-2\t70\tF", "sub-99\tn/a\t20\tM")
  ds = layouts.read_dataset([root], "T1w", participants=table)
  assert ds.layout == layout
  assert [(s.subject_id, s.session, Path(s.images["T1w"]), Path(s.mask)) for s in ds.subjects] \
      == list(truth.values())
  assert [s.age for s in ds.subjects] == [50.0, 61.0, 70.0]
  assert [s.sex for s in ds.subjects] == ["M", "F", "F"]
  # No ages: prediction reads the folders, prepare asks for --participants.
  assert len(layouts.read_dataset([root], "T1w", require_age=False)) == 3
  _one_line_error(DataError, layouts.read_dataset, [root], "T1w", names=("--participants",))
  _one_line_error(ConfigError, layouts.read_dataset, [root], "T1w,FLAIR", participants=table,
                  names=("T1w only",))
  short = _tsv(tmp_path / "short.tsv", "participant_id\tage", "bert\t50")
  _one_line_error(DataError, layouts.read_dataset, [root], "T1w", participants=short,
                  names=("sub-02", "no row", "short.tsv"))


def test_image_list_of_subjects_dir_files_has_distinct_ids(tmp_path):
  """The bug of issue 20: `.../<subject>/mri/brain.finalsurfs.mgz` gave every file one id."""
  truth = subjects_dir(tmp_path / "subjects")
  paths = [image for _, _, image, _ in truth.values()]
  ds = layouts.read_dataset(paths, "T1w", require_age=False)
  assert ds.layout == "files"
  assert [(s.subject_id, s.session) for s in ds.subjects] == [
      (sid, ses) for sid, ses, _, _ in truth.values()]
  # Two SUBJECTS_DIRs with a subject of the same name: the site folder tells them apart.
  other = subjects_dir(tmp_path / "site-b")
  ds = bids.read_image_list(paths + [other["bert"][2]])
  assert [s.subject_id for s in ds.subjects] == ["subjects_bert", "sub-02", "sub-03",
                                                 "site-b_bert"]
  assert freesurfer.detect(tmp_path) is None  # the parent of SUBJECTS_DIRs is none itself


# ---------------------------------------------------------------------------------------------
# Splits keep sessions together


def test_split_keeps_a_subjects_sessions_together():
  groups = [f"sub-{i // 2 if i < 40 else i:02d}" for i in range(60)]  # 20 with two sessions
  ages = np.linspace(20, 80, 60)
  for stratified in (None, ages):
    split = splits_lib.split_subjects(60, 3, ages=stratified, groups=groups)
    part_of = {}
    for name in splits_lib.NAMES:
      for row in split[name]:
        assert part_of.setdefault(groups[row], name) == name, groups[row]
    assert sorted(np.concatenate([split[n] for n in splits_lib.NAMES]).tolist()) == list(
        range(60))
    # 40 participants apportioned 80/10/10.
    assert sorted({g: p for g, p in part_of.items()}.values()).count("test") == 4
  # Distinct ids: the split of old (no groups), row for row.
  distinct = splits_lib.split_subjects(30, 5, groups=[f"s{i}" for i in range(30)])
  plain = splits_lib.split_subjects(30, 5)
  assert all(np.array_equal(distinct[n], plain[n]) for n in splits_lib.NAMES)


def test_prepare_command_on_an_ambiguous_dataset(tmp_path, capsys):
  """`brainage prepare`: one line naming subject and candidates (exit 2, nothing written), then
  `--entities` picks and the cache holds the chosen file."""
  root = tmp_path / "ds"
  _save(root / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
  a = _save(root / "sub-02" / "anat" / "sub-02_acq-a_T1w.nii.gz")
  b = _save(root / "sub-02" / "anat" / "sub-02_acq-b_T1w.nii.gz", seed=1)
  _tsv(root / "participants.tsv", "participant_id\tage", "sub-01\t30", "sub-02\t40")
  out = tmp_path / "cache"
  argv = ["prepare", "--data", str(root), "--out", str(out), "--shape", "12", "--workers", "1",
          "--quiet"]
  assert cli(argv) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "sub-02" in err and a.name in err and b.name in err, err
  assert not out.exists()
  assert cli(argv + ["--entities", "acq=b", "--skip-bad"]) == 0
  cache = cache_lib.Cache.open(out)
  assert cache.subject_ids == ["sub-02"]
  assert cache.records[0]["images"]["T1w"] == str(b.relative_to(root))
