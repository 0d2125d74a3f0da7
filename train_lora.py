"""Fine-tune GPT-2 on CoLA with LoRA: a classifier (the teacher), or a language model of CoLA's sentences.

    python train_lora.py --gpt_variant gpt2-medium
    python train_lora.py --gpt_variant path/to/local/checkpoint --max_train_samples 500 --epochs 2
    python train_lora.py --gpt_variant gpt2-medium --objective lm --out_dir runs/lm

Writes out_dir/metrics.json, the best epoch's adapter (out_dir/adapter.safetensors + adapter_config.json)
and dev/out-of-domain predictions (predictions.json), a resumable checkpoint, and the curves
out_dir/{loss,accuracy}.png: a run's files are all in its out_dir, where no other run writes.

--objective lm trains the same LoRA with GPT-2's next-token loss on the training sentences, each read as
`<|endoftext|> sentence <|endoftext|>` (labels unused, padding never scored), and keeps the epoch with the lowest
dev loss. Its adapter (LoRA alone: the head is GPT-2's own LM head) is a generator (inference.load_generator),
never a classifier teacher; it writes no predictions.json, and its curves are out_dir/{loss,perplexity}.png.
Its dev batches are --batch_size rows (their logits span the vocabulary); --eval_batch_size is not used.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from data import Batch, ensure_cola, get_encoder, lm_dataset, load_cola, sample_record
from lora import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, TARGETS, export_peft, inject_lora, load_adapter, parameter_summary,
                  save_adapter)
from model import DEFAULT_VARIANT, GPT, base_fingerprint, find_weights
from cli import (CHECKPOINT, METRICS, PREDICTIONS, ArgumentParser, add_common_args, check_inputs, dropout_float,
                 pick_hardware, positive_float, positive_int, prepare_outputs, print_outputs, run_cli, run_config,
                 run_name)
from precision import store_frozen_weights
from report import curve_kinds, curve_path
from errors import UserError
from metrics import evaluate_lm
from trainer import CLASSIFY, LANGUAGE_MODEL, fit, report_ood, write_json

OBJECTIVES = {"cls": CLASSIFY, "lm": LANGUAGE_MODEL}


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__)
    g = p.add_argument_group("model and LoRA")
    g.add_argument("--gpt_variant", default=DEFAULT_VARIANT,
                   help="gpt2, gpt2-medium, gpt2-large, gpt2-xl, or a local transformers GPT-2 checkpoint directory")
    g.add_argument("--objective", choices=OBJECTIVES, default="cls",
                   help="cls: classify acceptability (a teacher); lm: language-model the training sentences (a "
                        "generator of new sentences)")
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


def lm_loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """The next-token loss of a data.next_token_batch: logits (B, T, vocab), labels (B, T), -1 not scored."""
    return F.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), ignore_index=-1)


def train(args: argparse.Namespace) -> dict:
    lm = args.objective == "lm"
    if lm and args.cuda_graphs:
        raise UserError("--cuda_graphs graphs the classifier's step only: leave it out with --objective lm")
    if lm and args.export_peft:
        raise UserError("--export_peft writes a classifier adapter (PEFT's SEQ_CLS): leave it out with --objective lm")
    prepare_outputs(args, weights=(ADAPTER_WEIGHTS, ADAPTER_CONFIG))
    check_inputs({"CoLA": lambda: ensure_cola(args.data_dir), "tiktoken's BPE files": get_encoder,
                  "GPT-2 weights": lambda: find_weights(args.gpt_variant)})
    torch.manual_seed(args.seed)
    device, precision = pick_hardware(args)
    data = load_cola(args.data_dir, args.max_train_samples, args.max_eval_samples)
    targets = tuple(t for t in args.lora_targets.split(",") if t)
    model = GPT.from_pretrained(args.gpt_variant, dropout=args.dropout)
    inject_lora(model, args.lora_rank, args.lora_alpha, args.lora_dropout, targets, args.rslora,
                trainable=() if lm else ("score",))  # a language model keeps GPT-2's own head, frozen
    print(parameter_summary(model))
    store_frozen_weights(model, precision.dtype)  # before the copy to the device: half the bytes move
    model.to(device)

    variant = str(Path(args.gpt_variant).resolve()) if Path(args.gpt_variant).is_dir() else args.gpt_variant
    c = model.config
    adapter_config = {"gpt_variant": variant, "objective": args.objective, "lora_rank": args.lora_rank,
                      "lora_alpha": args.lora_alpha, "lora_dropout": args.lora_dropout, "lora_targets": list(targets),
                      "rslora": args.rslora, "n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd,
                      "vocab_size": c.vocab_size, "n_classes": c.n_classes,
                      "base_fingerprint": base_fingerprint(args.gpt_variant)}
    print(f"train {len(data['train'])} sentences, dev {len(data['dev'])}, out-of-domain dev {len(data['ood_dev'])}")
    config = {**run_config(args), "data": sample_record(data)}
    if lm:
        data = {split: lm_dataset(ds) for split, ds in data.items()}
        loss_fn = lm_loss
    else:
        loss_fn = lambda logits, batch: F.cross_entropy(logits, batch.labels)
    metrics = fit(model, data["train"], data["dev"], loss_fn, args, config, run_name(args.out_dir),
                  lambda: save_adapter(model, args.out_dir, adapter_config), precision,
                  cuda_graphs=args.cuda_graphs, objective=OBJECTIVES[args.objective],
                  loss_name="LM: next-token cross-entropy, mean over tokens" if lm else None)

    load_adapter(model, args.out_dir)  # the best epoch, not the last
    out = Path(args.out_dir)
    if lm:  # reported, never used to choose an epoch
        metrics["ood_dev"] = evaluate_lm(model, data["ood_dev"], args.batch_size, device, precision, desc="ood dev")
        best, ood = metrics["best"], metrics["ood_dev"]
        print(f"best epoch {metrics['best_epoch']}: dev loss {best['val_loss']:.4f} perplexity {best['val_ppl']:.2f}")
        print(f"out-of-domain dev: loss {ood['loss']:.4f} perplexity {ood['ppl']:.2f}")
    else:
        report_ood(metrics, model, data["ood_dev"], args.eval_batch_size, device, precision, out)
    metrics["base_fingerprint"] = adapter_config["base_fingerprint"]  # report.py tells apart bases of one name
    write_json(out / "metrics.json", metrics)
    if args.export_peft:
        export_peft(model, adapter_config, args.export_peft)
        print(f"PEFT adapter written to {args.export_peft}")
    print_outputs(metrics=[out / METRICS] + ([] if lm else [out / PREDICTIONS]),
                  weights=[out / ADAPTER_WEIGHTS, out / ADAPTER_CONFIG], checkpoint=[out / CHECKPOINT],
                  plots=[curve_path(out, k) for k in curve_kinds(metrics)])
    return metrics


def main() -> None:
    args = build_parser().parse_args()
    run_cli(lambda: train(args), args)


if __name__ == "__main__":
    main()
