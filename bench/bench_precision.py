"""Peak memory of LoRA training in fp32 against --precision bf16 (or fp16), whose frozen base weights are stored
in the compute dtype (precision.store_frozen_weights, as train_lora.py does): 2 bytes a parameter instead of 4.
Same model (ours, LoRA r=8 as train_lora.py), same batches (the first --steps of an epoch, then its largest
batch), the same step (train_step.EagerStep under each precision's autocast).

    python bench/bench_precision.py                      # gpt2 shape, CPU
    python bench/bench_precision.py --low fp16 --variant-shape gpt2-medium --device cuda

Each side runs in a fresh process (see common.PeakMemory): CPU peak resident set (VmHWM) with glibc returning
freed memory at once; CUDA: torch.cuda.max_memory_allocated. "loaded" is the process's memory before the first
step: the runtime, the stored weights and the data.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from common import (Side, add_args, build_ours, checkpoint, cola_batches, machine, memory_rows, mib, ours_logits,
                    run_worker, setup, table, training_memory)
from precision import choose_precision, device_line, store_frozen_weights


def worker(args) -> None:
    device, _ = setup(args)
    precision = choose_precision(device, args.worker)
    model = build_ours(checkpoint(args.variant_shape, args.cache_dir), args.seed)
    store_frozen_weights(model, precision.dtype)
    model.to(device)
    params = {id(p): p for p in model.parameters()}.values()  # wte and lm_head are one tensor
    train, _ = cola_batches(args.data_dir, args.batch_size, args.seed, device)
    side = Side(args.worker, model, ours_logits, device, precision, args.lr, compile=False)
    print(json.dumps({**training_memory(side, train, args.steps, device), "line": device_line(device, precision),
                      "weight_bytes": sum(p.numel() * p.element_size() for p in params)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p)
    p.add_argument("--steps", type=int, default=3, help="typical training steps measured, then the epoch's largest batch")
    p.add_argument("--low", choices=("bf16", "fp16"), default="bf16", help="the precision measured against fp32")
    p.add_argument("--worker", choices=("fp32", "bf16", "fp16"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    t0 = time.time()
    device, _ = setup(args)
    print(f"# {machine()}\n# python bench/bench_precision.py {' '.join(sys.argv[1:])}", flush=True)
    checkpoint(args.variant_shape, args.cache_dir)  # written once, before either process measures anything
    res = {side: run_worker(__file__, [*sys.argv[1:], "--worker", side]) for side in (args.low, "fp32")}
    low, fp32 = res[args.low], res["fp32"]
    print("\n".join(f"# {r['line']}" for r in res.values()))
    loaded = {k: r["typical"]["peak"] - r["typical"]["growth"] for k, r in res.items()}
    rows = [["", args.low, "fp32", f"{args.low} / fp32"],
            ["weights and biases (bytes of the parameters)", mib(low["weight_bytes"]), mib(fp32["weight_bytes"]),
             f"{low['weight_bytes'] / fp32['weight_bytes']:.2f}"],
            ["loaded (memory before the first step)", mib(loaded[args.low]), mib(loaded["fp32"]),
             f"{loaded[args.low] / loaded['fp32']:.2f}"]]
    rows += memory_rows(low, fp32, args.steps)
    what = "CUDA max allocated" if device.type == "cuda" else "peak RSS"
    print(f"\nshape {args.variant_shape}, device {device}, {what}; batch size {args.batch_size}; LoRA r=8; AdamW; "
          f"{time.time() - t0:.0f}s\n")
    print(table(rows))


if __name__ == "__main__":
    main()
