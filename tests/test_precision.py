"""Precision chosen by the hardware (precision.py), fp16 with loss scaling, and frozen weights stored in the
compute dtype, all checked on CPU, where autocast runs bf16 and fp16 through the same code as on CUDA.

- auto: bf16 on CUDA >= 8.0, fp16 below, fp32 on CPU and MPS; the device queries are faked, and
  torch.cuda.is_bf16_supported (True on a T4, by emulation) is never asked.
- fp16: gradients unscaled before clipping; an overflowing step is skipped, counted and survived; a non-finite
  loss still stops the run; the scaler's state is checkpointed and a resumed run ends byte-identical.
- Frozen weights stored in bf16/fp16 give, under the same autocast, the logits and training steps of fp32
  weights bit for bit, once wte's one rounding (an embedding lookup is no autocast op) is accounted for; the
  paths around training (generation, evaluation, the teacher pass) run with them.

Bugs these tests exist to catch: auto picking the wrong precision for a card (fp16 on an Ampere card was
planted and failed), fp16 without loss scaling (planted, failed), clipping before unscaling, an overflow step
that is applied or stops the run, a scaler state lost on resume, stored weights that change the logits.
"""

from __future__ import annotations

import json
import math
import shutil
from argparse import Namespace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import train_lora
from cli import CHECKPOINT, METRICS
from data import Dataset, collate, iterate
from distill import teacher_logits
from errors import UserError
from lora import inject_lora, lora_modules
from metrics import predict_logits
from model import GPT
from precision import Precision, choose_precision, device_line, store_frozen_weights
from test_robustness import cli, error_line, lora_args, ok
from train_step import EagerStep, FixedShapeStep, RunningMetrics
from trainer import fit, load_checkpoint, make_optimizer

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
LOW = [torch.bfloat16, torch.float16]
NAME = {torch.bfloat16: "bf16", torch.float16: "fp16"}


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------- the choice

@pytest.fixture
def card(monkeypatch):
    """Fake a CUDA card: set(capability, name). is_bf16_supported must never be the deciding question."""
    def fail(*a, **k):
        raise AssertionError("torch.cuda.is_bf16_supported() was called")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", fail)

    def set_card(capability: tuple[int, int], name: str = "Some GPU"):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    return set_card


@pytest.mark.parametrize("capability,want", [((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"), ((8, 6), "bf16"),
                                             ((9, 0), "bf16")])
def test_auto_follows_the_compute_capability(card, capability, want, capsys):
    card(capability)
    p = choose_precision(CUDA, "auto")
    assert p == Precision(want, "cuda")
    assert p.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[want]
    assert p.loss_scaling == (want == "fp16")  # (a CUDA GradScaler disables itself where CUDA is absent)
    assert capsys.readouterr().err == ""  # no warning for what auto picks


def test_auto_on_cpu_and_mps_is_fp32():
    for device in (CPU, torch.device("mps")):
        p = choose_precision(device)
        assert p.name == "fp32" and p.dtype is None and not p.make_scaler().is_enabled()


def test_the_device_line_names_card_capability_and_choice(card):
    card((7, 5), "Tesla T4")
    line = device_line(CUDA, choose_precision(CUDA))
    assert line == "device: cuda (Tesla T4, compute capability 7.5), precision: fp16 mixed, loss scaling"
    card((9, 0), "NVIDIA H200")
    assert device_line(CUDA, choose_precision(CUDA)) == \
        "device: cuda (NVIDIA H200, compute capability 9.0), precision: bf16 mixed"
    assert device_line(CPU, choose_precision(CPU)) == "device: cpu, precision: fp32"


def test_bf16_below_ampere_is_allowed_with_one_warning(card, capsys):
    card((7, 5), "Tesla T4")
    assert choose_precision(CUDA, "bf16").name == "bf16"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "emulated" in err[0] and "Tesla T4" in err[0], err
    card((8, 0), "A100")
    assert choose_precision(CUDA, "bf16").name == "bf16" and capsys.readouterr().err == ""


@pytest.mark.parametrize("name", ["fp32", "bf16", "fp16"])
def test_any_precision_on_cpu_and_its_autocast(name):
    p = choose_precision(CPU, name)
    assert p.name == name
    with p.autocast():
        assert torch.is_autocast_enabled("cpu") == (name != "fp32")
        out = torch.nn.functional.linear(torch.randn(2, 3), torch.randn(4, 3))
    assert out.dtype == (p.dtype or torch.float32)
    assert p.make_scaler().is_enabled() == (name == "fp16")


def test_fixed_shape_step_refuses_fp16(tiny_gpt2):
    model = lora_gpt(tiny_gpt2)
    opt = make_optimizer(model, 1e-3, 0.0)
    with pytest.raises(ValueError, match="loss scaling"):
        FixedShapeStep(model, ce, opt, 1.0, 32, RunningMetrics(CPU), CPU, Precision("fp16", "cpu"), graphs=True)


# ---------------------------------------------------------------- helpers

def lora_gpt(tiny_gpt2: Path, seed: int = 0, dropout: float = 0.0) -> GPT:
    """The tiny GPT-2 with LoRA and a random B, so that the adapters contribute from the first step."""
    torch.manual_seed(seed)
    model = GPT.from_pretrained(str(tiny_gpt2))
    inject_lora(model, 4, 8.0, dropout=dropout)
    for m in lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B, std=0.1)
    return model


def ce(logits, batch):
    return F.cross_entropy(logits, batch.labels)


def subset(ds: Dataset, n: int) -> Dataset:
    return Dataset(ds.name, ds.sentences[:n], ds.ids[:n], ds.labels[:n])


def trainable(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters() if p.requires_grad]


def overflow_at(step: int):
    """A loss function whose backward makes every gradient of training step `step` (1-based) inf, while the
    loss itself stays finite: the overflow fp16's scaler exists for."""
    calls = [0]

    def loss_fn(logits, batch):
        calls[0] += 1
        if calls[0] == step:
            logits.register_hook(lambda g: torch.full_like(g, math.inf))
        return F.cross_entropy(logits, batch.labels)
    return loss_fn


# ---------------------------------------------------------------- fp16 done right

def test_fp16_gradients_are_unscaled_before_clipping(tiny_gpt2, cola, one_thread):
    """One step: the gradients left after clipping equal fp32's (to fp16 rounding), not the scaled ones
    clipped. The clip threshold is above the true norm and far below the scaled (x65536) norm."""
    batch = collate(cola["train"], list(range(32)))
    grads, norms = {}, {}
    for name in ("fp32", "fp16"):
        model = lora_gpt(tiny_gpt2)
        opt = make_optimizer(model, 1e-3, 0.0)
        clip = 1e3  # the true norm is below 1 (asserted below)
        step = EagerStep(model.classify, ce, opt, clip, RunningMetrics(CPU), CPU, Precision(name, "cpu"))
        step(batch)
        g = [p.grad for p in model.parameters() if p.requires_grad]
        grads[name], norms[name] = g, torch.linalg.vector_norm(torch.stack([x.norm() for x in g])).item()
    assert norms["fp32"] < 10 and norms["fp16"] == pytest.approx(norms["fp32"], rel=1e-2)
    for a, b in zip(grads["fp16"], grads["fp32"]):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=1e-4)


def test_fp16_training_tracks_fp32(tiny_gpt2, cola, one_thread):
    """Ten steps with clipping active: fp16 mixed (loss-scaled, weights stored fp16) stays near fp32 training;
    LoRA, the head and AdamW's state are fp32. The scale starts at 2^10, not torch's 2^16, at which this
    model's first step overflows and is skipped (as it should be), which would put the runs a step apart."""
    batches = list(iterate(subset(cola["train"], 320), 32, shuffle=True, seed=1))
    runs = {}
    for name in ("fp32", "fp16"):
        model = lora_gpt(tiny_gpt2)
        p = Precision(name, "cpu")
        store_frozen_weights(model, p.dtype)
        opt = make_optimizer(model, 1e-2, 0.01)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, enabled=p.loss_scaling)
        step = EagerStep(model.classify, ce, opt, 0.5, RunningMetrics(CPU), CPU, p, scaler)
        for b in batches:
            step(b)
        assert step.metrics.read()["skipped"] == 0
        assert all(v.dtype == torch.float32 for s in opt.state.values() for k, v in s.items() if k != "step")
        runs[name] = trainable(model)
    start = trainable(lora_gpt(tiny_gpt2))
    assert all(a.dtype == torch.float32 for a in runs["fp16"])
    # Adam turns each gradient into about lr * its sign, so elements whose gradient is near 0 may go either
    # way in fp16: compare the whole update, not element by element.
    d16, d32 = (torch.cat([(a - s).flatten() for a, s in zip(runs[k], start)]) for k in ("fp16", "fp32"))
    assert d32.norm() > 0.05 and (d16 - d32).norm() < 0.1 * d32.norm(), ((d16 - d32).norm(), d32.norm())


def test_an_overflowing_step_is_skipped_and_counted_and_training_goes_on(tiny_gpt2, cola, one_thread):
    batches = list(iterate(subset(cola["train"], 128), 32, shuffle=True, seed=2))  # 4 steps
    model = lora_gpt(tiny_gpt2)
    opt = make_optimizer(model, 1e-2, 0.0)
    step = EagerStep(model.classify, overflow_at(2), opt, 1.0, RunningMetrics(CPU), CPU, Precision("fp16", "cpu"))
    step(batches[0])
    before, adam_steps = trainable(model), [s["step"].item() for s in opt.state.values()]
    step(batches[1])  # its gradients are inf
    assert all(torch.equal(a, b) for a, b in zip(trainable(model), before))  # skipped: no weight moved
    assert [s["step"].item() for s in opt.state.values()] == adam_steps  # nor did AdamW's step count
    assert step.scaler.get_scale() == 2.0 ** 15  # halved from 2^16
    read = step.metrics.read()
    assert read["skipped"] == 1 and read["bad_step"] == 0 and math.isfinite(read["loss"])
    for b in batches[2:]:
        step(b)
    assert not any(torch.equal(a, b) for a, b in zip(trainable(model), before))  # later steps train
    assert step.metrics.read()["skipped"] == 1


def fit_args(tmp: Path, **kw) -> Namespace:
    return Namespace(**{**dict(out_dir=str(tmp / "out"), plots_dir=str(tmp / "plots"), epochs=2, lr=1e-2,
                               batch_size=32, eval_batch_size=256, weight_decay=0.0, warmup_ratio=0.0, grad_clip=1.0,
                               seed=0, resume=False, compile=False), **kw})


def test_fit_records_skipped_steps_per_epoch(tiny_gpt2, cola, tmp_path, one_thread):
    args = fit_args(tmp_path)
    for d in (args.out_dir, args.plots_dir):
        Path(d).mkdir()
    train, dev = subset(cola["train"], 96), subset(cola["dev"], 32)  # 3 steps an epoch
    metrics = fit(lora_gpt(tiny_gpt2), train, dev, overflow_at(5), args, {}, "lora", lambda: None,
                  Precision("fp16", "cpu"))
    assert [e["skipped_steps"] for e in metrics["epochs"]] == [0, 1]  # step 5 is epoch 2's second
    _, state = load_checkpoint(Path(args.out_dir) / CHECKPOINT)
    assert state["scaler"]["scale"] == 2.0 ** 15 and state["scaler"]["_growth_tracker"] == 1


def test_a_non_finite_fp16_loss_still_stops_the_run(tiny_gpt2, cola, tmp_path, one_thread):
    args = fit_args(tmp_path)
    for d in (args.out_dir, args.plots_dir):
        Path(d).mkdir()

    def nan_loss(logits, batch):
        return F.cross_entropy(logits, batch.labels) * math.nan

    with pytest.raises(UserError, match=r"loss is nan at epoch 1 step 1\b"):
        fit(lora_gpt(tiny_gpt2), subset(cola["train"], 64), subset(cola["dev"], 32), nan_loss, args, {}, "lora",
            lambda: None, Precision("fp16", "cpu"))


# ---------------------------------------------------------------- fp16 through train_lora.py

@pytest.fixture(scope="module")
def fp16_run(tmp_path_factory, tiny_gpt2, cola_dir) -> tuple[Path, list[str], str]:
    out = tmp_path_factory.mktemp("fp16") / "lora"
    args = lora_args(tiny_gpt2, cola_dir, out, "--precision", "fp16", rows=128, epochs=2)
    return out, args, ok(cli("train_lora.py", *args)).stdout


def test_train_lora_fp16_on_cpu_end_to_end(fp16_run):
    out, _, stdout = fp16_run
    assert stdout.splitlines()[0] == "device: cpu, precision: fp16 mixed, loss scaling"
    m = json.loads((out / METRICS).read_text())
    assert m["config"]["precision"] == "fp16"
    assert [e["skipped_steps"] for e in m["epochs"]] == [0, 0]
    assert all(math.isfinite(e["train_loss"]) and math.isfinite(e["val_loss"]) for e in m["epochs"])
    tensors, state = load_checkpoint(out / CHECKPOINT)
    assert state["scaler"]["scale"] == 2.0 ** 16 and state["scaler"]["_growth_tracker"] == 8  # 2 x 4 steps
    assert all(v.dtype == torch.float32 for k, v in tensors.items() if k.startswith(("model.", "optim.")) and
               not k.endswith(".step"))
    assert all(v.dtype == torch.float32 for v in load_file(str(out / "adapter.safetensors")).values())


def test_resume_with_another_precision_is_refused(fp16_run, tmp_path):
    out, args, _ = fp16_run
    copy = tmp_path / "lora"
    shutil.copytree(out, copy)
    args = [a if a != str(out) else str(copy) for a in args]
    line = error_line(cli("train_lora.py", *args, "--resume", "--precision", "bf16"))
    assert "--resume" in line and "(precision differ)" in line, line


def test_train_distil_fp16_on_cpu_with_the_fp16_teacher(fp16_run, cola_dir, tmp_path):
    """The teacher pass (frozen weights stored fp16, under fp16 autocast) and an fp16 student."""
    from test_robustness import distil_args
    out = tmp_path / "distil"
    r = ok(cli("train_distil.py", *distil_args("distil", fp16_run[0], cola_dir, out, tmp_path / "cache",
                                                "--precision", "fp16")))
    assert "device: cpu, precision: fp16 mixed, loss scaling" in r.stdout
    m = json.loads((out / METRICS).read_text())
    assert m["config"]["precision"] == "fp16" and math.isfinite(m["epochs"][0]["train_loss"])


class Crash(Exception):
    pass


def train_in_process(args: list[str], monkeypatch, overflow: int | None = None, crash: int | None = None) -> None:
    """train_lora.train, with its loss made to overflow at training step `overflow` and the process 'killed'
    (an exception) at training step `crash` (counting this process's training steps)."""
    calls = [0]

    def cross_entropy(logits, labels):
        if logits.requires_grad:
            calls[0] += 1
            if calls[0] == crash:
                raise Crash
            if calls[0] == overflow:
                logits.register_hook(lambda g: torch.full_like(g, math.inf))
        return F.cross_entropy(logits, labels)
    monkeypatch.setattr(train_lora, "F", SimpleNamespace(cross_entropy=cross_entropy))
    train_lora.train(train_lora.build_parser().parse_args(args))


def test_fp16_resume_is_byte_identical(tiny_gpt2, cola_dir, tmp_path, monkeypatch, one_thread):
    """3 epochs of 4 steps with an overflow at step 2 (the scale halves to 2^15): uninterrupted, against
    stopped in epoch 2 and resumed. metrics.json is byte-identical, the checkpoints and adapters equal (the
    scaler's scale and growth tracker included: a resume that forgot them would end at 2^16)."""
    ref, out = tmp_path / "ref" / "lora", tmp_path / "resumed" / "lora"
    train_in_process(lora_args(tiny_gpt2, cola_dir, ref, "--precision", "fp16", rows=128, epochs=3), monkeypatch,
                     overflow=2)
    args = lora_args(tiny_gpt2, cola_dir, out, "--precision", "fp16", rows=128, epochs=3)
    with pytest.raises(Crash):
        train_in_process(args, monkeypatch, overflow=2, crash=4 + 2)  # epoch 2, step 2
    assert [e["skipped_steps"] for e in json.loads((out / METRICS).read_text())["epochs"]] == [1]
    train_in_process([*args, "--resume"], monkeypatch)
    assert (out / METRICS).read_bytes() == (ref / METRICS).read_bytes()
    (t_out, s_out), (t_ref, s_ref) = load_checkpoint(out / CHECKPOINT), load_checkpoint(ref / CHECKPOINT)
    assert s_out == s_ref and s_ref["scaler"]["scale"] == 2.0 ** 15
    assert t_out.keys() == t_ref.keys() and all(torch.equal(t_out[k], t_ref[k]) for k in t_ref)
    a, b = load_file(str(out / "adapter.safetensors")), load_file(str(ref / "adapter.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in b)


# ---------------------------------------------------------------- frozen weights in the compute dtype

def stored_pair(tiny_gpt2: Path, dtype: torch.dtype, dropout: float = 0.0) -> tuple[GPT, GPT]:
    """(stored, reference): the same LoRA model, once with its frozen weights stored in `dtype`, once fp32 with
    only wte's values rounded through `dtype` (what the stored lookup returns), so that under autocast every
    difference but wte's single rounding is ruled out."""
    stored, ref = lora_gpt(tiny_gpt2, dropout=dropout), lora_gpt(tiny_gpt2, dropout=dropout)
    store_frozen_weights(stored, dtype)
    ref.transformer.wte.weight.data = ref.transformer.wte.weight.data.to(dtype).float()
    return stored, ref


@pytest.mark.parametrize("dtype", LOW)
def test_which_weights_are_stored_low(tiny_gpt2, dtype):
    model = lora_gpt(tiny_gpt2)
    store_frozen_weights(model, dtype)
    h = model.transformer.h[0]
    for t in (model.transformer.wte.weight, h.attn.c_attn.weight, h.attn.c_attn.bias, h.mlp.c_proj.weight):
        assert t.dtype == dtype
    for t in (model.transformer.wpe.weight, h.ln_1.weight, model.transformer.ln_f.bias, model.score.weight,
              h.attn.c_attn.lora_A, h.mlp.c_fc.lora_B):
        assert t.dtype == torch.float32
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied
    before = sum(p.numel() * p.element_size() for p in lora_gpt(tiny_gpt2).parameters())
    after = sum(p.numel() * p.element_size() for p in model.parameters())
    assert after < 0.6 * before


@pytest.mark.parametrize("dtype", LOW)
def test_stored_weights_give_the_logits_of_fp32_weights_under_autocast(tiny_gpt2, cola, dtype, one_thread):
    """Bit for bit, once wte's rounding is in the reference too; without it (truly fp32 wte) they differ, by
    about the compute dtype's rounding, and only through wte."""
    batch = collate(cola["dev"], list(range(48)))
    stored, ref = stored_pair(tiny_gpt2, dtype)
    fp32 = lora_gpt(tiny_gpt2)
    p = Precision(NAME[dtype], "cpu")
    with torch.no_grad(), p.autocast():
        a, b, c = (m.eval().classify(batch.ids, batch.lengths).float() for m in (stored, ref, fp32))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # wte's lookup is no autocast op: stored low, its values are rounded once
    torch.testing.assert_close(a, c, rtol=0.05, atol=0.02 * c.abs().max().item())


@pytest.mark.parametrize("dtype", LOW)
def test_stored_weights_train_like_fp32_weights_under_autocast(tiny_gpt2, cola, dtype, one_thread):
    """The first 6 training steps (LoRA dropout on, clipping on, loss scaling with fp16) are bit-identical."""
    batches = list(iterate(subset(cola["train"], 192), 32, shuffle=True, seed=4))
    stored, ref = stored_pair(tiny_gpt2, dtype, dropout=0.1)
    p = Precision(NAME[dtype], "cpu")
    runs = []
    for model in (stored, ref):
        opt = make_optimizer(model, 1e-2, 0.01)
        step = EagerStep(model.classify, ce, opt, 0.5, RunningMetrics(CPU), CPU, p)
        torch.manual_seed(1)  # the same dropout masks
        losses = []
        for b in batches:
            step.metrics.reset()
            step(b)
            losses.append(step.metrics.read()["loss"])
        runs.append((losses, trainable(model)))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    assert runs[0][0][-1] != runs[0][0][0]


@pytest.mark.parametrize("dtype", LOW)
def test_generation_runs_with_stored_weights(tiny_gpt2, dtype):
    """model.generate is called outside any autocast (model.py's main): with low-precision weights it enters
    their autocast itself, and decodes what fp32 weights decode under that autocast."""
    stored, ref = stored_pair(tiny_gpt2, dtype)
    idx = torch.tensor([[464, 3797, 318]])
    out = stored.eval().generate(idx, 8, temperature=0)
    with torch.autocast("cpu", dtype=dtype):
        want = ref.eval().generate(idx, 8, temperature=0)
    assert out.shape == (1, 11) and torch.equal(out, want)
    g = torch.Generator().manual_seed(0)
    sampled = stored.generate(idx, 8, temperature=0.8, top_k=50, generator=g)
    assert sampled.shape == (1, 11) and int(sampled.max()) < stored.config.vocab_size


@pytest.mark.parametrize("dtype", LOW)
def test_evaluation_runs_with_stored_weights(tiny_gpt2, cola, dtype):
    stored, ref = stored_pair(tiny_gpt2, dtype)
    dev = subset(cola["dev"], 100)
    p = Precision(NAME[dtype], "cpu")
    a, b = predict_logits(stored, dev, 32, CPU, p), predict_logits(ref, dev, 32, CPU, p)
    assert a.dtype == torch.float32 and a.shape == (100, 2) and torch.equal(a, b)


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_teacher_pass_runs_with_stored_weights(fp16_run, cola, tmp_path, name):
    """teacher_logits stores the teacher's frozen weights in the compute dtype and runs under its autocast: the
    logits are finite, near fp32's, and cached apart from them."""
    teacher, dev = fp16_run[0], subset(cola["dev"], 64)
    low = teacher_logits(teacher, {"dev": dev}, tmp_path, 32, CPU, Precision(name, "cpu"))["dev"]
    fp32 = teacher_logits(teacher, {"dev": dev}, tmp_path, 32, CPU, Precision("fp32", "cpu"))["dev"]
    assert len(list(tmp_path.glob("teacher_*.safetensors"))) == 2
    assert torch.isfinite(low).all() and low.dtype == torch.float32
    torch.testing.assert_close(low, fp32, rtol=0.05, atol=0.05 * fp32.abs().max().item())
