"""Distillation: the KD loss against hand-computed references, DistilRNN's padding invariance, the teacher
cache, the transfer of a teacher's function, and train_distil.py end to end."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT
from data import collate, stratified_sample
from distill import UNLABELLED, augment, kd_loss, perturb, teacher_logits
from lora import inject_lora, save_adapter
from model import GPT, DistilRNN
from metrics import predict_logits
from precision import Precision

CPU = torch.device("cpu")
FP32 = Precision("fp32", "cpu")


# ---------------------------------------------------------------- the loss

def reference_kd(s: list[list[float]], t: list[list[float]], y: list[int], T: float, alpha: float) -> float:
    """The Hinton loss written out with plain floats: alpha T^2 mean_i KL(p_t || p_s) + (1-alpha) mean_i CE."""
    def softmax(z):
        m = max(z)
        e = [math.exp(v - m) for v in z]
        return [v / sum(e) for v in e]
    kl = ce = 0.0
    for si, ti, yi in zip(s, t, y):
        ps, pt = softmax([v / T for v in si]), softmax([v / T for v in ti])
        kl += sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt, ps))
        ce += -math.log(softmax(si)[yi])
    n = len(y)
    return alpha * T * T * kl / n + (1 - alpha) * ce / n


S = [[2.0, -1.0], [0.5, 0.3], [-1.5, 2.5], [0.0, 0.0]]
TCH = [[1.0, 0.0], [-0.5, 1.5], [-2.0, 1.0], [3.0, -1.0]]
Y = [0, 1, 1, 0]


@pytest.mark.parametrize("T,alpha", [(1.0, 0.5), (2.0, 0.7), (4.0, 1.0), (0.5, 0.0), (3.0, 0.3)])
def test_kd_loss_matches_hand_computed_reference(T, alpha):
    got = kd_loss(torch.tensor(S), torch.tensor(TCH), torch.tensor(Y), T, alpha).item()
    assert got == pytest.approx(reference_kd(S, TCH, Y, T, alpha), rel=1e-5)


def test_alpha_zero_is_plain_cross_entropy():
    s = torch.tensor(S)
    assert kd_loss(s, torch.tensor(TCH), torch.tensor(Y), 2.0, 0.0).item() == \
        pytest.approx(F.cross_entropy(s, torch.tensor(Y)).item(), rel=1e-6)


def test_alpha_one_student_equal_to_teacher_has_zero_loss_and_gradient():
    s = torch.tensor(TCH, requires_grad=True)
    loss = kd_loss(s, torch.tensor(TCH), torch.tensor(Y), 3.0, 1.0)
    loss.backward()
    assert abs(loss.item()) < 1e-7
    assert s.grad.abs().max().item() < 1e-7


def test_gradient_scale_is_comparable_across_temperatures():
    """T^2 compensates the 1/T^2 shrinkage of soft-target gradients; dividing by T^2 would lose a factor T^4."""
    torch.manual_seed(0)
    t = torch.randn(64, 2) * 0.5
    s0 = t + torch.randn(64, 2) * 0.5
    norms = {}
    for T in (1.0, 2.0, 4.0, 8.0):
        s = s0.clone().requires_grad_(True)
        kd_loss(s, t, torch.zeros(64, dtype=torch.long), T, 1.0).backward()
        norms[T] = s.grad.norm().item()
    for T in (2.0, 4.0, 8.0):
        assert 0.5 < norms[T] / norms[1.0] < 2.0, norms


def test_unlabelled_rows_get_only_the_soft_loss():
    s, t = torch.tensor(S), torch.tensor(TCH)
    y = torch.tensor([0, UNLABELLED, 1, UNLABELLED])
    got = kd_loss(s, t, y, 2.0, 0.5).item()
    soft = reference_kd(S, TCH, [0, 0, 0, 0], 2.0, 1.0)
    hard = reference_kd([S[0], S[2]], [TCH[0], TCH[2]], [0, 1], 2.0, 0.0)
    assert got == pytest.approx(0.5 * soft + 0.5 * hard, rel=1e-5)
    all_unlabelled = kd_loss(s, t, torch.full((4,), UNLABELLED), 2.0, 0.5)
    assert torch.isfinite(all_unlabelled) and all_unlabelled.item() == pytest.approx(0.5 * soft, rel=1e-5)


# ---------------------------------------------------------------- the student

@pytest.mark.parametrize("cell,bidirectional,num_layers", [("gru", True, 1), ("lstm", True, 2), ("rnn", False, 1),
                                                           ("lstm", False, 1)])
def test_rnn_output_does_not_depend_on_padding(cola, cell, bidirectional, num_layers):
    torch.manual_seed(0)
    m = DistilRNN(embd_dim=16, hidden_size=24, num_layers=num_layers, cell=cell, bidirectional=bidirectional).eval()
    dev = cola["dev"]
    short = min(range(len(dev)), key=lambda i: len(dev.ids[i]))
    long_ = max(range(len(dev)), key=lambda i: len(dev.ids[i]))
    alone = collate(dev, [short])
    padded = collate(dev, [long_, short, 3])
    assert padded.ids.size(1) > alone.ids.size(1) + 5  # the sentence really is padded in the second batch
    with torch.no_grad():
        a = m.classify(alone.ids, alone.lengths)[0]
        b = m.classify(padded.ids, padded.lengths)[1]
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_rnn_reads_the_last_real_token_not_padding(cola):
    """The forward direction's final state must be the one after the sentence's last token: changing that
    token changes the output, changing padding does not."""
    torch.manual_seed(0)
    m = DistilRNN(embd_dim=16, hidden_size=24, bidirectional=False).eval()
    b = collate(cola["dev"], [0, max(range(100), key=lambda i: len(cola["dev"].ids[i]))])
    L = int(b.lengths[0])
    with torch.no_grad():
        base = m.classify(b.ids, b.lengths)[0]
        ids = b.ids.clone(); ids[0, L:] = 123  # different padding content
        assert torch.equal(m.classify(ids, b.lengths)[0], base)
        ids = b.ids.clone(); ids[0, L - 1] = 123  # a different last real token
        assert not torch.allclose(m.classify(ids, b.lengths)[0], base)


# ---------------------------------------------------------------- augmentation

def test_perturb_is_deterministic_never_empty_and_augment_labels_copies_unlabelled(cola):
    import random
    words = "the cat sat on the mat".split()
    a = [perturb(words, random.Random(1)) for _ in range(1)]
    b = [perturb(words, random.Random(1)) for _ in range(1)]
    assert a == b
    rng = random.Random(0)
    assert all(perturb(["one"], rng) for _ in range(50))
    train = cola["train"]
    small = type(train)("t", train.sentences[:50], train.ids[:50], train.labels[:50])
    aug = augment(small, 2, seed=0)
    assert len(aug) == 150 and aug.labels[:50] == small.labels and set(aug.labels[50:]) == {UNLABELLED}
    assert sum(s != small.sentences[i // 2] for i, s in enumerate(aug.sentences[50:])) >= 95
    assert augment(small, 2, seed=0).sentences == aug.sentences


# ---------------------------------------------------------------- teachers made here

def make_random_teacher(out_dir: Path, ckpt: Path, cola, seed: int) -> float:
    """The GPT-2 in ckpt with a random head, saved as a train_lora.py output directory. Returns its dev pos rate."""
    torch.manual_seed(seed)
    m = GPT.from_pretrained(str(ckpt))
    inject_lora(m, 2, 4.0)
    torch.nn.init.normal_(m.score.weight, std=1.0)
    c = m.config
    save_adapter(m, out_dir, {"gpt_variant": str(ckpt), "lora_rank": 2, "lora_alpha": 4.0, "lora_dropout": 0.0,
                              "lora_targets": ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"], "rslora": False,
                              "n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd,
                              "vocab_size": c.vocab_size, "n_classes": c.n_classes})
    return float(predict_logits(m, cola["dev"], 128, CPU, FP32).argmax(-1).float().mean())


def make_bag_of_words_gpt2(path: Path, n_embd: int = 32) -> Path:
    """A random transformers GPT-2 whose last hidden state is a normalised mean of its tokens' embeddings:
    uniform causal attention (zero q, k), value and output projections that carry the mean through, no
    positions, no MLP. A random head on it is a random bag-of-words function: learnable by a small RNN from
    a few thousand sentences, and unrelated to grammaticality. (A fully random GPT-2 of this size mostly
    encodes sentence length through wpe, which a small RNN learns too slowly for a test.)"""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=n_embd, n_positions=128))
    with torch.no_grad():
        hf.transformer.wpe.weight.zero_()
        for block in hf.transformer.h:
            block.attn.c_attn.weight[:, :2 * n_embd] = 0  # Conv1D weight (in, 3C): q and k columns
            block.attn.c_attn.weight[:, 2 * n_embd:] = 10 * torch.eye(n_embd)
            block.attn.c_attn.bias.zero_()
            block.attn.c_proj.weight.copy_(torch.eye(n_embd))
            block.attn.c_proj.bias.zero_()
            block.mlp.c_proj.weight.zero_()
            block.mlp.c_proj.bias.zero_()
    hf.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def random_teacher(tmp_path_factory, cola) -> Path:
    """A teacher whose dev predictions are neither one class nor the gold labels."""
    ckpt = make_bag_of_words_gpt2(tmp_path_factory.mktemp("teacher_base"))
    gold = torch.tensor(cola["dev"].labels).float()
    for seed in range(20):
        out = tmp_path_factory.mktemp(f"teacher{seed}")
        pos = make_random_teacher(out, ckpt, cola, seed)
        logits = teacher_logits(out, {"dev": cola["dev"]}, out / "cache", 128, CPU, FP32)["dev"]
        agree_gold = float((logits.argmax(-1).float() == gold).float().mean())
        if 0.3 < pos < 0.7 and agree_gold < 0.6:
            return out
    pytest.fail("no random teacher with balanced, non-gold predictions in 20 seeds")


def distil_args(teacher: Path, tmp: Path, cola_dir: Path, *extra: str):
    from train_distil import build_parser
    return build_parser().parse_args([
        "--teacher", str(teacher), "--data_dir", str(cola_dir), "--out_dir", str(tmp / "{mode}"),
        "--plots_dir", str(tmp / "plots"), "--cache_dir", str(tmp / "cache"), "--init_embeddings", "none",
        "--embd_dim", "32", "--hidden_size", "64", "--device", "cpu", *extra])


def test_distillation_transfers_the_teachers_function(random_teacher, tmp_path, cola_dir, cola):
    """A student distilled with alpha=1 agrees with the teacher on dev sentences clearly more often than the
    same student trained on the gold labels."""
    import train_distil
    common = ("--max_train_samples", "1500", "--epochs", "3", "--lr", "3e-3", "--temperature", "2")
    distilled = train_distil.train(distil_args(random_teacher, tmp_path, cola_dir, "--mode", "distil",
                                               "--alpha", "1", *common))
    gold = train_distil.train(distil_args(random_teacher, tmp_path, cola_dir, "--mode", "rnn", *common))
    t = teacher_logits(random_teacher, {"dev": cola["dev"]}, tmp_path / "cache", 128, CPU, FP32)["dev"].argmax(-1)

    def agreement_of(run: str) -> float:
        from safetensors.torch import load_file
        cfg = json.loads((tmp_path / run / "student_config.json").read_text())
        m = DistilRNN(**cfg)
        m.load_state_dict(load_file(str(tmp_path / run / "student.safetensors")))
        return float((predict_logits(m, cola["dev"], 128, CPU, FP32).argmax(-1) == t).float().mean())

    a_distil, a_gold = agreement_of("distil"), agreement_of("rnn")
    assert distilled["teacher_agreement_dev"] == pytest.approx(a_distil)
    assert a_distil > a_gold + 0.10, (a_distil, a_gold)
    assert gold["best"]["val_acc"] >= 0  # the gold run completed and recorded its best epoch


def test_teacher_runs_once_per_sentence_and_is_cached(random_teacher, tmp_path, cola_dir, monkeypatch):
    """One teacher forward per training (and dev) sentence over a 3-epoch run; none on a second run; a changed
    teacher is recomputed, never served stale logits."""
    import train_distil
    rows = []
    original = GPT.classify

    def counting(self, idx, lengths):
        rows.append(idx.size(0))
        return original(self, idx, lengths)

    monkeypatch.setattr(GPT, "classify", counting)
    args = ("--mode", "distil", "--max_train_samples", "200", "--max_eval_samples", "50", "--epochs", "3")
    train_distil.train(distil_args(random_teacher, tmp_path / "a", cola_dir, *args))
    assert sum(rows) == 200 + 50
    rows.clear()
    train_distil.train(distil_args(random_teacher, tmp_path / "a", cola_dir, *args[:-1], "2", "--overwrite"))
    assert sum(rows) == 0
    # A different teacher (changed adapter weights) in the same place must not hit the cache.
    from safetensors.torch import load_file, save_file
    w = load_file(str(random_teacher / "adapter.safetensors"))
    changed = tmp_path / "teacher2"
    changed.mkdir()
    (changed / "adapter_config.json").write_text((random_teacher / "adapter_config.json").read_text())
    w["score.weight"] = -w["score.weight"]
    save_file(w, str(changed / "adapter.safetensors"))
    train_distil.train(distil_args(changed, tmp_path / "a", cola_dir, *args[:-1], "1", "--overwrite"))
    assert sum(rows) == 250


# ---------------------------------------------------------------- end to end, as a user runs it

def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def lora_teacher(tmp_path_factory, tiny_gpt2, cola_dir) -> Path:
    """A real train_lora.py output on a tiny random GPT-2."""
    out = tmp_path_factory.mktemp("runs")
    r = run("train_lora.py", "--gpt_variant", str(tiny_gpt2), "--data_dir", str(cola_dir), "--max_train_samples",
            "200", "--max_eval_samples", "80", "--epochs", "1", "--lora_rank", "2", "--out_dir", str(out / "lora"),
            "--plots_dir", str(out / "plots"), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    return out / "lora"


@pytest.mark.parametrize("mode,extra", [("rnn", ()), ("distil", ("--augment", "1"))])
def test_train_distil_end_to_end(lora_teacher, cola_dir, cola, mode, extra):
    runs = lora_teacher.parent
    if not (runs / "stranger").exists():  # a run beside out_dir that is neither this run nor its teacher
        shutil.copytree(lora_teacher, runs / "stranger")
    r = run("train_distil.py", "--mode", mode, "--teacher", str(lora_teacher), "--data_dir", str(cola_dir),
            "--max_train_samples", "200", "--max_eval_samples", "80", "--epochs", "2", "--hidden_size", "32",
            "--out_dir", str(runs / mode), "--plots_dir", str(runs / "plots"), "--cache_dir", str(runs / "cache"),
            "--device", "cpu", *extra)
    assert r.returncode == 0, r.stderr
    m = json.loads((runs / mode / "metrics.json").read_text())
    assert [e["epoch"] for e in m["epochs"]] == [1, 2]
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "val_mcc"):
        assert all(math.isfinite(e[key]) for e in m["epochs"]), key
    assert m["best_epoch"] in (1, 2) and m["config"]["mode"] == mode and "ood_dev" in m
    labels = [cola["dev"].labels[i] for i in stratified_sample(cola["dev"].labels, 80)]
    pos = sum(labels) / 80
    assert m["majority_baseline"]["val_acc"] == pytest.approx(max(pos, 1 - pos))
    cfg = json.loads((runs / mode / "student_config.json").read_text())
    assert cfg["embd_dim"] == 32  # --gpt_variant defaults to the teacher's base: the tiny teacher's wte width
    assert (runs / mode / "student.safetensors").stat().st_size > 0
    for name in (f"{mode}_loss.png", f"{mode}_accuracy.png", f"comparison_{mode}.png"):
        assert (runs / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (runs / "plots" / f"comparison_{mode}.md").read_text()
    assert "| lora |" in table and f"| {mode} |" in table and "majority baseline" in table
    assert "stranger" not in table and ("| rnn |" not in table if mode == "distil" else "| distil |" not in table)


def test_distil_without_teacher_is_one_clear_line(tmp_path, cola_dir):
    r = run("train_distil.py", "--mode", "distil", "--teacher", str(tmp_path / "nope"), "--data_dir", str(cola_dir),
            "--out_dir", str(tmp_path / "out"))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "train_lora.py" in r.stderr and "nope" in r.stderr
