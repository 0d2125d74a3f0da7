"""Summaries, plots and comparisons of finished runs, from their metrics.json and predictions.json alone.

    python report.py runs/lora_* runs/rnn_* runs/distil_*     # plots/comparison.md and plots/comparison.png
    python report.py runs/* --name all                        # plots/all.{md,png}; runs/cache is skipped
    python report.py --curves runs/distil                     # redraw runs/distil/{loss,accuracy}.png

A run's own files (its curves, a student's comparison with its teacher) live in its run directory; plots/ holds
only what report.py is asked to write there (--plots_dir, --name).

Runs whose configs differ only in --seed (and --cache_dir, where teacher logits are cached) form a group. Each
group is reported as mean ± sample standard deviation over its seeds, with a 95% bootstrap confidence interval
over dev sentences. Runs scored on different dev sets (other sentences, not only another number of them) are
never put in one table: each dev set gets its own, headed by its size.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from errors import UserError
from cli import METRICS, PREDICTIONS, ArgumentParser, check_writable, complete_config, run_cli, run_name

IGNORED_KEYS = ("seed", "cache_dir")  # config keys that do not split a group (out/plots/data dirs are never recorded)
KINDS = ("lora", "rnn", "distil")
N_BOOT, BOOT_SEED = 2000, 0  # resamples; one fixed seed, so a report is reproducible byte for byte


# ---------------------------------------------------------------- one run's curves

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


CE_LOSS = "cross-entropy"  # metrics["loss_name"] of a run trained on the gold labels alone
LEGACY_KD_LOSS = "KD loss: alpha T² KL + (1 - alpha) CE"  # the train loss of a distil run that recorded no name
MIN_SPAN = {"loss": 0.2, "accuracy": 0.1, "mcc": 0.2}  # smallest y-range of a curve panel (see _honest_zoom)


def _honest_zoom(ax, span: float) -> None:
    """Widen ax's y-range to at least `span` around its data: auto-zoom would let a change of one sentence in
    200 (0.005 of accuracy) fill the panel and look like a trend."""
    lo, hi = ax.get_ylim()
    if hi - lo < span:
        mid = (lo + hi) / 2
        ax.set_ylim(mid - span / 2, mid + span / 2)


def curve_figures(metrics: dict, name: str) -> dict[str, object]:
    """{"loss": Figure, "accuracy": Figure} of one run's per-epoch records; `name` (the run directory's name)
    heads every panel.

    Loss: train and dev cross-entropy against the gold labels beside the class-prior loss. A run whose train loss
    is another quantity (metrics["loss_name"], recorded by the run: a distillation loss) gets a panel of its own
    for it, labelled with that name; a run recorded before the name was gets CE_LOSS, or LEGACY_KD_LOSS in
    distil mode.
    Accuracy: accuracy beside the majority baseline, and MCC on its own axis beside 0. The baseline is drawn
    under the dev curve, so a collapsed run (dev accuracy = baseline) stays visible, its epochs marked in red.
    The kept epoch (best dev MCC) is a vertical line on every panel; no panel spans less than MIN_SPAN.
    """
    plt = _pyplot()
    hist = metrics["epochs"]
    epochs = [r["epoch"] for r in hist]
    majority, prior = metrics["majority_baseline"]["val_acc"], metrics["majority_baseline"]["val_loss"]
    collapsed = [r for r in hist if r["val_collapsed"]]
    loss_name = metrics.get("loss_name") or (LEGACY_KD_LOSS if metrics["config"].get("mode") == "distil"
                                             else CE_LOSS)
    own_panel = loss_name != CE_LOSS  # the train loss is not the dev loss's quantity: a panel of its own

    loss_fig, axes = plt.subplots(1, 2 if own_panel else 1, figsize=(11 if own_panel else 6, 4), squeeze=False)
    if own_panel:
        kd = axes[0, 0]
        kd.plot(epochs, [r["train_loss"] for r in hist], marker="o", color="C2", label="train")
        kd.set_title(f"{name}: train loss")
        kd.set_ylabel(loss_name)
    ce = axes[0, -1]
    if not own_panel:
        ce.plot(epochs, [r["train_loss"] for r in hist], marker="o", label="train", zorder=3)
    ce.plot(epochs, [r["val_loss"] for r in hist], marker="o", color="C1", label="dev", zorder=3)
    ce.axhline(prior, color="gray", linestyle="--", zorder=1,
               label=f"class prior ({prior:.3f}): the dev loss of\npredicting the label rate for every sentence")
    ce.set_title(f"{name}: {'dev ' if own_panel else ''}cross-entropy against the gold labels")
    ce.set_ylabel("cross-entropy")

    acc_fig, (acc, mcc) = plt.subplots(1, 2, figsize=(11, 4))
    acc.axhline(majority, color="gray", linestyle="--", linewidth=1, zorder=1,
                label=f"majority baseline ({majority:.3f}):\nalways predicting the commoner class")
    acc.plot(epochs, [r["train_acc"] for r in hist], marker="o", label="train", zorder=3)
    acc.plot(epochs, [r["val_acc"] for r in hist], marker="o", color="C1", label="dev", zorder=3)
    acc.set_title(f"{name}: accuracy")
    acc.set_ylabel("accuracy")
    mcc.axhline(0, color="gray", linestyle="--", linewidth=1, zorder=1, label="majority baseline (0)")
    mcc.plot(epochs, [r["val_mcc"] for r in hist], marker="o", color="C1", label="dev", zorder=3)
    mcc.set_title(f"{name}: Matthews correlation")
    mcc.set_ylabel("MCC")
    if collapsed:  # a one-class model must be seen, not read off a flat line
        for ax, key in ((acc, "val_acc"), (mcc, "val_mcc")):
            ax.scatter([r["epoch"] for r in collapsed], [r[key] for r in collapsed], marker="x", s=120,
                       color="red", zorder=4, label="dev predicts one class only")
    for ax in axes.flat:
        _honest_zoom(ax, MIN_SPAN["loss"])
    _honest_zoom(acc, MIN_SPAN["accuracy"])
    _honest_zoom(mcc, MIN_SPAN["mcc"])
    best = metrics.get("best_epoch")
    for ax in (*axes.flat, acc, mcc):
        if best is not None:
            ax.axvline(best, color="C1", alpha=0.35, linewidth=6, zorder=0, label=f"kept: epoch {best} (best dev MCC)")
        if epochs[-1] - epochs[0] < 10:  # matplotlib's integer locator gives up below 2 integers (0.96 ... 1.04)
            ax.set_xticks(range(epochs[0], epochs[-1] + 1))
        else:
            ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for fig in (loss_fig, acc_fig):
        fig.tight_layout()
    return {"loss": loss_fig, "accuracy": acc_fig}


def curve_path(run_dir: str | Path, kind: str) -> Path:
    """run_dir/{kind}.png, kind "loss" or "accuracy": inside the run, so no other run's curves replace them."""
    return Path(run_dir) / f"{kind}.png"


def plot_curves(metrics: dict, name: str, run_dir: Path) -> list[Path]:
    """run_dir/loss.png and run_dir/accuracy.png (see curve_figures); name: the run directory's name, in titles."""
    plt = _pyplot()
    paths = []
    for kind, fig in curve_figures(metrics, name).items():
        paths.append(curve_path(run_dir, kind))
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


# ---------------------------------------------------------------- runs and groups

@dataclass
class Run:
    path: Path
    metrics: dict
    predictions: dict  # split -> {"epoch", "rows", "labels", "p1"}

    @property
    def kind(self) -> str:
        return self.metrics["config"].get("mode", "lora")

    @property
    def dev_key(self) -> str:
        """The dev set's identity: its file rows and labels, not just its size."""
        d = self.predictions["dev"]
        return hashlib.sha256(json.dumps([d["rows"], d["labels"]]).encode()).hexdigest()[:8]


def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} not found: {what}") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{path} cannot be read: {e}") from None


def load_run(path: str | Path) -> Run:
    """A finished run, its saved predictions checked against its metrics (the same best epoch and scores)."""
    path = Path(path)
    metrics = read_json(path / METRICS, "not a run directory (train_lora.py or train_distil.py --out_dir)")
    if not metrics.get("best"):
        raise UserError(f"{path / METRICS} has no completed epoch")
    preds = read_json(path / PREDICTIONS, "this run was trained before runs saved their predictions; "
                      "train it again to report it")
    dev = preds.get("dev", {})
    acc, mcc = scores(np.array(dev.get("p1", [])) > 0.5, np.array(dev.get("labels", [])) == 1)
    best = metrics["best"]
    if (dev.get("epoch") != metrics["best_epoch"] or abs(acc - best["val_acc"]) > 1e-6
            or abs(mcc - best["val_mcc"]) > 1e-6):
        raise UserError(f"{path / PREDICTIONS} does not match {path / METRICS} (best epoch {metrics['best_epoch']}, "
                        f"dev acc {best['val_acc']:.4f}): it is left over from another run; train again")
    return Run(path, metrics, preds)


def group_key(run: Run) -> str:
    config = {k: v for k, v in complete_config(run.metrics["config"]).items() if k not in IGNORED_KEYS}
    return json.dumps([run.dev_key, config], sort_keys=True)


@dataclass
class Group:
    name: str
    runs: list[Run]

    @property
    def kind(self) -> str:
        return self.runs[0].kind

    @property
    def dev(self) -> dict:
        return self.runs[0].predictions["dev"]

    def preds(self) -> np.ndarray:
        """(n_seeds, n_dev) bool: each seed's predicted class 1 on each dev sentence."""
        return np.array([r.predictions["dev"]["p1"] for r in self.runs]) > 0.5


def _short(v) -> str:
    s = json.dumps(v) if isinstance(v, (dict, list)) else str(v)
    return s if len(s) <= 24 else "…" + s[-23:]


def make_groups(runs: list[Run]) -> list[Group]:
    """Runs with equal configs (but for IGNORED_KEYS) on the same dev set, named by their kind and by the
    config values that tell apart groups of the same kind. Ordered lora, rnn, distil."""
    by_key: dict[str, list[Run]] = {}
    for r in runs:
        seed = r.metrics["config"].get("seed")
        twin = next((o for o in by_key.get(group_key(r), []) if o.metrics["config"].get("seed") == seed), None)
        if twin:  # a copied run would count twice and shrink the std
            raise UserError(f"{twin.path} and {r.path} are runs of the same config and seed; give each run once")
        by_key.setdefault(group_key(r), []).append(r)
    for rs in by_key.values():  # one base name, two sets of weights (a checkpoint directory replaced in between)
        prints = {r.metrics["base_fingerprint"]: r for r in rs if r.metrics.get("base_fingerprint")}
        if len(prints) > 1:
            a, b = list(prints.values())[:2]
            raise UserError(f"{a.path} and {b.path} have one config but were trained on different base weights "
                            f"(base_fingerprint in their {METRICS}): the base GPT-2 changed between them; they "
                            "are not seeds of one recipe")
    groups = []
    for kind in sorted({r.kind for r in runs}, key=lambda k: KINDS.index(k) if k in KINDS else len(KINDS)):
        members = [rs for rs in by_key.values() if rs[0].kind == kind]
        configs = [complete_config(rs[0].metrics["config"]) for rs in members]
        keys = sorted({k for c in configs for k in c if k not in IGNORED_KEYS and k != "data"
                       and any(c.get(k) != configs[0].get(k) for c in configs)})
        for rs, c in zip(members, configs):
            label = " ".join(f"{k}={_short(c.get(k))}" for k in keys)
            if len(members) > 1 and not label:  # only the dev set differs
                label = f"dev {rs[0].dev_key}"
            seeds = sorted(rs, key=lambda r: r.metrics["config"].get("seed", 0))
            groups.append(Group(f"{kind} {label}".strip(), seeds))
    return groups


# ---------------------------------------------------------------- statistics (numpy only)

def scores(preds: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy and MCC over the last axis of boolean arrays (..., N). MCC is 0 for a one-class predictor."""
    tp = (preds & labels).sum(-1).astype(float)
    tn = (~preds & ~labels).sum(-1).astype(float)
    fp = (preds & ~labels).sum(-1).astype(float)
    fn = (~preds & labels).sum(-1).astype(float)
    denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    mcc = np.where(denom > 0, (tp * tn - fp * fn) / np.where(denom > 0, denom, 1.0), 0.0)
    return (tp + tn) / max(preds.shape[-1], 1), mcc


def resamples(n: int, n_boot: int = N_BOOT, seed: int = BOOT_SEED) -> np.ndarray:
    """(n_boot, n) sentence indices drawn with replacement. The same for every group scored on n sentences:
    comparisons between groups are paired, and a group's interval does not depend on the other runs given."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def seed_mean_scores(preds: np.ndarray, labels: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy and MCC, averaged over seeds, on each resample: preds (S, N) bool, labels (N,) bool, idx (B, N).

    Seeds are pooled by scoring every seed on the same resampled sentences and averaging its metric, not by
    averaging the seeds' probabilities: the point estimate is then the table's mean over seeds, not the score
    of an ensemble that no run trained, and the interval is that of the mean of the runs reported."""
    y = labels[idx]  # (B, N)
    accs, mccs = zip(*(scores(p[idx], y) for p in preds))
    return np.mean(accs, axis=0), np.mean(mccs, axis=0)


def interval(samples: np.ndarray) -> tuple[float, float]:
    """95% percentile interval."""
    lo, hi = np.percentile(samples, [2.5, 97.5])
    return float(lo), float(hi)


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof=1) over seeds; no std for a single seed."""
    v = np.array(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else None


def summarize_group(g: Group, idx: np.ndarray) -> dict:
    """One row of the report: the group's own baseline and dev set, its mean ± std and its intervals."""
    labels = np.array(g.dev["labels"]) == 1
    boot_acc, boot_mcc = seed_mean_scores(g.preds(), labels, idx)
    best = [r.metrics["best"] for r in g.runs]
    ood = [r.metrics.get("ood_dev") for r in g.runs]
    row = {"name": g.name, "kind": g.kind, "n": len(g.runs), "seeds": [r.metrics["config"].get("seed") for r in g.runs],
           "dirs": [str(r.path) for r in g.runs], "dev_size": len(labels), "dev_key": g.runs[0].dev_key,
           "baseline": g.runs[0].metrics["majority_baseline"]["val_acc"],
           "acc": mean_std([b["val_acc"] for b in best]), "mcc": mean_std([b["val_mcc"] for b in best]),
           "acc_ci": interval(boot_acc), "mcc_ci": interval(boot_mcc),
           "seed_acc": [b["val_acc"] for b in best], "seed_mcc": [b["val_mcc"] for b in best],
           "collapsed": sum(bool(b["val_collapsed"]) for b in best), "boot_mcc": boot_mcc}
    if all(ood):
        row.update(ood_acc=mean_std([o["acc"] for o in ood]), ood_mcc=mean_std([o["mcc"] for o in ood]),
                   ood_baseline=ood[0]["majority_acc"])
    return row


def comparisons(rows: list[dict]) -> list[dict]:
    """Paired MCC differences on one dev set: distil - rnn, and each student (rnn, distil) - the teacher (lora)."""
    pairs = [(a, b) for a in rows for b in rows if (a["kind"], b["kind"]) in
             (("distil", "rnn"), ("rnn", "lora"), ("distil", "lora"))]
    return [{"name": f"{a['name']} − {b['name']}", "diff": a["mcc"][0] - b["mcc"][0],
             "ci": interval(a["boot_mcc"] - b["boot_mcc"])} for a, b in pairs]


def build_report(runs: list[Run]) -> list[dict]:
    """One entry per dev set, largest first: {"size", "key", "rows": [group rows], "comparisons": [...]}."""
    tables: dict[str, list[Group]] = {}
    for g in make_groups(runs):
        tables.setdefault(g.runs[0].dev_key, []).append(g)
    out = []
    for key, groups in tables.items():
        idx = resamples(len(groups[0].dev["labels"]))
        rows = [summarize_group(g, idx) for g in groups]
        out.append({"size": rows[0]["dev_size"], "key": key, "rows": rows, "comparisons": comparisons(rows)})
    return sorted(out, key=lambda t: -t["size"])


# ---------------------------------------------------------------- the report: markdown and one figure

def _pm(ms: tuple[float, float | None]) -> str:
    return f"{ms[0]:.4f}" + (f" ± {ms[1]:.4f}" if ms[1] is not None else "")


def _ci(ci: tuple[float, float]) -> str:
    return f"[{ci[0]:.4f}, {ci[1]:.4f}]"


def to_markdown(report: list[dict]) -> str:
    lines = ["# Comparison of runs", "",
             "Best epoch of each run (chosen by dev MCC). A group is the runs whose configs differ only in "
             f"{' and '.join('--' + k for k in IGNORED_KEYS)}: n runs, mean ± sample std over them (ddof=1; no std "
             f"when n = 1). 95% CI: percentile bootstrap over dev sentences ({N_BOOT} resamples, seed {BOOT_SEED}) of "
             "the mean over the group's runs, every run scored on the same resampled sentences; it is the "
             "uncertainty due to the dev set's size, the std the spread between seeds. Each row's majority "
             "baseline is that of its own dev set (MCC 0). OOD: out-of-domain dev, reported, never selected on."]
    for t in report:
        lines += ["", f"## Dev set of {t['size']} sentences (rows fingerprint {t['key']})", "",
                  "| group | kind | n | seeds | dev size | majority baseline | dev acc | 95% CI | dev MCC | 95% CI "
                  "| collapsed | OOD acc | OOD MCC | OOD majority baseline |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in t["rows"]:
            ood = (f"{_pm(r['ood_acc'])} | {_pm(r['ood_mcc'])} | {r['ood_baseline']:.4f}" if "ood_acc" in r
                   else "– | – | –")
            lines.append(f"| {r['name']} | {r['kind']} | {r['n']} | {', '.join(map(str, r['seeds']))} | "
                         f"{r['dev_size']} | {r['baseline']:.4f} | {_pm(r['acc'])} | {_ci(r['acc_ci'])} | "
                         f"{_pm(r['mcc'])} | {_ci(r['mcc_ci'])} | {r['collapsed']}/{r['n']} | {ood} |")
        if t["comparisons"]:
            lines += ["", "Paired comparisons (the same resampled sentences for both groups):", "",
                      "| comparison | dev MCC difference | 95% CI |", "|---|---|---|"]
            lines += [f"| {c['name']} | {c['diff']:+.4f} | {_ci(c['ci'])} |" for c in t["comparisons"]]
        lines += ["", "Runs: " + "; ".join(f"{r['name']}: {', '.join(r['dirs'])}" for r in t["rows"])]
    return "\n".join(lines) + "\n"


def plot_report(report: list[dict], path: Path) -> Path:
    """comparison.png: one line per group (all dev sets), dev accuracy and MCC side by side as the mean over
    seeds (dot), its 95% CI (bar) and each seed (small dots). Each line's majority baseline is marked on it;
    collapsed groups are red. The height grows with the number of groups, so many runs stay readable."""
    plt = _pyplot()
    rows = [r for t in report for r in t["rows"]]
    height = 2.2 + 0.45 * len(rows)
    fig, (acc_ax, mcc_ax) = plt.subplots(1, 2, figsize=(12, height), sharey=True, layout="constrained")
    y = np.arange(len(rows))[::-1]
    for yi, r in zip(y, rows):
        color = "red" if r["collapsed"] else "C0"
        for ax, key, seed_key in ((acc_ax, "acc", "seed_acc"), (mcc_ax, "mcc", "seed_mcc")):
            lo, hi = r[f"{key}_ci"]
            ax.errorbar(r[key][0], yi, xerr=[[r[key][0] - lo], [hi - r[key][0]]], fmt="o", color=color, capsize=3)
            ax.scatter(r[seed_key], [yi] * r["n"], s=10, color=color, alpha=0.5, zorder=3)
        acc_ax.plot([r["baseline"]] * 2, [yi - 0.35, yi + 0.35], color="black", linewidth=2)
    acc_ax.plot([], [], color="black", linewidth=2, label="majority baseline of the row's dev set")
    acc_ax.errorbar([], [], xerr=[], fmt="o", color="C0", label="mean over seeds, 95% CI")
    acc_ax.scatter([], [], s=10, color="C0", alpha=0.5, label="one seed")
    if any(r["collapsed"] for r in rows):
        acc_ax.errorbar([], [], xerr=[], fmt="o", color="red", label="a seed predicts one class only")
    mcc_ax.axvline(0, color="black", linewidth=1, label="majority baseline (MCC 0)")
    for t in report[1:]:  # separate the dev sets
        first = rows.index(t["rows"][0])
        for ax in (acc_ax, mcc_ax):
            ax.axhline(y[first] + 0.5, color="gray", linewidth=0.8)
    acc_ax.set_yticks(y, [f"{r['name']} (n={r['n']}, dev {r['dev_size']})" for r in rows])
    acc_ax.set_xlabel("dev accuracy")
    mcc_ax.set_xlabel("dev MCC")
    mcc_lo = min([0.0] + [r["mcc_ci"][0] for r in rows] + [v for r in rows for v in r["seed_mcc"]])
    mcc_hi = max([0.0] + [r["mcc_ci"][1] for r in rows] + [v for r in rows for v in r["seed_mcc"]])
    mcc_ax.set_xlim(mcc_lo - 0.05, mcc_hi + 0.05)
    handles = [h for ax in (acc_ax, mcc_ax) for h in ax.get_legend_handles_labels()[0]]
    fig.legend(handles, [h.get_label() for h in handles], loc="outside lower center", ncol=3, fontsize=8,
               frameon=False)  # constrained layout leaves exactly the legend's height below the axes
    for ax in (acc_ax, mcc_ax):
        ax.grid(axis="x", alpha=0.3)
        ax.margins(y=0.5 / max(len(rows), 1))
    fig.suptitle("CoLA in-domain dev, best epoch of each run")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def comparison_paths(plots_dir: str | Path, name: str) -> tuple[Path, Path]:
    """plots_dir/{name}.md and {name}.png: report.py's --plots_dir and --name, or a student run's own
    run_dir/comparison.{md,png}."""
    return Path(plots_dir) / f"{name}.md", Path(plots_dir) / f"{name}.png"


def compare(run_dirs: list[str | Path], plots_dir: str | Path, name: str = "comparison") -> tuple[str, list[dict]]:
    """Write plots_dir/{name}.md and {name}.png for run_dirs; return the markdown and the report."""
    runs = [load_run(d) for d in dict.fromkeys(Path(d).resolve() for d in run_dirs)]
    report = build_report(runs)
    check_writable(plots_dir, "--plots_dir")
    md, png = comparison_paths(plots_dir, name)
    text = to_markdown(report)
    md.write_text(text)
    plot_report(report, png)
    return text, report


# ---------------------------------------------------------------- command line

def run_dirs_only(paths: list[str]) -> list[Path]:
    """The paths that are runs (hold metrics.json), so that `report.py runs/*` passes over runs/cache (the
    teacher-logit cache) and other folders with a one-line note. A path that does not exist is an error (a
    typo, not a folder to pass over), and so is a list with no run in it."""
    runs = []
    for d in map(Path, paths):
        if not d.exists():
            raise UserError(f"{d} does not exist")
        if d.is_dir() and not (d / METRICS).is_file():
            print(f"note: skipping {d}: not a run directory (no {METRICS})")
            continue
        runs.append(d)
    if not runs:
        raise UserError(f"none of {' '.join(paths)} is a run directory (train_lora.py or train_distil.py "
                        f"--out_dir, holding {METRICS})")
    return runs


def main() -> None:
    p = ArgumentParser(description=__doc__)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="train_lora.py / train_distil.py --out_dir; folders without metrics.json are skipped")
    p.add_argument("--plots_dir", default="plots", help="where the comparison goes")
    p.add_argument("--name", default="comparison", help="file stem of the comparison: plots_dir/NAME.md and NAME.png")
    p.add_argument("--curves", action="store_true",
                   help="redraw each run's loss and accuracy curves from its metrics.json instead, in its own "
                        "directory (RUN_DIR/loss.png, RUN_DIR/accuracy.png)")
    args = p.parse_args()

    def run() -> None:
        dirs = run_dirs_only(args.run_dirs)
        if args.curves:
            for d in dirs:
                metrics = read_json(d / METRICS, "not a run directory")
                for path in plot_curves(metrics, run_name(d), check_writable(d, "RUN_DIR")):
                    print(f"wrote {path}")
            return
        check_writable(args.plots_dir, "--plots_dir")
        text, _ = compare(dirs, args.plots_dir, args.name)
        print(text)
        print(f"wrote {' and '.join(map(str, comparison_paths(args.plots_dir, args.name)))}")
    run_cli(run)


if __name__ == "__main__":
    main()
