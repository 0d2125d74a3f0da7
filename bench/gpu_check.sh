#!/usr/bin/env bash
# The device check (issue 14): one call of at most 6 minutes on one CUDA GPU, on a bare machine with no ../shared
# and no network, each measurement beside its baseline in the same run. docs/gpu.md says what it measures.
#
#   bash bench/gpu_check.sh --prepare   here, where ../shared (or the network) is: CoLA's raw TSVs and tiktoken's
#                                       GPT-2 BPE files into .devcarry/ (git-ignored, about 2 MB); prints the carry
#   bash bench/gpu_check.sh             on the device, from the repository root (device tool: carry [".devcarry"],
#                                       timeout_s 420); its log, summary and metrics go to $OUT (else its temp dir)
#   bash bench/gpu_check.sh --dry-run   the same steps on the CPU with tiny shapes, in a few minutes: the plumbing
#
# Steps run in order of importance, each under its own timeout, and none starts once the run's budget
# (GPU_CHECK_BUDGET seconds: 330 on the device, 1200 for --dry-run, whose limits are tripled) leaves it under a
# third of its limit: a step that does not fit is listed as skipped, not run in part. Every run works in a fresh
# temp dir, so a rerun on the same machine starts at once; only the random checkpoint is kept and reused
# ($BENCH_CACHE). Exit status 0 when every step that ran finished, 1 otherwise, 2 when it cannot start.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-device}
CARRY=.devcarry
PY=${PYTHON:-python3}
case $MODE in
  device|--dry-run|--prepare) ;;
  *) echo "usage: bash bench/gpu_check.sh [--prepare | --dry-run]" >&2; exit 2;;
esac

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
  echo 'device command: bash bench/gpu_check.sh   (timeout_s 420)'
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
  BUDGET=${GPU_CHECK_BUDGET:-1200} SHAPE=tiny SLOW=3  # step limits x3: a shared 2-core CPU is slow to start
  SMALL=(--device cpu --max_train_samples 96 --max_eval_samples 64 --epochs 1)
  EPOCHS2=(--epochs 1)
  BENCH=(--device cpu --variant-shape tiny --steps 3 --round 1 --warmup 1 --eval-batches 1 --eval-rounds 1 --no-memory)
else
  BUDGET=${GPU_CHECK_BUDGET:-330} SHAPE=gpt2-medium SLOW=1
  SMALL=()  # the full default runs
  EPOCHS2=(--epochs 2)
  BENCH=(--device cuda --variant-shape gpt2-medium --cuda-graphs --steps 30 --eval-rounds 2 --no-memory)
fi
START=$(date +%s)
SUMMARY=$WORK/summary.tsv
FAILED=0

run() {  # run NAME LIMIT CMD...: CMD under min(LIMIT, what the budget leaves); its wall seconds (startup included)
         # and exit status go into the summary, its output into the log and $WORK/NAME.log
  local name=$1 cap=$(($2 * SLOW)); shift 2
  local left=$((BUDGET - ($(date +%s) - START)))
  local limit=$((cap < left ? cap : left))
  echo; echo "=== $name ($(date +%T), limit ${limit}s, $((left))s of the budget left)"
  if [ $((limit * 3)) -lt "$cap" ]; then
    echo "skipped: the budget leaves it ${limit}s"
    printf '%s\t-\tskipped (budget)\n' "$name" >>"$SUMMARY"
    return 1
  fi
  local t0 rc secs status
  t0=$(date +%s.%N)
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$WORK/$name.log"
  rc=${PIPESTATUS[0]}
  secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  case $rc in 0) status=ok;; 124|137) status="timed out at ${limit}s"; FAILED=1;; *) status="exit $rc"; FAILED=1;; esac
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
      f"acc {m['majority_baseline']['val_acc']:.3f}), precision {cfg.get('precision', 'not recorded')}")
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

  CKPT=$BENCH_CACHE/$SHAPE-seed0
  run checkpoint 120 $PY -c "import sys; sys.path.insert(0, 'bench'); from common import checkpoint; print(
    checkpoint('$SHAPE', '$BENCH_CACHE'))"

  LORA=(--gpt_variant "$CKPT" --data_dir "$DATA" "${SMALL[@]}")
  run lora_graphs 90 $PY train_lora.py "${LORA[@]}" --out_dir "$WORK/lora_graphs" --cuda_graphs \
    && run_note lora_graphs "$WORK/lora_graphs"
  run lora_eager 150 $PY train_lora.py "${LORA[@]}" --out_dir "$WORK/lora_eager" \
    && run_note lora_eager "$WORK/lora_eager"
  compare "train_lora.py full default run" lora_eager lora_graphs

  run test_cuda 150 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py
  note "test_cuda: $(grep -E '(passed|failed|skipped|error)' "$WORK/test_cuda.log" | tail -1)"

  run bench_lora 100 $PY bench/bench_lora.py "${BENCH[@]}" --data-dir "$DATA" --cache-dir "$BENCH_CACHE"
  grep -E '^\| +\| ours|^\| (training|MFU|eval)' "$WORK/bench_lora.log" >>"$WORK/notes.txt"

  for p in bf16 fp16; do  # eager: --cuda_graphs has no loss scaling
    run "lora_$p" 60 $PY train_lora.py "${LORA[@]}" "${EPOCHS2[@]}" --precision $p --out_dir "$WORK/lora_$p" \
      && run_note "lora_$p" "$WORK/lora_$p"
  done
  compare "bf16 against fp16, eager, ${EPOCHS2[*]}" lora_fp16 lora_bf16

  TEACHER=$WORK/lora_graphs; [ -f "$TEACHER/metrics.json" ] || TEACHER=$WORK/lora_eager
  if [ -f "$TEACHER/metrics.json" ]; then
    run distil 90 $PY train_distil.py --mode distil --teacher "$TEACHER" --data_dir "$DATA" "${SMALL[@]}" \
      --out_dir "$WORK/distil" --cache_dir "$WORK/cache" && run_note distil "$WORK/distil"
  else
    printf 'distil\t-\tskipped: no teacher (both train_lora.py runs failed)\n' >>"$SUMMARY"; FAILED=1
  fi

  echo; echo "=== summary ($(date +%T), $(($(date +%s) - START))s in all; wall seconds include each process's startup)"
  {
    printf '%-24s %9s  %s\n' step "wall s" status
    while IFS=$'\t' read -r name secs status; do printf '%-24s %9s  %s\n' "$name" "$secs" "$status"; done <"$SUMMARY"
    echo
    [ -f "$WORK/notes.txt" ] && cat "$WORK/notes.txt"
  } | tee "$LOGS/summary.txt"
  for r in lora_graphs lora_eager lora_bf16 lora_fp16 distil; do
    [ -f "$WORK/$r/metrics.json" ] && cp "$WORK/$r/metrics.json" "$LOGS/metrics_$r.json"
  done
  return $FAILED
}

main 2>&1 | tee "$LOGS/gpu_check.log"
exit "${PIPESTATUS[0]}"
