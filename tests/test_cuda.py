"""The CUDA path: equivalence with transformers on the GPU, bf16 autocast, merge/unmerge, padding invariance,
and train_lora.py --cuda_graphs (train_step.FixedShapeStep): the graphed step against the eager one and against
the same fixed-shape step run eagerly, fresh dropout masks on every replay, one shared memory pool, the fallback
when a capture fails (a later bucket, dropout on). Skipped where there is no GPU (CI); bench/gpu_check.sh runs
them on one. The fallback's bookkeeping also runs on CPU, with a faked capture (tests/test_fast_step.py).

Bugs these tests exist to catch: GPU logits that differ from transformers'; bf16 autocast off, or too far
from fp32; merge/unmerge or padding invariance that holds on CPU only; a graphed step that drifts from the
eager one or replays the same dropout mask; a failed capture that is not a clean fallback, or that leaks its
memory pool; fp16 gradients not unscaled, or an overflow not skipped; a host sync in a teacher step; the
student's recurrent layer in fp16 under cuDNN's RNN autocast; LoRA gradients that differ from PEFT's on the GPU.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import make_gpt2_checkpoint
from data import Dataset, collate, iterate
from lora import inject_lora, lora_modules, merge_lora, unmerge_lora
from model import GPT, DistilRNN
from precision import Precision, store_frozen_weights
from train_step import EagerStep, FixedShapeStep, RunningMetrics, bucket_length
from trainer import make_optimizer, warmup_linear

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")
BF16 = Precision("bf16", "cuda")


@pytest.fixture(scope="module")
def gpt2_shape(tmp_path_factory):
    return make_gpt2_checkpoint(tmp_path_factory.mktemp("gpt2_cuda"), n_layer=12, n_head=12, n_embd=768,
                                n_positions=1024)


def test_logits_match_transformers_on_gpu(gpt2_shape, cola):
    from transformers import GPT2LMHeadModel
    batch = collate(cola["dev"], list(range(16)))
    ours = GPT.from_pretrained(str(gpt2_shape)).to(CUDA).eval()
    hf = GPT2LMHeadModel.from_pretrained(gpt2_shape, attn_implementation="eager").to(CUDA).eval()
    ids = batch.ids.to(CUDA)
    with torch.no_grad():
        diff = (ours(ids)[0] - hf(ids).logits).abs().max().item()
    assert diff < 1e-4, diff


def test_bf16_autocast_classify_is_close_to_fp32_and_trains(gpt2_shape, cola):
    torch.manual_seed(0)
    model = GPT.from_pretrained(str(gpt2_shape))
    inject_lora(model, 8, 16.0, 0.1)
    model.to(CUDA)
    batch = collate(cola["dev"], list(range(32))).to(CUDA)
    model.eval()
    with torch.no_grad():
        fp32 = model.classify(batch.ids, batch.lengths)
        with BF16.autocast():
            bf16 = model.classify(batch.ids, batch.lengths)
    assert bf16.dtype == torch.bfloat16
    assert (bf16.float() - fp32).abs().max().item() < 0.05 * fp32.abs().max().item() + 1e-2
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(20):
        with BF16.autocast():
            loss = F.cross_entropy(model.classify(batch.ids, batch.lengths).float(), batch.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]  # it fits a fixed batch


def test_merge_unmerge_on_gpu(gpt2_shape, cola):
    torch.manual_seed(0)
    model = GPT.from_pretrained(str(gpt2_shape))
    inject_lora(model, 8, 16.0)
    for m in lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B, std=0.02)
    model.to(CUDA).eval()
    batch = collate(cola["dev"], list(range(16))).to(CUDA)
    with torch.no_grad():
        before = model.classify(batch.ids, batch.lengths)
        merge_lora(model)
        merged = model.classify(batch.ids, batch.lengths)
        unmerge_lora(model)
        after = model.classify(batch.ids, batch.lengths)
    torch.testing.assert_close(merged, before, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_rnn_padding_invariance_on_gpu(cola):
    torch.manual_seed(0)
    m = DistilRNN(embd_dim=64, hidden_size=64).to(CUDA).eval()
    dev = cola["dev"]
    long_ = max(range(len(dev)), key=lambda i: len(dev.ids[i]))
    alone, padded = collate(dev, [0]).to(CUDA), collate(dev, [long_, 0]).to(CUDA)
    with torch.no_grad():
        a = m.classify(alone.ids, alone.lengths)[0]
        b = m.classify(padded.ids, padded.lengths)[1]
    torch.testing.assert_close(b, a, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- train_lora.py --cuda_graphs (train_step.py)

def _lora_model(ckpt, dropout: float = 0.0) -> GPT:
    torch.manual_seed(0)
    model = GPT.from_pretrained(str(ckpt))
    inject_lora(model, 8, 16.0, dropout)
    for m in lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B, std=0.02)
    return model.to(CUDA).train()


def _losses(step, optimizer, batches, schedule: bool = True) -> list[float]:
    """Each step's loss, read back after the step (a test may synchronise; fit does not)."""
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_linear(len(batches), 0.2) if schedule else lambda step: 1.0)
    out = []
    for b in batches:
        step.metrics.reset()
        step(b)
        scheduler.step()
        out.append(step.metrics.read()["loss"])
    return out


def _batches(cola, n: int = 12):
    """n CoLA training batches over at least two length buckets, one of them short (8 rows)."""
    tr = cola["train"]
    rows = 32 * (n - 1) + 8
    batches = list(iterate(Dataset("t", tr.sentences[:rows], tr.ids[:rows], tr.labels[:rows]), 32, True, seed=1))
    assert len({bucket_length(b.ids.size(1)) for b in batches}) >= 2
    assert min(len(b.labels) for b in batches) == 8
    return batches


def _ce(logits, batch):
    return F.cross_entropy(logits, batch.labels)


def test_graphed_steps_match_eager_steps_in_bf16(gpt2_shape, cola, capsys):
    """N steps of --cuda_graphs (graphs, bf16 frozen weights, fused AdamW with a tensor lr) and of the default
    eager step, from the same start on the same batches: the same losses within bf16 tolerance."""
    batches = _batches(cola)
    eager_model, graph_model = _lora_model(gpt2_shape), _lora_model(gpt2_shape)
    opt_e, opt_g = make_optimizer(eager_model, 4e-4, 0.01), make_optimizer(graph_model, 4e-4, 0.01)
    eager = EagerStep(eager_model.classify, _ce, opt_e, 1.0, RunningMetrics(CUDA), CUDA, BF16)
    graphed = FixedShapeStep(graph_model, _ce, opt_g, 1.0, 32, RunningMetrics(CUDA), CUDA, BF16, graphs=True)
    le, lg = _losses(eager, opt_e, batches), _losses(graphed, opt_g, batches)
    assert "capturing" not in capsys.readouterr().out  # no fallback happened
    assert len(graphed.graphs) >= 2  # one graph per length bucket seen
    assert {g.pool() for g in graphed.graphs.values()} == {graphed.cuda_graphs.pool}  # one pool for all
    assert graph_model.transformer.h[0].attn.c_attn.weight.dtype == torch.bfloat16
    assert graph_model.transformer.h[0].attn.c_attn.lora_A.dtype == torch.float32
    assert all(math.isfinite(x) for x in lg)
    for a, b in zip(lg, le):
        assert abs(a - b) < 2e-2 + 2e-2 * abs(b), (lg, le)


def test_graphed_step_trains_with_lora_dropout(gpt2_shape, cola):
    """Dropout under replay draws new masks each step (the default CUDA generator is registered by every
    capture): it fits a fixed batch, as test_bf16_autocast_classify_is_close_to_fp32_and_trains does eagerly."""
    model = _lora_model(gpt2_shape, dropout=0.1)
    opt = make_optimizer(model, 1e-3, 0.0)
    step = FixedShapeStep(model, _ce, opt, 0.0, 32, RunningMetrics(CUDA), CUDA, BF16, graphs=True)
    batch = collate(cola["dev"], list(range(32)))
    losses = _losses(step, opt, [batch] * 20, schedule=False)
    assert len(step.graphs) == 1 and losses[-1] < 0.5 * losses[0], losses


def test_capture_failure_falls_back_to_eager_with_one_line(gpt2_shape, cola, capsys):
    """A loss that reads a value back to the host cannot be captured: one line says so, and the run goes on
    eagerly with the same results as the eager step."""

    def syncing_ce(logits, batch):
        loss = F.cross_entropy(logits, batch.labels)
        return loss + 0.0 * loss.item()  # .item() is illegal while a stream is being captured

    batches = _batches(cola, n=6)
    eager_model, fallback_model = _lora_model(gpt2_shape), _lora_model(gpt2_shape)
    opt_e, opt_f = make_optimizer(eager_model, 4e-4, 0.01), make_optimizer(fallback_model, 4e-4, 0.01)
    eager = EagerStep(eager_model.classify, _ce, opt_e, 1.0, RunningMetrics(CUDA), CUDA, BF16)
    fallback = FixedShapeStep(fallback_model, syncing_ce, opt_f, 1.0, 32, RunningMetrics(CUDA), CUDA, BF16, graphs=True)
    le, lf = _losses(eager, opt_e, batches), _losses(fallback, opt_f, batches)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "cuda_graphs" in ln]
    assert len(lines) == 1 and "training continues eagerly" in lines[0], lines
    assert not fallback.graphs and fallback.cuda_graphs is None
    for a, b in zip(lf, le):
        assert abs(a - b) < 2e-2 + 2e-2 * abs(b), (lf, le)


def test_graphed_steps_equal_the_same_fixed_shape_step_run_eagerly(gpt2_shape, cola):
    """The graphs against the very step they captured, run eagerly (same bf16 frozen weights, same fused AdamW,
    same padding), with no synchronisation between steps: buckets revisited, a short last batch, the lr changing
    every step. A replay that read a stale input buffer or lr, or ran a step twice or not at all, moves the weights
    by a sizeable part of their 12-step update (one step of 12 is ~8%); the attention backward's run-to-run noise
    moves them by far less than the 1% allowed."""
    batches = _batches(cola, n=12)
    lengths = [bucket_length(b.ids.size(1)) for b in batches]
    assert len(set(lengths)) < len(lengths) and len(set(lengths)) >= 2  # some bucket is revisited
    steps, weights = [], []
    for graphs in (False, True):
        model = _lora_model(gpt2_shape)
        store_frozen_weights(model, BF16.dtype)  # the graphed step does this itself
        optimizer = make_optimizer(model, 4e-4, 0.01)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear(len(batches), 0.3))
        step = FixedShapeStep(model, _ce, optimizer, 1.0, 32, RunningMetrics(CUDA), CUDA, BF16, graphs=graphs)
        start = torch.cat([p.detach().flatten() for p in step.params])
        for b in batches:  # no .item(), no synchronize: fit's pattern
            step(b)
            scheduler.step()
        steps.append(step)
        weights.append(torch.cat([p.detach().flatten() for p in step.params]))
    eager, graphed = steps
    assert len(graphed.graphs) == len(set(lengths)) and not eager.graphs
    n = [[int(s.optimizer.state[p]["step"]) for p in s.params] for s in steps]
    assert n[1] == n[0] == [len(batches)] * len(n[0])
    for ge, gg in zip(eager.optimizer.param_groups, graphed.optimizer.param_groups):
        assert isinstance(gg["lr"], float) and gg["lr"] == ge["lr"]
    update, diff = (weights[0] - start).norm().item(), (weights[1] - weights[0]).norm().item()
    assert update > 0 and diff <= 0.01 * update, (diff, update)
    se, sg = eager.metrics.sums.tolist(), graphed.metrics.sums.tolist()
    M = RunningMetrics
    for k in (M.ROWS, M.LABELLED, M.STEPS, M.BAD_STEP):
        assert sg[k] == se[k], (k, sg, se)
    assert sg[M.ROWS] == sum(len(b.labels) for b in batches) and sg[M.STEPS] == len(batches)
    assert abs(sg[M.CORRECT] - se[M.CORRECT]) <= 1  # a near-tie logit may flip with the noise
    assert sg[M.LOSS] == pytest.approx(se[M.LOSS], rel=1e-3)


def test_dropout_masks_are_fresh_on_every_replay(gpt2_shape, cola):
    """Dropout 0.5 and lr 0: the weights never move, so only new masks can change the gradients from one replay of
    the same batch to the next. Equal gradients would mean the graph replays one frozen mask."""
    model = _lora_model(gpt2_shape, dropout=0.5)
    optimizer = make_optimizer(model, 0.0, 0.0)
    step = FixedShapeStep(model, _ce, optimizer, 0.0, 32, RunningMetrics(CUDA), CUDA, BF16, graphs=True)
    batch = collate(cola["dev"], list(range(32)))
    lora_A = model.transformer.h[0].attn.c_attn.lora_A
    before = lora_A.detach().clone()
    grads = []
    for _ in range(4):
        step(batch)
        grads.append(lora_A.grad.detach().clone())
    assert len(step.graphs) == 1 and step.cuda_graphs is not None
    assert torch.equal(lora_A.detach(), before)
    for a, b in zip(grads, grads[1:]):
        assert not torch.equal(a, b)
        assert torch.isfinite(b).all() and b.abs().sum() > 0


def test_a_later_bucket_failing_to_capture_with_dropout_on_finishes_the_run(gpt2_shape, cola, capsys):
    """LoRA dropout on (its default 0.1), the first bucket captured, the second bucket's capture failing (its loss
    reads a value back, illegal while capturing): one line with the real cause, no graph left, and the run goes on
    eagerly to its end, drawing dropout masks (on torch <= 2.10 the generator was left in capture mode and this
    raised "Offset increment outside graph capture")."""
    batches = _batches(cola, n=12)
    lengths = [bucket_length(b.ids.size(1)) for b in batches]
    failing = next(n for n in lengths if n != lengths[0])

    def ce_syncing_on_one_bucket(logits, batch):
        loss = F.cross_entropy(logits, batch.labels)
        return loss + 0.0 * loss.item() if batch.ids.size(1) == failing else loss

    model = _lora_model(gpt2_shape, dropout=0.1)
    optimizer = make_optimizer(model, 4e-4, 0.01)
    step = FixedShapeStep(model, ce_syncing_on_one_bucket, optimizer, 1.0, 32, RunningMetrics(CUDA), CUDA, BF16,
                          graphs=True)
    losses = _losses(step, optimizer, batches)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "cuda_graphs" in ln]
    assert len(lines) == 1 and f"the {failing}-token step failed" in lines[0], lines
    assert "stream is capturing" in lines[0] and "previous error" not in lines[0], lines
    assert step.graphs == {} and step.cuda_graphs is None
    assert len(losses) == len(batches) and all(math.isfinite(x) for x in losses), losses
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    torch.nn.functional.dropout(torch.ones(8, device=CUDA), 0.5)  # the generator is usable


# ---------------------------------------------------------------- silent wrong results (issue 21)

FP16 = Precision("fp16", "cuda")


def _correctness():
    """bench/gpu_correctness.py, the device check's first step: its checks are these tests' references."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import gpu_correctness
    return gpu_correctness


def test_fp16_eager_step_gradients_after_unscaling_match_fp32(gpt2_shape, cola):
    """The gradients the fp16 step hands AdamW (scaled, unscaled, clipped at 1.0) against fp32's: a dropped or
    doubled unscale makes them wrong by a factor of 2^16, not by rounding."""
    gc = _correctness()
    model = _lora_model(gpt2_shape).eval()
    batch = collate(cola["dev"], list(range(32))).to(CUDA)
    ref = gc.step_grads(model, batch, CUDA, Precision("fp32", "cuda"))
    err, worst, worst_err = gc.rel_error(gc.step_grads(model, batch, CUDA, FP16), ref)
    assert err <= gc.GRAD_TOL["fp16"], (err, worst, worst_err)


def test_fp16_step_with_an_overflow_is_skipped_and_counted(gpt2_shape, cola):
    model = _lora_model(gpt2_shape)
    optimizer = make_optimizer(model, 4e-4, 0.01)
    overflow = {"now": False}

    def ce(logits, batch):  # an inf loss on the planted step: every gradient overflows
        loss = F.cross_entropy(logits, batch.labels)
        return loss * float("inf") if overflow["now"] else loss

    step = EagerStep(model.classify, ce, optimizer, 1.0, RunningMetrics(CUDA), CUDA, FP16)
    batch = collate(cola["train"], list(range(32)))
    step(batch)
    scale = step.scaler.get_scale()
    before = [p.detach().clone() for p in step.params]
    overflow["now"] = True
    step(batch)
    assert all(torch.equal(p, q) for p, q in zip(step.params, before))  # the step was skipped
    assert step.metrics.read()["skipped"] == 1
    assert step.scaler.get_scale() == scale / 2


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_a_teacher_step_never_waits_for_the_device(gpt2_shape, cola, precision):
    model = _lora_model(gpt2_shape, dropout=0.1)
    step = EagerStep(model.classify, _ce, make_optimizer(model, 4e-4, 0.01), 1.0, RunningMetrics(CUDA), CUDA,
                     Precision(precision, "cuda"))
    batch = collate(cola["train"], list(range(32)))
    step(batch)  # creates AdamW's state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_student_recurrent_layer_runs_in_fp32_on_cuda(cola, precision):
    """cuDNN's RNN autocast wrapper casts to fp16 whatever the autocast dtype: the student turns autocast off."""
    from distill import make_kd_loss
    torch.manual_seed(0)
    m = DistilRNN(embd_dim=64, hidden_size=32)
    m.wte.sparse = True
    m.to(CUDA)
    seen = []
    m.rnn.register_forward_hook(lambda mod, args, out: seen.append((args[0].data.dtype, out[0].data.dtype)))
    loss = make_kd_loss(torch.randn(len(cola["train"]), 2), 2.0, 0.5)
    step = EagerStep(m.classify, loss, make_optimizer(m, 1e-3, 0.01), 1.0, RunningMetrics(CUDA), CUDA,
                     Precision(precision, "cuda"))
    for b in iterate(Dataset("t", *(getattr(cola["train"], k)[:64] for k in ("sentences", "ids", "labels"))), 32,
                     shuffle=True, seed=0):
        step(b)
    assert seen and all(s == (torch.float32, torch.float32) for s in seen), seen
    assert step.metrics.read()["bad_step"] == 0


def test_lora_gradients_match_peft_on_gpu_in_fp32(gpt2_shape, cola):
    gc = _correctness()
    from common import build_baseline, build_ours, copy_lora  # bench/common.py: ours and transformers + PEFT
    ours = build_ours(gpt2_shape)
    baseline = build_baseline(gpt2_shape, ours)
    with torch.no_grad():
        for m in lora_modules(ours).values():
            m.lora_B.normal_(0, 0.02)  # the adapters contribute, and A gets a gradient
    copy_lora(ours, baseline)
    ours.to(CUDA), baseline.to(CUDA)
    tf32, torch.backends.cuda.matmul.allow_tf32 = torch.backends.cuda.matmul.allow_tf32, False
    try:
        assert gc.check_against_peft(ours, baseline, collate(cola["dev"], list(range(32))).to(CUDA))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def test_after_a_failed_capture_memory_is_as_after_an_eager_step_and_a_fresh_capture_succeeds(gpt2_shape, cola):
    """The failed capture's pool is released: the memory it leaves allocated is what the same step run eagerly
    leaves (AdamW's state, the static gradients and batch buffer), and a new capture, into a new pool, works."""
    def syncing_ce(logits, batch):
        loss = F.cross_entropy(logits, batch.labels)
        return loss + 0.0 * loss.item()  # illegal while capturing

    batch = collate(cola["dev"], list(range(32)))
    grown = []
    for graphs in (False, True):
        model = _lora_model(gpt2_shape)
        optimizer = make_optimizer(model, 4e-4, 0.01)
        step = FixedShapeStep(model, syncing_ce, optimizer, 1.0, 32, RunningMetrics(CUDA), CUDA, BF16, graphs=graphs)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        step(batch)
        torch.cuda.synchronize()
        grown.append(torch.cuda.memory_allocated() - base)
        assert not step.graphs
        del model, optimizer, step
        torch.cuda.empty_cache()
    assert abs(grown[1] - grown[0]) <= 1 << 20, grown  # the graphed side: a few scalar tensors more at most
    model = _lora_model(gpt2_shape)
    step = FixedShapeStep(model, _ce, make_optimizer(model, 4e-4, 0.01), 1.0, 32, RunningMetrics(CUDA), CUDA, BF16,
                          graphs=True)
    step(batch)
    assert len(step.graphs) == 1 and step.cuda_graphs is not None


def test_compile_with_cuda_graphs_says_which_is_used(tiny_gpt2, cola_dir, tmp_path):
    from test_robustness import cli, lora_args, ok
    out = ok(cli("train_lora.py", *lora_args(tiny_gpt2, cola_dir, tmp_path / "run", rows=32)[:-2], "--device", "cuda",
                 "--precision", "bf16", "--cuda_graphs", "--compile"))
    lines = [ln for ln in out.stdout.splitlines() if "--compile" in ln]
    assert lines == ["--compile is ignored with --cuda_graphs: the step is captured as CUDA graphs, not compiled"]
