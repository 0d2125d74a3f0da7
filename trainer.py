"""The training loop both scripts share: fit (optimizer, schedule, per-epoch evaluation, best-epoch saving)
and its resumable checkpoints. What is trained is an Objective: CLASSIFY (both models expose
`classify(ids, lengths) -> logits (B, n_classes)`, and the epoch with the best dev MCC is kept) or
LANGUAGE_MODEL (GPT-2's next-token loss on each sentence; the epoch with the lowest dev loss is kept).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from cli import CHECKPOINT, METRICS, PREDICTIONS, complete_config
from data import Batch, Dataset, epoch_seed, iterate, next_token_batch, num_batches
from errors import UserError
from metrics import describe, evaluate, evaluate_lm, prior_loss
from optim import AdamW
from precision import Precision
from report import plot_curves
from train_step import EagerStep, FixedShapeStep, RunningMetrics

SYNC_EVERY = 50  # steps between reads of the device-side metrics (progress bar, non-finite loss check)
LossFn = Callable[[torch.Tensor, Batch], torch.Tensor]


@dataclass(frozen=True)
class Objective:
    """What fit trains and how it chooses the epoch it keeps. The loss itself is fit's loss_fn.

    forward(model) is what a step calls: (ids, lengths) -> logits. prepare turns a batch of the training set
    into the step's batch. evaluate(model, dev set, args, device, precision) -> the epoch's dev scores: each
    becomes a val_* key of the epoch's record; "probs", if there, goes to predictions.json instead. The kept
    epoch has the highest (or lowest) record[select]. baselines(dev set) -> what metrics.json records beside the
    epochs. line(record, dev set) -> the epoch's progress line after "epoch N: "."""
    name: str
    forward: Callable[[nn.Module], Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]
    prepare: Callable[[Batch], Batch]
    evaluate: Callable[[nn.Module, Dataset, argparse.Namespace, torch.device, Precision], dict]
    select: str
    higher_is_better: bool
    baselines: Callable[[Dataset], dict]
    line: Callable[[dict, Dataset], str]


CLASSIFY = Objective(
    name="cls",
    forward=lambda model: model.classify,
    prepare=lambda batch: batch,
    evaluate=lambda model, ds, args, device, precision: evaluate(model, ds, args.eval_batch_size, device, precision,
                                                                 desc="dev"),
    select="val_mcc", higher_is_better=True,
    baselines=lambda ds: {"majority_baseline": {"val_acc": ds.majority_acc, "val_loss": prior_loss(ds)}},
    line=lambda r, ds: (f"train loss {r['train_loss']:.4f} acc {r['train_acc']:.4f} | dev loss {r['val_loss']:.4f} "
                        + describe({k[4:]: v for k, v in r.items() if k.startswith("val_")}, ds.majority_acc)),
)
# Sequences are data.lm_dataset's. Its logits span the vocabulary, so dev batches are --batch_size rows, as in
# training, not --eval_batch_size. train_acc is then next-token accuracy.
LANGUAGE_MODEL = Objective(
    name="lm",
    forward=lambda model: lambda ids, lengths: model(ids)[0],  # (B, T, vocab)
    prepare=next_token_batch,
    evaluate=lambda model, ds, args, device, precision: evaluate_lm(model, ds, args.batch_size, device, precision,
                                                                    desc="dev"),
    select="val_loss", higher_is_better=False,
    baselines=lambda ds: {},
    line=lambda r, ds: (f"train loss {r['train_loss']:.4f} next-token acc {r['train_acc']:.4f} | dev loss "
                        f"{r['val_loss']:.4f} perplexity {r['val_ppl']:.2f}"),
)


# ---------------------------------------------------------------- checkpoints (safetensors + JSON, no pickle)

def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], state: dict) -> None:
    """One safetensors file, the JSON state in its metadata; written to a temp file and renamed, so a kill
    mid-write leaves the previous checkpoint intact."""
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={"state": json.dumps(state)})
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            state = json.loads((f.metadata() or {})["state"])
        return load_file(str(path)), state
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e}); delete it, or start "
                        "afresh without --resume") from None


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, keys = {}, {}
    for pid, st in sd["state"].items():
        keys[str(pid)] = list(st)
        for k, v in st.items():
            tensors[f"optim.{pid}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return tensors, {"param_groups": sd["param_groups"], "state_keys": keys}


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state = {int(pid): {k: tensors[f"optim.{pid}.{k}"] for k in ks} for pid, ks in meta["state_keys"].items()}
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_states(device: torch.device) -> dict[str, torch.Tensor]:
    """The generators a resumed run must continue: the CPU one (shuffling, and dropout on CPU) and, when training
    on CUDA or MPS, that device's (dropout there)."""
    states = {"rng.cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["rng.cuda"] = torch.cuda.get_rng_state(device)
    if device.type == "mps":
        states["rng.mps"] = torch.mps.get_rng_state()
    return states


def restore_rng_states(tensors: dict[str, torch.Tensor], device: torch.device, ckpt_path: Path) -> None:
    """Put back what rng_states saved. A checkpoint written off CUDA holds no CUDA state: resuming it on CUDA
    says that dropout there draws afresh instead of failing."""
    torch.set_rng_state(tensors["rng.cpu"])
    if device.type == "mps" and "rng.mps" in tensors:  # a checkpoint written before it was saved lacks it
        torch.mps.set_rng_state(tensors["rng.mps"])
    if device.type != "cuda":
        return
    if "rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)
    else:
        print(f"note: {ckpt_path} holds no CUDA generator state (written off CUDA): dropout draws afresh")


# ---------------------------------------------------------------- the loop

def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> AdamW:
    """AdamW (optim.AdamW: lazy rows for a sparse gradient). Matrices are decayed; vectors (biases, norms) and
    embeddings are not: decay would shrink the embedding rows of tokens that never occur in training, and those
    tokens do occur at test time."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if p.dim() >= 2 and not n.endswith("wte.weight")]
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": [p for n, p in named if all(p is not q for q in decay)], "weight_decay": 0.0}]
    fused = named[0][1].device.type in ("cpu", "cuda")  # one kernel for all tensors: ~5x faster on a 40M embedding
    return AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=fused)


def warmup_linear(total_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear warmup, then linear decay to zero (the LoRA paper's GLUE schedule)."""
    warmup = int(total_steps * warmup_ratio)

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))
    return f


def resume_mismatch(ckpt_path: Path, state: dict, config: dict) -> str:
    """Why --resume refuses a checkpoint written with another config. --epochs alone gets its own reason: the
    learning rate decays to 0 over the planned epochs, so a run cannot be extended or shortened."""
    saved, config = complete_config(state["config"]), complete_config(config)
    diff = sorted(k for k in set(config) | set(saved) if config.get(k) != saved.get(k))
    if diff != ["epochs"]:
        return f"--resume: {ckpt_path} was written with a different config ({', '.join(diff)} differ)"
    done, planned = len(state["metrics"]["epochs"]), saved["epochs"]
    what = "a finished run" if done == planned else f"a run planned for {planned} epochs"
    return (f"--resume --epochs {config['epochs']}: {ckpt_path} is {what} ({done} of {planned} epochs done), and "
            f"a run cannot be extended or shortened: its learning rate decays to 0 over the epochs it was started "
            f"with. Resume with --epochs {planned}, or train a new run with --epochs {config['epochs']} "
            "(another --out_dir, or --overwrite)")


@contextlib.contextmanager
def ctrl_c_after_saving():
    """Ctrl-C while an epoch's files are written takes effect once they are all written, so that metrics.json,
    the best weights and the checkpoint never disagree about the last epoch. Only where Ctrl-C would raise
    KeyboardInterrupt anyway (the main thread, Python's default handler)."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    pressed = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pressed.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pressed:
        raise KeyboardInterrupt


def fit(model: nn.Module, train_ds: Dataset, val_ds: Dataset, loss_fn: LossFn, args: argparse.Namespace,
        config: dict, run_name: str, save_best: Callable[[], None], precision: Precision,
        cuda_graphs: bool = False, objective: Objective = CLASSIFY, loss_name: str | None = None) -> dict:
    """Train `objective` for args.epochs under `precision`, evaluating on val_ds after each epoch.

    The loop never waits for the device: loss, accuracy, the first non-finite loss and the steps the fp16 loss
    scaler skipped are summed there and read every SYNC_EVERY steps. (A teacher step has no host sync; a student
    step has one, its sparse gradient's coalesce(): docs/precision.md.) cuda_graphs: the fixed-shape step
    (train_step.FixedShapeStep), graphed on CUDA (not with fp16, which it cannot scale); its loss must ignore
    label -100 (CLASSIFY only). After every epoch: metrics.json, the curves in out_dir (report.plot_curves),
    save_best() and the dev predictions if the epoch is the best so far (objective.select), and a resumable checkpoint (trainable weights, optimizer, scheduler, loss
    scaler, RNG). loss_name: what loss_fn is, recorded in metrics.json for the curves. Returns the metrics dict.
    """
    device = next(model.parameters()).device
    out_dir = Path(args.out_dir)
    trainable = {k: p for k, p in model.named_parameters() if p.requires_grad}
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    steps_per_epoch = num_batches(train_ds, args.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear(args.epochs * steps_per_epoch, args.warmup_ratio))
    metrics = {"config": config, **objective.baselines(val_ds), "epochs": [], "best_epoch": None, "best": None}

    scaler = precision.make_scaler()
    ckpt_path = out_dir / CHECKPOINT
    if args.resume:
        tensors, state = load_checkpoint(ckpt_path)
        if complete_config(state["config"]) != complete_config(config):  # a key an older run lacks: its default
            raise UserError(resume_mismatch(ckpt_path, state, config))
        with torch.no_grad():
            for k, p in trainable.items():
                p.copy_(tensors[f"model.{k}"])
        load_optimizer(optimizer, tensors, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler.is_enabled():
            scaler.load_state_dict(state["scaler"])  # its scale and growth tracker, where the run stopped
        restore_rng_states(tensors, device, ckpt_path)
        metrics = {**state["metrics"], "config": config}  # the config as this version records it
        print(f"resumed from {ckpt_path} after epoch {len(metrics['epochs'])}")
    if loss_name is not None:  # what the training loss is, for the curves' label (report.py); also on a resumed
        metrics["loss_name"] = loss_name  # run written before it was recorded

    running = RunningMetrics(device)
    if cuda_graphs and device.type == "cuda" and not precision.loss_scaling and objective is CLASSIFY:
        if args.compile:
            print("--compile is ignored with --cuda_graphs: the step is captured as CUDA graphs, not compiled")
        train_step = FixedShapeStep(model, loss_fn, optimizer, args.grad_clip, args.batch_size, running, device,
                                    precision, graphs=True)
    else:
        if cuda_graphs and device.type != "cuda":
            print(f"--cuda_graphs is ignored on {device.type} (CUDA only): training eagerly")
        elif cuda_graphs:
            print("--cuda_graphs does not support fp16 (its loss scaling is not graphed): training eagerly; "
                  "--precision bf16 or fp32 can be graphed")
        forward = objective.forward(model)
        forward = torch.compile(forward, dynamic=True) if args.compile else forward
        train_step = EagerStep(forward, loss_fn, optimizer, args.grad_clip, running, device, precision, scaler)
    compiling = args.compile and isinstance(train_step, EagerStep)  # the eager step is the compiled one
    for epoch in range(len(metrics["epochs"]) + 1, args.epochs + 1):
        model.train()
        t0 = time.time()
        running.reset()
        batches = iterate(train_ds, args.batch_size, shuffle=True, seed=epoch_seed(args.seed, epoch))
        bar = tqdm(batches, total=steps_per_epoch,
                   desc=f"{run_name} epoch {epoch}/{args.epochs}", leave=False)
        for step, batch in enumerate(bar, start=1):
            batch = objective.prepare(batch)
            if compiling:  # torch.compile compiles on the first call: say so, it can take a minute
                tqdm.write("--compile: compiling the model on the first step (numerics differ slightly from eager)")
                t_compile = time.time()
            train_step(batch)
            if compiling:
                running.read()  # waits for the device: the step, compilation included, is done
                tqdm.write(f"--compile: compiled in {time.time() - t_compile:.1f}s")
                compiling = False
            scheduler.step()
            if step % SYNC_EVERY == 0 or step == steps_per_epoch:
                so_far = running.read()  # fit's only wait for the device within an epoch
                if so_far["bad_step"]:
                    kept = (f"The last good checkpoint ({ckpt_path}, epoch {len(metrics['epochs'])}) is kept"
                            if metrics["epochs"] else "No epoch was completed, so no checkpoint was written")
                    raise UserError(f"loss is {so_far['bad_loss']} at epoch {epoch} step {so_far['bad_step']}; "
                                    f"stopped. {kept}: try a lower --lr")
                bar.set_postfix(loss=f"{so_far['loss']:.4f}", acc=f"{so_far['acc']:.3f}")
        val = objective.evaluate(model, val_ds, args, device, precision)
        record = {"epoch": epoch, "train_loss": so_far["loss"], "train_acc": so_far["acc"],
                  "skipped_steps": so_far["skipped"], **{f"val_{k}": v for k, v in val.items() if k != "probs"},
                  "lr": scheduler.get_last_lr()[0]}
        with ctrl_c_after_saving():  # once this line is printed, the epoch is saved, whatever Ctrl-C does
            metrics["epochs"].append(record)
            print(f"epoch {epoch}: {objective.line(record, val_ds)} | {time.time() - t0:.1f}s")
            if metrics["best"] is None or is_better(record, metrics["best"], objective):
                metrics["best_epoch"], metrics["best"] = epoch, record
                save_best()
                if "probs" in val:
                    save_predictions(out_dir, "dev", val_ds, val["probs"], epoch)
            write_json(out_dir / METRICS, metrics)
            plot_curves(metrics, run_name, out_dir)
            tensors = {f"model.{k}": p for k, p in trainable.items()}
            opt_tensors, opt_meta = optimizer_tensors(optimizer)
            tensors.update(opt_tensors)
            tensors.update(rng_states(device))
            save_checkpoint(ckpt_path, tensors, {"config": config, "optimizer": opt_meta,
                                                 "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                                                 "metrics": metrics})
    return metrics


def is_better(record: dict, best: dict, objective: Objective) -> bool:
    """Strictly better on objective.select: of equal epochs, the first is kept."""
    new, old = record[objective.select], best[objective.select]
    return new > old if objective.higher_is_better else new < old


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def save_predictions(out_dir: Path, split: str, ds: Dataset, probs: torch.Tensor, epoch: int) -> None:
    """out_dir/predictions.json[split]: the best epoch's predicted P(label 1) of each sentence (float64, so
    P > 0.5 is exactly the argmax), with its file row and gold label; report.py bootstraps from it. The dev
    split starts the file afresh (a new best epoch); the out-of-domain split is added to it."""
    path = out_dir / PREDICTIONS
    saved = json.loads(path.read_text()) if split != "dev" and path.is_file() else {}
    saved[split] = {"epoch": epoch, "rows": ds.rows, "labels": ds.labels, "p1": probs.tolist()}
    write_json(path, saved)


def report_ood(metrics: dict, model: nn.Module, ood_ds: Dataset, batch_size: int, device: torch.device,
               precision: Precision, out_dir: Path) -> None:
    """Score the best checkpoint on out-of-domain dev: reported, never used to choose an epoch."""
    stats = evaluate(model, ood_ds, batch_size, device, precision, desc="ood dev")
    save_predictions(Path(out_dir), "ood_dev", ood_ds, stats.pop("probs"), metrics["best_epoch"])
    metrics["ood_dev"] = {**stats, "majority_acc": ood_ds.majority_acc}
    print(f"best epoch {metrics['best_epoch']}: dev {describe({k[4:]: v for k, v in metrics['best'].items() if k.startswith('val_')}, metrics['majority_baseline']['val_acc'])}")
    print(f"out-of-domain dev: {describe(stats, ood_ds.majority_acc)}")
