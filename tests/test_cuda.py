"""The CUDA path: equivalence with transformers on the GPU, bf16 autocast, merge/unmerge, padding invariance.
Skipped where there is no GPU (CI); bench/gpu_check.sh runs them on one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import make_gpt2_checkpoint
from data import collate
from lora import inject_lora, lora_modules, merge_lora, unmerge_lora
from model import GPT, DistilRNN
from trainer import autocast

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def gpt2_shape(tmp_path_factory):
    return make_gpt2_checkpoint(tmp_path_factory.mktemp("gpt2_cuda"), n_layer=12, n_head=12, n_embd=768,
                                n_positions=1024)


def test_logits_match_transformers_on_gpu(gpt2_shape, cola):
    from transformers import GPT2LMHeadModel
    batch = collate(cola["dev"], list(range(16)))
    ours = GPT.from_pretrained(str(gpt2_shape)).to(CUDA).eval()
    hf = GPT2LMHeadModel.from_pretrained(gpt2_shape, attn_implementation="eager").to(CUDA).eval()
    ids = batch.ids.to(CUDA)
    with torch.no_grad():
        diff = (ours(ids)[0] - hf(ids).logits).abs().max().item()
    assert diff < 1e-4, diff


def test_bf16_autocast_classify_is_close_to_fp32_and_trains(gpt2_shape, cola):
    torch.manual_seed(0)
    model = GPT.from_pretrained(str(gpt2_shape))
    inject_lora(model, 8, 16.0, 0.1)
    model.to(CUDA)
    batch = collate(cola["dev"], list(range(32))).to(CUDA)
    model.eval()
    with torch.no_grad():
        fp32 = model.classify(batch.ids, batch.lengths)
        with autocast(CUDA):
            bf16 = model.classify(batch.ids, batch.lengths)
    assert bf16.dtype == torch.bfloat16
    assert (bf16.float() - fp32).abs().max().item() < 0.05 * fp32.abs().max().item() + 1e-2
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(20):
        with autocast(CUDA):
            loss = F.cross_entropy(model.classify(batch.ids, batch.lengths).float(), batch.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]  # it fits a fixed batch


def test_merge_unmerge_on_gpu(gpt2_shape, cola):
    torch.manual_seed(0)
    model = GPT.from_pretrained(str(gpt2_shape))
    inject_lora(model, 8, 16.0)
    for m in lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B, std=0.02)
    model.to(CUDA).eval()
    batch = collate(cola["dev"], list(range(16))).to(CUDA)
    with torch.no_grad():
        before = model.classify(batch.ids, batch.lengths)
        merge_lora(model)
        merged = model.classify(batch.ids, batch.lengths)
        unmerge_lora(model)
        after = model.classify(batch.ids, batch.lengths)
    torch.testing.assert_close(merged, before, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_rnn_padding_invariance_on_gpu(cola):
    torch.manual_seed(0)
    m = DistilRNN(embd_dim=64, hidden_size=64).to(CUDA).eval()
    dev = cola["dev"]
    long_ = max(range(len(dev)), key=lambda i: len(dev.ids[i]))
    alone, padded = collate(dev, [0]).to(CUDA), collate(dev, [long_, 0]).to(CUDA)
    with torch.no_grad():
        a = m.classify(alone.ids, alone.lengths)[0]
        b = m.classify(padded.ids, padded.lengths)[1]
    torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
