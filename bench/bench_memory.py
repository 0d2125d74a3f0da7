"""Peak memory of LoRA training against full fine-tuning of the same model (ours, model.GPT): every parameter
trainable and no LoRA, against LoRA r=8 on c_attn, attn.c_proj, c_fc, mlp.c_proj with only A, B and the head
trainable. Same batches (the first --steps of an epoch, then its largest batch), the same AdamW step.

    python bench/bench_memory.py                      # gpt2 shape, CPU or CUDA
    python bench/bench_memory.py --variant-shape gpt2-medium --device cuda

Each side runs in a fresh process. CPU: peak resident set (VmHWM, reset after the model is loaded) with glibc
returning freed memory at once; CUDA: torch.cuda.max_memory_allocated. See common.PeakMemory.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from common import (Side, add_args, build_ours, checkpoint, cola_batches, machine, num_trainable, ours_logits,
                    memory_rows, run_worker, setup, table, training_memory)
from precision import store_frozen_weights


def worker(args) -> None:
    device, precision = setup(args)
    model = build_ours(checkpoint(args.variant_shape, args.cache_dir), args.seed, lora=args.worker == "lora")
    store_frozen_weights(model, precision.dtype)  # as train_lora.py does (full fine-tuning freezes nothing)
    model.to(device)
    train, _ = cola_batches(args.data_dir, args.batch_size, args.seed, device)
    side = Side(args.worker, model, ours_logits, device, precision, args.lr, compile=False)
    params = {id(p): p for p in model.parameters()}.values()  # wte and lm_head are one tensor
    print(json.dumps({**training_memory(side, train, args.steps, device), "trainable": num_trainable(model),
                      "total": sum(p.numel() for p in params)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p)
    p.add_argument("--steps", type=int, default=3, help="typical training steps measured, then the epoch's largest batch")
    p.add_argument("--worker", choices=["lora", "full"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    t0 = time.time()
    device, _ = setup(args)
    print(f"# {machine()}\n# python bench/bench_memory.py {' '.join(sys.argv[1:])}", flush=True)
    checkpoint(args.variant_shape, args.cache_dir)  # written once, before either process times anything
    res = {side: run_worker(__file__, [*sys.argv[1:], "--worker", side]) for side in ("lora", "full")}
    lora, full = res["lora"], res["full"]
    what = "CUDA max allocated" if device.type == "cuda" else "peak RSS"
    rows = [["", "LoRA", "full fine-tuning", "LoRA / full"],
            ["trainable parameters", f"{lora['trainable']:,}", f"{full['trainable']:,}",
             f"{lora['trainable'] / full['trainable']:.4f}"]]
    rows += memory_rows(lora, full, args.steps)
    print(f"\nshape {args.variant_shape} ({full['total']:,} parameters), device {device}, {what}; batch size "
          f"{args.batch_size}; AdamW; {time.time() - t0:.0f}s")
    print("target: LoRA <= 0.6x full fine-tuning (peak)\n")
    print(table(rows))


if __name__ == "__main__":
    main()
