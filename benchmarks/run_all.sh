#!/usr/bin/env bash
# The whole benchmark harness in one command, JSON results (and logs) collected in one folder.
#
#   benchmarks/run_all.sh [OUTDIR]            # full size on an accelerator, small size on CPU
#   SIZE=small benchmarks/run_all.sh out/     # force a size (full | small | tiny)
#   ONLY="train lrp" benchmarks/run_all.sh    # a subset: train roofline lrp pipeline conv
#                                             #   pool stem simulate ensemble scaling
#
# Where one command may run only ~10 minutes (a lent GPU), run it in parts with ONLY (train and
# roofline are the long ones; bench_train.py --cases splits train further), same OUTDIR.
# Every script runs even if an earlier one failed; OUTDIR/status.tsv lists each script's exit
# status and wall time, OUTDIR/<name>.log its table, OUTDIR/<name>.json its numbers (device,
# date and versions inside), OUTDIR/environment.txt the machine. Run from anywhere.
set -u

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-benchmark-results/$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
python="${PYTHON:-python}"

platform="$("$python" -c 'import jax; print(jax.devices()[0].platform)' 2>/dev/null || echo cpu)"
if [[ -z "${SIZE:-}" ]]; then
  if [[ "$platform" == "cpu" ]]; then SIZE=small; else SIZE=full; fi
fi
only=" ${ONLY:-train roofline lrp pipeline conv simulate ensemble scaling} "

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "platform: $platform  size: $SIZE  host: $(hostname)"
  echo "git: $(git -C "$here/.." rev-parse HEAD 2>/dev/null || echo unknown)"
  grep -m1 "model name" /proc/cpuinfo 2>/dev/null
  echo "cpus: $(nproc 2>/dev/null)"
  command -v nvidia-smi >/dev/null && nvidia-smi
  "$python" -c 'import jax, sys; print("python", sys.version.split()[0], "jax", jax.__version__, jax.devices())'
  "$python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())' 2>&1
} > "$out/environment.txt" 2>&1

[[ -f "$out/status.tsv" ]] || printf "benchmark\tstatus\tseconds\n" > "$out/status.tsv"

run() {  # run NAME script args...: logs to NAME.log, JSON to NAME.json
  local name="$1"; shift
  [[ "$only" == *" $name "* ]] || return 0
  local script="$here/$1"; shift
  if [[ ! -f "$script" ]]; then
    printf "%s\tabsent\t0\n" "$name" >> "$out/status.tsv"
    return 0
  fi
  echo "== $name: $(basename "$script") $*"
  local t0=$SECONDS
  "$python" "$script" "$@" --out "$out/$name.json" 2>&1 | tee "$out/$name.log"
  local status=${PIPESTATUS[0]}
  printf "%s\t%s\t%s\n" "$name" "$status" "$((SECONDS - t0))" >> "$out/status.tsv"
}

case "$SIZE" in
  full)
    run train bench_train.py --size full --batch-size 8 --steps 10 --warmup 3
    run roofline bench_roofline.py --size full --batch-size 8 --steps 10 --warmup 3
    run lrp bench_lrp.py --shape 198 --batch-size 4 --repeats 10 --zennit
    run lrp_vit bench_lrp_transformer.py --image 64 --dim 128 --depth 6 --repeats 10 --lxt
    run pipeline bench_pipeline.py --shapes 2mm,4mm --subjects 256 --batch-size 8 --steps 50 \
      --warmup 5
    run conv bench_conv.py --side 64 --batch-size 4 --repeats 10
    run pool bench_pool.py --side 98 --batch-size 4 --repeats 10
    run stem bench_stem.py --shape 98,98,98 --batch-size 8 --stems 2,3 --repeats 10
    run simulate bench_simulate.py --resolution 2 --n 40 --workers "$(nproc)"
    run ensemble bench_ensemble.py
    run scaling bench_scaling.py
    ;;
  small)
    run train bench_train.py --size small --batch-size 2 --steps 3 --warmup 2
    run roofline bench_roofline.py --size small --batch-size 2 --steps 3 --warmup 1
    run lrp bench_lrp.py --shape 64 --batch-size 2 --repeats 5 --zennit
    run lrp_vit bench_lrp_transformer.py --repeats 10 --lxt
    run pipeline bench_pipeline.py --shapes 2mm,4mm --subjects 64 --batch-size 8 --steps 20 \
      --workers 0,2
    run conv bench_conv.py --side 64 --batch-size 4 --repeats 3
    run pool bench_pool.py --shape 40,50,40 --batch-size 4 --repeats 7   # the cpu preset's box
    run stem bench_stem.py --shape 40,50,40 --batch-size 4 --repeats 8
    run simulate bench_simulate.py --resolution 4 --n 200 --workers 2
    run ensemble bench_ensemble.py
    run scaling bench_scaling.py
    ;;
  tiny)
    run train bench_train.py --size tiny --cases mrinet-98 --dtypes float32 --torch eager \
      --batch-size 2 --steps 1 --warmup 1
    run roofline bench_roofline.py --size tiny --cases mrinet-98 --dtypes float32 \
      --batch-size 2 --steps 1 --warmup 1
    run lrp bench_lrp.py --shape 16 --batch-size 2 --repeats 1 --zennit
    run pipeline bench_pipeline.py --shapes 16 --subjects 4 --batch-size 2 --steps 1 --warmup 1 \
      --workers 0 --augment off
    run conv bench_conv.py --side 16 --batch-size 1 --repeats 1 --lowerings xla,im2col_z
    run pool bench_pool.py --side 8 --batch-size 1 --repeats 1
    run stem bench_stem.py --shape 8,10,8 --batch-size 1 --repeats 1
    ;;
  *)
    echo "SIZE must be full, small or tiny, got $SIZE" >&2
    exit 2
    ;;
esac

echo "results in $out:"
column -t "$out/status.tsv" 2>/dev/null || cat "$out/status.tsv"
! grep -qvP "\t0\t|\tabsent\t|^benchmark\t" "$out/status.tsv"
