"""What every entry point shares at the command line: the parser and its argument types, the common flags,
the choice of device, output-directory checks, and `run_cli`, which turns a UserError into one line and exit 2.

Nothing here trains or evaluates: train_lora.py, train_distil.py, report.py and model.py's text generation
all import it, and it imports none of them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Callable

import torch

from errors import OFFLINE_HINT, UserError
from precision import DTYPES, Precision, choose_precision, device_line

# The files of a run directory (--out_dir).
CHECKPOINT = "checkpoint.safetensors"
METRICS = "metrics.json"
PREDICTIONS = "predictions.json"
FIGURES = ("loss.png", "accuracy.png", "comparison.md", "comparison.png", "comparison.json")  # curves, comparison

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
    """argparse with the one-line error style of the rest of the scripts (no usage dump on a bad flag), every
    default in --help, and no abbreviated flags: a mistyped --max_train_sample is an error, not silently taken
    for --max_train_samples."""

    def __init__(self, **kwargs):
        super().__init__(**{"formatter_class": HelpFormatter, "allow_abbrev": False, **kwargs})

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
                    weight_decay: float, warmup_ratio: float,
                    forward_passes: str = "dev and out-of-domain evaluation") -> None:
    """Flags both scripts take, with each script's own defaults. forward_passes: what --eval_batch_size batches
    in this script."""
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=positive_int, default=epochs, help="passes over the training set")
    g.add_argument("--lr", type=positive_float, default=lr, help="peak learning rate (AdamW)")
    g.add_argument("--batch_size", type=positive_int, default=batch_size, help="sentences per step")
    g.add_argument("--eval_batch_size", type=positive_int, default=256,
                   help=f"batch size of forward-only passes: {forward_passes}")
    g.add_argument("--weight_decay", type=nonneg_float, default=weight_decay,
                   help="AdamW's, on weight matrices (not on biases, norms or embeddings)")
    g.add_argument("--warmup_ratio", type=unit_float, default=warmup_ratio,
                   help="fraction of steps of linear warmup; the rest decays linearly to 0")
    g.add_argument("--grad_clip", type=nonneg_float, default=1.0, help="max gradient norm, 0 to disable")
    g.add_argument("--seed", type=int, default=1337, help="seeds initialisation, shuffling and dropout")
    g = p.add_argument_group("placement and I/O")
    g.add_argument("--device", default="auto", help="auto picks cuda, then mps, then cpu")
    g.add_argument("--precision", choices=("auto", *DTYPES), default="auto",
                   help="auto: bf16 mixed on CUDA with compute capability >= 8.0 (A100, RTX 30xx, H100), fp16 mixed "
                        "with loss scaling below (T4, V100), fp32 on CPU and MPS; the frozen base weights are "
                        "stored in bf16/fp16. Recorded in metrics.json; --resume needs the same")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA)")
    g.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads torch computes with; on a machine shared with other jobs, fewer keep an "
                        "epoch's time steady (default: torch's choice, one per core)")
    g.add_argument("--data_dir", default="data", help="CoLA is downloaded and extracted here")
    g.add_argument("--out_dir", default=out_dir,
                   help="this run's files: metrics, best weights, checkpoint, curves (and a student's comparison "
                        "with its teacher); no other run writes there")
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


def pick_hardware(args: argparse.Namespace) -> tuple[torch.device, Precision]:
    """--threads, --device and --precision, announced in one line. args.precision becomes the precision actually used
    (auto resolved), so that metrics.json records it and --resume compares it."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    precision = choose_precision(device, args.precision)
    args.precision = precision.name
    print(device_line(device, precision))
    return device, precision


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
        for path in [out_dir / n for n in (*names, *FIGURES)] + [out_dir / f"{n}.tmp" for n in names]:
            try:
                path.unlink(missing_ok=True)
            except OSError as e:
                raise UserError(f"--overwrite: {path} cannot be removed: {e.strerror or e}") from None
        if earlier:
            print(f"--overwrite: removed {', '.join(earlier)} from {out_dir}")
    check_writable(out_dir, "--out_dir")
    if args.resume and not (out_dir / CHECKPOINT).is_file():
        raise UserError(f"--resume: no checkpoint at {out_dir / CHECKPOINT}; run without --resume to start")


def check_inputs(checks: dict[str, Callable[[], object]]) -> None:
    """Run every check of a downloaded-on-first-use input ({what: check}: CoLA, tiktoken's BPE files, the GPT-2
    weights) and fail once, naming every one that failed: offline, a user learns all that is missing in one
    try, not one piece per try. One failure is raised as it is."""
    failed = []
    for what, check in checks.items():
        try:
            check()
        except UserError as e:
            failed.append((what, e))
    if len(failed) == 1:
        raise failed[0][1]
    if failed:
        parts = " | ".join(f"{i}) {what}: {str(e).removesuffix(OFFLINE_HINT)}" for i, (what, e) in
                           enumerate(failed, start=1))
        raise UserError(f"{len(failed)} inputs are missing{OFFLINE_HINT}: {parts}")


def print_outputs(**files: list[Path]) -> None:
    """End a run by saying where it wrote what: one line per kind, naming only files that exist."""
    for kind, paths in files.items():
        found = [str(p) for p in paths if p.is_file()]
        if found:
            print(f"{kind}: {', '.join(found)}")


def run_name(out_dir: str | Path) -> str:
    """A run's name: its --out_dir's last part (runs/rnn_2 -> rnn_2). It heads the run's curves, in training
    and in report.py --curves alike; the files themselves are in the run directory, so runs of one name in two
    folders never share a file."""
    return Path(out_dir).resolve().name


# Config key -> the value a run written before that key existed implicitly had. A key added to run_config (a new
# flag) gets an entry here, so that --resume, report.py's groups and the teacher check read an older run's config
# as if it had recorded the key: complete_config is the one place that decides it.
CONFIG_DEFAULTS: dict[str, object] = {
    "dense_embedding_grad": True,  # before the flag the student's embedding took the dense AdamW update
    "objective": "cls",  # before train_lora.py --objective every run was a classifier
    # train_distil.py: Hinton's KL loss, and no generated transfer set (--generate 0)
    "kd_loss": "kl", "generator": None, "generate": 0, "gen_temperature": 1.0, "gen_top_k": 0, "gen_top_p": 0.9,
    "gen_max_tokens": 48, "gen_batch_size": 64, "gen_seed": None,
}


def complete_config(config: dict) -> dict:
    """A copy of a recorded run config with every key it lacks taken from CONFIG_DEFAULTS: an older run's
    config compares equal to a new run's of the same recipe."""
    return {**CONFIG_DEFAULTS, **config}


def run_config(args: argparse.Namespace) -> dict:
    """The flags that define a run's results (recorded in metrics.json, compared on --resume)."""
    skip = {"resume", "overwrite", "cuda_graphs", "eval_batch_size", "device", "compile", "threads", "out_dir",
            "data_dir", "export_peft"}
    return json.loads(json.dumps({k: v for k, v in vars(args).items() if k not in skip}))
