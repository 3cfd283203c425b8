"""Maps of the gap against maps of the age on the simulated cohort (issue 22): where does the
positive relevance of subjects with risk factors fall, and how much relevance do subjects whose
latent gap is near 0 get?

Test-split subjects of a trained workdir on its simulated cohort, from the training cache's
cubes, through `derivative.Target` (brainage explain's path). Maps ("target/reference/method"):
- age/-/M: relevance of the predicted age (against a zero input) for M = the default LRP
  composite, gradient, gradient x input;
- gap/age/M: R(x) less the mean map of every age-matched training scan (`--reference age`);
- gap/nearest/M: R(x) less the mean map of the k age-matched training scans most similar to the
  subject (`--reference nearest`); for integrated_gradients, the mean of the integrated
  gradients along the paths from each of those scans to x (sums to f(x) - mean f(x_j));
- gap/expected[:S]/integrated_gradients: the same paths cut where the estimate has dropped by
  the gap g = f(x) - E(a) to the estimate expected at the subject's age (`--reference
  expected`; S regula-falsi steps on f per path, default `reference.REFINE_STEPS`); the row
  also reports the paths walked per subject and their mean length t;
- gap/ageing[:S]/integrated_gradients: one path from x to x - 4 g dm/da (the cohort's ageing
  direction at the subject's age, `--reference ageing`), cut the same way.
Per map and group ("risk": latent gap > +4 years, "null": |latent gap| < 1 year): share of the
positive relevance in the frontal cortex (risk factors thin it: cohort.md) and in the subject's
lesion mask, mass sum |R| and signed sum (years); across groups: null mass / risk mass and the
correlation of the signed sum with the latent gap. `--part selection` takes the even positions
of the test split's risk and null lists, `--part report` the odd ones (disjoint sets: choose
on one, report on the other). `--smooth-vox S1,S2` (issue 22's design (d)) also scores every map
after a signed Gaussian smoothing of sigma S voxels (scipy.ndimage, the same for every map), as
rows "label@sS": does local +/- cancellation make null mass small and the frontal share specific?

  python benchmarks/bench_gap_maps.py --workdir /work/runs/cpu-demo --n 20 --part report \
      --maps age/-/epsilon_alpha2_beta1,gap/nearest/integrated_gradients --out /tmp/gap.json
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402

from jax_brainage import fileio  # noqa: E402
from jax_brainage.data import simulate, splits  # noqa: E402
from jax_brainage.explain import derivative, maps, truth  # noqa: E402

LRP = maps.DEFAULT_METHOD
MAPS = (f"age/-/{LRP}", "age/-/gradient", "age/-/gradient_x_input",
        f"gap/age/{LRP}", "gap/age/gradient_x_input",
        f"gap/nearest/{LRP}", "gap/nearest/gradient_x_input", "gap/nearest/integrated_gradients")


def subjects(workdir: Path, cache, part: str, n: int, offset: int = 0
             ) -> tuple[dict[str, list[int]], dict]:
  """{"risk": cache rows, "null": cache rows} of the test split (`part`: even / odd positions;
  `n` from the `offset`-th on) and {subject id: latent gap (years)}."""
  data = Path(cache.index["source"])
  with open(simulate.derivatives_dir(data) / "brain_age.tsv", newline="") as fh:
    latent = {r["participant_id"]: float(r["brain_age"]) - float(r["age"])
              for r in csv.DictReader(fh, delimiter="\t")}
  parts = splits.subject_parts(workdir)
  ids = cache.subject_ids
  test = [i for i, s in enumerate(ids) if parts.get(s) == "test"]
  start = 0 if part == "selection" else 1
  groups = {"risk": [i for i in test if latent[ids[i]] > 4.0][start::2][offset:offset + n],
            "null": [i for i in test if abs(latent[ids[i]]) < 1.0][start::2][offset:offset + n]}
  return groups, latent


def masks_of(cache, rows, sequences) -> dict[str, np.ndarray]:
  """Frontal cortex and lesion masks in the cubes, bool `[n, X, Y, Z]`."""
  data = Path(cache.index["source"])
  cohort = truth.open_cohort(data)
  names = {v["name"]: k for k, v in cohort.atlas.table.items()}
  out = {"frontal": [], "lesions": []}
  for i in rows:
    sid, inverse = cache.subject_ids[i], cache.inverse(i)
    labels = cohort.subject_labels(int(sid.split("-", 1)[1]) - 1)  # sub-0001 is row 0
    out["frontal"].append(truth.mask_to_cube(labels == names["frontal_cortex"], cohort.affine,
                                             inverse))
    out["lesions"].append(truth.ground_truth(data, cohort, sid, sequences,
                                             inverse).masks["lesions"])
  return {k: np.stack(v) for k, v in out.items()}


def scores(r: np.ndarray, masks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Per subject: positive share in each mask, mass sum |R|, signed sum (r `[n, X, Y, Z]`)."""
  n = len(r)
  pos = np.maximum(r, 0).reshape(n, -1)
  total = pos.sum(1) + 1e-12
  out = {f"share_{k}": (pos * v.reshape(n, -1)).sum(1) / total for k, v in masks.items()}
  out["mass"] = np.abs(r).reshape(n, -1).sum(1)
  out["sum"] = r.reshape(n, -1).sum(1)
  return out


def smoothed(r: np.ndarray, sigma: float) -> np.ndarray:
  """Signed Gaussian smoothing of maps `[n, X, Y, Z]` over space only (sigma in voxels; the
  cube's edges reflect, so the signed sum is kept)."""
  if sigma <= 0:
    return r
  return ndimage.gaussian_filter(r, sigma=(0.0, sigma, sigma, sigma), mode="reflect")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", type=Path, required=True)
  p.add_argument("--n", type=int, default=20, help="subjects per group (risk, null)")
  p.add_argument("--part", choices=("selection", "report"), default="selection")
  p.add_argument("--offset", type=int, default=0, help="skip the part's first OFFSET subjects")
  p.add_argument("--maps", default=",".join(MAPS), help="target/reference/method, ...")
  p.add_argument("--smooth-vox", default="0",
                 help="Gaussian sigmas (voxels) applied alike to every map; 0 = none")
  p.add_argument("--out", type=Path, required=True)
  args = p.parse_args()
  specs = [m.split("/") for m in args.maps.split(",")]
  sigmas = [float(v) for v in args.smooth_vox.split(",")]
  targets = {}
  for t, design, method in specs:
    design, _, steps = design.partition(":")  # expected:S = S regula-falsi steps
    target = derivative.Target(
        args.workdir, "best", maps.get_method(method), batch_size=8, seed=0,
        levels=("ensemble",), target=t,
        **({} if t == "age" else {"reference_design": design}))
    if steps:
      target.references.refine_steps = int(steps)
    targets["/".join((t, design + (f":{steps}" if steps else ""), method))] = target
  first = next(iter(targets.values()))
  name = next(iter(first.of_sub))
  key, _ = first.of_sub[name]
  cache = first.views[key]
  stored = list(cache.index["sequences"])
  sequences = first.ensemble.subs[0].sequences
  pick = [stored.index(q) for q in sequences]
  groups, latent = subjects(args.workdir, cache, args.part, args.n, args.offset)
  result = {"workdir": str(args.workdir), "part": args.part, "maps": list(targets),
            "groups": {}, "across": {}}
  per, inputs = {}, {}
  for group, rows in groups.items():  # cubes, ages, masks and latent gaps of each group
    masks = masks_of(cache, rows, sequences)
    gaps = np.array([latent[cache.subject_ids[i]] for i in rows])
    inputs[group] = (np.asarray(cache.volumes[np.array(rows)])[..., pick],
                     [float(cache.ages[i]) for i in rows], masks, gaps)
    result["groups"][group] = {
        "n": len(rows), "latent_gap": float(gaps.mean()),
        "mask_share_of_cube": {k: float(v.mean()) for k, v in masks.items()}}
    print(f"{group}: n {len(rows)}, mean latent gap {gaps.mean():.2f}, mask share of cube "
          + ", ".join(f"{k} {v.mean():.4f}" for k, v in masks.items()), flush=True)
  for label, target in targets.items():  # map by map: a stopped run keeps whole maps
    for group, (cubes, ages, masks, gaps) in inputs.items():
      t0 = time.perf_counter()
      levels, predicted = target.explain({name: cubes}, np.arange(len(cubes)), ages)
      seconds = (time.perf_counter() - t0) / len(cubes)
      raw = levels[target.top][0].sum(-1).astype(np.float64)
      for sigma in sigmas:
        tag = label if sigma <= 0 else f"{label}@s{sigma:g}"
        s = scores(smoothed(raw, sigma), masks)
        row = {k: float(v.mean()) for k, v in s.items()}
        row["seconds_per_subject"] = seconds
        row["per_subject"] = {k: v.tolist() for k, v in s.items()}
        row["latent_gaps"] = gaps.tolist()
        if target.reference_predicted is not None:  # sum R against f(x) - f(reference set)
          delta = np.asarray(predicted, np.float64) - target.reference_predicted
          row["sum_minus_prediction_difference"] = float(np.mean(np.abs(s["sum"] - delta)))
          row["per_subject"]["prediction_difference"] = delta.tolist()
          row["prediction_difference"] = float(delta.mean())
        if target.path_fractions is not None:  # --reference expected: how far paths went
          t_k = np.asarray(target.path_fractions, np.float64)
          row["paths_walked"] = float((t_k > 0).sum(1).mean())
          row["mean_fraction"] = float(t_k[t_k > 0].mean()) if (t_k > 0).any() else 0.0
          row["gap_abs"] = float(np.abs(delta).mean())
        result["groups"][group][tag] = row
        per.setdefault(tag, {})[group] = (s, gaps)
        print(f"{group:<5} {tag:<48} frontal {row['share_frontal']:.3f} lesions "
              f"{row['share_lesions']:.4f} mass {row['mass']:9.2f} sum {row['sum']:7.2f} "
              f"({seconds:.1f} s/subject)", flush=True)
      fileio.write_json(args.out, fileio.jsonable(result))  # what is done survives a stop
  for label, by_group in per.items():
    if set(by_group) != {"risk", "null"}:
      continue
    (sr, gr), (sn, gn) = by_group["risk"], by_group["null"]
    sums, gaps = np.concatenate([sr["sum"], sn["sum"]]), np.concatenate([gr, gn])
    result["across"][label] = {
        "null_over_risk_mass": float(sn["mass"].mean() / sr["mass"].mean()),
        "sum_latent_gap_correlation": float(np.corrcoef(sums, gaps)[0, 1]),
        "risk_minus_null_sum": float(sr["sum"].mean() - sn["sum"].mean())}
    a = result["across"][label]
    print(f"{label:<48} null/risk mass {a['null_over_risk_mass']:.2f}, corr(sum, latent gap) "
          f"{a['sum_latent_gap_correlation']:.2f}, risk - null sum {a['risk_minus_null_sum']:.2f}")
  fileio.write_json(args.out, fileio.jsonable(result))


if __name__ == "__main__":
  main()
