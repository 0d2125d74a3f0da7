"""Using a trained run on new sentences: a run directory becomes a ready classifier (a LoRA teacher with its
adapter merged into the base, or a DistilRNN student), input files become sentences, sentences become
P(acceptable), and predictions become files (JSONL, TSV, GLUE's submission). predict.py is its command line;
bench/bench_deploy.py and the tests load runs through load_classifier too. A language-model run
(train_lora.py --objective lm) becomes a generator instead (load_generator).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file

from data import Dataset, get_encoder
from errors import UserError
from lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, build_lora_classifier, merge_lora, read_adapter_config
from metrics import predict_logits
from model import GPT, HUB_VARIANTS, STUDENT_CONFIG, STUDENT_WEIGHTS, DistilRNN, first_line
from precision import Precision, store_frozen_weights

RUN_FILES = {"lora": (ADAPTER_CONFIG, ADAPTER_WEIGHTS), "student": (STUDENT_CONFIG, STUDENT_WEIGHTS)}
FORMATS = ("auto", "text", "cola", "glue")
GLUE_HEADER = ["index", "sentence"]  # the first line of GLUE's CoLA test.tsv


@dataclass
class Classifier:
    model: nn.Module         # in eval mode, on the device it was loaded for
    kind: str                # "lora" (a teacher, merged) or "student"
    max_tokens: int | None   # the teacher's positions; the student reads any length


@dataclass
class Inputs:
    sentences: list[str]
    where: list[str]         # each sentence's origin for messages: "FILE:LINE" or "argument N"
    index: list[str]         # GLUE's index column, else each sentence's 0-based position


# ---------------------------------------------------------------- a run directory -> a classifier

def run_kind(run_dir: Path) -> str:
    """'lora' or 'student', from the files the run wrote at its best epoch; anything else is refused."""
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a directory: pass a run directory (the --out_dir of train_lora.py or "
                        "train_distil.py)")
    for kind, files in RUN_FILES.items():
        present = [f for f in files if (run_dir / f).is_file()]
        if len(present) == len(files):
            return kind
        if present:
            missing = [f for f in files if f not in present]
            raise UserError(f"{run_dir} holds {present[0]} but no {missing[0]}: not a finished run")
    raise UserError(f"{run_dir} holds no trained model, so it is not a finished run: a train_lora.py run has "
                    f"{' + '.join(RUN_FILES['lora'])}, a train_distil.py run {' + '.join(RUN_FILES['student'])}")


def load_teacher(run_dir: Path, base: str | None, merge: bool = True) -> GPT:
    """The LoRA classifier of a train_lora.py run, its adapter merged into the base (merge): inference then
    costs what the plain base costs. `base` replaces the GPT-2 named in adapter_config.json (a moved directory)."""
    cfg = read_adapter_config(run_dir)  # refuses a language-model run
    model, _ = build_lora_classifier(run_dir, load_base(run_dir, cfg, base), base_path=base)
    if merge:
        merge_lora(model)
    return model


def load_generator(run_dir: str | Path, device: torch.device, precision: Precision, base: str | None = None) -> GPT:
    """The GPT-2 of a `train_lora.py --objective lm` run, its LM adapter merged into the base, with its
    language-model head, in eval mode on `device` (frozen weights stored in `precision`'s compute dtype), ready
    for GPT.generate. A classifier run is refused in one line. `base`: as for load_teacher."""
    run_dir = Path(run_dir)
    cfg = read_adapter_config(run_dir, objective="lm")
    if not (run_dir / ADAPTER_WEIGHTS).is_file():
        raise UserError(f"{run_dir} holds {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}: not a finished run")
    model, _ = build_lora_classifier(run_dir, load_base(run_dir, cfg, base), base_path=base, objective="lm")
    merge_lora(model)
    store_frozen_weights(model, precision.dtype)  # after the merge, which is done in fp32
    return model.to(device).eval()


def load_base(run_dir: Path, cfg: dict, base: str | None) -> GPT:
    """The base GPT-2 a train_lora.py run was trained on (`base` overrides where it is), loaded, without LoRA."""
    variant = base or cfg["gpt_variant"]
    if not Path(variant).is_dir() and variant not in HUB_VARIANTS:
        raise UserError(f"{run_dir}'s base GPT-2 {variant} (gpt_variant in its {ADAPTER_CONFIG}) is not found: "
                        "pass the directory it now lives in as the base (predict.py --base DIR)")
    try:
        return GPT.from_pretrained(variant, n_classes=cfg["n_classes"])
    except UserError as e:
        raise UserError(f"{run_dir}'s base GPT-2 cannot be loaded; pass a local copy with predict.py --base DIR "
                        f"({e})") from None


def load_student(run_dir: Path) -> DistilRNN:
    """DistilRNN(**student_config.json) with student.safetensors, as train_distil.py saved its best epoch."""
    config_path, weights_path = run_dir / STUDENT_CONFIG, run_dir / STUDENT_WEIGHTS
    try:
        config = json.loads(config_path.read_text())
        student = DistilRNN(**config)
    except (ValueError, TypeError, OSError) as e:
        raise UserError(f"{config_path} is not a student config ({first_line(e)})") from None
    try:
        missing, unexpected = student.load_state_dict(load_file(str(weights_path)), strict=False)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise UserError(f"{weights_path} does not hold the student its config describes ({first_line(e)})") from None
    if missing or unexpected:  # refused: a missing tensor would stay random
        keys = "; ".join(f"{what}: {', '.join(ks)}" for what, ks in (("missing", missing), ("unexpected", unexpected))
                         if ks)
        raise UserError(f"{weights_path} does not hold the student its config describes ({keys})")
    return student


def load_classifier(run_dir: str | Path, device: torch.device, precision: Precision,
                    base: str | None = None) -> Classifier:
    """A train_lora.py or train_distil.py run directory -> its model, ready for inference on `device` in
    `precision`. A teacher is stored as training stored it: in fp32 its LoRA is merged (the same function to
    fp32 rounding, at the base's cost); under bf16/fp16 its frozen base weights are stored in the compute dtype
    and its LoRA branch stays unmerged, as in training, since W0 + B A rounded to 16 bits is not what training
    computed: the run's dev predictions come out exactly as its predictions.json."""
    run_dir = Path(run_dir)
    kind = run_kind(run_dir)
    model = load_teacher(run_dir, base, merge=precision.dtype is None) if kind == "lora" else load_student(run_dir)
    store_frozen_weights(model, precision.dtype)
    max_tokens = model.config.block_size if kind == "lora" else None
    return Classifier(model.to(device).eval(), kind, max_tokens)


# ---------------------------------------------------------------- sentences -> P(acceptable)

def encode(sentences: list[str], max_tokens: int | None) -> tuple[list[list[int]], list[int]]:
    """GPT-2 tokens of each sentence, cut to max_tokens; also the positions of the sentences that were cut."""
    ids = get_encoder().encode_ordinary_batch(sentences)
    cut = [i for i, x in enumerate(ids) if max_tokens is not None and len(x) > max_tokens]
    for i in cut:
        ids[i] = ids[i][:max_tokens]
    return ids, cut


def p_acceptable(clf: Classifier, ids: list[list[int]], batch_size: int, device: torch.device,
                 precision: Precision, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """P(label 1) (N,) float64, as training's predictions.json computes it, and the label (N,) 0/1 (the argmax),
    in input order. Batches are length-sorted (data.iterate)."""
    ds = Dataset("input", [""] * len(ids), ids, [0] * len(ids))
    logits = predict_logits(clf.model, ds, batch_size, device, precision,
                            desc="predicting" if progress else None)  # (N, 2)
    return logits.double().softmax(-1)[:, 1], logits.argmax(-1)


# ---------------------------------------------------------------- input and output files

def read_text(path: str) -> tuple[str, list[str]]:
    """A file's name for messages and its lines; '-' is standard input."""
    if path == "-":
        return "<stdin>", sys.stdin.read().splitlines()
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--file {p} not found")
    try:
        return str(p), p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--file {p} cannot be read as UTF-8 text: {e}") from None


def detect_format(name: str, first: str) -> str:
    cols = first.split("\t")
    if [c.strip().lower() for c in cols] == GLUE_HEADER:
        return "glue"
    if len(cols) == 4 and cols[1] in ("0", "1"):
        return "cola"
    if len(cols) == 1:
        return "text"
    raise UserError(f"{name}:1: {len(cols)} tab-separated columns, which is neither a sentence a line, a CoLA TSV "
                    "(source, label, mark, sentence) nor GLUE's test TSV (header index<TAB>sentence); pass --format")


def parse_lines(name: str, lines: list[str], fmt: str = "auto") -> Inputs:
    """Sentences from a file's lines: one a line (text), CoLA's 4-column TSV without a header (cola; the
    sentence is the 4th column), or GLUE's test TSV (glue: header `index<TAB>sentence`). Blank lines of a TSV
    are skipped, as data.read_tsv does; in a text file a blank line is an empty sentence, which is refused."""
    first = next((line for line in lines if line.strip()), None)
    if fmt == "auto" and first is not None:
        fmt = detect_format(name, first)
    numbered = [(n, line) for n, line in enumerate(lines, start=1) if line.strip() or fmt == "text"]
    if fmt == "glue" and numbered:
        n, header = numbered.pop(0)
        if [c.strip().lower() for c in header.split("\t")] != GLUE_HEADER:
            raise UserError(f"{name}:{n}: GLUE's test TSV starts with the header index<TAB>sentence")
    out = Inputs([], [], [])
    for n, line in numbered:
        cols = line.split("\t")
        if fmt == "cola":
            if len(cols) != 4 or cols[1] not in ("0", "1"):
                raise UserError(f"{name}:{n}: a CoLA row has 4 tab-separated columns (source, label 0/1, mark, "
                                f"sentence); this one has {len(cols)}" + (f" and label {cols[1]!r}" if len(cols) == 4 else ""))
            sentence, index = cols[3], str(len(out.sentences))
        elif fmt == "glue":
            if len(cols) != 2 or not cols[0].strip().isdigit():
                raise UserError(f"{name}:{n}: a GLUE test row is index<TAB>sentence; this one has {len(cols)} "
                                f"column(s)" + (f" and index {cols[0]!r}" if len(cols) == 2 else ""))
            index, sentence = cols[0].strip(), cols[1]
        else:
            sentence, index = line, str(len(out.sentences))
        if not sentence.strip():
            raise UserError(f"{name}:{n}: empty sentence")
        out.sentences.append(sentence)
        out.where.append(f"{name}:{n}")
        out.index.append(index)
    if not out.sentences:
        raise UserError(f"{name} holds no sentences")
    return out


def from_arguments(sentences: list[str]) -> Inputs:
    for i, s in enumerate(sentences, start=1):
        if not s.strip():
            raise UserError(f"sentence argument {i} is empty")
    n = len(sentences)
    return Inputs(list(sentences), [f"argument {i}" for i in range(1, n + 1)], [str(i) for i in range(n)])


def check_output(path: str | None, flag: str, suffixes: tuple[str, ...]) -> None:
    """Before any model is loaded: the output's kind is known and its folder exists."""
    if path is None:
        return
    p = Path(path)
    if p.suffix.lower() not in suffixes:
        raise UserError(f"{flag} {p}: the name must end in {' or '.join(suffixes)}")
    if not p.parent.is_dir():
        raise UserError(f"{flag} {p}: the folder {p.parent} does not exist")


def write_atomic(path: str | Path, text: str) -> None:
    """Written whole or not at all: a failure leaves an earlier file of that name as it was."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"{path} cannot be written: {e.strerror or e}") from None


def predictions_text(path: str | Path, inputs: Inputs, probs: torch.Tensor, labels: torch.Tensor) -> str:
    """--output's contents: JSONL (index, sentence, label, p_acceptable) or TSV with the same columns. A JSONL
    index is an integer, as in GLUE's files (a non-numeric index of a GLUE file stays as written)."""
    rows = zip(inputs.index, inputs.sentences, labels.tolist(), probs.tolist())
    if Path(path).suffix.lower() == ".jsonl":
        return "".join(json.dumps({"index": int(i) if i.isdecimal() else i, "sentence": s, "label": y,
                                   "p_acceptable": p}) + "\n"
                       for i, s, y, p in rows)
    return "index\tlabel\tp_acceptable\tsentence\n" + "".join(f"{i}\t{y}\t{p!r}\t{s}\n" for i, s, y, p in rows)


def glue_text(inputs: Inputs, labels: torch.Tensor) -> str:
    """GLUE's CoLA submission: a header, then each test row's index and predicted label (0/1)."""
    return "index\tprediction\n" + "".join(f"{i}\t{y}\n" for i, y in zip(inputs.index, labels.tolist()))
