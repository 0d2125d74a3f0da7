"""Summaries, plots and comparisons of finished runs, from their metrics.json and predictions.json alone.

    python report.py runs/lora_* runs/rnn_* runs/distil_*     # plots/comparison.md, .png and .json
    python report.py runs --name all                          # every run below runs/, at any depth: plots/all.*
    python report.py --curves runs/distil                     # redraw runs/distil/{loss,accuracy}.png

A run's own files (its curves, a student's comparison with its teacher) live in its run directory; plots/ holds
only what report.py is asked to write there (--plots_dir, --name).

Runs whose settings differ only in --seed (and --cache_dir) form a group, labelled G1, G2, ... with a key to
their settings. Each group gets its mean ± std over seeds and a 95% two-level bootstrap interval (runs, then
sentences) on in-domain dev and, never used for selection, out-of-domain dev. Pairs follow one rule
(find_pairs): a student against its own teacher, a distilled student against the label-trained student of the
same settings; each difference ends with a verdict. Runs scored on other dev sentences get tables of their own.
docs/design.md says why.
"""

from __future__ import annotations

import hashlib
import json
import os
import textwrap
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from errors import UserError
from cli import METRICS, PREDICTIONS, ArgumentParser, check_writable, complete_config, run_cli, run_name
from distill import DISTILLATION_KEYS


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
    is another quantity (metrics["loss_name"], recorded by the run: a distillation loss, KL or MSE with its
    weights) gets a panel of its own for it, labelled with that name; a run recorded before the name was gets
    CE_LOSS, or LEGACY_KD_LOSS in distil mode.
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
        short = loss_name.split(":")[0]  # "KD loss", "MSE distillation loss"
        kd.plot(epochs, [r["train_loss"] for r in hist], marker="o", color="C2", label=f"train {short}")
        kd.set_title(f"{name}: train {short}")
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


def lm_curve_figures(metrics: dict, name: str) -> dict[str, object]:
    """{"loss": Figure, "perplexity": Figure} of a language-model run (train_lora.py --objective lm): train and
    dev next-token loss, and dev perplexity; the kept epoch (lowest dev loss) is a vertical line on both."""
    plt = _pyplot()
    hist = metrics["epochs"]
    epochs = [r["epoch"] for r in hist]
    loss_fig, loss = plt.subplots(figsize=(6, 4))
    loss.plot(epochs, [r["train_loss"] for r in hist], marker="o", label="train", zorder=3)
    loss.plot(epochs, [r["val_loss"] for r in hist], marker="o", color="C1", label="dev", zorder=3)
    loss.set_title(f"{name}: next-token loss (language model)")
    loss.set_ylabel("cross-entropy per token")
    ppl_fig, ppl = plt.subplots(figsize=(6, 4))
    ppl.plot(epochs, [r["val_ppl"] for r in hist], marker="o", color="C1", label="dev", zorder=3)
    ppl.set_title(f"{name}: dev perplexity")
    ppl.set_ylabel("perplexity: exp(dev loss)")
    _honest_zoom(loss, MIN_SPAN["loss"])
    best = metrics.get("best_epoch")
    for ax in (loss, ppl):
        if best is not None:
            ax.axvline(best, color="C1", alpha=0.35, linewidth=6, zorder=0, label=f"kept: epoch {best} (lowest dev loss)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for fig in (loss_fig, ppl_fig):
        fig.tight_layout()
    return {"loss": loss_fig, "perplexity": ppl_fig}


def is_lm(metrics: dict) -> bool:
    """A language-model run (train_lora.py --objective lm); runs without the key are classifiers."""
    return metrics["config"].get("objective", "cls") == "lm"


def curve_kinds(metrics: dict) -> tuple[str, ...]:
    return ("loss", "perplexity") if is_lm(metrics) else ("accuracy", "loss")


def curve_path(run_dir: str | Path, kind: str) -> Path:
    """run_dir/{kind}.png, kind "loss", "accuracy" or (a language model) "perplexity": inside the run, so no
    other run's curves replace them."""
    return Path(run_dir) / f"{kind}.png"


def plot_curves(metrics: dict, name: str, run_dir: Path) -> list[Path]:
    """run_dir/loss.png and run_dir/accuracy.png (see curve_figures), or a language model's loss.png and
    perplexity.png (lm_curve_figures); name: the run directory's name, in titles."""
    plt = _pyplot()
    paths = []
    figures = lm_curve_figures(metrics, name) if is_lm(metrics) else curve_figures(metrics, name)
    for kind, fig in figures.items():
        paths.append(curve_path(run_dir, kind))
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


# ---------------------------------------------------------------- runs and groups

IGNORED_KEYS = ("seed", "cache_dir")  # config keys that do not split a group (out/plots/data dirs are never recorded)
# Keys that split groups but are not settings to read: a hash of the teacher's files, the record of the sampled
# rows (their number is --max_*_samples, shown). When they alone tell two groups apart, the key says so in words.
HIDDEN_KEYS = {"teacher_fingerprint": "teacher files", "data": "data rows"}
KINDS = ("lora", "rnn", "distil")
SPLITS = {"dev": "in-domain dev", "ood_dev": "out-of-domain dev"}
N_BOOT, BOOT_SEED = 2000, 0  # resamples; fixed seeds, so a report is reproducible byte for byte


@dataclass
class Run:
    path: Path
    metrics: dict
    predictions: dict  # split -> {"epoch", "rows", "labels", "p1"}

    @property
    def kind(self) -> str:
        return self.metrics["config"].get("mode", "lora")

    @property
    def seed(self) -> object:
        return self.metrics["config"].get("seed")

    def sentences_key(self, split: str) -> str | None:
        """The identity of the sentences a split was scored on: their file rows and labels, not just their number."""
        d = self.predictions.get(split)
        return None if d is None else hashlib.sha256(json.dumps([d["rows"], d["labels"]]).encode()).hexdigest()[:8]

    @property
    def dev_key(self) -> str:
        return self.sentences_key("dev")

    def point(self, split: str) -> dict | None:
        """The run's own scores on a split, as metrics.json recorded them; None where it has none (an older run)."""
        if split == "dev":
            b = self.metrics["best"]
            return {"acc": b["val_acc"], "mcc": b["val_mcc"], "collapsed": bool(b["val_collapsed"])}
        o = self.metrics.get(split)
        if o is None or split not in self.predictions:
            return None
        return {"acc": o["acc"], "mcc": o["mcc"], "collapsed": bool(o.get("collapsed", False))}

    def baseline(self, split: str) -> float:
        return self.metrics["majority_baseline"]["val_acc"] if split == "dev" else self.metrics[split]["majority_acc"]

    def labels(self, split: str) -> np.ndarray:
        return np.array(self.predictions[split]["labels"]) == 1

    def p1(self, split: str) -> np.ndarray:
        return np.array(self.predictions[split]["p1"], dtype=float)


def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} not found: {what}") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{path} cannot be read: {e}") from None


def load_run(path: str | Path) -> Run:
    """A finished run, its saved predictions checked against its metrics (the same best epoch and scores, on dev
    and, where both are saved, on out-of-domain dev)."""
    path = Path(path)
    metrics = read_json(path / METRICS, "not a run directory (train_lora.py or train_distil.py --out_dir)")
    if "config" in metrics and is_lm(metrics):
        raise UserError(f"{path} is a language-model run (train_lora.py --objective lm): report.py compares "
                        f"classifiers; its dev loss and perplexity are in {path / METRICS}")
    if not metrics.get("best"):
        raise UserError(f"{path / METRICS} has no completed epoch")
    preds = read_json(path / PREDICTIONS, "this run was trained before runs saved their predictions; "
                      "train it again to report it")
    run = Run(path, metrics, preds)
    for split in SPLITS:
        point = run.point(split)
        if split == "dev" or point is not None:
            got = preds.get(split, {})
            acc, mcc = scores(np.array(got.get("p1", [])) > 0.5, np.array(got.get("labels", [])) == 1)
            if (got.get("epoch") != metrics["best_epoch"] or abs(acc - point["acc"]) > 1e-6
                    or abs(mcc - point["mcc"]) > 1e-6):
                raise UserError(f"{path / PREDICTIONS} does not match {path / METRICS} (best epoch "
                                f"{metrics['best_epoch']}, {SPLITS[split]} acc {point['acc']:.4f}): it is left over "
                                "from another run; train again")
    return run


def settings(run: Run) -> dict:
    """What defines a run's results, seeds apart: its complete config (a key an older run lacks takes its default,
    cli.complete_config) but for IGNORED_KEYS."""
    return {k: v for k, v in complete_config(run.metrics["config"]).items() if k not in IGNORED_KEYS}


def group_key(run: Run) -> str:
    return json.dumps([run.dev_key, settings(run)], sort_keys=True)


def teachers(config: dict) -> list[str]:
    """The run paths a student names as --teacher: one (a string, as every run before ensembles recorded it), an
    ensemble (a list), or none."""
    t = config.get("teacher")
    return [] if t is None else [t] if isinstance(t, str) else list(t)


def _value(v: object) -> str:
    """A setting in full, for the key: lists joined by commas, never shortened."""
    if isinstance(v, list):
        return ",".join(map(str, v))
    return json.dumps(v, sort_keys=True) if isinstance(v, dict) else str(v)


@dataclass
class Group:
    label: str         # G1, G2, ...: short, so that many groups stay legible; the key maps it to `shown`
    runs: list[Run]    # sorted by seed
    shown: dict        # the settings that tell it apart from the other groups of its kind, as text

    @property
    def kind(self) -> str:
        return self.runs[0].kind

    @property
    def settings(self) -> dict:
        return settings(self.runs[0])

    @property
    def key(self) -> str:
        return group_key(self.runs[0])

    @property
    def dev_key(self) -> str:
        return self.runs[0].dev_key

    def preds(self, split: str) -> np.ndarray:
        """(n_runs, n_sentences) bool: each run's predicted class 1 on each sentence of the split."""
        return np.array([r.p1(split) for r in self.runs]) > 0.5


def make_groups(runs: list[Run]) -> list[Group]:
    """Runs with equal settings on the same dev set, one group each, ordered by dev set (largest first), then
    lora, rnn, distil, then as given; labelled G1, G2, ... in that order. Each group shows the settings whose
    values differ between the groups of its kind."""
    by_key: dict[str, list[Run]] = {}
    for r in runs:
        twin = next((o for o in by_key.get(group_key(r), []) if o.seed == r.seed), None)
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
    dev_order = list(dict.fromkeys(r.dev_key for r in runs))
    members = sorted(by_key.values(), key=lambda rs: (-len(rs[0].predictions["dev"]["labels"]),
                                                      dev_order.index(rs[0].dev_key),
                                                      KINDS.index(rs[0].kind) if rs[0].kind in KINDS else len(KINDS)))
    shown: list[dict] = []
    for rs in members:
        same_kind = [settings(o[0]) for o in members if o[0].kind == rs[0].kind]
        mine = settings(rs[0])
        keys = sorted(k for k in {k for c in same_kind for k in c}
                      if k not in HIDDEN_KEYS and any(c.get(k) != mine.get(k) for c in same_kind))
        shown.append({k: _value(mine.get(k)) for k in keys})
    for i, rs in enumerate(members):  # settings alike on view: say in words what else tells them apart
        twins = [j for j in range(len(members)) if j != i and members[j][0].kind == rs[0].kind
                 and shown[j] == shown[i]]
        for j in twins:
            if members[j][0].dev_key != rs[0].dev_key:
                shown[i]["dev set"] = f"{len(rs[0].predictions['dev']['labels'])} sentences ({rs[0].dev_key})"
            for k, words in HIDDEN_KEYS.items():
                if settings(members[j][0]).get(k) != settings(rs[0]).get(k):
                    shown[i][words] = f"not those of G{j + 1}"
    return [Group(f"G{i + 1}", sorted(rs, key=lambda r: str(r.seed)), s)
            for i, (rs, s) in enumerate(zip(members, shown))]


# ---------------------------------------------------------------- the pairing rule

STUDENTS = ("rnn", "distil")
PAIRING_RULE = (
    "Each student group (rnn or distil) is paired with its teacher: the run, or the ensemble of runs, its "
    "--teacher names, scored as one fixed model (an ensemble by the mean of its runs' logits). Each distil group "
    "is paired with every rnn group whose settings equal its own except the distillation settings ("
    + ", ".join(DISTILLATION_KEYS) + ", and the teacher's files), and except --gpt_variant when the students' "
    "embeddings are random (--init_embeddings none). Both sides must be scored on the same dev sentences. "
    "Groups without a partner are listed, not paired.")


def student_settings(g: Group) -> dict:
    """A student's settings apart from how it was taught: what must be equal for a distil and an rnn group to be
    compared (see PAIRING_RULE)."""
    s = {k: v for k, v in g.settings.items() if k not in DISTILLATION_KEYS and k != "teacher_fingerprint"}
    if s.get("init_embeddings") == "none":
        s.pop("gpt_variant", None)  # unused: rnn mode records None, distil mode the teacher's base
    return s


@dataclass
class Teacher:
    """The model a student group names as --teacher: one run, or an ensemble of runs, never resampled."""
    names: list[str]  # as the student recorded them: run paths
    runs: list[Run]
    groups: list[str]  # the labels of the groups its runs belong to

    @property
    def label(self) -> str:
        return f"teacher {' + '.join(self.names)} ({', '.join(self.groups)})"

    def preds(self, split: str) -> np.ndarray:
        """(1, n_sentences) bool: the ensemble predicts class 1 where its mean logit margin is positive; for one
        run, where P(class 1) > 0.5. Two-class logits: log p1 - log p0 = logit(p1)."""
        p = np.clip(np.array([r.p1(split) for r in self.runs]), 1e-12, 1 - 1e-12)
        return (np.log(p / (1 - p)).mean(0) > 0)[None]


def _same_path(run: Run, recorded: str) -> bool:
    """Is run the run at `recorded`, a path as the student's command line gave it (relative to where it ran)?"""
    p = Path(recorded)
    if run.path == p.resolve():
        return True
    parts = Path(os.path.normpath(recorded)).parts
    return not p.is_absolute() and run.path.parts[-len(parts):] == parts


def find_teacher(g: Group, groups: list[Group]) -> tuple[Teacher | None, str]:
    """g's teacher among the groups' runs, or None and why not."""
    names = teachers(g.settings)
    if not names:
        return None, "it names no --teacher"
    found = []
    for name in names:
        exact = [(o, r) for o in groups for r in o.runs if r.path == Path(name).resolve()]
        matches = exact or [(o, r) for o in groups for r in o.runs if _same_path(r, name)]
        if not matches:
            return None, f"its --teacher {name} is not among the runs given"
        if len(matches) > 1:
            return None, f"its --teacher {name} could be any of {', '.join(str(r.path) for _, r in matches)}"
        found.append(matches[0])
    if any(r.dev_key != g.dev_key for _, r in found):
        return None, f"its --teacher {' + '.join(names)} was scored on other dev sentences"
    return Teacher(names, [r for _, r in found], list(dict.fromkeys(o.label for o, _ in found))), ""


def find_pairs(groups: list[Group]) -> tuple[list[tuple[Group, Group | Teacher, str]], list[dict]]:
    """The pairing rule (PAIRING_RULE), in one place: [(a, b, what the pair compares)] for a − b, and the groups
    left without a partner, each with the reason."""
    pairs: list[tuple[Group, Group | Teacher, str]] = []
    unpaired: list[dict] = []
    for g in groups:
        if g.kind not in STUDENTS:
            continue
        teacher, why = find_teacher(g, groups)
        if teacher:
            pairs.append((g, teacher, f"{g.kind} − its teacher"))
        else:
            unpaired.append({"group": g.label, "partner": "its teacher", "why": why})
        if g.kind != "distil":
            continue
        rnns = [o for o in groups if o.kind == "rnn" and o.dev_key == g.dev_key]
        mates = [o for o in rnns if student_settings(o) == student_settings(g)]
        pairs += [(g, o, "distil − rnn of the same settings") for o in mates]
        if not mates:
            unpaired.append({"group": g.label, "partner": "an rnn group of the same settings",
                             "why": near_miss(g, rnns)})
    teaching = {label for _, b, _ in pairs if isinstance(b, Teacher) for label in b.groups}
    for g in groups:
        if g.kind not in STUDENTS and g.label not in teaching:
            unpaired.append({"group": g.label, "partner": "a student", "why": "no student given names one of its "
                             "runs as --teacher (on the same dev sentences)"})
    return pairs, unpaired


def near_miss(g: Group, rnns: list[Group]) -> str:
    """Why no rnn group matches g: the nearest one's differing settings, so a near miss can be fixed."""
    if not rnns:
        return "no rnn group on the same dev sentences among the runs given"
    mine = student_settings(g)

    def diff(o: Group) -> list[str]:
        theirs = student_settings(o)
        return sorted(k for k in {*mine, *theirs} if mine.get(k) != theirs.get(k))
    nearest = min(rnns, key=lambda o: len(diff(o)))
    shown = [f"{k} ({_value(mine.get(k))} here, {_value(student_settings(nearest).get(k))} there)"
             if k not in HIDDEN_KEYS else HIDDEN_KEYS[k] for k in diff(nearest)]
    return f"the nearest, {nearest.label}, differs in {'; '.join(shown)}"


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
    """(n_boot, n) sentence indices drawn with replacement. The same for every group scored on these n sentences:
    comparisons between groups are paired, and a group's interval does not depend on the other runs given."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def run_draws(n_runs: int, key: str, n_boot: int = N_BOOT) -> np.ndarray:
    """(n_boot, n_runs) run indices drawn with replacement: the seed level of the bootstrap. Seeded by the group's
    own key, so the draws of the two sides of a pair are independent and a group's interval is the same whatever
    other runs are reported."""
    rng = np.random.default_rng([BOOT_SEED, zlib.crc32(key.encode())])
    return rng.integers(0, n_runs, size=(n_boot, n_runs))


def seed_mean_scores(preds: np.ndarray, labels: np.ndarray, idx: np.ndarray,
                     draws: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy and MCC of the mean over runs, on each resample: preds (S, N) bool, labels (N,) bool, idx (B, N)
    sentence resamples, draws (B, S) run resamples (None: every run once, the sentence level only).

    Each resample b scores the runs draws[b] on the sentences idx[b] and averages their metric: the point
    estimate is then the table's mean over seeds, not the score of an ensemble no run trained, and the spread
    covers both the seeds (a new set of seeds) and the dev set (a new set of sentences)."""
    y = labels[idx]  # (B, N)
    per_run = [np.stack(m) for m in zip(*(scores(p[idx], y) for p in preds))]  # acc, mcc: (S, B) each
    if draws is None:
        return per_run[0].mean(0), per_run[1].mean(0)
    cols = np.arange(idx.shape[0])[:, None]  # (B, 1)
    return per_run[0][draws, cols].mean(1), per_run[1][draws, cols].mean(1)  # (B,) each


def interval(samples: np.ndarray) -> tuple[float, float]:
    """95% percentile interval."""
    lo, hi = np.percentile(samples, [2.5, 97.5])
    return float(lo), float(hi)


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof=1) over seeds; no std for a single seed."""
    v = np.array(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else None


def split_stats(points: list[dict], boot: tuple[np.ndarray, np.ndarray], baseline: float, size: int,
                sentences: str) -> dict:
    """A group's (or a teacher's) scores on one split: mean ± std over its runs, 95% intervals, collapsed runs."""
    out = {"size": size, "sentences": sentences, "majority_baseline": baseline, "collapsed": 0}
    for key, samples in zip(("acc", "mcc"), boot):
        mean, std = mean_std([p[key] for p in points])
        out[key] = {"mean": mean, "std": std, "ci": interval(samples)}
    out["collapsed"] = sum(p["collapsed"] for p in points)
    return out


def _seeds(n: int) -> str:
    return f"{n} seed" if n == 1 else f"{n} seeds"


def one_class(preds: np.ndarray) -> bool:
    """Does every run of preds (S, N) predict one class only (collapsed)?"""
    return bool(np.all(preds.all(-1) | ~preds.any(-1)))


def verdict(a: Group, b: Group | Teacher, ci: tuple[float, float]) -> tuple[str | None, str]:
    """("above" / "below" / None, the sentence): does the interval of a − b exclude 0, on which side, and on how
    many seeds a side it rests."""
    side = "above" if ci[0] > 0 else "below" if ci[1] < 0 else None
    words = {"above": f"{a.label} higher: the interval excludes 0",
             "below": f"{a.label} lower: the interval excludes 0", None: "not distinguishable with these seeds"}[side]
    other = "the teacher, one fixed model" if isinstance(b, Teacher) else _seeds(len(b.runs))
    words += f" ({_seeds(len(a.runs))} against {other})"
    single = [g.label for g in (a, b) if isinstance(g, Group) and len(g.runs) == 1]
    if single:
        words += (f"; seed variance unknown for {' and '.join(single)} (1 seed): the interval leaves it out")
    return side, words


METHOD = (
    "95% percentile bootstrap with two levels ({n} resamples, fixed seeds): each resample draws a group's runs "
    "with replacement (a new set of seeds) and the split's sentences with replacement (a new dev set), scores "
    "every drawn run on those sentences and averages, so the interval holds the variation between seeds and "
    "that of a finite dev set. The two sides of a pair are scored on the same resampled sentences, their runs "
    "drawn independently. A group of one run, and a teacher (one fixed model), get the sentence level only. "
    "With few seeds the seed level sees only their spread: 3 seeds give a rough interval, not a tight one."
).format(n=N_BOOT)


def build_report(runs: list[Run]) -> dict:
    """Every group with its runs and its statistics on each split, every pair with its difference, interval and
    verdict, and the groups left unpaired: the content of NAME.json, from which the markdown and the figure are
    drawn."""
    groups = make_groups(runs)
    pairs, unpaired = find_pairs(groups)
    boot: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}  # (group label or teacher label, split) -> acc, mcc
    out_groups = []
    for g in groups:
        entry = {"label": g.label, "kind": g.kind, "settings": g.shown,
                 "config": {k: v for k, v in g.settings.items() if k != "teacher_fingerprint"},
                 "runs": [{"path": str(r.path), "seed": r.seed, **{s: r.point(s) for s in SPLITS}} for r in g.runs]}
        for split, seed in zip(SPLITS, (BOOT_SEED, BOOT_SEED + 1)):
            points = [r.point(split) for r in g.runs]
            if any(p is None for p in points):
                entry[split] = None
                continue
            labels = g.runs[0].labels(split)
            idx = resamples(len(labels), seed=seed)
            boot[g.label, split] = seed_mean_scores(g.preds(split), labels, idx, run_draws(len(g.runs), g.key + split))
            entry[split] = split_stats(points, boot[g.label, split], g.runs[0].baseline(split), len(labels),
                                       g.runs[0].sentences_key(split))
        out_groups.append(entry)
    out_pairs = []
    for a, b, rule in pairs:
        for split, seed in zip(SPLITS, (BOOT_SEED, BOOT_SEED + 1)):
            if (a.label, split) not in boot:
                continue
            labels = a.runs[0].labels(split)
            if isinstance(b, Teacher):
                if any(split not in r.predictions or r.sentences_key(split) != a.runs[0].sentences_key(split)
                       for r in b.runs):
                    continue
                idx = resamples(len(labels), seed=seed)
                preds = b.preds(split)
                boot_b = seed_mean_scores(preds, labels, idx)
                b_mcc = float(scores(preds[0], labels)[1]) if len(b.runs) > 1 else b.runs[0].point(split)["mcc"]
            else:
                if (b.label, split) not in boot or b.runs[0].sentences_key(split) != a.runs[0].sentences_key(split):
                    continue
                boot_b, b_mcc = boot[b.label, split], mean_std([r.point(split)["mcc"] for r in b.runs])[0]
            a_mcc = mean_std([r.point(split)["mcc"] for r in a.runs])[0]
            ci = interval(boot[a.label, split][1] - boot_b[1])
            side, words = verdict(a, b, ci)
            if one_class(a.preds(split)) and one_class(b.preds(split)):
                words = "both sides predict one class only: MCC 0 on every resample, nothing to compare"
            out_pairs.append({"a": a.label, "b": b.label, "b_runs": [str(r.path) for r in b.runs], "rule": rule,
                              "split": split, "metric": "mcc", "a_mean": a_mcc, "b_mean": b_mcc,
                              "difference": a_mcc - b_mcc, "ci": ci, "excludes_zero": side, "verdict": words,
                              "a_seeds": len(a.runs), "b_seeds": None if isinstance(b, Teacher) else len(b.runs)})
    return {"pairing_rule": PAIRING_RULE, "method": METHOD, "n_boot": N_BOOT, "level": 0.95, "groups": out_groups,
            "pairs": out_pairs, "unpaired": unpaired}


# ---------------------------------------------------------------- the report: markdown, figure, JSON

def _pm(s: dict) -> str:
    return f"{s['mean']:.4f}" + (f" ± {s['std']:.4f}" if s["std"] is not None else "")


def _ci(ci: tuple[float, float]) -> str:
    return f"[{ci[0]:.4f}, {ci[1]:.4f}]"


def _mcc_cells(s: dict, n: int) -> str:
    """MCC mean ± std | interval; a group whose every run predicts one class says so, not [0.0000, 0.0000]."""
    if s["collapsed"] == n:
        return f"{_pm(s['mcc'])} | collapsed: every run predicts one class"
    return f"{_pm(s['mcc'])} | {_ci(s['mcc']['ci'])}"


def _split_tables(split: str, groups: list[dict], pairs: list[dict]) -> list[str]:
    lines = ["| group | kind | runs | majority baseline | accuracy | 95% CI | MCC | 95% CI "
             "| MCC of each run (seed: MCC) | collapsed runs |", "|---|---|---|---|---|---|---|---|---|---|"]
    for g in groups:
        s, n = g[split], len(g["runs"])
        if s is None:
            lines.append(f"| {g['label']} | {g['kind']} | {_seeds(n)} | – | – | – | – | – "
                         "| not saved (an older run) | – |")
            continue
        each = ", ".join(f"{r['seed']}: {r[split]['mcc']:.4f}" for r in g["runs"])
        lines.append(f"| {g['label']} | {g['kind']} | {_seeds(n)} | {s['majority_baseline']:.4f} | {_pm(s['acc'])} | "
                     f"{_ci(s['acc']['ci'])} | {_mcc_cells(s, n)} | {each} | {s['collapsed']} of {n} |")
    mine = [p for p in pairs if p["split"] == split]
    if mine:
        lines += ["", f"Paired differences of {SPLITS[split]} MCC (a − b, the same resampled sentences for both):",
                  "",
                  "| a − b | compares | a | b | difference | 95% CI | verdict |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {p['a']} − {p['b']} | {p['rule']} | {p['a_mean']:.4f} | {p['b_mean']:.4f} | "
                  f"{p['difference']:+.4f} | {_ci(p['ci'])} | {p['verdict']} |" for p in mine]
    return lines


def to_markdown(report: dict) -> str:
    groups = report["groups"]
    lines = ["# Comparison of runs", "",
             f"**Groups.** Runs whose settings differ only in {' and '.join('--' + k for k in IGNORED_KEYS)} form a "
             "group, labelled G1, G2, ... (the key below gives each group's settings; a setting an older run lacks "
             "takes its default). Scores: mean ± sample std over the group's runs (ddof 1; none for one run).", "",
             f"**Pairs.** {report['pairing_rule']}", "",
             f"**Intervals.** {report['method']}", "",
             "**Dev scores are optimistic:** each run's scores are those of its dev-selected epoch (the best dev MCC). "
             "The out-of-domain dev set was never used for selection: its table is the honest estimate.", "",
             "## Groups", "", "| group | kind | runs | settings |", "|---|---|---|---|"]
    for g in groups:
        shown = " ".join(f"{k}={v}" for k, v in g["settings"].items()) or "–"
        lines.append(f"| {g['label']} | {g['kind']} | {_seeds(len(g['runs']))} | {shown} |")
    for key in dict.fromkeys(g["dev"]["sentences"] for g in groups):
        members = [g for g in groups if g["dev"]["sentences"] == key]
        labels = {g["label"] for g in members}
        pairs = [p for p in report["pairs"] if p["a"] in labels]
        lines += ["", f"## In-domain dev, {members[0]['dev']['size']} sentences ({key}): scores of the dev-selected "
                  "epoch, optimistic", ""] + _split_tables("dev", members, pairs)
        ood = [g for g in members if g["ood_dev"]]
        sizes = sorted({g["ood_dev"]["size"] for g in ood})
        if ood:
            lines += ["", f"## Out-of-domain dev, {' / '.join(map(str, sizes))} sentences, beside the in-domain dev "
                      f"set above: not used for selection", ""] + _split_tables("ood_dev", members, pairs)
    if report["unpaired"]:
        lines += ["", "## Not paired", ""]
        lines += [f"- {u['group']} with {u['partner']}: {u['why']}" for u in report["unpaired"]]
    lines += ["", "## Runs", "", "| group | seed | run | dev acc | dev MCC | OOD acc | OOD MCC |",
              "|---|---|---|---|---|---|---|"]
    for g in groups:
        for r in g["runs"]:
            ood = f"{r['ood_dev']['acc']:.4f} | {r['ood_dev']['mcc']:.4f}" if r["ood_dev"] else "– | –"
            lines.append(f"| {g['label']} | {r['seed']} | {r['path']} | {r['dev']['acc']:.4f} | "
                         f"{r['dev']['mcc']:.4f} | {ood} |")
    return "\n".join(lines) + "\n"


KEY_FONT = 7.5  # points; the key under the figure is monospaced, so its line width is known before drawing
DPI = 120  # of the saved figure: at this size the hinted glyphs advance by whole pixels, up to 0.68 em
PANELS = (("dev", "acc", "in-domain dev accuracy"), ("dev", "mcc", "in-domain dev MCC"),
          ("ood_dev", "acc", "out-of-domain dev accuracy"), ("ood_dev", "mcc", "out-of-domain dev MCC"))


def _key_lines(groups: list[dict], width_in: float) -> list[str]:
    """One entry per group, `G3  distil, 3 seeds: settings`, wrapped to the figure's width."""
    chars = int((width_in - 0.5) * 72 / (0.68 * KEY_FONT))  # DejaVu Sans Mono: 0.602 em a character, unhinted
    pad = max(len(g["label"]) for g in groups) + 2
    lines = []
    for g in groups:
        head = f"{g['label']:<{pad}}{g['kind']}, {_seeds(len(g['runs']))}: "
        text = " ".join(f"{k}={v}" for k, v in g["settings"].items()) or "–"
        lines += textwrap.wrap(head + text, chars, subsequent_indent=" " * pad, break_on_hyphens=False) or [head]
    return lines


def report_figure(report: dict):
    """The comparison figure: one line per group (G1 at the top), four panels (in-domain dev accuracy and MCC,
    out-of-domain accuracy and MCC), each with the group's mean over its runs (dot), its 95% interval (bar) and
    each run (small dots); accuracy beside each line's majority baseline, MCC beside 0; groups whose runs all
    predict one class in red. Under the axes, a legend, then the key from each label to its group's settings.

    Laid out by hand in inches (no constrained layout to collapse): the height grows with the groups and the
    key's lines, the left margin with the longest label, so nothing is cut off however many groups there are."""
    plt = _pyplot()
    groups = report["groups"]
    ticks = [f"{g['label']} {g['kind']}, {_seeds(len(g['runs']))}" for g in groups]
    width = 15.0
    key = _key_lines(groups, width)
    title_h, axes_h, xlabel_h, legend_h = 0.75, max(1.2, 0.32 * len(groups) + 0.3), 0.55, 0.45
    key_h = 0.15 + len(key) * KEY_FONT * 1.25 / 72
    height = title_h + axes_h + xlabel_h + legend_h + key_h
    left = 0.25 + 0.075 * max(map(len, ticks))  # 9-point labels: under 0.075 in a character
    fig, axes = plt.subplots(1, len(PANELS), figsize=(width, height), sharey=True)
    fig.subplots_adjust(left=left / width, right=1 - 0.25 / width, top=1 - title_h / height,
                        bottom=(xlabel_h + legend_h + key_h) / height, wspace=0.12)
    y = np.arange(len(groups))[::-1]  # G1 at the top
    for ax, (split, metric, title) in zip(axes, PANELS):
        for yi, g in zip(y, groups):
            s = g[split]
            if s is None:
                continue
            color = "red" if s["collapsed"] == len(g["runs"]) else "C0"
            mean, (lo, hi) = s[metric]["mean"], s[metric]["ci"]
            ax.errorbar(mean, yi, xerr=[[mean - lo], [hi - mean]], fmt="o", color=color, capsize=3,
                        gid=f"{g['label']} {split} {metric}")
            ax.scatter([r[split][metric] for r in g["runs"]], [yi] * len(g["runs"]), s=10, color=color, alpha=0.5,
                       zorder=3)
            if metric == "acc":
                ax.plot([s["majority_baseline"]] * 2, [yi - 0.35, yi + 0.35], color="black", linewidth=2)
        if metric == "mcc":
            ax.axvline(0, color="black", linewidth=1)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(axis="x", labelsize=8)
        ax.set_ylim(-0.6, len(groups) - 0.4)
        ax.xaxis.set_major_locator(plt.MaxNLocator(4))
    axes[0].set_yticks(y, ticks, fontsize=9)
    handles = [plt.Line2D([], [], color="C0", marker="o", label="mean over a group's runs, 95% interval"),
               plt.Line2D([], [], color="C0", marker="o", markersize=3, alpha=0.5, linestyle="",
                          label="one run (one seed)"),
               plt.Line2D([], [], color="black", linewidth=2, label="majority baseline (accuracy); MCC 0")]
    if any(g[s]["collapsed"] == len(g["runs"]) for g in groups for s in SPLITS if g[s]):
        handles.append(plt.Line2D([], [], color="red", marker="o", label="every run predicts one class"))
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, (legend_h + key_h) / height))
    fig.text(0.25 / width, (key_h - 0.05) / height, "\n".join(key), va="top", ha="left", family="monospace",
             fontsize=KEY_FONT, linespacing=1.25, gid="key")
    fig.suptitle("CoLA: each run's dev-selected epoch; out-of-domain dev never used for selection", y=1 - 0.12 / height,
                 fontsize=11)
    return fig


def comparison_paths(plots_dir: str | Path, name: str) -> tuple[Path, Path, Path]:
    """plots_dir/{name}.md, {name}.png and {name}.json: report.py's --plots_dir and --name, or a student run's own
    run_dir/comparison.{md,png,json}."""
    return tuple(Path(plots_dir) / f"{name}.{ext}" for ext in ("md", "png", "json"))


def compare(run_dirs: list[str | Path], plots_dir: str | Path, name: str = "comparison") -> tuple[str, dict]:
    """Write plots_dir/{name}.md, .png and .json for run_dirs; return the markdown and the report."""
    runs = [load_run(d) for d in dict.fromkeys(Path(d).resolve() for d in run_dirs)]
    report = build_report(runs)
    check_writable(plots_dir, "--plots_dir")
    md, png, js = comparison_paths(plots_dir, name)
    text = to_markdown(report)
    md.write_text(text)
    fig = report_figure(report)
    fig.savefig(png, dpi=DPI)
    _pyplot().close(fig)
    js.write_text(json.dumps(report, indent=2) + "\n")
    return text, report


# ---------------------------------------------------------------- command line

def find_runs(paths: list[str]) -> list[Path]:
    """The runs among paths: a path holding metrics.json is a run; a folder that does not is searched at any
    depth (`report.py runs` reads runs/hot/lora_1), and passed over with a one-line note if no run is in it
    (runs/cache, the teacher-logit cache). A path that does not exist is an error (a typo, not a folder to pass
    over), and so is a list with no run in it."""
    runs = []
    for d in map(Path, paths):
        if not d.exists():
            raise UserError(f"{d} does not exist")
        if not d.is_dir() or (d / METRICS).is_file():
            runs.append(d)
            continue
        found = sorted({p.parent for p in d.rglob(METRICS)})
        if not found:
            print(f"note: skipping {d}: not a run directory (no {METRICS}) and holds none")
        runs += found
    if not runs:
        raise UserError(f"none of {' '.join(paths)} is or holds a run directory (train_lora.py or train_distil.py "
                        f"--out_dir, holding {METRICS})")
    return runs


def main() -> None:
    p = ArgumentParser(description=__doc__)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="train_lora.py / train_distil.py --out_dir, or a folder holding such runs at any depth")
    p.add_argument("--plots_dir", default="plots", help="where the comparison goes")
    p.add_argument("--name", default="comparison",
                   help="file stem of the comparison: plots_dir/NAME.md, NAME.png and NAME.json")
    p.add_argument("--curves", action="store_true",
                   help="redraw each run's loss and accuracy curves from its metrics.json instead, in its own "
                        "directory (RUN_DIR/loss.png, RUN_DIR/accuracy.png)")
    args = p.parse_args()

    def run() -> None:
        dirs = find_runs(args.run_dirs)
        if args.curves:
            for d in dirs:
                metrics = read_json(d / METRICS, "not a run directory")
                for path in plot_curves(metrics, run_name(d), check_writable(d, "RUN_DIR")):
                    print(f"wrote {path}")
            return
        check_writable(args.plots_dir, "--plots_dir")
        text, _ = compare(dirs, args.plots_dir, args.name)
        print(text)
        md, png, js = comparison_paths(args.plots_dir, args.name)
        print(f"wrote {md}, {png} and {js}")
    run_cli(run)


if __name__ == "__main__":
    main()
