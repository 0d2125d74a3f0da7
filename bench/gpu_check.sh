#!/usr/bin/env bash
# The device check of issue 9, as one prepared run of under 8 minutes on one H100/H200: every goal measured in
# the same run as its baseline (today's eager path, transformers + PEFT). Each step has its own timeout; the
# timeouts add up to 460 s. The eager train_lora.py baseline runs 3 epochs of the default run (its per-epoch
# times compare with the graphed run's; a full eager run, ~215 s plus startup when the issue was filed, would not
# fit beside the rest).
#
# Before the run, on the machine with ../shared, copy the data into a git-ignored folder that travels:
#   mkdir -p .devcarry && cp -r ../shared/cola ../shared/tiktoken .devcarry/
# Then run, from the repository root there (device tool: carry [".devcarry"], timeout_s 540):
#   bash bench/gpu_check.sh          (it writes $OUT/gpu_check.log)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 TIKTOKEN_CACHE_DIR=$PWD/.devcarry/tiktoken HF_HUB_OFFLINE=1 TQDM_DISABLE=1
export BENCH_CACHE=/tmp/gpt2-lora-bench
DATA=$PWD/.devcarry/cola
CKPT=$BENCH_CACHE/gpt2-medium-seed0  # random weights of the gpt2-medium shape, shared with bench/
RUN=/tmp/rand
step() { echo; echo "=== $* ($(date +%T))"; }
wall() {  # wall LABEL SECONDS CMD...: CMD under a timeout, then "LABEL: wall N s, exit E" (exit 124: timed out)
  local label=$1 limit=$2; shift 2
  if [ -x /usr/bin/time ]; then /usr/bin/time -f "$label: wall %e s, exit %x" timeout "$limit" "$@"
  else TIMEFORMAT="$label: wall %R s"; time timeout "$limit" "$@"; fi
}

step "0. machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(), '| transformers', transformers.__version__)"
timeout 40 python -c "import sys; sys.path.insert(0, 'bench'); from common import checkpoint; print(checkpoint('gpt2-medium', '$BENCH_CACHE'))"

step "1. goal 6: CUDA tests (graphed step vs eager within bf16 tolerance, capture fallback) and the model tests"
timeout 75 python -m pytest -q tests/test_cuda.py tests/test_model.py -p no:cacheprovider

step "2. goal 1: train_lora.py, all defaults (10 epochs, full CoLA, dev eval each epoch), --cuda_graphs"
wall "train_lora.py full default run, --cuda_graphs" 70 python train_lora.py --gpt_variant "$CKPT" --data_dir "$DATA" \
  --out_dir $RUN/lora_graphs --plots_dir $RUN/plots --cuda_graphs

step "3. goal 1 baseline: the same run eager (today's default path), first 3 epochs"
wall "train_lora.py default run, eager, 3 epochs" 110 python train_lora.py --gpt_variant "$CKPT" --data_dir "$DATA" \
  --out_dir $RUN/lora_eager --plots_dir $RUN/plots --epochs 3

step "4. goal 2: training throughput at batch 32, bf16: eager vs --cuda_graphs vs transformers+PEFT, MFU"
timeout 85 python bench/bench_lora.py --device cuda --variant-shape gpt2-medium --batch-size 32 --cuda-graphs \
  --steps 30 --eval-rounds 2 --no-memory --cache-dir "$BENCH_CACHE"

step "5. goal 3: train_distil.py --mode distil, full default run, teacher pass included (teacher: step 2's)"
wall "train_distil.py --mode distil full run" 45 python train_distil.py --mode distil --teacher $RUN/lora_graphs \
  --data_dir "$DATA" --out_dir $RUN/distil --cache_dir $RUN/cache --plots_dir $RUN/plots

step "6. goal 4: load time, GPT.from_pretrained + inject_lora vs transformers' from_pretrained"
if [ -f bench/bench_load.py ]; then timeout 35 python bench/bench_load.py --variant-shape gpt2-medium
else echo "bench/bench_load.py not present: load unmeasured"; fi

step "summary"
cp "$OUT/gpu_check.log" /tmp/gpu_check_so_far.log  # not the log itself: this step's output goes into it
grep -E ": wall |passed|failed|error|^\| training|^\| MFU|^\| eval|^epoch [0-9]+:|--cuda_graphs" /tmp/gpu_check_so_far.log
