"""train_lora.py end to end, as a user runs it: a tiny local GPT-2, real CoLA, two epochs; and the optimiser and
learning-rate schedule (trainer.py) it shares with train_distil.py.

Bugs these tests exist to catch. Planted and seen to fail a test:
- the schedule: an off-by-one warmup (LR 0 at the first step), a decay that never reaches 0 or does not
  end at the last step, a floor under the decay, warmup and decay counted on one epoch's steps instead of
  the run's;
- weight decay on the token embedding (wte), on biases, on nothing, or with its groups swapped.
Guarded too: metrics.json missing keys or holding non-finite values, a best epoch that is not the best dev
MCC; baselines of other rows than those evaluated; adapter files that do not rebuild the best epoch; a bad
--lora_targets that is not one error line.
"""

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
from lora import inject_lora, lora_modules
from model import GPT, DistilRNN
from precision import Precision
from trainer import make_optimizer, warmup_linear

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
    r = run_script("--gpt_variant", str(tiny_gpt2), "--data_dir", str(cola_dir), "--max_train_samples", "300",
                   "--max_eval_samples", "100", "--epochs", "2", "--out_dir", str(out),
                   "--batch_size", "32", "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    return out, out, r


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
    data = (plots / f"{kind}.png").read_bytes()  # in the run directory
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
        "--device", "cpu"])
    with pytest.raises(SystemExit) as e:
        train_lora.main()
    assert e.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "q_proj" in errors[0], err
    assert not (tmp_path / "o" / "metrics.json").exists()


# ---------------------------------------------------------------- the optimiser and the schedule (trainer.py)

def test_warmup_linear_is_pinned():
    """Linear warmup whose first step already has LR > 0, peak 1 at the end of warmup, then linear decay that
    reaches exactly 0 after the last step (LambdaLR's step k uses f(k); f(total) is the LR after training)."""
    f = warmup_linear(10, 0.3)  # 3 warmup steps, 7 decay steps
    assert [f(k) for k in range(11)] == pytest.approx([1 / 3, 2 / 3, 1, 1, 6 / 7, 5 / 7, 4 / 7, 3 / 7, 2 / 7, 1 / 7, 0],
                                                      abs=1e-12)
    assert f(12) == 0
    f = warmup_linear(8, 0.0)  # no warmup: the peak at once
    assert [f(k) for k in range(9)] == pytest.approx([1, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8, 0], abs=1e-12)


def test_the_recorded_learning_rate_follows_the_whole_runs_schedule(run):
    """300 rows in batches of 32: 10 steps an epoch, 20 in all, 1 warmup step (6%). metrics.json records the LR
    after each epoch's last step: lr (20 - 10) / 19 after epoch 1, 0 after the last."""
    out, _, _ = run
    m = json.loads((out / "metrics.json").read_text())
    assert [e["lr"] for e in m["epochs"]] == pytest.approx([4e-4 * 10 / 19, 0.0], abs=1e-15)


def decayed_by_one_step(model: torch.nn.Module) -> dict[str, bool]:
    """{name: whether AdamW (lr 0.1, weight decay 0.5) shrank it} after one step with zero gradients: Adam's own
    update is then 0, so a parameter either stays or is scaled by exactly 1 - 0.1 * 0.5."""
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in trainable.items()}
    opt = make_optimizer(model, lr=0.1, weight_decay=0.5)
    for p in trainable.values():
        p.grad = torch.zeros_like(p)
    opt.step()
    out = {}
    for n, p in trainable.items():
        if torch.equal(p, before[n]):
            out[n] = False
        else:
            torch.testing.assert_close(p, 0.95 * before[n], rtol=1e-6, atol=0)
            out[n] = True
    return out


def test_weight_decay_on_matrices_not_on_embeddings_biases_or_norms(tiny_gpt2):
    torch.manual_seed(0)
    rnn = decayed_by_one_step(DistilRNN(vocab_size=500, embd_dim=8, hidden_size=8, num_layers=2))
    assert {n for n, d in rnn.items() if d} == {f"rnn.weight_{k}_l{i}{r}" for k in ("ih", "hh") for i in (0, 1)
                                                 for r in ("", "_reverse")} | {"head.weight"}
    assert {n for n, d in rnn.items() if not d} == {"wte.weight", "head.bias"} | {
        f"rnn.bias_{k}_l{i}{r}" for k in ("ih", "hh") for i in (0, 1) for r in ("", "_reverse")}

    gpt = GPT.from_pretrained(str(tiny_gpt2))  # every weight trainable
    with torch.no_grad():
        for n, p in gpt.named_parameters():
            p.add_(0.1)  # no zero entries: a decayed tensor is seen to move
    full = decayed_by_one_step(gpt)
    assert full["transformer.wte.weight"] is False and "lm_head.weight" not in full  # tied to wte
    assert all(not d for n, d in full.items() if n.endswith(".bias") or ".ln_" in n)
    assert all(full[f"transformer.h.{i}.{m}.weight"] for i in range(2) for m in ("attn.c_attn", "attn.c_proj",
                                                                                  "mlp.c_fc", "mlp.c_proj"))
    assert full["score.weight"]

    lora = GPT.from_pretrained(str(tiny_gpt2))  # as train_lora.py trains it: LoRA and the head
    inject_lora(lora, 2, 4.0)
    with torch.no_grad():
        for m in lora_modules(lora).values():
            m.lora_B.normal_()
    assert all(decayed_by_one_step(lora).values())  # A, B, score: matrices, all decayed
