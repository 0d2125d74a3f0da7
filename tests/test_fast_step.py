"""train_step.py on CPU: the fixed-shape step (the one --cuda_graphs captures on CUDA) computes what the eager
step computes, pad rows weigh nothing, and the device-side running metrics equal the host-side loop's.
The graphed CUDA path itself is tested in tests/test_cuda.py.

Bugs these tests exist to catch: pad rows that carry loss or gradient in the fixed-shape step; a fixed-shape
step that drifts from the eager one; capture warm-up steps left in the weights or the optimizer; running
metrics that differ from the host-side sums; a NaN step named late or not at all; --cuda_graphs without CUDA
that changes the results.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT
from data import Dataset, collate, iterate
from errors import UserError
from lora import inject_lora, lora_modules
from model import GPT, DistilRNN
from train_step import (BUCKETS, IGNORE_INDEX, WARMUP_STEPS, CudaGraphs, EagerStep, FixedShapeStep, RunningMetrics,
                        bucket_length, pad_batch, tensor_lr)
from cli import METRICS
from precision import Precision
from trainer import SYNC_EVERY, fit, make_optimizer, warmup_linear

CPU = torch.device("cpu")
FP32 = Precision("fp32", "cpu")


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def lora_gpt(tiny_gpt2: Path, seed: int = 0) -> GPT:
    """The tiny GPT-2 with LoRA (no dropout: the fixed-shape step draws masks for pad rows too) and a random B,
    so that the adapters contribute from the first step."""
    torch.manual_seed(seed)
    model = GPT.from_pretrained(str(tiny_gpt2))
    inject_lora(model, 4, 8.0, dropout=0.0)
    for m in lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B, std=0.1)
    return model


def cross_entropy(logits, batch):
    return F.cross_entropy(logits, batch.labels)


def subset(ds: Dataset, n: int) -> Dataset:
    return Dataset(ds.name, ds.sentences[:n], ds.ids[:n], ds.labels[:n])


def test_bucket_length():
    assert [bucket_length(t) for t in (1, 8, 9, 12, 13, 45, 64)] == [8, 8, 12, 12, 16, 48, 64]
    assert bucket_length(65) == 128 and bucket_length(1000) == 1024  # past the buckets: multiples of the last


def test_padding_to_a_fixed_shape_leaves_real_logits_and_loss_unchanged(tiny_gpt2, cola, one_thread):
    model = lora_gpt(tiny_gpt2).eval()
    train = cola["train"]
    rows = list(range(40, 60))  # 20 sentences of mixed lengths
    batch = collate(train, rows)
    length = bucket_length(batch.ids.size(1))
    padded = pad_batch(batch, 32, length + 8)  # longer than its bucket, and 12 pad rows
    assert padded.ids.shape == (32, length + 8) and (padded.labels[20:] == IGNORE_INDEX).all()
    with torch.no_grad():
        logits = model.classify(batch.ids, batch.lengths)  # (20, 2)
        logits_padded = model.classify(padded.ids, padded.lengths)  # (32, 2)
    torch.testing.assert_close(logits_padded[:20], logits, atol=1e-5, rtol=1e-5)
    loss, loss_padded = cross_entropy(logits, batch), cross_entropy(logits_padded, padded)
    torch.testing.assert_close(loss_padded, loss, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(logits_padded[20:], torch.zeros(12, 2))  # pad rows do compute something


def run_steps(step, model, optimizer, batches) -> tuple[list[float], list[torch.Tensor]]:
    """Each batch's loss (read back after every step, as a test may) and the trainable weights at the end."""
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear(len(batches), 0.3))
    losses = []
    for batch in batches:
        step.metrics.reset()
        step(batch)
        scheduler.step()
        losses.append(step.metrics.read()["loss"])
    return losses, [p.detach().clone() for p in model.parameters() if p.requires_grad]


def test_fixed_shape_steps_equal_eager_steps(tiny_gpt2, cola, one_thread):
    """The same start, the same batches (one a short last batch, lengths in several buckets): the fixed-shape
    step, run eagerly as on CPU, gives the eager step's losses and weights to fp32 rounding."""
    batches = list(iterate(subset(cola["train"], 200), 32, shuffle=True, seed=3))  # 6 full batches, 1 of 8
    assert min(len(b.labels) for b in batches) == 8
    assert len({bucket_length(b.ids.size(1)) for b in batches}) >= 2
    runs = {}
    for kind in ("eager", "fixed"):
        model = lora_gpt(tiny_gpt2).train()
        optimizer = make_optimizer(model, 1e-2, 0.01)
        metrics = RunningMetrics(CPU)
        step = (EagerStep(model.classify, cross_entropy, optimizer, 1.0, metrics, CPU, FP32) if kind == "eager" else
                FixedShapeStep(model, cross_entropy, optimizer, 1.0, 32, metrics, CPU, FP32, graphs=True))
        runs[kind] = run_steps(step, model, optimizer, batches)
    (eager_losses, eager_weights), (fixed_losses, fixed_weights) = runs["eager"], runs["fixed"]
    assert fixed_losses == pytest.approx(eager_losses, rel=1e-5, abs=1e-6)
    assert eager_losses[-1] != pytest.approx(eager_losses[0], rel=1e-3)  # it trained
    for a, b in zip(fixed_weights, eager_weights):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    start = [p for p in lora_gpt(tiny_gpt2).parameters() if p.requires_grad]
    assert any(not torch.allclose(a, s) for a, s in zip(eager_weights, start))


def test_capture_warmup_is_undone(tiny_gpt2, cola, one_thread):
    """Before a capture FixedShapeStep runs warm-up steps (they create AdamW's state), then puts back the weights,
    optimizer state and metrics: done here eagerly, the run that follows is bit-identical to one without."""
    batches = list(iterate(subset(cola["train"], 96), 32, shuffle=True, seed=5))
    runs = []
    for warm_up in (False, True):
        model = lora_gpt(tiny_gpt2).train()
        optimizer = make_optimizer(model, 1e-2, 0.01)
        step = FixedShapeStep(model, cross_entropy, optimizer, 1.0, 32, RunningMetrics(CPU), CPU, FP32, graphs=False)
        if warm_up:
            saved = step._snapshot()
            for _ in range(3):
                step(batches[-1])
            assert optimizer.state and step.metrics.read()["bad_step"] == 0
            step._restore(saved)
        runs.append(run_steps(step, model, optimizer, batches))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


class CpuGraphs:
    """train_step.CudaGraphs' part of the work, played on the CPU so that FixedShapeStep's bookkeeping around it runs
    here: capture runs the warm-up steps as CudaGraphs does, then returns the step itself as the "graph", which
    replay runs. The capture numbered fail_at raises as torch.cuda.graph does when an op failed during capture:
    capture_end's own error, raised while the real one propagates. recover raises recover_error if given, as
    CudaGraphs.recover does when CUDA cannot be brought back."""

    def __init__(self, fail_at: int = 0, recover_error: Exception | None = None):
        self.fail_at, self.recover_error = fail_at, recover_error
        self.captures, self.replays, self.recovered = 0, 0, 0

    def capture(self, step):
        for _ in range(WARMUP_STEPS):
            step()
        self.captures += 1
        if self.captures == self.fail_at:
            try:
                raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore lines")
            except RuntimeError:
                raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
        return step

    def replay(self, graph) -> None:
        self.replays += 1
        graph()

    def recover(self) -> None:
        self.recovered += 1
        if self.recover_error:
            raise self.recover_error


def test_a_later_bucket_failing_to_capture_is_one_line_with_the_real_cause_and_training_goes_on(tiny_gpt2, cola,
                                                                                                capsys, one_thread):
    """The first bucket is captured and replayed; the second bucket's capture fails. One line names the real
    cause, not capture_end's; the state is recovered once; no graph is replayed again; and the run ends with the
    losses and weights of the same step never graphed, bit for bit (the failed capture's warm-up is undone)."""
    batches = list(iterate(subset(cola["train"], 200), 32, shuffle=True, seed=3))
    lengths = [bucket_length(b.ids.size(1)) for b in batches]
    first_other = next(i for i, n in enumerate(lengths) if n != lengths[0])
    assert first_other >= 1 and len(set(lengths)) >= 3  # replays before the failure, buckets after it
    runs, graphs = [], CpuGraphs(fail_at=2)
    for fake in (None, graphs):
        model = lora_gpt(tiny_gpt2).train()
        optimizer = make_optimizer(model, 1e-2, 0.01)
        step = FixedShapeStep(model, cross_entropy, optimizer, 1.0, 32, RunningMetrics(CPU), CPU, FP32, graphs=False)
        step.cuda_graphs = fake
        runs.append(run_steps(step, model, optimizer, batches))
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "cuda_graphs" in ln]
    assert lines == [f"--cuda_graphs: capturing the {lengths[first_other]}-token step failed (RuntimeError: CUDA "
                     "error: operation not permitted when stream is capturing); the graphs are dropped and training "
                     "continues eagerly"], lines
    assert step.graphs == {} and step.cuda_graphs is None
    assert (graphs.captures, graphs.recovered, graphs.replays) == (2, 1, first_other)
    assert runs[1][0] == runs[0][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[1][1], runs[0][1]))


def test_a_capture_failure_that_cannot_be_recovered_from_stops_with_one_line(tiny_gpt2, cola, one_thread):
    """If CUDA cannot be brought back (torch <= 2.10's generator left in capture mode, say), the run stops with one
    UserError line naming both causes and saying to rerun without --cuda_graphs, instead of crashing later."""
    model = lora_gpt(tiny_gpt2).train()
    optimizer = make_optimizer(model, 1e-2, 0.01)
    step = FixedShapeStep(model, cross_entropy, optimizer, 1.0, 32, RunningMetrics(CPU), CPU, FP32, graphs=False)
    step.cuda_graphs = CpuGraphs(fail_at=1, recover_error=RuntimeError(
        "Offset increment outside graph capture encountered unexpectedly."))
    batch = collate(cola["train"], list(range(32)))
    with pytest.raises(UserError) as e:
        step(batch)
    msg = str(e.value)
    assert "\n" not in msg and msg.endswith("rerun without --cuda_graphs"), msg
    assert "operation not permitted when stream is capturing" in msg and "Offset increment outside" in msg, msg
    assert "previous error" not in msg and step.graphs == {}


def test_running_metrics_equal_the_host_side_loop():
    """Random logits and labels, some rows unlabelled (-1, distillation's augmented sentences), a padded batch
    with IGNORE_INDEX rows, and a non-finite loss at step 4 then another at step 6."""
    g = torch.Generator().manual_seed(0)
    metrics = RunningMetrics(CPU)
    loss_sum, seen, correct, labelled = 0.0, 0, 0, 0  # what fit computed on the host before
    for step in range(1, 8):
        B = 32 if step < 7 else 11
        logits = torch.randn(B, 2, generator=g)
        labels = torch.randint(-1, 2, (B,), generator=g)
        loss = F.cross_entropy(logits, labels.clamp(min=0))
        if step in (4, 6):
            loss = loss * (math.nan if step == 4 else math.inf)
        if step == 7:  # the short last batch, padded as FixedShapeStep pads it
            padded_labels = torch.cat([labels, torch.full((21,), IGNORE_INDEX)])
            padded_logits = torch.cat([logits, torch.randn(21, 2, generator=g)])
            metrics.update(loss, padded_logits, padded_labels, (padded_labels != IGNORE_INDEX).sum())
        else:
            metrics.update(loss, logits, labels, B)
        loss_sum += loss.item() * B
        seen += B
        correct += int((logits.argmax(-1) == labels).sum())
        labelled += int((labels >= 0).sum())
        if step == 3:
            read = metrics.read()
            # float32 sums on the device (MPS has no float64), float64 on the host: equal to float32 rounding
            assert read["loss"] == pytest.approx(loss_sum / seen, rel=1e-6)
            assert read["acc"] == correct / labelled and read["bad_step"] == 0
    read = metrics.read()
    assert math.isnan(read["loss"]) and math.isnan(loss_sum)
    assert read["acc"] == correct / labelled
    assert read["bad_step"] == 4 and math.isnan(read["bad_loss"])
    metrics.reset()
    assert metrics.read() == {"loss": 0.0, "acc": 0.0, "bad_step": 0, "bad_loss": 0.0, "skipped": 0}


def test_non_finite_loss_mid_epoch_names_its_step_before_the_epoch_ends(cola, tmp_path, one_thread):
    """The check reads the device every SYNC_EVERY steps: a NaN at step 2 of a longer epoch stops the run
    by then, naming step 2, not the step at which it was read."""
    steps = SYNC_EVERY + 10
    train, dev = subset(cola["train"], 32 * steps), subset(cola["dev"], 32)
    args = dict(out_dir=str(tmp_path / "out"), plots_dir=str(tmp_path / "plots"), epochs=1, lr=1e-3, batch_size=32,
                eval_batch_size=256, weight_decay=0.0, warmup_ratio=0.0, grad_clip=1.0, seed=0, resume=False,
                compile=False)
    calls = []

    def loss_fn(logits, batch):
        calls.append(1)
        loss = F.cross_entropy(logits, batch.labels)
        return loss * math.nan if len(calls) == 2 else loss

    torch.manual_seed(0)
    with pytest.raises(UserError) as e:
        fit(DistilRNN(embd_dim=8, hidden_size=8), train, dev, loss_fn, Namespace(**args),
            {}, "rnn", lambda: None, FP32)
    msg = str(e.value)
    assert re.search(r"\bloss is nan at epoch 1 step 2\b", msg) and "No epoch was completed" in msg, msg
    assert len(calls) == SYNC_EVERY < steps  # stopped at the first read, not at the end of the epoch


def test_cuda_graphs_flag_without_cuda_is_one_line_and_changes_nothing(tiny_gpt2, cola_dir, tmp_path):
    """On CPU --cuda_graphs says in one line that it is ignored; the run is the eager run, byte for byte."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the flag is not ignored here")
    env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    outs = {}
    for flag in ("", "--cuda_graphs"):
        out = tmp_path / (flag or "eager")
        args = ["--gpt_variant", str(tiny_gpt2), "--data_dir", str(cola_dir), "--max_train_samples", "64",
                "--max_eval_samples", "32", "--epochs", "1", "--lora_rank", "2", "--out_dir", str(out),
                "--device", "cpu", *([flag] if flag else [])]
        r = subprocess.run([sys.executable, "train_lora.py", *args], cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, **env}, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        outs[flag] = (out, r.stdout)
    notes = [ln for ln in outs["--cuda_graphs"][1].splitlines() if ln.startswith("--cuda_graphs")]
    assert notes == ["--cuda_graphs is ignored on cpu (CUDA only): training eagerly"]
    assert not [ln for ln in outs[""][1].splitlines() if ln.startswith("--cuda_graphs")]
    assert (outs[""][0] / METRICS).read_bytes() == (outs["--cuda_graphs"][0] / METRICS).read_bytes()
    assert "cuda_graphs" not in json.loads((outs[""][0] / METRICS).read_text())["config"]


def test_buckets_cover_cola_with_few_shapes(cola):
    """Every CoLA training batch fits a bucket (no shape beyond them), in at most len(BUCKETS) graphs."""
    lengths = {bucket_length(b.ids.size(1)) for b in iterate(cola["train"], 32, shuffle=True, seed=1)}
    assert lengths <= set(BUCKETS)


# ---------------------------------------------------------------- the graphed step's bookkeeping, on CPU

class ReplayedGraphs(CudaGraphs):
    """CudaGraphs with its own replay (which must refill the learning-rate tensors from the schedule) and a
    capture played on the CPU: the warm-up steps, then the step run as captured (reading AdamW's learning rate
    from the tensors, as the graph does) and returned as a graph whose replay runs the step the same way."""

    def __init__(self, optimizer: torch.optim.Optimizer):  # no CUDA: no pool, no stream
        self.optimizer = optimizer
        self.lrs = [torch.zeros(()) for _ in optimizer.param_groups]
        self.captures = self.replays = 0

    def capture(self, step):
        for _ in range(WARMUP_STEPS):
            step()
        with tensor_lr(self.optimizer, self.lrs):
            step()
        self.captures += 1
        return ReplayedGraphs.Graph(self, step)

    class Graph:
        def __init__(self, owner: "ReplayedGraphs", step):
            self.owner, self.step = owner, step

        def replay(self) -> None:
            """What the captured kernels do: AdamW reads the lr tensors as they are now (not refilled here)."""
            groups = self.owner.optimizer.param_groups
            saved = [(g["lr"], g["capturable"]) for g in groups]
            for g, lr in zip(groups, self.owner.lrs):
                g["lr"], g["capturable"] = lr, True
            try:
                self.step()
            finally:
                for g, (lr, capturable) in zip(groups, saved):
                    g["lr"], g["capturable"] = lr, capturable
            self.owner.replays += 1


def test_every_replay_uses_the_schedules_current_learning_rate(tiny_gpt2, cola, one_thread):
    """Warm-up then decay, so the learning rate differs at every step: the replayed graphs train exactly as the
    same fixed-shape step run eagerly, which reads the scheduler's float each step. A replay that used the rate
    of its capture would not."""
    batches = list(iterate(subset(cola["train"], 200), 32, shuffle=True, seed=3))
    runs, graphs = [], None
    for graphed in (False, True):
        model = lora_gpt(tiny_gpt2).train()
        optimizer = make_optimizer(model, 1e-2, 0.01)
        step = FixedShapeStep(model, cross_entropy, optimizer, 1.0, 32, RunningMetrics(CPU), CPU, FP32, graphs=False)
        if graphed:
            step.cuda_graphs = graphs = ReplayedGraphs(optimizer)
        runs.append(run_steps(step, model, optimizer, batches))
    assert graphs.replays == len(batches) and graphs.captures == len({bucket_length(b.ids.size(1)) for b in batches})
    assert graphs.captures < len(batches)  # some replays come after their capture's step
    assert runs[1][0] == pytest.approx(runs[0][0], rel=1e-6, abs=1e-7)
    for a, b in zip(runs[1][1], runs[0][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_the_step_is_captured_with_autocasts_weight_cache_off(tiny_gpt2, cola, one_thread):
    """A cached cast weight would be a tensor of the capture, stale at every replay after the weights change:
    every forward of the fixed-shape step, the captured one included, runs under autocast with its cache off."""
    model = lora_gpt(tiny_gpt2).train()
    optimizer = make_optimizer(model, 1e-2, 0.01)
    step = FixedShapeStep(model, cross_entropy, optimizer, 1.0, 32, RunningMetrics(CPU), CPU,
                          Precision("bf16", "cpu"), graphs=False)
    step.cuda_graphs = graphs = ReplayedGraphs(optimizer)
    seen = []
    model.transformer.h[0].register_forward_pre_hook(
        lambda m, a: seen.append((torch.is_autocast_enabled("cpu"), torch.is_autocast_cache_enabled())))
    for batch in list(iterate(subset(cola["train"], 64), 32, shuffle=True, seed=3)):
        step(batch)
    assert graphs.captures >= 1 and graphs.replays == 2
    assert len(seen) == graphs.captures * (WARMUP_STEPS + 1) + graphs.replays
    assert set(seen) == {(True, False)}


def test_the_fixed_shape_loss_averages_over_real_rows_only(tiny_gpt2, cola, one_thread):
    """A full batch and a short one (8 real rows in a 32-row bucket), metrics kept across both: the fixed-shape
    step's epoch loss and accuracy equal the eager step's, which never sees a pad row, and each step's loss is
    the cross-entropy over the real rows (read back per step as well)."""
    train = subset(cola["train"], 40)
    batches = [collate(train, list(range(32))), collate(train, list(range(32, 40)))]
    reads = {}
    for kind in ("eager", "fixed"):
        model = lora_gpt(tiny_gpt2).train()
        optimizer = make_optimizer(model, 1e-2, 0.01)
        metrics = RunningMetrics(CPU)
        step = (EagerStep(model.classify, cross_entropy, optimizer, 1.0, metrics, CPU, FP32) if kind == "eager" else
                FixedShapeStep(model, cross_entropy, optimizer, 1.0, 32, metrics, CPU, FP32, graphs=False))
        per_step = []
        for batch in batches:
            before = metrics.sums.clone()
            with torch.no_grad():
                model.eval()
                want = F.cross_entropy(model.classify(batch.ids, batch.lengths), batch.labels).item()
                model.train()
            step(batch)
            loss_sum = (metrics.sums - before)[RunningMetrics.LOSS].item()
            rows = (metrics.sums - before)[RunningMetrics.ROWS].item()
            assert rows == len(batch.labels), kind
            per_step.append((loss_sum / rows, want))
        reads[kind] = metrics.read()
        for got, want in per_step:
            assert got == pytest.approx(want, rel=1e-5), kind
    assert reads["fixed"]["loss"] == pytest.approx(reads["eager"]["loss"], rel=1e-6)
    assert reads["fixed"]["acc"] == reads["eager"]["acc"]
