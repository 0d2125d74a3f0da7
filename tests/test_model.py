"""model.GPT against transformers' GPT-2: same logits, loss, greedy generation and classification pooling,
on real tokenized CoLA sentences; and from_pretrained's refusals.

Bugs these tests exist to catch: a weight, bias or LayerNorm not loaded or loaded transposed; a wrong GELU,
attention scale or causal mask; classification pooling a padding position instead of the last real token,
or depending on what a sentence is batched with; greedy generation that differs from transformers'; a
checkpoint that is not GPT-2, or an unreachable hub, ending in a traceback instead of one line.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from data import PAD_TOKEN, collate, get_encoder
from errors import UserError
from model import GPT


def make_varied_gpt2(path: Path, n_layer: int, n_head: int, n_embd: int, n_positions: int, seed: int,
                     weight_std: float):
    """A random transformers GPT-2 whose every parameter matters: transformers initialises biases to 0 and
    LayerNorms to (1, 0), which would hide a bias or LayerNorm that is not loaded, so those are randomised
    too, and weights are wide enough that activations reach the range where GELU variants differ."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_positions)
    hf = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if ".ln_" in name and name.endswith(".weight"):
                p.normal_(1.0, 0.2)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.1)
            else:
                p.normal_(0.0, weight_std)
    hf.save_pretrained(path)
    return hf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("varied_tiny")
    hf = make_varied_gpt2(path, n_layer=2, n_head=4, n_embd=64, n_positions=128, seed=1, weight_std=0.15)
    return path, hf


@pytest.fixture(scope="module")
def dev_batch(cola):
    """Eight real dev sentences of different lengths, right-padded with <|endoftext|>."""
    ds = cola["dev"]
    by_len = sorted(range(len(ds)), key=lambda i: len(ds.ids[i]))
    rows = [by_len[k] for k in (0, 60, 150, 250, 350, 450, 500, len(ds) - 1)]
    return collate(ds, rows)


def pad_labels(batch, ignore: int) -> torch.Tensor:
    labels = batch.ids.clone()
    labels[torch.arange(labels.size(1))[None, :] >= batch.lengths[:, None]] = ignore
    return labels


def compare_lm(hf, ours: GPT, batch) -> None:
    ids = batch.ids
    mask = (torch.arange(ids.size(1))[None, :] < batch.lengths[:, None]).long()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, labels=pad_labels(batch, -100))
        logits, _ = ours(ids)
        # our loss takes next-token targets; HF shifts its labels by one internally
        _, loss = ours(ids[:, :-1], targets=pad_labels(batch, -1)[:, 1:])
    assert logits.dtype == torch.float32 and logits.shape == ref.logits.shape
    # real positions only: what HF computes at padded positions under its attention mask is its own business
    real = mask.bool()
    assert (logits[real] - ref.logits[real]).abs().max().item() < 1e-4
    assert logits[real].std().item() > 0.1  # logits that are not all ~0, so the comparison has teeth
    assert abs(loss.item() - ref.loss.item()) < 1e-5


def test_logits_and_loss_match_transformers_tiny(tiny, dev_batch):
    path, hf = tiny
    ours = GPT.from_pretrained(str(path)).eval()
    assert ours.config.n_layer == 2 and ours.config.n_head == 4 and ours.config.n_embd == 64
    assert ours.config.block_size == 128
    compare_lm(hf, ours, dev_batch)


def test_logits_and_loss_match_transformers_gpt2_shape(tmp_path, cola):
    """The real gpt2 shape (12 layers, 12 heads, 768, 1024 positions), random weights, one short batch."""
    hf = make_varied_gpt2(tmp_path, n_layer=12, n_head=12, n_embd=768, n_positions=1024, seed=2, weight_std=0.03)
    ours = GPT.from_pretrained(str(tmp_path)).eval()
    c = ours.config
    assert (c.n_layer, c.n_head, c.n_embd, c.block_size, c.vocab_size) == (12, 12, 768, 1024, 50257)
    compare_lm(hf, ours, collate(cola["dev"], [0, 1, 2]))


def test_greedy_generation_matches_transformers(tiny, cola):
    path, hf = tiny
    ours = GPT.from_pretrained(str(path)).eval()
    ds = cola["dev"]
    n_new = 12
    for row in (3, 10):
        prompt = torch.tensor([ds.ids[row]])
        ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=n_new,
                          pad_token_id=PAD_TOKEN)
        out = ours.generate(prompt, n_new, temperature=0)
        assert out.shape == (1, prompt.size(1) + n_new)
        assert out[0].tolist() == ref[0].tolist()
    assert len(set(out[0, prompt.size(1):].tolist())) > 1  # not a degenerate one-token loop


def test_classify_pools_last_real_token(tiny, dev_batch):
    from transformers import GPT2ForSequenceClassification
    path, _ = tiny
    ours = GPT.from_pretrained(str(path)).eval()
    hf = GPT2ForSequenceClassification.from_pretrained(path, num_labels=2, pad_token_id=PAD_TOKEN).eval()
    with torch.no_grad():
        hf.score.weight.copy_(ours.score.weight)
        got = ours.classify(dev_batch.ids, dev_batch.lengths)
        mask = (dev_batch.ids != PAD_TOKEN).long()
        ref = hf(input_ids=dev_batch.ids, attention_mask=mask).logits
        # the same, spelled out: score(ln_f(h)) at position length - 1 of a full forward
        h = hf.transformer(input_ids=dev_batch.ids).last_hidden_state  # ln_f already applied
        by_hand = h[torch.arange(h.size(0)), dev_batch.lengths - 1] @ ours.score.weight.T
        last_pos = h[:, -1] @ ours.score.weight.T
    assert got.shape == (len(dev_batch.lengths), 2)
    assert (got - ref).abs().max().item() < 1e-5
    assert (got - by_hand).abs().max().item() < 1e-5
    # the batch has padded rows, whose last *position* gives other logits than their last real token
    padded = dev_batch.lengths < dev_batch.ids.size(1)
    assert padded.any() and not torch.allclose(got[padded], last_pos[padded], atol=1e-3)


def test_classify_does_not_depend_on_padding(tiny, cola):
    path, _ = tiny
    ours = GPT.from_pretrained(str(path)).eval()
    ds = cola["train"]
    lengths = [len(x) for x in ds.ids]
    short = min(range(len(ds)), key=lambda i: (lengths[i] != 6, i))
    long = max(range(len(ds)), key=lambda i: lengths[i])
    assert lengths[long] > 4 * lengths[short]
    with torch.no_grad():
        alone = ours.classify(*_ids_lengths(collate(ds, [short])))
        batched = ours.classify(*_ids_lengths(collate(ds, [long, short])))
    assert torch.allclose(alone[0], batched[1], atol=1e-5)


def _ids_lengths(batch):
    return batch.ids, batch.lengths


# ---------------------------------------------------------------- from_pretrained refusals

def test_from_pretrained_unknown_name():
    with pytest.raises(UserError, match="gpt3-not-a-model"):
        GPT.from_pretrained("gpt3-not-a-model")


def test_from_pretrained_dir_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="config.json"):
        GPT.from_pretrained(str(tmp_path))


def test_from_pretrained_non_gpt2_checkpoint(tmp_path):
    from transformers import BertConfig, BertModel
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         vocab_size=100)).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="bert"):
        GPT.from_pretrained(str(tmp_path))


def test_from_pretrained_unsupported_gpt2_option(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=32, vocab_size=64,
                               activation_function="relu")).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="activation_function"):
        GPT.from_pretrained(str(tmp_path))


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_HOME")}
    env.update(extra)
    return env


def test_hub_unreachable_without_cache_is_a_user_error(tmp_path):
    """Offline, with an empty Hugging Face cache, a hub name fails with one line pointing at a local directory."""
    hf_home = tmp_path / "hf_home"
    hf_home.mkdir()
    r = subprocess.run([sys.executable, "model.py", "--gpt_variant", "gpt2", "--max_new_tokens", "1"], cwd=ROOT,
                       env=_env(HF_HUB_OFFLINE="1", HF_HOME=str(hf_home)), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr
    assert "local directory" in errors[0] and "gpt2" in errors[0]
    assert "HF_HUB_OFFLINE is set" in errors[0] and "set HF_HUB_OFFLINE=1" not in errors[0]  # no advice to do what is done
    assert r.stdout == ""


def test_model_cli_generates_greedily(tiny):
    path, hf = tiny
    prompt = "The cat sat on the"
    enc = get_encoder()
    idx = torch.tensor([enc.encode_ordinary(prompt)])
    ref = hf.generate(idx, attention_mask=torch.ones_like(idx), do_sample=False, max_new_tokens=5,
                      pad_token_id=PAD_TOKEN)
    expected = enc.decode(ref[0].tolist())
    r = subprocess.run([sys.executable, "model.py", "--gpt_variant", str(path), "--prompt", prompt,
                        "--max_new_tokens", "5", "--temperature", "0", "--device", "cpu"], cwd=ROOT,
                       env=_env(HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(expected + "\n"), (r.stdout, expected)
    assert len(ref[0]) == len(idx[0]) + 5 and expected != prompt
