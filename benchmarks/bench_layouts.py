"""Reading a dataset's layout: seconds to turn a BIDS folder into rows (no image is decoded).

Builds (once, under --root) a BIDS dataset of --n subjects x 2 sessions x 2 runs of T1w (tiny
2^3 NIfTI files: the cost measured is the file system walk, the entity rule, sessions.tsv and
the JSON sidecars with BIDS inheritance, not image I/O) and times
`layouts.read_dataset` --repeat times.

  python benchmarks/bench_layouts.py --n 500 --root /tmp/bench-layouts
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jax_brainage.data import layouts  # noqa: E402


def build(root: Path, n: int) -> None:
  """sub-XXXX/ses-{1,2}/anat/*_run-{1,2}_T1w.nii.gz, a sidecar per run-1 image, sessions.tsv
  per subject, participants.tsv and a top-level T1w.json."""
  img = nib.Nifti1Image(np.ones((2, 2, 2), np.float32), np.eye(4))
  rows = []
  for i in range(n):
    sid = f"sub-{i:04d}"
    for ses in ("1", "2"):
      anat = root / sid / f"ses-{ses}" / "anat"
      anat.mkdir(parents=True)
      for run in ("1", "2"):
        nib.save(img, anat / f"{sid}_ses-{ses}_run-{run}_T1w.nii.gz")
      (anat / f"{sid}_ses-{ses}_run-1_T1w.json").write_text(
          json.dumps({"MagneticFieldStrength": 3}))
    (root / sid / f"{sid}_sessions.tsv").write_text("session_id\tage\nses-1\t40\nses-2\t44\n")
    rows.append(f"{sid}\t40")
  (root / "participants.tsv").write_text("participant_id\tage\n" + "\n".join(rows) + "\n")
  (root / "T1w.json").write_text(json.dumps({"Manufacturer": "Siemens"}))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--n", type=int, default=500, help="subjects (500)")
  p.add_argument("--root", type=Path, default=Path("/tmp/bench-layouts"))
  p.add_argument("--repeat", type=int, default=3)
  args = p.parse_args()
  root = args.root / f"bids-{args.n}"
  if not root.exists():
    build(root, args.n)
  for _ in range(args.repeat):
    t = time.perf_counter()
    ds = layouts.read_dataset([root], "T1w")
    seconds = time.perf_counter() - t
    print(f"{len(ds)} rows ({args.n} subjects x 2 sessions x 2 runs, sidecars): {seconds:.2f} s "
          f"({1e3 * seconds / len(ds):.2f} ms per row)")


if __name__ == "__main__":
  main()
