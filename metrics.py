"""Scoring a classifier on a dataset: its logits in dataset order, accuracy, Matthews correlation (CoLA's
official metric), the rate of predicted 1s, and whether it collapsed to one class; and a language model's
next-token loss and perplexity on a dataset's sentences.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from data import Dataset, iterate, next_token_batch, num_batches
from precision import Precision


def matthews_corrcoef(preds: torch.Tensor, labels: torch.Tensor) -> float:
    """CoLA's official metric. 0 for a constant predictor, whatever its accuracy."""
    p, y = preds.long(), labels.long()
    tp = float(((p == 1) & (y == 1)).sum()); tn = float(((p == 0) & (y == 0)).sum())
    fp = float(((p == 1) & (y == 0)).sum()); fn = float(((p == 0) & (y == 1)).sum())
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denom if denom > 0 else 0.0


def summarize(preds: torch.Tensor, labels: torch.Tensor) -> dict:
    pos_rate = float(preds.float().mean())
    return {"acc": float((preds == labels).float().mean()), "mcc": matthews_corrcoef(preds, labels),
            "pos_rate": pos_rate, "collapsed": pos_rate in (0.0, 1.0)}


def describe(stats: dict, majority_acc: float) -> str:
    s = f"acc {stats['acc']:.4f} mcc {stats['mcc']:.4f} (majority baseline acc {majority_acc:.4f})"
    if stats["collapsed"]:
        s += f" COLLAPSED: predicts only class {int(stats['pos_rate'])}"
    return s


@torch.no_grad()
def predict_logits(model: nn.Module, ds: Dataset, batch_size: int, device: torch.device, precision: Precision,
                   desc: str | None = None) -> torch.Tensor:
    """Logits (N, n_classes) in float32, in dataset order, computed under `precision` (the run's: a model whose
    frozen weights are stored in its compute dtype needs its autocast); gathered on the device, copied back once."""
    was_training = model.training
    model.eval()
    out = None
    for batch in tqdm(iterate(ds, batch_size, shuffle=False), total=num_batches(ds, batch_size), desc=desc,
                      leave=False, disable=desc is None):
        batch = batch.to(device)
        with precision.autocast():
            logits = model.classify(batch.ids, batch.lengths).float()  # (B, n_classes)
        if out is None:
            out = logits.new_empty(len(ds), logits.size(1))
        out[batch.index] = logits
    model.train(was_training)
    return out.cpu()


def evaluate(model: nn.Module, ds: Dataset, batch_size: int, device: torch.device, precision: Precision,
             desc: str | None = None) -> dict:
    """Loss (cross-entropy against the gold labels), accuracy, MCC, the rate of predicted 1s, and `probs`:
    each sentence's P(label 1), (N,) float64, for save_predictions."""
    logits = predict_logits(model, ds, batch_size, device, precision, desc)
    labels = torch.tensor(ds.labels)
    return {"loss": F.cross_entropy(logits, labels).item(), **summarize(logits.argmax(-1), labels),
            "probs": logits.double().softmax(-1)[:, 1]}


def prior_loss(ds: Dataset) -> float:
    """Cross-entropy of always predicting the label frequencies: the loss a model learns for free."""
    p = sum(ds.labels) / len(ds)
    return -sum(q * math.log(q) for q in (p, 1 - p) if q > 0)


@torch.no_grad()
def evaluate_lm(model: nn.Module, ds: Dataset, batch_size: int, device: torch.device, precision: Precision,
                desc: str | None = None) -> dict:
    """A language model on ds (data.lm_dataset sequences): the next-token loss, averaged over every scored
    token of the set (not over batches), and its perplexity exp(loss)."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    tokens = 0
    for batch in tqdm(iterate(ds, batch_size, shuffle=False), total=num_batches(ds, batch_size), desc=desc,
                      leave=False, disable=desc is None):
        batch = next_token_batch(batch).to(device)
        with precision.autocast():
            logits = model(batch.ids)[0].float()  # (B, T, vocab)
        total += F.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), ignore_index=-1, reduction="sum")
        tokens += int((batch.labels >= 0).sum())
    model.train(was_training)
    loss = total.item() / tokens
    return {"loss": loss, "ppl": math.exp(loss)}
