"""optim.py: the student's sparse embedding gradient and its lazy Adam.

- A lazy step changes only the rows its gradient holds, by Adam's formula with the global step (a float64
  reference written out by hand), duplicate tokens summed; every dense parameter gets torch.optim.AdamW's
  update bit for bit; a row seen at every step moves as under AdamW (to float32 rounding).
- Clipping and GradScaler.unscale_ see the same norm and values with a sparse gradient as with the dense one.
- The compact optimizer state (moments of seen rows only) round-trips exactly; a student run interrupted after
  epoch 1 and resumed writes the same checkpoint and student, byte for byte, as an uninterrupted one.

Bugs these tests exist to catch: a lazy step without Adam's bias correction, or with beta1's weights swapped
(both planted and failed); clipping that can scale a sparse gradient up (planted, failed); rows the gradient
does not hold moving; duplicate tokens not summed; optimizer state lost or shifted on resume.
"""

from __future__ import annotations

import copy
from argparse import Namespace

import pytest
import torch
import torch.nn.functional as F

from data import Batch, Dataset
from model import DistilRNN
from optim import AdamW, clip_grad_norm_
from precision import Precision
from trainer import fit, load_checkpoint, make_optimizer

VOCAB, DIM = 20, 6
PAD = VOCAB - 1  # stands for data.PAD_TOKEN, which no sentence holds
# Steps' token ids (B=2, T=4, right-padded). Rows 0 and PAD never occur in a sentence; 3 occurs twice in step 0.
STEPS = [torch.tensor([[3, 5, 3, 7], [1, 2, PAD, PAD]]), torch.tensor([[5, 6, 9, 9], [4, PAD, PAD, PAD]]),
         torch.tensor([[1, 2, 3, 4], [8, 11, PAD, PAD]])]
LENGTHS = [torch.tensor([4, 2]), torch.tensor([4, 1]), torch.tensor([4, 2])]
LABELS = torch.tensor([1, 0])


def student(sparse: bool, seed: int = 0) -> DistilRNN:
    torch.manual_seed(seed)
    m = DistilRNN(vocab_size=VOCAB, embd_dim=DIM, hidden_size=5, dropout=0.0)
    m.wte.sparse = sparse
    return m


def backward(m: DistilRNN, step: int) -> None:
    F.cross_entropy(m.classify(STEPS[step], LENGTHS[step]), LABELS).mul(100).backward()  # x100: visible updates


def seen_rows(ids: torch.Tensor, lengths: torch.Tensor) -> set[int]:
    return {int(t) for row, n in zip(ids, lengths) for t in row[:n]}


def test_lazy_step_changes_only_seen_rows_by_adams_formula_and_dense_parameters_as_adamw():
    lr, (b1, b2), eps, wd = 0.01, (0.9, 0.999), 1e-8, 0.1
    m = student(True)
    opt = make_optimizer(m, lr, wd)
    assert type(opt) is AdamW
    twin = student(True)  # its dense parameters take the same gradients under torch's own AdamW
    dense = [(n, p) for n, p in twin.named_parameters() if n != "wte.weight"]
    groups = [g for g in make_optimizer(twin, lr, wd).param_groups]
    ref_opt = torch.optim.AdamW([{"params": [p for p in g["params"] if p is not twin.wte.weight],
                                  "weight_decay": g["weight_decay"]} for g in groups], lr=lr, betas=(b1, b2), eps=eps,
                                fused=True)
    w = m.wte.weight.detach().double().clone()  # (VOCAB, DIM) the hand-written reference, float64
    exp_avg, exp_avg_sq = torch.zeros_like(w), torch.zeros_like(w)
    for t, ids in enumerate(STEPS, start=1):
        opt.zero_grad(set_to_none=True)
        backward(m, t - 1)
        assert m.wte.weight.grad.is_sparse
        g = m.wte.weight.grad.to_dense().double()  # (VOCAB, DIM) duplicate tokens summed
        for n, q in dense:
            q.grad = m.get_parameter(n).grad.clone()
        before = m.wte.weight.detach().clone()
        opt.step()
        ref_opt.step()
        rows = sorted(seen_rows(ids, LENGTHS[t - 1]))
        for r in rows:  # Adam, global step t, no weight decay on the embedding
            exp_avg[r] = b1 * exp_avg[r] + (1 - b1) * g[r]
            exp_avg_sq[r] = b2 * exp_avg_sq[r] + (1 - b2) * g[r] ** 2
            w[r] -= lr / (1 - b1 ** t) * exp_avg[r] / ((exp_avg_sq[r] / (1 - b2 ** t)).sqrt() + eps)
        unseen = [r for r in range(VOCAB) if r not in rows]
        assert torch.equal(m.wte.weight[unseen], before[unseen])  # bit for bit
        assert not torch.equal(m.wte.weight[rows], before[rows])
        assert torch.allclose(m.wte.weight.double(), w, rtol=0, atol=1e-6)
        assert torch.allclose(opt.state[m.wte.weight]["exp_avg"].double(), exp_avg, rtol=0, atol=1e-7)
        for n, q in dense:
            assert torch.equal(m.get_parameter(n), q), n  # the GRU and the head: torch's AdamW, decay too, exactly
    assert not torch.equal(m.head.weight, student(True).head.weight)  # the dense parameters did move


def test_a_row_seen_at_every_step_moves_as_under_adamw():
    """When every row is in every batch, the lazy update is AdamW's, to float32 rounding."""
    sparse, dense = student(True), student(False)
    opts = {m: make_optimizer(m, 0.01, 0.1) for m in (sparse, dense)}
    ids = torch.arange(VOCAB).view(2, VOCAB // 2)
    for step in range(4):
        for m, o in opts.items():
            o.zero_grad(set_to_none=True)
            F.cross_entropy(m.classify(ids.roll(step, 1), torch.tensor([10, 10])), LABELS).backward()
            o.step()
    assert torch.allclose(sparse.wte.weight, dense.wte.weight, rtol=0, atol=1e-6)
    assert (sparse.wte.weight != student(True).wte.weight).all()


@pytest.mark.parametrize("max_norm", [1e-3, 1e3])  # clipping, and not
def test_clipping_a_sparse_gradient_is_clipping_its_dense_form(max_norm):
    sparse, dense = student(True), student(False)
    for m in (sparse, dense):
        backward(m, 0)  # token 3 twice: the sparse gradient holds its row twice until coalesced
    assert not sparse.wte.weight.grad.is_coalesced()
    n_sparse = clip_grad_norm_(list(sparse.parameters()), max_norm)
    n_dense = torch.nn.utils.clip_grad_norm_(list(dense.parameters()), max_norm)
    assert torch.allclose(n_sparse, n_dense, rtol=1e-6)
    assert torch.allclose(sparse.wte.weight.grad.to_dense(), dense.wte.weight.grad, rtol=1e-5, atol=1e-9)
    for p, q in zip(list(sparse.parameters())[1:], list(dense.parameters())[1:]):
        assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-9)


def test_grad_scaler_unscales_a_sparse_gradient_and_skips_a_step_with_inf():
    sparse, dense = student(True), student(False)
    for m in (sparse, dense):
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        opt = make_optimizer(m, 0.01, 0.0)
        scaler.scale(F.cross_entropy(m.classify(STEPS[0], LENGTHS[0]), LABELS)).backward()
        scaler.unscale_(opt)
        m.norm = clip_grad_norm_(list(m.parameters()), 1.0)
        scaler.step(opt)
        scaler.update()
    assert torch.allclose(sparse.norm, dense.norm, rtol=1e-6)
    assert torch.allclose(sparse.wte.weight, dense.wte.weight, atol=1e-6)
    for m in (sparse, dense):  # no unscale_: fused AdamW, and the lazy rows, divide by the scaler's grad_scale
        scaler, opt = torch.amp.GradScaler("cpu", init_scale=1024.0), make_optimizer(m, 0.01, 0.0)
        scaler.scale(F.cross_entropy(m.classify(STEPS[2], LENGTHS[2]), LABELS)).backward()
        scaler.step(opt)
    assert torch.allclose(sparse.wte.weight, dense.wte.weight, atol=1e-6)
    before = sparse.wte.weight.detach().clone()
    scaler, opt = torch.amp.GradScaler("cpu"), make_optimizer(sparse, 0.01, 0.0)
    opt.zero_grad()
    scaler.scale(F.cross_entropy(sparse.classify(STEPS[1], LENGTHS[1]), LABELS) * float("inf")).backward()
    scaler.step(opt)
    assert torch.equal(sparse.wte.weight, before)  # found_inf: no update


def param_id(opt: torch.optim.Optimizer, param: torch.Tensor) -> int:
    """The parameter's id in opt.state_dict() (its place in the groups' order)."""
    return next(i for i, p in enumerate(p for g in opt.param_groups for p in g["params"]) if p is param)


def test_state_dict_keeps_moments_of_seen_rows_only_and_loads_back_exactly():
    m = student(True)
    opt = make_optimizer(m, 0.01, 0.1)
    for step in range(2):
        opt.zero_grad()
        backward(m, step)
        opt.step()
    live = opt.state[m.wte.weight]
    live["exp_avg_sq"][3] = 0.0  # as if its squared gradient had underflowed: the row still counts as seen
    sd = opt.state_dict()
    pid = param_id(opt, m.wte.weight)
    wte = sd["state"][pid]
    seen = sorted(seen_rows(STEPS[0], LENGTHS[0]) | seen_rows(STEPS[1], LENGTHS[1]))
    assert wte["rows"].tolist() == seen and wte["exp_avg"].shape == (len(seen), DIM)
    assert opt.state[m.wte.weight]["exp_avg"].shape == (VOCAB, DIM)  # the live state is untouched
    assert all("rows" not in st for i, st in sd["state"].items() if i != pid)  # dense parameters: as torch's
    twin = student(True)
    twin.load_state_dict(m.state_dict())
    opt2 = make_optimizer(twin, 0.01, 0.1)
    opt2.load_state_dict(copy.deepcopy(sd))  # a copy: torch's state_dict() holds the live tensors
    for p, q in zip(m.parameters(), twin.parameters()):
        for k, val in opt.state[p].items():
            assert torch.equal(val, opt2.state[q][k]), k
    for model, o in ((m, opt), (twin, opt2)):
        o.zero_grad()
        backward(model, 2)
        o.step()
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), twin.parameters()))
    assert opt2.state_dict()["state"][pid]["rows"].tolist() == sorted(set(seen) | seen_rows(STEPS[2], LENGTHS[2]))


def fit_args(tmp_path, name: str, epochs: int, resume: bool) -> Namespace:
    return Namespace(out_dir=str(tmp_path / name), plots_dir=str(tmp_path / "plots"), epochs=epochs, lr=2e-3,
                     batch_size=32, eval_batch_size=256, weight_decay=0.01, warmup_ratio=0.1, grad_clip=1.0, seed=3,
                     resume=resume, compile=False, max_train_samples=None)


def test_a_resumed_student_run_is_byte_identical(cola, tmp_path):
    """fit, uninterrupted for 2 epochs, against stopped at the first step of epoch 2 and resumed: the same
    checkpoint file (weights, compact Adam state, scheduler, RNG, metrics) and the same best student."""
    train = Dataset("train", cola["train"].sentences[:256], cola["train"].ids[:256], cola["train"].labels[:256])
    dev = Dataset("dev", cola["dev"].sentences[:64], cola["dev"].ids[:64], cola["dev"].labels[:64])
    steps_per_epoch = 256 // 32

    def run(name: str, resume: bool = False, stop_at: int = 0) -> DistilRNN:
        (tmp_path / name).mkdir(exist_ok=True)
        (tmp_path / "plots").mkdir(exist_ok=True)
        torch.manual_seed(3)
        model = DistilRNN(embd_dim=16, hidden_size=8, dropout=0.3)  # the full 50257-token vocabulary
        model.wte.sparse = True
        calls = []

        def loss_fn(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
            calls.append(1)
            if len(calls) == stop_at:
                raise KeyboardInterrupt
            return F.cross_entropy(logits, batch.labels)

        fit(model, train, dev, loss_fn, fit_args(tmp_path, name, 2, resume), {"c": 1}, "rnn",
            lambda: torch.save(model.state_dict(), tmp_path / name / "best.pt"), Precision("fp32", "cpu"))
        return model

    ref = run("ref")
    with pytest.raises(KeyboardInterrupt):
        run("cut", stop_at=steps_per_epoch + 1)
    resumed = run("cut", resume=True)
    ckpt = {name: (tmp_path / name / "checkpoint.safetensors").read_bytes() for name in ("ref", "cut")}
    assert ckpt["ref"] == ckpt["cut"]
    tensors, _ = load_checkpoint(tmp_path / "cut" / "checkpoint.safetensors")
    pid = param_id(make_optimizer(resumed, 0.1, 0.1), resumed.wte.weight)
    rows = tensors[f"optim.{pid}.rows"]  # wte's moments: only for the tokens of the 256 training sentences
    assert tensors[f"optim.{pid}.exp_avg"].shape == (len(rows), 16) and 0 < len(rows) < 50257 // 10
    assert all(torch.equal(p, q) for p, q in zip(ref.parameters(), resumed.parameters()))
    assert (tmp_path / "ref" / "metrics.json").read_text() == (tmp_path / "cut" / "metrics.json").read_text()
