"""Knowledge distillation (Hinton et al., 2015) of the LoRA-tuned GPT-2 into DistilRNN: the losses (Hinton's KL, or
Tang et al.'s MSE on logits), the teacher-logit cache, teacher ensembles and rule-based transfer-set augmentation.

The teacher is run once over the transfer set, under no_grad and the run's precision (its frozen weights
stored in the compute dtype, as train_lora.py stores them), and its logits are cached on disk, keyed by
the teacher's files, the data, the device type and the precision, so distillation epochs cost what
from-scratch epochs cost and a changed teacher never reuses stale logits.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from data import Batch, Dataset, tokenize
from errors import UserError
from lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, build_lora_classifier, read_adapter_config
from metrics import predict_logits
from precision import Precision, store_frozen_weights

UNLABELLED = -1  # label of augmented and generated sentences: they carry only the teacher's soft targets
KD_LOSSES = ("kl", "mse")

# The run settings that make a distilled student what it is, beyond the student itself (train_distil.py's flags,
# and the generator's files, recorded only when it is used): report.py compares a distilled student with the
# label-trained student whose settings equal its own outside these.
DISTILLATION_KEYS = ("mode", "teacher", "temperature", "alpha", "kd_loss", "augment", "generator", "generate",
                     "gen_temperature", "gen_top_k", "gen_top_p", "gen_max_tokens", "gen_batch_size", "gen_seed",
                     "generator_fingerprint", "seed")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float,
            alpha: float, kind: str = "kl") -> torch.Tensor:
    """kind "kl" (Hinton et al.): alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, labels).
    kind "mse" (Tang et al. 2019): alpha * MSE(s, t) + (1 - alpha) * CE(s, labels), the raw logits compared, no
    temperature.

    KL takes the student's log-probabilities and, with log_target, the teacher's; "batchmean" is the true
    KL per example. T^2 keeps the soft-target gradients on the same scale whatever T (Hinton et al.). MSE is
    the mean over rows and classes (torch's MSELoss, as the public reruns of Tang et al. use).
    The hard term averages over labelled rows only (augmented and generated rows have label UNLABELLED).
    """
    if kind == "mse":
        soft = F.mse_loss(student_logits, teacher_logits)
    else:
        T = temperature
        soft = F.kl_div(F.log_softmax(student_logits / T, dim=-1), F.log_softmax(teacher_logits / T, dim=-1),
                        reduction="batchmean", log_target=True) * (T * T)
    labelled = labels != UNLABELLED
    hard = F.cross_entropy(student_logits[labelled], labels[labelled]) if labelled.any() else soft.new_zeros(())
    return alpha * soft + (1 - alpha) * hard


def loss_name(kind: str, temperature: float, alpha: float) -> str:
    """What a distillation run's training loss is, for its curves' label (recorded in metrics.json)."""
    if kind == "mse":
        return f"MSE distillation loss: {alpha:g} MSE(logits) + {1 - alpha:g} CE"
    return f"KD loss: {alpha:g} T² KL (T = {temperature:g}) + {1 - alpha:g} CE"


def make_kd_loss(teacher_logits: torch.Tensor, temperature: float, alpha: float, kind: str = "kl"):
    """The training loss for trainer.fit: looks up each row's cached teacher logits by its dataset index. The
    table is copied to the student's device once, at its first batch, not every step."""
    table = {}

    def loss_fn(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        if logits.device not in table:
            table[logits.device] = teacher_logits.to(logits.device)  # (N, n_classes)
        return kd_loss(logits, table[logits.device][batch.index], batch.labels, temperature, alpha, kind)
    return loss_fn


# ---------------------------------------------------------------- transfer-set augmentation (Tang et al., 2019)

def perturb(words: list[str], rng: random.Random, p_drop: float = 0.1, p_swap: float = 0.1,
            p_ngram: float = 0.25) -> list[str]:
    """One perturbed copy of a sentence: with probability p_ngram an n-gram crop (n in 1..5); otherwise
    each word is dropped with p_drop and neighbours are swapped with p_swap. Never empty."""
    if len(words) > 1 and rng.random() < p_ngram:
        n = rng.randint(1, min(5, len(words)))
        start = rng.randint(0, len(words) - n)
        return words[start:start + n]
    out = [w for w in words if rng.random() >= p_drop] or [rng.choice(words)]
    for i in range(len(out) - 1):
        if rng.random() < p_swap:
            out[i], out[i + 1] = out[i + 1], out[i]
    return out


def augment(train: Dataset, copies: int, seed: int) -> Dataset:
    """train followed by `copies` perturbed copies of each sentence, labelled UNLABELLED: the teacher's
    soft targets are their only supervision. Copies identical to their source are perturbed again."""
    if copies == 0:
        return train
    rng = random.Random(seed)
    extra = []
    for s in train.sentences:
        words = s.split()
        for _ in range(copies):
            for _ in range(10):
                new = " ".join(perturb(words, rng))
                if new != s:
                    break
            extra.append(new)
    aug = tokenize("augmented", extra, [UNLABELLED] * len(extra))
    return Dataset("train+augmented", train.sentences + aug.sentences, train.ids + aug.ids, train.labels + aug.labels)


# ---------------------------------------------------------------- the teacher-logit cache

def teacher_fingerprint(teacher_dir: str | Path, objective: str = "cls") -> str:
    """Identifies the teacher (or, objective "lm", a language-model run): its adapter weights and config, and its
    base model (a hub name, or for a local directory the size and modification time of each file in it)."""
    teacher_dir = Path(teacher_dir)
    h = hashlib.sha256()
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        h.update((teacher_dir / name).read_bytes())
    base = Path(read_adapter_config(teacher_dir, objective)["gpt_variant"])
    if base.is_dir():
        for f in sorted(base.iterdir()):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def data_fingerprint(ds: Dataset) -> str:
    return hashlib.sha256(json.dumps(ds.ids).encode()).hexdigest()


def cache_key(teacher_key: str, ds: Dataset, device: torch.device, precision: Precision) -> str:
    """The cache entry of one dataset's teacher logits: logits computed on other devices or in other
    precisions differ, so they never share one."""
    parts = (teacher_key, data_fingerprint(ds), device.type, precision.name)
    return hashlib.sha256(":".join(parts).encode()).hexdigest()[:24]


def teacher_logits(teacher_dir: str | Path, datasets: dict[str, Dataset], cache_dir: str | Path, batch_size: int,
                   device: torch.device, precision: Precision, base: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Teacher logits (N, n_classes) for each dataset: from the cache when the teacher and data match,
    otherwise one no_grad forward pass per sentence, then written to the cache.

    `base`, the teacher's base GPT-2 if the caller has it loaded already, becomes the teacher on a cache miss
    (see lora.build_lora_classifier) instead of a second copy being loaded."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    teacher_key = teacher_fingerprint(teacher_dir)
    paths = {name: cache_dir / f"teacher_{cache_key(teacher_key, ds, device, precision)}.safetensors"
             for name, ds in datasets.items()}
    out = {name: load_file(str(p))["logits"] for name, p in paths.items() if p.is_file()}
    missing = [name for name in datasets if name not in out]
    if missing:
        with torch.random.fork_rng(devices=[]):  # its random inits must not shift the run's RNG: a cache hit
            teacher, _ = build_lora_classifier(teacher_dir, base)  # and a miss give the student the same dropout
        store_frozen_weights(teacher, precision.dtype)
        teacher.to(device)
        for name in missing:
            out[name] = predict_logits(teacher, datasets[name], batch_size, device, precision,
                                       desc=f"teacher on {name}")
            tmp = paths[name].with_name(paths[name].name + ".tmp")
            save_file({"logits": out[name].contiguous()}, str(tmp))
            os.replace(tmp, paths[name])
        del teacher
    else:
        print(f"teacher logits from cache {cache_dir}")
    return out


def check_teachers(teacher_dirs: list[str]) -> str:
    """The teachers of an ensemble must read sentences the same way: one base GPT-2 (hence one tokenizer and
    vocabulary) and one set of classes. Returns that base; anything else is refused in one line."""
    configs = {d: read_adapter_config(d) for d in teacher_dirs}
    first, cfg0 = next(iter(configs.items()))
    for d, cfg in configs.items():
        for key in ("gpt_variant", "vocab_size", "n_classes"):
            if cfg.get(key) != cfg0.get(key):
                raise UserError(f"--teacher: {d} has {key} {cfg.get(key)!r} but {first} has {cfg0.get(key)!r}; the "
                                "teachers of an ensemble must share their base GPT-2 and tokenizer")
    return cfg0["gpt_variant"]


def ensemble_logits(teacher_dirs: list[str], datasets: dict[str, Dataset], cache_dir: str | Path, batch_size: int,
                    device: torch.device, precision: Precision,
                    base: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The mean of the teachers' logits (N, n_classes) for each dataset, each teacher's logits cached on their
    own (teacher_logits), so a teacher shared by several ensembles runs once. One teacher: its own logits.
    `base` becomes the first teacher only (a cache miss injects that teacher's LoRA into it)."""
    per_teacher = [teacher_logits(d, datasets, cache_dir, batch_size, device, precision, base if i == 0 else None)
                   for i, d in enumerate(teacher_dirs)]
    return {name: torch.stack([t[name] for t in per_teacher]).mean(0) for name in datasets}  # (K, N, C) -> (N, C)


def agreement(student: nn.Module, ds: Dataset, teacher: torch.Tensor, batch_size: int, device: torch.device,
              precision: Precision) -> float:
    """Fraction of sentences on which the student predicts the teacher's class."""
    s = predict_logits(student, ds, batch_size, device, precision)
    return float((s.argmax(-1) == teacher.argmax(-1)).float().mean())
