"""LoRA training and evaluation throughput: ours (model.GPT + lora.inject_lora) against transformers'
GPT2ForSequenceClassification + PEFT LoRA, on the same random GPT-2 weights and the same real CoLA batches.

    python bench/bench_lora.py                          # gpt2 shape (124M), CPU or CUDA; 1.5 minutes on 2 idle cores
    python bench/bench_lora.py --profile 3              # where each side spends a training step (torch.profiler)
    python bench/bench_lora.py --device cuda --steps 60 --compile
    python bench/bench_lora.py --device cuda --variant-shape gpt2-medium --cuda-graphs   # + train_lora.py --cuda_graphs

Both sides: LoRA r=8, alpha=16, dropout 0.1 on c_attn, attn.c_proj, c_fc, mlp.c_proj (PEFT: target_modules
c_attn, c_proj, c_fc with fan_in_fan_out), the same A (B is zero), the same `score` head (trained, as is B and
A), GPT-2's own dropout 0, AdamW at the same lr with trainer.py's step (clip at 1.0), under --precision (auto as
train_lora.py: bf16 on CUDA >= 8.0, fp16 with loss scaling below, fp32 on CPU); ours stores its frozen weights in
the compute dtype, as train_lora.py does. Before timing, both must give the same logits (eval, fp32, random B)
to 1e-4.

Timing alternates the sides in rounds of --round batches (each side going first in turn), after --warmup steps
each; a side's throughput is all its timed tokens over all its timed seconds, and each printed ratio is the
ratio of the two throughputs printed beside it (the spread of the per-round ratios is printed as a noise
check). On CUDA with a known card, MFU: model FLOPs per token (common.train_flops_per_token) times tokens/s over
the card's bf16 dense peak (common.BF16_PEAK_FLOPS), per real token and per computed (padded) token.
Peak memory: one fresh process per side (see common.PeakMemory).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from common import (LORA, GraphedSide, Side, add_args, baseline_logits, bf16_peak, bucket_length, build_baseline,
                    build_ours, check_equivalence, checkpoint, cola_batches, machine, median, memory_rows,
                    num_trainable, ours_logits, padded_tokens, real_tokens, run_worker, setup, table, timed,
                    train_flops_per_token, training_memory)
from precision import device_line, store_frozen_weights


def build_sides(args, device):
    ckpt = checkpoint(args.variant_shape, args.cache_dir)
    ours = build_ours(ckpt, args.seed)
    baseline = build_baseline(ckpt, ours)
    return ours.to(device), baseline.to(device)


def worker(args) -> None:
    """One side alone in this process: peak memory of its training steps (printed as a JSON line)."""
    device, precision = setup(args)
    ckpt = checkpoint(args.variant_shape, args.cache_dir)
    model, fn = build_ours(ckpt, args.seed), ours_logits
    if args.worker == "baseline":
        model, fn = build_baseline(ckpt, model), baseline_logits
    else:
        store_frozen_weights(model, precision.dtype)
    model.to(device)
    train, _ = cola_batches(args.data_dir, args.batch_size, args.seed, device)
    side = Side(args.worker, model, fn, device, precision, args.lr, args.compile)
    if args.compile:  # compiling allocates far more than training: keep it out of the measurement
        timed(side.train_step, train[:args.memory_steps] + [max(train, key=lambda b: b.ids.numel())], device)
    print(json.dumps(training_memory(side, train, args.memory_steps, device)))


def profile(sides: list[Side], batches: list, device) -> None:
    """Where each side's training step spends its time, by operator (self time, the sides' batches alike)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for s in sides:
        timed(s.train_step, batches[:1], device)  # warm-up
        with torch_profile(activities=activities) as prof:
            timed(s.train_step, batches, device)
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(f"\n{s.name}, {len(batches)} training steps:\n{prof.key_averages().table(sort_by=sort, row_limit=15)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p)
    p.add_argument("--steps", type=int, default=24, help="timed training steps per side")
    p.add_argument("--round", type=int, default=3, help="batches per round of the alternation")
    p.add_argument("--warmup", type=int, default=2, help="untimed training steps per side first (more with --compile)")
    p.add_argument("--eval-batches", type=int, default=4, help="dev batches per eval round, spread over the lengths")
    p.add_argument("--eval-rounds", type=int, default=5)
    p.add_argument("--memory-steps", type=int, default=2,
                   help="typical training steps per side in the memory processes, then the epoch's largest batch")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="instead of timing, print torch.profiler's top operators over STEPS training steps per side")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="also time ours as train_lora.py --cuda_graphs trains it (CUDA only)")
    p.add_argument("--worker", choices=["ours", "baseline"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    t_start = time.time()
    device, precision = setup(args)
    print(f"# {machine()}\n# python bench/bench_lora.py {' '.join(sys.argv[1:])}\n# {device_line(device, precision)}",
          flush=True)
    ours, baseline = build_sides(args, device)
    train, dev = cola_batches(args.data_dir, args.batch_size, args.seed, device)
    diff = check_equivalence(ours, baseline, dev[len(dev) // 2], device)
    assert num_trainable(ours) == num_trainable(baseline), (num_trainable(ours), num_trainable(baseline))
    store_frozen_weights(ours, precision.dtype)  # after the fp32 equivalence check
    sides = [Side("ours", ours, ours_logits, device, precision, args.lr, args.compile),
             Side("baseline", baseline, baseline_logits, device, precision, args.lr, args.compile)]

    if args.cuda_graphs:
        if device.type != "cuda" or precision.loss_scaling:
            raise SystemExit("--cuda-graphs needs a CUDA device and --precision bf16 or fp32 (no fp16 scaling)")
        model = build_ours(checkpoint(args.variant_shape, args.cache_dir), args.seed).to(device)
        sides.insert(1, GraphedSide("ours, CUDA graphs", model, device, precision, args.lr, args.batch_size, train))

    if args.profile:
        return profile(sides, train[:args.profile], device)
    timed_batches = train[:args.steps]
    one_per_bucket = list({bucket_length(b.ids.size(1)): b for b in timed_batches}.values())
    for s in sides:  # the graphed side also captures the graph of every length bucket it will be timed on
        warm = (train[-args.warmup:] if args.warmup else []) + (one_per_bucket if isinstance(s, GraphedSide) else [])
        timed(s.train_step, warm, device)
    train_secs = {s.name: 0.0 for s in sides}
    round_ratios = {s.name: [] for s in sides}  # per round, baseline seconds / this side's seconds
    for r, start in enumerate(range(0, len(timed_batches), args.round)):
        chunk = timed_batches[start:start + args.round]
        secs = {}
        for s in sides[r % len(sides):] + sides[:r % len(sides)]:  # each side goes first in turn
            secs[s.name] = timed(s.train_step, chunk, device)
            train_secs[s.name] += secs[s.name]
        for s in sides:
            round_ratios[s.name].append(secs["baseline"] / secs[s.name])
    real, padded = real_tokens(timed_batches), padded_tokens(timed_batches)
    computed = {s.name: s.padded_tokens(timed_batches) if isinstance(s, GraphedSide) else padded for s in sides}
    flops = train_flops_per_token(ours, padded / sum(len(b.lengths) for b in timed_batches))

    eager = [s for s in sides if isinstance(s, Side)]  # evaluation is never graphed
    n = min(args.eval_batches, len(dev))
    eval_batches = [dev[round(i * (len(dev) - 1) / max(n - 1, 1))] for i in range(n)]  # short to long
    eval_secs = {s.name: 0.0 for s in eager}
    for s in eager:
        s.model.eval()
        timed(s.eval_step, eval_batches[:1], device)
    for r in range(args.eval_rounds):
        for s in (eager if r % 2 == 0 else eager[::-1]):
            eval_secs[s.name] += timed(s.eval_step, eval_batches, device)
    sentences = args.eval_rounds * sum(len(b.lengths) for b in eval_batches)
    del sides, eager, ours, baseline

    mem = {}
    if not args.no_memory:
        passthrough = [a for a in sys.argv[1:] if a not in ("--no-memory", "--cuda-graphs")]
        for name in ("ours", "baseline"):
            mem[name] = run_worker(__file__, [*passthrough, "--worker", name])

    # Throughput: all timed tokens over all timed seconds of a side; every ratio is the ratio of the two
    # throughputs printed beside it.
    names = list(train_secs)
    others = [k for k in names if k != "baseline"]
    real_tok = {k: real / train_secs[k] for k in names}
    ratio = lambda d, k: f"{d[k] / d['baseline']:.2f}x" if k in d else ""  # noqa: E731
    blank = ["" for _ in others]
    rows = [["", *(k.replace("baseline", "transformers + PEFT") for k in names), *(f"{k} / baseline" for k in others)],
            ["training, real tokens/s", *(f"{real_tok[k]:,.0f}" for k in names), *(ratio(real_tok, k) for k in others)],
            ["training, computed (padded) tokens/s", *(f"{computed[k] / train_secs[k]:,.0f}" for k in names), *blank]]
    peak = bf16_peak(device)
    if peak:
        rows += [["MFU, real tokens", *(f"{real / train_secs[k] * flops / peak[1]:.1%}" for k in names), *blank],
                 ["MFU, computed tokens", *(f"{computed[k] / train_secs[k] * flops / peak[1]:.1%}" for k in names),
                  *blank]]
    eval_sps = {k: sentences / v for k, v in eval_secs.items()}
    rows.append(["eval, sentences/s", *(f"{eval_sps[k]:,.1f}" if k in eval_sps else "" for k in names),
                 *(ratio(eval_sps, k) for k in others)])
    what = "CUDA max allocated" if device.type == "cuda" else "peak RSS"
    if mem:
        for r in memory_rows(mem["ours"], mem["baseline"], args.memory_steps):  # [label, ours, baseline, ratio]
            cells = {"ours": r[1], "baseline": r[2]}
            rows.append([r[0], *(cells.get(k, "") for k in names), *(r[3] if k == "ours" else "" for k in others)])
    print(f"\nshape {args.variant_shape}, device {device}{', torch.compile' if args.compile else ''}; LoRA r={LORA['r']}, "
          f"alpha={LORA['alpha']:g}, dropout={LORA['dropout']}; batch size {args.batch_size}")
    print(f"training: {len(round_ratios['baseline'])} rounds of {args.round} CoLA training batches per side after "
          f"{args.warmup} warm-up steps ({real} real tokens in {padded} padded, {1 - real / padded:.1%} padding); "
          f"eval: {args.eval_rounds} rounds of {n} dev batches ({sentences // args.eval_rounds} sentences)")
    spread = "; ".join(f"{k}: {min(round_ratios[k]):.2f}x to {max(round_ratios[k]):.2f}x, median "
                       f"{median(round_ratios[k]):.2f}x" for k in others)
    print(f"same logits before training: max |diff| {diff:.1e}; throughput = all timed tokens / all timed seconds, "
          f"ratios = ratios of those throughputs (higher is faster); per-round ratios vs baseline, as a noise "
          f"check: {spread}; memory: {what}, one process per side (lower is smaller); {time.time() - t_start:.0f}s in all")
    if peak:
        print(f"MFU: model FLOPs ({flops / 1e9:.2f} GFLOP per token: forward + backward to the inputs of the frozen "
              f"layers, LoRA's 6 per parameter, attention at the mean padded length) against {peak[0]}'s bf16 dense "
              f"peak {peak[1] / 1e12:,.0f} TFLOP/s")
    print()
    print(table(rows))


if __name__ == "__main__":
    main()
