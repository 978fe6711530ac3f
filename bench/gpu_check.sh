#!/usr/bin/env bash
# The GPU check (issue 15), one script, under 8 minutes on one H200:
#   1. synthetic CIFAR-10 at full size (dmkd synth; no download on that machine),
#   2. FT and ER-500 on split-cifar10 with the Mammoth protocol (resnet18-reduced, batch 32,
#      SGD lr 0.03, no momentum), EPOCHS epochs per task, in fp32 and in bf16 + channels_last,
#   3. a suite of 4 FT runs (4 seeds, 1 epoch per task) by 1 worker, then by 4 concurrent workers
#      on the same GPU,
# and prints samples/s, peak GPU memory (the run's own; the data set's device bytes apart),
# accuracies, the bf16/fp32 throughput ratio and the aggregate throughput of 4 workers against 1.
# It needs only torch, torchvision, numpy, pillow, pyyaml, psutil, tqdm, filelock and pydantic: no
# mlflow, optuna, pandas or codecarbon (every run uses --tracking-uri none; energy is recorded when
# codecarbon is there). Where pydantic is missing (this workplace's GPU image), run bench/gpu_wheels.sh
# beforehand on a machine with pip and carry .whl/: the script installs those wheels into /tmp/site.
#
# Usage: bench/gpu_check.sh [--device cuda] [--scale 1.0] [--epochs 2] [--out /tmp/gpu_check]
# (each run is stopped after RUN_TIMEOUT seconds, default 200, so that the whole check stays bounded)
# CPU rehearsal: bench/gpu_check.sh --device cpu --scale 0.02 --epochs 1
set -euo pipefail
DEVICE=cuda SCALE=1.0 EPOCHS=2 OUTDIR=/tmp/gpu_check RUN_TIMEOUT=${RUN_TIMEOUT:-200}
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --scale) SCALE=$2; shift 2 ;;
    --epochs) EPOCHS=$2; shift 2 ;;
    --out) OUTDIR=$2; shift 2 ;;
    *) echo "error: unknown argument $1 — see the header of $0" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if ! $PY -c "import pydantic" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
  else
    echo "error: pydantic is not installed here — run bench/gpu_wheels.sh where pip works and carry .whl/" >&2; exit 2
  fi
fi
DATA=$OUTDIR/data-$SCALE RES=$OUTDIR/results
rm -rf "$RES"; mkdir -p "$OUTDIR" "$RES"
t0=$(date +%s)
echo "== gpu_check: device $DEVICE, scale $SCALE, $EPOCHS epoch(s)/task, $($PY -c 'import torch,sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available())')"
[ "$DEVICE" = cpu ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

[ -f "$DATA/cifar-10-batches-py/SYNTHETIC" ] || $PY -m harness.cli synth cifar10 --out "$DATA" --scale "$SCALE"

MAMMOTH=(--set backbone=resnet18-reduced --set batch_size=32 --set optimizer=sgd --set lr=0.03 --set momentum=0)
run() {  # run EXPERIMENT METHOD [extra --set ...]
  local exp=$1 method=$2; shift 2
  timeout "$RUN_TIMEOUT" $PY -m harness.cli run --method "$method" --scenario split-cifar10 --data-root "$DATA" --device "$DEVICE" \
    --tracking-uri none --results "$RES" --experiment "$exp" --epochs "$EPOCHS" "${MAMMOTH[@]}" "$@" \
    > "$OUTDIR/$exp-$method.log" 2>&1 || { echo "run $exp $method failed:"; tail -5 "$OUTDIR/$exp-$method.log"; exit 1; }
  echo "   $exp $method done ($(( $(date +%s) - t0 )) s)"
}
echo "== precision: FT and ER-500, fp32 then bf16 + channels_last"
run fp32 ft
run fp32 er --set buffer_size=500
run bf16cl ft --set precision=bf16 --set channels_last=true
run bf16cl er --set buffer_size=500 --set precision=bf16 --set channels_last=true

echo "== workers: a suite of 4 FT runs (seeds 0-3, 1 epoch/task), 1 worker then 4 concurrent workers"
for n in 1 4; do
  cat > "$OUTDIR/workers$n.yaml" <<EOF
name: workers$n
experiment: workers$n
seeds: [0, 1, 2, 3]
device: $DEVICE
data_root: $DATA
protocol: {epochs: 1, batch_size: 32, optimizer: sgd, lr: 0.03, momentum: 0, backbone: resnet18-reduced}
scenarios: [split-cifar10]
methods: [ft]
EOF
  s=$($PY -c 'import time; print(time.time())')
  for w in $(seq 1 $n); do
    timeout "$RUN_TIMEOUT" $PY -m harness.cli suite "$OUTDIR/workers$n.yaml" --results "$RES" --tracking-uri none --no-report \
      > "$OUTDIR/workers$n-w$w.log" 2>&1 &
  done
  wait
  e=$($PY -c 'import time; print(time.time())')
  echo "$s $e" > "$OUTDIR/workers$n.wall"
  echo "   $n worker(s) done ($(( $(date +%s) - t0 )) s)"
done

$PY - "$RES" "$OUTDIR" <<'EOF'
import glob, json, os, sys
res, out = sys.argv[1], sys.argv[2]
def recs(exp):
    return [json.load(open(p)) for p in sorted(glob.glob(os.path.join(res, exp, "runs", "*.json")))]
def gb(b):
    return f"{b / 2**30:.2f} GiB" if b is not None else "-"
print("\n== results (synthetic CIFAR-10; every record says synthetic_data=%s)" %
      all(r.get("synthetic_data") for e in ("fp32", "bf16cl") for r in recs(e)))
print(f"{'run':<14}{'method':<6}{'class-IL':>9}{'task-IL':>9}{'samples/s':>11}{'peak mem':>11}"
      f"{'data on dev':>13}{'train GFLOPs':>14}{'energy kWh':>12}  energy kind")
sps = {}
for exp in ("fp32", "bf16cl"):
    for r in recs(exp):
        c, m = r["costs"], r["metrics"]
        sps[(exp, r["method"])] = c["samples_per_s"]
        e = c.get("energy_kwh")
        print(f"{exp:<14}{r['method']:<6}{m['class_il']['final_avg_acc']:>9.3f}{m['task_il']['final_avg_acc']:>9.3f}"
              f"{c['samples_per_s']:>11.0f}{gb(c['peak_memory_bytes']):>11}{gb(c.get('dataset_device_bytes', 0)):>13}"
              f"{c['train_flops_total'] / 1e9:>14.0f}{(f'{e:.5f}' if e is not None else '-'):>12}  {c.get('energy_kind')}")
for m in ("ft", "er"):
    if (("fp32", m) in sps) and (("bf16cl", m) in sps):
        print(f"bf16+channels_last / fp32 samples/s, {m}: {sps[('bf16cl', m)] / sps[('fp32', m)]:.2f}x")
agg = {}
for n in (1, 4):
    rs = recs(f"workers{n}")
    s, e = map(float, open(os.path.join(out, f"workers{n}.wall")).read().split())
    samples = sum(r["costs"]["train_samples"] for r in rs if r.get("status") == "finished")
    agg[n] = samples / (e - s)
    per = [r["costs"]["samples_per_s"] for r in rs if r.get("status") == "finished"]
    span = f"{min(per):.0f}-{max(per):.0f}" if per else "-"
    print(f"{n} worker(s): {len(per)} of 4 runs finished, wall {e - s:.0f} s, aggregate {agg[n]:.0f} samples/s "
          f"(per run training {span} samples/s; the wall time includes evaluation and start-up)")
if agg.get(1):
    print(f"4 workers / 1 worker aggregate throughput: {agg[4] / agg[1]:.2f}x")
EOF
echo "== gpu_check done in $(( $(date +%s) - t0 )) s"
