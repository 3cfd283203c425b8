"""A BIDS dataset with two sessions per subject through `brainage prepare`, training (a tiny
MRInet, one epoch) and `brainage predict`: one cache row and one prediction per session, each
with its own age (sessions.tsv), and both sessions of a subject in one split part."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from jax_brainage.cli import main as cli
from jax_brainage.data import cache as cache_lib
from jax_brainage.train import config as config_lib
from jax_brainage.train import config_checks
from jax_brainage.train import trainer

SUBJECTS = 8  # x 2 sessions = 16 rows; 6-7 participants train, 1 validates, 1 tests


def _sessions_bids(root: Path) -> dict[tuple[str, str], float]:
  """sub-01..08 with ses-1 and ses-2 (ages 4 years apart in sessions.tsv) and a bright box that
  grows with age; participants.tsv holds the first session's age. Returns (id, session) -> age."""
  rng = np.random.default_rng(0)
  truth, rows = {}, []
  for i in range(1, SUBJECTS + 1):
    sid, base = f"sub-{i:02d}", 25.0 + 6.5 * i
    lines = []
    for ses, age in (("1", base), ("2", base + 4.0)):
      data = np.zeros((16, 16, 16), np.float32)
      data[2:14, 2:14, 2:14] = rng.uniform(50, 90, (12, 12, 12))
      r = 1 + int((age - 20) / 12)
      data[8 - r:8 + r, 8 - r:8 + r, 8 - r:8 + r] += 150
      anat = root / sid / f"ses-{ses}" / "anat"
      anat.mkdir(parents=True)
      nib.save(nib.Nifti1Image(data, np.diag([4.0, 4.0, 4.0, 1.0])),
               anat / f"{sid}_ses-{ses}_T1w.nii.gz")
      truth[(sid, ses)] = age
      lines.append(f"ses-{ses}\t{age}")
    (root / sid / f"{sid}_sessions.tsv").write_text("session_id\tage\n" + "\n".join(lines) + "\n")
    rows.append(f"{sid}\t{base}")
  (root / "participants.tsv").write_text("participant_id\tage\n" + "\n".join(rows) + "\n")
  return truth


@pytest.mark.slow  # ~45 s of CPU (a training run), minutes on the shared 2 cores
def test_sessions_prepare_train_predict(tmp_path, capsys):
  data = tmp_path / "bids"
  truth = _sessions_bids(data)
  cache_dir = tmp_path / "cache"
  assert cli(["prepare", "--data", str(data), "--out", str(cache_dir), "--shape", "16",
              "--scaling", "zscore", "--workers", "1", "--quiet"]) == 0
  assert "(bids)" in capsys.readouterr().out
  cache = cache_lib.Cache.open(cache_dir)
  assert cache.subject_ids == [f"{sid}_ses-{ses}" for sid, ses in truth]
  assert [(r["subject_id"], r["session"]) for r in cache.records] == list(truth)
  assert np.allclose(cache.ages, list(truth.values()))

  c = config_lib.base_config()
  c.data.cache = str(cache_dir)
  c.data.mode = "host"
  c.data.scaling = "zscore"
  c.data.image_shape = (16, 16, 16)
  c.model.conv_features = (4, 8, 8, 8, 8)
  c.model.dense_features = 16
  c.model.dropout_rate = 0.0
  c.batch_size = 4
  c.num_epochs = 1
  c.patience = 0
  c.num_image_summaries = 0
  config_checks.validate(c)
  workdir = tmp_path / "W"
  trainer.train_and_evaluate(c, workdir, quiet=True)
  split = json.loads((workdir / "split.json").read_text())
  part_of: dict[str, str] = {}
  for name in ("train", "val", "test"):
    for row_id in split["subject_ids"][name]:
      participant = row_id.split("_ses-")[0]
      assert part_of.setdefault(participant, name) == name, row_id  # sessions stay together
  assert len(part_of) == SUBJECTS

  out = tmp_path / "preds.tsv"
  assert cli(["predict", "--workdir", str(workdir), "--data", str(data), "--out", str(out),
              "--workers", "1"]) == 0
  with open(out, newline="") as f:
    rows = list(csv.DictReader(f, delimiter="\t"))
  assert [(r["participant_id"], r["session"]) for r in rows] == list(truth)
  assert [float(r["age"]) for r in rows] == list(truth.values())
  assert all(np.isfinite(float(r["predicted_age"])) for r in rows)
  # --session keeps one row per subject.
  assert cli(["predict", "--workdir", str(workdir), "--data", str(data), "--out", str(out),
              "--session", "2", "--workers", "1"]) == 0
  with open(out, newline="") as f:
    rows = list(csv.DictReader(f, delimiter="\t"))
  assert [(r["participant_id"], r["session"]) for r in rows] == [k for k in truth if k[1] == "2"]
