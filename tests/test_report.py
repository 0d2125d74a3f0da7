"""report.py and what it rests on: seed groups, one table per dev set, bootstrap intervals, per-row baselines,
curves redrawn from metrics.json, saved predictions; and the fixes that came with it (stratified
--max_*_samples, non-overlapping epoch seeds, the distillation teacher checked on --resume and in the cache).

The runs are real train_lora.py / train_distil.py runs (in-process, one thread) on a tiny random GPT-2 and real
CoLA: 64 training rows, one epoch; the bootstrap's own tests also use runs made in memory from real dev labels.

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
from distill import cache_key
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
    assert len(rep) == 1 and rep[0]["size"] == 100
    rows = {r["kind"]: r for r in rep[0]["rows"]}
    assert list(rows) == ["lora", "rnn", "distil"]
    for kind, row in rows.items():
        best = [metrics_of(runs / f"{kind}_{s}")["best"] for s in SEEDS]
        assert row["n"] == 2 and row["seeds"] == list(SEEDS)
        for key in ("acc", "mcc"):
            values = [b[f"val_{key}"] for b in best]
            mean, std = sum(values) / 2, abs(values[0] - values[1]) / 2 ** 0.5  # sample std of two numbers
            assert row[key][0] == pytest.approx(mean, abs=1e-12)
            assert row[key][1] == pytest.approx(std, abs=1e-12)
            assert row[key][1] == pytest.approx(statistics.stdev(values), abs=1e-12)
            assert f"{mean:.4f} ± {std:.4f}" in text
        ood = [metrics_of(runs / f"{kind}_{s}")["ood_dev"]["mcc"] for s in SEEDS]
        assert row["ood_mcc"][0] == pytest.approx(sum(ood) / 2)
    assert (tmp_path / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_one_seed_shows_no_std(runs, tmp_path):
    text, rep = report.compare([runs / "rnn_1"], tmp_path)
    row = rep[0]["rows"][0]
    assert row["n"] == 1 and row["acc"][1] is None
    assert f"| {row['acc'][0]:.4f} |" in text and "±" not in text.split("## Dev set")[1]


def test_runs_on_other_dev_sets_get_their_own_table_and_baseline(runs, tmp_path):
    text, rep = report.compare([*small_dirs(runs), runs / "rnn_full"], tmp_path)
    assert [t["size"] for t in rep] == [527, 100]
    assert [r["dirs"] for r in rep[0]["rows"]] == [[str((runs / "rnn_full").resolve())]]
    assert text.count("## Dev set of") == 2 and "## Dev set of 527 sentences" in text
    full, small = rep[0]["rows"][0], next(r for r in rep[1]["rows"] if r["kind"] == "rnn")
    assert full["name"] != small["name"]  # two rnn groups: named by the config that tells them apart
    for t in rep:
        for r in t["rows"]:  # each row's baseline is its own runs', on its own dev set
            own = {metrics_of(Path(d))["majority_baseline"]["val_acc"] for d in r["dirs"]}
            assert own == {r["baseline"]}
            line = next(ln for ln in text.splitlines() if ln.startswith(f"| {r['name']} |"))
            assert f"| {r['baseline']:.4f} |" in line
    assert full["baseline"] == pytest.approx(365 / 527) and small["baseline"] == pytest.approx(0.69)


def test_distil_vs_rnn_and_students_vs_teacher_are_paired(runs, tmp_path):
    _, rep = report.compare(small_dirs(runs), tmp_path)
    comps = {c["name"]: c for c in rep[0]["comparisons"]}
    assert set(comps) == {"distil − rnn", "rnn − lora", "distil − lora"}
    rows = {r["kind"]: r for r in rep[0]["rows"]}
    for name, c in comps.items():
        a, b = name.split(" − ")
        assert c["diff"] == pytest.approx(rows[a]["mcc"][0] - rows[b]["mcc"][0])
        assert c["ci"][0] <= c["diff"] <= c["ci"][1]


def test_train_distil_compares_only_its_own_run_and_teacher(runs):
    """distil_2 was made with lora_2, rnn_1 and rnn_2 beside it: none of them is its teacher or itself."""
    text = (runs / "distil_2" / "comparison.md").read_text()
    assert "| lora | lora | 1 | 1 |" in text and "| distil | distil | 1 | 2 |" in text and "| rnn" not in text
    assert "lora_1" in text and "distil_2" in text
    for stranger in ("lora_2", "rnn_1", "rnn_2", "distil_1"):
        assert stranger not in text


# ---------------------------------------------------------------- the bootstrap

def test_every_interval_contains_its_point_estimate(runs, tmp_path):
    _, rep = report.compare([*small_dirs(runs), runs / "rnn_full"], tmp_path)
    for t in rep:
        for r in t["rows"]:
            for key in ("acc", "mcc"):
                lo, hi = r[f"{key}_ci"]
                assert lo <= r[key][0] <= hi, (r["name"], key, r[key], (lo, hi))
        for c in t["comparisons"]:
            assert c["ci"][0] <= c["diff"] <= c["ci"][1]


def test_point_estimate_from_saved_predictions_is_the_metrics_mean(runs):
    """The intervals come from predictions.json, the means from metrics.json: they describe the same runs."""
    groups = report.make_groups([report.load_run(d) for d in small_dirs(runs)])
    for g in groups:
        labels = np.array(g.dev["labels"]) == 1
        acc, mcc = report.seed_mean_scores(g.preds(), labels, np.arange(len(labels))[None])
        best = [r.metrics["best"] for r in g.runs]
        assert acc[0] == pytest.approx(np.mean([b["val_acc"] for b in best]), abs=1e-6)
        assert mcc[0] == pytest.approx(np.mean([b["val_mcc"] for b in best]), abs=1e-6)


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
    width = {t["size"]: t["rows"][0]["acc_ci"][1] - t["rows"][0]["acc_ci"][0] for t in rep}
    assert width[527] < width[100]


def fake_run(kind: str, seed: int, preds: np.ndarray, labels: np.ndarray) -> report.Run:
    """A finished run of `kind` in memory whose best epoch predicted `preds` on the dev sentences `labels`."""
    acc, mcc = report.scores(preds, labels)
    best = {"val_acc": float(acc), "val_mcc": float(mcc), "val_collapsed": False}
    metrics = {"config": {"mode": kind, "seed": seed}, "best_epoch": 1, "best": best,
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
    (table,) = report.build_report([fake_run("lora", 1, teacher, labels), fake_run("distil", 1, student, labels)])
    (c,) = table["comparisons"]
    assert c["name"] == "distil − lora"
    idx = np.random.default_rng(0).integers(0, len(labels), size=(2000, len(labels)))
    diff = report.scores(student[idx], labels[idx])[1] - report.scores(teacher[idx], labels[idx])[1]
    assert c["ci"] == pytest.approx(tuple(np.percentile(diff, [2.5, 97.5])), abs=1e-12)
    assert c["ci"][1] < 0  # excludes 0
    own = [np.subtract(*r["mcc_ci"][::-1]) for r in table["rows"]]
    assert np.subtract(*c["ci"][::-1]) < 0.6 * min(own)


def test_seeds_of_a_group_and_groups_of_a_table_share_the_resamples(runs, tmp_path):
    """The real runs (two seeds a group): every interval equals the one rebuilt from one shared set of
    resamples, each seed scored on the same sentences and averaged."""
    _, rep = report.compare(small_dirs(runs), tmp_path)
    groups = {g.kind: g for g in report.make_groups([report.load_run(d) for d in small_dirs(runs)])}
    labels = np.array(groups["lora"].dev["labels"]) == 1
    idx = np.random.default_rng(0).integers(0, len(labels), size=(2000, len(labels)))
    boot = {}
    for kind, g in groups.items():
        per_seed = [report.scores(p[idx], labels[idx]) for p in g.preds()]
        boot[kind] = [np.mean([s[k] for s in per_seed], axis=0) for k in (0, 1)]  # acc, mcc
    rows = {r["kind"]: r for r in rep[0]["rows"]}
    for kind, (acc, mcc) in boot.items():
        assert rows[kind]["acc_ci"] == pytest.approx(tuple(np.percentile(acc, [2.5, 97.5])), abs=1e-12)
        assert rows[kind]["mcc_ci"] == pytest.approx(tuple(np.percentile(mcc, [2.5, 97.5])), abs=1e-12)
    for c in rep[0]["comparisons"]:
        a, b = c["name"].split(" − ")
        assert c["ci"] == pytest.approx(tuple(np.percentile(boot[a][1] - boot[b][1], [2.5, 97.5])), abs=1e-12)


def test_the_interval_is_95_percent(teacher_and_student):
    """Pinned on numbers whose percentiles are known, and on a fixed predictor whose accuracy's bootstrap
    distribution is ~normal, sd sqrt(p (1 - p) / n): its width is 2 x 1.96 sd (a 90% interval would be
    2 x 1.645 sd, 16% narrower; a 99% one 31% wider)."""
    assert report.interval(np.arange(2001.0)) == (50.0, 1950.0)
    assert report.interval(np.arange(2001.0)[::-1]) == (50.0, 1950.0)
    labels, teacher, _ = teacher_and_student
    (table,) = report.build_report([fake_run("lora", 1, teacher, labels)])
    lo, hi = table["rows"][0]["acc_ci"]
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
        assert kd.get_title() == "run: train loss" and kd.get_ylabel() == report.LEGACY_KD_LOSS  # no loss_name
        assert labels_of(kd) == ["train"]  # alone: no dev cross-entropy, no class-prior line
        assert "train" not in " ".join(labels_of(ce)) and any("prior" in s for s in labels_of(ce))
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
    assert kd.get_ylabel() == "mse" and labels_of(kd) == ["train"] and "train" not in labels_of(ce)
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
    r = cli(str(runs / "rnn_1"), "--plots_dir", str(tmp_path), "--name", "rnn_only")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == f"wrote {tmp_path / 'rnn_only.md'} and {tmp_path / 'rnn_only.png'}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rnn_only.md", "rnn_only.png"]


def test_report_skips_folders_that_are_not_runs(runs, tmp_path):
    """`report.py runs/*` with the teacher-logit cache (runs/cache) and a plots folder among the runs."""
    (runs / "plots").mkdir(exist_ok=True)  # a folder a user keeps report.py's comparisons in
    assert (runs / "cache").is_dir()
    r = cli(str(runs / "rnn_1"), str(runs / "cache"), str(runs / "plots"), "--plots_dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    notes = [ln for ln in r.stdout.splitlines() if ln.startswith("note: skipping")]
    assert notes == [f"note: skipping {runs / d}: not a run directory (no metrics.json)" for d in ("cache", "plots")]
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
