"""Distillation: the KD loss against hand-computed references, DistilRNN's padding invariance and the layer
it reads, predict_logits' row order, the teacher cache, the transfer of a teacher's function, and
train_distil.py end to end.

Bugs these tests exist to catch (each planted and seen to fail a test):
- the KD loss: T^2 dropped or divided by, KL reversed, the hard term over unlabelled rows too;
- DistilRNN reading padding steps, the bottom layer of a stack, or its directions in the wrong order;
- predict_logits returning rows in length-sorted batch order, or reversed (the transfer test then fails on
  the recorded accuracy);
- the teacher-logit cache keyed without the rows (only split name and size), on sorted rows, on lengths or
  on the first rows only, or without the teacher; a teacher fingerprint blind to the base checkpoint's files
  (ignored, names only, or its path only);
- perturb drawing from a fresh or global generator instead of the one it is given;
- the MSE loss: its CE term dropped or over unlabelled rows too, alpha on the wrong term, the logits softened by T,
  a sum for a mean; a teacher ensemble that takes the first teacher, or the sum, or the mean over classes instead
  of teachers; teachers of different bases let through.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT
from data import Dataset, collate, stratified_sample
from distill import (UNLABELLED, augment, cache_key, check_teachers, ensemble_logits, kd_loss, perturb,
                     teacher_fingerprint, teacher_logits)
from errors import UserError
from lora import build_lora_classifier, inject_lora, save_adapter
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


def reference_mse(s: list[list[float]], t: list[list[float]], y: list[int], alpha: float) -> float:
    """Tang et al.'s loss written out with plain floats: alpha mean_{i,c} (s - t)^2 + (1 - alpha) mean over the
    labelled rows of CE (label UNLABELLED: no gold label)."""
    sq = [(a - b) ** 2 for si, ti in zip(s, t) for a, b in zip(si, ti)]
    ce = [-(si[yi] - math.log(sum(math.exp(v) for v in si))) for si, yi in zip(s, y) if yi != UNLABELLED]
    return alpha * sum(sq) / len(sq) + (1 - alpha) * sum(ce) / len(ce)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.7, 1.0])
@pytest.mark.parametrize("y", [Y, [0, UNLABELLED, 1, UNLABELLED]])
def test_mse_kd_loss_matches_hand_computed_reference_whatever_the_temperature(alpha, y):
    for T in (1.0, 4.0):  # Tang et al. compare raw logits: no temperature
        got = kd_loss(torch.tensor(S), torch.tensor(TCH), torch.tensor(y), T, alpha, "mse").item()
        assert got == pytest.approx(reference_mse(S, TCH, y, alpha), rel=1e-6)


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


@pytest.mark.parametrize("cell,bidirectional,num_layers", [("gru", True, 2), ("lstm", True, 2), ("gru", False, 2),
                                                           ("rnn", True, 3)])
def test_stacked_rnn_reads_the_top_layers_final_states(cola, cell, bidirectional, num_layers):
    """The head reads the top layer: its forward output after the last real token and, bidirectional, its
    backward output at the first token. The reference runs the unpadded sentence through the RNN alone, whose
    output sequence is the top layer's; the model sees it padded, in a batch."""
    torch.manual_seed(0)
    m = DistilRNN(embd_dim=16, hidden_size=12, num_layers=num_layers, cell=cell, bidirectional=bidirectional).eval()
    b = collate(cola["dev"], [3, 7, max(range(100), key=lambda i: len(cola["dev"].ids[i]))])
    H = 12
    with torch.no_grad():
        got = m.classify(b.ids, b.lengths)
        for i in range(2):  # rows 3 and 7 are padded in this batch
            L = int(b.lengths[i])
            out, _ = m.rnn(m.wte(b.ids[i:i + 1, :L]))  # (1, L, directions * H): the top layer's outputs
            final = [out[0, L - 1, :H]] + ([out[0, 0, H:]] if bidirectional else [])
            torch.testing.assert_close(got[i], m.head(torch.cat(final)), rtol=0, atol=1e-6)


def test_predict_logits_returns_rows_in_dataset_order(cola):
    """Batches are sorted by length; the logits must come back in the dataset's order, each row's own."""
    torch.manual_seed(0)
    m = DistilRNN(embd_dim=16, hidden_size=12).eval()
    ds = cola["dev"]
    rows = list(range(100))
    assert sorted(rows, key=lambda i: len(ds.ids[i])) != rows  # length order is not dataset order here
    sub = Dataset("dev", [ds.sentences[i] for i in rows], [ds.ids[i] for i in rows], [ds.labels[i] for i in rows])
    got = predict_logits(m, sub, 16, CPU, FP32)
    with torch.no_grad():
        want = m.classify(*ids_lengths(sub, rows))  # one padded batch, in dataset order
    assert got.shape == (100, 2)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def ids_lengths(ds: Dataset, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    b = collate(ds, rows)
    return b.ids, b.lengths


# ---------------------------------------------------------------- augmentation

def test_perturb_is_deterministic_never_empty_and_augment_labels_copies_unlabelled(cola):
    import random
    words = "the cat sat on the mat".split()
    draws = {}
    for seed in (1, 1, 2):
        rng = random.Random(seed)
        draws.setdefault(seed, []).append([perturb(words, rng) for _ in range(20)])
    assert draws[1][0] == draws[1][1]  # the same seed, the same 20 copies
    assert len({tuple(w) for w in draws[1][0]}) > 5  # each draw moves the generator on
    assert draws[2][0] != draws[1][0]
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
        "--cache_dir", str(tmp / "cache"), "--init_embeddings", "none",
        "--embd_dim", "32", "--hidden_size", "64", "--device", "cpu", *extra])


def test_distillation_transfers_the_teachers_function(random_teacher, tmp_path, cola_dir, cola):
    """A student distilled with alpha=1 agrees with the teacher on dev sentences clearly more often than the
    same student trained on the gold labels."""
    import train_distil
    common = ("--max_train_samples", "1500", "--epochs", "3", "--lr", "3e-3", "--temperature", "2")
    distilled = train_distil.train(distil_args(random_teacher, tmp_path, cola_dir, "--mode", "distil",
                                               "--alpha", "1", *common))
    gold = train_distil.train(distil_args(random_teacher, tmp_path, cola_dir, "--mode", "rnn", *common))
    everything = list(range(len(cola["dev"])))  # one padded batch, in dataset order: no predict_logits here
    with torch.no_grad():
        t = build_lora_classifier(random_teacher)[0].eval().classify(*ids_lengths(cola["dev"], everything)).argmax(-1)
    gold_labels = torch.tensor(cola["dev"].labels)

    def predictions_of(run: str) -> torch.Tensor:
        from safetensors.torch import load_file
        cfg = json.loads((tmp_path / run / "student_config.json").read_text())
        m = DistilRNN(**cfg).eval()
        m.load_state_dict(load_file(str(tmp_path / run / "student.safetensors")))
        with torch.no_grad():
            return m.classify(*ids_lengths(cola["dev"], everything)).argmax(-1)

    p_distil, p_gold = predictions_of("distil"), predictions_of("rnn")
    a_distil, a_gold = (float((p == t).float().mean()) for p in (p_distil, p_gold))
    assert distilled["teacher_agreement_dev"] == pytest.approx(a_distil, abs=1e-9)
    assert a_distil > a_gold + 0.10, (a_distil, a_gold)
    for run, p in ((distilled, p_distil), (gold, p_gold)):  # the recorded best epoch is the saved student's
        assert run["best"]["val_acc"] == pytest.approx(float((p == gold_labels).float().mean()), abs=1e-9)


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


def rows_of(ds: Dataset, rows: list[int], name: str = "train") -> Dataset:
    return Dataset(name, [ds.sentences[i] for i in rows], [ds.ids[i] for i in rows], [ds.labels[i] for i in rows], rows)


def test_teacher_cache_key_depends_on_the_rows_not_only_the_split_and_size(cola):
    """Same split name and size, other rows (another sample, another --augment draw, another order, one token
    changed in the last row): another key. The same rows again: the same key. The key's other parts count too."""
    train = cola["train"]
    a = rows_of(train, list(range(100)))
    keys = {"a": cache_key("teacher", a, CPU, FP32),
            "other sample": cache_key("teacher", rows_of(train, list(range(100, 200))), CPU, FP32),
            "other order": cache_key("teacher", rows_of(train, list(range(99, -1, -1))), CPU, FP32),
            "augment 0": cache_key("teacher", augment(rows_of(train, list(range(50))), 1, seed=0), CPU, FP32),
            "augment 1": cache_key("teacher", augment(rows_of(train, list(range(50))), 1, seed=1), CPU, FP32),
            "other teacher": cache_key("other teacher", a, CPU, FP32),
            "other precision": cache_key("teacher", a, CPU, Precision("bf16", "cpu"))}
    last = rows_of(train, list(range(100)))
    last.ids[-1] = [*last.ids[-1][:-1], last.ids[-1][-1] + 1]
    keys["last token"] = cache_key("teacher", last, CPU, FP32)
    assert len(set(keys.values())) == len(keys), keys
    assert cache_key("teacher", rows_of(train, list(range(100))), CPU, FP32) == keys["a"]
    assert cache_key("teacher", rows_of(train, list(range(100)), name="dev"), CPU, FP32) == keys["a"]  # not names


def test_teacher_cache_serves_each_dataset_its_own_logits(random_teacher, cola, tmp_path):
    """Two datasets named alike, of one size, one after the other through one cache: each gets the teacher's
    logits of its own rows (computed here without predict_logits), not the other's."""
    teacher = build_lora_classifier(random_teacher)[0].eval()
    dev = cola["dev"]
    for rows in (list(range(60)), list(range(60, 120)), list(range(60))):
        ds = rows_of(dev, rows, name="dev")
        got = teacher_logits(random_teacher, {"dev": ds}, tmp_path / "cache", 32, CPU, FP32)["dev"]
        with torch.no_grad():
            want = teacher.classify(*ids_lengths(ds, list(range(len(ds)))))
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert len(list((tmp_path / "cache").glob("teacher_*.safetensors"))) == 2


def test_a_changed_base_checkpoint_changes_the_teacher_and_its_logits(random_teacher, cola, tmp_path):
    """The teacher is its adapter and its base: rewriting the local base's weights (same size, a later
    modification time, as any re-save) must change the fingerprint, so the cache is not hit."""
    from safetensors.torch import load_file, save_file
    cfg = json.loads((random_teacher / "adapter_config.json").read_text())
    base, teacher = tmp_path / "base", tmp_path / "teacher"
    shutil.copytree(cfg["gpt_variant"], base)
    shutil.copytree(random_teacher, teacher, ignore=shutil.ignore_patterns("cache"))
    (teacher / "adapter_config.json").write_text(json.dumps({**cfg, "gpt_variant": str(base)}))
    ds = rows_of(cola["dev"], list(range(40)), name="dev")
    before = teacher_fingerprint(teacher)
    assert teacher_fingerprint(teacher) == before  # nothing changed: the same teacher
    old = teacher_logits(teacher, {"dev": ds}, tmp_path / "cache", 32, CPU, FP32)["dev"]

    weights = base / "model.safetensors"
    w = load_file(str(weights))
    torch.manual_seed(1)
    w["transformer.wte.weight"] = w["transformer.wte.weight"] + 0.5 * torch.randn_like(w["transformer.wte.weight"])
    st = weights.stat()
    save_file(w, str(weights), metadata={"format": "pt"})
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert weights.stat().st_size == st.st_size
    assert teacher_fingerprint(teacher) != before
    new = teacher_logits(teacher, {"dev": ds}, tmp_path / "cache", 32, CPU, FP32)["dev"]
    with torch.no_grad():
        want = build_lora_classifier(teacher)[0].eval().classify(*ids_lengths(ds, list(range(40))))
    assert (new - old).abs().max() > 1e-3
    torch.testing.assert_close(new, want, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- end to end, as a user runs it

def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def lora_teacher(tmp_path_factory, lora_ref) -> Path:
    """A real train_lora.py output on a tiny random GPT-2: a copy of the session's lora_ref run (its files
    only), in a folder of its own for the runs made beside it."""
    out = tmp_path_factory.mktemp("runs") / "lora"
    shutil.copytree(lora_ref, out)
    return out


@pytest.mark.parametrize("mode,extra", [("rnn", ()), ("distil", ("--augment", "1"))])
def test_train_distil_end_to_end(lora_teacher, cola_dir, cola, mode, extra):
    runs = lora_teacher.parent
    if not (runs / "stranger").exists():  # a run beside out_dir that is neither this run nor its teacher
        shutil.copytree(lora_teacher, runs / "stranger")
    r = run("train_distil.py", "--mode", mode, "--teacher", str(lora_teacher), "--data_dir", str(cola_dir),
            "--max_train_samples", "200", "--max_eval_samples", "80", "--epochs", "2", "--hidden_size", "32",
            "--out_dir", str(runs / mode), "--cache_dir", str(runs / "cache"),
            "--device", "cpu", *extra)
    assert r.returncode == 0, r.stderr
    m = json.loads((runs / mode / "metrics.json").read_text())
    assert [e["epoch"] for e in m["epochs"]] == [1, 2]
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "val_mcc"):
        assert all(math.isfinite(e[key]) for e in m["epochs"]), key
    assert m["best_epoch"] in (1, 2) and m["config"]["mode"] == mode and "ood_dev" in m
    # the curves' train-loss label, from the run's own loss and its T and alpha (defaults 2 and 0.7); an rnn
    # run's is the cross-entropy its curves show without a name
    assert m.get("loss_name") == ("KD loss: 0.7 T² KL (T = 2) + 0.3 CE" if mode == "distil" else None)
    labels = [cola["dev"].labels[i] for i in stratified_sample(cola["dev"].labels, 80)]
    pos = sum(labels) / 80
    assert m["majority_baseline"]["val_acc"] == pytest.approx(max(pos, 1 - pos))
    cfg = json.loads((runs / mode / "student_config.json").read_text())
    assert cfg["embd_dim"] == 32  # --gpt_variant defaults to the teacher's base: the tiny teacher's wte width
    assert (runs / mode / "student.safetensors").stat().st_size > 0
    for name in ("loss.png", "accuracy.png", "comparison.png"):
        assert (runs / mode / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (runs / mode / "comparison.md").read_text()
    assert "| lora |" in table and f"| {mode} |" in table and "majority baseline" in table
    assert "stranger" not in table and ("| rnn |" not in table if mode == "distil" else "| distil |" not in table)


def test_distil_without_teacher_is_one_clear_line(tmp_path, cola_dir):
    r = run("train_distil.py", "--mode", "distil", "--teacher", str(tmp_path / "nope"), "--data_dir", str(cola_dir),
            "--out_dir", str(tmp_path / "out"))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "train_lora.py" in r.stderr and "nope" in r.stderr


# ---------------------------------------------------------------- teacher ensembles

def test_ensemble_learns_the_mean_of_its_teachers_logits(random_teacher, tmp_path, cola_dir, cola):
    """Two teachers on one base: the ensemble's logits are the mean of each teacher's own forward pass (no cache),
    a distillation run records both teachers and the ensemble's own dev scores, and a teacher of another base is
    refused in one line naming both."""
    import train_distil
    from metrics import summarize
    second = tmp_path / "teacher_b"
    make_random_teacher(second, Path(json.loads((random_teacher / "adapter_config.json").read_text())["gpt_variant"]),
                        cola, seed=99)
    dev = cola["dev"]
    everything = list(range(len(dev)))
    with torch.no_grad():
        own = [build_lora_classifier(t)[0].eval().classify(*ids_lengths(dev, everything)) for t in (random_teacher, second)]
    assert not torch.allclose(own[0], own[1], atol=1e-3)
    mean = (own[0] + own[1]) / 2  # (N, 2)
    got = ensemble_logits([str(random_teacher), str(second)], {"dev": dev}, tmp_path / "cache", 256, CPU, FP32)["dev"]
    assert torch.allclose(got, mean, atol=1e-5)

    m = train_distil.train(distil_args(random_teacher, tmp_path, cola_dir, "--mode", "distil", "--teacher",
                                       str(random_teacher), str(second), "--max_train_samples", "64", "--epochs", "1"))
    assert m["teachers"] == [str(random_teacher), str(second)] and m["config"]["teacher"] == m["teachers"]
    assert len(m["config"]["teacher_fingerprint"]) == 2
    assert m["teacher_dev"]["mcc"] == pytest.approx(summarize(mean.argmax(-1), torch.tensor(dev.labels))["mcc"])

    stranger = tmp_path / "stranger"
    shutil.copytree(second, stranger)
    cfg = json.loads((stranger / "adapter_config.json").read_text())
    (stranger / "adapter_config.json").write_text(json.dumps({**cfg, "gpt_variant": str(tmp_path / "other_base")}))
    with pytest.raises(UserError, match="gpt_variant.*share their base") as e:
        check_teachers([str(random_teacher), str(stranger)])
    assert str(stranger) in str(e.value) and "\n" not in str(e.value)
