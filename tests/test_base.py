"""A run is tied to its exact base GPT-2, not only to its shape (issue 24): a LoRA adapter records its base's
fingerprint (model.base_fingerprint) and refuses another base of the same shape wherever it is loaded
(predict.py, the distillation teacher, report.py's groups); an adapter written before fingerprints still loads.
Also predict.py's arguments in any order, its JSONL index an integer, and the student-from-another-base note.

Bugs this exists to catch: the fingerprint not recorded or not compared (a same-shape base silently accepted,
another probability printed); a fingerprint of the path instead of the weights (a replaced directory accepted);
an old adapter without a fingerprint refused; the shape error naming the adapter config's base instead of the
one checked (--base); report.py pooling runs of two bases as seeds of one recipe."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, make_gpt2_checkpoint
from errors import UserError
from inference import Inputs, predictions_text
from lora import ADAPTER_CONFIG, build_lora_classifier
from model import base_fingerprint
from report import Run, make_groups

ENV = dict(os.environ, HF_HUB_OFFLINE="1", MPLBACKEND="Agg", OMP_NUM_THREADS="1")


def script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, name, *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=600)


def error_line(r: subprocess.CompletedProcess) -> str:
    err = r.stderr.strip()
    assert r.returncode == 2 and "Traceback" not in err and "\n" not in err and err.startswith("error: "), r.stderr
    return err


@pytest.fixture(scope="module")
def twin(tmp_path_factory) -> Path:
    """Another tiny GPT-2 of the lora_ref base's exact shape, with other weights."""
    return make_gpt2_checkpoint(tmp_path_factory.mktemp("twin_gpt2"), seed=1)


def test_the_fingerprint_tells_weights_apart_not_paths(tiny_gpt2, twin, tmp_path):
    copy = shutil.copytree(tiny_gpt2, tmp_path / "copy")
    assert base_fingerprint(str(copy)) == base_fingerprint(str(tiny_gpt2)) != base_fingerprint(str(twin))


def test_predict_refuses_a_base_of_the_same_shape_naming_both(lora_ref, tiny_gpt2, twin):
    assert json.loads((lora_ref / ADAPTER_CONFIG).read_text())["base_fingerprint"] == base_fingerprint(str(tiny_gpt2))
    err = error_line(script("predict.py", str(lora_ref), "A sentence.", "--base", str(twin), "--device", "cpu"))
    assert str(twin) in err and str(tiny_gpt2) in err and "other weights" in err, err
    # options before, between and after the sentences: argparse's intermixed parsing
    r = script("predict.py", str(lora_ref), "--device", "cpu", "A sentence.", "--base", str(tiny_gpt2), "B c.")
    assert r.returncode == 0, r.stderr
    assert [line.split("  ")[-1] for line in r.stdout.splitlines()] == ["A sentence.", "B c."]


def test_the_shape_error_names_the_base_it_checked(lora_ref, tmp_path):
    wide = make_gpt2_checkpoint(tmp_path / "wide", n_embd=48)
    err = error_line(script("predict.py", str(lora_ref), "--base", str(wide), "--device", "cpu", "A sentence."))
    assert f"'{wide}' has" in err and "n_embd" in err, err


def test_an_adapter_without_a_fingerprint_still_loads(lora_ref, tiny_gpt2, twin, tmp_path):
    old = shutil.copytree(lora_ref, tmp_path / "old")
    cfg = json.loads((old / ADAPTER_CONFIG).read_text())
    del cfg["base_fingerprint"]
    (old / ADAPTER_CONFIG).write_text(json.dumps(cfg))
    build_lora_classifier(old)  # its own base: loads
    build_lora_classifier(old, base_path=str(twin))  # nothing recorded to compare: what check is possible (shapes)


def test_the_distillation_teacher_refuses_a_replaced_base(lora_ref, twin, tmp_path):
    """The teacher's base directory now holds other weights (as if replaced): distillation stops in one line."""
    moved = shutil.copytree(lora_ref, tmp_path / "teacher")
    cfg = json.loads((moved / ADAPTER_CONFIG).read_text())
    (moved / ADAPTER_CONFIG).write_text(json.dumps({**cfg, "gpt_variant": str(twin)}))
    with pytest.raises(UserError, match="other weights"):
        build_lora_classifier(moved)


def test_report_does_not_pool_runs_of_two_bases():
    dev = {"epoch": 1, "rows": [0, 1], "labels": [0, 1], "p1": [0.2, 0.8]}
    runs = [Run(Path(f"lora_{s}"), {"config": {"gpt_variant": "/ckpt/gpt2", "seed": s}, "base_fingerprint": fp},
                {"dev": dev}) for s, fp in ((1, "aa"), (2, "aa"), (3, None))]
    assert [len(g.runs) for g in make_groups(runs)] == [3]  # one base (and one run too old to say)
    runs.append(Run(Path("lora_4"), {"config": {"gpt_variant": "/ckpt/gpt2", "seed": 4}, "base_fingerprint": "bb"},
                    {"dev": dev}))
    with pytest.raises(UserError, match="different base weights"):
        make_groups(runs)


def test_a_student_from_another_base_than_its_teacher_says_so(lora_ref, twin, cola_dir, tmp_path):
    common = ["--mode", "rnn", "--teacher", str(lora_ref), "--data_dir", str(cola_dir), "--max_train_samples", "32",
              "--max_eval_samples", "32", "--epochs", "1", "--hidden_size", "8", "--cache_dir", str(tmp_path / "c"),
              "--device", "cpu"]
    r = script("train_distil.py", *common, "--gpt_variant", str(twin), "--out_dir", str(tmp_path / "other"))
    assert r.returncode == 0, r.stderr
    notes = [line for line in r.stdout.splitlines() if "different base than its teacher" in line]
    assert len(notes) == 1 and str(twin) in notes[0], r.stdout
    assert r.stdout.index(notes[0]) < r.stdout.index("epoch 1:")  # at the start
    recorded = json.loads((tmp_path / "other" / "metrics.json").read_text())["base_fingerprint"]
    assert recorded == base_fingerprint(str(twin))
    r = script("train_distil.py", *common, "--out_dir", str(tmp_path / "same"))  # the teacher's own base: no note
    assert r.returncode == 0 and "different base" not in r.stdout, r.stderr


def test_jsonl_index_is_an_integer_as_in_glue():
    rows = predictions_text("p.jsonl", Inputs(["A.", "B."], ["t:2", "t:3"], ["0", "17"]), torch.tensor([0.25, 0.75]),
                            torch.tensor([0, 1]))
    assert [json.loads(line)["index"] for line in rows.splitlines()] == [0, 17]
