"""What the benchmarks share and the product does not have: a random GPT-2 checkpoint, the transformers + PEFT
baseline built from our model's weights, timing, and peak-memory measurement. Loading, batching, the device
and precision choice, autocast and the training step itself are the product's own (model, data, cli,
precision, train_step).

Run from the repository root (python bench/bench_lora.py ...); this file puts the root on sys.path.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if (ROOT.parent / "shared" / "tiktoken").is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(ROOT.parent / "shared" / "tiktoken"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random weights only: the hub is never needed

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from cli import pick_device  # noqa: E402
from data import PAD_TOKEN, Batch, iterate, load_cola  # noqa: E402
from lora import TARGETS, inject_lora, lora_modules  # noqa: E402
from model import GPT  # noqa: E402
from precision import Precision, choose_precision  # noqa: E402
from train_step import EagerStep, FixedShapeStep, RunningMetrics, bucket_length  # noqa: E402
from trainer import make_optimizer  # noqa: E402

# (n_layer, n_head, n_embd); the vocabulary and context stay GPT-2's, since the batches are real CoLA tokens.
SHAPES = {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024), "tiny": (4, 4, 256)}
LORA = dict(r=8, alpha=16.0, dropout=0.1)  # train_lora.py's defaults
# PEFT names the two c_proj layers alike, so "c_proj" covers attn.c_proj and mlp.c_proj: the same 4 layers.
PEFT_TARGETS = ["c_attn", "c_proj", "c_fc"]
DEFAULT_DATA = ROOT.parent / "shared" / "cola" if (ROOT.parent / "shared" / "cola").is_dir() else ROOT / "data"


def add_args(p) -> None:
    p.add_argument("--device", default="auto", help="auto picks cuda if available, else cpu")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="as train_lora.py's: auto is bf16 on CUDA >= 8.0, fp16 (loss-scaled) below, fp32 on CPU")
    p.add_argument("--variant-shape", default="gpt2", choices=list(SHAPES))
    p.add_argument("--compile", action="store_true", help="torch.compile both sides (dynamic shapes)")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA), help="a --data_dir holding CoLA")
    p.add_argument("--cache-dir", default=os.environ.get("BENCH_CACHE", "/tmp/gpt2-lora-bench"),
                   help="where the random GPT-2 checkpoint is written once")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's, one per core)")


def setup(args) -> tuple[torch.device, Precision]:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    return device, choose_precision(device, args.precision)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine() -> str:
    """CPU model (lscpu), usable cores and, on CUDA, the GPU: the line each results table carries."""
    cpu = platform.processor() or "unknown CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        cpu = re.search(r"Model name:\s*(.+)", out).group(1).strip()
    except (OSError, AttributeError):
        pass
    s = f"{cpu}, {len(os.sched_getaffinity(0))} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    if torch.cuda.is_available():
        s += f", GPU {torch.cuda.get_device_name()}"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())  # other processes on a shared machine skew timings
    return s + f", load average {load} at start, {date.today().isoformat()}"


# ---------------------------------------------------------------- models

def checkpoint(shape: str, cache_dir: str, seed: int = 0) -> Path:
    """A transformers GPT-2 checkpoint of the given shape with random weights, written once and reused. Written
    beside and renamed, so that a run killed mid-write (a step's timeout) leaves no half checkpoint to reuse."""
    import shutil
    import tempfile

    from transformers import GPT2Config, GPT2LMHeadModel
    path = Path(cache_dir) / f"{shape}-seed{seed}"
    if not path.is_dir():
        n_layer, n_head, n_embd = SHAPES[shape]
        torch.manual_seed(seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
        GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd)).save_pretrained(partial)
        try:
            partial.rename(path)
        except OSError:  # another process wrote it first
            shutil.rmtree(partial)
    return path


def build_ours(ckpt: Path, seed: int = 0, lora: bool = True) -> GPT:
    torch.manual_seed(seed)
    model = GPT.from_pretrained(str(ckpt))  # GPT-2's own dropout 0, our default
    own_memory(model)
    if lora:
        inject_lora(model, LORA["r"], LORA["alpha"], LORA["dropout"], TARGETS)
    return model


@torch.no_grad()
def own_memory(model: nn.Module) -> None:
    """Both loaders map the checkpoint file into memory: a weight would count in RSS only once touched, in the
    middle of a measurement. Copy every weight into memory of its own (strides kept: ours stay transposed views)."""
    for p in model.parameters():
        p.data = p.data.clone()


def build_baseline(ckpt: Path, ours: GPT) -> nn.Module:
    """transformers' GPT2ForSequenceClassification + PEFT LoRA, with our model's score head and LoRA A and B."""
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2ForSequenceClassification
    transformers.logging.set_verbosity_error()  # "score is newly initialized": we copy it just below
    hf = GPT2ForSequenceClassification.from_pretrained(
        ckpt, num_labels=2, pad_token_id=PAD_TOKEN, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        attn_implementation="sdpa", use_cache=False)
    with torch.no_grad():
        hf.score.weight.copy_(ours.score.weight)
    own_memory(hf)
    peft = get_peft_model(hf, LoraConfig(task_type="SEQ_CLS", r=LORA["r"], lora_alpha=LORA["alpha"],
                                         lora_dropout=LORA["dropout"], target_modules=PEFT_TARGETS,
                                         fan_in_fan_out=True))  # SEQ_CLS also trains `score`
    copy_lora(ours, peft)
    return peft


@torch.no_grad()
def copy_lora(ours: GPT, peft: nn.Module) -> None:
    """Our LoRA A and B into PEFT's (both are (r, in) and (out, r), whatever fan_in_fan_out says)."""
    theirs = dict(peft.named_modules())
    for name, m in lora_modules(ours).items():
        t = theirs[f"base_model.model.{name}"]
        t.lora_A["default"].weight.copy_(m.lora_A)
        t.lora_B["default"].weight.copy_(m.lora_B)


def ours_logits(model: nn.Module, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    return model.classify(ids, lengths)


def baseline_logits(model: nn.Module, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    # No attention_mask: with right padding and causal attention no real token sees a pad, and the head pools
    # the last non-pad token, so the logits are the same; without a mask SDPA takes its fastest (causal) path.
    return model(input_ids=ids).logits


@torch.no_grad()
def check_equivalence(ours: GPT, baseline: nn.Module, batch: Batch, device: torch.device) -> float:
    """Max |logit difference| in eval mode, fp32, with a random (shared) B so LoRA contributes; B is reset
    to zero after. A benchmark of two models that compute different things would be meaningless."""
    for m in lora_modules(ours).values():
        m.lora_B.normal_(0, 0.02)
    copy_lora(ours, baseline)
    ours.eval(), baseline.eval()
    diff = (ours_logits(ours, batch.ids, batch.lengths) - baseline_logits(baseline, batch.ids, batch.lengths)).abs().max().item()
    for m in lora_modules(ours).values():
        m.lora_B.zero_()
    copy_lora(ours, baseline)
    ours.train(), baseline.train()
    if diff > 1e-4:
        raise SystemExit(f"ours and the baseline disagree: max |logit diff| {diff:.2e} > 1e-4")
    return diff


class Side:
    """One model being benchmarked, trained by the product's own step (train_step.EagerStep: forward under the
    precision's autocast, cross-entropy, backward (loss-scaled in fp16), clip at 1.0, trainer.py's AdamW), so both
    sides pay for exactly what trainer.fit does per batch."""

    def __init__(self, name: str, model: nn.Module, logits_fn, device: torch.device, precision: Precision, lr: float,
                 compile: bool):
        self.name, self.model, self.device, self.precision = name, model, device, precision
        self.opt = make_optimizer(model, lr, weight_decay=0.01)
        fwd = (lambda ids, lengths: logits_fn(model, ids, lengths))
        self.forward = torch.compile(fwd, dynamic=True) if compile else fwd
        self.train_step = EagerStep(self.forward, lambda logits, b: F.cross_entropy(logits, b.labels), self.opt, 1.0,
                                    RunningMetrics(device), device, precision)

    @torch.no_grad()
    def eval_step(self, batch: Batch) -> torch.Tensor:
        with self.precision.autocast():
            return self.forward(batch.ids, batch.lengths).float()


class GraphedSide:
    """Ours as train_lora.py --cuda_graphs trains it: train_step.FixedShapeStep (fixed shapes, one CUDA graph per
    length bucket, frozen weights in the compute dtype), fed CPU batches as trainer.fit feeds it (the copy to the
    device, one pinned buffer a step, is timed; the other sides get their batches already on the device)."""

    def __init__(self, name: str, model: nn.Module, device: torch.device, precision: Precision, lr: float,
                 batch_size: int, batches: list[Batch]):
        self.name, self.model = name, model
        self.opt = make_optimizer(model, lr, weight_decay=0.01)
        self.step = FixedShapeStep(model, lambda logits, b: F.cross_entropy(logits, b.labels), self.opt, 1.0,
                                   batch_size, RunningMetrics(device), device, precision, graphs=True)
        self.on_host = {id(b): Batch(*(t.cpu() for t in (b.ids, b.lengths, b.labels, b.index))) for b in batches}

    def train_step(self, batch: Batch) -> None:
        self.step(self.on_host[id(batch)])

    def padded_tokens(self, batches: list[Batch]) -> int:
        """What it computes: batch_size rows of the bucket's length, whatever the batch."""
        return sum(self.step.batch_size * bucket_length(b.ids.size(1), self.step.buckets) for b in batches)


def num_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------- data

def cola_batches(data_dir: str, batch_size: int, seed: int, device: torch.device) -> tuple[list[Batch], list[Batch]]:
    """One epoch of training batches (data.iterate: shuffled, length-bucketed) and the dev set's eval batches
    (sorted by length), already on the device."""
    data = load_cola(data_dir)
    train = [b.to(device) for b in iterate(data["train"], batch_size, shuffle=True, seed=seed)]
    dev = [b.to(device) for b in iterate(data["dev"], batch_size, shuffle=False)]
    return train, dev


def real_tokens(batches: list[Batch]) -> int:
    return int(sum(int(b.lengths.sum()) for b in batches))


def padded_tokens(batches: list[Batch]) -> int:
    return sum(b.ids.numel() for b in batches)


# ---------------------------------------------------------------- model FLOPs utilisation

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, first match of the device name wins. An
# H100 or H200 whose name says neither PCIe nor NVL is taken to be the SXM part (989 TFLOP/s).
BF16_PEAK_FLOPS = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H200 NVL", 835e12), ("H100", 989e12),
                   ("H200", 989e12), ("A100", 312e12)]


def bf16_peak(device: torch.device) -> tuple[str, float] | None:
    """(device name, its bf16 dense peak FLOP/s), or None where it is not known (and on CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next(((name, peak) for key, peak in BF16_PEAK_FLOPS if key in name), None)


def train_flops_per_token(model: GPT, seq_len: float) -> float:
    """Model FLOPs of one LoRA training step per token, the same for both sides (what the model needs, not what
    an implementation computes): the forward (2 per multiply-add of every block's linear layers, plus
    attention's QK^T and AV over seq_len positions), the backward to the inputs (as much again: frozen weights
    get no gradient), and LoRA's A and B (forward, input and weight gradients: 6 per parameter)."""
    c = model.config
    frozen = sum(m.weight.numel() for m in model.transformer.h.modules() if isinstance(m, nn.Linear))
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    attention = 4 * c.n_layer * c.n_embd * seq_len
    return 2 * (2 * frozen + attention) + 6 * lora


def timed(fn, batches: list[Batch], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    for b in batches:
        fn(b)
    sync(device)
    return time.perf_counter() - t0


def median(xs) -> float:
    return statistics.median(xs)


# ---------------------------------------------------------------- peak memory, one process per side

def _proc_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


class PeakMemory:
    """Peak memory of the code run inside `with PeakMemory(device) as m:`, in bytes: m.peak (all memory of
    the process, or all CUDA tensors) and m.growth (peak minus what was held on entry, i.e. the weights).

    CUDA: torch.cuda.max_memory_allocated (tensors only), reset on entry.
    CPU: the process's peak resident set (VmHWM), reset on entry through /proc/self/clear_refs (Linux).
    Run each side in its own process, started with MALLOC_MMAP_THRESHOLD_ (see memory_env) so that freed
    tensors go back to the OS and later ones cannot hide in memory an earlier phase left behind.
    """

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            try:
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            except OSError:
                pass
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            self.start = _proc_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak = _proc_kib("VmHWM") * 1024
        self.growth = self.peak - self.start


def memory_env() -> dict:
    """Environment for a memory-measuring child: glibc serves every allocation over 64 KiB with its own mmap
    and unmaps it on free, instead of keeping freed memory in its heap (which would make RSS lag behind)."""
    return {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}


def run_worker(script: str, args: list[str]) -> dict:
    """Run `python script args...` in a fresh process; it prints one JSON line last, which is returned."""
    out = subprocess.run([sys.executable, script, *args], env=memory_env(), capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"worker {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def training_memory(side: Side, train: list[Batch], steps: int, device: torch.device) -> dict:
    """Peak memory of training: over `steps` steps on the epoch's first batches (typical ones), then over one
    step on its largest batch (what sets an epoch's peak). The first phase includes the first optimizer step,
    which allocates AdamW's state. "growth" is the peak minus the memory held before the first step (the
    loaded model)."""
    biggest = max(train, key=lambda b: b.ids.numel())
    out, loaded = {}, None
    for phase, batches in (("typical", train[:steps]), ("largest", [biggest])):
        with PeakMemory(device) as m:
            timed(side.train_step, batches, device)
        loaded = m.start if loaded is None else loaded
        out[phase] = {"peak": m.peak, "growth": m.peak - loaded, "tokens": max(b.ids.numel() for b in batches)}
    return out


def memory_rows(a: dict, b: dict, steps: int) -> list[list[str]]:
    """Table rows comparing two training_memory results (ratio a / b)."""
    rows = []
    for phase in ("typical", "largest"):
        x, y = a[phase], b[phase]
        what = (f"{steps} typical steps (<= {x['tokens']} padded tokens)" if phase == "typical"
                else f"the epoch's largest batch ({x['tokens']} padded tokens)")
        rows += [[f"peak memory, {what}", mib(x["peak"]), mib(y["peak"]), f"{x['peak'] / y['peak']:.2f}"],
                 ["  of which above the loaded model", mib(x["growth"]), mib(y["growth"]), f"{x['growth'] / y['growth']:.2f}"]]
    return rows


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def table(rows: list[list[str]]) -> str:
    """A markdown table; the first row is the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(rows[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, rows[1:])])
