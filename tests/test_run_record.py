"""What a finished run promises about itself, pinned on real runs of the real scripts (tiny, on real CoLA):

- its config holds the precision it trained in, resolved (never `auto`), so --resume on hardware that resolves
  `auto` otherwise is refused;
- its config holds every flag of either script that changes training, so --resume with another value is
  refused and report.py never puts two recipes in one group (checked over every flag, not one by one);
- on a tie in dev MCC the earliest best epoch is the one kept;
- the default student trains its embedding through a sparse gradient, --dense_embedding_grad through a dense one;
- a CUDA run's checkpoint holds the CUDA generator and a resume restores it (CUDA faked: no GPU is needed);
- predictions.json's probabilities are the float64 softmax of the fp32 logits.

Bugs these tests exist to catch: `auto` recorded instead of what it resolved to; a new training flag left out
of the config (or dropped by report.py's grouping); `>=` in the best-epoch test; the embedding's sparse flag
inverted; the CUDA generator not saved or not restored; probabilities softmaxed in float32.
"""

from __future__ import annotations

import argparse
import json
import shutil
from argparse import Namespace
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

import cli
import optim
import report
import train_distil
import train_lora
from cli import CHECKPOINT, METRICS, PREDICTIONS, run_config
from data import Dataset, load_cola
from errors import UserError
from metrics import predict_logits
from model import DistilRNN
from precision import Precision
from trainer import fit, load_checkpoint, restore_rng_states, rng_states, save_checkpoint
from test_robustness import EPOCHS, LORA_ROWS, distil_args, lora_args

CPU, FP32 = torch.device("cpu"), Precision("fp32", "cpu")
VOCAB = 50257

# Flags that change no number a run computes: where its files go, what to do with an earlier run, which device
# (the precision it leads to is recorded), the batching of forward-only passes, and how the same step is executed.
NOT_TRAINING = {"help", "resume", "overwrite", "out_dir", "data_dir", "cache_dir", "export_peft",
                "device", "eval_batch_size", "compile", "cuda_graphs", "threads"}
# Recorded as resolved, not as given: --precision auto, the base's location, the student's width.
RESOLVED = {"precision", "gpt_variant", "embd_dim"}
SCRIPTS = {"train_lora.py": train_lora, "train_distil.py": train_distil}


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def distil_run(tmp_path_factory, lora_ref, cola_dir) -> tuple[Path, list[str]]:
    """A 2-epoch train_distil.py --mode distil run from lora_ref, trained in this process on one thread (as
    the scripts' subprocesses in the other tests): (its out_dir, its arguments)."""
    tmp = tmp_path_factory.mktemp("distil_run")
    out = tmp / "distil"
    argv = distil_args("distil", lora_ref, cola_dir, out, tmp / "cache", epochs=2)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_distil.train(train_distil.build_parser().parse_args(argv))
    finally:
        torch.set_num_threads(n)
    return out, argv


def training_flags(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.dest not in NOT_TRAINING]


# ---------------------------------------------------------------- 1. precision, recorded as resolved

def test_precision_is_recorded_as_resolved(lora_ref, distil_run):
    """Both runs left --precision at auto: metrics.json and the checkpoint say what auto became on this CPU."""
    for out in (lora_ref, distil_run[0]):
        assert json.loads((out / METRICS).read_text())["config"]["precision"] == "fp32"
        assert load_checkpoint(out / CHECKPOINT)[1]["config"]["precision"] == "fp32"


def test_resume_where_auto_resolves_otherwise_is_refused(lora_ref, tiny_gpt2, cola_dir, tmp_path, monkeypatch):
    """The same command (--precision auto) resumed on hardware where auto is bf16 (faked here) is refused, naming
    the precision, before any step: an fp32 run does not silently go on in bf16."""
    out = tmp_path / "lora"
    shutil.copytree(lora_ref, out)
    before = (out / CHECKPOINT).read_bytes()
    monkeypatch.setattr(cli, "choose_precision", lambda device, requested="auto": Precision(
        "bf16" if requested == "auto" else requested, device.type))
    args = train_lora.build_parser().parse_args(
        [*lora_args(tiny_gpt2, cola_dir, out, rows=LORA_ROWS, epochs=EPOCHS), "--resume"])
    with pytest.raises(UserError, match=r"different config \(precision differ\)"):
        train_lora.train(args)
    assert (out / CHECKPOINT).read_bytes() == before


# ---------------------------------------------------------------- 2. every training setting is in the config

def test_every_training_flag_is_recorded_in_a_real_runs_config(lora_ref, tiny_gpt2, cola_dir, distil_run):
    """Every flag of both scripts that is not in NOT_TRAINING is in the config the run wrote (metrics.json and
    checkpoint alike), with the value it was given (or, for RESOLVED, what it resolved to)."""
    lora_argv = lora_args(tiny_gpt2, cola_dir, lora_ref, rows=LORA_ROWS, epochs=EPOCHS)
    for module, out, argv in ((train_lora, lora_ref, lora_argv), (train_distil, *distil_run)):
        parser = module.build_parser()
        given = vars(parser.parse_args(argv))
        if module is train_distil:  # one --teacher is recorded as a string, as older runs did (resolve_teachers)
            given["teacher"] = given["teacher"][0] if len(given["teacher"]) == 1 else given["teacher"]
        config = json.loads((out / METRICS).read_text())["config"]
        assert load_checkpoint(out / CHECKPOINT)[1]["config"] == config
        for action in training_flags(parser):
            assert action.dest in config, f"{module.__name__}: {action.option_strings} is not in the run's config"
            if action.dest not in RESOLVED:
                assert config[action.dest] == json.loads(json.dumps(given[action.dest])), action.dest
        assert config["precision"] == "fp32"


def other_value(parser: argparse.ArgumentParser, base: list[str], action: argparse.Action) -> list[str]:
    """Arguments that give `action` a value other than its default (the first candidate the parser accepts)."""
    flag = action.option_strings[0]
    if isinstance(action, argparse.BooleanOptionalAction):
        candidates = [[f"--no-{flag[2:]}" if action.default else flag]]
    elif action.nargs == 0:
        candidates = [[flag]]
    elif action.choices:
        candidates = [[flag, str(c)] for c in action.choices if c != action.default]
    else:
        candidates = [[flag, v] for v in ("0.5", "3", "c_attn", "other")]
    for extra in candidates:
        try:
            args = parser.parse_args([*base, *extra])
        except SystemExit:
            continue
        if getattr(args, action.dest) != action.default:
            return extra
    raise AssertionError(f"no other value found for {flag}")


@pytest.mark.parametrize("script", SCRIPTS)
def test_changing_any_training_flag_changes_the_config_so_resume_and_report_tell_them_apart(script, capsys):
    """Over every flag (new ones included): one that changes training changes run_config, which --resume
    compares whole, and report.py's group key, so two such runs are never averaged as seeds of one recipe."""
    parser = SCRIPTS[script].build_parser()
    base = ["--mode", "distil"] if script == "train_distil.py" else []
    default = run_config(parser.parse_args(base))
    run = lambda config: report.Run(Path("x"), {"config": config}, {"dev": {"rows": [0], "labels": [1]}})  # noqa: E731
    flags = training_flags(parser)
    assert {"warmup_ratio", "lr", "seed", "precision", "max_train_samples"} <= {a.dest for a in flags}
    for action in flags:
        if action.dest == "mode":
            continue  # the base arguments set it
        changed = run_config(parser.parse_args([*base, *other_value(parser, base, action)]))
        assert changed != default and changed[action.dest] != default.get(action.dest), action.dest
        if action.dest != "seed":  # seeds of one recipe form a group; everything else splits groups
            assert report.group_key(run(changed)) != report.group_key(run(default)), action.dest
    capsys.readouterr()


# ---------------------------------------------------------------- 3. a tie keeps the first best epoch

class Constant(nn.Module):
    """Logits independent of the sentence: every epoch predicts one class, so every epoch's dev MCC is 0."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.tensor([0.3, -0.3]))

    def classify(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(ids.size(0), 2)  # (B, 2)


def test_a_tie_in_dev_mcc_keeps_the_earliest_epoch(cola, tmp_path):
    train, dev = (Dataset(d.name, d.sentences[:64], d.ids[:64], d.labels[:64]) for d in (cola["train"], cola["dev"]))
    args = Namespace(out_dir=str(tmp_path / "out"), plots_dir=str(tmp_path / "plots"), epochs=3, lr=1e-2,
                     batch_size=32, eval_batch_size=256, weight_decay=0.0, warmup_ratio=0.0, grad_clip=1.0, seed=0,
                     resume=False, compile=False)
    (tmp_path / "out").mkdir(), (tmp_path / "plots").mkdir()
    saved = []
    metrics = fit(Constant(), train, dev, lambda logits, batch: F.cross_entropy(logits, batch.labels), args, {},
                  "tie", lambda: saved.append(1), FP32)
    assert [e["val_mcc"] for e in metrics["epochs"]] == [0.0, 0.0, 0.0]
    assert metrics["best_epoch"] == 1 and metrics["best"] == metrics["epochs"][0] and saved == [1]
    assert json.loads((tmp_path / "out" / PREDICTIONS).read_text())["dev"]["epoch"] == 1


# ---------------------------------------------------------------- 4. the student's embedding gradient

@pytest.mark.parametrize("extra,layout", [((), torch.sparse_coo), (("--dense_embedding_grad",), torch.strided)])
def test_the_default_student_trains_its_embedding_through_a_sparse_gradient(extra, layout, tiny_gpt2, cola_dir,
                                                                             tmp_path, monkeypatch, one_thread):
    """A real train_distil.py run (defaults but for size; its embedding from the GPT-2, as by default): the
    gradient the optimizer gets for the (vocab, n_embd) embedding is sparse, or dense with the flag."""
    seen = []
    step = optim.AdamW.step

    def spy(self, *a, **k):
        seen.extend(p.grad.layout for g in self.param_groups for p in g["params"]
                    if p.grad is not None and p.shape[0] == VOCAB)
        return step(self, *a, **k)
    monkeypatch.setattr(optim.AdamW, "step", spy)
    out = tmp_path / "rnn"
    train_distil.train(train_distil.build_parser().parse_args([
        "--mode", "rnn", "--gpt_variant", str(tiny_gpt2), "--hidden_size", "8", "--data_dir", str(cola_dir),
        "--max_train_samples", "64", "--max_eval_samples", "16", "--epochs", "1", "--out_dir", str(out),
        "--teacher", str(tmp_path / "none"), "--device", "cpu", *extra]))
    assert seen == [layout, layout]  # two steps, the embedding's gradient each time
    assert json.loads((out / METRICS).read_text())["config"]["dense_embedding_grad"] == bool(extra)


# ---------------------------------------------------------------- 5. the CUDA generator in checkpoints

def test_a_cuda_runs_checkpoint_holds_and_restores_the_cuda_generator(tmp_path, monkeypatch, capsys):
    """CUDA faked: get_rng_state gives a state, set_rng_state records what it is given. A CUDA run saves both
    generators; a resume puts back the CPU one and the CUDA one, on the run's device. A CPU run saves no CUDA
    state, and resuming its checkpoint on CUDA says so instead of failing."""
    cuda = torch.device("cuda", 1)
    state, restored = torch.arange(16, dtype=torch.uint8), []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": state.clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda new, device="cuda": restored.append((new, device)))
    path = tmp_path / "checkpoint.safetensors"
    torch.manual_seed(3)
    save_checkpoint(path, rng_states(cuda), {})
    cpu_state = torch.get_rng_state()
    torch.manual_seed(4)
    tensors, _ = load_checkpoint(path)
    assert torch.equal(tensors["rng.cuda"], state)
    restore_rng_states(tensors, cuda, path)
    assert torch.equal(torch.get_rng_state(), cpu_state)
    assert len(restored) == 1 and torch.equal(restored[0][0], state) and restored[0][1] == cuda

    assert set(rng_states(CPU)) == {"rng.cpu"}
    restore_rng_states(rng_states(CPU), cuda, path)
    assert len(restored) == 1 and "holds no CUDA generator state" in capsys.readouterr().out
    restore_rng_states(tensors, CPU, path)  # a CUDA run resumed on CPU: its CUDA state is not needed
    assert len(restored) == 1


# ---------------------------------------------------------------- 7. predictions.json's probabilities

def test_predictions_json_is_the_float64_softmax_of_the_fp32_logits(distil_run, cola_dir, one_thread):
    """The best student, run again on the same rows in the same batches: predictions.json's P(acceptable) is the
    float64 softmax of these fp32 logits to 1e-12 (a float32 softmax is off by ~1e-8), for dev and ood dev."""
    out, argv = distil_run
    args = train_distil.build_parser().parse_args(argv)
    data = load_cola(cola_dir, args.max_train_samples, args.max_eval_samples)
    student = DistilRNN(**json.loads((out / "student_config.json").read_text()))
    student.load_state_dict(load_file(str(out / "student.safetensors")))
    saved = json.loads((out / PREDICTIONS).read_text())
    for split, name in (("dev", "dev"), ("ood_dev", "ood_dev")):
        logits = predict_logits(student, data[name], args.eval_batch_size, CPU, FP32)  # (N, 2) fp32
        assert logits.dtype == torch.float32
        want = logits.double().softmax(-1)[:, 1]
        got = torch.tensor(saved[split]["p1"], dtype=torch.float64)
        assert saved[split]["rows"] == data[name].rows
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
        assert ((got > 0.5) == (logits.argmax(-1) == 1)).all()
