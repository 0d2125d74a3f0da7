"""Fine-tune GPT-2 on CoLA with LoRA.

    python train_lora.py --gpt_variant gpt2-medium
    python train_lora.py --gpt_variant path/to/local/checkpoint --max_train_samples 500 --epochs 2

Writes out_dir/metrics.json, the best epoch's adapter (out_dir/adapter.safetensors + adapter_config.json)
and dev/out-of-domain predictions (predictions.json), a resumable checkpoint, and the curves
out_dir/{loss,accuracy}.png: a run's files are all in its out_dir, where no other run writes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from data import ensure_cola, get_encoder, load_cola, sample_record
from lora import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, TARGETS, export_peft, inject_lora, load_adapter, parameter_summary,
                  save_adapter)
from model import DEFAULT_VARIANT, GPT, base_fingerprint, find_weights
from cli import (CHECKPOINT, METRICS, PREDICTIONS, ArgumentParser, add_common_args, check_inputs, dropout_float,
                 pick_hardware, positive_float, positive_int, prepare_outputs, print_outputs, run_cli, run_config,
                 run_name)
from precision import store_frozen_weights
from report import curve_path
from trainer import fit, report_ood, write_json


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__)
    g = p.add_argument_group("model and LoRA")
    g.add_argument("--gpt_variant", default=DEFAULT_VARIANT,
                   help="gpt2, gpt2-medium, gpt2-large, gpt2-xl, or a local transformers GPT-2 checkpoint directory")
    g.add_argument("--lora_rank", type=positive_int, default=8, help="r: rank of the update B A (1 <= r <= layer width)")
    g.add_argument("--lora_alpha", type=positive_float, default=16.0, help="the update is scaled by alpha / r")
    g.add_argument("--lora_dropout", type=dropout_float, default=0.1, help="dropout on the LoRA branch's input")
    g.add_argument("--lora_targets", default=",".join(TARGETS), help=f"comma-separated subset of {','.join(TARGETS)}")
    g.add_argument("--rslora", action="store_true", help="scale by alpha / sqrt(r) (rank-stabilised LoRA)")
    g.add_argument("--dropout", type=dropout_float, default=0.0, help="GPT-2's own dropout (0 when fine-tuning)")
    g.add_argument("--export_peft", default=None, metavar="DIR",
                   help="also write the best adapter in PEFT's format to DIR (default: not written)")
    g.add_argument("--cuda_graphs", action="store_true",
                   help="opt-in, CUDA only: fixed-shape training step, one CUDA graph per length bucket "
                        "(train_step.py); ignored elsewhere, and with fp16 (--precision fp16, or auto on a card "
                        "below compute capability 8.0), which it refuses in one line and trains eagerly")
    add_common_args(p, out_dir="runs/lora", epochs=10, lr=4e-4, batch_size=32, weight_decay=0.01, warmup_ratio=0.06)
    return p


def train(args: argparse.Namespace) -> dict:
    prepare_outputs(args, weights=(ADAPTER_WEIGHTS, ADAPTER_CONFIG))
    check_inputs({"CoLA": lambda: ensure_cola(args.data_dir), "tiktoken's BPE files": get_encoder,
                  "GPT-2 weights": lambda: find_weights(args.gpt_variant)})
    torch.manual_seed(args.seed)
    device, precision = pick_hardware(args)
    data = load_cola(args.data_dir, args.max_train_samples, args.max_eval_samples)
    targets = tuple(t for t in args.lora_targets.split(",") if t)
    model = GPT.from_pretrained(args.gpt_variant, dropout=args.dropout)
    inject_lora(model, args.lora_rank, args.lora_alpha, args.lora_dropout, targets, args.rslora)
    print(parameter_summary(model))
    store_frozen_weights(model, precision.dtype)  # before the copy to the device: half the bytes move
    model.to(device)

    variant = str(Path(args.gpt_variant).resolve()) if Path(args.gpt_variant).is_dir() else args.gpt_variant
    c = model.config
    adapter_config = {"gpt_variant": variant, "lora_rank": args.lora_rank, "lora_alpha": args.lora_alpha,
                      "lora_dropout": args.lora_dropout, "lora_targets": list(targets), "rslora": args.rslora,
                      "n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd, "vocab_size": c.vocab_size,
                      "n_classes": c.n_classes, "base_fingerprint": base_fingerprint(args.gpt_variant)}
    print(f"train {len(data['train'])} sentences, dev {len(data['dev'])}, out-of-domain dev {len(data['ood_dev'])}")
    config = {**run_config(args), "data": sample_record(data)}
    metrics = fit(model, data["train"], data["dev"], lambda logits, batch: F.cross_entropy(logits, batch.labels),
                  args, config, run_name(args.out_dir), lambda: save_adapter(model, args.out_dir, adapter_config),
                  precision,
                  cuda_graphs=args.cuda_graphs)

    load_adapter(model, args.out_dir)  # the best epoch, not the last
    report_ood(metrics, model, data["ood_dev"], args.eval_batch_size, device, precision, Path(args.out_dir))
    metrics["base_fingerprint"] = adapter_config["base_fingerprint"]  # report.py tells apart bases of one name
    write_json(Path(args.out_dir) / "metrics.json", metrics)
    if args.export_peft:
        export_peft(model, adapter_config, args.export_peft)
        print(f"PEFT adapter written to {args.export_peft}")
    out = Path(args.out_dir)
    print_outputs(metrics=[out / METRICS, out / PREDICTIONS], weights=[out / ADAPTER_WEIGHTS, out / ADAPTER_CONFIG],
                  checkpoint=[out / CHECKPOINT], plots=[curve_path(out, k) for k in ("accuracy", "loss")])
    return metrics


def main() -> None:
    args = build_parser().parse_args()
    run_cli(lambda: train(args), args)


if __name__ == "__main__":
    main()
