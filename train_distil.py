"""Train the DistilRNN student on CoLA: from scratch on the labels, or distilled from the LoRA teacher.

    python train_lora.py --gpt_variant gpt2-medium     # the teacher, into runs/lora
    python train_distil.py --mode rnn                  # baseline student, into runs/rnn
    python train_distil.py --mode distil               # distilled student, into runs/distil

Writes out_dir/metrics.json, the best epoch's student (student.safetensors + student_config.json) and
predictions (predictions.json), a resumable checkpoint, the curves {loss,accuracy}.png and comparison.{md,png}
of this run and its teacher, all in out_dir: no other run replaces them (report.py compares more runs, into plots/).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import report
from data import ensure_cola, get_encoder, load_cola, sample_record
from distill import agreement, augment, kd_loss_name, make_kd_loss, teacher_fingerprint, teacher_logits
from errors import UserError
from lora import ADAPTER_CONFIG, parameter_summary, read_adapter_config
from model import (DEFAULT_VARIANT, GPT, STUDENT_CONFIG, STUDENT_WEIGHTS, DistilRNN, base_fingerprint, find_weights,
                   variant_id)
from cli import (CHECKPOINT, METRICS, PREDICTIONS, ArgumentParser, add_common_args, check_inputs, dropout_float,
                 nonneg_int, pick_hardware, positive_float, positive_int, prepare_outputs, print_outputs, run_cli,
                 complete_config, run_config, run_name, unit_float)
from trainer import fit, load_checkpoint, report_ood, write_json

DEFAULT_TEACHER = "runs/lora"


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--mode", choices=("rnn", "distil"), default="distil",
                   help="rnn: train on the gold labels; distil: learn from the teacher's soft targets too")
    p.add_argument("--teacher", default=DEFAULT_TEACHER,
                   help="a train_lora.py --out_dir: distil mode learns from it; both modes compare with it, and "
                        "without --gpt_variant take its base's token embedding")
    g = p.add_argument_group("distillation")
    g.add_argument("--temperature", type=positive_float, default=2.0, help="softmax temperature T (> 0)")
    g.add_argument("--alpha", type=unit_float, default=0.7,
                   help="weight of the soft (teacher) loss; 1 - alpha goes to the gold labels")
    g.add_argument("--augment", type=nonneg_int, default=0,
                   help="perturbed copies of each training sentence, labelled only by the teacher (Tang et al.)")
    g.add_argument("--cache_dir", default="runs/cache", help="where teacher logits are cached")
    g = p.add_argument_group("student")
    g.add_argument("--cell", choices=tuple(DistilRNN.CELLS), default="gru", help="recurrent cell")
    g.add_argument("--hidden_size", type=positive_int, default=256, help="RNN state width (each direction)")
    g.add_argument("--num_layers", type=positive_int, default=1, help="stacked RNN layers")
    g.add_argument("--bidirectional", action=argparse.BooleanOptionalAction, default=True,
                   help="read each sentence in both directions")
    g.add_argument("--rnn_dropout", type=dropout_float, default=0.3,
                   help="dropout on the embeddings, between layers and before the classifier")
    g.add_argument("--gpt_variant", default=None,
                   help="the base GPT-2 whose token embedding initialises the student (hub name or checkpoint "
                        f"directory) (default: the teacher's base if --teacher holds one, else {DEFAULT_VARIANT})")
    g.add_argument("--init_embeddings", choices=("gpt2", "none"), default="gpt2",
                   help="gpt2: copy --gpt_variant's token embedding into the student; none: random embeddings "
                        "of --embd_dim")
    g.add_argument("--embd_dim", type=positive_int, default=None,
                   help="embedding width with --init_embeddings none; with gpt2 it is the base's "
                        "(default: 768 with none)")
    g.add_argument("--freeze_embeddings", action="store_true", help="keep the student's embedding fixed")
    g.add_argument("--dense_embedding_grad", action="store_true",
                   help="train the embedding with AdamW on its full dense gradient (~4x slower a CPU step); by "
                        "default its gradient is sparse and Adam updates only the rows of the batch's tokens")
    add_common_args(p, out_dir="runs/{mode}", epochs=10, lr=2e-3, batch_size=32, weight_decay=0.01, warmup_ratio=0.06,
                    forward_passes="dev and out-of-domain evaluation, and in distil mode the teacher's pass")
    return p


def resolve_base(args: argparse.Namespace) -> None:
    """Fill in --gpt_variant (the teacher's base by default: LoRA never changes wte, so the student starts from
    the teacher's own embedding) and --embd_dim (the width actually used), so that metrics.json records them.

    In rnn mode the teacher is optional: without one in the default --teacher the base is DEFAULT_VARIANT (a
    fresh clone can train the baseline first). A --teacher the user named that holds no run is an error when
    the base would come from it (the user meant that teacher, so no other base is silently taken), and a note
    otherwise (it is only compared with)."""
    has_teacher = (Path(args.teacher) / ADAPTER_CONFIG).is_file()
    named = args.teacher != DEFAULT_TEACHER
    base_from_teacher = args.gpt_variant is None and args.init_embeddings == "gpt2"
    if named and not has_teacher and base_from_teacher:
        raise UserError(f"--teacher {args.teacher} holds no train_lora.py run (no {ADAPTER_CONFIG}), and without "
                        "--gpt_variant the student's embedding comes from the teacher's base: fix --teacher, or "
                        "pass --gpt_variant (a hub name or a checkpoint directory)")
    if named and not has_teacher:
        print(f"note: --teacher {args.teacher} holds no train_lora.py run; this rnn run will not be compared "
              "with a teacher")
    if args.gpt_variant is None:
        args.gpt_variant = read_adapter_config(args.teacher)["gpt_variant"] if has_teacher else DEFAULT_VARIANT
    if args.init_embeddings == "none":
        args.embd_dim = args.embd_dim or 768
        if args.mode == "rnn":
            args.gpt_variant = None  # nothing of GPT-2 is used
    elif args.embd_dim is not None:
        raise UserError(f"--embd_dim {args.embd_dim}: the student's width is --gpt_variant's with "
                        "--init_embeddings gpt2; pass --init_embeddings none for random embeddings of another width")
    if args.gpt_variant is not None:
        args.gpt_variant = variant_id(args.gpt_variant)


def train(args: argparse.Namespace) -> dict:
    args.out_dir = args.out_dir.format(mode=args.mode)
    if args.mode == "distil":
        read_adapter_config(args.teacher)  # a missing teacher fails here, before any work
    resolve_base(args)
    prepare_outputs(args, weights=(STUDENT_WEIGHTS, STUDENT_CONFIG))
    inputs = {"CoLA": lambda: ensure_cola(args.data_dir), "tiktoken's BPE files": get_encoder}
    if args.gpt_variant is not None:
        inputs["GPT-2 weights"] = lambda: find_weights(args.gpt_variant)
    check_inputs(inputs)
    device, precision = pick_hardware(args)  # before run_config: it records the precision auto resolved to
    config = run_config(args)
    if args.mode == "distil":
        config["teacher_fingerprint"] = teacher_fingerprint(args.teacher)
        if args.resume:
            check_teacher_unchanged(args, config["teacher_fingerprint"])
    fingerprint = base_fingerprint(args.gpt_variant) if args.init_embeddings == "gpt2" else None
    note_other_base(args, fingerprint)
    torch.manual_seed(args.seed)
    data = load_cola(args.data_dir, args.max_train_samples, args.max_eval_samples)

    # The base GPT-2 is loaded once: its wte starts the student, and on a teacher-logit cache miss the same
    # model becomes the teacher.
    base = GPT.from_pretrained(args.gpt_variant) if args.init_embeddings == "gpt2" else None
    if base is not None:
        args.embd_dim = config["embd_dim"] = base.config.n_embd  # recorded: the width actually used
    student = DistilRNN(embd_dim=args.embd_dim, hidden_size=args.hidden_size, num_layers=args.num_layers,
                        cell=args.cell, bidirectional=args.bidirectional, dropout=args.rnn_dropout)
    if base is not None:
        student.wte.weight.data.copy_(base.transformer.wte.weight)
    student.wte.weight.requires_grad_(not args.freeze_embeddings)
    student.wte.sparse = not args.dense_embedding_grad  # a training choice: the saved student is the same either way
    print(f"student: {parameter_summary(student)}")
    student.to(device)

    train_set = data["train"]
    if args.mode == "distil":
        train_set = augment(train_set, args.augment, args.seed)
        same_base = base is not None and args.gpt_variant == read_adapter_config(args.teacher)["gpt_variant"]
        # (the same path with other weights than the teacher's: build_lora_classifier refuses it as the teacher)
        logits = teacher_logits(args.teacher, {"train": train_set, "dev": data["dev"]}, args.cache_dir,
                                args.eval_batch_size, device, precision, base=base if same_base else None)
        loss_fn = make_kd_loss(logits["train"], args.temperature, args.alpha)
        loss_name = kd_loss_name(args.temperature, args.alpha)
    else:
        loss_fn = lambda out, batch: F.cross_entropy(out, batch.labels)  # noqa: E731
        loss_name = report.CE_LOSS
    del base  # the student holds its own copy of wte
    print(f"train {len(train_set)} sentences, dev {len(data['dev'])}")

    out_dir = Path(args.out_dir)

    def save_best() -> None:
        save_file({k: v.detach().cpu().contiguous() for k, v in student.state_dict().items()},
                  str(out_dir / STUDENT_WEIGHTS))
        (out_dir / STUDENT_CONFIG).write_text(json.dumps(student.config, indent=2))

    config["data"] = sample_record(data)
    name = run_name(out_dir)
    metrics = fit(student, train_set, data["dev"], loss_fn, args, config, name, save_best, precision,
                  loss_name=loss_name)
    student.load_state_dict(load_file(str(out_dir / STUDENT_WEIGHTS)))  # the best epoch, not the last
    report_ood(metrics, student, data["ood_dev"], args.eval_batch_size, device, precision, out_dir)
    if args.mode == "distil":
        metrics["teacher_agreement_dev"] = agreement(student, data["dev"], logits["dev"], args.eval_batch_size, device,
                                                   precision)
        print(f"student agrees with the teacher on {metrics['teacher_agreement_dev']:.1%} of dev")
    if fingerprint is not None:
        metrics["base_fingerprint"] = fingerprint  # report.py tells apart bases of one name
    write_json(out_dir / METRICS, metrics)
    comparison = compare_runs(args, out_dir)
    print_outputs(metrics=[out_dir / METRICS, out_dir / PREDICTIONS], weights=[out_dir / STUDENT_WEIGHTS, out_dir / STUDENT_CONFIG],
                  checkpoint=[out_dir / CHECKPOINT],
                  plots=[*(report.curve_path(out_dir, k) for k in ("accuracy", "loss")), *comparison])
    return metrics


def note_other_base(args: argparse.Namespace, fingerprint: str | None) -> None:
    """Say in one line, at the start, when the student's embedding comes from another GPT-2 than its teacher's
    base: a legitimate experiment, but not the default recipe (the teacher's own wte), so it must not go unseen."""
    if fingerprint is None or not (Path(args.teacher) / ADAPTER_CONFIG).is_file():
        return
    cfg = read_adapter_config(args.teacher)
    teacher_fp = cfg.get("base_fingerprint")  # absent in an adapter written before fingerprints: compare paths
    if (teacher_fp != fingerprint) if teacher_fp is not None else (variant_id(cfg["gpt_variant"]) != args.gpt_variant):
        print(f"note: the student's embedding comes from {args.gpt_variant}, a different base than its teacher's "
              f"({cfg['gpt_variant']}, in {Path(args.teacher) / ADAPTER_CONFIG})")


def check_teacher_unchanged(args: argparse.Namespace, fingerprint: str) -> None:
    """--resume refuses a teacher changed since the checkpoint: its soft targets would change mid-run."""
    ckpt = Path(args.out_dir) / CHECKPOINT
    _, state = load_checkpoint(ckpt)
    if complete_config(state["config"]).get("teacher_fingerprint") != fingerprint:
        raise UserError(f"--resume: {ckpt} was trained with another teacher than the one now in --teacher "
                        f"{args.teacher} (retrained since?); start afresh without --resume")


def compare_runs(args: argparse.Namespace, out_dir: Path) -> tuple[Path, Path, Path]:
    """report.py's comparison of this run and its teacher (when the run used it and it saved predictions), and
    nothing else: runs that merely lie beside out_dir may have been made with other data or another teacher.
    Written to out_dir/comparison.{md,png,json}: a run's comparison is its own, and no other run replaces it.
    Returns those three paths."""
    dirs = [out_dir]
    try:
        report.load_run(args.teacher)
        dirs.insert(0, Path(args.teacher))
    except UserError as e:
        print(f"not comparing with the teacher: {e}")
    table, _ = report.compare(dirs, out_dir, "comparison")
    paths = report.comparison_paths(out_dir, "comparison")
    print(table)
    print(f"comparison written to {paths[0]}, {paths[1]} and {paths[2]}; to compare with other runs (the other student, more "
          f"seeds): python report.py {' '.join(map(str, dirs))} OTHER_RUN_DIRS")
    return paths


def main() -> None:
    args = build_parser().parse_args()
    run_cli(lambda: train(args), args)


if __name__ == "__main__":
    main()
