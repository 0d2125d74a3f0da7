"""Robust runs, clear errors, safe checkpoints.

- Reproducibility: the same seed gives a byte-identical metrics.json (train_lora.py, train_distil.py).
- Interruption: a run SIGKILLed during epoch 2 and continued with --resume ends exactly where an
  uninterrupted run ends; stale *.tmp files from the kill do not matter.
- NaN/inf losses stop the run with a UserError naming epoch and step; the last checkpoint stays loadable and
  continues the run to where an uninterrupted run ends.
- Bad input (flags, files, teachers, checkpoints, output dirs): exit status 2, one `error:` line naming the
  culprit, never a traceback.
- Checkpoints and adapters are safetensors (no pickle anywhere, torch.load only with weights_only=True).

Every script runs as a subprocess with OMP_NUM_THREADS=1: a tiny model gains nothing from threads, and on a
busy 2-core machine OpenMP spin-waiting makes each step ~40x slower. The many bad-input runs are started
concurrently (they mostly spend their time importing torch).

Bugs these tests exist to catch: a run that is not reproducible from its seed; a resume that does not restore
the optimizer, the scheduler or the RNG (each planted and seen to fail the NaN test's resume; the killed-and-
resumed tests compare with an uninterrupted run too); a checkpoint half-written by a kill; a NaN run that
claims or corrupts a checkpoint; bad input that ends in a traceback or names the wrong culprit; pickle, or
torch.load without weights_only.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import importlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from argparse import Namespace
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import ROOT, make_gpt2_checkpoint
from data import COLA_SHA256, Dataset
from errors import UserError
from model import DistilRNN
from cli import CHECKPOINT, METRICS
from precision import Precision
from trainer import fit, load_checkpoint

ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg")
TIMEOUT = 300
FP32 = Precision("fp32", "cpu")


def cli(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, env={**ENV, **(env or {})},
                          capture_output=True, text=True, timeout=TIMEOUT)


def in_process(script: str, *args: str) -> subprocess.CompletedProcess:
    """cli() without a new process: the script's main() run here, from ROOT, on one thread, giving its exit
    status, stdout and stderr. A run that fails at once then costs no Python and torch start-up. An exception
    that escapes main ends as a traceback on stderr, as it would from the script."""
    module = importlib.import_module(script.removesuffix(".py"))
    out, err = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with (contextlib.chdir(ROOT), mock.patch.object(sys, "argv", [script, *args]),
              contextlib.redirect_stdout(out), contextlib.redirect_stderr(err)):
            try:
                module.main()
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else int(e.code is not None)
            except Exception:  # noqa: BLE001 - reported as the script would report it
                traceback.print_exc()
                code = 1
    finally:
        torch.set_num_threads(threads)
    return subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    return r


def lora_args(tiny: Path, cola_dir: Path, out: Path, *extra: str, rows: int = 64, epochs: int = 1) -> list[str]:
    return ["--gpt_variant", str(tiny), "--data_dir", str(cola_dir), "--max_train_samples", str(rows),
            "--max_eval_samples", "100" if rows > 64 else "32", "--epochs", str(epochs), "--lora_rank", "2",
            "--batch_size", "32", "--seed", "7", "--out_dir", str(out),
            "--device", "cpu", *extra]


def distil_args(mode: str, teacher: Path, cola_dir: Path, out: Path, cache: Path, *extra: str, rows: int = 64,
                epochs: int = 1) -> list[str]:
    return ["--mode", mode, "--teacher", str(teacher), "--init_embeddings", "none", "--embd_dim", "16",
            "--hidden_size", "16", "--data_dir", str(cola_dir), "--max_train_samples", str(rows),
            "--max_eval_samples", "100" if rows > 64 else "32", "--epochs", str(epochs), "--batch_size", "32",
            "--seed", "7", "--out_dir", str(out), "--cache_dir", str(cache),
            "--device", "cpu", *extra]


def error_line(r: subprocess.CompletedProcess) -> str:
    """The run failed the way a user error must: status 2, no traceback, one `error:` line, and it is last
    (progress bars of transformers/tqdm may precede it on stderr; splitlines also splits at their \\r)."""
    assert r.returncode == 2, f"exit {r.returncode}\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [ln.strip() for ln in r.stderr.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error:"), r.stderr[-3000:]
    assert sum(ln.startswith("error") for ln in lines) == 1, r.stderr[-3000:]
    return lines[-1]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def other_gpt2(tmp_path_factory) -> Path:
    """A second tiny GPT-2 of another width, for teachers that do not match their base."""
    return make_gpt2_checkpoint(tmp_path_factory.mktemp("other_gpt2"), n_layer=2, n_head=2, n_embd=48)


# ---------------------------------------------------------------- the reference runs

LORA_ROWS, EPOCHS = 2000, 3  # long enough epochs that a kill just after epoch 1's checkpoint lands in epoch 2
# lora_ref (conftest.py): the uninterrupted train_lora.py run of these flags, shared with test_cli.py.


# ---------------------------------------------------------------- 1. reproducibility

def test_train_lora_same_seed_same_bytes(lora_ref, tiny_gpt2, cola_dir, tmp_path):
    again = tmp_path / "lora"
    ok(cli("train_lora.py", *lora_args(tiny_gpt2, cola_dir, again, rows=LORA_ROWS, epochs=EPOCHS)))
    assert (again / METRICS).read_bytes() == (lora_ref / METRICS).read_bytes()
    a, b = load_file(str(again / "adapter.safetensors")), load_file(str(lora_ref / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_train_distil_rnn_same_seed_same_bytes(cola_dir, tmp_path):
    """Two concurrent runs (same flags, different out_dir) of the from-scratch student."""
    outs = [tmp_path / f"{i}" / "rnn" for i in (1, 2)]
    procs = [subprocess.Popen([sys.executable, "train_distil.py", *distil_args(
        "rnn", tmp_path / "no_teacher", cola_dir, out, tmp_path / "cache", rows=300, epochs=2)],
        cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for out in outs]
    for p in procs:
        _, err = p.communicate(timeout=TIMEOUT)
        assert p.returncode == 0, err[-3000:]
    m = [(out / METRICS).read_bytes() for out in outs]
    assert m[0] == m[1]
    assert len(json.loads(m[0])["epochs"]) == 2


# ---------------------------------------------------------------- 2. interruption and --resume

def kill_during_epoch_2(script: str, args: list[str], out: Path) -> None:
    """Start a run, wait for the checkpoint of epoch 1, SIGKILL the process in epoch 2."""
    log = out.parent / f"{out.name}.killed.log"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        p = subprocess.Popen([sys.executable, script, *args], cwd=ROOT, env=ENV, stdout=f, stderr=f)
    ckpt = out / CHECKPOINT
    deadline = time.monotonic() + TIMEOUT
    try:
        while not ckpt.exists():
            assert p.poll() is None, f"exited {p.returncode} before its first checkpoint:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint"
            time.sleep(0.005)
        time.sleep(0.1)  # into epoch 2
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert p.returncode == -signal.SIGKILL, f"the run ended on its own before it was killed: {p.returncode}"
    _, state = load_checkpoint(ckpt)  # os.replace makes the file all or nothing
    assert len(state["metrics"]["epochs"]) == 1, "the kill did not land in epoch 2"
    assert len(json.loads((out / METRICS).read_text())["epochs"]) == 1


def plant_stale_tmp_files(out: Path) -> list[Path]:
    """What a kill in the middle of a write leaves behind: half-written temp files."""
    stale = [out / (CHECKPOINT + ".tmp"), out / (METRICS + ".tmp")]
    for p in stale:
        p.write_bytes(b"\x00garbage from a killed write")
    return stale


def test_train_lora_killed_then_resumed_equals_uninterrupted(lora_ref, tiny_gpt2, cola_dir, tmp_path):
    out = tmp_path / "lora"
    args = lora_args(tiny_gpt2, cola_dir, out, rows=LORA_ROWS, epochs=EPOCHS)
    kill_during_epoch_2("train_lora.py", args, out)
    stale = plant_stale_tmp_files(out)
    (out / "adapter.safetensors.tmp").write_bytes(b"garbage")
    r = ok(cli("train_lora.py", *args, "--resume"))
    assert "resumed" in r.stdout and "after epoch 1" in r.stdout
    assert json.loads((out / METRICS).read_text()) == json.loads((lora_ref / METRICS).read_text())
    a, b = load_file(str(out / "adapter.safetensors")), load_file(str(lora_ref / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(p.exists() for p in stale)  # replaced by the resumed run's own writes
    assert not list(lora_ref.glob("*.tmp"))  # a run that is not killed leaves no temp files


def test_train_distil_killed_then_resumed_equals_uninterrupted(lora_ref, cola_dir, tmp_path):
    cache = tmp_path / "cache"
    ref, out = tmp_path / "ref" / "distil", tmp_path / "killed" / "distil"
    ok(cli("train_distil.py", *distil_args("distil", lora_ref, cola_dir, ref, cache, rows=LORA_ROWS, epochs=EPOCHS)))
    args = distil_args("distil", lora_ref, cola_dir, out, cache, rows=LORA_ROWS, epochs=EPOCHS)
    kill_during_epoch_2("train_distil.py", args, out)
    # The reference computed the teacher's logits, the killed run read them from the cache: building the
    # teacher must not move the RNG, or the same seed gives another student.
    assert json.loads((out / METRICS).read_text())["epochs"][0] == json.loads((ref / METRICS).read_text())["epochs"][0]
    stale = plant_stale_tmp_files(out)
    r = ok(cli("train_distil.py", *args, "--resume"))
    assert "after epoch 1" in r.stdout
    want = json.loads((ref / METRICS).read_text())
    assert json.loads((out / METRICS).read_text()) == want
    assert len(want["epochs"]) == EPOCHS and "teacher_agreement_dev" in want
    a, b = load_file(str(out / "student.safetensors")), load_file(str(ref / "student.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(p.exists() for p in stale) and not list(ref.glob("*.tmp"))


# ---------------------------------------------------------------- 3. NaN / inf

@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def subset(ds: Dataset, n: int) -> Dataset:
    return Dataset(ds.name, ds.sentences[:n], ds.ids[:n], ds.labels[:n])


def fit_args(tmp: Path, **kw) -> Namespace:
    return Namespace(**{**dict(out_dir=str(tmp / "out"), plots_dir=str(tmp / "plots"), epochs=3, lr=1e-3,
                               batch_size=32, eval_batch_size=256, weight_decay=0.0, warmup_ratio=0.0, grad_clip=1.0,
                               seed=0, resume=False, compile=False), **kw})


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_loss_stops_with_epoch_and_step_and_keeps_the_checkpoint(cola, tmp_path, bad, one_thread):
    train, dev = subset(cola["train"], 96), subset(cola["dev"], 64)  # 3 steps an epoch
    args = fit_args(tmp_path)
    for d in (args.out_dir, args.plots_dir):
        Path(d).mkdir()
    calls = []

    def loss_fn(logits, batch):
        calls.append(1)
        loss = F.cross_entropy(logits, batch.labels)
        return loss * bad if len(calls) >= 3 + 2 else loss  # epoch 2, step 2 onwards

    torch.manual_seed(0)
    model = DistilRNN(embd_dim=8, hidden_size=8)
    with pytest.raises(UserError) as e:
        fit(model, train, dev, loss_fn, args, {"k": 1}, "rnn", lambda: None, FP32)
    msg = str(e.value)
    assert re.search(r"\bepoch 2\b", msg) and re.search(r"\bstep 2\b", msg), msg
    assert "\n" not in msg
    tensors, state = load_checkpoint(Path(args.out_dir) / CHECKPOINT)
    assert [r["epoch"] for r in state["metrics"]["epochs"]] == [1]
    assert all(torch.isfinite(v).all() for k, v in tensors.items() if k.startswith("model."))
    assert len(json.loads((Path(args.out_dir) / METRICS).read_text())["epochs"]) == 1
    # ... and that checkpoint continues the run once the loss is sane again, to where the run would have ended
    # had the loss never been bad: the same records and the same weights.
    sane = lambda lg, b: F.cross_entropy(lg, b.labels)  # noqa: E731
    torch.manual_seed(0)
    resumed = DistilRNN(embd_dim=8, hidden_size=8)
    metrics = fit(resumed, train, dev, sane, fit_args(tmp_path, resume=True), {"k": 1}, "rnn", lambda: None, FP32)
    ref_args = fit_args(tmp_path / "ref")
    for d in (ref_args.out_dir, ref_args.plots_dir):
        Path(d).mkdir(parents=True)
    torch.manual_seed(0)
    uninterrupted = DistilRNN(embd_dim=8, hidden_size=8)
    want = fit(uninterrupted, train, dev, sane, ref_args, {"k": 1}, "rnn", lambda: None, FP32)
    assert [r["epoch"] for r in metrics["epochs"]] == [1, 2, 3]
    assert metrics["epochs"] == want["epochs"] and metrics["best_epoch"] == want["best_epoch"]
    a, b = resumed.state_dict(), uninterrupted.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- 4. bad input: one line, exit 2, no traceback

def corrupt_train_tsv(tmp: Path, cola_dir: Path, lineno: int, fix) -> Path:
    raw = tmp / "data" / "cola_public" / "raw"
    shutil.copytree(cola_dir / "cola_public" / "raw", raw)
    path = raw / "in_domain_train.tsv"
    lines = path.read_text(encoding="utf-8").split("\n")
    lines[lineno - 1] = fix(lines[lineno - 1].split("\t"))
    path.write_text("\n".join(lines), encoding="utf-8")
    return tmp / "data"


def teacher_copy(c, edit_config=None, edit_weights=None) -> Path:
    """A copy of the reference train_lora.py output, with its adapter config or weights edited."""
    t = c.tmp / "teacher"
    t.mkdir()
    cfg = json.loads((c.lora_ref / "adapter_config.json").read_text())
    w = load_file(str(c.lora_ref / "adapter.safetensors"))
    if edit_config:
        edit_config(cfg, c)
    if edit_weights:
        edit_weights(w)
    (t / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(w, str(t / "adapter.safetensors"))
    return t


def blocked(tmp: Path) -> Path:
    """A directory that cannot be created (we may run as root, so no chmod): its parent is a regular file."""
    (tmp / "a_file").write_text("")
    return tmp / "a_file" / "out"


def lora_case(*extra, **kw):
    return lambda c: ("train_lora.py", lora_args(c.tiny, c.cola_dir, c.tmp / "out", *extra, **kw))


def distil_case(*extra, mode="rnn"):
    return lambda c: ("train_distil.py", distil_args(mode, c.tmp / "no_teacher", c.cola_dir, c.tmp / "out",
                                                     c.tmp / "cache", *extra))


def data_dir_is_file(c):
    (c.tmp / "cola.txt").write_text("not a directory")
    c.needles = [str(c.tmp / "cola.txt"), "--data_dir"]
    return "train_lora.py", lora_args(c.tiny, c.tmp / "cola.txt", c.tmp / "out")


def tsv_wrong_columns(c):
    data = corrupt_train_tsv(c.tmp, c.cola_dir, 5, lambda cols: "\t".join(cols[:2] + cols[3:]))
    c.needles = ["in_domain_train.tsv:5", "column"]
    return "train_lora.py", lora_args(c.tiny, data, c.tmp / "out")


def tsv_bad_label(c):
    data = corrupt_train_tsv(c.tmp, c.cola_dir, 7, lambda cols: "\t".join([cols[0], "2", *cols[2:]]))
    c.needles = ["in_domain_train.tsv:7", "'2'"]
    return "train_lora.py", lora_args(c.tiny, data, c.tmp / "out")


def bad_sha(c):
    data = c.tmp / "data"
    data.mkdir()
    zip_bytes = bytearray((c.cola_dir / "cola_public_1.1.zip").read_bytes()) if \
        (c.cola_dir / "cola_public_1.1.zip").is_file() else bytearray(b"PK\x03\x04" + bytes(1000))
    zip_bytes[len(zip_bytes) // 2] ^= 0xFF
    (data / "cola_public_1.1.zip").write_bytes(bytes(zip_bytes))
    c.needles = [COLA_SHA256, hashlib.sha256(bytes(zip_bytes)).hexdigest(), "cola_public_1.1.zip"]
    c.after = lambda: not (data / "cola_public_1.1.zip").exists()
    return "train_lora.py", lora_args(c.tiny, data, c.tmp / "out")


def bert_dir(c):
    d = c.tmp / "bert"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "bert"}))
    c.needles = [str(d), "bert"]
    return "train_lora.py", lora_args(d, c.cola_dir, c.tmp / "out")


def hub_offline(c):
    (c.tmp / "hf_home").mkdir()
    c.env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(c.tmp / "hf_home"), "HF_HUB_CACHE": str(c.tmp / "hf_home" / "hub")}
    c.needles = ["'gpt2'", "local directory", "--gpt_variant /"]
    return "train_lora.py", lora_args(c.tiny, c.cola_dir, c.tmp / "out", "--gpt_variant", "gpt2")


def distil_mismatch(edit_config=None, edit_weights=None, needles=()):
    def case(c):
        t = teacher_copy(c, edit_config, edit_weights)
        c.needles = [str(t), *needles]
        return "train_distil.py", distil_args("distil", t, c.cola_dir, c.tmp / "out", c.tmp / "cache")
    return case


def wider_lora_a(w):
    k = next(k for k in w if k.endswith("lora_A"))
    w[k] = torch.zeros(w[k].size(0) + 1, w[k].size(1))


def resume_no_checkpoint(script):
    def case(c):
        c.needles = ["--resume", str(c.tmp / "out" / CHECKPOINT)]
        return lora_case("--resume")(c) if script == "train_lora.py" else distil_case("--resume")(c)
    return case


def resume_other_config(c):
    out = c.tmp / "out"
    out.mkdir()
    shutil.copy(c.lora_ref / CHECKPOINT, out / CHECKPOINT)
    before = sha256(out / CHECKPOINT)
    c.needles = ["--resume", str(out / CHECKPOINT), "(lr differ)"]
    c.after = lambda: sha256(out / CHECKPOINT) == before and not (out / METRICS).exists()
    return "train_lora.py", lora_args(c.tiny, c.cola_dir, out, "--resume", "--lr", "1e-3", rows=LORA_ROWS,
                                      epochs=EPOCHS)


def resume_garbage_checkpoint(c):
    out = c.tmp / "out"
    out.mkdir()
    (out / CHECKPOINT).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{trunc")
    c.needles = ["--resume", str(out / CHECKPOINT)]
    return "train_lora.py", lora_args(c.tiny, c.cola_dir, out, "--resume")


def unwritable(script, flag):
    def case(c):
        bad = blocked(c.tmp)
        c.needles = [flag, str(bad)]
        c.before_training = True
        made = lora_case if script == "train_lora.py" else distil_case
        return made(flag, str(bad))(c)
    return case


def diverging_lr(c):
    c.needles = []
    c.check = lambda line: re.search(r"\bepoch \d+ step \d+\b", line) and "--lr" in line
    return "train_lora.py", lora_args(c.tiny, c.cola_dir, c.tmp / "out", "--lr", "1e30")


def needs(*needles):
    """Wrap a case maker: its error line must contain each of `needles`."""
    def wrap(make):
        def case(c):
            c.needles = list(needles)
            return make(c)
        return case
    return wrap


CASES = {
    "data_dir_is_file": data_dir_is_file,
    "tsv_wrong_column_count": tsv_wrong_columns,
    "tsv_label_2": tsv_bad_label,
    "archive_wrong_sha256": bad_sha,
    "max_train_samples_0": needs("train", "empty", "--max_")(lora_case("--max_train_samples", "0")),
    **{f"lora_rank_{r}": needs("--lora_rank", str(r))(lora_case("--lora_rank", str(r))) for r in (0, -1, 10000)},
    **{f"{s}_{flag}_{v}": needs(f"--{flag}", v)((lora_case if s == "lora" else distil_case)(f"--{flag}", v))
       for s in ("lora", "distil") for flag, v in (("lr", "0"), ("lr", "-1"), ("epochs", "0"), ("batch_size", "0"))},
    **{f"distil_{flag}_{v}": needs(f"--{flag}", v)(distil_case(f"--{flag}", v))
       for flag, v in (("temperature", "0"), ("temperature", "-1"), ("alpha", "1.5"), ("alpha", "-0.1"))},
    "gpt_variant_unknown": needs("gpt2-huge", "--gpt_variant")(lora_case("--gpt_variant", "gpt2-huge")),
    "gpt_variant_not_gpt2": bert_dir,
    "gpt_variant_hub_offline": hub_offline,
    "distil_without_teacher": needs("train_lora.py", "no_teacher")(distil_case(mode="distil")),
    "teacher_rank_edited": distil_mismatch(lambda cfg, c: cfg.update(lora_rank=4), needles=["shape"]),
    "teacher_base_other_width": distil_mismatch(lambda cfg, c: cfg.update(gpt_variant=str(c.other_gpt2)),
                                                needles=["n_embd"]),
    "teacher_wrong_tensor_shape": distil_mismatch(None, wider_lora_a, ["lora_A", "shape"]),
    "lora_resume_without_checkpoint": resume_no_checkpoint("train_lora.py"),
    "distil_resume_without_checkpoint": resume_no_checkpoint("train_distil.py"),
    "resume_other_config": resume_other_config,
    "resume_garbage_checkpoint": resume_garbage_checkpoint,
    "lora_out_dir_unwritable": unwritable("train_lora.py", "--out_dir"),
    # a run's curves are in its --out_dir now: an older command line's --plots_dir is one line naming it
    "lora_plots_dir_gone": needs("--plots_dir")(lora_case("--plots_dir", "plots")),
    "distil_out_dir_unwritable": unwritable("train_distil.py", "--out_dir"),
    "distil_plots_dir_gone": needs("--plots_dir")(distil_case("--plots_dir", "plots")),
    "lr_diverges": diverging_lr,
}


class Case(Namespace):
    pass


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory, tiny_gpt2, cola_dir, lora_ref, other_gpt2) -> dict[str, tuple[Case, object]]:
    """Every case set up, then run: {name: (case, CompletedProcess)}. Those that set environment variables in
    subprocesses, concurrently; the others in this process meanwhile (in_process), one after another."""
    cases = {}
    for name, make in CASES.items():
        c = Case(tmp=tmp_path_factory.mktemp(name), tiny=tiny_gpt2, other_gpt2=other_gpt2, cola_dir=cola_dir,
                 lora_ref=lora_ref, env=None, needles=[], after=None, check=None, before_training=False)
        c.cmd = make(c)
        cases[name] = c
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(cli, c.cmd[0], *c.cmd[1], env=c.env) for name, c in cases.items() if c.env}
        runs = {name: (c, in_process(c.cmd[0], *c.cmd[1])) for name, c in cases.items() if not c.env}
        return {**runs, **{name: (cases[name], f.result()) for name, f in futures.items()}}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_clear_line(bad_runs, name):
    c, r = bad_runs[name]
    line = error_line(r)
    for needle in c.needles:
        assert needle in line, (needle, line)
    if c.check:
        assert c.check(line), line
    if c.after:
        assert c.after(), line
    if c.before_training:
        assert "epoch" not in r.stdout and "sentences" not in r.stdout, r.stdout
        assert not list(c.tmp.rglob(METRICS)) and not list(c.tmp.rglob(CHECKPOINT))


def test_diverging_run_does_not_claim_a_checkpoint_it_never_wrote(bad_runs):
    c, r = bad_runs["lr_diverges"]
    line = error_line(r)
    for claimed in re.findall(r"\S*" + re.escape(CHECKPOINT), line):
        assert Path(claimed.strip("()")).is_file(), line


# ---------------------------------------------------------------- 5. safe checkpoints

def python_sources() -> list[Path]:
    return [p for p in ROOT.rglob("*.py") if not {"tests", ".git", ".venv", "venv"} & set(p.relative_to(ROOT).parts)]


def test_no_pickle_and_torch_load_only_weights_only():
    sources = python_sources()
    assert any(p.name == "trainer.py" for p in sources)
    for path in sources:
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any(n.split(".")[0] in ("pickle", "cPickle", "dill", "joblib") for n in names), \
                    f"{path}:{node.lineno} imports pickle"
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                kw = {k.arg: k.value for k in node.keywords}
                assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, \
                    f"{path}:{node.lineno}: torch.load without weights_only=True"


def safetensors_header(path: Path) -> dict:
    """Parse the format by hand: 8-byte little-endian header size, then a JSON header."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert 0 < n < len(raw) and raw[8:9] == b"{", f"{path} is not safetensors"
    return json.loads(raw[8:8 + n])


def test_checkpoint_is_safetensors_with_optimizer_rng_and_metrics(lora_ref):
    ckpt = lora_ref / CHECKPOINT
    header = safetensors_header(ckpt)
    state = json.loads(header["__metadata__"]["state"])
    with safe_open(str(ckpt), framework="pt") as f:
        keys = set(f.keys())
        assert json.loads(f.metadata()["state"]) == state
    model_keys = {k for k in keys if k.startswith("model.")}
    assert model_keys and any("lora_A" in k for k in model_keys) and "model.score.weight" in model_keys
    assert not any(".wte." in k or "c_attn.weight" in k for k in model_keys)  # the frozen base is not saved
    optim = {k for k in keys if k.startswith("optim.")}
    assert {k.rsplit(".", 1)[1] for k in optim} == {"step", "exp_avg", "exp_avg_sq"}
    assert len(optim) == 3 * len(model_keys)
    assert "rng.cpu" in keys
    assert {"config", "optimizer", "scheduler", "metrics"} <= set(state)
    assert state["optimizer"]["param_groups"] and state["scheduler"]["last_epoch"] > 0
    assert state["metrics"]["epochs"] == json.loads((lora_ref / METRICS).read_text())["epochs"]
    assert state["config"]["lr"] == 4e-4 and state["config"]["seed"] == 7


def test_adapter_is_safetensors(lora_ref):
    path = lora_ref / "adapter.safetensors"
    header = safetensors_header(path)
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    assert keys == set(header) - {"__metadata__"}
    assert "score.weight" in keys and any(k.endswith("lora_B") for k in keys)
    assert not (lora_ref / "adapter.bin").exists() and not list(lora_ref.glob("*.pt"))
