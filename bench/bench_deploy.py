"""What the student saves at deployment: the LoRA teacher (gpt2-medium shape, adapter merged) against the DistilRNN
student (the default BiGRU over a 1024-wide embedding), and the student with its embedding stored in fp16 or
bf16. For each: parameters, bytes to ship, batch-1 latency (median and p90 over real dev sentences), throughput
at a large batch, peak memory (one process per side), and the largest change of P(acceptable) on dev against
the fp32 student.

    python bench/bench_deploy.py                      # CPU
    python bench/bench_deploy.py --student_run runs/distil

The run directories are written as train_lora.py and train_distil.py write them (random weights: a
gpt2-medium-shaped base, a random adapter, a student whose embedding is the base's) and loaded through
inference.load_classifier, as predict.py loads them. The costs are real; the predictions are a random model's,
unless --student_run names a trained student. Sides alternate call by call; medians are reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from common import DEFAULT_DATA, PeakMemory, checkpoint, machine, mib, run_worker, setup, table

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from data import collate, load_cola  # noqa: E402
from inference import Classifier, load_classifier, p_acceptable  # noqa: E402
from lora import TARGETS, inject_lora, lora_modules, save_adapter  # noqa: E402
from model import GPT, STUDENT_CONFIG, STUDENT_WEIGHTS, DistilRNN  # noqa: E402
from precision import Precision  # noqa: E402

SHAPE = "gpt2-medium"
STORED = {"fp16": torch.float16, "bf16": torch.bfloat16}  # student variants: the embedding's dtype
SIDES = ("teacher", "student", "student-fp16", "student-bf16")


def run_dirs(work: Path, student_run: Path | None) -> dict[str, Path]:
    return {**{side: work / side for side in SIDES}, **({"student": student_run} if student_run else {})}


def make_runs(work: Path, ckpt: Path, student_run: Path | None) -> dict[str, Path]:
    """The teacher's and the students' run directories; the teacher (and the random student) written once."""
    runs = run_dirs(work, student_run)
    if not (runs["teacher"] / "adapter.safetensors").is_file():
        torch.manual_seed(0)
        base = GPT.from_pretrained(str(ckpt))
        inject_lora(base, r=8, alpha=16.0, dropout=0.1, targets=TARGETS)
        for m in lora_modules(base).values():  # B starts at zero: a trained adapter is not, and merging must work
            nn.init.normal_(m.lora_B, std=0.02)
        c = base.config
        save_adapter(base, runs["teacher"], {
            "gpt_variant": str(ckpt.resolve()), "lora_rank": 8, "lora_alpha": 16.0, "lora_dropout": 0.1,
            "lora_targets": list(TARGETS), "rslora": False, "n_layer": c.n_layer, "n_head": c.n_head,
            "n_embd": c.n_embd, "vocab_size": c.vocab_size, "n_classes": c.n_classes})
        if student_run is None:  # train_distil.py's default student: the base's embedding, BiGRU 256
            student = DistilRNN(embd_dim=c.n_embd, hidden_size=256, dropout=0.3)
            student.wte.weight.data.copy_(base.transformer.wte.weight)
            write_student(runs["student"], student.config, student.state_dict())
        del base
    config = json.loads((runs["student"] / STUDENT_CONFIG).read_text())
    weights = load_file(str(runs["student"] / STUDENT_WEIGHTS))
    for name, dtype in STORED.items():  # rewritten each run: --student_run may name another student
        write_student(runs[f"student-{name}"], config, {**weights, "wte.weight": weights["wte.weight"].to(dtype)})
    return runs


def write_student(run: Path, config: dict, weights: dict[str, torch.Tensor]) -> None:
    run.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in weights.items()}, str(run / STUDENT_WEIGHTS))
    (run / STUDENT_CONFIG).write_text(json.dumps(config, indent=2))


def load_side(side: str, run: Path, device: torch.device, precision: Precision) -> Classifier:
    """The side as predict.py loads it; an fp16/bf16 student also keeps its embedding in that dtype in memory
    (load_classifier would widen it to fp32), the looked-up rows widened to fp32 for the GRU."""
    clf = load_classifier(run, device, precision)
    if side.startswith("student-"):
        wte = clf.model.wte
        wte.weight.data = wte.weight.data.to(STORED[side.removeprefix("student-")])
        wte.register_forward_hook(lambda module, inputs, out: out.float())
    return clf


def ship_bytes(side: str, run: Path) -> int:
    files = list(run.iterdir())
    if side == "teacher":
        base = Path(json.loads((run / "adapter_config.json").read_text())["gpt_variant"])
        files += [base / "config.json", base / "model.safetensors"]
    return sum(f.stat().st_size for f in files if f.is_file())


@torch.no_grad()
def call(clf: Classifier, batch) -> None:
    clf.model.classify(batch.ids, batch.lengths)


def timed(fn, *args) -> tuple[float, float]:
    """Wall-clock and CPU seconds of one call. On a machine shared with other jobs the wall clock also counts
    the time the process waited for a core; its CPU time (all its threads) does not."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn(*args)
    return time.perf_counter() - t0, time.process_time() - c0


def worker(args, runs: dict[str, Path], dev, latency_rows: list[int], throughput_rows: list[int],
           device: torch.device, precision: Precision) -> None:
    """Peak memory of one side, in its own process: loading, batch-1 calls, one large-batch call."""
    with PeakMemory(device) as m:
        clf = load_side(args.worker, runs[args.worker], device, precision)
        for i in latency_rows[:args.memory_sentences]:
            call(clf, collate(dev, [i]))
        call(clf, collate(dev, throughput_rows))
    print(json.dumps({"peak": m.peak, "growth": m.growth}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu"], help="CPU only: the calls are timed unsynchronised")
    p.set_defaults(precision="fp32")  # predict.py's choice on a CPU
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: one per core)")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA))
    p.add_argument("--cache-dir", default="/tmp/gpt2-deploy-bench", help="random checkpoint and run directories")
    p.add_argument("--student_run", default=None, help="a trained train_distil.py run to use as the student")
    p.add_argument("--latency-sentences", type=int, default=60, help="dev sentences timed at batch 1 (every k-th)")
    p.add_argument("--passes", type=int, default=3, help="passes over those sentences, sides alternating")
    p.add_argument("--throughput-batch", type=int, default=128, help="sentences in the large batch")
    p.add_argument("--memory-sentences", type=int, default=5, help="batch-1 calls in the memory workers")
    p.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    args = p.parse_args()

    device, precision = setup(args)
    work, student_run = Path(args.cache_dir) / "runs", Path(args.student_run) if args.student_run else None
    runs = run_dirs(work, student_run) if args.worker else make_runs(work, checkpoint(SHAPE, args.cache_dir), student_run)
    dev = load_cola(args.data_dir)["dev"]
    step = max(1, len(dev) // args.latency_sentences)
    latency_rows = list(range(0, len(dev), step))[:args.latency_sentences]
    throughput_rows = sorted(range(len(dev)), key=lambda i: len(dev.ids[i]))[::max(1, len(dev) // args.throughput_batch)][:args.throughput_batch]
    if args.worker:
        return worker(args, runs, dev, latency_rows, throughput_rows, device, precision)

    t0 = time.time()
    print(f"# {machine()}\n# python bench/bench_deploy.py {' '.join(sys.argv[1:])}", flush=True)
    sides = {side: load_side(side, runs[side], device, precision) for side in SIDES}
    params = {side: sum(p.numel() for p in {id(p): p for p in clf.model.parameters()}.values())
              for side, clf in sides.items()}  # the teacher's include the merged adapter's A and B

    # largest change of P(acceptable) on all of dev, against the fp32 student
    probs = {side: p_acceptable(clf, dev.ids, 256, device, precision)[0] for side, clf in sides.items() if side != "teacher"}
    delta = {side: float((probs[side] - probs["student"]).abs().max()) for side in SIDES if side != "teacher"}

    # batch-1 latency: per sentence, each side once, in an order that rotates; over --passes passes
    times = {side: [] for side in SIDES}
    batches = [collate(dev, [i]) for i in latency_rows]
    for side in SIDES:  # warm-up
        for b in batches[:3]:
            call(sides[side], b)
    for n in range(args.passes):
        for j, b in enumerate(batches):
            k = (j + n) % len(SIDES)
            for side in SIDES[k:] + SIDES[:k]:
                times[side].append(timed(call, sides[side], b))
    # large-batch throughput: one batch of --throughput-batch dev sentences, sides alternating, --passes times
    big = collate(dev, throughput_rows)
    rate = {side: [] for side in SIDES}
    for n in range(args.passes):
        for side in (SIDES if n % 2 == 0 else SIDES[::-1]):
            rate[side].append([len(throughput_rows) / t for t in timed(call, sides[side], big)])
    del sides
    memory = {side: run_worker(__file__, [*sys.argv[1:], "--worker", side]) for side in SIDES}

    def p90(xs: list[float]) -> float:
        return statistics.quantiles(xs, n=10)[8]

    # [0]: wall clock, [1]: CPU time
    lat = {side: [(statistics.median(x), p90(x)) for x in zip(*times[side])] for side in times}
    thr = {side: [statistics.median(x) for x in zip(*rate[side])] for side in SIDES}
    ship = {side: ship_bytes(side, runs[side]) for side in SIDES}
    rows = [["", *SIDES]]
    rows.append(["parameters", *[f"{params[s]:,}" for s in SIDES]])
    rows.append(["bytes to ship", *[f"{ship[s] / 1e6:,.1f} MB" for s in SIDES]])
    rows.append(["  teacher / side", *[f"{ship['teacher'] / ship[s]:.1f}x" for s in SIDES]])
    for k, clock in enumerate(("wall clock", "CPU time")):
        rows.append([f"batch-1 latency, median ({clock})", *[f"{lat[s][k][0] * 1e3:.2f} ms" for s in SIDES]])
        rows.append([f"batch-1 latency, p90 ({clock})", *[f"{lat[s][k][1] * 1e3:.2f} ms" for s in SIDES]])
        rows.append(["  teacher / side (medians)", *[f"{lat['teacher'][k][0] / lat[s][k][0]:.0f}x" for s in SIDES]])
    for k, clock in enumerate(("wall clock", "CPU time")):
        rows.append([f"throughput, batch {len(throughput_rows)} ({clock})", *[f"{thr[s][k]:,.1f} sent/s" for s in SIDES]])
        rows.append(["  side / teacher", *[f"{thr[s][k] / thr['teacher'][k]:.0f}x" for s in SIDES]])
    rows.append(["peak RSS of the process", *[mib(memory[s]["peak"]) for s in SIDES]])
    rows.append(["  of which model and inference", *[mib(memory[s]["growth"]) for s in SIDES]])
    rows.append(["max |dP(acceptable)| on dev vs fp32 student", "", *[f"{delta[s]:.1e}" for s in SIDES[1:]]])
    print(f"\n{len(latency_rows)} dev sentences x {args.passes} passes at batch 1; device {device}; "
          f"{time.time() - t0:.0f}s")
    print("targets: student >= 300x faster at batch 1, >= 10x smaller to ship, |dP| <= 1e-3\n")
    print(table(rows) + "\n")


if __name__ == "__main__":
    main()
