"""Train the DistilRNN student on CoLA: from scratch on the labels, or distilled from the LoRA teacher.

    python train_lora.py --gpt_variant gpt2-medium     # the teacher, into runs/lora
    python train_distil.py --mode rnn                  # baseline student, into runs/rnn
    python train_distil.py --mode distil               # distilled student, into runs/distil
    python train_distil.py --mode distil --generator runs/lm --generate 100000   # plus a generated transfer set

The README's "Distillation recipes" says where each option comes from and what it is for.

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
from data import SPLITS, Dataset, ensure_cola, get_encoder, load_cola, read_tsv, sample_record, tokenize
from distill import (KD_LOSSES, UNLABELLED, agreement, augment, check_teachers, ensemble_logits, loss_name,
                     make_kd_loss, teacher_fingerprint)
from errors import UserError
from lora import ADAPTER_CONFIG, parameter_summary, read_adapter_config
from model import (DEFAULT_VARIANT, GPT, STUDENT_CONFIG, STUDENT_WEIGHTS, DistilRNN, base_fingerprint, find_weights,
                   variant_id)
from cli import (CHECKPOINT, METRICS, PREDICTIONS, ArgumentParser, add_common_args, check_inputs, dropout_float,
                 nonneg_int, pick_hardware, positive_float, positive_int, prepare_outputs, print_outputs, run_cli,
                 complete_config, run_config, run_name, unit_float)
from metrics import summarize
from precision import Precision
from transfer import Sampling, transfer_set
from trainer import fit, load_checkpoint, report_ood, write_json

DEFAULT_TEACHER = "runs/lora"


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--mode", choices=("rnn", "distil"), default="distil",
                   help="rnn: train on the gold labels; distil: learn from the teacher's soft targets too")
    p.add_argument("--teacher", nargs="+", default=DEFAULT_TEACHER, metavar="RUN",
                   help="a train_lora.py --out_dir: distil mode learns from it; both modes compare with it, and "
                        "without --gpt_variant take its base's token embedding. Several: an ensemble, the student "
                        "learns the mean of their logits (they must share their base GPT-2)")
    g = p.add_argument_group("distillation")
    g.add_argument("--kd_loss", choices=KD_LOSSES, default="kl",
                   help="kl: alpha T^2 KL(teacher || student) + (1 - alpha) CE (Hinton et al.); mse: alpha "
                        "MSE(student logits, teacher logits) + (1 - alpha) CE (Tang et al.; --temperature unused)")
    g.add_argument("--temperature", type=positive_float, default=2.0, help="softmax temperature T (> 0)")
    g.add_argument("--alpha", type=unit_float, default=0.7,
                   help="weight of the soft (teacher) loss; 1 - alpha goes to the gold labels")
    g.add_argument("--augment", type=nonneg_int, default=0,
                   help="perturbed copies of each training sentence, labelled only by the teacher (Tang et al.)")
    g.add_argument("--cache_dir", default="runs/cache", help="where teacher logits and transfer sets are cached")
    g = p.add_argument_group("generated transfer set (Tang, Lu & Lin 2019)")
    g.add_argument("--generator", default=None, metavar="LM_RUN",
                   help="a train_lora.py --objective lm run to sample --generate sentences from (default: none, "
                        "no generated transfer set)")
    g.add_argument("--generate", type=nonneg_int, default=0, metavar="N",
                   help="sample N sentences from --generator, filter them (unfinished, empty, repeated and dev "
                        "sentences dropped) and add them to training, labelled only by the teacher")
    g.add_argument("--gen_temperature", type=positive_float, default=1.0,
                   help="sampling temperature: 1 samples the language model as it is")
    g.add_argument("--gen_top_k", type=nonneg_int, default=0, help="sample from the k likeliest tokens only; 0: all")
    g.add_argument("--gen_top_p", type=unit_float, default=0.9,
                   help="nucleus sampling (Holtzman et al. 2020): the fewest likeliest tokens holding this much "
                        "probability; cuts the unreliable tail that makes garbled sentences; 1: off")
    g.add_argument("--gen_max_tokens", type=positive_int, default=48,
                   help="a sample not ended by then is dropped (CoLA's longest training sentence has 45 tokens)")
    g.add_argument("--gen_batch_size", type=positive_int, default=64,
                   help="sentences sampled at once; it changes the random draws, so it is part of the cache key")
    g.add_argument("--gen_seed", type=int, default=None,
                   help="seeds the sampling; another --seed with the same --gen_seed reuses the cached transfer "
                        "set (default: --seed)")
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


def resolve_base(args: argparse.Namespace, teacher: str) -> None:
    """Fill in --gpt_variant (`teacher`'s base by default, the first of an ensemble: LoRA never changes wte, so
    the student starts from the teacher's own embedding) and --embd_dim (the width actually used), so that metrics.json records them.

    In rnn mode the teacher is optional: without one in the default --teacher the base is DEFAULT_VARIANT (a
    fresh clone can train the baseline first). A --teacher the user named that holds no run is an error when
    the base would come from it (the user meant that teacher, so no other base is silently taken), and a note
    otherwise (it is only compared with)."""
    has_teacher = (Path(teacher) / ADAPTER_CONFIG).is_file()
    named = teacher != DEFAULT_TEACHER
    base_from_teacher = args.gpt_variant is None and args.init_embeddings == "gpt2"
    if named and not has_teacher and base_from_teacher:
        raise UserError(f"--teacher {teacher} holds no train_lora.py run (no {ADAPTER_CONFIG}), and without "
                        "--gpt_variant the student's embedding comes from the teacher's base: fix --teacher, or "
                        "pass --gpt_variant (a hub name or a checkpoint directory)")
    if named and not has_teacher:
        print(f"note: --teacher {teacher} holds no train_lora.py run; this rnn run will not be compared "
              "with a teacher")
    if args.gpt_variant is None:
        args.gpt_variant = read_adapter_config(teacher)["gpt_variant"] if has_teacher else DEFAULT_VARIANT
    if args.init_embeddings == "none":
        args.embd_dim = args.embd_dim or 768
        if args.mode == "rnn":
            args.gpt_variant = None  # nothing of GPT-2 is used
    elif args.embd_dim is not None:
        raise UserError(f"--embd_dim {args.embd_dim}: the student's width is --gpt_variant's with "
                        "--init_embeddings gpt2; pass --init_embeddings none for random embeddings of another width")
    if args.gpt_variant is not None:
        args.gpt_variant = variant_id(args.gpt_variant)


def resolve_teachers(args: argparse.Namespace) -> list[str]:
    """The teacher runs, as a list. args.teacher stays a string for one teacher, as older runs recorded it (so
    they keep grouping with new ones in report.py), and becomes the list for an ensemble."""
    teachers = [args.teacher] if isinstance(args.teacher, str) else list(args.teacher)
    if len(set(teachers)) != len(teachers):
        raise UserError(f"--teacher names a run twice ({' '.join(teachers)}): an ensemble's teachers are distinct")
    if len(teachers) > 1 and args.mode != "distil":
        raise UserError("several --teacher runs are an ensemble to distil from: pass --mode distil, or one teacher")
    if args.mode == "distil":
        check_teachers(teachers)  # a missing teacher, or teachers of different bases, fail here, before any work
    args.teacher = teachers[0] if len(teachers) == 1 else teachers
    return teachers


def check_generation(args: argparse.Namespace) -> None:
    """--generate needs a --generator language-model run, and distil mode (its rows have no gold labels)."""
    if args.generate and args.generator is None:
        raise UserError(f"--generate {args.generate} samples from a language model: pass --generator LM_RUN (a "
                        "train_lora.py --objective lm run)")
    if args.generator is not None and not args.generate:
        raise UserError(f"--generator {args.generator} is only used with --generate N (the sentences to sample)")
    if args.generate and args.mode != "distil":
        raise UserError("--generate: generated sentences have no gold labels, only the teacher's: pass --mode distil")
    if args.generate:
        read_adapter_config(args.generator, objective="lm")  # refuses a classifier run, before any work
        args.gen_seed = args.seed if args.gen_seed is None else args.gen_seed


def generated_rows(args: argparse.Namespace, device: torch.device, precision: Precision) -> tuple[Dataset, dict]:
    """--generate's transfer set, tokenized, every row UNLABELLED, and what metrics.json records of it (the
    filter's counts and the file it is cached in)."""
    raw = ensure_cola(args.data_dir)
    train, evaluation = read_tsv(raw / SPLITS["train"])[0], []
    for split in ("dev", "ood_dev"):  # every dev sentence, not only the --max_eval_samples sample evaluated
        evaluation += read_tsv(raw / SPLITS[split])[0]
    sampling = Sampling(args.gen_temperature, args.gen_top_k or None, args.gen_top_p if args.gen_top_p < 1 else None,
                        args.gen_max_tokens, args.gen_batch_size, args.gen_seed)
    kept, counts, path = transfer_set(args.generator, args.generate, sampling, args.cache_dir, device, precision,
                                      train, evaluation)
    print("transfer set: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in counts.items()))
    if not kept:
        raise UserError(f"none of the {args.generate} sentences sampled from --generator {args.generator} survived "
                        f"filtering ({counts['unfinished']} unfinished within --gen_max_tokens "
                        f"{args.gen_max_tokens}); train the generator longer or raise --gen_max_tokens")
    return tokenize("generated", kept, [UNLABELLED] * len(kept)), {**counts, "path": str(path)}


def train(args: argparse.Namespace) -> dict:
    args.out_dir = args.out_dir.format(mode=args.mode)
    teachers = resolve_teachers(args)
    check_generation(args)
    resolve_base(args, teachers[0])
    prepare_outputs(args, weights=(STUDENT_WEIGHTS, STUDENT_CONFIG))
    inputs = {"CoLA": lambda: ensure_cola(args.data_dir), "tiktoken's BPE files": get_encoder}
    if args.gpt_variant is not None:
        inputs["GPT-2 weights"] = lambda: find_weights(args.gpt_variant)
    check_inputs(inputs)
    device, precision = pick_hardware(args)  # before run_config: it records the precision auto resolved to
    config = run_config(args)
    if args.mode == "distil":
        fingerprints = [teacher_fingerprint(t) for t in teachers]
        config["teacher_fingerprint"] = fingerprints[0] if len(teachers) == 1 else fingerprints
        if args.resume:
            check_teacher_unchanged(args, config["teacher_fingerprint"])
    if args.generate:
        config["generator_fingerprint"] = teacher_fingerprint(args.generator, "lm")
    fingerprint = base_fingerprint(args.gpt_variant) if args.init_embeddings == "gpt2" else None
    note_other_base(teachers[0], args.gpt_variant, fingerprint)
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
    student.wte.sparse = sparse_embedding_grad(args.dense_embedding_grad, device)  # the saved student is the same
    print(f"student: {parameter_summary(student)}")
    student.to(device)

    train_set, transfer = data["train"], None
    if args.mode == "distil":
        train_set = augment(train_set, args.augment, args.seed)
        if args.generate:
            generated, transfer = generated_rows(args, device, precision)
            train_set = Dataset(f"{train_set.name}+generated", train_set.sentences + generated.sentences,
                                train_set.ids + generated.ids, train_set.labels + generated.labels)
        same_base = base is not None and args.gpt_variant == read_adapter_config(teachers[0])["gpt_variant"]
        # (the same path with other weights than the teacher's: build_lora_classifier refuses it as the teacher)
        logits = ensemble_logits(teachers, {"train": train_set, "dev": data["dev"]}, args.cache_dir,
                                 args.eval_batch_size, device, precision, base=base if same_base else None)
        loss_fn = make_kd_loss(logits["train"], args.temperature, args.alpha, args.kd_loss)
    else:
        loss_fn = lambda out, batch: F.cross_entropy(out, batch.labels)  # noqa: E731
    del base  # the student holds its own copy of wte
    print(f"train {len(train_set)} sentences, dev {len(data['dev'])}")

    out_dir = Path(args.out_dir)

    def save_best() -> None:
        save_file({k: v.detach().cpu().contiguous() for k, v in student.state_dict().items()},
                  str(out_dir / STUDENT_WEIGHTS))
        (out_dir / STUDENT_CONFIG).write_text(json.dumps(student.config, indent=2))

    config["data"] = sample_record(data)
    name = run_name(out_dir)
    described = loss_name(args.kd_loss, args.temperature, args.alpha) if args.mode == "distil" else None
    metrics = fit(student, train_set, data["dev"], loss_fn, args, config, name, save_best, precision,
                  loss_name=described)
    student.load_state_dict(load_file(str(out_dir / STUDENT_WEIGHTS)))  # the best epoch, not the last
    report_ood(metrics, student, data["ood_dev"], args.eval_batch_size, device, precision, out_dir)
    if args.mode == "distil":
        metrics["teacher_agreement_dev"] = agreement(student, data["dev"], logits["dev"], args.eval_batch_size, device,
                                                   precision)
        print(f"student agrees with the teacher on {metrics['teacher_agreement_dev']:.1%} of dev")
        metrics["teachers"] = teachers
        dev_labels = torch.tensor(data["dev"].labels)
        metrics["teacher_dev"] = summarize(logits["dev"].argmax(-1), dev_labels)  # the ensemble's own, if several
        print(f"the teacher{' ensemble' if len(teachers) > 1 else ''} on dev: acc {metrics['teacher_dev']['acc']:.4f} "
              f"mcc {metrics['teacher_dev']['mcc']:.4f}")
    if transfer is not None:
        metrics["transfer_set"] = transfer
    if fingerprint is not None:
        metrics["base_fingerprint"] = fingerprint  # report.py tells apart bases of one name
    write_json(out_dir / METRICS, metrics)
    comparison = compare_runs(teachers, args, out_dir)
    print_outputs(metrics=[out_dir / METRICS, out_dir / PREDICTIONS], weights=[out_dir / STUDENT_WEIGHTS, out_dir / STUDENT_CONFIG],
                  checkpoint=[out_dir / CHECKPOINT],
                  plots=[*(report.curve_path(out_dir, k) for k in ("accuracy", "loss")), *comparison])
    return metrics


def note_other_base(teacher: str, gpt_variant: str | None, fingerprint: str | None) -> None:
    """Say in one line, at the start, when the student's embedding comes from another GPT-2 than its teacher's
    base: a legitimate experiment, but not the default recipe (the teacher's own wte), so it must not go unseen."""
    if fingerprint is None or not (Path(teacher) / ADAPTER_CONFIG).is_file():
        return
    cfg = read_adapter_config(teacher)
    teacher_fp = cfg.get("base_fingerprint")  # absent in an adapter written before fingerprints: compare paths
    if (teacher_fp != fingerprint) if teacher_fp is not None else (variant_id(cfg["gpt_variant"]) != gpt_variant):
        print(f"note: the student's embedding comes from {gpt_variant}, a different base than its teacher's "
              f"({cfg['gpt_variant']}, in {Path(teacher) / ADAPTER_CONFIG})")


def check_teacher_unchanged(args: argparse.Namespace, fingerprint: str | list[str]) -> None:
    """--resume refuses a teacher changed since the checkpoint: its soft targets would change mid-run."""
    ckpt = Path(args.out_dir) / CHECKPOINT
    _, state = load_checkpoint(ckpt)
    if complete_config(state["config"]).get("teacher_fingerprint") != fingerprint:
        raise UserError(f"--resume: {ckpt} was trained with another teacher than the one now in --teacher "
                        f"{args.teacher} (retrained since?); start afresh without --resume")


def compare_runs(teachers: list[str], args: argparse.Namespace, out_dir: Path) -> tuple[Path, Path, Path]:
    """report.py's comparison of this run and its teachers (those that saved predictions), and nothing else:
    runs that merely lie beside out_dir may have been made with other data or another teacher.
    Written to out_dir/comparison.{md,png,json}: a run's comparison is its own, and no other run replaces it.
    Returns those three paths."""
    dirs = []
    for teacher in teachers:
        try:
            report.load_run(teacher)
            dirs.append(Path(teacher))
        except UserError as e:
            print(f"not comparing with the teacher {teacher}: {e}")
    dirs.append(out_dir)
    table, _ = report.compare(dirs, out_dir, "comparison")
    paths = report.comparison_paths(out_dir, "comparison")
    print(table)
    print(f"comparison written to {paths[0]}, {paths[1]} and {paths[2]}; to compare with other runs (the other "
          "student, more "
          f"seeds): python report.py {' '.join(map(str, dirs))} OTHER_RUN_DIRS")
    return paths


def sparse_embedding_grad(dense_flag: bool, device: torch.device) -> bool:
    """The sparse embedding gradient (lazy Adam rows) unless --dense_embedding_grad, or on MPS: torch has no sparse
    tensors there before 2.9 (NotImplementedError on SparseMPS) and only some of their ops since."""
    if device.type == "mps" and not dense_flag:
        print("mps: the embedding trains on its dense gradient (torch's sparse tensors do not run on MPS)")
    return not dense_flag and device.type != "mps"


def main() -> None:
    args = build_parser().parse_args()
    run_cli(lambda: train(args), args)


if __name__ == "__main__":
    main()
