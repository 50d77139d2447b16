#!/usr/bin/env bash
# One GPU session's checks, in order, each under its own time limit so a failure leaves the others' results:
#   1. eval/gpu_check.py: bf16 Trainer steps, exact resume and sampling on CUDA, flows, one-step models, masked
#      diffusion with DRAKES and SVDD, VARD / DRaFT / DDPO -> gpu_check.json
#   2. the digits VP-eps model of bench_solvers part (b), trained with train/train.py for a step count sized to
#      TRAIN_SECONDS from a short calibration run (the chosen count is printed and kept in its trainer_state.json)
#   3. eval/bench_solvers.py --fields digits on that checkpoint, DSS search included, on CUDA
#   4. (FLOWS=1) eval/bench_flows.py --device cuda: genkit's flows against zuko on the device
# Writes under $OUT (default out/gpu): gpu_run.log, gpu_check.json, digits_run.tar.gz, bench_solvers_digits.tar.gz.
# Usage (repo root, a CUDA machine): bash eval/gpu_run.sh   [TRAIN_SECONDS=200 BATCH=256 bash eval/gpu_run.sh]
# Wheels under .whl/ (packages the machine lacks, e.g. diffusers) are installed to /tmp/site first.
set -u
PY=${PY:-python3}
OUT=${OUT:-out/gpu}
TRAIN_SECONDS=${TRAIN_SECONDS:-200}
BATCH=${BATCH:-256}
RUN=${RUN:-runs/digits_vp_eps}
DEVICE=${DEVICE:-cuda}
BENCH_ARGS=${BENCH_ARGS:-}  # e.g. --quick, to test this script on a CPU with DEVICE=cpu
mkdir -p "$OUT"
LOG="$OUT/gpu_run.log"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
stamp() { echo "=== $(date -u +%T) $*" | tee -a "$LOG"; }
MODEL=(--family diffusion --path ddpm --prediction eps --data digits --channels 32,64 --batch-size "$BATCH" --lr 1e-3)

stamp "versions"
{ nvidia-smi -L; $PY -c "import torch, diffusers, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0), 'diffusers', diffusers.__version__, 'accelerate', accelerate.__version__)"; } >>"$LOG" 2>&1

stamp "1. gpu_check"
timeout 300 $PY eval/gpu_check.py >>"$LOG" 2>&1; echo "gpu_check exit $?" >>"$LOG"
cp eval/results/gpu_check.json "$OUT/" 2>>"$LOG"

stamp "2a. calibration (300 steps)"
rm -rf /tmp/calib
timeout 90 $PY train/train.py "${MODEL[@]}" --steps 300 --out /tmp/calib --no-progress --n-samples 16 >>"$LOG" 2>&1
STEPS=$($PY - "$TRAIN_SECONDS" "$BATCH" <<'EOF'
import json, statistics, sys
budget, batch = float(sys.argv[1]), int(sys.argv[2])
try:
    rows = [json.loads(line) for line in open("/tmp/calib/metrics.jsonl")][1:]  # the first window warms up
    ms = 1e3 * batch / statistics.median(r["samples_per_s"] for r in rows) if rows else 50.0
except OSError:
    ms = 50.0
print(int(min(40000, max(1000, budget * 1e3 / ms)) // 1000 * 1000))
EOF
)
stamp "2b. train $STEPS steps"
rm -rf "$RUN"
timeout $((TRAIN_SECONDS + 90)) $PY train/train.py "${MODEL[@]}" --steps "$STEPS" --checkpoint-every 1000 \
  --out "$RUN" --no-progress >>"$LOG" 2>&1; echo "train exit $?" >>"$LOG"
tar czf "$OUT/digits_run.tar.gz" -C "$(dirname "$RUN")" "$(basename "$RUN")" 2>>"$LOG"

stamp "3. bench_solvers digits on $DEVICE"
mkdir -p /tmp/bench
timeout 420 $PY eval/bench_solvers.py --fields digits --digits-checkpoint "$RUN/checkpoint" --digits-search \
  --digits-n 256 --search-iters 1000 --search-pool 2048 --search-batch 256 --search-init uniform \
  --device "$DEVICE" $BENCH_ARGS \
  --out /tmp/bench >>"$LOG" 2>&1; echo "bench exit $?" >>"$LOG"
tar czf "$OUT/bench_solvers_digits.tar.gz" -C /tmp/bench . 2>>"$LOG"

if [ "${FLOWS:-0}" = 1 ]; then  # FLOWS=1: issue 10's flow benchmark against zuko on the device (needs zuko)
  stamp "4. bench_flows on $DEVICE"
  timeout 300 $PY eval/bench_flows.py --device "$DEVICE" --out "$OUT/bench_flows" $BENCH_ARGS >>"$LOG" 2>&1
  echo "bench_flows exit $?" >>"$LOG"
fi
stamp "done"
