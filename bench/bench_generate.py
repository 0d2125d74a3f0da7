"""Generation speed: our GPT.generate (KV cache, batched, finished rows leave the batch) against transformers'
GPT2LMHeadModel.generate (its own KV cache) on the same random checkpoint, the same prompts and settings.

    python bench/bench_generate.py                 # gpt2 shape, batch 64, 32 new tokens, CPU

The prompt of every row is <|endoftext|> alone, as when sampling a transfer set (train_distil.py --generate).
Two settings, each timed in alternating rounds (ours, then theirs, --rounds times), the median kept:
- greedy: both sides must produce the same tokens (checked; the run stops otherwise);
- sampling: temperature 1, top_k 50, top_p 0.95 (transformers' order of warpers, ours too).
Every row stops at <|endoftext|> on both sides. With random weights a row almost never emits it, so both
sides decode all 64 x 32 tokens; the count of rows that stopped early is printed. New tokens/s counts
batch x new tokens. The last line is the sampling ratio.
"""

from __future__ import annotations

import argparse
import time

from common import SHAPES, build_ours, checkpoint, machine, median, table
import torch  # noqa: E402  (after common, which sets the environment up)
from model import EOT_TOKEN  # noqa: E402

SAMPLING = dict(temperature=1.0, top_k=50, top_p=0.95)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant-shape", default="gpt2", choices=list(SHAPES))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3, help="alternating timed rounds per side and setting")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--cache-dir", default="/tmp/gpt2-lora-bench")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import GPT2LMHeadModel

    ckpt = checkpoint(args.variant_shape, args.cache_dir)
    ours = build_ours(ckpt, lora=False).eval()
    theirs = GPT2LMHeadModel.from_pretrained(ckpt).eval()
    prompt = torch.full((args.batch_size, 1), EOT_TOKEN)
    n = args.new_tokens

    def run_ours(sample: bool, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        settings = SAMPLING if sample else dict(temperature=0)
        return ours.generate(prompt, n, generator=g, eos_token=EOT_TOKEN, **settings)

    @torch.no_grad()
    def run_theirs(sample: bool, seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        settings = dict(do_sample=True, **SAMPLING) if sample else dict(do_sample=False)
        return theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=0,
                               eos_token_id=EOT_TOKEN, pad_token_id=EOT_TOKEN, **settings)

    print(f"machine: {machine()}")
    print(f"shape {args.variant_shape} {SHAPES[args.variant_shape]}, batch {args.batch_size}, {n} new tokens, "
          f"{args.rounds} alternating rounds per side")
    a, b = run_ours(False, 0), run_theirs(False, 0)  # warm-up, and the greedy outputs must agree
    if a.shape != b.shape or not torch.equal(a, b):
        raise SystemExit(f"greedy outputs differ: ours {tuple(a.shape)}, transformers {tuple(b.shape)}")
    print("greedy: ours and transformers' generate produce the same tokens")
    rows, ratios = [["setting", "ours tokens/s", "transformers tokens/s", "ours / transformers",
                     "rows stopped early (ours, theirs)"]], {}
    for name, sample in (("greedy", False), ("sampling", True)):
        times: dict[str, list[float]] = {"ours": [], "theirs": []}
        stopped = {}
        for r in range(args.rounds):
            for side, fn in (("ours", run_ours), ("theirs", run_theirs)):
                t0 = time.perf_counter()
                out = fn(sample, r)
                times[side].append(time.perf_counter() - t0)
                stopped[side] = int((out[:, 1:-1] == EOT_TOKEN).any(1).sum())  # an eos before the last token
        rate = {side: args.batch_size * n / median(ts) for side, ts in times.items()}
        ratios[name] = rate["ours"] / rate["theirs"]
        rows.append([name, f"{rate['ours']:.1f}", f"{rate['theirs']:.1f}", f"{ratios[name]:.2f}x",
                     f"{stopped['ours']}, {stopped['theirs']}"])
        print(f"{name}: ours {[round(t, 2) for t in times['ours']]} s, transformers "
              f"{[round(t, 2) for t in times['theirs']]} s")
    print(table(rows))
    print(f"generate (greedy): ours / transformers = {ratios['greedy']:.2f}x new tokens/s")
    print(f"generate: ours / transformers = {ratios['sampling']:.2f}x new tokens/s")


if __name__ == "__main__":
    main()
