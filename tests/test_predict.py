"""predict.py and inference.py: tiny runs trained by the real scripts on real CoLA, then predicted again from
their directories. The dev predictions must reproduce training's predictions.json; the GLUE file must have
GLUE's layout; every bad input is one line and exit 2.

Bugs these tests exist to catch: predictions that differ from training's for the same weights (another
row order, precision or model than the run's), a GLUE file in another layout, bad input ending in a
traceback.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import traceback
from pathlib import Path
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file, save_file

import predict as predict_script
import train_distil
import train_lora
from conftest import ROOT, make_gpt2_checkpoint
from data import SPLITS, collate, get_encoder, read_tsv
from inference import load_classifier, p_acceptable
from lora import build_lora_classifier, lora_modules
from model import DistilRNN
from precision import Precision

ENV = dict(os.environ, HF_HUB_OFFLINE="1", MPLBACKEND="Agg")
SENTENCES = ["The book was written by John.", "Book the was by written John."]
CPU, FP32 = torch.device("cpu"), Precision("fp32", "cpu")


def script(name: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, name, *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          input=stdin, timeout=600)


def predict(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """predict.py's main, run in this process (a subprocess would spend seconds importing torch each time; the
    dev-set test runs the real script): its exit status, stdout and stderr. An exception that escapes main ends
    as a traceback on stderr, as it would from the script."""
    out, err = io.StringIO(), io.StringIO()
    argv = ["predict.py", *args, "--device", "cpu"]
    with (mock.patch.object(sys, "argv", argv), mock.patch.object(sys, "stdin", io.StringIO(stdin or "")),
          contextlib.redirect_stdout(out), contextlib.redirect_stderr(err)):
        try:
            predict_script.main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
        except Exception:  # noqa: BLE001 - reported as the script would report it
            traceback.print_exc()
            code = 1
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def one_line_error(r: subprocess.CompletedProcess, *fragments: str) -> str:
    err = r.stderr.strip()
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr and "\n" not in err and err.startswith("error: "), err
    for f in fragments:
        assert f in err, (f, err)
    return err


@pytest.fixture(scope="module")
def gpt2_128(tmp_path_factory) -> Path:
    """A tiny GPT-2 with 128 positions, so a sentence longer than the teacher's positions is cheap to make."""
    return make_gpt2_checkpoint(tmp_path_factory.mktemp("gpt2_128"), n_positions=128)


@pytest.fixture(scope="module")
def runs(gpt2_128, cola_dir, tmp_path_factory) -> dict[str, Path]:
    """A LoRA teacher and a student (--mode rnn, wte from the same GPT-2), one epoch each on sampled rows,
    trained by the scripts' train() in this process; dev is sampled too, so predictions.json holds only those
    rows."""
    out = tmp_path_factory.mktemp("runs")
    common = ["--gpt_variant", str(gpt2_128), "--data_dir", str(cola_dir), "--max_train_samples", "64",
              "--max_eval_samples", "80", "--epochs", "1", "--device", "cpu"]
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # in this process, as fast as a subprocess without its imports
    try:
        train_lora.train(train_lora.build_parser().parse_args([*common, "--out_dir", str(out / "lora")]))
        train_distil.train(train_distil.build_parser().parse_args([
            "--mode", "rnn", "--hidden_size", "16", *common, "--out_dir", str(out / "rnn"),
            "--cache_dir", str(out / "cache")]))
    finally:
        torch.set_num_threads(n)
    return {"lora": out / "lora", "student": out / "rnn"}


@pytest.fixture(scope="module")
def dev_tsv(cola_dir) -> Path:
    return next(Path(cola_dir).rglob(SPLITS["dev"]))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------- equivalence with training's predictions

@pytest.mark.parametrize("kind", ["lora", "student"])
def test_dev_predictions_reproduce_predictions_json(runs, kind, dev_tsv, tmp_path):
    out = tmp_path / "dev.jsonl"
    r = script("predict.py", str(runs[kind]), "--file", str(dev_tsv), "--output", str(out), "--batch_size", "48",
               "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    got = read_jsonl(out)
    sentences, _ = read_tsv(dev_tsv)
    assert len(got) == len(sentences) == 527
    assert [g["index"] for g in got] == list(range(527))  # integers, as in GLUE
    assert [g["sentence"] for g in got] == sentences  # the 4th column, in file order
    saved = json.loads((runs[kind] / "predictions.json").read_text())["dev"]
    assert len(saved["rows"]) == 80
    p = torch.tensor([got[i]["p_acceptable"] for i in saved["rows"]], dtype=torch.float64)
    torch.testing.assert_close(p, torch.tensor(saved["p1"], dtype=torch.float64), rtol=0, atol=1e-6)
    assert [got[i]["label"] for i in saved["rows"]] == [int(q > 0.5) for q in saved["p1"]]
    assert 0 < sum(g["label"] for g in got) < 527 or kind == "student"  # a random-ish tiny model may collapse


def test_teacher_is_loaded_merged_and_computes_the_unmerged_function(runs, dev_tsv):
    clf = load_classifier(runs["lora"], CPU, FP32)
    layers = lora_modules(clf.model)
    assert clf.kind == "lora" and clf.max_tokens == 128 and len(layers) == 8  # 2 blocks x 4 targets
    assert all(m.merged for m in layers.values()) and not clf.model.training
    unmerged, _ = build_lora_classifier(runs["lora"])
    enc = get_encoder()
    ids = enc.encode_ordinary_batch(read_tsv(dev_tsv)[0][:40])
    p, _ = p_acceptable(clf, ids, 16, CPU, FP32)
    q, _ = p_acceptable(type(clf)(unmerged.eval(), "lora", 128), ids, 16, CPU, FP32)
    torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_a_students_prediction_does_not_depend_on_its_batch(cola):
    """Alone, in a batch of one length, or padded beside a longer sentence: the same logits (real dev sentences)."""
    torch.manual_seed(0)
    m = DistilRNN(embd_dim=24, hidden_size=16).eval()
    dev = cola["dev"]
    by_len = {}
    for i, x in enumerate(dev.ids):
        by_len.setdefault(len(x), []).append(i)
    same = next(rows for rows in by_len.values() if len(rows) >= 3)[:3]
    longer = next(i for i, x in enumerate(dev.ids) if len(x) > len(dev.ids[same[0]]) + 3)
    batch = collate(dev, [longer, *same])  # packed: the first row is longer than the others
    with torch.no_grad():
        mixed = m.classify(batch.ids, batch.lengths)[1:]  # (3, 2)
        equal = collate(dev, same)
        together = m.classify(equal.ids, equal.lengths)  # all of one length: no padding
        alone = torch.cat([m.classify(collate(dev, [i]).ids, collate(dev, [i]).lengths) for i in same])
        padded_one = m.classify(batch.ids[1:2], batch.lengths[1:2])  # one sentence, right-padded
    torch.testing.assert_close(together, mixed, rtol=0, atol=1e-6)
    torch.testing.assert_close(alone, mixed, rtol=0, atol=1e-6)
    torch.testing.assert_close(padded_one, mixed[:1], rtol=0, atol=1e-6)


# ---------------------------------------------------------------- inputs and outputs

def test_glue_submission_has_glue_layout_and_follows_the_index_column(runs, cola, tmp_path):
    ood = cola["ood_dev"]
    index = [str(1000 + 3 * i) for i in range(60)]  # not 0..N-1, and not in length order
    test_tsv = tmp_path / "test.tsv"
    test_tsv.write_text("index\tsentence\n" + "".join(f"{i}\t{s}\n" for i, s in zip(index, ood.sentences)))
    sub, out = tmp_path / "CoLA.tsv", tmp_path / "out.tsv"
    r = predict(str(runs["lora"]), "--file", str(test_tsv), "--glue_submission", str(sub), "--output", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    lines = sub.read_text().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 61
    rows = [line.split("\t") for line in lines[1:]]
    assert [i for i, _ in rows] == index and {y for _, y in rows} <= {"0", "1"}
    # each prediction is its own sentence's: the model's label for that sentence alone, computed here
    clf = load_classifier(runs["lora"], CPU, FP32)
    alone = [p_acceptable(clf, [ood.ids[k]], 1, CPU, FP32) for k in range(60)]
    p, labels = torch.cat([a[0] for a in alone]), torch.cat([a[1] for a in alone])
    assert [int(y) for _, y in rows] == labels.tolist()
    tsv = [line.split("\t") for line in out.read_text().splitlines()]
    assert tsv[0] == ["index", "label", "p_acceptable", "sentence"]
    assert [t[3] for t in tsv[1:]] == ood.sentences[:60] and [t[0] for t in tsv[1:]] == index
    torch.testing.assert_close(torch.tensor([float(t[2]) for t in tsv[1:]], dtype=torch.float64), p,
                               rtol=0, atol=1e-6)  # other batches: float32 noise only


def test_arguments_stdin_and_text_file_agree(runs, tmp_path):
    args = predict(str(runs["student"]), *SENTENCES)
    assert args.returncode == 0, args.stderr[-3000:]
    printed = args.stdout.strip().splitlines()
    assert len(printed) == 2 and [line.endswith(s) for line, s in zip(printed, SENTENCES)] == [True, True]
    stdin = predict(str(runs["student"]), "-", stdin="\n".join(SENTENCES) + "\n")
    assert stdin.returncode == 0 and stdin.stdout == args.stdout
    text = tmp_path / "s.txt"
    text.write_text("\n".join(SENTENCES) + "\n")
    out = tmp_path / "s.jsonl"
    r = predict(str(runs["student"]), "--file", str(text), "--output", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    got = read_jsonl(out)
    assert [g["sentence"] for g in got] == SENTENCES and [g["index"] for g in got] == [0, 1]
    for line, g in zip(printed, got):
        assert line.startswith(f"{g['label']} {'acceptable' if g['label'] else 'unacceptable'}")
        assert f"P(acceptable) {g['p_acceptable']:.4f}" in line


def test_a_sentence_longer_than_the_teachers_positions_is_cut_with_a_warning(runs, tmp_path):
    long_sentence = " ".join(["the cat sat on the mat"] * 40)  # 240 tokens, the teacher has 128 positions
    ids = get_encoder().encode_ordinary(long_sentence)
    assert len(ids) > 128
    out = tmp_path / "long.jsonl"
    r = predict(str(runs["lora"]), SENTENCES[0], long_sentence, "--output", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "warning: argument 2: the sentence is longer than the teacher's 128 positions" in r.stderr
    assert "argument 1" not in r.stderr
    clf = load_classifier(runs["lora"], CPU, FP32)
    p, _ = p_acceptable(clf, [ids[:128]], 1, CPU, FP32)
    assert read_jsonl(out)[1]["p_acceptable"] == pytest.approx(p.item(), abs=1e-7)
    r = predict(str(runs["student"]), long_sentence)  # the student has no position limit
    assert r.returncode == 0 and "warning" not in r.stderr


# ---------------------------------------------------------------- bad input: one line, exit 2

def test_not_a_finished_run(runs, tmp_path):
    one_line_error(predict(str(tmp_path / "missing"), "A sentence."), "is not a directory")
    one_line_error(predict(str(tmp_path), "A sentence."), "holds no trained model", "not a finished run")
    half = tmp_path / "half"
    half.mkdir()
    shutil.copy(runs["student"] / "student_config.json", half)
    one_line_error(predict(str(half), "A sentence."), "student_config.json but no student.safetensors")
    broken = tmp_path / "broken"
    shutil.copytree(runs["student"], broken)
    (broken / "student.safetensors").write_bytes(b"not a safetensors file")
    one_line_error(predict(str(broken), "A sentence."), "student.safetensors")


def test_a_run_whose_base_is_missing(runs, gpt2_128, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(runs["lora"], moved)
    cfg = json.loads((moved / "adapter_config.json").read_text())
    cfg["gpt_variant"] = str(tmp_path / "gone")
    (moved / "adapter_config.json").write_text(json.dumps(cfg))
    one_line_error(predict(str(moved), "A sentence."), str(tmp_path / "gone"), "is not found", "--base")
    cfg["gpt_variant"] = "gpt2"  # a hub name, not in the (offline) cache
    (moved / "adapter_config.json").write_text(json.dumps(cfg))
    one_line_error(predict(str(moved), "A sentence."), "cannot be loaded", "--base")
    r = predict(str(moved), "A sentence.", "--base", str(gpt2_128))
    assert r.returncode == 0, r.stderr[-2000:]


def test_empty_sentences_and_empty_files(runs, tmp_path):
    one_line_error(predict(str(runs["student"]), SENTENCES[0], ""), "sentence argument 2 is empty")
    one_line_error(predict(str(runs["student"]), "   "), "sentence argument 1 is empty")
    one_line_error(predict(str(runs["student"])), "nothing to classify")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    one_line_error(predict(str(runs["student"]), "--file", str(empty)), f"{empty} holds no sentences")
    one_line_error(predict(str(runs["student"]), "-", stdin="\n\n"), "<stdin> holds no sentences")
    gap = tmp_path / "gap.txt"
    gap.write_text(f"{SENTENCES[0]}\n\n{SENTENCES[1]}\n")
    one_line_error(predict(str(runs["student"]), "--file", str(gap)), f"{gap}:2: empty sentence")


def test_malformed_tsv_rows_name_their_line(runs, dev_tsv, tmp_path):
    rows = dev_tsv.read_text().splitlines()[:5]
    bad = tmp_path / "bad_cola.tsv"
    bad.write_text("\n".join(rows[:3] + ["gj04\t1\tThe cat sat."] + rows[3:]) + "\n")
    one_line_error(predict(str(runs["student"]), "--file", str(bad)), f"{bad}:4:", "this one has 3")
    bad.write_text("\n".join(rows[:2] + ["gj04\tyes\t\tThe cat sat."]) + "\n")
    one_line_error(predict(str(runs["student"]), "--file", str(bad)), f"{bad}:3:", "label 'yes'")
    bad_glue = tmp_path / "bad_glue.tsv"
    bad_glue.write_text("index\tsentence\n0\tThe cat sat.\none\tThe dog ran.\n")
    one_line_error(predict(str(runs["student"]), "--file", str(bad_glue)), f"{bad_glue}:3:", "index 'one'")
    odd = tmp_path / "odd.tsv"
    odd.write_text("a\tb\tc\n")
    one_line_error(predict(str(runs["student"]), "--file", str(odd)), f"{odd}:1:", "--format")
    one_line_error(predict(str(runs["student"]), SENTENCES[0], "--output", str(tmp_path / "p.csv")), ".jsonl or .tsv")



# ---------------------------------------------------------------- what predict.py promises (issue 25)

@pytest.fixture(scope="module")
def bf16_lora(gpt2_128, cola_dir, tmp_path_factory) -> Path:
    """A LoRA teacher trained in bf16 (autocast on the CPU), in this process: one epoch on sampled rows."""
    out = tmp_path_factory.mktemp("bf16") / "lora"
    train_lora.train(train_lora.build_parser().parse_args([
        "--gpt_variant", str(gpt2_128), "--data_dir", str(cola_dir), "--max_train_samples", "64",
        "--max_eval_samples", "80", "--epochs", "1", "--precision", "bf16", "--out_dir", str(out),
        "--device", "cpu"]))
    return out


def test_a_bf16_teachers_dev_predictions_are_its_predictions_json_and_precision_is_honoured(bf16_lora, dev_tsv,
                                                                                             tmp_path):
    """The run's own dev rows, in one batch as training scored them: --precision bf16 gives predictions.json's
    probabilities exactly (the frozen weights stored in bf16 and LoRA unmerged, as training ran it), and
    --precision fp32 visibly others (so the flag is not ignored)."""
    saved = json.loads((bf16_lora / "predictions.json").read_text())["dev"]
    lines = dev_tsv.read_text().splitlines()
    rows = tmp_path / "rows.tsv"
    rows.write_text("".join(lines[i] + "\n" for i in saved["rows"]))
    got = {}
    for precision in ("bf16", "fp32"):
        out = tmp_path / f"{precision}.jsonl"
        r = predict(str(bf16_lora), "--file", str(rows), "--output", str(out), "--batch_size", "256",
                    "--precision", precision)
        assert r.returncode == 0, r.stderr[-3000:]
        got[precision] = torch.tensor([g["p_acceptable"] for g in read_jsonl(out)], dtype=torch.float64)
    want = torch.tensor(saved["p1"], dtype=torch.float64)
    torch.testing.assert_close(got["bf16"], want, rtol=0, atol=1e-12)
    assert (got["fp32"] - want).abs().max() > 1e-5


@pytest.mark.parametrize("suffix", [".jsonl", ".tsv"])
def test_sentences_given_as_arguments_are_indexed_from_0(runs, suffix, tmp_path):
    out = tmp_path / f"p{suffix}"
    r = predict(str(runs["student"]), *SENTENCES, "--output", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    if suffix == ".jsonl":
        index = [g["index"] for g in read_jsonl(out)]
        assert index == [0, 1]  # JSONL: integers, as in GLUE
    else:
        index = [line.split("\t")[0] for line in out.read_text().splitlines()[1:]]
        assert index == ["0", "1"]


@pytest.mark.parametrize("flag,name", [("--output", "p.jsonl"), ("--glue_submission", "CoLA.tsv")])
def test_a_failed_write_is_an_error_that_writes_nothing(runs, flag, name, tmp_path):
    """The file cannot be written (a folder holds its name): exit 2 in one line naming it, no "written to"
    line, and nothing half-written beside it."""
    target = tmp_path / name
    target.mkdir()
    r = predict(str(runs["student"]), *SENTENCES, flag, str(target))
    one_line_error(r, str(target), "cannot be written")
    assert "written to" not in r.stdout and target.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


@pytest.mark.parametrize("how", ["missing", "unexpected"])
def test_a_student_whose_weights_do_not_match_its_config_is_refused(runs, how, tmp_path):
    """Never loaded with some weights left random: one line naming the file and the keys."""
    broken = tmp_path / "broken"
    shutil.copytree(runs["student"], broken)
    weights = load_file(str(broken / "student.safetensors"))
    if how == "missing":
        key = "head.weight" if "head.weight" in weights else sorted(weights)[-1]
        del weights[key]
    else:
        key = "extra.weight"
        weights[key] = torch.zeros(2)
    save_file(weights, str(broken / "student.safetensors"))
    one_line_error(predict(str(broken), SENTENCES[0]), str(broken / "student.safetensors"), how, key)
