"""Loading a pretrained GPT-2: ours (GPT.from_pretrained + lora.inject_lora) against transformers' own
GPT2LMHeadModel.from_pretrained, of the same local checkpoint directory (random weights, real shape).

    python bench/bench_load.py                              # gpt2-medium shape, 5 timed rounds
    python bench/bench_load.py --variant-shape gpt2 --rounds 3

Every load runs in a fresh process (nothing cached in the interpreter), the two sides alternating, after one
untimed warm-up round that puts the file in the OS page cache. Imports happen before the clock starts and
are shown apart: transformers for its side (which our path no longer needs), torch._dynamo for ours (torch
imports it on the first meta-device normal_, in nn.Embedding's constructor; `import transformers` imports it
too, and so does AdamW's first step in any training run). Memory: the peak resident
set (VmHWM) above what the process held before loading, during the load, and then while every weight is read
once (both sides map the file, so a weight counts in RSS once it is touched), as a multiple of the weights'
size. See common.PeakMemory.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

import torch

from common import LORA, PeakMemory, add_args, checkpoint, machine, median, run_worker, setup, table


@torch.no_grad()
def read_every_weight(model: torch.nn.Module) -> float:
    """Read each parameter once (a sum), so that a weight still only mapped from the file is brought in."""
    return float(sum(p.double().sum() for p in {id(p): p for p in model.parameters()}.values()))


def worker(args) -> None:
    ckpt = Path(args.ckpt)
    if args.worker == "ours":
        from lora import TARGETS, inject_lora
        from model import GPT
        t0 = time.perf_counter()
        importlib.import_module("torch._dynamo")  # as `import transformers` on the other side, AdamW's first step
        import_s = time.perf_counter() - t0  # in training, and here torch's meta-device normal_ (nn.Embedding)
        load = lambda: inject_lora(GPT.from_pretrained(str(ckpt)), LORA["r"], LORA["alpha"], LORA["dropout"],  # noqa: E731
                                   TARGETS)
    else:
        t0 = time.perf_counter()
        import transformers
        from transformers import GPT2LMHeadModel
        import_s = time.perf_counter() - t0
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        load = lambda: GPT2LMHeadModel.from_pretrained(ckpt)  # noqa: E731
    cpu = torch.device("cpu")
    with PeakMemory(cpu) as m_load:
        t0 = time.perf_counter()
        model = load()
        seconds = time.perf_counter() - t0
    with PeakMemory(cpu) as m_read:
        read_every_weight(model)
    print(json.dumps({"seconds": seconds, "import_s": import_s, "load_growth": m_load.growth,
                      "read_growth": m_read.peak - m_load.start}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p)
    p.set_defaults(variant_shape="gpt2-medium")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds, each one load per side")
    p.add_argument("--worker", choices=["ours", "hf"], help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = p.parse_args()
    setup(args)
    if args.worker:
        return worker(args)

    t_start = time.time()
    print(f"# {machine()}\n# python bench/bench_load.py {' '.join(sys.argv[1:])}", flush=True)
    ckpt = checkpoint(args.variant_shape, args.cache_dir)  # written once, before anything is timed
    weights = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    base = [*sys.argv[1:], "--ckpt", str(ckpt)]
    run = lambda side: run_worker(__file__, [*base, "--worker", side])  # noqa: E731
    run("ours"), run("hf")  # warm-up: the file into the page cache, the interpreters' own files too
    res = {"ours": [], "hf": []}
    for i in range(args.rounds):
        for side in (("ours", "hf") if i % 2 == 0 else ("hf", "ours")):
            res[side].append(run(side))
            print(f"round {i + 1} {side}: {res[side][-1]['seconds']:.3f}s", flush=True)

    med = {side: {k: median(r[k] for r in rs) for k in rs[0]} for side, rs in res.items()}
    o, h = med["ours"], med["hf"]
    gib = lambda n: f"{n / 2**30:.2f} GiB ({n / weights:.2f}x)"  # noqa: E731
    rows = [["", "ours: GPT.from_pretrained + inject_lora", "transformers: GPT2LMHeadModel.from_pretrained",
             "ours / transformers"],
            ["load time, median", f"{o['seconds']:.3f} s", f"{h['seconds']:.3f} s", f"{o['seconds'] / h['seconds']:.2f}x"],
            ["load time, range", f"{min(r['seconds'] for r in res['ours']):.3f} - {max(r['seconds'] for r in res['ours']):.3f} s",
             f"{min(r['seconds'] for r in res['hf']):.3f} - {max(r['seconds'] for r in res['hf']):.3f} s", ""],
            ["peak RSS growth during load (x weights)", gib(o["load_growth"]), gib(h["load_growth"]), ""],
            ["peak RSS growth, load then every weight read once", gib(o["read_growth"]), gib(h["read_growth"]), ""],
            ["imports before the clock (not in load time)", f"torch._dynamo {o['import_s']:.2f} s",
             f"transformers (with torch._dynamo) {h['import_s']:.2f} s", ""]]
    print(f"\nshape {args.variant_shape}, weights {weights / 2**30:.2f} GiB ({ckpt}); {args.rounds} rounds, each "
          f"load in a fresh process; {time.time() - t_start:.0f}s in all")
    print("target: ours <= 2x transformers' time, peak memory about one copy of the weights\n")
    print(table(rows))


if __name__ == "__main__":
    main()
