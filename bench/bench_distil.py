"""Distillation cost: one epoch of --mode distil (cached teacher logits) against one epoch of --mode rnn, and
against distillation with the teacher run inside the loop. Shows what the teacher-logit cache buys.

    python bench/bench_distil.py                          # gpt2-shape teacher, 2000 CoLA sentences, CPU
    python bench/bench_distil.py --teacher-shape gpt2-medium --max-train-samples 8551 --device cuda

All three run through trainer.fit with the same student, data, optimizer and seed; only the loss differs.
The teacher has random weights of the real shape (cost depends on shape, not on values).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cli import pick_device  # noqa: E402
from data import load_cola  # noqa: E402
from distill import kd_loss, make_kd_loss  # noqa: E402
from lora import inject_lora  # noqa: E402
from model import GPT, HUB_VARIANTS, DistilRNN, GPTConfig  # noqa: E402
from metrics import predict_logits  # noqa: E402
from precision import choose_precision, device_line, store_frozen_weights  # noqa: E402
from trainer import fit  # noqa: E402

SHARED_COLA = Path(__file__).resolve().parents[2] / "shared" / "cola"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"), help="as train_distil.py's")
    p.add_argument("--teacher-shape", default="gpt2", choices=tuple(HUB_VARIANTS))
    p.add_argument("--data-dir", default=str(SHARED_COLA) if SHARED_COLA.is_dir() else "data")
    p.add_argument("--max-train-samples", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2, help="epochs timed per variant (median reported)")
    a = p.parse_args()
    device = pick_device(a.device)
    precision = choose_precision(device, a.precision)
    data = load_cola(a.data_dir, a.max_train_samples)
    train, dev = data["train"], data["dev"]

    n_layer, n_head, n_embd = HUB_VARIANTS[a.teacher_shape]
    torch.manual_seed(0)
    teacher = GPT(GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd))
    inject_lora(teacher, 8, 16.0)
    store_frozen_weights(teacher, precision.dtype)  # as distill.teacher_logits does
    teacher.to(device).eval()

    t0 = time.perf_counter()
    cached = predict_logits(teacher, train, a.batch_size, device, precision)  # what distill.teacher_logits does once
    cache_s = time.perf_counter() - t0

    def teacher_in_loop(logits: torch.Tensor, batch) -> torch.Tensor:
        with torch.no_grad(), precision.autocast():
            t = teacher.classify(batch.ids, batch.lengths).float()
        return kd_loss(logits, t, batch.labels, 2.0, 0.7)

    variants = {
        "rnn (labels only)": lambda logits, batch: F.cross_entropy(logits, batch.labels),
        "distil, cached teacher": make_kd_loss(cached, 2.0, 0.7),
        "distil, teacher in loop": teacher_in_loop,
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    with tempfile.TemporaryDirectory() as tmp:
        args = argparse.Namespace(epochs=1, lr=2e-3, batch_size=a.batch_size, eval_batch_size=a.batch_size,
                                  weight_decay=0.01, warmup_ratio=0.06, grad_clip=1.0, seed=0, resume=False,
                                  compile=False, out_dir=tmp)
        for rep in range(a.repeats + 1):  # the first round is warm-up
            for name, loss_fn in variants.items():
                torch.manual_seed(0)
                student = DistilRNN(embd_dim=768).to(device)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                fit(student, train, dev, loss_fn, args, {}, "bench", lambda: None, precision)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if rep > 0:
                    times[name].append(time.perf_counter() - t0)

    base = statistics.median(times["rnn (labels only)"])
    cpu = platform.processor() or platform.machine()
    print(device_line(device, precision))
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else cpu}, "
          f"{torch.get_num_threads()} threads), torch {torch.__version__}, teacher shape {a.teacher_shape}, "
          f"{len(train)} train sentences, batch {a.batch_size}; one epoch incl. dev eval, median of {a.repeats}")
    print("| variant | epoch s | vs rnn epoch |\n|---|---|---|")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"| {name} | {m:.2f} | {m / base:.2f}x |")
    print(f"| one-time teacher pass for the cache | {cache_s:.2f} | {cache_s / base:.2f}x |")


if __name__ == "__main__":
    main()
