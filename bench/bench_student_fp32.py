"""What running the student in fp32 with autocast off costs (issue 21): train_distil.py's step under bf16 (or
--precision) autocast, the student as it is now (DistilRNN.classify turns autocast off: everything fp32) against
the same code with autocast left on (the recurrent layer and the head under autocast, as before), side by side in
one process, alternating, on the same batches.

    python bench/bench_student_fp32.py                       # CPU, bf16 autocast, 256 CoLA sentences a round
    python bench/bench_student_fp32.py --device cuda         # on a GPU (unmeasured so far)

Under CUDA autocast the "before" side is what ran before: cuDNN's RNN autocast wrapper casts to fp16 whatever the
autocast dtype. On CPU the comparison is what autocast would change there.
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from common import DEFAULT_DATA, machine, setup  # puts the repository root on sys.path
import model as model_module  # noqa: E402
from data import iterate, load_cola  # noqa: E402
from model import DistilRNN  # noqa: E402
from train_step import EagerStep, RunningMetrics  # noqa: E402
from trainer import make_optimizer  # noqa: E402


def run(fp32: bool, batches, device, precision, seed: int = 0) -> float:
    """Seconds for one pass of training steps over `batches` by a fresh default student."""
    torch.manual_seed(seed)
    student = DistilRNN(embd_dim=1024, hidden_size=256, dropout=0.3).to(device)
    student.wte.sparse = True
    step = EagerStep(student.classify, lambda logits, b: F.cross_entropy(logits, b.labels),
                     make_optimizer(student, 2e-3, 0.01), 1.0, RunningMetrics(device), device, precision)
    off = model_module.autocast_off
    model_module.autocast_off = off if fp32 else (lambda device_type: nullcontext())
    try:
        step(batches[0])  # warm-up: optimizer state, allocator
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for b in batches:
            step(b)
        step.metrics.read()  # waits for the device
        return time.perf_counter() - t0
    finally:
        model_module.autocast_off = off


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="bf16", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--data-dir", default=str(DEFAULT_DATA))
    p.add_argument("--rows", type=int, default=256, help="CoLA training sentences a round")
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    device, precision = setup(a)
    batches = list(iterate(load_cola(a.data_dir, a.rows)["train"], 32, shuffle=True, seed=0))
    print(machine())
    times = {True: [], False: []}
    for rnd in range(a.rounds):
        for fp32 in ((True, False) if rnd % 2 == 0 else (False, True)):
            times[fp32].append(run(fp32, batches, device, precision))
            print(f"round {rnd} {'fp32, autocast off' if fp32 else 'under autocast'}: {times[fp32][-1]:.2f} s",
                  flush=True)
    now, before = statistics.median(times[True]), statistics.median(times[False])
    print(f"{len(batches)} steps of batch 32, {precision.describe()}, median of {a.rounds} alternating rounds: "
          f"student in fp32 {now:.2f} s, under autocast {before:.2f} s; fp32 / autocast = {now / before:.2f}x time")


if __name__ == "__main__":
    main()
