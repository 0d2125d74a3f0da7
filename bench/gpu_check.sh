#!/usr/bin/env bash
# The CUDA check, as one prepared run on a GPU machine (about 8 minutes on one H100/H200).
#
# Before the run, on the machine with ../shared, copy the data into a git-ignored folder that travels:
#   mkdir -p .devcarry && cp -r ../shared/cola ../shared/tiktoken .devcarry/
# Then run, from the repository root there:  bash bench/gpu_check.sh   (it writes $OUT/gpu_check.log)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 TIKTOKEN_CACHE_DIR=$PWD/.devcarry/tiktoken HF_HUB_OFFLINE=1 TQDM_MININTERVAL=30
DATA=$PWD/.devcarry/cola
step() { echo; echo "=== $* ($(date +%T))"; }

step "1. machine"
nvidia-smi
python -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(), '| transformers', transformers.__version__)"

step "2. pretrained GPT-2 weights already here?"
ls -d ~/.cache/huggingface/hub/models--*gpt2* 2>/dev/null
find / -xdev \( -path /proc -o -path /sys \) -prune -o -type f \( -name 'model.safetensors' -o -name 'pytorch_model.bin' \) \
  -path '*gpt2*' -print 2>/dev/null | head -20
REAL=$(python - <<'EOF'
from transformers import GPT2LMHeadModel
for name in ("gpt2-medium", "gpt2"):
    try:
        GPT2LMHeadModel.from_pretrained(name); print(name); break
    except OSError:
        pass
EOF
)
echo "real weights usable offline: ${REAL:-none}"
if [ -n "$REAL" ]; then
  timeout 300 python train_lora.py --gpt_variant "$REAL" --data_dir "$DATA" --out_dir /tmp/real/lora --plots_dir "$OUT"
  timeout 120 python train_distil.py --mode rnn --teacher /tmp/real/lora --data_dir "$DATA" --out_dir /tmp/real/rnn --plots_dir "$OUT"
  timeout 120 python train_distil.py --mode distil --teacher /tmp/real/lora --data_dir "$DATA" --out_dir /tmp/real/distil \
    --cache_dir /tmp/real/cache --plots_dir "$OUT"
fi

step "3. test suite with CUDA visible (CUDA-only tests in tests/test_cuda.py)"
timeout 240 python -m pytest -q -x tests/test_cuda.py tests/test_model.py tests/test_lora.py -p no:cacheprovider

step "4. throughput, gpt2-medium shape, bf16: ours vs transformers+PEFT, without and with --compile"
timeout 150 python bench/bench_lora.py --device cuda --variant-shape gpt2-medium --steps 60
timeout 240 python bench/bench_lora.py --device cuda --variant-shape gpt2-medium --steps 60 --compile --no-memory

step "5. full train_lora.py: 10 epochs, 8551 sentences, random gpt2-medium shape (wall time excludes model load)"
python - <<'EOF'
import torch
from transformers import GPT2Config, GPT2LMHeadModel
torch.manual_seed(0)
GPT2LMHeadModel(GPT2Config(n_layer=24, n_head=16, n_embd=1024)).save_pretrained("/tmp/gpt2-medium-random")
EOF
/usr/bin/time -f "train_lora wall %e s" timeout 300 python train_lora.py --gpt_variant /tmp/gpt2-medium-random \
  --data_dir "$DATA" --out_dir /tmp/rand/lora --plots_dir /tmp/rand/plots | grep -E "^epoch|best|out-of-domain|trainable"

step "6. train_distil.py on that teacher"
/usr/bin/time -f "train_distil wall %e s" timeout 200 python train_distil.py --mode distil --teacher /tmp/rand/lora \
  --data_dir "$DATA" --out_dir /tmp/rand/distil --cache_dir /tmp/rand/cache --plots_dir /tmp/rand/plots | grep -E "^epoch|best|agrees"
