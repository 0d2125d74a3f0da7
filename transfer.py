"""The generated transfer set of Tang, Lu & Lin (2019): sentences sampled from a GPT-2 fine-tuned as a language
model on CoLA's training sentences (`train_lora.py --objective lm`), filtered, and cached as a text file, one
sentence a line. The teacher labels them (distill.teacher_logits) and the student learns their soft targets only.

Filtering keeps the evaluation honest: a sample equal to any in-domain or out-of-domain dev sentence (after
normalising case and whitespace) is dropped, whatever --max_eval_samples is, so no evaluation sentence reaches
training. Samples equal to a training sentence are kept (the student sees them anyway) but counted: their share
says how much the generator memorised.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from data import get_encoder
from distill import teacher_fingerprint
from inference import load_generator
from model import EOT_TOKEN
from precision import Precision

ESTIMATE_ABOVE = 5_000  # samples: above this many, the time the whole generation will take is printed up front
FORMAT = 1  # bump when what a cached transfer set holds changes, so old files are never reused


@dataclass(frozen=True)
class Sampling:
    """How the transfer set is sampled: each changes the sentences, so each is part of the cache key."""
    temperature: float
    top_k: int | None     # None: no top-k cut
    top_p: float | None   # None: no nucleus cut
    max_tokens: int       # a sample that has not ended by then is unfinished, and dropped
    batch_size: int       # rows decoded at once (the random draws depend on it)
    seed: int


def normalise(sentence: str) -> str:
    """The form in which two sentences count as the same: case and whitespace ignored."""
    return " ".join(sentence.split()).casefold()


def sample(model: torch.nn.Module, n: int, sampling: Sampling, device: torch.device) -> list[str | None]:
    """n samples of `model` (a GPT from inference.load_generator), each started from <|endoftext|> alone: the
    text before its next <|endoftext|>, whitespace collapsed to single spaces (one sentence, one line), or None
    if it has not ended within sampling.max_tokens. Reproducible from sampling.seed on one device and precision;
    the global RNG is left alone."""
    enc = get_encoder()
    gen = torch.Generator(device).manual_seed(sampling.seed)
    prompt = torch.full((sampling.batch_size, 1), EOT_TOKEN, dtype=torch.long, device=device)  # (B, 1)
    out: list[str | None] = []
    t0 = time.perf_counter()
    with tqdm(total=n, unit="sentence", desc="generating the transfer set", smoothing=0.1) as bar:
        for start in range(0, n, sampling.batch_size):
            b = min(sampling.batch_size, n - start)
            rows = model.generate(prompt[:b], sampling.max_tokens, sampling.temperature, sampling.top_k,
                                  sampling.top_p, generator=gen, eos_token=EOT_TOKEN)[:, 1:]  # (b, max_tokens)
            for row in rows.tolist():
                out.append(" ".join(enc.decode(row[:row.index(EOT_TOKEN)]).split()) if EOT_TOKEN in row else None)
            bar.update(b)
            if start == 0 and n > ESTIMATE_ABOVE:
                rate = b / (time.perf_counter() - t0)
                tqdm.write(f"generating {n:,} sentences at about {rate:.0f} a second (first batch): about "
                           f"{n / rate / 60:.0f} minutes")
    return out


def filter_samples(samples: list[str | None], train: list[str], evaluation: list[str]) -> tuple[list[str], dict]:
    """The transfer set: samples less the unfinished (None), the empty, those equal to an evaluation sentence,
    and repeats of an earlier sample (in that order; equal means equal after `normalise`). Returns it and the
    count of each, plus how many kept samples equal a training sentence (kept: they leak nothing)."""
    held_out, seen_train = {normalise(s) for s in evaluation}, {normalise(s) for s in train}
    counts = {"generated": len(samples), "unfinished": 0, "empty": 0, "evaluation_sentence": 0, "duplicate": 0}
    kept, seen = [], set()
    for s in samples:
        key = None if s is None else normalise(s)
        if s is None:
            counts["unfinished"] += 1
        elif not key:
            counts["empty"] += 1
        elif key in held_out:
            counts["evaluation_sentence"] += 1
        elif key in seen:
            counts["duplicate"] += 1
        else:
            seen.add(key)
            kept.append(s)
    counts["kept"] = len(kept)
    counts["training_sentence_kept"] = sum(normalise(s) in seen_train for s in kept)
    return kept, counts


def transfer_key(generator_key: str, n: int, sampling: Sampling, device: torch.device, precision: Precision,
                 train: list[str], evaluation: list[str]) -> str:
    """Everything that changes the transfer set: the generator run and its base (generator_key), n, the sampling
    settings and seed, the device type and precision (other numerics, other draws), and the sentences the
    filter compares with."""
    sentences = hashlib.sha256(json.dumps([train, evaluation]).encode()).hexdigest()
    parts = {"format": FORMAT, "generator": generator_key, "n": n, **asdict(sampling), "device": device.type,
             "precision": precision.name, "sentences": sentences}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def transfer_set(generator_dir: str | Path, n: int, sampling: Sampling, cache_dir: str | Path,
                 device: torch.device, precision: Precision, train: list[str],
                 evaluation: list[str]) -> tuple[list[str], dict, Path]:
    """The filtered transfer set of n samples from the language-model run generator_dir, its filter counts, and
    the text file it is cached in (cache_dir/transfer_KEY.txt, its counts beside it in .json). A second call with
    the same settings reads the file and generates nothing."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = transfer_key(teacher_fingerprint(generator_dir, "lm"), n, sampling, device, precision, train, evaluation)
    path, counts_path = cache_dir / f"transfer_{key}.txt", cache_dir / f"transfer_{key}.json"
    if path.is_file() and counts_path.is_file():
        print(f"transfer set from cache: {path} (same generator, n and sampling settings; nothing generated)")
        return path.read_text(encoding="utf-8").splitlines(), json.loads(counts_path.read_text()), path
    with torch.random.fork_rng(devices=[]):  # LoRA's random init before its weights load must not move the run's RNG
        model = load_generator(generator_dir, device, precision)
    samples = sample(model, n, sampling, device)
    del model
    kept, counts = filter_samples(samples, train, evaluation)
    for p, text in ((counts_path, json.dumps(counts, indent=2)), (path, "".join(s + "\n" for s in kept))):
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, p)
    print(f"transfer set written to {path}")
    return kept, counts, path
