"""LoRA training and evaluation throughput: ours (model.GPT + lora.inject_lora) against transformers'
GPT2ForSequenceClassification + PEFT LoRA, on the same random GPT-2 weights and the same real CoLA batches.

    python bench/bench_lora.py                          # gpt2 shape (124M), CPU or CUDA; 1.5 minutes on 2 idle cores
    python bench/bench_lora.py --profile 3              # where each side spends a training step (torch.profiler)
    python bench/bench_lora.py --device cuda --steps 60 --compile

Both sides: LoRA r=8, alpha=16, dropout 0.1 on c_attn, attn.c_proj, c_fc, mlp.c_proj (PEFT: target_modules
c_attn, c_proj, c_fc with fan_in_fan_out), the same A (B is zero), the same `score` head (trained, as is B and
A), GPT-2's own dropout 0, AdamW at the same lr with trainer.py's step (clip at 1.0), bf16 autocast on CUDA.
Before timing, both must give the same logits (eval, fp32, random B) to 1e-4.

Timing alternates the sides in rounds of --round batches (ours first in even rounds, the baseline first in odd
ones), after --warmup steps each; throughput is the median over rounds, the ratio the median of the rounds'
ratios. Peak memory: one fresh process per side (see common.PeakMemory).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from common import (LORA, Side, add_args, baseline_logits, build_baseline, build_ours, check_equivalence, checkpoint,
                    cola_batches, machine, median, memory_rows, num_trainable, ours_logits, padded_tokens, real_tokens,
                    run_worker, setup, table, timed, training_memory)


def build_sides(args, device):
    ckpt = checkpoint(args.variant_shape, args.cache_dir)
    ours = build_ours(ckpt, args.seed)
    baseline = build_baseline(ckpt, ours)
    return ours.to(device), baseline.to(device)


def worker(args) -> None:
    """One side alone in this process: peak memory of its training steps (printed as a JSON line)."""
    device = setup(args)
    ckpt = checkpoint(args.variant_shape, args.cache_dir)
    model, fn = build_ours(ckpt, args.seed), ours_logits
    if args.worker == "baseline":
        model, fn = build_baseline(ckpt, model), baseline_logits
    model.to(device)
    train, _ = cola_batches(args.data_dir, args.batch_size, args.seed, device)
    side = Side(args.worker, model, fn, device, args.lr, args.compile)
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
    p.add_argument("--worker", choices=["ours", "baseline"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    t_start = time.time()
    device = setup(args)
    print(f"# {machine()}\n# python bench/bench_lora.py {' '.join(sys.argv[1:])}", flush=True)
    ours, baseline = build_sides(args, device)
    train, dev = cola_batches(args.data_dir, args.batch_size, args.seed, device)
    diff = check_equivalence(ours, baseline, dev[len(dev) // 2], device)
    assert num_trainable(ours) == num_trainable(baseline), (num_trainable(ours), num_trainable(baseline))
    sides = [Side("ours", ours, ours_logits, device, args.lr, args.compile),
             Side("baseline", baseline, baseline_logits, device, args.lr, args.compile)]

    if args.profile:
        return profile(sides, train[:args.profile], device)
    warm = train[-args.warmup:] if args.warmup else []
    timed_batches = train[:args.steps]
    for s in sides:
        timed(s.train_step, warm, device)
    train_tok = {s.name: [] for s in sides}
    train_ratio = []
    for r, start in enumerate(range(0, len(timed_batches), args.round)):
        chunk = timed_batches[start:start + args.round]
        secs = {}
        for s in (sides if r % 2 == 0 else sides[::-1]):
            secs[s.name] = timed(s.train_step, chunk, device)
            train_tok[s.name].append(real_tokens(chunk) / secs[s.name])
        train_ratio.append(secs["baseline"] / secs["ours"])
    real, padded = real_tokens(timed_batches), padded_tokens(timed_batches)

    n = min(args.eval_batches, len(dev))
    eval_batches = [dev[round(i * (len(dev) - 1) / max(n - 1, 1))] for i in range(n)]  # short to long
    eval_sps = {s.name: [] for s in sides}
    eval_ratio = []
    for s in sides:
        s.model.eval()
        timed(s.eval_step, eval_batches[:1], device)
    for r in range(args.eval_rounds):
        secs = {}
        for s in (sides if r % 2 == 0 else sides[::-1]):
            secs[s.name] = timed(s.eval_step, eval_batches, device)
            eval_sps[s.name].append(sum(len(b.lengths) for b in eval_batches) / secs[s.name])
        eval_ratio.append(secs["baseline"] / secs["ours"])
    del sides, ours, baseline

    mem = {}
    if not args.no_memory:
        passthrough = [a for a in sys.argv[1:] if a != "--no-memory"]
        for name in ("ours", "baseline"):
            mem[name] = run_worker(__file__, [*passthrough, "--worker", name])

    tok_s = {k: median(v) for k, v in train_tok.items()}
    rows = [["", "ours", "transformers + PEFT", "ours / baseline"],
            ["training, real tokens/s", f"{tok_s['ours']:,.0f}", f"{tok_s['baseline']:,.0f}",
             f"{median(train_ratio):.2f}x"],
            ["training, padded tokens/s", f"{tok_s['ours'] * padded / real:,.0f}",
             f"{tok_s['baseline'] * padded / real:,.0f}", f"{median(train_ratio):.2f}x"],
            ["eval, sentences/s", f"{median(eval_sps['ours']):,.1f}", f"{median(eval_sps['baseline']):,.1f}",
             f"{median(eval_ratio):.2f}x"]]
    what = "CUDA max allocated" if device.type == "cuda" else "peak RSS"
    if mem:
        rows += memory_rows(mem["ours"], mem["baseline"], args.memory_steps)
    print(f"\nshape {args.variant_shape}, device {device}{', torch.compile' if args.compile else ''}; LoRA r={LORA['r']}, "
          f"alpha={LORA['alpha']:g}, dropout={LORA['dropout']}; batch size {args.batch_size}")
    print(f"training: {len(train_ratio)} rounds of {args.round} CoLA training batches per side after {args.warmup} "
          f"warm-up steps ({real} real tokens in {padded} padded, {1 - real / padded:.1%} padding); eval: "
          f"{args.eval_rounds} rounds of {n} dev batches ({sum(len(b.lengths) for b in eval_batches)} sentences)")
    print(f"same logits before training: max |diff| {diff:.1e}; speed ratios are medians over rounds (higher is "
          f"faster); memory: {what}, one process per side (lower is smaller); {time.time() - t_start:.0f}s in all\n")
    print(table(rows))


if __name__ == "__main__":
    main()
