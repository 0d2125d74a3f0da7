"""bench/gpu_check.sh, the device check, without a device: its plan fits its budget, its budget never cuts a step
short (the script driven by a stub interpreter that only sleeps), and its correctness step
(bench/gpu_correctness.py) passes on the CPU and fails on a planted wrong result.

Bugs these tests exist to catch: a plan whose limits exceed the budget; a step started with less than its whole
limit left (then killed by the budget, "timed out"); a correctness check that cannot fail: one that still passes
with a dropped unscale (gradients 2^16 too large), a wrong LoRA gradient, or a flipped gradient sign.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from data import collate

sys.path.insert(0, str(ROOT / "bench"))

import gpu_correctness as gc  # noqa: E402
from common import build_baseline, build_ours, copy_lora  # noqa: E402
from lora import lora_modules  # noqa: E402
from train_step import EagerStep  # noqa: E402

SCRIPT = ROOT / "bench" / "gpu_check.sh"
CPU = torch.device("cpu")


def test_plan_lists_every_step_and_fits_the_budget():
    out = subprocess.run(["bash", str(SCRIPT), "--plan"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    steps = [line.split() for line in lines if re.match(r"\d+\.", line)]
    assert [s[1] for s in steps][:3] == ["correctness", "test_cuda", "bench_lora"]
    m = re.fullmatch(r"plan: (\d+) steps, limits sum to ([\d.]+) s of a (\d+) s budget", lines[-1])
    assert m, lines[-1]
    n, total, budget = int(m[1]), float(m[2]), int(m[3])
    assert n == len(steps) and total == pytest.approx(sum(float(s[2]) for s in steps))
    assert total <= budget <= 330


def test_a_plan_over_its_budget_says_so_in_its_exit_status():
    out = subprocess.run(["bash", str(SCRIPT), "--plan"], capture_output=True, text=True, timeout=30,
                         env={"PATH": "/usr/bin:/bin", "GPU_CHECK_BUDGET": "100"})
    assert out.returncode == 1 and out.stdout.strip().endswith("of a 100 s budget")


STUB = """#!/usr/bin/env bash
# a python3 that runs nothing: a script or module sleeps $STUB_SLEEP seconds ($STUB_SLOW_SLEEP when its arguments
# hold $STUB_SLOW_ON) and leaves a metrics.json in its --out_dir; -c and - (stdin) succeed at once
case "$1" in -c) exit 0;; -) cat >/dev/null; exit 0;; esac
echo "stub: $*"
args=" $* "
while [ $# -gt 0 ]; do [ "$1" = --out_dir ] && mkdir -p "$2" && echo {} >"$2/metrics.json"; shift; done
if [ -n "${STUB_SLOW_ON:-}" ] && [[ $args == *"$STUB_SLOW_ON"* ]]; then sleep "$STUB_SLOW_SLEEP"; else sleep "$STUB_SLEEP"; fi
"""


def stub_checkout(tmp_path: Path) -> Path:
    """The script in a checkout of its own, with a (fake) .devcarry and a stub interpreter."""
    root = tmp_path / "checkout"
    (root / "bench").mkdir(parents=True)
    shutil.copy(SCRIPT, root / "bench")
    (root / ".devcarry" / "cola" / "cola_public" / "raw").mkdir(parents=True)
    (root / ".devcarry" / "tiktoken").mkdir()
    (root / ".devcarry" / "tiktoken" / "bpe").write_text("")
    stub = tmp_path / "python3"
    stub.write_text(STUB)
    stub.chmod(0o755)
    return root


def run_stub(tmp_path: Path, budget: int, scale: int, sleep: float, slow_on: str = "", slow_sleep: float = 0.0
             ) -> tuple[subprocess.CompletedProcess, list, str]:
    root = stub_checkout(tmp_path)
    out_dir = tmp_path / "out"
    env = {"PATH": "/usr/bin:/bin", "PYTHON": str(tmp_path / "python3"), "GPU_CHECK_BUDGET": str(budget),
           "GPU_CHECK_TIME_SCALE": str(scale), "STUB_SLEEP": str(sleep),
           "STUB_SLOW_ON": slow_on, "STUB_SLOW_SLEEP": str(slow_sleep), "OUT": str(out_dir), "TMPDIR": str(tmp_path)}
    out = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=root, capture_output=True, text=True, timeout=120,
                         env=env)
    starts = re.findall(r"=== (\w+) \(.*, limit ([\d.]+)s, ([\d.]+)s of the budget left\)", out.stdout)
    return out, starts, (out_dir / "summary.txt").read_text()


def test_a_step_starts_only_when_its_whole_limit_fits_and_none_is_cut_short_by_the_budget(tmp_path):
    """Limits at 2% (30 s -> 0.6 s), a 2 s budget, each step taking 0.4 s: the first steps run and finish; the
    budget then leaves less than the next limit and that step, and the rest, are listed as skipped."""
    out, starts, summary = run_stub(tmp_path, budget=2, scale=2, sleep=0.4)
    assert starts, out.stdout + out.stderr
    ran = [name for name, limit, left in starts if float(limit) <= float(left)]
    skipped = re.findall(r"^(\w+) +- +skipped \(budget\)", summary, re.M)
    assert ran and skipped, summary
    assert "timed out" not in summary, summary
    for name in ran:
        assert re.search(rf"^{name} +[\d.]+ +ok$", summary, re.M), summary
    assert set(ran) | set(skipped) == {name for name, *_ in starts}
    assert out.returncode == 0, out.stdout


def test_a_step_over_its_own_limit_times_out_and_the_next_still_runs(tmp_path):
    out, starts, summary = run_stub(tmp_path, budget=30, scale=2, sleep=0.1, slow_on="--precision fp16",
                                    slow_sleep=3)  # epoch_fp16 sleeps past its 0.8 s limit
    assert re.search(r"^epoch_fp16 +[\d.]+ +timed out at its own limit, 0.8s$", summary, re.M), summary
    assert re.search(r"^epoch_graphs +[\d.]+ +ok$", summary, re.M), summary
    assert re.search(r"^distil +[\d.]+ +ok$", summary, re.M), summary
    assert out.returncode == 1


# ---------------------------------------------------------------- the correctness step, on the CPU

@pytest.fixture(scope="module")
def pair(tiny_gpt2, cola):
    """Ours and transformers + PEFT on the same tiny random GPT-2, LoRA B random, and one batch of real CoLA."""
    ours = build_ours(tiny_gpt2)
    baseline = build_baseline(tiny_gpt2, ours)
    with torch.no_grad():
        for m in lora_modules(ours).values():
            m.lora_B.normal_(0, 0.02)
    copy_lora(ours, baseline)
    return ours, baseline, collate(cola["dev"], list(range(gc.ROWS)))


def test_fp32_gradients_match_peft_and_a_wrong_lora_gradient_fails(pair):
    ours, baseline, batch = pair
    assert gc.check_against_peft(ours, baseline, batch)
    p = lora_modules(ours)["transformer.h.1.mlp.c_fc"].lora_B
    handle = p.register_hook(lambda g: g * 1.5)  # one adapter's gradient wrong by half
    try:
        assert not gc.check_against_peft(ours, baseline, batch)
    finally:
        handle.remove()


def test_fp16_gradients_match_fp32_and_a_dropped_unscale_fails(pair, monkeypatch):
    ours, _, batch = pair
    assert gc.check_precisions(ours, batch, CPU, ("bf16", "fp16"))
    monkeypatch.setattr(EagerStep, "_unscale", lambda self: 0.0)  # the gradients left scaled by 2^16
    assert not gc.check_precisions(ours, batch, CPU, ("fp16",))


def test_fitting_one_batch_passes_and_a_flipped_gradient_fails(pair, monkeypatch):
    """In fp32, the fast one on a CPU: the check's logic is the same in every precision."""
    ours, _, batch = pair
    assert gc.check_fit(ours, batch, CPU, ("fp32",))
    original = EagerStep._unscale

    def flipped(self):
        for p in self.params:
            if p.grad is not None:
                p.grad.neg_()  # gradient ascent
        return original(self)
    monkeypatch.setattr(EagerStep, "_unscale", flipped)
    monkeypatch.setattr(gc, "FIT_STEPS", 10)  # ascending, the loss only grows
    assert not gc.check_fit(ours, batch, CPU, ("fp32",))
