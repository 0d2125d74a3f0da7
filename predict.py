"""Classify sentences with a trained run: a LoRA teacher (train_lora.py) or a student (train_distil.py).

    python predict.py runs/distil "The book was written by John." "Book the was by written John."
    python predict.py runs/lora --file sentences.txt --output predictions.jsonl
    python predict.py runs/lora --file glue_data/CoLA/test.tsv --glue_submission CoLA.tsv
    cat sentences.txt | python predict.py runs/distil -

Prints each sentence's label (1 acceptable, 0 unacceptable) and P(acceptable), or writes them to --output.
--file takes one sentence a line, CoLA's TSV (source, label, mark, sentence) or GLUE's test TSV (header
index<TAB>sentence), detected from the first line. In fp32 the teacher's LoRA is merged into its base (under bf16/fp16 it runs
unmerged, as in training, so a run's dev predictions equal its predictions.json); batches are length-sorted; the precision is training's on the device (--precision auto: bf16 or fp16 mixed on CUDA, fp32
on CPU and MPS). The
teacher reads at most its base's positions (1024 for GPT-2): a longer sentence is cut to its first 1024
tokens, with a warning naming it. The student reads any length.
"""

from __future__ import annotations

import argparse
import sys

from cli import ArgumentParser, pick_device, positive_int, run_cli
from errors import UserError
from precision import DTYPES, choose_precision
from inference import (FORMATS, check_output, encode, from_arguments, glue_text, load_classifier, p_acceptable,
                       parse_lines, predictions_text, read_text, write_atomic)

PROGRESS_FROM = 1000  # sentences: a progress bar runs on inputs this long


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__)
    p.add_argument("run_dir", help="a train_lora.py or train_distil.py --out_dir")
    p.add_argument("sentences", nargs="*", help="sentences to classify; a lone - reads them from standard input")
    p.add_argument("--file", default=None, help="read sentences from this file (- is standard input)")
    p.add_argument("--format", choices=FORMATS, default="auto",
                   help="--file's format: text (a sentence a line), cola (CoLA's 4-column TSV), glue (GLUE's test "
                        "TSV with its index<TAB>sentence header); auto detects it from the first line")
    p.add_argument("--output", default=None, metavar="F.jsonl|F.tsv",
                   help="write index, sentence, label and p_acceptable of each sentence here (default: print them)")
    p.add_argument("--glue_submission", default=None, metavar="CoLA.tsv",
                   help="write GLUE's submission file (index<TAB>prediction, with a header) here (default: none)")
    p.add_argument("--base", default=None, metavar="DIR",
                   help="the teacher's base GPT-2, if it is no longer where its adapter_config.json says "
                        "(default: that one)")
    p.add_argument("--batch_size", type=positive_int, default=64, help="sentences per forward pass")
    p.add_argument("--device", default="auto", help="auto picks cuda, then mps, then cpu")
    p.add_argument("--precision", choices=("auto", *DTYPES), default="auto",
                   help="auto: training's choice for the device (bf16 or fp16 mixed on CUDA, fp32 on CPU and MPS)")
    return p


def predict(args: argparse.Namespace) -> None:
    if args.file is None and args.sentences == ["-"]:
        args.file, args.sentences = "-", []
    if (args.file is None) == (not args.sentences):
        raise UserError("give sentences as arguments, or --file F (- for standard input), not both" if args.sentences
                        else "nothing to classify: give sentences as arguments, or --file F (- for standard input)")
    check_output(args.output, "--output", (".jsonl", ".tsv"))
    check_output(args.glue_submission, "--glue_submission", (".tsv",))
    inputs = parse_lines(*read_text(args.file), args.format) if args.file else from_arguments(args.sentences)

    device = pick_device(args.device)
    precision = choose_precision(device, args.precision)
    clf = load_classifier(args.run_dir, device, precision, args.base)
    ids, cut = encode(inputs.sentences, clf.max_tokens)
    for i in cut:
        print(f"warning: {inputs.where[i]}: the sentence is longer than the teacher's {clf.max_tokens} positions; "
              f"only its first {clf.max_tokens} tokens are read", file=sys.stderr)
    probs, labels = p_acceptable(clf, ids, args.batch_size, device, precision, progress=len(ids) >= PROGRESS_FROM)

    if args.output:
        write_atomic(args.output, predictions_text(args.output, inputs, probs, labels))
        print(f"predictions of {len(ids)} sentences written to {args.output}")
    if args.glue_submission:
        write_atomic(args.glue_submission, glue_text(inputs, labels))
        print(f"GLUE submission of {len(ids)} rows written to {args.glue_submission}")
    if not (args.output or args.glue_submission):
        for sentence, p, y in zip(inputs.sentences, probs.tolist(), labels.tolist()):
            print(f"{y} {'acceptable' if y else 'unacceptable':<12}  P(acceptable) {p:.4f}  {sentence}")


def main() -> None:
    args = build_parser().parse_intermixed_args()  # sentences and options in any order
    run_cli(lambda: predict(args))


if __name__ == "__main__":
    main()
