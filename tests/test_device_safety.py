"""What the devices this project cannot run here (Apple MPS, CUDA cards with bf16) need of a training step, checked
on the CPU by recording what the step dispatches.

- No float64 tensor in a default student step (MPS has no float64): every op's output dtype is recorded by a
  TorchDispatchMode. The lazy Adam's bias correction, now float32, stays within 1e-6 of the float64 formula.
- The student runs in fp32 with autocast off under bf16 and fp16 autocast, in training, distillation,
  evaluation and prediction (a hook on its recurrent layer); the teacher's head runs outside autocast, so its
  logits are true fp32, and teacher caches written before that change miss.
- Host syncs: a teacher step dispatches none of the ops that make the host wait for the device
  (aten._local_scalar_dense, aten.nonzero); a student step only those that read its packed sequence's
  batch_sizes, which PyTorch keeps on the host by design.
- Sparse clipping works without torch.nn.utils.get_total_norm (public only in later torches than the floor).
- The CUDA-graph warm-up and capture leave the random generator where it was (the capture faked on the CPU).

Bugs these tests exist to catch: float64 bias correction (the code before, planted back: fails); the recurrent
layer under autocast; the head under autocast; a boolean-mask hard loss or `if labelled.any()` (a sync); a
warm-up that draws dropout masks and leaves the generator moved.
"""

from __future__ import annotations

import hashlib
import traceback

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from data import Dataset, collate, iterate
from distill import cache_key, data_fingerprint, make_kd_loss
from lora import inject_lora
from metrics import predict_logits
from model import GPT, DistilRNN
from optim import AdamW, bias_correction, clip_grad_norm_
from precision import Precision
from train_step import EagerStep, FixedShapeStep, RunningMetrics
from trainer import make_optimizer

CPU = torch.device("cpu")
SYNC_OPS = ("aten._local_scalar_dense.", "aten.nonzero.")


class Recorder(TorchDispatchMode):
    """Every op dispatched: its name, its output dtypes, its tensor inputs, the line of our code that ran it, and
    the names of the Python files (ours and torch's) on its stack."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, list[torch.dtype], list[torch.Tensor], str]] = []
        self.files: list[set[str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else [out]
        inputs = [a for a in args if isinstance(a, torch.Tensor)]
        stack = traceback.extract_stack()[:-1]
        self.files.append({f.filename.rsplit("/", 1)[-1] for f in stack})
        frames = [f for f in stack if "/torch/" not in f.filename]
        where = f"{frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno}" if frames else "?"
        self.ops.append((str(func), [o.dtype for o in outs if isinstance(o, torch.Tensor)], inputs, where))
        return out


def student(cola, sparse: bool = True) -> DistilRNN:
    """train_distil.py's default student, narrower (the full vocabulary and its sparse gradient, a GRU)."""
    torch.manual_seed(0)
    m = DistilRNN(embd_dim=16, hidden_size=8)
    m.wte.sparse = sparse
    return m


def student_step(cola, precision: str, model: DistilRNN | None = None) -> tuple[EagerStep, list]:
    """A default distillation step (kd loss, clipping, lazy AdamW, running metrics), run once to create the
    optimizer state, and the batches to run it on."""
    m = model or student(cola)
    teacher = torch.randn(len(cola["train"]), 2)
    step = EagerStep(m.classify, make_kd_loss(teacher, 2.0, 0.5), make_optimizer(m, 1e-3, 0.01), 1.0,
                     RunningMetrics(CPU), CPU, Precision(precision, "cpu"))
    batches = list(iterate(Dataset("t", *(getattr(cola["train"], k)[:64] for k in ("sentences", "ids", "labels"))),
                           16, shuffle=True, seed=0))
    step(batches[0])
    return step, batches


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_default_student_step_creates_no_float64(cola, precision):
    step, batches = student_step(cola, precision)
    with Recorder() as rec:
        step(batches[1])
    f64 = [(op, where) for op, dtypes, _, where in rec.ops if torch.float64 in dtypes]
    assert any("index_add_" in op for op, *_ in rec.ops), "the lazy Adam did not run"
    assert not f64, f64


def test_fp16_student_step_creates_float64_only_in_torchs_grad_scaler(cola):
    """torch's GradScaler.unscale_ itself takes the reciprocal of its scale in float64; fp16 is never MPS's default
    (precision.choose_precision gives it fp32)."""
    step, batches = student_step(cola, "fp16")
    with Recorder() as rec:
        step(batches[1])
    f64 = [(op, where, files) for (op, dtypes, _, where), files in zip(rec.ops, rec.files) if torch.float64 in dtypes]
    assert f64 and all("grad_scaler.py" in files for *_, files in f64), [(op, where) for op, where, _ in f64]


@pytest.mark.parametrize("beta", [0.9, 0.999, 0.9999])
def test_float32_bias_correction_is_within_1e_6_of_float64(beta):
    steps = torch.tensor([1, 2, 3, 7, 10, 100, 1000, 10_000, 100_000, 1_000_000, 2 ** 24], dtype=torch.float32)
    ours = bias_correction(beta, steps)
    assert ours.dtype == torch.float32
    exact = 1 - beta ** steps.double()
    assert ((ours.double() - exact).abs() / exact).max() < 1e-6


def test_lazy_step_matches_the_float64_bias_correction_over_many_steps(cola):
    """The lazy update with float32 bias correction against the same update with float64 bias correction (the code
    before), 300 steps of the same sparse gradients: the rows agree to float32 rounding."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(40, 6))
    ref = w.detach().double().clone()
    m, v = torch.zeros_like(ref), torch.zeros_like(ref)
    opt = AdamW([w], lr=1e-2, weight_decay=0.0)
    for t in range(1, 301):
        rows = torch.randint(0, 40, (8,)).unique()
        values = torch.randn(len(rows), 6)
        w.grad = torch.sparse_coo_tensor(rows[None], values, w.shape)
        opt.step()
        g = values.double()
        m[rows] = m[rows] * 0.9 + 0.1 * g
        v[rows] = v[rows] * 0.999 + 0.001 * g * g
        ref[rows] -= 1e-2 / (1 - 0.9 ** t) * m[rows] / ((v[rows] / (1 - 0.999 ** t)).sqrt() + 1e-8)
    assert (w.detach().double() - ref).abs().max() < 1e-5


def test_a_first_lazy_step_skipped_by_the_scaler_changes_nothing_and_reads_nothing_on_the_host():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(10, 4))
    before = w.detach().clone()
    opt = AdamW([w], lr=1e-2, weight_decay=0.0)
    opt.grad_scale, opt.found_inf = torch.tensor(2.0 ** 16), torch.tensor(1.0)
    w.grad = torch.sparse_coo_tensor(torch.tensor([[1, 3]]), torch.full((2, 4), float("inf")), w.shape)
    with Recorder() as rec:
        opt.step()
    assert not [op for op, *_ in rec.ops if op.startswith(SYNC_OPS)]
    assert torch.equal(w.detach(), before)
    st = opt.state[w]
    assert st["step"].item() == 0 and not st["exp_avg"].any() and not st["exp_avg_sq"].any()


def test_sparse_clipping_does_not_need_get_total_norm(monkeypatch):
    """torch.nn.utils.get_total_norm is public only from torch 2.6; requirements.txt promises torch>=2.4."""
    monkeypatch.delattr(torch.nn.utils, "get_total_norm", raising=False)
    torch.manual_seed(0)
    emb, lin = torch.nn.Parameter(torch.randn(10, 4)), torch.nn.Parameter(torch.randn(3, 4))
    values = torch.randn(3, 4)
    emb.grad = torch.sparse_coo_tensor(torch.tensor([[1, 3, 1]]), values, emb.shape)
    lin.grad = torch.randn(3, 4)
    dense = emb.grad.to_dense()
    expected = torch.cat([dense.flatten(), lin.grad.flatten()]).norm()
    total = clip_grad_norm_([emb, lin], 0.5)
    assert torch.allclose(total, expected)
    assert torch.allclose(torch.cat([emb.grad.to_dense().flatten(), lin.grad.flatten()]).norm(), torch.tensor(0.5),
                          rtol=1e-4)


# ---------------------------------------------------------------- fp32 where it matters, under every autocast

def record_rnn(m: DistilRNN) -> list[tuple[bool, bool, torch.dtype, torch.dtype]]:
    """A hook on the recurrent layer: (cpu autocast on?, cuda autocast on?, input dtype, output dtype) per call."""
    seen = []

    def hook(module, args, out):
        seen.append((torch.is_autocast_enabled("cpu"), torch.is_autocast_enabled("cuda"), args[0].data.dtype,
                     out[0].data.dtype))
    m.rnn.register_forward_hook(hook)
    return seen


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("cell", ["gru", "lstm", "rnn"])
def test_the_student_runs_in_fp32_with_autocast_off_in_training_distillation_evaluation_prediction(
        cola, precision, cell):
    torch.manual_seed(0)
    m = DistilRNN(embd_dim=16, hidden_size=8, cell=cell)
    m.wte.sparse = True
    seen = record_rnn(m)
    step, batches = student_step(cola, precision, m)  # training, distillation loss
    dev = Dataset("d", *(getattr(cola["dev"], k)[:20] for k in ("sentences", "ids", "labels")))
    logits = predict_logits(m, dev, 8, CPU, Precision(precision, "cpu"))  # evaluation and predict.py
    train_ce = EagerStep(m.classify, lambda lg, b: F.cross_entropy(lg, b.labels), make_optimizer(m, 1e-3, 0.0), 1.0,
                         RunningMetrics(CPU), CPU, Precision(precision, "cpu"))
    train_ce(batches[1])  # from scratch, on the labels
    assert len(seen) == 1 + 3 + 1
    assert all(s == (False, False, torch.float32, torch.float32) for s in seen), seen
    assert logits.dtype == torch.float32


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_the_teachers_head_runs_outside_autocast_so_its_logits_are_fp32(tiny_gpt2, cola, precision):
    torch.manual_seed(0)
    model = GPT.from_pretrained(str(tiny_gpt2))
    inject_lora(model, 4, 8.0, 0.0)
    seen = []
    model.score.register_forward_hook(lambda mod, args, out: seen.append(
        (torch.is_autocast_enabled("cpu"), args[0], out)))
    batch = collate(cola["dev"], list(range(8)))
    with Precision(precision, "cpu").autocast():
        logits = model.classify(batch.ids, batch.lengths)
    [(autocast, head_in, head_out)] = seen
    assert not autocast and head_in.dtype == head_out.dtype == logits.dtype == torch.float32
    with torch.no_grad():  # the head's own fp32 product, not one rounded to the low dtype on the way out
        assert torch.equal(logits, F.linear(head_in, model.score.weight))


def test_teacher_caches_written_before_the_fp32_head_miss(cola):
    """The key the cache used before (the head under autocast, bf16-rounded logits) must not be the key now."""
    ds, teacher = cola["dev"], "f" * 64
    for device in ("cpu", "cuda"):
        for p in ("fp32", "bf16", "fp16"):
            old = hashlib.sha256(":".join((teacher, data_fingerprint(ds), device, p)).encode()).hexdigest()[:24]
            assert cache_key(teacher, ds, torch.device(device), Precision(p, device)) != old


# ---------------------------------------------------------------- what makes the host wait for the device

def sync_ops(rec: Recorder) -> list[tuple[str, str, list[torch.Tensor]]]:
    return [(op, where, inputs) for op, _, inputs, where in rec.ops if op.startswith(SYNC_OPS)]


def test_a_teacher_step_forces_no_host_sync(tiny_gpt2, cola):
    torch.manual_seed(0)
    model = GPT.from_pretrained(str(tiny_gpt2))
    inject_lora(model, 4, 8.0, 0.1)
    loss = make_kd_loss(torch.randn(len(cola["train"]), 2), 2.0, 0.5)  # also the loss with unlabelled rows
    for precision in ("fp32", "fp16"):
        step = EagerStep(model.classify, loss, make_optimizer(model, 1e-3, 0.01), 1.0, RunningMetrics(CPU), CPU,
                         Precision(precision, "cpu"))
        batch = collate(cola["train"], list(range(8)))
        step(batch)
        with Recorder() as rec:
            step(batch)
        assert not sync_ops(rec), [(op, where) for op, where, _ in sync_ops(rec)]


def test_a_student_step_syncs_only_to_read_the_packed_sequences_host_batch_sizes(cola):
    """pack_padded_sequence keeps batch_sizes on the CPU (it takes the lengths there: data.Batch.to keeps them on
    the host), and nn.GRU reads batch_sizes[0]: host memory, no wait for the device. The sparse gradient's
    coalesce() also needs its row count on the host on CUDA; it reads it inside ATen, not through an op."""
    m = student(cola)
    packed = []
    m.rnn.register_forward_pre_hook(lambda mod, args: packed.append(args[0].batch_sizes))
    for precision in ("fp32", "fp16"):
        step, batches = student_step(cola, precision, m)
        packed.clear()
        with Recorder() as rec:
            step(batches[1])
        host = {t.untyped_storage().data_ptr() for t in packed}
        device_reads = [(op, where) for op, where, inputs in sync_ops(rec)
                        if not all(t.untyped_storage().data_ptr() in host for t in inputs)]
        assert not device_reads, device_reads
        assert sync_ops(rec), "nn.GRU reads the host batch_sizes: the recorder saw nothing"


def test_a_batch_moved_to_a_device_keeps_its_lengths_on_the_host(cola):
    batch = collate(cola["dev"], list(range(4))).to(torch.device("meta"))
    assert batch.ids.device.type == "meta" and batch.labels.device.type == "meta"
    assert batch.lengths.device.type == "cpu"


# ---------------------------------------------------------------- the CUDA-graph warm-up and the generator

def test_capture_warmup_leaves_the_random_generator_where_it_was(tiny_gpt2, cola):
    from test_fast_step import CpuGraphs
    torch.manual_seed(0)
    model = GPT.from_pretrained(str(tiny_gpt2))
    inject_lora(model, 4, 8.0, dropout=0.1)  # dropout: warm-up and capture steps draw masks
    model.train()
    step = FixedShapeStep(model, lambda logits, b: F.cross_entropy(logits, b.labels),
                          make_optimizer(model, 1e-3, 0.01), 1.0, 16, RunningMetrics(CPU), CPU,
                          Precision("fp32", "cpu"), graphs=False)
    step.cuda_graphs = CpuGraphs()
    batch = collate(cola["train"], list(range(16)))
    rng = torch.get_rng_state()
    saved = step._snapshot()
    step._capture(16, batch)  # warm-up steps and the "capture", then the weights and the generator put back
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(p, q) for p, q in zip(step.params, saved[0]))


def test_the_student_embedding_gradient_is_dense_on_mps_and_sparse_elsewhere(capsys):
    """torch's sparse tensors do not run on MPS (NotImplementedError on SparseMPS before torch 2.9): a Mac trains
    the embedding on its dense gradient, and says so in one line."""
    from train_distil import sparse_embedding_grad
    assert sparse_embedding_grad(False, torch.device("cpu")) and sparse_embedding_grad(False, torch.device("cuda"))
    assert not sparse_embedding_grad(True, torch.device("cpu"))
    assert capsys.readouterr().out == ""
    assert not sparse_embedding_grad(False, torch.device("mps"))
    assert capsys.readouterr().out.count("\n") == 1
