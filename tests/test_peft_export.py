"""export_peft: the adapter loads in PEFT onto transformers' GPT2ForSequenceClassification and gives our logits.

LoRA B and the head are random and non-zero, so a transposed, misnamed or dropped tensor, or a wrong scaling,
moves the logits far beyond the tolerance. lora_alpha is 16, not PEFT's default 8, so an alpha dropped from
adapter_config.json (PEFT then scales by 8 / r) moves them too.

Bugs these tests exist to catch (each was planted and seen to fail a test): lora_alpha or use_rslora dropped
from adapter_config.json (the logits check alone sees a dropped alpha), lora_A and lora_B swapped, the `score`
head not saved, a merged model exporting other tensors than an unmerged one.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT
from data import PAD_TOKEN, Batch, collate
from lora import TARGETS, build_lora_classifier, export_peft, inject_lora, lora_modules, merge_lora
from model import GPT

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

N_SENTENCES = 128  # dev rows of many lengths, so padding is exercised
ALPHA = 16.0  # not PEFT's default lora_alpha (8): a dropped alpha must change the logits
MODULE_OF = {"c_attn": "attn.c_attn", "attn.c_proj": "attn.c_proj", "c_fc": "mlp.c_fc", "mlp.c_proj": "mlp.c_proj"}


@pytest.fixture(scope="module")
def batch(cola) -> Batch:
    return collate(cola["dev"], list(range(N_SENTENCES)))


def peft_logits(base_dir: Path, export_dir: Path, batch: Batch, n_classes: int = 2) -> torch.Tensor:
    base = transformers.GPT2ForSequenceClassification.from_pretrained(base_dir, num_labels=n_classes,
                                                                       pad_token_id=PAD_TOKEN)
    model = peft.PeftModel.from_pretrained(base, export_dir).eval()
    mask = (torch.arange(batch.ids.size(1))[None, :] < batch.lengths[:, None]).long()
    with torch.no_grad():
        return model(input_ids=batch.ids, attention_mask=mask).logits


def our_logits(model: GPT, batch: Batch) -> torch.Tensor:
    with torch.no_grad():
        return model.eval().classify(batch.ids, batch.lengths)


@pytest.mark.parametrize("targets,rslora", [
    (TARGETS, False),
    (("c_attn", "mlp.c_proj"), True),
    (("attn.c_proj", "c_fc"), False),  # attn.c_proj must not also match mlp.c_proj
])
def test_export_matches_peft(tiny_gpt2, batch, tmp_path, targets, rslora):
    torch.manual_seed(0)
    model = GPT.from_pretrained(str(tiny_gpt2))
    inject_lora(model, r=4, alpha=ALPHA, dropout=0.1, targets=targets, rslora=rslora)
    without_lora = our_logits(model, batch)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.normal_(0.0, 0.5)
        model.score.weight.normal_(0.0, 1.0)
    ours = our_logits(model, batch)
    config = {"gpt_variant": str(tiny_gpt2), "lora_rank": 4, "lora_alpha": ALPHA, "lora_dropout": 0.1,
              "lora_targets": list(targets), "rslora": rslora}

    export_peft(model, config, tmp_path / "peft")

    theirs = peft_logits(tiny_gpt2, tmp_path / "peft", batch)
    assert (ours - without_lora).abs().max() > 1e-2  # the adapter matters, so the comparison can fail
    assert (theirs - ours).abs().max() < 1e-4

    written = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert {k: written[k] for k in ("peft_type", "task_type", "r", "lora_alpha", "use_rslora", "target_modules",
                                    "fan_in_fan_out", "modules_to_save", "base_model_name_or_path")} == {
        "peft_type": "LORA", "task_type": "SEQ_CLS", "r": 4, "lora_alpha": ALPHA, "use_rslora": rslora,
        "target_modules": list(targets), "fan_in_fan_out": True, "modules_to_save": ["score"],
        "base_model_name_or_path": str(tiny_gpt2)}
    keys = set(load_file(str(tmp_path / "peft" / "adapter_model.safetensors")))
    assert keys == {"base_model.model.score.weight"} | {
        f"base_model.model.transformer.h.{i}.{MODULE_OF[t]}.lora_{ab}.weight"
        for i in range(model.config.n_layer) for t in targets for ab in "AB"}

    merge_lora(model)  # the exported tensors do not depend on whether W0 holds B A
    export_peft(model, config, tmp_path / "merged")
    a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("peft", "merged"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_export_peft(tiny_gpt2, cola_dir, batch, tmp_path):
    out, export = tmp_path / "run", tmp_path / "peft"
    r = subprocess.run([sys.executable, "train_lora.py", "--gpt_variant", str(tiny_gpt2), "--data_dir", str(cola_dir),
                        "--max_train_samples", "64", "--max_eval_samples", "32", "--epochs", "1", "--lr", "1e-2",
                        "--out_dir", str(out), "--export_peft", str(export)],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (export / "adapter_config.json").is_file() and (export / "adapter_model.safetensors").is_file()

    model, _ = build_lora_classifier(out)
    assert any(m.lora_B.abs().max() > 0 for m in lora_modules(model).values())  # it trained
    assert (peft_logits(tiny_gpt2, export, batch) - our_logits(model, batch)).abs().max() < 1e-4
