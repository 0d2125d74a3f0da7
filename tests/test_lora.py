"""LoRA: the zero start, merge/unmerge, rank and scaling, which layers are wrapped and trained, that it can learn
a low-rank update, and the adapter file round trip.

Bugs these tests exist to catch: B not initialised to zero (injection changes the model); a wrong scaling
(alpha / r, alpha / sqrt(r) with rslora); dropout that is biased or active in eval; merge/unmerge that does
not restore W0 bit for bit, or a merged layer that still trains; trainable weights other than LoRA and the
head; a target matching the wrong layers (attn.c_proj vs mlp.c_proj); an adapter that does not round-trip
or is loaded onto a base of another rank, targets or width.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import make_gpt2_checkpoint
from data import collate
from errors import UserError
from lora import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoRALinear, TARGETS, build_lora_classifier, inject_lora,
                  lora_modules, merge_lora, save_adapter, unmerge_lora)
from model import GPT
from precision import Precision

N_LAYER, N_EMBD = 2, 64


@pytest.fixture(scope="module")
def base64(tmp_path_factory):
    """A random GPT-2 checkpoint, 2 layers of width 64 (the full 50257-token vocabulary)."""
    return make_gpt2_checkpoint(tmp_path_factory.mktemp("base64"), n_layer=N_LAYER, n_head=4, n_embd=N_EMBD,
                                n_positions=64, seed=3)


@pytest.fixture(scope="module")
def batch(cola):
    ds = cola["dev"]
    return collate(ds, list(range(0, 40, 5)))


def fresh(base, seed: int = 0) -> GPT:
    torch.manual_seed(seed)  # the score head is random: the same seed gives the same head
    return GPT.from_pretrained(str(base)).eval()


def randomize_b(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)


def outputs(model: GPT, batch) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model.classify(batch.ids, batch.lengths), model(batch.ids)[0]


# ---------------------------------------------------------------- LoRALinear

def test_b_starts_at_zero_so_injection_changes_nothing(base64, batch):
    model = fresh(base64)
    cls_before, lm_before = outputs(model, batch)
    inject_lora(model, r=4, alpha=8.0, dropout=0.0)
    mods = lora_modules(model)
    assert len(mods) == 4 * N_LAYER
    for m in mods.values():
        assert m.lora_B.abs().max().item() == 0.0
        assert m.lora_A.abs().min().item() > 0 and m.lora_A.std().item() > 0
    cls_after, lm_after = outputs(model, batch)
    assert torch.equal(cls_before, cls_after)
    assert torch.equal(lm_before, lm_after)


def test_scaling_plain_and_rslora():
    torch.manual_seed(0)
    x = torch.randn(5, 16)
    for rslora, expected in [(False, 12.0 / 4), (True, 12.0 / math.sqrt(4))]:
        layer = LoRALinear(16, 24, r=4, alpha=12.0, rslora=rslora)
        assert layer.scaling == pytest.approx(expected)
        with torch.no_grad():
            layer.lora_B.normal_()
            update = layer(x) - F.linear(x, layer.weight, layer.bias)
            assert torch.allclose(update, expected * (x @ layer.lora_A.T @ layer.lora_B.T), atol=1e-5)


@pytest.mark.parametrize("r", [0, -1, 17])
def test_rank_out_of_range_is_a_user_error(r):
    with pytest.raises(UserError):
        LoRALinear(16, 32, r=r, alpha=1.0)


def test_rank_limits():
    assert LoRALinear(16, 32, r=16, alpha=1.0).lora_A.shape == (16, 16)
    assert LoRALinear(16, 32, r=1, alpha=1.0).lora_B.shape == (32, 1)
    with pytest.raises(UserError):
        LoRALinear(32, 16, r=17, alpha=1.0)


def test_lora_dropout_is_unbiased_and_only_in_training():
    """Dropout on the LoRA branch's input: random in train mode, off in eval, and on average (inverted dropout)
    the same update as without it."""
    torch.manual_seed(0)
    layer = LoRALinear(16, 8, r=4, alpha=4.0, dropout=0.5)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(1, 16).expand(20000, 16).contiguous()  # one input, many dropout draws
    base = F.linear(x[:1], layer.weight, layer.bias)
    with torch.no_grad():
        layer.eval()
        clean = layer(x[:1]) - base
        assert torch.equal(layer(x[:2])[0], layer(x[:2])[1])
        layer.train()
        noisy = layer(x) - base
    assert clean.abs().max() > 0.5  # an update worth measuring
    assert noisy.std(0).min() > 0.1  # the draws differ: dropout is on in training
    assert torch.allclose(noisy.mean(0), clean[0], atol=0.05 * clean.abs().max().item())


def test_merge_unmerge_single_layer():
    torch.manual_seed(0)
    base = nn.Linear(16, 24)
    w0 = base.weight.detach().clone()
    layer = LoRALinear.from_linear(base, r=4, alpha=8.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    delta = (layer.lora_B @ layer.lora_A).detach() * 2.0  # alpha / r
    x = torch.randn(7, 16)
    with torch.no_grad():
        before = layer(x)
        layer.merge()
        assert layer.merged
        assert torch.allclose(layer.weight, w0 + delta, atol=1e-6)
        merged = layer(x)
        layer.merge()  # a second merge does nothing
        assert torch.allclose(layer.weight, w0 + delta, atol=1e-6)
        assert torch.allclose(layer(x), before, atol=1e-5)
        layer.unmerge()
        assert not layer.merged
        assert torch.allclose(layer.weight, w0, atol=1e-6)
        layer.unmerge()  # a second unmerge does nothing
        assert torch.allclose(layer.weight, w0, atol=1e-6)
        after = layer(x)
    assert (before - F.linear(x, w0, base.bias)).abs().max() > 1e-2  # the update is not negligible
    assert torch.allclose(before, merged, atol=1e-5)
    assert torch.allclose(before, after, atol=1e-5)


def test_merge_unmerge_whole_model_and_merged_flag_is_not_train_eval(base64, batch):
    model = fresh(base64)
    inject_lora(model, r=4, alpha=8.0, dropout=0.0)
    randomize_b(model)
    plain = fresh(base64)
    cls0, lm0 = outputs(model, batch)
    assert (cls0 - outputs(plain, batch)[0]).abs().max() > 1e-3  # the random B changes the model

    model.eval()
    assert not any(m.merged for m in lora_modules(model).values())  # eval() does not merge
    merge_lora(model)
    merged_w = {k: m.weight.detach().clone() for k, m in lora_modules(model).items()}
    assert all(m.merged for m in lora_modules(model).values())
    cls1, lm1 = outputs(model, batch)
    merge_lora(model)  # twice: harmless
    model.train()
    model.eval()  # switching modes neither unmerges nor merges again
    assert all(m.merged for m in lora_modules(model).values())
    for k, m in lora_modules(model).items():
        assert torch.equal(m.weight, merged_w[k])
    cls2, lm2 = outputs(model, batch)
    unmerge_lora(model)
    assert not any(m.merged for m in lora_modules(model).values())
    cls3, lm3 = outputs(model, batch)
    for c, lm in [(cls1, lm1), (cls2, lm2), (cls3, lm3)]:
        assert torch.allclose(c, cls0, atol=1e-5)
        assert torch.allclose(lm, lm0, atol=1e-5)
    for name, p in plain.named_parameters():  # unmerged weights are back to the pretrained ones
        if name.endswith(".weight") and name.startswith("transformer.h"):
            assert torch.allclose(model.get_parameter(name), p, atol=1e-6), name


def test_unmerge_restores_w0_bit_for_bit_over_many_cycles():
    """(W0 + dW) - dW drifts in float32 wherever adding dW rounds W0's lowest bit away; unmerge must not."""
    torch.manual_seed(0)
    base = nn.Linear(256, 384)
    with torch.no_grad():
        base.weight.normal_(0, 0.14)  # the spread of GPT-2's projection weights
    layer = LoRALinear.from_linear(base, r=8, alpha=16.0)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.05)
    w0 = layer.weight.detach().clone()
    delta = layer.delta_weight().detach()
    drifted = (w0 + delta) - delta
    assert (drifted != w0).sum() > 100  # the naive unmerge does drift here, so this test can fail
    for _ in range(20):
        layer.merge()
        assert torch.equal(layer.weight, w0 + delta)  # merged is exactly W0 + dW as float32 computes it
        layer.unmerge()
        assert torch.equal(layer.weight, w0)
    assert not hasattr(layer, "_lost")  # nothing is kept once unmerged


def test_unmerge_lora_restores_the_pretrained_model_exactly(base64):
    model = inject_lora(fresh(base64), r=4, alpha=8.0)
    randomize_b(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(3):
        merge_lora(model)
        unmerge_lora(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_merged_layer_refuses_to_train_and_unmerged_trains():
    torch.manual_seed(0)
    layer = LoRALinear(16, 24, r=4, alpha=8.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 16)
    layer.merge()
    layer.train()
    with pytest.raises(RuntimeError, match="unmerge"):
        layer(x)
    with torch.no_grad():
        layer(x)  # inference is fine, in either mode
    layer.eval()
    layer(x)
    layer.train()
    layer.unmerge()
    layer(x).square().sum().backward()
    assert layer.lora_A.grad.abs().sum() > 0 and layer.lora_B.grad.abs().sum() > 0


def test_fit_on_a_merged_model_stops_at_its_first_step(base64, cola, tmp_path):
    """A merged model handed to the training loop fails loudly, before any epoch is recorded or saved."""
    from argparse import Namespace

    from data import Dataset
    from cli import CHECKPOINT
    from trainer import fit

    model = inject_lora(fresh(base64), r=2, alpha=4.0)
    merge_lora(model)
    ds = Dataset("dev", cola["dev"].sentences[:32], cola["dev"].ids[:32], cola["dev"].labels[:32])
    args = Namespace(out_dir=str(tmp_path), plots_dir=str(tmp_path), epochs=1, lr=1e-3, batch_size=32,
                     weight_decay=0.0, warmup_ratio=0.0, grad_clip=1.0, seed=0, resume=False, compile=False)
    with pytest.raises(RuntimeError, match="merged"):
        fit(model, ds, ds, lambda logits, b: F.cross_entropy(logits, b.labels), args, {}, "lora", lambda: None,
            Precision("fp32", "cpu"))
    assert not (tmp_path / CHECKPOINT).exists()


# ---------------------------------------------------------------- inject_lora

def test_only_lora_and_head_are_trainable(base64):
    model = inject_lora(fresh(base64), r=2, alpha=4.0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "score.weight" in trainable
    assert all(("lora_A" in n or "lora_B" in n or n.startswith("score.")) for n in trainable), trainable
    assert len(trainable) == 2 * 4 * N_LAYER + 1
    assert not model.transformer.wte.weight.requires_grad
    assert not model.transformer.h[0].attn.c_attn.weight.requires_grad
    assert not model.transformer.h[0].attn.c_attn.bias.requires_grad
    assert not model.transformer.h[0].ln_1.weight.requires_grad


@pytest.mark.parametrize("targets, wrapped", [
    (("c_attn",), {"attn.c_attn"}),
    (("attn.c_proj",), {"attn.c_proj"}),
    (("mlp.c_proj",), {"mlp.c_proj"}),
    (("c_fc",), {"mlp.c_fc"}),
    (("c_attn", "mlp.c_proj"), {"attn.c_attn", "mlp.c_proj"}),
    (TARGETS, {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}),
])
def test_targets_select_layers(base64, targets, wrapped):
    model = inject_lora(fresh(base64), r=2, alpha=4.0, targets=targets)
    expected = {f"transformer.h.{i}.{w}" for i in range(N_LAYER) for w in wrapped}
    assert set(lora_modules(model)) == expected
    assert type(model.score) is nn.Linear and type(model.lm_head) is nn.Linear


@pytest.mark.parametrize("targets", [("q_proj",), ("c_proj",), ("c_attn", "lm_head"), ()])
def test_unknown_target_is_a_user_error(base64, targets):
    with pytest.raises(UserError):
        inject_lora(fresh(base64), r=2, alpha=4.0, targets=targets)


def test_rank_larger_than_layer_is_a_user_error_through_inject(base64):
    with pytest.raises(UserError):
        inject_lora(fresh(base64), r=N_EMBD + 1, alpha=4.0)
    inject_lora(fresh(base64), r=N_EMBD, alpha=4.0)  # min(in, out) of the narrowest layer: allowed


# ---------------------------------------------------------------- learning

def test_lora_learns_a_planted_low_rank_update():
    torch.manual_seed(0)
    base = nn.Linear(64, 64)
    w0 = base.weight.detach().clone()
    planted = (torch.randn(64, 4) / 8) @ (torch.randn(4, 64) / 8)  # rank 4

    def target(x):
        return F.linear(x, w0 + planted, base.bias)

    layer = LoRALinear.from_linear(base, r=4, alpha=4.0)
    opt = torch.optim.Adam([layer.lora_A, layer.lora_B], lr=1e-2)
    x_eval = torch.randn(1024, 64)
    with torch.no_grad():
        initial = F.mse_loss(layer(x_eval), target(x_eval)).item()
    for _ in range(200):
        x = torch.randn(64, 64)
        loss = F.mse_loss(layer(x), target(x))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = F.mse_loss(layer(x_eval), target(x_eval)).item()
    assert initial > 1e-2
    assert final < 1e-3 * initial, (initial, final)
    assert torch.equal(layer.weight, w0)  # W0 stayed frozen: the update lives in B A
    assert torch.allclose(layer.delta_weight().detach(), planted, atol=1e-2)


# ---------------------------------------------------------------- adapter files

def adapter_config(base, r: int, targets=TARGETS, n_embd: int = N_EMBD) -> dict:
    return {"gpt_variant": str(base), "lora_rank": r, "lora_alpha": 8.0, "lora_dropout": 0.1,
            "lora_targets": list(targets), "rslora": False, "n_layer": N_LAYER, "n_head": 4, "n_embd": n_embd,
            "vocab_size": 50257, "n_classes": 2}


@pytest.fixture(scope="module")
def trained_adapter(base64, cola, tmp_path_factory):
    """A few train_lora-style steps on real CoLA rows, then save_adapter. Returns (dir, eval logits)."""
    out = tmp_path_factory.mktemp("adapter")
    cfg = adapter_config(base64, r=4)
    model = fresh(base64, seed=11)
    inject_lora(model, cfg["lora_rank"], cfg["lora_alpha"], cfg["lora_dropout"], tuple(cfg["lora_targets"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ds = cola["train"]
    model.train()
    for step in range(3):
        b = collate(ds, list(range(step * 16, step * 16 + 16)))
        loss = F.cross_entropy(model.classify(b.ids, b.lengths), b.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(m.lora_B.abs().max() > 0 for m in lora_modules(model).values())
    save_adapter(model, out, cfg)
    model.eval()
    b = collate(cola["dev"], list(range(24)))
    with torch.no_grad():
        logits = model.classify(b.ids, b.lengths)
    return out, b, logits


def test_adapter_round_trip_gives_identical_logits(trained_adapter, base64):
    out, b, logits = trained_adapter
    rebuilt, cfg = build_lora_classifier(out)
    rebuilt.eval()
    assert cfg["lora_rank"] == 4
    with torch.no_grad():
        got = rebuilt.classify(b.ids, b.lengths)
        untrained = fresh(base64, seed=99).classify(b.ids, b.lengths)
    assert torch.equal(got, logits)
    assert not torch.allclose(untrained, logits, atol=1e-3)  # the adapter, not the base, makes the logits


def test_adapter_file_holds_only_the_small_trainable_part(trained_adapter, base64):
    from safetensors.torch import load_file
    out, _, _ = trained_adapter
    weights = load_file(str(out / ADAPTER_WEIGHTS))
    assert set(weights) == {f"transformer.h.{i}.{w}.lora_{ab}" for i in range(N_LAYER)
                            for w in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
                            for ab in "AB"} | {"score.weight"}
    adapter_numel = sum(t.numel() for t in weights.values())
    base_numel = sum(t.numel() for t in load_file(str(base64 / "model.safetensors")).values())
    assert adapter_numel < 0.01 * base_numel, (adapter_numel, base_numel)
    # the file is those tensors (float32) and a small header, nothing of the base
    size = (out / ADAPTER_WEIGHTS).stat().st_size
    assert 4 * adapter_numel <= size < 4 * adapter_numel + 16384
    assert json.loads((out / ADAPTER_CONFIG).read_text())["gpt_variant"] == str(base64)


def _write_config(src, dst, **changes):
    import shutil
    dst.mkdir()
    shutil.copy(src / ADAPTER_WEIGHTS, dst / ADAPTER_WEIGHTS)
    cfg = json.loads((src / ADAPTER_CONFIG).read_text())
    cfg.update(changes)
    (dst / ADAPTER_CONFIG).write_text(json.dumps(cfg))
    return dst


def test_adapter_with_other_rank_is_refused(trained_adapter, tmp_path):
    out, _, _ = trained_adapter
    with pytest.raises(UserError, match="lora_A"):
        build_lora_classifier(_write_config(out, tmp_path / "a", lora_rank=8))


def test_adapter_with_other_targets_is_refused(trained_adapter, tmp_path):
    out, _, _ = trained_adapter
    with pytest.raises(UserError):
        build_lora_classifier(_write_config(out, tmp_path / "a", lora_targets=["c_attn"]))


def test_adapter_on_a_base_of_other_width_is_refused(trained_adapter, tiny_gpt2, tmp_path):
    out, _, _ = trained_adapter
    # config claims the original width, but the named base is 32 wide
    with pytest.raises(UserError, match="n_embd"):
        build_lora_classifier(_write_config(out, tmp_path / "a", gpt_variant=str(tiny_gpt2)))
    # config and base agree with each other (32), but the weights were trained at 64
    with pytest.raises(UserError, match="shape"):
        build_lora_classifier(_write_config(out, tmp_path / "b", gpt_variant=str(tiny_gpt2), n_embd=32, n_head=2))


def test_missing_adapter_is_a_user_error(tmp_path):
    with pytest.raises(UserError):
        build_lora_classifier(tmp_path)
