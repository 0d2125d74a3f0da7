"""The generated transfer set (train_distil.py --generator LM_RUN --generate N): end to end on a tiny GPT-2, the
leakage filter against a generator rigged to emit dev sentences, the cache key, a resumed --generate run against
an uninterrupted one, and the resume of a run written before these flags existed.

Bugs these tests exist to catch (each planted and seen to fail a test; see the report of issue 22):
- the leakage filter comparing without normalising case or whitespace, only against the --max_eval_samples sample
  of dev, or not against the out-of-domain dev set; duplicates kept; training-sentence matches dropped or uncounted;
- the cache key blind to a sampling setting or to the generator's weights; the transfer set sampled from the
  global RNG (a cache hit and a miss then train different students), or not reproducible from its seed;
- generated rows that carry a gold label, or that never reach the training set;
- a new config key without its CONFIG_DEFAULTS entry (an older run's --resume refused).
Planted this round and caught: the filter without case/whitespace normalisation, against only the first
--max_eval_samples dev rows, without the out-of-domain set, keeping duplicates, counting training matches
unnormalised; the cache key without top_p or without the generator; generated rows labelled 0; no CONFIG_DEFAULTS
entry for kd_loss; sampling from the global RNG (the resume test).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train_distil
import trainer
from cli import CHECKPOINT, CONFIG_DEFAULTS, METRICS
from conftest import ROOT, make_gpt2_checkpoint
from data import SPLITS, ensure_cola, get_encoder, read_tsv
from distill import DISTILLATION_KEYS, UNLABELLED
from model import EOT_TOKEN, GPT
from precision import Precision
from transfer import Sampling, filter_samples, normalise, transfer_key

ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg")
CPU, FP32 = torch.device("cpu"), Precision("fp32", "cpu")
NEW_KEYS = {"kd_loss", "generator", "generate", "gen_temperature", "gen_top_k", "gen_top_p", "gen_max_tokens",
            "gen_batch_size", "gen_seed"}  # the config keys this issue added
SAMPLING = Sampling(temperature=1.0, top_k=None, top_p=None, max_tokens=24, batch_size=100, seed=3)


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, script, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def splits(cola_dir) -> dict[str, list[str]]:
    raw = ensure_cola(cola_dir)
    return {name: read_tsv(raw / f)[0] for name, f in SPLITS.items()}


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory, cola_dir) -> Path:
    """A train_lora.py --objective lm run on a tiny random GPT-2 whose <|endoftext|> embedding is 30x the others:
    with GPT-2's tied head, the fine-tuned LoRA can then raise that token's probability to where sentences end
    within a few dozen tokens (with a 0.02-scale embedding no logit could move far enough)."""
    from transformers import GPT2LMHeadModel
    base = make_gpt2_checkpoint(tmp_path_factory.mktemp("lm_base"))
    hf = GPT2LMHeadModel.from_pretrained(base)
    with torch.no_grad():
        hf.transformer.wte.weight[EOT_TOKEN] *= 30
    hf.save_pretrained(base)
    out = tmp_path_factory.mktemp("lm") / "lm"
    run("train_lora.py", "--objective", "lm", "--gpt_variant", str(base), "--data_dir", str(cola_dir),
        "--max_train_samples", "300", "--max_eval_samples", "32", "--epochs", "2", "--lora_rank", "4", "--lr", "1e-2",
        "--batch_size", "16", "--out_dir", str(out), "--device", "cpu")
    return out


def distil_flags(teacher: Path, generator: Path, cola_dir: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    return ["--mode", "distil", "--teacher", str(teacher), "--generator", str(generator), "--init_embeddings", "none",
            "--embd_dim", "16", "--hidden_size", "16", "--data_dir", str(cola_dir), "--max_train_samples", "64",
            "--max_eval_samples", "32", "--epochs", "1", "--batch_size", "32", "--seed", "7", "--gen_top_p", "1",
            "--gen_max_tokens", "24", "--gen_batch_size", "100", "--out_dir", str(out),
            "--cache_dir", str(cache), "--device", "cpu", *extra]


# ---------------------------------------------------------------- the filter and the cache key

def test_filter_drops_unfinished_empty_repeated_and_every_dev_sentence_and_counts_training_ones(splits):
    dev, ood, train = splits["dev"], splits["ood_dev"], splits["train"]
    novel = ["Colourless green ideas sleep furiously today.", "The cat the dog chased ran away quickly."]
    assert not {normalise(s) for s in novel} & {normalise(s) for s in dev + ood + train}
    samples = [novel[0], None, "", "  ", dev[5].upper(), "  ".join(dev[300].split()) + " ", ood[7], novel[0].lower(),
               train[11], novel[1], None, dev[0]]
    kept, counts = filter_samples(samples, train, dev + ood)
    assert kept == [novel[0], train[11], novel[1]]
    assert counts == {"generated": 12, "unfinished": 2, "empty": 2, "evaluation_sentence": 4, "duplicate": 1,
                      "kept": 3, "training_sentence_kept": 1}


def test_transfer_key_changes_with_everything_that_changes_the_sentences(splits):
    args = ("gen", 300, SAMPLING, CPU, FP32, splits["train"], splits["dev"])
    key = transfer_key(*args)
    assert transfer_key(*args) == key
    variants = {f"sampling.{f}": Sampling(**{**SAMPLING.__dict__, f: v}) for f, v in
                (("temperature", 0.7), ("top_k", 50), ("top_p", 0.9), ("max_tokens", 25), ("batch_size", 64),
                 ("seed", 4))}
    others = {"generator": ("gen2", *args[1:]), "n": (args[0], 301, *args[2:]),
              "precision": (*args[:4], Precision("bf16", "cpu"), *args[5:]),
              "dev sentences": (*args[:6], splits["dev"][1:]),
              **{k: (*args[:2], v, *args[3:]) for k, v in variants.items()}}
    keys = {name: transfer_key(*a) for name, a in others.items()}
    assert key not in keys.values() and len(set(keys.values())) == len(keys), keys


def test_distillation_keys_are_config_keys_with_defaults_for_older_runs():
    """report.py pairs runs by DISTILLATION_KEYS: each is a flag recorded in the config (or the generator's files,
    recorded when it is used), and each flag this issue added takes a default when an older run lacks it."""
    config = train_distil.build_parser().parse_args([])
    assert set(DISTILLATION_KEYS) - {"generator_fingerprint"} <= set(vars(config))
    new = NEW_KEYS
    assert new <= set(DISTILLATION_KEYS) and new <= set(CONFIG_DEFAULTS)
    assert {k: CONFIG_DEFAULTS[k] for k in new} == {k: getattr(config, k) for k in new}


# ---------------------------------------------------------------- end to end

def test_lm_generate_label_distil_predict_end_to_end(lm_run, lora_ref, cola_dir, tmp_path):
    """LM fine-tune (lm_run), 300 generated sentences, teacher labels, distillation and predict.py on the student,
    each a command as a user runs it."""
    out, cache = tmp_path / "distil", tmp_path / "cache"
    r = run("train_distil.py", *distil_flags(lora_ref, lm_run, cola_dir, out, cache, "--generate", "300",
                                             "--kd_loss", "mse"))
    m = json.loads((out / METRICS).read_text())
    t = m["transfer_set"]
    path = Path(t["path"])
    lines = path.read_text(encoding="utf-8").splitlines()
    assert path.parent == cache and str(path) in r.stdout and "generating the transfer set" in r.stderr
    assert t["generated"] == 300 and len(lines) == t["kept"] > 30
    assert t["unfinished"] + t["empty"] + t["evaluation_sentence"] + t["duplicate"] + t["kept"] == 300
    assert f"kept {t['kept']}" in r.stdout and f"train {64 + t['kept']} sentences" in r.stdout
    assert all(line.strip() == line and line for line in lines)
    assert m["config"]["kd_loss"] == "mse" and m["loss_name"].startswith("MSE") and m["teachers"] == [str(lora_ref)]
    p = run("predict.py", str(out), "The book was written by John.", "Book the was by written John.")
    labels = [ln.split()[0] for ln in p.stdout.splitlines() if ln.endswith("John.")]
    assert len(labels) == 2 and set(labels) <= {"0", "1"}


# ---------------------------------------------------------------- no dev sentence reaches training

def test_generator_rigged_to_emit_dev_sentences_leaks_none_into_training(lm_run, lora_ref, cola_dir, splits, tmp_path,
                                                                        monkeypatch):
    """GPT.generate replaced by one that emits dev and out-of-domain dev sentences (also outside the
    --max_eval_samples sample, in other case and spacing), training sentences and novel ones: no dev sentence
    is in the transfer set or among the rows the student trains on; training ones are kept and counted."""
    dev, ood, train = splits["dev"], splits["ood_dev"], splits["train"]
    novel = [f"The {w} arrived early this morning." for w in ("parcel", "letter", "visitor", "storm")]
    emitted = ([dev[i].upper() for i in range(0, 400, 10)] + ["  " + s.replace(" ", "  ") for s in ood[:20]]
               + train[:5] + novel)
    enc = get_encoder()
    stream = iter(emitted * 10)

    def rigged(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None, eos_token=None):
        rows = []
        for _ in range(idx.size(0)):
            ids = enc.encode_ordinary(next(stream))[:max_new_tokens - 1]
            rows.append(ids + [EOT_TOKEN] * (max_new_tokens - len(ids)))
        return torch.cat([idx, torch.tensor(rows)], 1)

    monkeypatch.setattr(GPT, "generate", rigged)
    seen, labels = [], []
    original = trainer.fit

    def spy(model, train_ds, *a, **kw):
        seen.extend(train_ds.sentences)
        labels.extend(train_ds.labels)
        return original(model, train_ds, *a, **kw)

    monkeypatch.setattr(train_distil, "fit", spy)
    n = len(emitted)
    m = train_distil.train(train_distil.build_parser().parse_args(distil_flags(
        lora_ref, lm_run, cola_dir, tmp_path / "distil", tmp_path / "cache", "--generate", str(n),
        "--gen_max_tokens", "48")))
    held_out = {normalise(s) for s in dev + ood}
    transfer = Path(m["transfer_set"]["path"]).read_text().splitlines()
    assert not {normalise(s) for s in transfer} & held_out
    assert not {normalise(s) for s in seen} & held_out
    assert m["transfer_set"]["evaluation_sentence"] == 60 and m["transfer_set"]["kept"] == 9
    assert m["transfer_set"]["training_sentence_kept"] == 5 and sorted(transfer) == sorted(train[:5] + novel)
    assert seen[-9:] == transfer and labels[-9:] == [UNLABELLED] * 9  # trained on, with the teacher's targets only
    assert len(seen) == 64 + 9 and UNLABELLED not in labels[:64]


# ---------------------------------------------------------------- resume

class Interrupted(Exception):
    pass


def interrupt_after_first_checkpoint(monkeypatch) -> None:
    """The next run stops once its first epoch's checkpoint is written, as a killed run would."""
    original = trainer.save_checkpoint

    def save_then_stop(*a, **kw):
        original(*a, **kw)
        monkeypatch.setattr(trainer, "save_checkpoint", original)
        raise Interrupted

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_stop)


def parse(*flags: str):
    return train_distil.build_parser().parse_args(list(flags))


def test_resumed_generate_run_ends_byte_identical_to_an_uninterrupted_one(lm_run, lora_ref, cola_dir, tmp_path,
                                                                           monkeypatch, capsys):
    """An uninterrupted 2-epoch --generate run; the same run stopped after epoch 1 (reading the first run's cached
    transfer set), its transfer set deleted, then resumed (sampling it again): the same metrics.json, student
    and transfer file, byte for byte."""
    cache = tmp_path / "cache"
    flags = lambda out: distil_flags(lora_ref, lm_run, cola_dir, out, cache, "--generate", "100",  # noqa: E731
                                     "--epochs", "2")
    ref, out = tmp_path / "ref" / "distil", tmp_path / "killed" / "distil"
    train_distil.train(parse(*flags(ref)))
    transfer = sorted(cache.glob("transfer_*"))
    assert len(transfer) == 2  # the sentences and their counts
    first = {p: p.read_bytes() for p in transfer}
    capsys.readouterr()
    interrupt_after_first_checkpoint(monkeypatch)
    with pytest.raises(Interrupted):
        train_distil.train(parse(*flags(out)))
    assert "transfer set from cache" in capsys.readouterr().out
    for p in transfer:
        p.unlink()
    train_distil.train(parse(*flags(out), "--resume"))
    assert "transfer set written to" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in transfer} == first
    assert (out / METRICS).read_bytes() == (ref / METRICS).read_bytes()
    assert (out / "student.safetensors").read_bytes() == (ref / "student.safetensors").read_bytes()


def test_run_written_before_the_new_flags_resumes(lora_ref, cola_dir, tmp_path, monkeypatch):
    """A distillation run whose checkpoint config lacks every key this issue added (as runs written before it do)
    resumes under today's defaults and ends where an uninterrupted run ends."""
    from trainer import load_checkpoint, save_checkpoint
    flags = lambda out: ["--mode", "distil", "--teacher", str(lora_ref), "--init_embeddings", "none",  # noqa: E731
                         "--embd_dim", "16", "--hidden_size", "16", "--data_dir", str(cola_dir), "--max_train_samples",
                         "64", "--max_eval_samples", "32", "--epochs", "2", "--seed", "7", "--out_dir", str(out),
                         "--cache_dir", str(tmp_path / "cache"),
                         "--device", "cpu"]
    ref, out = tmp_path / "ref", tmp_path / "old"
    want = train_distil.train(parse(*flags(ref)))
    interrupt_after_first_checkpoint(monkeypatch)
    with pytest.raises(Interrupted):
        train_distil.train(parse(*flags(out)))
    new = NEW_KEYS
    tensors, state = load_checkpoint(out / CHECKPOINT)
    assert new <= set(state["config"])
    state["config"] = {k: v for k, v in state["config"].items() if k not in new}
    state["metrics"]["config"] = state["config"]
    del state["metrics"]["loss_name"]
    save_checkpoint(out / CHECKPOINT, tensors, state)
    got = train_distil.train(parse(*flags(out), "--resume"))
    assert got["epochs"] == want["epochs"] and got["loss_name"] == want["loss_name"]
    a, b = load_file(str(out / "student.safetensors")), load_file(str(ref / "student.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
