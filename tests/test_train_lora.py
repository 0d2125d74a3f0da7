"""train_lora.py end to end, as a user runs it: a tiny local GPT-2, real CoLA, two epochs."""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from data import load_cola
from precision import Precision

EPOCH_KEYS = ("train_loss", "train_acc", "val_loss", "val_acc", "val_mcc")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", MPLBACKEND="Agg")
    assert "TIKTOKEN_CACHE_DIR" in env or not (ROOT.parent / "shared" / "tiktoken").is_dir()
    return subprocess.run([sys.executable, "train_lora.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def run(tiny_gpt2, cola_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_out")
    plots = tmp_path_factory.mktemp("lora_plots")
    r = run_script("--gpt_variant", str(tiny_gpt2), "--data_dir", str(cola_dir), "--max_train_samples", "300",
                   "--max_eval_samples", "100", "--epochs", "2", "--out_dir", str(out), "--plots_dir", str(plots),
                   "--batch_size", "32", "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    return out, plots, r


def test_metrics_schema(run, tiny_gpt2):
    out, _, r = run
    m = json.loads((out / "metrics.json").read_text())
    for key in ("config", "epochs", "best_epoch", "best", "majority_baseline", "ood_dev"):
        assert key in m, key
    assert m["config"]["max_train_samples"] == 300 and m["config"]["epochs"] == 2
    assert m["config"]["gpt_variant"] == str(tiny_gpt2)
    assert [e["epoch"] for e in m["epochs"]] == [1, 2]
    for e in m["epochs"]:
        for k in EPOCH_KEYS:
            assert isinstance(e[k], float) and math.isfinite(e[k]), (k, e[k])
        assert e["train_loss"] > 0 and e["val_loss"] > 0
        assert 0 <= e["train_acc"] <= 1 and 0 <= e["val_acc"] <= 1 and -1 <= e["val_mcc"] <= 1
        assert round(e["val_acc"] * 100) == pytest.approx(e["val_acc"] * 100, abs=1e-3)  # out of 100 dev rows
    assert m["best_epoch"] in (1, 2)
    assert m["best"] == m["epochs"][m["best_epoch"] - 1]
    assert m["best"]["val_mcc"] == max(e["val_mcc"] for e in m["epochs"])
    assert "trainable params" in r.stdout


def test_baselines_are_those_of_the_evaluated_rows(run, cola):
    from data import stratified_sample
    out, _, _ = run
    m = json.loads((out / "metrics.json").read_text())
    for split, got in (("dev", m["majority_baseline"]["val_acc"]), ("ood_dev", m["ood_dev"]["majority_acc"])):
        labels = [cola[split].labels[i] for i in stratified_sample(cola[split].labels, 100)]
        assert got == pytest.approx(max(sum(labels), 100 - sum(labels)) / 100)
    assert {"acc", "mcc"} <= set(m["ood_dev"])


def test_adapter_files_rebuild_the_best_epoch(run, tiny_gpt2, cola_dir):
    """The saved adapter is the best epoch's: rebuilt from its files, it scores what metrics.json says."""
    from lora import build_lora_classifier
    from metrics import evaluate
    out, _, _ = run
    assert (out / "adapter.safetensors").stat().st_size > 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    for k in ("gpt_variant", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "rslora", "n_layer",
              "n_head", "n_embd", "vocab_size", "n_classes"):
        assert k in cfg, k
    assert (cfg["n_layer"], cfg["n_head"], cfg["n_embd"]) == (2, 2, 32)
    m = json.loads((out / "metrics.json").read_text())
    model, _ = build_lora_classifier(out)
    data = load_cola(cola_dir, 1, 100)
    dev = evaluate(model, data["dev"], 32, torch.device("cpu"), Precision("fp32", "cpu"))
    ood = evaluate(model, data["ood_dev"], 32, torch.device("cpu"), Precision("fp32", "cpu"))
    assert dev["acc"] == pytest.approx(m["best"]["val_acc"], abs=1e-9)
    assert dev["mcc"] == pytest.approx(m["best"]["val_mcc"], abs=1e-6)
    assert dev["loss"] == pytest.approx(m["best"]["val_loss"], abs=1e-5)
    assert ood["acc"] == pytest.approx(m["ood_dev"]["acc"], abs=1e-9)


@pytest.mark.parametrize("kind", ["loss", "accuracy"])
def test_plots_are_pngs(run, kind):
    out, plots, _ = run
    data = (plots / f"{out.name}_{kind}.png").read_bytes()  # named after --out_dir's last part
    assert data[:8] == PNG_MAGIC
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 200 and height >= 150
    assert len(data) > 5000  # curves, axes and a legend, not an empty canvas


def test_bad_target_is_a_one_line_error(tiny_gpt2, cola_dir, tmp_path, monkeypatch, capsys):
    """The script's own error path (in-process, to skip a second interpreter start): exit 2, one line."""
    import train_lora
    monkeypatch.setattr(sys, "argv", [
        "train_lora.py", "--gpt_variant", str(tiny_gpt2), "--data_dir", str(cola_dir), "--max_train_samples", "10",
        "--max_eval_samples", "10", "--lora_targets", "q_proj", "--out_dir", str(tmp_path / "o"),
        "--plots_dir", str(tmp_path / "p"), "--device", "cpu"])
    with pytest.raises(SystemExit) as e:
        train_lora.main()
    assert e.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "q_proj" in errors[0], err
    assert not (tmp_path / "o" / "metrics.json").exists()
