"""report.py and what it rests on: seed groups, one table per dev set, bootstrap intervals, per-row baselines,
curves redrawn from metrics.json, saved predictions; and the fixes that came with it (stratified
--max_*_samples, non-overlapping epoch seeds, the distillation teacher checked on --resume and in the cache).

The runs are real train_lora.py / train_distil.py runs (in-process, one thread) on a tiny random GPT-2 and real
CoLA: 64 training rows, one epoch; the bootstrap's own tests also use runs made in memory from real dev labels,
and the tests of pairing, seeds, OOD, the figure and the JSON (issue 23) hand-made run directories
(metrics.json + predictions.json) on real dev and out-of-domain labels.

Planted for issue 23 and seen to fail a test (each alone, then reverted): a pair across settings (lr left out of
the settings compared); a pair across dev sets (the rnn partner found without checking the sentences); the
teacher taken as its run's whole group; an ensemble by mean probability (caught with three teachers; with two
the two rules agree); the seed level dropped from the bootstrap; unpaired sentence resamples; the same run
draws for both sides of a pair; OOD rows swapped between groups; OOD scores read from the dev record; tick
labels on the wrong lines; the key's settings shifted by one group; the verdict's side swapped; a collapsed
group shown with its zero-width interval; folders searched one level deep only; the key wrapped for a glyph
narrower than the saved resolution draws (the text ran off the figure); an older run's config not completed.

Bugs these tests exist to catch. Planted and seen to fail a test:
- the bootstrap unpaired: groups (or the seeds of a group) resampled independently, or a comparison's
  samples sorted before subtracting; a 90% or 99% interval instead of 95%;
- MCC wrong in report.scores and metrics.matthews_corrcoef alike (pinned to hand-worked confusion matrices,
  not only to each other); a one-class predictor of class 0 (not only of class 1) not flagged as collapsed,
  or named as the wrong class.
Guarded too: a std that is not the sample std; runs on other dev sets in one table, or with another dev set's
baseline; leftover or missing predictions.json accepted; unstratified --max_*_samples; epoch seeds shared
between neighbouring seeds; a retrained teacher reused on --resume; one cache entry for CPU and CUDA logits.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import report
from data import Dataset, epoch_seed, load_cola, stratified_sample
from distill import cache_key, loss_name
from errors import UserError
from model import DistilRNN
from cli import METRICS, PREDICTIONS
from precision import Precision
from test_robustness import in_process
from trainer import fit

SEEDS = (1, 2)


def lora_flags(tiny: Path, cola_dir: Path, out: Path, seed: int) -> list[str]:
    return ["--gpt_variant", str(tiny), "--data_dir", str(cola_dir), "--max_train_samples", "64",
            "--max_eval_samples", "100", "--epochs", "1", "--lora_rank", "2", "--seed", str(seed),
            "--out_dir", str(out), "--device", "cpu"]


def student_flags(mode: str, teacher: Path, cola_dir: Path, out: Path, seed: int, *extra: str,
                  eval_rows: int | None = 100) -> list[str]:
    return ["--mode", mode, "--teacher", str(teacher), "--init_embeddings", "none", "--embd_dim", "16",
            "--hidden_size", "16", "--data_dir", str(cola_dir), "--max_train_samples", "64", "--epochs", "1",
            "--seed", str(seed), "--out_dir", str(out),
            "--cache_dir", str(out.parent / "cache"), "--device", "cpu",
            *(["--max_eval_samples", str(eval_rows)] if eval_rows else []), *extra]


def train_lora(flags: list[str]) -> dict:
    import train_lora
    return train_lora.train(train_lora.build_parser().parse_args(flags))


def train_student(flags: list[str]) -> dict:
    import train_distil
    return train_distil.train(train_distil.build_parser().parse_args(flags))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_gpt2, cola_dir) -> Path:
    """Two seeds each of lora, rnn and distil on a 100-sentence dev set (the students distilled from lora_1),
    and rnn seed 1 again on the full dev set (527)."""
    root = tmp_path_factory.mktemp("runs")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for s in SEEDS:
            train_lora(lora_flags(tiny_gpt2, cola_dir, root / f"lora_{s}", s))
        for s in SEEDS:
            train_student(student_flags("rnn", root / "lora_1", cola_dir, root / f"rnn_{s}", s))
        for s in SEEDS:  # distil_2 is made with rnn_* and lora_2 beside it
            train_student(student_flags("distil", root / "lora_1", cola_dir, root / f"distil_{s}", s))
        train_student(student_flags("rnn", root / "lora_1", cola_dir, root / "rnn_full", 1, eval_rows=None))
    finally:
        torch.set_num_threads(threads)
    return root


def small_dirs(root: Path) -> list[Path]:
    return [root / f"{k}_{s}" for k in ("lora", "rnn", "distil") for s in SEEDS]


def metrics_of(d: Path) -> dict:
    return json.loads((d / METRICS).read_text())


# ---------------------------------------------------------------- groups, tables, baselines

def test_two_seeds_give_the_hand_computed_mean_and_std(runs, tmp_path):
    text, rep = report.compare(small_dirs(runs), tmp_path)
    groups = {g["kind"]: g for g in rep["groups"]}
    assert list(groups) == ["lora", "rnn", "distil"] and {g["dev"]["size"] for g in rep["groups"]} == {100}
    for kind, g in groups.items():
        assert [r["seed"] for r in g["runs"]] == list(SEEDS)
        for split, record in (("dev", lambda m: {"acc": m["best"]["val_acc"], "mcc": m["best"]["val_mcc"]}),
                              ("ood_dev", lambda m: m["ood_dev"])):
            own = [record(metrics_of(runs / f"{kind}_{s}")) for s in SEEDS]
            for key in ("acc", "mcc"):
                values = [o[key] for o in own]
                mean, std = sum(values) / 2, abs(values[0] - values[1]) / 2 ** 0.5  # sample std of two numbers
                assert g[split][key]["mean"] == pytest.approx(mean, abs=1e-12)
                assert g[split][key]["std"] == pytest.approx(std, abs=1e-12)
                assert g[split][key]["std"] == pytest.approx(statistics.stdev(values), abs=1e-12)
                assert f"{mean:.4f} ± {std:.4f}" in text
    assert (tmp_path / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_one_seed_shows_no_std(runs, tmp_path):
    text, rep = report.compare([runs / "rnn_1"], tmp_path)
    (g,) = rep["groups"]
    assert len(g["runs"]) == 1 and g["dev"]["acc"]["std"] is None
    tables = text.split("## In-domain dev")[1]
    assert f"| {g['dev']['acc']['mean']:.4f} |" in tables and "±" not in tables
    assert "| G1 | rnn | 1 seed |" in tables  # "1 seed", not "n=1" or "one seed"


def section(text: str, heading: str) -> str:
    """The markdown under the first heading that starts with `heading`, up to the next heading."""
    return text.split(f"\n## {heading}", 1)[1].split("\n## ", 1)[0]


def test_runs_on_other_dev_sets_get_their_own_table_and_baseline(runs, tmp_path):
    text, rep = report.compare([*small_dirs(runs), runs / "rnn_full"], tmp_path)
    assert [g["dev"]["size"] for g in rep["groups"]] == [527, 100, 100, 100]
    assert [r["path"] for r in rep["groups"][0]["runs"]] == [str((runs / "rnn_full").resolve())]
    assert text.count("## In-domain dev") == 2 and "## In-domain dev, 527 sentences" in text
    full, small = rep["groups"][0], next(g for g in rep["groups"][1:] if g["kind"] == "rnn")
    assert full["settings"] != small["settings"]  # two rnn groups: shown by the setting that tells them apart
    assert full["settings"]["max_eval_samples"] == "None" and small["settings"]["max_eval_samples"] == "100"
    for g in rep["groups"]:  # each row's baseline is its own runs', on its own dev set
        own = {metrics_of(Path(r["path"]))["majority_baseline"]["val_acc"] for r in g["runs"]}
        assert own == {g["dev"]["majority_baseline"]}
        table = section(text, f"In-domain dev, {g['dev']['size']} sentences")
        line = next(ln for ln in table.splitlines() if ln.startswith(f"| {g['label']} |"))
        assert f"| {g['dev']['majority_baseline']:.4f} |" in line
    assert full["dev"]["majority_baseline"] == pytest.approx(365 / 527)
    assert small["dev"]["majority_baseline"] == pytest.approx(0.69)


def test_distil_vs_rnn_and_students_vs_their_teacher_are_paired(runs, tmp_path):
    """The students were distilled from (and compared with) lora_1: their teacher is that run, not the mean of
    the lora group (lora_1 and lora_2)."""
    _, rep = report.compare(small_dirs(runs), tmp_path)
    label = {g["kind"]: g["label"] for g in rep["groups"]}
    mean = {g["label"]: g["dev"]["mcc"]["mean"] for g in rep["groups"]}
    teacher = f"teacher {runs / 'lora_1'} ({label['lora']})"
    pairs = {(p["a"], p["b"]): p for p in rep["pairs"] if p["split"] == "dev"}
    assert set(pairs) == {(label["distil"], label["rnn"]), (label["rnn"], teacher), (label["distil"], teacher)}
    lora_1 = metrics_of(runs / "lora_1")["best"]["val_mcc"]
    for (a, b), p in pairs.items():
        assert p["difference"] == pytest.approx(mean[a] - (lora_1 if b == teacher else mean[b]))
        assert p["ci"][0] <= p["difference"] <= p["ci"][1]
    assert {(p["a"], p["b"]) for p in rep["pairs"] if p["split"] == "ood_dev"} == set(pairs)


def test_train_distil_compares_only_its_own_run_and_teacher(runs):
    """distil_2 was made with lora_2, rnn_1 and rnn_2 beside it: none of them is its teacher or itself."""
    text = (runs / "distil_2" / "comparison.md").read_text()
    assert "| G1 | lora | 1 seed |" in text and "| G2 | distil | 1 seed |" in text and "| rnn" not in text
    assert "lora_1" in text and "distil_2" in text
    for stranger in ("lora_2", "rnn_1", "rnn_2", "distil_1"):
        assert stranger not in text


# ---------------------------------------------------------------- the bootstrap

def test_every_interval_contains_its_point_estimate(runs, tmp_path):
    _, rep = report.compare([*small_dirs(runs), runs / "rnn_full"], tmp_path)
    for g in rep["groups"]:
        for split in ("dev", "ood_dev"):
            for key in ("acc", "mcc"):
                lo, hi = g[split][key]["ci"]
                assert lo <= g[split][key]["mean"] <= hi, (g["label"], split, key, g[split][key])
    for p in rep["pairs"]:
        assert p["ci"][0] <= p["difference"] <= p["ci"][1]


def test_point_estimate_from_saved_predictions_is_the_metrics_mean(runs):
    """The intervals come from predictions.json, the means from metrics.json: they describe the same runs."""
    groups = report.make_groups([report.load_run(d) for d in small_dirs(runs)])
    for g in groups:
        for split in ("dev", "ood_dev"):
            labels = g.runs[0].labels(split)
            acc, mcc = report.seed_mean_scores(g.preds(split), labels, np.arange(len(labels))[None])
            points = [r.point(split) for r in g.runs]
            assert acc[0] == pytest.approx(np.mean([p["acc"] for p in points]), abs=1e-6)
            assert mcc[0] == pytest.approx(np.mean([p["mcc"] for p in points]), abs=1e-6)


def test_intervals_narrow_as_the_dev_set_grows(cola):
    """A fixed predictor (gold label flipped on every 4th sentence) on the first n real dev sentences."""
    labels = np.array(cola["dev"].labels) == 1
    preds = labels.copy()
    preds[::4] = ~preds[::4]
    widths = []
    for n in (60, 130, 260, 527):
        acc, mcc = report.seed_mean_scores(preds[None, :n], labels[:n], report.resamples(n))
        widths.append([np.subtract(*report.interval(m)[::-1]) for m in (acc, mcc)])
    for key in (0, 1):
        w = [x[key] for x in widths]
        assert all(a > b for a, b in zip(w, w[1:])), w
    assert widths[0][0] > 1.8 * widths[-1][0]  # about sqrt(527 / 60) = 3 in theory


def test_the_same_model_has_a_narrower_interval_on_the_full_dev_set(runs, tmp_path):
    """rnn_1 and rnn_full are one model (same seed and training rows) scored on 100 and on 527 sentences."""
    _, rep = report.compare([runs / "rnn_1", runs / "rnn_full"], tmp_path)
    width = {g["dev"]["size"]: g["dev"]["acc"]["ci"][1] - g["dev"]["acc"]["ci"][0] for g in rep["groups"]}
    assert width[527] < width[100]


def fake_run(kind: str, seed: int, preds: np.ndarray, labels: np.ndarray) -> report.Run:
    """A finished run of `kind` in memory whose best epoch predicted `preds` on the dev sentences `labels`; a
    student names lora_1 as its teacher."""
    acc, mcc = report.scores(preds, labels)
    best = {"val_acc": float(acc), "val_mcc": float(mcc), "val_collapsed": False}
    config = {"mode": kind, "seed": seed, **({"teacher": "lora_1"} if kind != "lora" else {})}
    metrics = {"config": config, "best_epoch": 1, "best": best,
               "majority_baseline": {"val_acc": max(labels.mean(), 1 - labels.mean())}}
    dev = {"epoch": 1, "rows": list(range(len(labels))), "labels": labels.astype(int).tolist(),
           "p1": np.where(preds, 0.9, 0.1).tolist()}
    return report.Run(Path(f"{kind}_{seed}"), metrics, {"dev": dev})


@pytest.fixture(scope="module")
def teacher_and_student(cola) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """labels (527,) of real dev; a teacher wrong on every 4th sentence; a student wrong where the teacher is,
    and on 20 more sentences: consistently, if slightly, worse."""
    labels = np.array(cola["dev"].labels) == 1
    teacher = labels.copy()
    teacher[::4] = ~teacher[::4]
    student = teacher.copy()
    right = np.flatnonzero(teacher == labels)
    student[right[::20]] = ~student[right[::20]]
    assert (student != teacher).sum() == 20
    return labels, teacher, student


def test_comparisons_score_both_groups_on_the_same_resampled_sentences(teacher_and_student):
    """The paired difference, rebuilt here: both groups scored on each of the N_BOOT resamples (seed
    BOOT_SEED), and the 2.5th and 97.5th percentiles of their difference. Resampling the groups independently
    gives an interval ~4x wider that contains 0; the paired one excludes it (the student is worse on 20
    sentences, and never better)."""
    labels, teacher, student = teacher_and_student
    rep = report.build_report([fake_run("lora", 1, teacher, labels), fake_run("distil", 1, student, labels)])
    (c,) = [p for p in rep["pairs"] if p["split"] == "dev"]
    assert (c["a"], c["b"]) == ("G2", "teacher lora_1 (G1)")
    idx = np.random.default_rng(0).integers(0, len(labels), size=(2000, len(labels)))
    diff = report.scores(student[idx], labels[idx])[1] - report.scores(teacher[idx], labels[idx])[1]
    assert c["ci"] == pytest.approx(tuple(np.percentile(diff, [2.5, 97.5])), abs=1e-12)
    assert c["ci"][1] < 0 and c["excludes_zero"] == "below"  # excludes 0
    own = [np.subtract(*g["dev"]["mcc"]["ci"][::-1]) for g in rep["groups"]]
    assert np.subtract(*c["ci"][::-1]) < 0.6 * min(own)


def test_groups_share_the_sentence_resamples_and_draw_their_runs_on_their_own(runs, tmp_path):
    """The real runs (two seeds a group), rebuilt by hand: resample b scores the runs report.run_draws picks for
    the group on the sentences idx[b], the same idx for every group; a pair subtracts the two groups' resamples.
    (Until issue 23 every run was scored once a resample: the seed level was missing.)"""
    _, rep = report.compare(small_dirs(runs), tmp_path)
    groups = {g.kind: g for g in report.make_groups([report.load_run(d) for d in small_dirs(runs)])}
    labels = groups["lora"].runs[0].labels("dev")
    idx = np.random.default_rng(0).integers(0, len(labels), size=(2000, len(labels)))
    boot = {}
    for kind, g in groups.items():
        draws = report.run_draws(len(g.runs), g.key + "dev")
        assert draws.shape == (2000, 2) and 0.4 < draws.mean() < 0.6  # both runs drawn, about equally
        preds = g.preds("dev")
        per_b = [[report.scores(preds[r][idx[b]], labels[idx[b]]) for r in draws[b]] for b in range(2000)]
        boot[g.label] = [np.array([np.mean([s[k] for s in runs_b]) for runs_b in per_b]) for k in (0, 1)]
    for g in rep["groups"]:
        for k, key in enumerate(("acc", "mcc")):
            assert g["dev"][key]["ci"] == pytest.approx(tuple(np.percentile(boot[g["label"]][k], [2.5, 97.5])),
                                                        abs=1e-12)
    rnn_distil = [p for p in rep["pairs"] if p["split"] == "dev" and not p["b"].startswith("teacher")]
    assert len(rnn_distil) == 1
    p = rnn_distil[0]
    assert p["ci"] == pytest.approx(tuple(np.percentile(boot[p["a"]][1] - boot[p["b"]][1], [2.5, 97.5])), abs=1e-12)


def test_the_interval_is_95_percent(teacher_and_student):
    """Pinned on numbers whose percentiles are known, and on a fixed predictor whose accuracy's bootstrap
    distribution is ~normal, sd sqrt(p (1 - p) / n): its width is 2 x 1.96 sd (a 90% interval would be
    2 x 1.645 sd, 16% narrower; a 99% one 31% wider)."""
    assert report.interval(np.arange(2001.0)) == (50.0, 1950.0)
    assert report.interval(np.arange(2001.0)[::-1]) == (50.0, 1950.0)
    labels, teacher, _ = teacher_and_student
    rep = report.build_report([fake_run("lora", 1, teacher, labels)])
    lo, hi = rep["groups"][0]["dev"]["acc"]["ci"]
    p, n = (teacher == labels).mean(), len(labels)
    assert (hi - lo) / (2 * 1.96 * (p * (1 - p) / n) ** 0.5) == pytest.approx(1.0, abs=0.08)
    assert report.N_BOOT == 2000 and report.resamples(n).shape == (2000, n)


def confusion(tp: int, tn: int, fp: int, fn: int) -> tuple[np.ndarray, np.ndarray]:
    """(preds, labels) bool with the given confusion matrix."""
    labels = np.array([1] * tp + [0] * tn + [0] * fp + [1] * fn) == 1
    preds = np.array([1] * tp + [0] * tn + [1] * fp + [0] * fn) == 1
    return preds, labels


# (tp, tn, fp, fn) -> MCC = (tp tn - fp fn) / sqrt((tp + fp)(tp + fn)(tn + fp)(tn + fn)), worked by hand
HAND_MCC = {(5, 3, 1, 2): 13 / 840 ** 0.5,  # (15 - 2) / sqrt(6 * 7 * 4 * 5) = 0.44854
            (2, 1, 4, 3): -10 / 600 ** 0.5,  # (2 - 12) / sqrt(6 * 5 * 5 * 4) = -0.40825
            (7, 1, 0, 2): 7 / 189 ** 0.5,  # (7 - 0) / sqrt(7 * 9 * 1 * 3) = 0.50918
            (3, 3, 0, 0): 1.0, (0, 0, 3, 3): -1.0,
            (4, 0, 2, 0): 0.0, (0, 4, 0, 2): 0.0}  # one class predicted: 0 by convention, not 0/0


@pytest.mark.parametrize("counts", list(HAND_MCC))
def test_mcc_of_hand_worked_confusion_matrices(counts):
    from metrics import matthews_corrcoef
    preds, labels = confusion(*counts)
    acc, mcc = report.scores(preds, labels)
    assert mcc == pytest.approx(HAND_MCC[counts], abs=1e-12)
    assert acc == pytest.approx((counts[0] + counts[1]) / sum(counts), abs=1e-12)
    assert matthews_corrcoef(torch.tensor(preds), torch.tensor(labels)) == pytest.approx(HAND_MCC[counts], abs=1e-12)


def test_scores_match_the_trainer_mcc(cola):
    from metrics import matthews_corrcoef
    labels = torch.tensor(cola["dev"].labels)
    g = torch.Generator().manual_seed(0)
    for flip in (0.1, 0.4, 0.7):
        preds = torch.where(torch.rand(len(labels), generator=g) < flip, 1 - labels, labels)
        acc, mcc = report.scores(preds.numpy() == 1, labels.numpy() == 1)
        assert mcc == pytest.approx(matthews_corrcoef(preds, labels), abs=1e-12)
        assert acc == pytest.approx(float((preds == labels).float().mean()), abs=1e-6)
    acc, mcc = report.scores(np.ones(len(labels), bool), labels.numpy() == 1)  # one class: MCC 0
    assert mcc == 0 and acc == pytest.approx(365 / 527)


@pytest.mark.parametrize("cls", [0, 1])
def test_a_one_class_predictor_is_flagged_collapsed_whichever_class(cola, cls):
    """Both one-class predictors, the minority class (0 on CoLA) too, are flagged and named; one sentence of
    the other class is enough not to be."""
    from metrics import describe, evaluate, summarize
    labels = torch.tensor(cola["dev"].labels)
    stats = summarize(torch.full_like(labels, cls), labels)
    assert stats["collapsed"] is True and stats["pos_rate"] == cls and stats["mcc"] == 0
    assert f"COLLAPSED: predicts only class {cls}" in describe(stats, 0.69)
    preds = torch.full_like(labels, cls)
    preds[100] = 1 - cls
    stats = summarize(preds, labels)
    assert stats["collapsed"] is False and "COLLAPSED" not in describe(stats, 0.69)
    model = DistilRNN(embd_dim=8, hidden_size=8).eval()  # a head that always says cls, through evaluate
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.tensor([5.0, -5.0]) * (1 - 2 * cls))
    stats = evaluate(model, cola["dev"], 256, torch.device("cpu"), Precision("fp32", "cpu"))
    assert stats["collapsed"] is True and stats["pos_rate"] == cls
    assert stats["acc"] == pytest.approx((365 if cls else 162) / 527)


# ---------------------------------------------------------------- hand-made runs: pairs, seeds, OOD, figure, JSON

LORA = {"gpt_variant": "gpt2-medium", "lora_rank": 8, "lora_targets": "c_attn,attn.c_proj,c_fc,mlp.c_proj",
        "epochs": 10, "lr": 4e-4}
STUDENT = {"mode": "rnn", "teacher": "runs/lora_a", "temperature": 2.0, "alpha": 0.7, "augment": 0, "cell": "gru",
           "hidden_size": 64, "init_embeddings": "none", "embd_dim": 16, "gpt_variant": None, "epochs": 10,
           "lr": 2e-3, "cache_dir": "runs/cache"}


def flip(labels: np.ndarray, frac: float, seed: int = 0) -> np.ndarray:
    """labels with round(frac * n) of them flipped: the first ones of a permutation drawn from `seed`, so a larger
    frac with the same seed flips a superset (a run wrong on exactly the extra sentences)."""
    order = np.random.default_rng(seed).permutation(len(labels))[:round(frac * len(labels))]
    preds = labels.copy()
    preds[order] = ~preds[order]
    return preds


def p1_of(preds: np.ndarray, seed: int = 0) -> np.ndarray:
    """P(acceptable) with varied confidence on the side of `preds`."""
    u = np.random.default_rng(seed).uniform(0.02, 0.98, len(preds))
    return np.where(preds, 0.5 + 0.5 * u, 0.5 - 0.5 * u)


def write_run(path: Path, config: dict, dev: np.ndarray, dev_labels: np.ndarray, ood: np.ndarray,
              ood_labels: np.ndarray, dev_rows: list[int] | None = None) -> Path:
    """A finished run as the training scripts leave it for report.py: metrics.json and predictions.json whose best
    epoch predicted `dev` and `ood` (bool predictions, or P(acceptable) floats)."""
    path.mkdir(parents=True)
    record, preds = {}, {}
    for split, p, labels in (("dev", dev, dev_labels), ("ood_dev", ood, ood_labels)):
        p1 = p1_of(p) if p.dtype == bool else p
        acc, mcc = report.scores(p1 > 0.5, labels)
        record[split] = {"acc": float(acc), "mcc": float(mcc), "collapsed": bool(len(set(p1 > 0.5)) == 1),
                         "majority_acc": max(labels.mean(), 1 - labels.mean())}
        rows = dev_rows if split == "dev" and dev_rows else list(range(len(labels)))
        preds[split] = {"epoch": 1, "rows": rows, "labels": labels.astype(int).tolist(), "p1": p1.tolist()}
    d = record["dev"]
    metrics = {"config": config, "best_epoch": 1, "epochs": [],
               "best": {"val_acc": d["acc"], "val_mcc": d["mcc"], "val_collapsed": d["collapsed"]},
               "majority_baseline": {"val_acc": d["majority_acc"], "val_loss": 0.62}, "ood_dev": record["ood_dev"]}
    (path / METRICS).write_text(json.dumps(metrics))
    (path / PREDICTIONS).write_text(json.dumps(preds))
    return path


@pytest.fixture(scope="module")
def dev_ood(cola) -> tuple[np.ndarray, np.ndarray]:
    return np.array(cola["dev"].labels) == 1, np.array(cola["ood_dev"].labels) == 1


def by_runs(rep: dict) -> dict[str, frozenset]:
    """label -> the names of its runs' directories."""
    return {g["label"]: frozenset(Path(r["path"]).name for r in g["runs"]) for g in rep["groups"]}


def pair_set(rep: dict, split: str = "dev") -> set[tuple]:
    """Each pair as (a's run names, b's run names, is b a teacher)."""
    names = by_runs(rep)
    return {(names[p["a"]], frozenset(Path(r).name for r in p["b_runs"]), p["b"].startswith("teacher"))
            for p in rep["pairs"] if p["split"] == split}


def test_exactly_the_right_pairs_among_near_misses(dev_ood, tmp_path):
    """A student pairs with its own teacher (one run, not that run's group; an ensemble as one model) and, for a
    distil group, with the rnn group of the same settings outside distillation: a student of another width,
    another learning rate or another dev set is not paired, and says why."""
    dev, ood = dev_ood
    root = tmp_path / "runs"
    run = lambda name, config, frac, seed: write_run(root / name, config, p1_of(flip(dev, frac, seed), seed), dev,
                                                     flip(ood, frac, seed), ood)
    a, b = str(root / "lora_a"), "runs/lora_b"  # as recorded: an absolute path, and one relative to where it ran
    run("lora_a", {**LORA, "seed": 1}, 0.2, 1)
    run("lora_a2", {**LORA, "seed": 2}, 0.25, 2)  # lora_a's group, but no student's teacher
    run("lora_b", {**LORA, "lora_rank": 4, "seed": 1}, 0.3, 3)
    for s in (1, 2):
        run(f"rnn64_{s}", {**STUDENT, "teacher": a, "seed": s}, 0.3, 10 + s)
    run("rnn32_1", {**STUDENT, "teacher": a, "hidden_size": 32, "seed": 1}, 0.3, 13)
    write_run(root / "rnn64_small", {**STUDENT, "teacher": a, "seed": 1, "max_eval_samples": 100},
              flip(dev[:100], 0.3), dev[:100], flip(ood, 0.3), ood, dev_rows=list(range(100)))
    distil = {**STUDENT, "mode": "distil", "gpt_variant": "gpt2-medium", "teacher_fingerprint": "f" * 64}
    for s in (1, 2):
        run(f"distil64_{s}", {**distil, "teacher": a, "seed": s}, 0.28, 20 + s)
    run("distilT4_1", {**distil, "teacher": b, "temperature": 4.0, "kd_loss": "mse", "seed": 1}, 0.28, 23)
    run("distil128_1", {**distil, "teacher": a, "hidden_size": 128, "seed": 1}, 0.28, 24)
    run("distil_lr_1", {**distil, "teacher": a, "lr": 1e-3, "seed": 1}, 0.28, 25)
    a2 = str(root / "lora_a2")
    run("distil_ens_1", {**distil, "teacher": [a, b, a2], "seed": 1}, 0.28, 26)
    write_run(root / "distil64_moved", {**distil, "teacher": a, "seed": 1}, p1_of(flip(dev, 0.28, 27)), dev,
              flip(ood, 0.28), ood, dev_rows=list(range(1000, 1000 + len(dev))))  # other dev rows, same settings
    text, rep = report.compare(sorted(root.iterdir()), tmp_path / "plots")

    f = frozenset
    rnn64, T = f({"rnn64_1", "rnn64_2"}), True
    assert pair_set(rep) == {
        (rnn64, f({"lora_a"}), T), (f({"rnn32_1"}), f({"lora_a"}), T),
        (f({"distil64_1", "distil64_2"}), rnn64, False), (f({"distil64_1", "distil64_2"}), f({"lora_a"}), T),
        (f({"distilT4_1"}), rnn64, False), (f({"distilT4_1"}), f({"lora_b"}), T),
        (f({"distil128_1"}), f({"lora_a"}), T), (f({"distil_lr_1"}), f({"lora_a"}), T),
        (f({"distil_ens_1"}), rnn64, False), (f({"distil_ens_1"}), f({"lora_a", "lora_b", "lora_a2"}), T)}
    assert pair_set(rep, "ood_dev") == pair_set(rep) - {(f({"rnn64_small"}), f({"lora_a"}), T)}
    names = by_runs(rep)
    why = {(names[u["group"]], u["partner"]): u["why"] for u in rep["unpaired"]}
    assert set(why) == {(f({"distil128_1"}), "an rnn group of the same settings"),
                        (f({"distil_lr_1"}), "an rnn group of the same settings"),
                        (f({"rnn64_small"}), "its teacher"), (f({"distil64_moved"}), "its teacher"),
                        (f({"distil64_moved"}), "an rnn group of the same settings")}
    assert why[f({"distil64_moved"}), "an rnn group of the same settings"] == (
        "no rnn group on the same dev sentences among the runs given")
    assert "differs in hidden_size (128 here, " in why[f({"distil128_1"}), "an rnn group of the same settings"]
    assert "lr (0.001 here, 0.002 there)" in why[f({"distil_lr_1"}), "an rnn group of the same settings"]
    assert "other dev sentences" in why[f({"rnn64_small"}), "its teacher"]
    assert report.PAIRING_RULE in text and "kd_loss" in report.PAIRING_RULE

    # the teacher side is the teacher's own score: one run's metrics, or the ensemble's mean-logit prediction
    # (with three members it differs from the mean probability's; with two the two rules always agree)
    p1 = np.array([json.loads((root / n / PREDICTIONS).read_text())["dev"]["p1"]
                   for n in ("lora_a", "lora_b", "lora_a2")])
    ensemble_mcc = report.scores(np.log(p1 / (1 - p1)).mean(0) > 0, dev)[1]
    assert ensemble_mcc != report.scores(p1.mean(0) > 0.5, dev)[1]
    for p in rep["pairs"]:
        if p["split"] == "dev" and names[p["a"]] == f({"distil_ens_1"}) and p["b"].startswith("teacher"):
            assert p["b_mean"] == pytest.approx(ensemble_mcc, abs=1e-12)
            labels = sorted({l for l, n in names.items() if n & {"lora_a", "lora_b"}})
            assert p["b"] == f"teacher {a} + {b} + {a2} ({', '.join(labels)})"
        if p["split"] == "dev" and p["b_runs"] == [a]:
            assert p["b_mean"] == metrics_of(root / "lora_a")["best"]["val_mcc"]
    assert ensemble_mcc not in [metrics_of(root / n)["best"]["val_mcc"] for n in ("lora_a", "lora_b", "lora_a2")]


def seeded_pair(root: Path, dev: np.ndarray, ood: np.ndarray, rnn_fracs: tuple, distil_fracs: tuple) -> dict:
    """An rnn group and a distil group of the same settings, run s of each wrong on the first rnn_fracs[s] /
    distil_fracs[s] of one fixed order of the sentences; compared."""
    for s, frac in enumerate(rnn_fracs, start=1):
        write_run(root / f"rnn_{s}", {**STUDENT, "seed": s}, flip(dev, frac), dev, flip(ood, frac), ood)
    for s, frac in enumerate(distil_fracs, start=1):
        write_run(root / f"distil_{s}", {**STUDENT, "mode": "distil", "seed": s}, flip(dev, frac), dev,
                  flip(ood, frac), ood)
    return report.compare(sorted(root.iterdir()), root.parent / f"{root.name}_plots")[1]


def test_the_interval_holds_the_seed_variance(dev_ood, tmp_path):
    """Two-level bootstrap, pinned on hand-made seeds. Seeds far apart (MCC about 0.9, 0.5, 0.1): each group's
    interval spans a good part of that spread and is several times the sentence-only one, and the distil − rnn
    difference (-0.1 on every seed) is not distinguishable. Identical seeds: the interval is exactly the
    sentence-only one, and the same difference, paired sentence by sentence, is clearly below 0."""
    dev, ood = dev_ood
    idx = report.resamples(len(dev))
    spread = seeded_pair(tmp_path / "spread", dev, ood, (0.025, 0.125, 0.225), (0.05, 0.15, 0.25))
    same = seeded_pair(tmp_path / "same", dev, ood, (0.125,) * 3, (0.15,) * 3)
    for rep, wide in ((spread, True), (same, False)):
        for g in rep["groups"]:
            runs = [report.load_run(r["path"]) for r in g["runs"]]
            sentence_only = report.interval(report.seed_mean_scores(np.array([r.p1("dev") > 0.5 for r in runs]),
                                                                    dev, idx)[1])
            width, width1 = np.subtract(*g["dev"]["mcc"]["ci"][::-1]), np.subtract(*sentence_only[::-1])
            mccs = [r["dev"]["mcc"] for r in g["runs"]]
            if wide:
                assert width > 0.4 * (max(mccs) - min(mccs)) and width > 3 * width1, (width, width1, mccs)
            else:
                assert g["dev"]["mcc"]["ci"] == pytest.approx(sentence_only, abs=1e-12)
        (p,) = [p for p in rep["pairs"] if p["split"] == "dev"]
        assert p["difference"] == pytest.approx(np.mean([r["dev"]["mcc"] for r in rep["groups"][1]["runs"]]) -
                                                np.mean([r["dev"]["mcc"] for r in rep["groups"][0]["runs"]]))
        assert p["difference"] < -0.05
        if wide:
            assert p["ci"][0] < 0 < p["ci"][1] and p["excludes_zero"] is None
            assert p["verdict"] == "not distinguishable with these seeds (3 seeds against 3 seeds)"
        else:
            assert p["ci"][1] < 0 and p["excludes_zero"] == "below"
            assert p["verdict"] == "G2 lower: the interval excludes 0 (3 seeds against 3 seeds)"
            own = min(np.subtract(*g["dev"]["mcc"]["ci"][::-1]) for g in rep["groups"])
            assert np.subtract(*p["ci"][::-1]) < 0.5 * own  # paired: the same sentences on both sides


def test_one_seed_a_side_says_seed_variance_is_unknown(dev_ood, tmp_path):
    dev, ood = dev_ood
    rep = seeded_pair(tmp_path / "one", dev, ood, (0.2,), (0.1,))
    (p,) = [p for p in rep["pairs"] if p["split"] == "dev"]
    assert p["excludes_zero"] == "above" and p["verdict"] == (
        "G2 higher: the interval excludes 0 (1 seed against 1 seed); seed variance unknown for G2 and G1 (1 seed): "
        "the interval leaves it out")


def test_out_of_domain_gets_its_own_table_and_pairs(dev_ood, tmp_path):
    """Dev and out-of-domain scores that disagree (the rnn better on dev, the distilled student out of domain):
    each group's OOD row holds its own OOD scores, its interval is bootstrapped from its OOD predictions, and the
    OOD difference has the OOD sign."""
    dev, ood = dev_ood
    root = tmp_path / "runs"
    for s in (1, 2):
        write_run(root / f"rnn_{s}", {**STUDENT, "seed": s}, flip(dev, 0.1, s), dev, flip(ood, 0.35, s), ood)
        write_run(root / f"distil_{s}", {**STUDENT, "mode": "distil", "seed": s}, flip(dev, 0.3, s), dev,
                  flip(ood, 0.15, s), ood)
    text, rep = report.compare(sorted(root.iterdir()), tmp_path / "plots")
    header = text.split("## Groups")[0]
    assert "dev-selected epoch" in header and "never used for selection" in header
    ood_table = section(text, "Out-of-domain dev, 516 sentences")
    assert "not used for selection" in text.split("## Out-of-domain dev, 516 sentences")[1].splitlines()[0]
    idx = report.resamples(len(ood), seed=report.BOOT_SEED + 1)
    for g in rep["groups"]:
        own = [metrics_of(Path(r["path"]))["ood_dev"] for r in g["runs"]]
        assert g["ood_dev"]["mcc"]["mean"] == pytest.approx(np.mean([o["mcc"] for o in own]), abs=1e-12)
        assert g["ood_dev"]["size"] == 516 and g["ood_dev"]["majority_baseline"] == own[0]["majority_acc"]
        row = next(ln for ln in ood_table.splitlines() if ln.startswith(f"| {g['label']} |"))
        assert f"| {_mean_pm(g['ood_dev']['mcc'])} |" in row and f"{g['runs'][0]['seed']}: {own[0]['mcc']:.4f}" in row
        runs = [report.load_run(r["path"]) for r in g["runs"]]
        preds = np.array([r.p1("ood_dev") > 0.5 for r in runs])
        draws = report.run_draws(len(runs), report.group_key(runs[0]) + "ood_dev")
        mcc = report.seed_mean_scores(preds, ood, idx, draws)[1]
        assert g["ood_dev"]["mcc"]["ci"] == pytest.approx(report.interval(mcc), abs=1e-12)
    pairs = {p["split"]: p for p in rep["pairs"]}
    assert pairs["dev"]["difference"] < 0 < pairs["ood_dev"]["difference"]
    assert pairs["ood_dev"]["difference"] == pytest.approx(
        rep["groups"][1]["ood_dev"]["mcc"]["mean"] - rep["groups"][0]["ood_dev"]["mcc"]["mean"])
    assert "Paired differences of out-of-domain dev MCC" in ood_table


def _mean_pm(s: dict) -> str:
    return f"{s['mean']:.4f} ± {s['std']:.4f}"


def test_a_collapsed_group_says_so_instead_of_a_zero_width_interval(dev_ood, tmp_path):
    dev, ood = dev_ood
    root = tmp_path / "runs"
    for s in (1, 2):
        write_run(root / f"rnn_{s}", {**STUDENT, "seed": s}, np.ones_like(dev), dev, np.ones_like(ood), ood)
    write_run(root / "distil_1", {**STUDENT, "mode": "distil", "seed": 1}, flip(dev, 0.2), dev, flip(ood, 0.2), ood)
    text, rep = report.compare(sorted(root.iterdir()), tmp_path / "plots")
    assert rep["groups"][0]["dev"]["collapsed"] == 2 and rep["groups"][0]["dev"]["mcc"]["ci"] == (0.0, 0.0)
    rows = [next(ln for ln in section(text, heading).splitlines() if ln.startswith("| G1 | rnn | 2 seeds |"))
            for heading in ("In-domain dev", "Out-of-domain dev")]
    for row in rows:
        assert "collapsed: every run predicts one class" in row and "[0.0000, 0.0000]" not in row


def test_a_run_that_lacks_a_newer_setting_groups_with_runs_of_its_default(dev_ood, tmp_path, monkeypatch):
    """An rnn run written before kd_loss existed and one recording kd_loss=kl are one group of two seeds."""
    import cli
    monkeypatch.setitem(cli.CONFIG_DEFAULTS, "kd_loss", "kl")
    dev, ood = dev_ood
    write_run(tmp_path / "runs" / "old", {**STUDENT, "seed": 1}, flip(dev, 0.2, 1), dev, flip(ood, 0.2), ood)
    write_run(tmp_path / "runs" / "new", {**STUDENT, "kd_loss": "kl", "seed": 2}, flip(dev, 0.2, 2), dev,
              flip(ood, 0.2), ood)
    _, rep = report.compare(sorted((tmp_path / "runs").iterdir()), tmp_path / "plots")
    assert [len(g["runs"]) for g in rep["groups"]] == [2] and "kd_loss" not in rep["groups"][0]["settings"]


def test_a_run_without_out_of_domain_predictions_is_reported_on_dev(dev_ood, tmp_path):
    """A run from before out-of-domain predictions were saved: its dev row and pairs stand, its OOD row says so."""
    dev, ood = dev_ood
    root = tmp_path / "runs"
    write_run(root / "rnn_1", {**STUDENT, "seed": 1}, flip(dev, 0.2), dev, flip(ood, 0.2), ood)
    old = write_run(root / "distil_1", {**STUDENT, "mode": "distil", "seed": 1}, flip(dev, 0.3), dev,
                    flip(ood, 0.3), ood)
    p = json.loads((old / PREDICTIONS).read_text())
    del p["ood_dev"]
    (old / PREDICTIONS).write_text(json.dumps(p))
    text, rep = report.compare(sorted(root.iterdir()), tmp_path / "plots")
    assert rep["groups"][1]["ood_dev"] is None and rep["groups"][1]["runs"][0]["ood_dev"] is None
    assert [p["split"] for p in rep["pairs"]] == ["dev"]
    row = "| G2 | distil | 1 seed | – | – | – | – | – | not saved (an older run) | – |"
    assert row in section(text, "Out-of-domain")


def long_groups(root: Path, dev: np.ndarray, ood: np.ndarray) -> list[Path]:
    """9 groups that differ in several long settings: LoRA targets, bases, ensembles of deep teacher paths."""
    deep = "experiments/2026-12-06/cola_sweep/gpt2-medium_lora/rank_{}_targets_all_projections"
    dirs = []
    for i, (rank, targets) in enumerate([(4, "c_attn"), (8, "c_attn,attn.c_proj,c_fc,mlp.c_proj"),
                                         (16, "c_attn,attn.c_proj,c_fc,mlp.c_proj,lm_head.extra_projection")]):
        dirs.append(write_run(root / deep.format(rank), {**LORA, "lora_rank": rank, "lora_targets": targets,
                                                         "gpt_variant": f"/home/someone/checkpoints/gpt2-medium-{i}",
                                                         "seed": 1}, flip(dev, 0.2 + 0.02 * i, i), dev,
                              flip(ood, 0.25, i), ood))
    teachers = [str(d) for d in dirs]
    for i, (mode, teacher, temperature) in enumerate([("rnn", teachers[0], 2.0), ("rnn", teachers[1], 2.0),
                                                      ("distil", teachers[0], 2.0), ("distil", teachers[1], 4.0),
                                                      ("distil", teachers[:2], 2.0), ("distil", teachers, 8.0)]):
        for s in (1, 2):
            dirs.append(write_run(root / f"student_{i}_{s}", {**STUDENT, "mode": mode, "teacher": teacher,
                                                              "temperature": temperature, "seed": s,
                                                              "teacher_fingerprint": f"{i:064x}"},
                                  flip(dev, 0.1 + 0.05 * i + 0.03 * s, 100 * i + s), dev, flip(ood, 0.3, s), ood))
    return dirs


def test_the_figure_stays_legible_with_many_groups(dev_ood, tmp_path):
    """9 groups with long settings: no warning at all (matplotlib's layout warnings included), every text inside
    the figure, the legend and the key clear of the axes, each label on its own group's line, teachers named by
    their run paths and never by a hash."""
    import warnings

    import matplotlib.text
    dev, ood = dev_ood
    dirs = long_groups(tmp_path / "runs", dev, ood)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        text, rep = report.compare(dirs, tmp_path / "plots")
        fig = report.report_figure(rep)
        fig.set_dpi(report.DPI)  # as saved: text extents depend on the resolution (hinting)
        fig.canvas.draw()
    assert len(rep["groups"]) == 9
    renderer = fig.canvas.get_renderer()
    box = fig.bbox
    texts = [t for t in fig.findobj(matplotlib.text.Text) if t.get_visible() and t.get_text().strip()]
    for t in texts:
        e = t.get_window_extent(renderer)
        assert e.x0 >= box.x0 and e.y0 >= box.y0 and e.x1 <= box.x1 and e.y1 <= box.y1, (t.get_text()[:60], e, box)
    axes = [ax.get_tightbbox(renderer) for ax in fig.axes]
    (key,) = [t for t in texts if t.get_gid() == "key"]
    for other in (fig.legends[0].get_window_extent(renderer), key.get_window_extent(renderer)):
        assert all(not other.overlaps(a) for a in axes)
    assert not fig.legends[0].get_window_extent(renderer).overlaps(key.get_window_extent(renderer))
    for ax in fig.axes:  # every label on the line of its own group: the dot is the group's mean
        ticks = {lab.get_text().split()[0]: y
                 for lab, y in zip(fig.axes[0].get_yticklabels(), fig.axes[0].get_yticks())}
        for g in rep["groups"]:
            split, metric = next(gid.split()[1:] for gid in [line.get_gid() for line in ax.get_lines()] if gid)
            (dot,) = [line for line in ax.get_lines()
                      if line.get_gid() == f"{g['label']} {split} {metric}" and line.get_marker() == "o"]
            assert dot.get_ydata()[0] == ticks[g["label"]]
            assert dot.get_xdata()[0] == pytest.approx(g[split][metric]["mean"])
    words = "\n".join(t.get_text() for t in texts)
    for g in rep["groups"]:  # the key under the figure gives each group's settings in full
        for k, v in g["settings"].items():
            assert f"{k}={v}".replace(" ", "") in words.replace(" ", "").replace("\n", "")
    assert "f" * 8 not in words and "0" * 40 not in words + text  # no fingerprint
    assert "teacher_fingerprint" not in words + text
    assert str(dirs[0]) in text and "lm_head.extra_projection" in text  # paths and lists kept whole


def test_the_json_holds_every_group_and_pair(dev_ood, tmp_path):
    dev, ood = dev_ood
    seeded_pair(tmp_path / "runs", dev, ood, (0.1, 0.2), (0.15, 0.25))
    _, rep = report.compare(sorted((tmp_path / "runs").iterdir()), tmp_path / "plots", "NAME")
    saved = json.loads((tmp_path / "plots" / "NAME.json").read_text())
    assert saved == json.loads(json.dumps(rep))
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["NAME.json", "NAME.md", "NAME.png"]
    rnn = saved["groups"][0]
    assert rnn["kind"] == "rnn" and [r["seed"] for r in rnn["runs"]] == [1, 2]
    assert rnn["config"]["hidden_size"] == 64 and "seed" not in rnn["config"]
    for r in rnn["runs"]:
        own = metrics_of(Path(r["path"]))
        assert r["dev"]["mcc"] == own["best"]["val_mcc"] and r["ood_dev"]["mcc"] == own["ood_dev"]["mcc"]
    for split in ("dev", "ood_dev"):
        assert set(rnn[split]) == {"size", "sentences", "majority_baseline", "acc", "mcc", "collapsed"}
        assert set(rnn[split]["mcc"]) == {"mean", "std", "ci"}
    assert {(p["a"], p["b"], p["split"]) for p in saved["pairs"]} == {("G2", "G1", "dev"), ("G2", "G1", "ood_dev")}
    assert all({"difference", "ci", "verdict", "excludes_zero", "a_seeds", "b_seeds"} <= set(p) for p in saved["pairs"])


def test_a_folder_of_runs_is_read_at_any_depth(dev_ood, tmp_path, capsys):
    dev, ood = dev_ood
    write_run(tmp_path / "exp" / "hot" / "rnn_1", {**STUDENT, "seed": 1}, flip(dev, 0.2), dev, flip(ood, 0.2), ood)
    write_run(tmp_path / "exp" / "cold" / "b" / "rnn_2", {**STUDENT, "seed": 2}, flip(dev, 0.3), dev,
              flip(ood, 0.2), ood)
    (tmp_path / "exp" / "cache").mkdir()
    (tmp_path / "exp" / "cache" / "teacher_x.safetensors").write_bytes(b"")
    r = cli(str(tmp_path / "exp"), "--plots_dir", str(tmp_path / "plots"))
    assert r.returncode == 0 and "note:" not in r.stdout, r.stdout + r.stderr
    saved = json.loads((tmp_path / "plots" / "comparison.json").read_text())
    assert [[Path(x["path"]).name for x in g["runs"]] for g in saved["groups"]] == [["rnn_1", "rnn_2"]]
    found = report.find_runs([str(tmp_path / "exp" / "cache"), str(tmp_path / "exp" / "hot")])
    assert found == [tmp_path / "exp" / "hot" / "rnn_1"]
    assert capsys.readouterr().out == (f"note: skipping {tmp_path / 'exp' / 'cache'}: not a run directory "
                                       f"(no {METRICS}) and holds none\n")


# ---------------------------------------------------------------- curves

def curve_metrics(mode: str | None, collapsed: bool) -> dict:
    epochs = [{"epoch": e, "train_loss": 0.5 / e, "train_acc": 0.6 + 0.05 * e, "val_loss": 0.62, "lr": 1e-3,
               "val_acc": 0.69 if collapsed else 0.70 + 0.01 * e, "val_mcc": 0.0 if collapsed else -0.15 + 0.1 * e,
               "val_pos_rate": 1.0 if collapsed else 0.7, "val_collapsed": collapsed} for e in (1, 2, 3)]
    return {"config": {"mode": mode} if mode else {"gpt_variant": "gpt2"}, "epochs": epochs,
            "majority_baseline": {"val_acc": 0.69, "val_loss": 0.619}}


def labels_of(ax) -> list[str]:
    return [h.get_label() for h in ax.get_legend_handles_labels()[0]]


@pytest.mark.parametrize("mode", [None, "rnn", "distil"])
def test_curves_separate_loss_accuracy_and_mcc(mode):
    figs = report.curve_figures(curve_metrics(mode, collapsed=False), "run")
    acc, mcc = figs["accuracy"].axes
    assert acc.get_ylabel() == "accuracy" and not any("MCC" in s for s in labels_of(acc))
    assert "MCC" in mcc.get_ylabel() and "accuracy" not in mcc.get_ylabel()
    assert mcc.get_ylim()[0] <= -0.05  # a negative MCC (-0.05) is on the axis, not clipped
    loss_axes = figs["loss"].axes
    if mode == "distil":
        kd, ce = loss_axes
        assert kd.get_title() == "run: train KD loss" and kd.get_ylabel() == report.LEGACY_KD_LOSS  # no loss_name
        assert labels_of(kd) == ["train KD loss"]  # alone: no dev cross-entropy, no class-prior line
        assert "train" not in " ".join(labels_of(ce)) and any("prior" in s for s in labels_of(ce))
        mse = report.curve_figures({**curve_metrics(mode, collapsed=False), "loss_name": loss_name("mse", 2.0, 0.7)},
                                   "run")["loss"].axes[0]  # the label is the run's own loss (issue 22)
        assert "MSE" in mse.get_title() and mse.get_ylabel() == "MSE distillation loss: 0.7 MSE(logits) + 0.3 CE"
        assert "KD" not in mse.get_title() + mse.get_ylabel() + " ".join(labels_of(mse))
    else:
        (ce,) = loss_axes
        assert "KD" not in ce.get_title() and {"train", "dev"} <= set(labels_of(ce))


def test_the_train_loss_label_comes_from_the_run():
    """metrics["loss_name"] labels the train loss's own panel; the label is not hard-coded for a mode."""
    m = {**curve_metrics("distil", collapsed=False), "loss_name": "KD loss: 0.5 T² KL + 0.5 CE, T = 4"}
    kd, _ = report.curve_figures(m, "run")["loss"].axes
    assert kd.get_ylabel() == "KD loss: 0.5 T² KL + 0.5 CE, T = 4"
    m = {**curve_metrics("rnn", collapsed=False), "loss_name": "mse"}  # any mode: a loss other than CE
    kd, ce = report.curve_figures(m, "run")["loss"].axes
    assert kd.get_ylabel() == "mse" and labels_of(kd) == ["train mse"] and "train" not in labels_of(ce)
    (ce,) = report.curve_figures({**m, "loss_name": report.CE_LOSS}, "run")["loss"].axes
    assert "train" in labels_of(ce)


def test_a_one_epoch_run_has_integer_epoch_ticks():
    m = curve_metrics("rnn", collapsed=False)
    m["epochs"], m["best_epoch"] = m["epochs"][:1], 1
    for fig in report.curve_figures(m, "run").values():
        fig.canvas.draw()
        for ax in fig.axes:
            assert [t.get_text() for t in ax.get_xticklabels()] == ["1"]


def test_a_collapsed_dev_curve_is_drawn_over_its_baseline_and_marked():
    figs = report.curve_figures(curve_metrics("rnn", collapsed=True), "run")
    for ax in figs["accuracy"].axes:
        dev = next(ln for ln in ax.get_lines() if ln.get_label() == "dev")
        base = next(ln for ln in ax.get_lines() if "baseline" in ln.get_label())
        assert dev.get_zorder() > base.get_zorder()
        assert "dev predicts one class only" in labels_of(ax)


def cli(*args: str) -> subprocess.CompletedProcess:
    """report.py's main in this process (test_cli.py runs the script itself)."""
    return in_process("report.py", *args)


def test_curves_are_redrawn_from_metrics_json(runs, tmp_path):
    run = tmp_path / "distil_1"
    shutil.copytree(runs / "distil_1", run)
    for name in ("loss.png", "accuracy.png"):
        (run / name).unlink()
    r = cli("--curves", str(run))
    assert r.returncode == 0, r.stderr
    for name in ("loss.png", "accuracy.png"):  # redrawn in the run's own directory
        assert (run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["distil_1"]


def test_curves_mark_the_kept_epoch_and_explain_the_prior_line():
    m = {**curve_metrics("rnn", collapsed=False), "best_epoch": 2}
    figs = report.curve_figures(m, "rnn_2")
    for ax in (*figs["loss"].axes, *figs["accuracy"].axes):
        kept = [ln for ln in ax.get_lines() if ln.get_label().startswith("kept")]
        assert len(kept) == 1 and set(kept[0].get_xdata()) == {2}, labels_of(ax)
        assert ax.get_title().startswith("rnn_2: ")
    prior = next(s for s in labels_of(figs["loss"].axes[0]) if s.startswith("class prior"))
    assert "label rate" in prior and "0.619" in prior


def test_curves_never_zoom_in_below_a_few_sentences():
    """A run whose dev accuracy moves by one sentence in 200 (0.695 -> 0.700) must not fill its panel."""
    m = curve_metrics("rnn", collapsed=False)
    for r, acc in zip(m["epochs"], (0.695, 0.700, 0.695)):
        r.update(train_acc=acc, val_acc=acc, val_mcc=0.1 + acc - 0.695, train_loss=0.6, val_loss=0.6 + acc - 0.695)
    figs = report.curve_figures(m, "run")
    (ce,), (acc, mcc) = figs["loss"].axes, figs["accuracy"].axes
    for ax, span in ((ce, report.MIN_SPAN["loss"]), (acc, report.MIN_SPAN["accuracy"]),
                     (mcc, report.MIN_SPAN["mcc"])):
        lo, hi = ax.get_ylim()
        assert hi - lo >= span - 1e-9, (ax.get_title(), lo, hi)
    assert acc.get_ylim()[0] < 0.695 and acc.get_ylim()[1] > 0.700  # the data stays inside


def test_training_and_curves_name_the_run_alike(runs, tmp_path):
    """Training draws runs/rnn_2's curves into runs/rnn_2, where `report.py --curves` redraws them."""
    assert (runs / "rnn_2" / "accuracy.png").is_file()
    r = cli("--curves", str(runs / "rnn_2"))
    assert r.returncode == 0, r.stderr
    assert f"wrote {runs / 'rnn_2' / 'accuracy.png'}" in r.stdout


def test_each_training_run_writes_a_comparison_of_its_own(runs):
    """Every run's figures and comparison are in its own directory: no run writes a file beside the runs (the
    old plots/ filled up, and --out_dir runs/other/rnn_1 replaced runs/rnn_1's figures)."""
    for s in SEEDS:
        text = (runs / f"rnn_{s}" / "comparison.md").read_text()
        assert str(runs / f"rnn_{s}") in text and str(runs / f"rnn_{3 - s}") not in text
        assert (runs / f"rnn_{s}" / "comparison.png").is_file()
    assert all(p.is_dir() for p in runs.iterdir()), sorted(runs.iterdir())


def test_report_name_sets_the_file_stem(runs, tmp_path):
    """NAME.json joined NAME.md and NAME.png with issue 23."""
    r = cli(str(runs / "rnn_1"), "--plots_dir", str(tmp_path), "--name", "rnn_only")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == (f"wrote {tmp_path / 'rnn_only.md'}, {tmp_path / 'rnn_only.png'} and "
                                                 f"{tmp_path / 'rnn_only.json'}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rnn_only.json", "rnn_only.md", "rnn_only.png"]


def test_report_skips_folders_that_are_not_runs(runs, tmp_path):
    """`report.py runs/*` with the teacher-logit cache (runs/cache) and a plots folder among the runs."""
    (runs / "plots").mkdir(exist_ok=True)  # a folder a user keeps report.py's comparisons in
    assert (runs / "cache").is_dir()
    r = cli(str(runs / "rnn_1"), str(runs / "cache"), str(runs / "plots"), "--plots_dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    notes = [ln for ln in r.stdout.splitlines() if ln.startswith("note: skipping")]
    assert notes == [f"note: skipping {runs / d}: not a run directory (no metrics.json) and holds none"
                     for d in ("cache", "plots")]
    assert "rnn_1" in (tmp_path / "comparison.md").read_text()
    r = cli(str(runs / "cache"), "--plots_dir", str(tmp_path / "none"))  # no run at all: an error
    assert r.returncode == 2 and r.stderr.startswith("error: none of") and len(r.stderr.splitlines()) == 1, r.stderr
    r = cli(str(runs / "rnn_1"), str(runs / "rnn_typo"), "--plots_dir", str(tmp_path))  # a typo is not skipped
    assert r.returncode == 2 and "rnn_typo does not exist" in r.stderr, r.stderr


# ---------------------------------------------------------------- saved predictions

def test_predictions_are_saved_with_their_rows(runs, cola):
    m = metrics_of(runs / "rnn_full")
    p = json.loads((runs / "rnn_full" / PREDICTIONS).read_text())
    assert p["dev"]["rows"] == list(range(527)) and p["dev"]["labels"] == cola["dev"].labels
    assert p["dev"]["epoch"] == m["best_epoch"] and len(p["ood_dev"]["p1"]) == len(cola["ood_dev"])
    small = json.loads((runs / "rnn_1" / PREDICTIONS).read_text())["dev"]
    assert small["rows"] == stratified_sample(cola["dev"].labels, 100)
    assert small["labels"] == [cola["dev"].labels[i] for i in small["rows"]]


def test_an_old_run_without_predictions_is_one_clear_line(runs, tmp_path):
    old = tmp_path / "old_run"
    shutil.copytree(runs / "rnn_1", old)
    (old / PREDICTIONS).unlink()
    r = cli(str(runs / "rnn_2"), str(old), "--plots_dir", str(tmp_path / "plots"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and str(old / PREDICTIONS) in lines[0], r.stderr
    assert not (tmp_path / "plots" / "comparison.md").exists()


def test_a_run_given_twice_under_two_names_is_refused(runs, tmp_path):
    shutil.copytree(runs / "rnn_1", tmp_path / "copy")
    with pytest.raises(UserError, match="same config and seed"):
        report.compare([runs / "rnn_1", runs / "rnn_2", tmp_path / "copy"], tmp_path)


def test_predictions_left_over_from_another_run_are_refused(runs, tmp_path):
    """predictions.json must be the best epoch's of the run whose metrics.json it sits beside."""
    mixed = tmp_path / "mixed"
    shutil.copytree(runs / "rnn_1", mixed)
    p = json.loads((mixed / PREDICTIONS).read_text())
    p["dev"]["p1"] = [1 - x for x in p["dev"]["p1"]]  # every prediction flipped: another model's
    (mixed / PREDICTIONS).write_text(json.dumps(p))
    with pytest.raises(UserError, match="does not match"):
        report.load_run(mixed)


# ---------------------------------------------------------------- --max_*_samples

def test_stratified_sample_keeps_the_label_rate(cola, cola_dir):
    for split in ("train", "dev", "ood_dev"):
        labels = cola[split].labels
        full = sum(labels) / len(labels)
        for n in (100, 200, 500, 1000):
            if n >= len(labels):
                continue
            rows = stratified_sample(labels, n)
            assert len(rows) == len(set(rows)) == n and rows == sorted(rows)
            assert abs(sum(labels[i] for i in rows) / n - full) <= 0.01, (split, n)
            assert stratified_sample(labels, n) == rows  # seeded
    first = cola["train"].labels[:500]  # what the first 500 rows gave: 0.658 against 0.704
    assert abs(sum(first) / 500 - sum(cola["train"].labels) / len(cola["train"])) > 0.04
    small = load_cola(cola_dir, max_train_samples=500, max_eval_samples=200)
    assert abs(sum(small["train"].labels) / 500 - sum(cola["train"].labels) / len(cola["train"])) <= 0.01
    assert small["train"].sentences == [cola["train"].sentences[i] for i in small["train"].rows]


def test_the_sample_is_recorded_in_metrics_json(runs):
    data = metrics_of(runs / "rnn_1")["config"]["data"]
    assert data["train"]["rows"] == 64 and data["dev"]["rows"] == 100 and "rows_sha256" in data["dev"]
    assert metrics_of(runs / "rnn_2")["config"]["data"] == data  # every seed sees the same rows


# ---------------------------------------------------------------- epoch seeds

def test_neighbouring_seeds_do_not_share_epoch_orders(cola, tmp_path):
    """With seed + epoch, seed 0's epoch 2 was seed 1's epoch 1."""
    ds = Dataset("t", cola["train"].sentences[:64], cola["train"].ids[:64], cola["train"].labels[:64])
    orders = {}
    torch.set_num_threads(1)
    for seed in (0, 1):
        seen: list[list[int]] = []

        def loss_fn(logits, batch):
            seen.append(batch.index.tolist())
            return F.cross_entropy(logits, batch.labels)
        args = Namespace(eval_batch_size=256, out_dir=str(tmp_path / f"o{seed}"), plots_dir=str(tmp_path), epochs=2, lr=1e-3,
                         batch_size=16, weight_decay=0.0, warmup_ratio=0.0, grad_clip=1.0, seed=seed, resume=False,
                         compile=False)
        Path(args.out_dir).mkdir()
        torch.manual_seed(0)
        fit(DistilRNN(embd_dim=8, hidden_size=8), ds, ds, loss_fn, args, {}, "rnn", lambda: None,
            Precision("fp32", "cpu"))
        orders[seed] = [seen[:4], seen[4:]]  # 4 batches an epoch
    assert orders[0][1] != orders[1][0] and orders[0][0] != orders[1][0]
    assert len({epoch_seed(s, e) for s in range(20) for e in range(1, 21)}) == 400


# ---------------------------------------------------------------- distillation's teacher

def test_resume_with_a_retrained_teacher_is_refused(runs, cola_dir, tmp_path):
    from safetensors.torch import load_file, save_file
    teacher = tmp_path / "teacher"
    shutil.copytree(runs / "lora_1", teacher)
    flags = student_flags("distil", teacher, cola_dir, tmp_path / "distil", 1)
    train_student(flags)
    w = load_file(str(teacher / "adapter.safetensors"))
    w["score.weight"] = -w["score.weight"]  # "retrained"
    save_file(w, str(teacher / "adapter.safetensors"))
    with pytest.raises(UserError) as e:
        train_student([*flags, "--resume"])
    assert "--resume" in str(e.value) and "teacher" in str(e.value) and "\n" not in str(e.value)


def test_teacher_cache_key_has_device_and_precision(cola):
    keys = {cache_key("t", cola["dev"], torch.device(d), Precision(p, d)) for d in ("cpu", "cuda")
            for p in ("fp32", "bf16", "fp16")}
    assert len(keys) == 6
