"""What train_lora.py and train_distil.py share: flags, the training loop, metrics, resumable checkpoints
and saved predictions (report.py draws the plots). Both models expose `classify(ids, lengths) -> logits
(B, n_classes)`, which is all the loop needs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from data import Batch, Dataset, epoch_seed, iterate, num_batches
from errors import UserError
from train_step import EagerStep, FixedShapeStep, RunningMetrics, autocast

CHECKPOINT = "checkpoint.safetensors"
METRICS = "metrics.json"
PREDICTIONS = "predictions.json"
SYNC_EVERY = 50  # steps between reads of the device-side metrics (progress bar, non-finite loss check)
LossFn = Callable[[torch.Tensor, Batch], torch.Tensor]


# ---------------------------------------------------------------- command line

# Directories this process created for a run's outputs: run_cli removes the ones left empty, so a run that fails
# before writing anything leaves nothing behind.
_created_dirs: list[Path] = []


def make_dirs(path: Path) -> None:
    """mkdir -p, remembering which directories it created."""
    new = [p for p in (path, *path.parents) if not p.exists()]
    path.mkdir(parents=True, exist_ok=True)
    _created_dirs.extend(new)


def run_cli(main: Callable[[], None], args: argparse.Namespace | None = None) -> None:
    """Run a script's main: a UserError becomes one line on stderr and exit status 2, no traceback. On Ctrl-C
    it says what args.out_dir's checkpoint holds. Output directories the run created and left empty are removed."""
    first = len(_created_dirs)
    try:
        try:
            main()
        finally:
            for d in sorted(_created_dirs[first:], key=lambda d: len(d.parts), reverse=True):
                with contextlib.suppress(OSError):  # not empty: it holds outputs
                    d.rmdir()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"interrupted: {saved_epochs(args)}", file=sys.stderr)
        sys.exit(130)


def saved_epochs(args: argparse.Namespace | None) -> str:
    """What an interrupted run leaves to continue from, read from its checkpoint, not assumed."""
    if args is None:
        return "nothing is saved"
    path = Path(args.out_dir) / CHECKPOINT
    if not path.is_file():
        return "no epoch was completed, so nothing was saved; run the same command again to start afresh"
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            done = len(json.loads(f.metadata()["state"])["metrics"]["epochs"])
    except (SafetensorError, OSError, KeyError, ValueError, TypeError):
        return f"{path} cannot be read, so no epoch can be continued from it"
    return f"epoch {done} of {args.epochs} is saved in {path}; continue with the same command and --resume"


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps each script's docstring as written and shows every default: on/off for a flag that takes
    no value; a flag whose default is None says in its own help what leaving it out does."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or not action.option_strings:
            return action.help
        if isinstance(action.default, bool):
            return f"{action.help} (default: {'on' if action.default else 'off'})"
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the one-line error style of the rest of the scripts (no usage dump on a bad flag), and
    every default in --help."""

    def __init__(self, **kwargs):
        super().__init__(**{"formatter_class": HelpFormatter, **kwargs})

    def error(self, message: str):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _checked(kind: type, test: Callable[[float], bool], what: str) -> Callable[[str], float]:
    def parse(s: str):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not a {kind.__name__}") from None
        if not test(v):
            raise argparse.ArgumentTypeError(f"{s} must be {what}")
        return v
    return parse


positive_int = _checked(int, lambda v: v > 0, "> 0")
nonneg_int = _checked(int, lambda v: v >= 0, ">= 0")
positive_float = _checked(float, lambda v: v > 0 and math.isfinite(v), "> 0")
nonneg_float = _checked(float, lambda v: v >= 0 and math.isfinite(v), ">= 0")
unit_float = _checked(float, lambda v: 0 <= v <= 1, "in [0, 1]")
dropout_float = _checked(float, lambda v: 0 <= v < 1, "in [0, 1)")


def add_common_args(p: argparse.ArgumentParser, *, out_dir: str, epochs: int, lr: float, batch_size: int,
                    weight_decay: float, warmup_ratio: float) -> None:
    """Flags both scripts take, with each script's own defaults."""
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=positive_int, default=epochs, help="passes over the training set")
    g.add_argument("--lr", type=positive_float, default=lr, help="peak learning rate (AdamW)")
    g.add_argument("--batch_size", type=positive_int, default=batch_size, help="sentences per step")
    g.add_argument("--eval_batch_size", type=positive_int, default=256,
                   help="batch size of forward-only passes: dev evaluation (and the teacher pass)")
    g.add_argument("--weight_decay", type=nonneg_float, default=weight_decay,
                   help="AdamW's, on weight matrices (not on biases, norms or embeddings)")
    g.add_argument("--warmup_ratio", type=unit_float, default=warmup_ratio,
                   help="fraction of steps of linear warmup; the rest decays linearly to 0")
    g.add_argument("--grad_clip", type=nonneg_float, default=1.0, help="max gradient norm, 0 to disable")
    g.add_argument("--seed", type=int, default=1337, help="seeds initialisation, shuffling and dropout")
    g = p.add_argument_group("placement and I/O")
    g.add_argument("--device", default="auto", help="auto picks cuda, then mps, then cpu")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA)")
    g.add_argument("--data_dir", default="data", help="CoLA is downloaded and extracted here")
    g.add_argument("--out_dir", default=out_dir, help="metrics, best weights and checkpoint of this run")
    g.add_argument("--plots_dir", default="plots", help="training curves")
    g.add_argument("--resume", action="store_true", help="continue from the last completed epoch in --out_dir")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out_dir (its files are removed first)")
    g.add_argument("--max_train_samples", type=nonneg_int, default=None,
                   help="use N training rows: a stratified sample, the same whatever --seed (default: all)")
    g.add_argument("--max_eval_samples", type=nonneg_int, default=None,
                   help="use N rows of each dev set: a stratified sample, the same whatever --seed (default: all)")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device (try auto, cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: MPS is not available on this machine")
    return device


def check_writable(path: str | Path, flag: str) -> Path:
    """Fail now, not after an hour of training, if an output directory cannot be written."""
    path = Path(path)
    try:
        make_dirs(path)
        probe = path / f".write_test_{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{flag} {path} is not writable: {e.strerror or e}") from None
    return path


def prepare_outputs(args: argparse.Namespace, weights: tuple[str, ...]) -> None:
    """Check, before any model is loaded, that the run can write its outputs, can resume if asked to, and
    replaces an earlier run in --out_dir only if asked to (--overwrite, which removes that run's files first,
    so no stale checkpoint or weights outlive it). `weights`: the file names of the script's best weights."""
    out_dir = Path(args.out_dir)
    if args.resume and args.overwrite:
        raise UserError("--resume continues the run in --out_dir, --overwrite replaces it: pass one of them")
    names = (METRICS, PREDICTIONS, CHECKPOINT, *weights)
    earlier = [n for n in names if (out_dir / n).is_file()]
    if earlier and not (args.resume or args.overwrite):
        raise UserError(f"--out_dir {out_dir} already holds a run ({', '.join(earlier)}): pass --resume to "
                        "continue it, --overwrite to replace it, or another --out_dir")
    if args.overwrite:
        for path in [out_dir / n for n in names] + [out_dir / f"{n}.tmp" for n in names]:
            try:
                path.unlink(missing_ok=True)
            except OSError as e:
                raise UserError(f"--overwrite: {path} cannot be removed: {e.strerror or e}") from None
        if earlier:
            print(f"--overwrite: removed {', '.join(earlier)} from {out_dir}")
    check_writable(out_dir, "--out_dir")
    check_writable(args.plots_dir, "--plots_dir")
    if args.resume and not (out_dir / CHECKPOINT).is_file():
        raise UserError(f"--resume: no checkpoint at {out_dir / CHECKPOINT}; run without --resume to start")


def print_outputs(**files: list[Path]) -> None:
    """End a run by saying where it wrote what: one line per kind, naming only files that exist."""
    for kind, paths in files.items():
        found = [str(p) for p in paths if p.is_file()]
        if found:
            print(f"{kind}: {', '.join(found)}")


def run_config(args: argparse.Namespace) -> dict:
    """The flags that define a run's results (recorded in metrics.json, compared on --resume)."""
    skip = {"resume", "overwrite", "cuda_graphs", "eval_batch_size", "device", "compile", "out_dir", "plots_dir",
            "data_dir", "export_peft"}
    return json.loads(json.dumps({k: v for k, v in vars(args).items() if k not in skip}))


# ---------------------------------------------------------------- metrics

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
def predict_logits(model: nn.Module, ds: Dataset, batch_size: int, device: torch.device,
                   desc: str | None = None) -> torch.Tensor:
    """Logits (N, n_classes) in float32, in dataset order; gathered on the device, copied back once."""
    was_training = model.training
    model.eval()
    out = None
    for batch in tqdm(iterate(ds, batch_size, shuffle=False), total=num_batches(ds, batch_size), desc=desc,
                      leave=False, disable=desc is None):
        batch = batch.to(device)
        with autocast(device):
            logits = model.classify(batch.ids, batch.lengths).float()  # (B, n_classes)
        if out is None:
            out = logits.new_empty(len(ds), logits.size(1))
        out[batch.index] = logits
    model.train(was_training)
    return out.cpu()


def evaluate(model: nn.Module, ds: Dataset, batch_size: int, device: torch.device, desc: str | None = None) -> dict:
    """Loss (cross-entropy against the gold labels), accuracy, MCC, the rate of predicted 1s, and `probs`:
    each sentence's P(label 1), (N,) float64, for save_predictions."""
    logits = predict_logits(model, ds, batch_size, device, desc)
    labels = torch.tensor(ds.labels)
    return {"loss": F.cross_entropy(logits, labels).item(), **summarize(logits.argmax(-1), labels),
            "probs": logits.double().softmax(-1)[:, 1]}


def prior_loss(ds: Dataset) -> float:
    """Cross-entropy of always predicting the label frequencies: the loss a model learns for free."""
    p = sum(ds.labels) / len(ds)
    return -sum(q * math.log(q) for q in (p, 1 - p) if q > 0)


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


# ---------------------------------------------------------------- the loop

def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW. Matrices are decayed; vectors (biases, norms) and embeddings are not: decay would shrink the
    embedding rows of tokens that never occur in training, and those tokens do occur at test time."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if p.dim() >= 2 and not n.endswith("wte.weight")]
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": [p for n, p in named if all(p is not q for q in decay)], "weight_decay": 0.0}]
    fused = named[0][1].device.type in ("cpu", "cuda")  # one kernel for all tensors: ~5x faster on a 40M embedding
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=fused)


def warmup_linear(total_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear warmup, then linear decay to zero (the LoRA paper's GLUE schedule)."""
    warmup = int(total_steps * warmup_ratio)

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))
    return f


def fit(model: nn.Module, train_ds: Dataset, val_ds: Dataset, loss_fn: LossFn, args: argparse.Namespace,
        config: dict, run_name: str, save_best: Callable[[], None], cuda_graphs: bool = False) -> dict:
    """Train for args.epochs, evaluating on val_ds after each epoch.

    No step waits for the device: loss, accuracy and the first non-finite loss are summed there and read every
    SYNC_EVERY steps. cuda_graphs: the fixed-shape step (train_step.FixedShapeStep), graphed on CUDA; its loss
    must ignore label -100. After every epoch: metrics.json, the curves (report.plot_curves), save_best() and the
    dev predictions if dev MCC improved, and a resumable checkpoint (trainable weights, optimizer, scheduler,
    RNG). Returns the metrics dict.
    """
    from report import plot_curves  # here, not at the top: report.py imports this module
    device = next(model.parameters()).device
    out_dir, plots_dir = Path(args.out_dir), Path(args.plots_dir)
    trainable = {k: p for k, p in model.named_parameters() if p.requires_grad}
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    steps_per_epoch = num_batches(train_ds, args.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear(args.epochs * steps_per_epoch, args.warmup_ratio))
    metrics = {"config": config, "majority_baseline": {"val_acc": val_ds.majority_acc, "val_loss": prior_loss(val_ds)},
               "epochs": [], "best_epoch": None, "best": None}

    ckpt_path = out_dir / CHECKPOINT
    if args.resume:
        tensors, state = load_checkpoint(ckpt_path)
        if state["config"] != config:
            diff = sorted(k for k in set(config) | set(state["config"]) if config.get(k) != state["config"].get(k))
            raise UserError(f"--resume: {ckpt_path} was written with a different config ({', '.join(diff)} differ)")
        with torch.no_grad():
            for k, p in trainable.items():
                p.copy_(tensors[f"model.{k}"])
        load_optimizer(optimizer, tensors, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(tensors["rng.cpu"])
        if device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], device)
        metrics = state["metrics"]
        print(f"resumed from {ckpt_path} after epoch {len(metrics['epochs'])}")

    running = RunningMetrics(device)
    if cuda_graphs and device.type == "cuda":
        train_step = FixedShapeStep(model, loss_fn, optimizer, args.grad_clip, args.batch_size, running, device,
                                    graphs=True)
    else:
        if cuda_graphs:
            print(f"--cuda_graphs is ignored on {device.type} (CUDA only): training eagerly")
        forward = torch.compile(model.classify, dynamic=True) if args.compile else model.classify
        train_step = EagerStep(forward, loss_fn, optimizer, args.grad_clip, running, device)
    for epoch in range(len(metrics["epochs"]) + 1, args.epochs + 1):
        model.train()
        t0 = time.time()
        running.reset()
        batches = iterate(train_ds, args.batch_size, shuffle=True, seed=epoch_seed(args.seed, epoch))
        bar = tqdm(batches, total=steps_per_epoch,
                   desc=f"{run_name} epoch {epoch}/{args.epochs}", leave=False)
        for step, batch in enumerate(bar, start=1):
            train_step(batch)
            scheduler.step()
            if step % SYNC_EVERY == 0 or step == steps_per_epoch:
                so_far = running.read()  # fit's only wait for the device within an epoch
                if so_far["bad_step"]:
                    kept = (f"The last good checkpoint ({ckpt_path}, epoch {len(metrics['epochs'])}) is kept"
                            if metrics["epochs"] else "No epoch was completed, so no checkpoint was written")
                    raise UserError(f"loss is {so_far['bad_loss']} at epoch {epoch} step {so_far['bad_step']}; "
                                    f"stopped. {kept}: try a lower --lr")
                bar.set_postfix(loss=f"{so_far['loss']:.4f}", acc=f"{so_far['acc']:.3f}")
        val = evaluate(model, val_ds, args.eval_batch_size, device, desc="dev")
        record = {"epoch": epoch, "train_loss": so_far["loss"], "train_acc": so_far["acc"],
                  "val_loss": val["loss"], "val_acc": val["acc"], "val_mcc": val["mcc"],
                  "val_pos_rate": val["pos_rate"], "val_collapsed": val["collapsed"],
                  "lr": scheduler.get_last_lr()[0]}
        metrics["epochs"].append(record)
        print(f"epoch {epoch}: train loss {record['train_loss']:.4f} acc {record['train_acc']:.4f} | dev loss "
              f"{val['loss']:.4f} {describe(val, val_ds.majority_acc)} | {time.time() - t0:.1f}s")
        if metrics["best"] is None or record["val_mcc"] > metrics["best"]["val_mcc"]:
            metrics["best_epoch"], metrics["best"] = epoch, record
            save_best()
            save_predictions(out_dir, "dev", val_ds, val["probs"], epoch)
        write_json(out_dir / METRICS, metrics)
        plot_curves(metrics, run_name, plots_dir)
        tensors = {f"model.{k}": p for k, p in trainable.items()}
        opt_tensors, opt_meta = optimizer_tensors(optimizer)
        tensors.update(opt_tensors)
        tensors["rng.cpu"] = torch.get_rng_state()
        if device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
        save_checkpoint(ckpt_path, tensors, {"config": config, "optimizer": opt_meta,
                                             "scheduler": scheduler.state_dict(), "metrics": metrics})
    return metrics


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
               out_dir: Path) -> None:
    """Score the best checkpoint on out-of-domain dev: reported, never used to choose an epoch."""
    stats = evaluate(model, ood_ds, batch_size, device, desc="ood dev")
    save_predictions(Path(out_dir), "ood_dev", ood_ds, stats.pop("probs"), metrics["best_epoch"])
    metrics["ood_dev"] = {**stats, "majority_acc": ood_ds.majority_acc}
    print(f"best epoch {metrics['best_epoch']}: dev {describe({k[4:]: v for k, v in metrics['best'].items() if k.startswith('val_')}, metrics['majority_baseline']['val_acc'])}")
    print(f"out-of-domain dev: {describe(stats, ood_ds.majority_acc)}")
