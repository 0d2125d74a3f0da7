#!/usr/bin/env bash
# The device check (issues 14, 21): one call on one CUDA GPU, on a bare machine with no ../shared and no network,
# each measurement beside its baseline in the same run. docs/gpu.md says what it measures.
#
#   bash bench/gpu_check.sh --plan      the steps and their time limits, and whether they fit the budget: runs
#                                       nothing, needs no GPU and no data
#   bash bench/gpu_check.sh --prepare   here, where ../shared (or the network) is: CoLA's raw TSVs and tiktoken's
#                                       GPT-2 BPE files into .devcarry/ (git-ignored, about 2 MB); prints the carry
#   bash bench/gpu_check.sh             on the GPU machine, from the repository root, with .devcarry/ copied along
#                                       (the call's own timeout: 420 s); its log, summary and metrics go to $OUT
#                                       (else its temp dir)
#   bash bench/gpu_check.sh --dry-run   the same steps on the CPU with tiny shapes: the plumbing
#
# Steps run in order of value (PLAN below), each under its own time limit. A step starts only when its whole limit
# fits in what is left of the budget (GPU_CHECK_BUDGET seconds: 330 on the device, 1200 for --dry-run, whose
# limits are tripled); otherwise it is listed as skipped. So nothing is cut short by the budget: a step that
# runs out of time ran out of its own limit, and is marked "timed out". The limits sum to at most the budget, so
# steps that keep to their limits all run. Every run works in a fresh temp dir, so a rerun on the same machine
# starts at once; only the random checkpoint is kept and reused ($BENCH_CACHE). Exit status 0 when every step
# that ran finished, 1 otherwise, 2 when it cannot start. PYTHON names the interpreter (tests/test_gpu_check.py
# drives the script with a stub that only sleeps, and GPU_CHECK_TIME_SCALE, the limits in percent, to run fast).
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-device}
CARRY=.devcarry
PY=${PYTHON:-python3}
case $MODE in
  device|--dry-run|--prepare|--plan) ;;
  *) echo "usage: bash bench/gpu_check.sh [--plan | --prepare | --dry-run]" >&2; exit 2;;
esac

# The steps in order of value, each with its time limit in seconds on the device (process startup included).
# The epoch limits come from an estimate of about 21.5 s an epoch for the full default run on an H100 (issue 9's
# 215 s for ten), plus startup and the dev evaluation: unmeasured until a device run records them.
PLAN=(
  "correctness 55 fp32 logits and LoRA gradients vs transformers + PEFT; bf16, fp16 gradients vs fp32; one batch fitted"
  "test_cuda 70 tests/test_cuda.py"
  "bench_lora 55 bench/bench_lora.py: ours eager, ours --cuda_graphs, transformers + PEFT (batch 32, MFU, peak memory)"
  "epoch_bf16 40 train_lora.py, one epoch of the full training set, bf16, eager"
  "epoch_fp16 40 train_lora.py, one epoch, fp16 (loss scaling), eager"
  "epoch_graphs 40 train_lora.py, one epoch, bf16, --cuda_graphs"
  "distil 30 train_distil.py --mode distil, 2 epochs, from the epoch_bf16 run"
)
if [ "$MODE" = --dry-run ]; then
  BUDGET=${GPU_CHECK_BUDGET:-1200} SCALE=${GPU_CHECK_TIME_SCALE:-300}  # limits x3: a shared 2-core CPU is slow
else
  BUDGET=${GPU_CHECK_BUDGET:-330} SCALE=${GPU_CHECK_TIME_SCALE:-100}
fi

limit_ms() {  # limit_ms NAME: the step's limit in milliseconds, scaled
  local step name limit rest
  for step in "${PLAN[@]}"; do
    read -r name limit rest <<<"$step"
    [ "$name" = "$1" ] && { echo $((limit * 10 * SCALE)); return; }
  done
  echo "bench/gpu_check.sh: no step $1 in PLAN" >&2; exit 2
}

seconds() {  # seconds MS: "12", "0.8", "12.345"
  awk -v ms="$1" 'BEGIN { printf "%g", ms / 1000 }'
}

now_ms() {
  echo $(($(date +%s%N) / 1000000))
}

if [ "$MODE" = --plan ]; then
  total=0
  printf '%-3s %-14s %9s  %s\n' "" step "limit s" "what"
  i=0
  for step in "${PLAN[@]}"; do
    read -r name limit what <<<"$step"
    i=$((i + 1)); total=$((total + limit * 10 * SCALE))
    printf '%-3s %-14s %9s  %s\n' "$i." "$name" "$(seconds $((limit * 10 * SCALE)))" "$what"
  done
  echo "plan: ${#PLAN[@]} steps, limits sum to $(seconds $total) s of a $BUDGET s budget"
  [ "$total" -le $((BUDGET * 1000)) ]
  exit
fi

if [ "$MODE" = --prepare ]; then
  mkdir -p $CARRY/cola/cola_public/raw $CARRY/tiktoken
  if [ -d ../shared/cola/cola_public/raw ] && [ -d ../shared/tiktoken ]; then
    cp ../shared/cola/cola_public/raw/*.tsv $CARRY/cola/cola_public/raw/ || exit 1
    cp ../shared/tiktoken/* $CARRY/tiktoken/ || exit 1
  else  # the product's own downloaders, into the carried folder
    TIKTOKEN_CACHE_DIR=$PWD/$CARRY/tiktoken $PY -c "from data import ensure_cola, get_encoder
ensure_cola('$CARRY/cola'); get_encoder()" || exit 1
  fi
  git check-ignore -q $CARRY || echo "warning: $CARRY is not git-ignored" >&2
  echo "$CARRY: $(du -sh $CARRY | cut -f1) ($(ls $CARRY/cola/cola_public/raw | wc -l) CoLA files," \
    "$(ls $CARRY/tiktoken | wc -l) tiktoken files)"
  echo 'carry: [".devcarry"]'
  echo 'on the GPU machine, with .devcarry/ copied along: bash bench/gpu_check.sh   (allow it about 420 s)'
  exit 0
fi

DATA=$PWD/$CARRY/cola
if [ ! -d "$DATA/cola_public/raw" ] || [ -z "$(ls $CARRY/tiktoken 2>/dev/null)" ]; then
  echo "no data in $CARRY/: run 'bash bench/gpu_check.sh --prepare' first (where ../shared or the network is)," \
    "and carry $CARRY" >&2
  exit 2
fi
export GPT2_COLA_DIR=$DATA TIKTOKEN_CACHE_DIR=$PWD/$CARRY/tiktoken HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 MPLBACKEND=Agg
export BENCH_CACHE=${BENCH_CACHE:-/tmp/gpt2-lora-bench}  # the random checkpoint, written once per machine
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
LOGS=${OUT:-$WORK}
mkdir -p "$LOGS"

if [ "$MODE" = --dry-run ]; then
  SHAPE=tiny
  SMALL=(--device cpu --max_train_samples 96 --max_eval_samples 64)
  CORRECT=(--device cpu --variant-shape tiny --fit-steps 0)  # the fit: tests/test_gpu_check.py, on CPU
  BENCH=(--device cpu --variant-shape tiny --steps 3 --round 1 --warmup 1 --eval-batches 1 --eval-rounds 1 --no-memory)
else
  SHAPE=gpt2-medium
  SMALL=()  # the full training set
  CORRECT=(--device cuda --variant-shape gpt2-medium)
  BENCH=(--device cuda --variant-shape gpt2-medium --cuda-graphs --steps 30 --eval-rounds 2)
fi
SUMMARY=$WORK/summary.tsv
FAILED=0

run() {  # run NAME CMD...: CMD under NAME's limit, if that whole limit fits in what the budget leaves, else
         # skipped; its wall seconds (startup included) and exit status go into the summary, its output into the
         # log and $WORK/NAME.log
  local name=$1; shift
  local cap left
  cap=$(limit_ms "$name") || exit 2
  left=$((BUDGET * 1000 - ($(now_ms) - START_MS)))
  echo; echo "=== $name ($(date +%T), limit $(seconds "$cap")s, $(seconds $((left > 0 ? left : 0)))s of the budget left)"
  if [ "$cap" -gt "$left" ]; then
    echo "skipped: its limit does not fit in what the budget leaves"
    printf '%s\t-\tskipped (budget)\n' "$name" >>"$SUMMARY"
    return 1
  fi
  local t0 rc secs status
  t0=$(now_ms)
  timeout --kill-after=2 "$(seconds "$cap")" "$@" 2>&1 | tee "$WORK/$name.log"
  rc=${PIPESTATUS[0]}
  secs=$(seconds $(($(now_ms) - t0)))
  case $rc in 0) status=ok;; 124|137) status="timed out at its own limit, $(seconds "$cap")s"; FAILED=1;;
    *) status="exit $rc"; FAILED=1;; esac
  printf '%s\t%s\t%s\n' "$name" "$secs" "$status" >>"$SUMMARY"
  return "$rc"
}

note() {  # note TEXT: a line under the summary table
  echo "$*" >>"$WORK/notes.txt"
}

compare() {  # compare LABEL BASELINE OTHER: both steps' wall seconds from the summary, and their ratio
  awk -F'\t' -v label="$1" -v a="$2" -v b="$3" '$1 == a && $3 == "ok" { x = $2 } $1 == b && $3 == "ok" { y = $2 }
    END { if (x > 0 && y > 0) printf "%s: %s %.1f s, %s %.1f s wall; %s / %s = %.2fx\n", label, a, x, b, y, a, b, x / y
          else printf "%s: %s against %s unmeasured (one of them did not finish)\n", label, a, b }' "$SUMMARY" \
    >>"$WORK/notes.txt"
}

run_note() {  # run_note NAME OUT_DIR: best dev MCC, precision and epoch times of a finished training run
  $PY - "$2/metrics.json" "$WORK/$1.log" "$1" <<'EOF' >>"$WORK/notes.txt"
import json, re, sys
m = json.load(open(sys.argv[1]))
secs = [float(s) for s in re.findall(r"epoch \d+: .*\| ([\d.]+)s$", open(sys.argv[2]).read(), re.M)]
cfg, best = m["config"], m["best"]
print(f"{sys.argv[3]}: {len(m['epochs'])} epochs, {sum(secs):.1f}s in them ({sum(secs) / max(len(secs), 1):.2f}s "
      f"each, dev eval included), best dev MCC {best['val_mcc']:.3f} at epoch {m['best_epoch']} (majority baseline "
      f"acc {m['majority_baseline']['val_acc']:.3f}), precision {cfg.get('precision', 'not recorded')}"
      + (f"; 10 epochs estimated at {10 * secs[0]:.0f}s (10 x this epoch)" if len(secs) == 1 else ""))
EOF
}

main() {  # the steps; their output goes to the terminal and $LOGS/gpu_check.log
  echo "=== machine ($(date -u +%FT%TZ), mode ${MODE}, budget ${BUDGET}s, work dir $WORK, logs $LOGS)"
  git log -1 --format='commit %h %s' 2>/dev/null
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  $PY -c "import sys, torch, transformers, peft, tiktoken, matplotlib, tqdm, safetensors, numpy, pytest; print(
    'python', sys.version.split()[0], '| torch', torch.__version__, 'cuda', torch.version.cuda,
    torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU',
    '| transformers', transformers.__version__, '| peft', peft.__version__)" \
    || { echo "a package is missing: docs/gpu.md says how to carry wheels"; exit 2; }
  if [ "$MODE" = device ] && ! $PY -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
    echo "no CUDA device: use --dry-run on a CPU machine"; exit 2
  fi

  START_MS=$(now_ms)  # the budget counts from here: the steps, and the notes between them
  CKPT=$BENCH_CACHE/$SHAPE-seed0
  run correctness $PY bench/gpu_correctness.py "${CORRECT[@]}" --data-dir "$DATA" --cache-dir "$BENCH_CACHE"
  grep -E '^(PASS|FAIL)' "$WORK/correctness.log" >>"$WORK/notes.txt"

  run test_cuda $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py
  note "test_cuda: $(grep -E '(passed|failed|skipped|error)' "$WORK/test_cuda.log" | tail -1)"

  run bench_lora $PY bench/bench_lora.py "${BENCH[@]}" --data-dir "$DATA" --cache-dir "$BENCH_CACHE"
  grep -E '^\| +\| ours|^\| (training|MFU|eval|peak)' "$WORK/bench_lora.log" >>"$WORK/notes.txt"

  LORA=(--gpt_variant "$CKPT" --data_dir "$DATA" "${SMALL[@]}" --epochs 1)
  run epoch_bf16 $PY train_lora.py "${LORA[@]}" --precision bf16 --out_dir "$WORK/epoch_bf16" \
    && run_note epoch_bf16 "$WORK/epoch_bf16"
  run epoch_fp16 $PY train_lora.py "${LORA[@]}" --precision fp16 --out_dir "$WORK/epoch_fp16" \
    && run_note epoch_fp16 "$WORK/epoch_fp16"
  run epoch_graphs $PY train_lora.py "${LORA[@]}" --precision bf16 --cuda_graphs --out_dir "$WORK/epoch_graphs" \
    && run_note epoch_graphs "$WORK/epoch_graphs"
  compare "one epoch, bf16 eager against fp16 eager" epoch_fp16 epoch_bf16
  compare "one epoch, bf16 eager against bf16 --cuda_graphs" epoch_bf16 epoch_graphs

  TEACHER=$WORK/epoch_bf16; [ -f "$TEACHER/metrics.json" ] || TEACHER=$WORK/epoch_graphs
  if [ -f "$TEACHER/metrics.json" ]; then
    run distil $PY train_distil.py --mode distil --teacher "$TEACHER" --data_dir "$DATA" "${SMALL[@]}" --epochs 2 \
      --out_dir "$WORK/distil" --cache_dir "$WORK/cache" && run_note distil "$WORK/distil"
  else
    # not a failure of its own: the runs that make the teacher failed (counted already) or were skipped
    printf 'distil\t-\tskipped: no teacher (no train_lora.py run finished)\n' >>"$SUMMARY"
  fi

  echo; echo "=== summary ($(date +%T), $(seconds $(($(now_ms) - START_MS)))s of the ${BUDGET}s budget used;" \
    "wall seconds include each process's startup)"
  {
    printf '%-24s %9s  %s\n' step "wall s" status
    while IFS=$'\t' read -r name secs status; do printf '%-24s %9s  %s\n' "$name" "$secs" "$status"; done <"$SUMMARY"
    echo
    [ -f "$WORK/notes.txt" ] && cat "$WORK/notes.txt"
  } | tee "$LOGS/summary.txt"
  for r in epoch_bf16 epoch_fp16 epoch_graphs distil; do
    [ -f "$WORK/$r/metrics.json" ] && cp "$WORK/$r/metrics.json" "$LOGS/metrics_$r.json"
  done
  return $FAILED
}

main 2>&1 | tee "$LOGS/gpu_check.log"
exit "${PIPESTATUS[0]}"
