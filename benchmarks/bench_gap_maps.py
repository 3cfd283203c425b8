"""Maps of the gap against maps of the age on the simulated cohort (issue 22): where does the
positive relevance of subjects with risk factors fall, and how much relevance do subjects whose
latent gap is near 0 get?

Test-split subjects of a trained workdir on its simulated cohort, from the training cache's
cubes; relevance of the predicted age (`--target age`, against a zero input) and of the gap
(`--target gap`, against the age-matched mean training brain) with the default LRP composite
and the gradient (x input) baseline, through `derivative.Target` (brainage explain's path).
Per map:
- share of positive relevance in the frontal cortex (risk factors thin it: cohort.md) and in
  the subject's lesion mask (lesions grow with the latent brain age), and the share of those
  masks in the cube (what a uniform map would get);
- relevance mass sum |R| (years), for "risk" subjects (latent gap > +4 years) and "null"
  subjects (|latent gap| < 1 year).

  python benchmarks/bench_gap_maps.py --workdir /work/runs/cpu-short --n 24 --out /tmp/gap.json
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from jax_brainage import fileio  # noqa: E402
from jax_brainage.data import simulate, splits  # noqa: E402
from jax_brainage.explain import derivative, maps, truth  # noqa: E402

METHODS = (maps.DEFAULT_METHOD, "gradient_x_input")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", type=Path, required=True)
  p.add_argument("--n", type=int, default=24, help="subjects per group (risk, null)")
  p.add_argument("--out", type=Path, required=True)
  args = p.parse_args()
  targets = {t: {m: derivative.Target(args.workdir, "best", maps.get_method(m), batch_size=8,
                                      seed=0, levels=("ensemble",), target=t)
                 for m in METHODS} for t in ("age", "gap")}
  first = targets["age"][METHODS[0]]
  name = next(iter(first.of_sub))
  key, channels = first.of_sub[name]
  cache = first.views[key]
  data = Path(cache.index["source"])
  with open(simulate.derivatives_dir(data) / "brain_age.tsv", newline="") as fh:
    latent = {r["participant_id"]: float(r["brain_age"]) - float(r["age"])
              for r in csv.DictReader(fh, delimiter="\t")}
  parts = splits.subject_parts(args.workdir)
  test = [i for i, s in enumerate(cache.subject_ids) if parts.get(s) == "test"]
  risk = [i for i in test if latent[cache.subject_ids[i]] > 4.0][:args.n]
  null = [i for i in test if abs(latent[cache.subject_ids[i]]) < 1.0][:args.n]
  cohort = truth.open_cohort(data)
  names = {v["name"]: k for k, v in cohort.atlas.table.items()}
  stored = list(cache.index["sequences"])
  pick = [stored.index(q) for q in first.ensemble.subs[0].sequences]
  result = {"workdir": str(args.workdir), "methods": list(METHODS), "groups": {}}
  for group, rows in (("risk", risk), ("null", null)):
    cubes = np.asarray(cache.volumes[np.array(rows)])[..., pick]
    ages = [float(cache.ages[i]) for i in rows]
    masks = {"frontal": [], "lesions": []}
    for i in rows:
      sid = cache.subject_ids[i]
      inverse = cache.inverse(i)
      gt = truth.ground_truth(data, cohort, sid, first.ensemble.subs[0].sequences, inverse)
      labels = cohort.subject_labels(int(sid.split("-", 1)[1]) - 1)  # sub-0001 is row 0
      masks["frontal"].append(truth.mask_to_cube(labels == names["frontal_cortex"],
                                                 cohort.affine, inverse))
      masks["lesions"].append(gt.masks["lesions"])
    masks = {k: np.stack(v) for k, v in masks.items()}
    out = {"n": len(rows), "latent_gap": float(np.mean([latent[cache.subject_ids[i]]
                                                        for i in rows])),
           "mask_share_of_cube": {k: float(v.mean()) for k, v in masks.items()}}
    for t, by_method in targets.items():
      for m, target in by_method.items():
        levels, _ = target.explain({name: cubes}, np.arange(len(rows)), ages)
        r = levels[target.top][0].sum(-1).astype(np.float64)  # [n, X, Y, Z] over channels
        pos = np.maximum(r, 0)
        total = pos.reshape(len(rows), -1).sum(1) + 1e-12
        row = {f"positive_share_{k}": float(np.mean(
            (pos * v).reshape(len(rows), -1).sum(1) / total)) for k, v in masks.items()}
        row["mass"] = float(np.mean(np.abs(r).reshape(len(rows), -1).sum(1)))
        row["sum"] = float(np.mean(r.reshape(len(rows), -1).sum(1)))
        out[f"{t}/{m}"] = row
        print(f"{group:<5} {t:<4} {m:<22} frontal {row['positive_share_frontal']:.3f} lesions "
              f"{row['positive_share_lesions']:.4f} mass {row['mass']:9.2f} sum {row['sum']:8.2f}")
    print(f"{group}: n {len(rows)}, mean latent gap {out['latent_gap']:.2f}, mask share of cube "
          + ", ".join(f"{k} {v:.4f}" for k, v in out["mask_share_of_cube"].items()))
    result["groups"][group] = out
  fileio.write_json(args.out, fileio.jsonable(result))


if __name__ == "__main__":
  main()
