"""GPT.from_pretrained without transformers: what it loads (every weight, tied, from either file format and
either key naming), what it draws from the RNG (only the new head), how it refuses a broken checkpoint or an
unreachable hub; LoRA injection without throwaway weights; and train_distil.py loading the base GPT-2 once.
(Logits against transformers through this loader: tests/test_model.py.)

Bugs these tests exist to catch: a weight not taken from the checkpoint, lm_head not tied to wte; the loader
drawing random numbers for weights it then overwrites (which shifts every seed's run); a format or key naming
not understood; a broken checkpoint or an unreachable hub ending in a traceback; the base GPT-2 loaded twice.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ROOT, make_gpt2_checkpoint
from data import load_cola
from errors import UserError
from lora import TARGETS, LoRALinear, inject_lora, save_adapter
from model import GPT
from precision import Precision

CPU = torch.device("cpu")
FP32 = Precision("fp32", "cpu")


@pytest.fixture(scope="module")
def hf_tiny(tmp_path_factory):
    """A tiny random checkpoint and transformers' own model of it."""
    from transformers import GPT2LMHeadModel
    path = make_gpt2_checkpoint(tmp_path_factory.mktemp("hf_tiny"), seed=3)
    return path, GPT2LMHeadModel.from_pretrained(path).eval()


def assert_same_weights(a: GPT, b: GPT) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if not k.startswith("score."):
            assert torch.equal(sa[k], sb[k]), k


def test_every_weight_is_the_checkpoints_and_lm_head_is_tied(hf_tiny):
    path, hf = hf_tiny
    m = GPT.from_pretrained(str(path))
    assert not any(t.is_meta for t in [*m.parameters(), *m.buffers()])
    ref = hf.state_dict()
    for k, v in m.state_dict().items():
        if k.startswith("score."):
            continue
        want = ref[k].t() if k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) else ref[k]
        assert torch.equal(v, want), k
    assert m.lm_head.weight is m.transformer.wte.weight
    assert "lm_head.weight" not in dict(m.named_parameters())  # one parameter, counted and optimised once
    assert all(p.requires_grad for p in m.parameters())
    with torch.no_grad():
        m.transformer.wte.weight[0, 0] += 1.0  # writing a weight never writes the mapped file
    assert torch.equal(load_file(str(path / "model.safetensors"))["transformer.wte.weight"], ref["transformer.wte.weight"])


def test_only_the_new_head_draws_from_the_rng(tiny_gpt2):
    """The head is N(0, 0.02) from the global RNG, the first draw after the seed and the only one."""
    torch.manual_seed(123)
    m = GPT.from_pretrained(str(tiny_gpt2))
    after = torch.get_rng_state()
    torch.manual_seed(123)
    expected = torch.empty(m.config.n_classes, m.config.n_embd).normal_(0.0, 0.02)
    assert torch.equal(m.score.weight, expected)
    assert torch.equal(after, torch.get_rng_state())
    torch.manual_seed(123)
    assert torch.equal(GPT.from_pretrained(str(tiny_gpt2), n_classes=3).score.weight[:2], expected)


def test_inject_lora_draws_only_lora_a(tiny_gpt2):
    """Per wrapped layer, in module order, A ~ kaiming-uniform from the global RNG and B = 0; the frozen weight
    and bias are the very tensors of the layer wrapped, and nothing else is drawn."""
    m = GPT.from_pretrained(str(tiny_gpt2))
    originals = {name: (mod.weight, mod.bias) for name, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)}
    torch.manual_seed(7)
    inject_lora(m, 4, 8.0, 0.1, TARGETS)
    after = torch.get_rng_state()
    torch.manual_seed(7)
    layers = {name: mod for name, mod in m.named_modules() if isinstance(mod, LoRALinear)}
    assert len(layers) == 4 * m.config.n_layer
    for name, layer in layers.items():
        expected = torch.empty_like(layer.lora_A)
        torch.nn.init.kaiming_uniform_(expected, a=5 ** 0.5)
        assert torch.equal(layer.lora_A, expected), name
        assert not layer.lora_B.any() and layer.lora_B.shape == (layer.out_features, 4)
        assert layer.weight is originals[name][0] and layer.bias is originals[name][1]
        assert not layer.weight.requires_grad and layer.lora_A.requires_grad
    assert torch.equal(after, torch.get_rng_state())


@pytest.mark.parametrize("zip_format", [True, False])
def test_pytorch_model_bin_only_checkpoint(hf_tiny, tmp_path, zip_format):
    path, hf = hf_tiny
    shutil.copy(path / "config.json", tmp_path / "config.json")
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=zip_format)
    assert_same_weights(GPT.from_pretrained(str(tmp_path)), GPT.from_pretrained(str(path)))


def test_gpt2model_key_names_and_half_precision(hf_tiny, tmp_path):
    """The hub's own GPT-2 files name keys without 'transformer.' (GPT2Model's state dict); a float16 file is
    widened to our float32."""
    path, hf = hf_tiny
    shutil.copy(path / "config.json", tmp_path / "config.json")
    save_file({k: v.contiguous() for k, v in hf.transformer.state_dict().items()}, str(tmp_path / "model.safetensors"))
    assert_same_weights(GPT.from_pretrained(str(tmp_path)), GPT.from_pretrained(str(path)))
    half = tmp_path / "half"
    half.mkdir()
    shutil.copy(path / "config.json", half / "config.json")
    save_file({k: v.half().contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"},
              str(half / "model.safetensors"))
    m = GPT.from_pretrained(str(half))
    assert m.transformer.wte.weight.dtype == torch.float32
    assert torch.equal(m.transformer.wte.weight, hf.transformer.wte.weight.half().float())


def _broken(tmp_path: Path, src: Path, how: str) -> Path:
    shutil.copy(src / "config.json", tmp_path / "config.json")
    data = (src / "model.safetensors").read_bytes()
    if how == "garbage safetensors":
        (tmp_path / "model.safetensors").write_bytes(b"not a checkpoint at all" * 10)
    elif how == "truncated safetensors":
        (tmp_path / "model.safetensors").write_bytes(data[:len(data) // 2])
    elif how == "garbage bin":
        (tmp_path / "pytorch_model.bin").write_bytes(b"not a pickle either")
    elif how == "a tensor missing":
        sd = load_file(str(src / "model.safetensors"))
        del sd["transformer.h.1.mlp.c_fc.bias"]
        save_file(sd, str(tmp_path / "model.safetensors"))
    return tmp_path


@pytest.mark.parametrize("how,needle", [("no weights", "model.safetensors or pytorch_model.bin"),
                                        ("garbage safetensors", "model.safetensors"),
                                        ("truncated safetensors", "model.safetensors"),
                                        ("garbage bin", "pytorch_model.bin"),
                                        ("a tensor missing", "h.1.mlp.c_fc.bias")])
def test_broken_checkpoint_is_one_line(tiny_gpt2, tmp_path, how, needle):
    path = _broken(tmp_path, tiny_gpt2, how)
    with pytest.raises(UserError) as e:
        GPT.from_pretrained(str(path))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_broken_checkpoint_cli(tiny_gpt2, tmp_path):
    path = _broken(tmp_path, tiny_gpt2, "truncated safetensors")
    r = subprocess.run([sys.executable, "model.py", "--gpt_variant", str(path), "--max_new_tokens", "1"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error:") and str(path) in r.stderr


# ---------------------------------------------------------------- hub names: the cache first, no retry loop

def _hub_env(hf_home: Path) -> dict:
    """No HF_HUB_OFFLINE, an own cache, and an endpoint at a closed local port: a hub that refuses."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "HF_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_HOME")}
    return {**env, "HF_HOME": str(hf_home), "HF_ENDPOINT": f"http://127.0.0.1:{port}"}


def test_hub_unreachable_fails_at_once_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "model.py", "--gpt_variant", "gpt2-medium", "--max_new_tokens", "1"],
                       cwd=ROOT, env=_hub_env(tmp_path / "hf_home"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "Retrying" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr
    assert "HF_HUB_OFFLINE=1" in errors[0] and "'gpt2-medium'" in errors[0] and "local directory" in errors[0]


def test_hub_name_is_served_from_the_cache_without_network(hf_tiny, tmp_path):
    """A hub name whose files are in the Hugging Face cache loads with the hub unreachable and no
    HF_HUB_OFFLINE: the cache is tried first."""
    path, hf = hf_tiny
    repo = tmp_path / "hf_home" / "hub" / "models--gpt2"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(path, repo / "snapshots" / commit)
    code = "from model import GPT; m = GPT.from_pretrained('gpt2'); print(float(m.transformer.wte.weight[5, 3]))"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_hub_env(tmp_path / "hf_home"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert float(r.stdout) == hf.transformer.wte.weight[5, 3].item()


# ---------------------------------------------------------------- train_distil.py: the base, once

def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_rnn_mode_needs_no_teacher(tiny_gpt2, cola_dir, tmp_path):
    """A fresh clone: no teacher anywhere; the student's embedding comes from --gpt_variant, and metrics.json
    records the width and base actually used."""
    r = run("train_distil.py", "--mode", "rnn", "--teacher", str(tmp_path / "no_teacher"), "--gpt_variant",
            str(tiny_gpt2), "--data_dir", str(cola_dir), "--max_train_samples", "100", "--max_eval_samples", "40",
            "--epochs", "1", "--hidden_size", "16", "--freeze_embeddings", "--out_dir", str(tmp_path / "rnn"),
            "--device", "cpu")
    assert r.returncode == 0, r.stderr
    config = json.loads((tmp_path / "rnn" / "metrics.json").read_text())["config"]
    student = json.loads((tmp_path / "rnn" / "student_config.json").read_text())
    assert config["embd_dim"] == student["embd_dim"] == 32  # tiny_gpt2's width, not the flag's 768
    assert config["gpt_variant"] == str(tiny_gpt2.resolve()) and config["init_embeddings"] == "gpt2"
    wte = load_file(str(tmp_path / "rnn" / "student.safetensors"))["wte.weight"]
    assert torch.equal(wte, load_file(str(tiny_gpt2 / "model.safetensors"))["transformer.wte.weight"])
    assert not (tmp_path / "no_teacher").exists()


def test_embd_dim_with_pretrained_embeddings_is_refused(tiny_gpt2, cola_dir, tmp_path):
    import train_distil
    args = train_distil.build_parser().parse_args(["--mode", "rnn", "--gpt_variant", str(tiny_gpt2), "--embd_dim",
                                                   "64", "--data_dir", str(cola_dir), "--out_dir", str(tmp_path)])
    with pytest.raises(UserError, match="--embd_dim 64"):
        train_distil.train(args)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, tiny_gpt2) -> Path:
    """A train_lora.py output directory over tiny_gpt2, with a random head and random B (so LoRA matters)."""
    out = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    m = inject_lora(GPT.from_pretrained(str(tiny_gpt2)), 2, 4.0)
    with torch.no_grad():
        torch.nn.init.normal_(m.score.weight, std=1.0)
        for p in (p for n, p in m.named_parameters() if "lora_B" in n):
            p.normal_(0.0, 0.5)
    c = m.config
    save_adapter(m, out, {"gpt_variant": str(tiny_gpt2.resolve()), "lora_rank": 2, "lora_alpha": 4.0,
                          "lora_dropout": 0.0, "lora_targets": list(TARGETS), "rslora": False, "n_layer": c.n_layer,
                          "n_head": c.n_head, "n_embd": c.n_embd, "vocab_size": c.vocab_size,
                          "n_classes": c.n_classes})
    return out


def test_distil_loads_the_base_once(teacher, cola_dir, cola, tmp_path, monkeypatch):
    """--mode distil with a cold teacher-logit cache loads GPT-2 once (student embedding and teacher alike),
    the teacher built on it gives the logits a separately loaded teacher gives, and building it does not
    shift the run's RNG: a cache hit then trains the very same student."""
    import train_distil
    from distill import teacher_logits
    loads = []
    real = GPT.from_pretrained.__func__

    def counting(cls, *args, **kwargs):
        loads.append(args[0])
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(GPT, "from_pretrained", classmethod(counting))
    common = ["--mode", "distil", "--teacher", str(teacher), "--data_dir", str(cola_dir), "--max_train_samples",
              "120", "--max_eval_samples", "40", "--epochs", "1", "--hidden_size", "16", "--cache_dir",
              str(tmp_path / "cache"), "--device", "cpu"]
    miss = train_distil.train(train_distil.build_parser().parse_args([*common, "--out_dir", str(tmp_path / "a")]))
    assert len(loads) == 1
    assert len(list((tmp_path / "cache").glob("teacher_*.safetensors"))) == 2  # train and dev: computed here

    hit = train_distil.train(train_distil.build_parser().parse_args([*common, "--out_dir", str(tmp_path / "b")]))
    assert len(loads) == 2  # the student's embedding only: the teacher came from the cache
    assert miss["epochs"][0]["train_loss"] == hit["epochs"][0]["train_loss"]
    assert miss["best"] == hit["best"] and miss["teacher_agreement_dev"] == hit["teacher_agreement_dev"]

    dev = load_cola(cola_dir, 120, 40)["dev"]  # the run's dev rows: the cache holds their logits
    cached = teacher_logits(teacher, {"dev": dev}, tmp_path / "cache", 256, CPU, FP32)["dev"]
    fresh = teacher_logits(teacher, {"dev": dev}, tmp_path / "cache2", 256, CPU, FP32)["dev"]  # own load; the run's batches
    assert len(loads) == 3
    assert torch.allclose(cached, fresh, atol=1e-5) and cached.std() > 0
