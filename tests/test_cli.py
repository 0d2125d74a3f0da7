"""The command line as a new user meets it in the first hour.

- --help shows every default (train_lora.py, train_distil.py, model.py).
- model.py refuses bad sampling flags in one line.
- Ctrl-C says what is true: which epoch the checkpoint holds, or that nothing was saved.
- A finished run is never silently replaced: --resume continues it, --overwrite replaces it (removing its files
  first), anything else is one line and exit 2.
- A run that fails before training leaves no empty directory behind, a misspelt --data_dir included.
- Every run ends by naming its metrics, weights and plots.
- Generated outputs are ignored by git; the suite stops in one line when it cannot get its data.

Scripts run as subprocesses, as a user runs them (see test_robustness.py for the helpers).

Bugs these tests exist to catch: a default missing from --help; a traceback or usage dump instead of one
line; Ctrl-C claiming an epoch it did not save; --resume after Ctrl-C that does not end where the
uninterrupted run ends (optimizer, scheduler or RNG state not restored: each planted and seen to fail);
a finished run silently replaced; empty directories left behind; outputs not named; generated files tracked.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT
from test_robustness import (ENV, EPOCHS, LORA_ROWS, TIMEOUT, cli, distil_args, error_line, in_process, lora_args, ok,
                             sha256)
from cli import CHECKPOINT, METRICS, PREDICTIONS, pick_hardware, run_config
from train_distil import build_parser as distil_parser
from trainer import load_checkpoint

OFFLINE = {"HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "NO_PROXY": "", "no_proxy": ""}


# ---------------------------------------------------------------- --help

@functools.cache  # each script's --help is run once, whichever tests read it
def help_entries(script: str) -> dict[str, str]:
    """{'--flag': its whole help entry on one line} from `script --help`."""
    r = ok(cli(script, "--help"))
    entries, current = {}, None
    for line in r.stdout.splitlines():
        if line.startswith("  -"):  # an option's first line; its help may continue on indented lines
            current = line.split()[0].rstrip(",")
            entries[current] = line
        elif current and line.startswith("   "):
            entries[current] += " " + line
        else:
            current = None
    return {k: " ".join(v.split()) for k, v in entries.items()}


def shown_default(entry: str) -> str | None:
    m = re.search(r"\(default: (.*)\)$", entry)
    return m.group(1) if m else None


@pytest.mark.parametrize("script", ["train_lora.py", "train_distil.py"])
def test_help_shows_every_default(script):
    parser = __import__(script[:-3]).build_parser()
    entries = help_entries(script)
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert len(options) > 20 and set(entries) >= {a.option_strings[0] for a in options}
    for a in options:
        shown = shown_default(entries[a.option_strings[0]])
        if isinstance(a.default, bool):
            assert shown == ("on" if a.default else "off"), entries[a.option_strings[0]]
        elif a.default is None:  # the help says what leaving it out does
            assert shown, entries[a.option_strings[0]]
        else:
            assert shown == str(a.default), entries[a.option_strings[0]]


def test_model_py_help_shows_every_default():
    entries = help_entries("model.py")
    assert set(entries) == {"-h", "--gpt_variant", "--prompt", "--max_new_tokens", "--temperature", "--top_k",
                            "--top_p", "--num_samples", "--seed", "--device"}
    shown = {k: shown_default(v) for k, v in entries.items() if k != "-h"}
    assert shown == {"--gpt_variant": "gpt2", "--prompt": "The meaning of life is", "--max_new_tokens": "50",
                     "--temperature": "0.8", "--top_k": "200", "--top_p": None, "--num_samples": "1",
                     "--seed": "1337", "--device": "auto"}
    assert "default: no cut" in entries["--top_p"]  # a None default says in its help what leaving it out does


def test_eval_batch_size_help_is_each_scripts_own():
    assert "teacher" not in help_entries("train_lora.py")["--eval_batch_size"]
    assert "teacher" in help_entries("train_distil.py")["--eval_batch_size"]


@pytest.mark.parametrize("script,flag", [("train_lora.py", "--max_train_sample"), ("train_distil.py", "--temp"),
                                         ("report.py", "--plots")])
def test_abbreviated_flags_are_refused(script, flag, tmp_path):
    """argparse would take --max_train_sample for --max_train_samples without a word."""
    line = error_line(cli(script, flag, "5", str(tmp_path)))
    assert f"unrecognized arguments: {flag}" in line, line


# ---------------------------------------------------------------- offline: what is missing, all at once

def test_model_py_without_bpe_files_is_one_line(tiny_gpt2, tmp_path):
    """tiktoken's files neither cached nor downloadable: one line naming TIKTOKEN_CACHE_DIR, not a traceback."""
    (tmp_path / "empty").mkdir()
    r = cli("model.py", "--gpt_variant", str(tiny_gpt2), "--max_new_tokens", "2", "--device", "cpu",
            env={**OFFLINE, "TIKTOKEN_CACHE_DIR": str(tmp_path / "empty")})
    line = error_line(r)
    assert "tiktoken" in line and "TIKTOKEN_CACHE_DIR" in line and 'section "Offline"' in line, line


def test_offline_the_first_failure_names_every_missing_input(tmp_path):
    """CoLA, tiktoken's files and the weights all missing: one try, one line naming all three, and the README
    section that says where each goes; nothing left behind."""
    (tmp_path / "empty").mkdir()
    out = tmp_path / "runs" / "lora"
    r = cli("train_lora.py", "--gpt_variant", str(tmp_path / "ckpt"), "--data_dir", str(tmp_path / "data"),
            "--out_dir", str(out), "--device", "cpu",
            env={**OFFLINE, "TIKTOKEN_CACHE_DIR": str(tmp_path / "empty")})
    line = error_line(r)
    assert line.startswith('error: 3 inputs are missing (README.md, section "Offline"'), line
    for part in ("1) CoLA: could not download", "2) tiktoken's BPE files:", f"3) GPT-2 weights: --gpt_variant "
                 f"'{tmp_path / 'ckpt'}'"):
        assert part in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_rnn_mode_with_a_mistyped_teacher_blames_the_teacher(cola_dir, tmp_path):
    """Without --gpt_variant the student's base comes from --teacher: a --teacher that holds no run is named,
    not the default gpt2-medium that would otherwise be tried."""
    r = in_process("train_distil.py", "--mode", "rnn", "--teacher", str(tmp_path / "runs" / "lroa"), "--data_dir",
                   str(cola_dir), "--out_dir", str(tmp_path / "rnn"))
    line = error_line(r)
    assert f"--teacher {tmp_path / 'runs' / 'lroa'} holds no train_lora.py run" in line and "--gpt_variant" in line
    assert "gpt2-medium" not in line, line


# ---------------------------------------------------------------- model.py's sampling flags

BAD_SAMPLING = {"top_k_0": ("--top_k", "0"), "temperature_-1": ("--temperature", "-1"),
                "temperature_nan": ("--temperature", "nan"), "max_new_tokens_0": ("--max_new_tokens", "0"),
                "num_samples_0": ("--num_samples", "0"), "num_samples_-2": ("--num_samples", "-2")}


@pytest.fixture(scope="module")
def sampling_runs(tiny_gpt2):
    """Every bad flag, and one good run, in this process (in_process; model.py's own start is tested above), on a
    tiny local GPT-2 (so nothing fails for want of weights)."""
    base = ("--gpt_variant", str(tiny_gpt2), "--max_new_tokens", "3", "--device", "cpu")
    cmds = {name: (*base, flag, v) for name, (flag, v) in BAD_SAMPLING.items()}
    cmds["good"] = (*base, "--top_k", "60000", "--temperature", "0", "--num_samples", "2")
    return {name: in_process("model.py", *args) for name, args in cmds.items()}


@pytest.mark.parametrize("name", list(BAD_SAMPLING))
def test_model_py_bad_sampling_flag_is_one_line(sampling_runs, name):
    flag, value = BAD_SAMPLING[name]
    line = error_line(sampling_runs[name])
    assert flag in line and value in line, line


def test_model_py_good_flags_still_generate(sampling_runs):
    r = ok(sampling_runs["good"])
    assert r.stdout.count("---------------") == 2


# ---------------------------------------------------------------- Ctrl-C

def start(script: str, args: list[str], log: Path) -> subprocess.Popen:
    """The run as a terminal starts it: with SIGINT's default disposition, so Python turns it into
    KeyboardInterrupt, even when this pytest runs as a background job (SIGINT ignored, and inherited)."""
    return subprocess.Popen([sys.executable, script, *args], cwd=ROOT, env={**ENV, "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=open(log, "w"), text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def interrupt(p: subprocess.Popen, log: Path) -> str:
    """SIGINT (what Ctrl-C sends); the run must exit 130 with a last stderr line `interrupted: ...`."""
    p.send_signal(signal.SIGINT)
    p.communicate(timeout=TIMEOUT)
    err = log.read_text()
    assert p.returncode == 130, f"exit {p.returncode}\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    lines = [ln.strip() for ln in err.splitlines() if ln.strip()]
    assert lines[-1].startswith("interrupted:"), err[-3000:]
    return lines[-1]


def test_ctrl_c_in_epoch_1_says_nothing_was_saved(tiny_gpt2, cola_dir, tmp_path):
    out = tmp_path / "new" / "lora"
    p = start("train_lora.py", lora_args(tiny_gpt2, cola_dir, out, rows=LORA_ROWS, epochs=3), tmp_path / "log")
    for line in p.stdout:  # the last line before the training loop starts
        if "sentences" in line:
            break
    line = interrupt(p, tmp_path / "log")
    assert not (out / CHECKPOINT).exists()
    assert "nothing was saved" in line and "--resume" not in line, line
    assert not (tmp_path / "new").exists()  # the run created new/ and new/lora, and left them empty


def test_ctrl_c_after_epoch_1_names_the_saved_epoch_and_resume_continues(lora_ref, tiny_gpt2, cola_dir, tmp_path):
    """... and the resumed run ends where the same run uninterrupted ends (lora_ref): same metrics, same weights."""
    out = tmp_path / "lora"
    args = lora_args(tiny_gpt2, cola_dir, out, rows=LORA_ROWS, epochs=EPOCHS)
    p = start("train_lora.py", args, tmp_path / "log")
    deadline = time.monotonic() + TIMEOUT
    while not (out / CHECKPOINT).exists():
        assert p.poll() is None and time.monotonic() < deadline, (tmp_path / "log").read_text()[-3000:]
        time.sleep(0.005)
    time.sleep(0.1)
    line = interrupt(p, tmp_path / "log")
    _, state = load_checkpoint(out / CHECKPOINT)
    saved = len(state["metrics"]["epochs"])
    assert f"epoch {saved} of 3 is saved in {out / CHECKPOINT}" in line and "--resume" in line, line
    r = ok(cli("train_lora.py", *args, "--resume"))
    assert f"after epoch {saved}" in r.stdout
    assert json.loads((out / METRICS).read_text()) == json.loads((lora_ref / METRICS).read_text())
    a, b = load_file(str(out / "adapter.safetensors")), load_file(str(lora_ref / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ctrl_c_while_an_epoch_is_saved_leaves_files_and_message_agreeing(tiny_gpt2, cola_dir, tmp_path):
    """SIGINT the moment `epoch 1: ...` is printed, while that epoch's files are being written: metrics.json, the
    checkpoint and the message must all say epoch 1 (the saving finishes first), and --resume continues."""
    out = tmp_path / "lora"
    args = lora_args(tiny_gpt2, cola_dir, out, rows=LORA_ROWS, epochs=3)
    p = start("train_lora.py", args, tmp_path / "log")
    for line in p.stdout:
        if line.startswith("epoch 1:"):
            break
    line = interrupt(p, tmp_path / "log")
    _, state = load_checkpoint(out / CHECKPOINT)
    recorded = json.loads((out / METRICS).read_text())
    assert len(state["metrics"]["epochs"]) == len(recorded["epochs"]) == 1
    assert f"epoch 1 of 3 is saved in {out / CHECKPOINT}" in line, line
    assert json.loads((out / PREDICTIONS).read_text())["dev"]["epoch"] == recorded["best_epoch"] == 1


def test_resume_with_other_epochs_says_a_finished_run_cannot_be_extended(finished):
    out, args, _ = finished
    before = {p.name: sha256(p) for p in out.iterdir()}
    line = error_line(in_process("train_lora.py", *args, "--resume", "--epochs", "4"))
    assert "a finished run (1 of 1 epochs done)" in line and "cannot be extended" in line, line
    assert "--epochs 1" in line and "--overwrite" in line, line
    assert {p.name: sha256(p) for p in out.iterdir()} == before


# ---------------------------------------------------------------- a finished run, and the outputs a run names

def named_outputs(stdout: str) -> dict[str, list[Path]]:
    """The run's closing lines, `kind: path, path`."""
    found = {}
    for line in stdout.splitlines():
        m = re.fullmatch(r"(metrics|weights|checkpoint|plots): (.+)", line)
        if m:
            found[m.group(1)] = [Path(s) for s in m.group(2).split(", ")]
    return found


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_gpt2, cola_dir):
    out = tmp_path_factory.mktemp("finished") / "lora"
    args = lora_args(tiny_gpt2, cola_dir, out)
    return out, args, ok(cli("train_lora.py", *args))


def test_train_lora_ends_by_naming_its_outputs(finished):
    out, _, r = finished
    named = named_outputs(r.stdout)
    assert named["metrics"] == [out / METRICS, out / PREDICTIONS]
    assert named["weights"] == [out / "adapter.safetensors", out / "adapter_config.json"]
    assert named["checkpoint"] == [out / CHECKPOINT]
    assert named["plots"] == [out / "accuracy.png", out / "loss.png"]  # in the run: no other run replaces them
    assert all(p.is_file() for paths in named.values() for p in paths)


def test_train_distil_ends_by_naming_its_outputs(cola_dir, tmp_path):
    out = tmp_path / "rnn"
    r = ok(cli("train_distil.py", *distil_args("rnn", tmp_path / "no_teacher", cola_dir, out, tmp_path / "cache")))
    named = named_outputs(r.stdout)
    assert named["metrics"] == [out / METRICS, out / PREDICTIONS]
    assert named["weights"] == [out / "student.safetensors", out / "student_config.json"]
    assert named["plots"] == [out / name for name in ("accuracy.png", "loss.png", "comparison.md", "comparison.png",
                                                      "comparison.json")]
    assert all(p.is_file() for paths in named.values() for p in paths)


def test_a_finished_run_is_not_replaced_without_overwrite(finished):
    out, args, _ = finished
    before = {p.name: sha256(p) for p in out.iterdir()}
    line = error_line(in_process("train_lora.py", *args, "--lora_rank", "1"))
    assert str(out) in line and "--resume" in line and "--overwrite" in line, line
    assert {p.name: sha256(p) for p in out.iterdir()} == before


def test_overwrite_removes_the_earlier_run_before_training(finished, tmp_path):
    """--overwrite with a run that fails before its first epoch ends: nothing of the earlier run may be left to
    mix in (a stale checkpoint would be continued by a later --resume)."""
    src, args, _ = finished
    out = tmp_path / "lora"
    shutil.copytree(src, out)
    args = [str(out) if a == str(src) else a for a in args]
    line = error_line(in_process("train_lora.py", *args, "--overwrite", "--lora_targets", "bogus"))
    assert "bogus" in line, line
    assert sorted(p.name for p in out.iterdir()) == []
    line = error_line(in_process("train_lora.py", *args, "--overwrite", "--resume"))
    assert "--overwrite" in line and "--resume" in line, line


# ---------------------------------------------------------------- failed runs leave nothing behind

def test_failed_download_leaves_no_empty_directories(tiny_gpt2, tmp_path):
    """A misspelt --data_dir offline: CoLA cannot be downloaded, and neither the data directory nor the output
    directories the run created are left behind."""
    out = tmp_path / "new" / "lora"
    line = error_line(cli("train_lora.py", *lora_args(tiny_gpt2, tmp_path / "dat" / "cola", out), env=OFFLINE))
    assert "could not download CoLA" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ---------------------------------------------------------------- the repository

def git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)


@pytest.mark.skipif(git("rev-parse", "--git-dir").returncode != 0, reason="not a git checkout")
def test_generated_outputs_are_ignored_and_plots_readme_is_not():
    generated = ["plots/comparison.png", "plots/comparison.md", "runs/lora/metrics.json", "runs/rnn/loss.png",
                 "data/cola_public_1.1.zip",  # and what the quick start creates:
                 ".venv/bin/python", "ckpt/gpt2/model.safetensors", "cola/cola_public/raw/in_domain_train.tsv",
                 "tiktoken/6d1cbeee0f20b3d9449abfede4726ed8212e3aee"]
    assert git("check-ignore", "--no-index", *generated).stdout.split() == generated
    assert git("check-ignore", "--no-index", "plots/README.md").returncode == 1  # tracked, and not ignored


def test_without_data_and_network_the_suite_stops_in_one_line(tmp_path):
    """A clone without ../shared, offline, with empty caches: one `ERROR:` line naming what is missing and
    where it is cached, not an error per test."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT, repo, ignore=shutil.ignore_patterns(".git", "__pycache__", ".pytest_cache", "data", "runs"))
    for d in ("home", "tmp"):
        (tmp_path / d).mkdir()
    env = {k: v for k, v in ENV.items() if k not in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR", "XDG_CACHE_HOME")}
    env.update(OFFLINE, HOME=str(tmp_path / "home"), TMPDIR=str(tmp_path / "tmp"))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_data.py"],
                       cwd=repo, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 4, r.stdout[-3000:] + r.stderr[-3000:]
    errors = [ln for ln in (r.stdout + r.stderr).splitlines() if "error" in ln.lower()]
    assert len(errors) == 1 and errors[0].startswith("ERROR: the tests need CoLA"), errors
    assert str(tmp_path / "home" / ".cache" / "gpt2-lora-cola") in errors[0]


def test_the_suite_finds_the_quick_starts_cola_and_tiktoken(tmp_path, cola_dir):
    """After the README's quick start (CoLA in cola/, tiktoken's files in tiktoken/, in the clone), with no
    ../shared, offline and with empty caches, `python -m pytest -q tests` finds both: nothing is downloaded."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT, repo, ignore=shutil.ignore_patterns(".git", "__pycache__", ".pytest_cache", "data", "runs",
                                                              "cola", "tiktoken"))
    shutil.copytree(Path(os.environ["TIKTOKEN_CACHE_DIR"]), repo / "tiktoken")
    shutil.copytree(cola_dir / "cola_public", repo / "cola" / "cola_public")
    for d in ("home", "tmp"):
        (tmp_path / d).mkdir()
    env = {k: v for k, v in ENV.items() if k not in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR", "XDG_CACHE_HOME",
                                                     "GPT2_COLA_DIR")}
    env.update(OFFLINE, HOME=str(tmp_path / "home"), TMPDIR=str(tmp_path / "tmp"))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_data.py", "-k",
                        "more_samples"], cwd=repo, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0 and "1 passed" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    assert not (tmp_path / "home" / ".cache").exists()  # nothing fetched into a cache


def test_threads_sets_the_cpu_threads_and_is_not_a_recipe_key():
    """--threads N on a shared CPU: torch computes with N threads; the run's config (resume, report groups) is
    the same whatever N."""
    before = torch.get_num_threads()
    try:
        for n in (1, 2):
            args = distil_parser().parse_args(["--threads", str(n), "--device", "cpu"])
            pick_hardware(args)
            assert torch.get_num_threads() == n
    finally:
        torch.set_num_threads(before)
    assert "threads" not in run_config(args)
