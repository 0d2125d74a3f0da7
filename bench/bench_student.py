"""Student training speed: the sparse embedding gradient with lazy Adam rows (train_distil.py's default) against
the dense gradient with AdamW on all 51M embedding entries (--dense_embedding_grad, the update before issue 15).

    python bench/bench_student.py                              # 1024 CoLA sentences an epoch, CPU
    python bench/bench_student.py --max-train-samples 8551     # a full CoLA epoch

Each side is train_distil.py's step: the default student (BiGRU 256 over a 1024-wide trainable embedding, as
with gpt2-medium's wte), trainer.make_optimizer, the LambdaLR schedule and train_step.EagerStep (clipping 1.0),
over the same shuffled CoLA batches, for --mode rnn (labels) and --mode distil (cached teacher logits: random
ones, since cost does not depend on their values). Sides alternate, dense then lazy, each round; the first
round is warm-up. Evaluation is not timed (it is the same for both). Also printed: the optimizer state a
checkpoint writes, and the largest weight difference between the sides after one epoch from the same start
(they are different updates, so it is not zero; the same-quality evidence is in RESULTS.md).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from common import DEFAULT_DATA, machine, setup, table  # puts the repository root on sys.path
from data import iterate, load_cola, num_batches  # noqa: E402
from distill import make_kd_loss  # noqa: E402
from model import DistilRNN  # noqa: E402
from precision import Precision  # noqa: E402
from train_step import EagerStep, RunningMetrics  # noqa: E402
from trainer import make_optimizer, optimizer_tensors, warmup_linear  # noqa: E402


def epoch(sparse: bool, loss_fn, train, batch_size: int, device: torch.device, precision: Precision,
          seed: int) -> tuple[float, DistilRNN, dict]:
    """One epoch of training steps of a fresh student; returns its time, the student and its optimizer tensors."""
    torch.manual_seed(seed)
    student = DistilRNN(embd_dim=1024, hidden_size=256, dropout=0.3).to(device)
    student.wte.sparse = sparse
    opt = make_optimizer(student, 2e-3, 0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_linear(num_batches(train, batch_size), 0.06))
    step = EagerStep(student.classify, loss_fn, opt, 1.0, RunningMetrics(device), device, precision)
    batches = list(iterate(train, batch_size, shuffle=True, seed=seed))
    student.train()
    t0 = time.perf_counter()
    for b in batches:
        step(b)
        sched.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, student, optimizer_tensors(opt)[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="as train_distil.py's (auto: fp32 on CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA))
    p.add_argument("--max-train-samples", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2, help="timed rounds (median reported), after one warm-up")
    a = p.parse_args()
    device, precision = setup(a)
    train = load_cola(a.data_dir, a.max_train_samples)["train"]
    teacher = torch.randn(len(train), 2)  # (N, 2) the cached teacher logits
    modes = {"rnn": lambda logits, batch: F.cross_entropy(logits, batch.labels),
             "distil": make_kd_loss(teacher, 2.0, 0.7)}
    print(machine())
    times = {(m, s): [] for m in modes for s in (False, True)}
    last = {}
    for rnd in range(a.repeats + 1):
        for mode, loss_fn in modes.items():
            for sparse in (False, True):
                t, student, opt_tensors = epoch(sparse, loss_fn, train, a.batch_size, device, precision, seed=0)
                if rnd:
                    times[mode, sparse].append(t)
                last[mode, sparse] = student, opt_tensors
                print(f"round {rnd} {mode} {'lazy' if sparse else 'dense'}: {t:.2f} s", flush=True)
    steps = num_batches(train, a.batch_size)
    rows = [["mode", "dense AdamW s/epoch", "lazy s/epoch", "dense ms/step", "lazy ms/step", "speed-up",
             "optimizer state written, dense -> lazy", "max |w_dense - w_lazy| after the epoch"]]
    for mode in modes:
        d, s = statistics.median(times[mode, False]), statistics.median(times[mode, True])
        nbytes = [sum(t.numel() * t.element_size() for t in last[mode, sp][1].values()) for sp in (False, True)]
        diff = max((x - y).abs().max().item() for x, y in zip(last[mode, False][0].parameters(),
                                                              last[mode, True][0].parameters()))
        rows.append([mode, f"{d:.2f}", f"{s:.2f}", f"{1000 * d / steps:.0f}", f"{1000 * s / steps:.0f}",
                     f"{d / s:.2f}x", f"{nbytes[0] / 2**20:,.0f} MiB -> {nbytes[1] / 2**20:,.0f} MiB", f"{diff:.3g}"])
    print(f"{len(train)} CoLA sentences, batch {a.batch_size}, {steps} steps an epoch; median of {a.repeats} "
          f"alternating rounds after one warm-up")
    print(table(rows))


if __name__ == "__main__":
    main()
