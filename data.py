"""CoLA: download, verify, parse, tokenize (tiktoken's gpt2 encoding) and batch.

Batches are padded to their longest sentence, not to a fixed length, and training batches are
length-bucketed: CoLA sentences average about 9 tokens, so fixed padding would mostly compute padding.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import shutil
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from errors import OFFLINE_HINT, UserError

COLA_URL = "https://nyu-mll.github.io/CoLA/cola_public_1.1.zip"
COLA_SHA256 = "2cf856f46df11c143d38e0cf2f9f34ff2fdb088c521cd859f5c4b9581683278b"
SPLITS = {"train": "in_domain_train.tsv", "dev": "in_domain_dev.tsv", "ood_dev": "out_of_domain_dev.tsv"}
PAD_TOKEN = 50256  # GPT-2's <|endoftext|>; it is never attended to by a real token (right padding, causal)
SAMPLE_SEED = 0  # --max_*_samples draws the same rows whatever --seed: seeds of one config share their dev set


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _find_raw_dir(root: Path) -> Path | None:
    for candidate in (root / "cola_public" / "raw", root / "raw"):
        if (candidate / SPLITS["train"]).is_file():
            return candidate
    return None


def ensure_cola(data_dir: str | Path, url: str = COLA_URL) -> Path:
    """Return the directory holding CoLA's raw/*.tsv files, downloading and extracting the official archive
    into data_dir if it is not there yet. An already extracted copy is used as is."""
    data_dir = Path(data_dir)
    if data_dir.exists() and not data_dir.is_dir():
        raise UserError(f"--data_dir {data_dir} is a file, not a directory")
    raw = _find_raw_dir(data_dir)
    if raw is not None:
        return raw
    archive = data_dir / "cola_public_1.1.zip"
    if not archive.is_file():
        new_dirs = [p for p in (data_dir, *data_dir.parents) if not p.exists()]  # removed again if the download fails
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"--data_dir {data_dir} cannot be created: {e.strerror}") from None
        partial = archive.with_suffix(".zip.part")
        print(f"downloading CoLA from {url} into {data_dir}")
        try:
            with urllib.request.urlopen(url, timeout=60) as r, open(partial, "wb") as f:
                shutil.copyfileobj(r, f)
        except (OSError, ValueError) as e:
            partial.unlink(missing_ok=True)
            for d in new_dirs:  # a misspelt --data_dir leaves nothing behind
                with contextlib.suppress(OSError):
                    d.rmdir()
            raise UserError(f"could not download CoLA from {url} ({e}); put cola_public_1.1.zip or its extracted "
                            f"cola_public/ folder into --data_dir {data_dir}{OFFLINE_HINT}") from None
        partial.replace(archive)
    actual = sha256_of(archive)
    if actual != COLA_SHA256:
        archive.unlink()
        raise UserError(f"{archive} has SHA-256 {actual}, expected {COLA_SHA256}; the file was removed, run again "
                        "to download it afresh")
    with zipfile.ZipFile(archive) as z:
        z.extractall(data_dir)
    raw = _find_raw_dir(data_dir)
    if raw is None:
        raise UserError(f"{archive} did not contain cola_public/raw/{SPLITS['train']}")
    return raw


def read_tsv(path: str | Path) -> tuple[list[str], list[int]]:
    """Parse a CoLA raw TSV (source, label, original mark, sentence) into sentences and 0/1 labels."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found")
    sentences, labels = [], []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path} cannot be read: {e}") from None
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) != 4:
            raise UserError(f"{path}:{lineno}: expected 4 tab-separated columns, found {len(cols)}")
        if cols[1] not in ("0", "1"):
            raise UserError(f"{path}:{lineno}: label must be 0 or 1, found {cols[1]!r}")
        sentences.append(cols[3])
        labels.append(int(cols[1]))
    return sentences, labels


def get_encoder():
    """tiktoken's gpt2 encoding; its BPE files are downloaded once, or read from TIKTOKEN_CACHE_DIR."""
    import tiktoken
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken raises requests' errors, ValueError, ... when its files can't be had
        raise UserError(f"could not load tiktoken's gpt2 encoding ({type(e).__name__}); it downloads its files "
                        "once, so run with internet, or set TIKTOKEN_CACHE_DIR to a folder holding them"
                        f"{OFFLINE_HINT}") from None


@dataclass
class Dataset:
    """A tokenized split. `ids` are Python lists (no padding), `labels` 0/1, `rows` each sentence's row in
    the file (0-based; all rows in order unless --max_*_samples sampled some)."""

    name: str
    sentences: list[str]
    ids: list[list[int]]
    labels: list[int]
    rows: list[int] | None = None

    def __post_init__(self):
        if self.rows is None:
            self.rows = list(range(len(self.labels)))

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def majority_acc(self) -> float:
        """Accuracy of always predicting the more frequent class: the bar every model must clear."""
        pos = sum(self.labels) / max(len(self.labels), 1)
        return max(pos, 1 - pos)


def stratified_sample(labels: list[int], n: int, seed: int = SAMPLE_SEED) -> list[int]:
    """n row indices drawn without replacement, each label getting its share of n (largest remainder), so the
    label rate is within 1/n of the full set's; sorted, so the sample keeps the file's order. CoLA's files are
    grouped by source, so their first n rows are neither a random nor a label-balanced sample."""
    if n >= len(labels):
        return list(range(len(labels)))
    classes = sorted(set(labels))
    by_class = {c: [i for i, y in enumerate(labels) if y == c] for c in classes}
    exact = {c: n * len(by_class[c]) / len(labels) for c in classes}
    quota = {c: int(exact[c]) for c in classes}
    for c in sorted(classes, key=lambda c: quota[c] - exact[c])[:n - sum(quota.values())]:
        quota[c] += 1
    rng = random.Random(seed)
    return sorted(i for c in classes for i in rng.sample(by_class[c], quota[c]))


def tokenize(name: str, sentences: list[str], labels: list[int], max_samples: int | None = None) -> Dataset:
    """Tokenize a split; with max_samples, a stratified sample of its rows (stratified_sample)."""
    rows = stratified_sample(labels, max_samples) if max_samples is not None else list(range(len(labels)))
    if not rows:
        raise UserError(f"the {name} set is empty" + (f" after --max_*_samples {max_samples}" if max_samples is not None else ""))
    sentences, labels = [sentences[i] for i in rows], [labels[i] for i in rows]
    enc = get_encoder()
    ids = enc.encode_ordinary_batch(sentences)
    return Dataset(name, sentences, ids, labels, rows)


def sample_record(data: dict[str, Dataset]) -> dict:
    """What metrics.json records of the rows each split used: their number and a SHA-256 of their indices."""
    return {"sample_seed": SAMPLE_SEED, **{name: {"rows": len(ds), "rows_sha256": hashlib.sha256(
        json.dumps(ds.rows).encode()).hexdigest()} for name, ds in data.items()}}


def load_cola(data_dir: str | Path, max_train_samples: int | None = None,
              max_eval_samples: int | None = None) -> dict[str, Dataset]:
    """Train, in-domain dev (model selection) and out-of-domain dev (reported only, never selected on)."""
    raw = ensure_cola(data_dir)
    out = {}
    for split, fname in SPLITS.items():
        limit = max_train_samples if split == "train" else max_eval_samples
        out[split] = tokenize(split, *read_tsv(raw / fname), max_samples=limit)
        if limit is not None and limit > len(out[split]):  # not silently fewer rows than asked for
            flag = "--max_train_samples" if split == "train" else "--max_eval_samples"
            print(f"note: {flag} {limit} is more than {split}'s {len(out[split])} rows: all of them are used")
    return out


@dataclass
class Batch:
    ids: torch.Tensor      # (B, T) right-padded with PAD_TOKEN
    lengths: torch.Tensor  # (B,) real tokens per row, >= 1
    labels: torch.Tensor   # (B,)
    index: torch.Tensor    # (B,) rows of the dataset, e.g. to look up cached teacher logits

    def to(self, device: torch.device) -> Batch:
        """ids, labels and index to `device`; lengths stay where they are (on the host, from collate): the student
        packs its sequences with them there (pack_padded_sequence reads them on the CPU, and reading them back
        from a GPU would wait for it every step), and GPT.classify copies them to its device itself."""
        nb = device.type == "cuda"
        ids, labels, index = (t.to(device, non_blocking=nb) for t in (self.ids, self.labels, self.index))
        return Batch(ids, self.lengths, labels, index)


def collate(ds: Dataset, rows: list[int]) -> Batch:
    lengths = [max(len(ds.ids[i]), 1) for i in rows]
    ids = torch.full((len(rows), max(lengths)), PAD_TOKEN, dtype=torch.long)
    for j, i in enumerate(rows):
        ids[j, :len(ds.ids[i])] = torch.tensor(ds.ids[i], dtype=torch.long)
    return Batch(ids, torch.tensor(lengths), torch.tensor([ds.labels[i] for i in rows]), torch.tensor(rows))


def batch_rows(lengths: list[int], batch_size: int, shuffle: bool, seed: int = 0, pool_batches: int = 32) -> list[list[int]]:
    """Group row indices into batches.

    Training (shuffle=True): shuffle, then sort by length within pools of `pool_batches` batches, cut into
    batches, and shuffle the batch order. Batches stay random but hold similar lengths, so little padding.
    Evaluation (shuffle=False): sorted by length, the least padding possible; order does not matter there.
    """
    if not shuffle:
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    pool = batch_size * pool_batches
    batches = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start:start + pool], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def epoch_seed(seed: int, epoch: int) -> int:
    """The shuffling seed of one epoch of a run. Not seed + epoch: then seeds s and s + 1 would share their
    epoch orders, shifted by one epoch. SeedSequence mixes (seed, epoch) into unrelated streams."""
    return int(np.random.SeedSequence([seed % 2**32, epoch]).generate_state(1)[0])


def iterate(ds: Dataset, batch_size: int, shuffle: bool, seed: int = 0) -> Iterator[Batch]:
    """Batches of ds; with shuffle, `seed` fixes the order (pass epoch_seed(seed, epoch) for each epoch)."""
    for rows in batch_rows([len(x) for x in ds.ids], batch_size, shuffle, seed):
        yield collate(ds, rows)


def lm_dataset(ds: Dataset) -> Dataset:
    """ds's sentences as language-model sequences, each `<|endoftext|> sentence <|endoftext|>`: the model learns
    how a sentence starts and where it ends, so sampling from `<|endoftext|>` alone gives whole sentences."""
    return Dataset(ds.name, ds.sentences, [[PAD_TOKEN, *x, PAD_TOKEN] for x in ds.ids], ds.labels, ds.rows)


def next_token_batch(batch: Batch) -> Batch:
    """A batch of lm_dataset sequences, ids (B, T) -> inputs (B, T - 1) whose labels are their next tokens
    (B, T - 1), -1 past each sequence's end. Padding is <|endoftext|>, the token a sentence ends with, so it is
    told apart by the lengths, never by its value: it is never scored."""
    targets = batch.ids[:, 1:].clone()  # (B, T - 1)
    past_end = torch.arange(targets.size(1))[None, :] >= (batch.lengths - 1)[:, None]  # (B, T - 1)
    targets[past_end] = -1
    return Batch(batch.ids[:, :-1], batch.lengths - 1, targets, batch.index)


def num_batches(ds: Dataset, batch_size: int) -> int:
    return -(-len(ds) // batch_size)
