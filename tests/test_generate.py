"""GPT.generate: incremental decoding with a key/value cache, batched, each row stopping at its end token.

Greedy output must be token for token that of cache-free decoding (the whole sequence run again at every step,
as generate did before the cache) and that of transformers' GPT2LMHeadModel.generate, on the same tiny random
checkpoint (tiny_gpt2); sampling draws from transformers' top_k/top_p distribution and repeats from a seed.

Bugs these tests exist to catch (planted, each seen to fail; the list is in the final report of issue 22): the
cache's positions off by one (wpe, or where keys are written); the chunked prefill's mask off by one; a
finished row that does not stop, or whose cache rows are not the ones dropped; the nucleus keeping one token
too few or too many; the sample's index taken as a token.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from data import PAD_TOKEN
from errors import UserError
from lora import inject_lora, merge_lora
from model import GPT, candidates
from test_model import make_varied_gpt2

N_NEW = 12


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Ours and transformers' on one tiny checkpoint whose weights are wide enough (test_model.make_varied_gpt2)
    that what a row generates depends on its whole prefix, not only on its last token: a cache row given to
    the wrong sequence changes the output."""
    path = tmp_path_factory.mktemp("varied_gpt2")
    hf = make_varied_gpt2(path, n_layer=2, n_head=4, n_embd=64, n_positions=128, seed=1, weight_std=0.15)
    return GPT.from_pretrained(str(path)).eval(), hf


@pytest.fixture(scope="module")
def prompts(cola) -> torch.Tensor:
    """Four real CoLA prompts of 5 tokens, each starting with <|endoftext|> (as train_lora.py --objective lm
    reads sentences): (4, 5)."""
    rows = [ids[:4] for ids in cola["dev"].ids if len(ids) >= 4][:4]
    return torch.tensor([[PAD_TOKEN, *r] for r in rows])


def cache_free(model: GPT, idx: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy decoding as generate did it before the cache: the whole sequence again at every step."""
    with torch.no_grad():
        for _ in range(n):
            idx = torch.cat([idx, model(idx)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


def hf_greedy(hf, idx: torch.Tensor, n: int, eos: int | None = None) -> torch.Tensor:
    return hf.generate(idx, attention_mask=torch.ones_like(idx), do_sample=False, max_new_tokens=n,
                       min_new_tokens=0, eos_token_id=eos, pad_token_id=PAD_TOKEN if eos is None else eos)


def test_greedy_equals_cache_free_and_transformers(models, prompts):
    ours, hf = models
    out = ours.generate(prompts, N_NEW, temperature=0)
    assert out.shape == (4, 5 + N_NEW)
    assert torch.equal(out, cache_free(ours, prompts, N_NEW))
    assert torch.equal(out, hf_greedy(hf, prompts, N_NEW))
    assert len(set(out[:, 5:].flatten().tolist())) > 4  # not a degenerate one-token loop


def test_each_row_stops_at_its_end_token(models, prompts):
    """The end token: one that greedy decoding emits in some rows and not in others, so a row finishes (and
    leaves the batch) mid-way while the others go on; the others must not change, and transformers must agree."""
    ours, hf = models
    free = ours.generate(prompts, N_NEW, temperature=0)
    new = free[:, 5:].tolist()
    # a token that row 0 first emits at step 2 or later, and that some other row never emits
    eos = next(t for i, t in enumerate(new[0]) if i >= 2 and t not in new[0][:i] and any(t not in r for r in new[1:]))
    out = ours.generate(prompts, N_NEW, temperature=0, eos_token=eos)
    for row, (a, b) in enumerate(zip(out.tolist(), free.tolist())):
        gen = b[5:]
        stop = gen.index(eos) + 1 if eos in gen else N_NEW
        assert a[5:5 + stop] == gen[:stop], row  # the same tokens up to and including its first eos
        assert a[5 + stop:] == [eos] * (N_NEW - stop), row  # then eos only
    assert any(eos not in row for row in new)  # some rows went on
    assert torch.equal(out, hf_greedy(hf, prompts, N_NEW, eos=eos))


def test_cache_positions_match_the_full_forward(models, prompts):
    """Logits of every step, decoded one token at a time and in chunks (prefill of 3, then 2 at once, then one
    at a time), equal those of the full forward at the same positions."""
    ours, _ = models
    seq = ours.generate(prompts, 6, temperature=0)  # (4, 11)
    with torch.no_grad():
        full = ours(seq)[0]  # (4, 11, vocab)
        for chunks in ([1] * 11, [3, 2, 1, 1, 1, 1, 1, 1]):
            kv = ours.empty_cache(4, seq.size(1), seq.device, torch.float32)
            pos = 0
            for n in chunks:
                logits = ours.decode(seq[:, pos:pos + n], kv, pos)  # (4, vocab), after position pos + n - 1
                torch.testing.assert_close(logits, full[:, pos + n - 1], atol=1e-4, rtol=1e-4)
                pos += n


def test_sampling_repeats_from_a_seed_and_varies_with_it(models, prompts):
    ours, _ = models
    draw = lambda seed, **kw: ours.generate(prompts, N_NEW, temperature=1.0, top_k=100, top_p=0.9,
                                            generator=torch.Generator().manual_seed(seed), **kw)
    assert torch.equal(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))
    assert torch.equal(draw(3, eos_token=PAD_TOKEN)[:, :6], draw(3)[:, :6])  # the first draw is the same
    # a nucleus of one token is greedy decoding
    tiny_p = ours.generate(prompts, N_NEW, temperature=1.0, top_p=1e-6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(tiny_p, ours.generate(prompts, N_NEW, temperature=0))


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, None), (0.7, 50, None), (1.0, None, 0.9),
                                                     (1.3, 200, 0.5), (1.0, 3, 0.999)])
def test_candidates_are_transformers_distribution(temperature, top_k, top_p):
    """softmax over our candidates, put back on the vocabulary, is transformers' distribution after its
    TemperatureLogitsWarper, TopKLogitsWarper and TopPLogitsWarper (the order generate applies them in)."""
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1000, generator=g) * 3  # peaked enough that top_p cuts somewhere in the middle
    ref = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k is not None:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p is not None:
        ref = TopPLogitsWarper(top_p)(None, ref)
    cand, ids = candidates(logits.clone(), temperature, top_k, top_p)
    probs = F.softmax(cand, dim=-1)
    ours = probs if ids is None else torch.zeros_like(logits).scatter(1, ids, probs)
    torch.testing.assert_close(ours, F.softmax(ref, dim=-1), atol=1e-6, rtol=1e-5)
    if top_p is not None and top_p < 0.99:
        assert ((ours > 0).sum(1) > 1).all() and ((ours > 0).sum(1) < (top_k or 1000)).all()  # a real cut


def test_generate_with_lora_unmerged_equals_merged(tiny_gpt2, prompts):
    """The LoRA path runs with the cache: an unmerged adapter (B non-zero) decodes as its merged weights do."""
    torch.manual_seed(0)
    model = inject_lora(GPT.from_pretrained(str(tiny_gpt2)), r=2, alpha=4.0).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    unmerged = model.generate(prompts, N_NEW, temperature=0)
    assert not torch.equal(unmerged, GPT.from_pretrained(str(tiny_gpt2)).eval().generate(prompts, N_NEW, temperature=0))
    merge_lora(model)
    assert torch.equal(model.generate(prompts, N_NEW, temperature=0), unmerged)


def test_too_long_is_one_line(models):
    ours, _ = models
    with pytest.raises(UserError, match="block size 128"):
        ours.generate(torch.zeros(1, 100, dtype=torch.long), 29, temperature=0)
