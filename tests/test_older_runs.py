"""A run written before a config key existed keeps working: the key takes its cli.CONFIG_DEFAULTS value, decided
in one place (cli.complete_config) for --resume, report.py's groups and the teacher check.

Bugs this exists to catch: resume comparing the raw recorded configs (an older run refused with "config differ");
report.py grouping by the raw config (one recipe split into two groups, `key=None` beside `key=default`);
complete_config letting the default override a recorded value (an older run that did record the key would be
read as the default)."""

from __future__ import annotations

from argparse import Namespace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cli import CONFIG_DEFAULTS, complete_config
from data import Dataset
from errors import UserError
from model import DistilRNN
from precision import Precision
from report import Run, make_groups
from trainer import fit

FP32 = Precision("fp32", "cpu")
KEY = "dense_embedding_grad"  # a key older student runs lack: they took the dense update (True)


def test_complete_config_fills_only_what_is_missing():
    old = {"lr": 1e-3}
    assert complete_config(old) == {**CONFIG_DEFAULTS, "lr": 1e-3} and old == {"lr": 1e-3}  # a copy
    assert complete_config({KEY: False})[KEY] is False and CONFIG_DEFAULTS[KEY] is True


def _args(tmp: Path, **kw) -> Namespace:
    return Namespace(**{**dict(out_dir=str(tmp), epochs=1, lr=1e-3, batch_size=32, eval_batch_size=256,
                               weight_decay=0.0, warmup_ratio=0.0, grad_clip=1.0, seed=0, resume=False,
                               compile=False), **kw})


def test_resume_of_a_run_whose_config_lacks_a_key(cola, tmp_path):
    train = Dataset("train", *(x[:64] for x in (cola["train"].sentences, cola["train"].ids, cola["train"].labels)))
    dev = Dataset("dev", *(x[:32] for x in (cola["dev"].sentences, cola["dev"].ids, cola["dev"].labels)))
    loss = lambda logits, batch: F.cross_entropy(logits, batch.labels)  # noqa: E731
    old = {"mode": "rnn", "lr": 1e-3}  # written before KEY existed
    torch.manual_seed(0)
    fit(DistilRNN(embd_dim=8, hidden_size=8), train, dev, loss, _args(tmp_path), old, "rnn", lambda: None, FP32)
    # today's run records the key; its default-for-older-runs value is the same recipe: resumed (finished, so
    # nothing more to train) and recorded with the key from now on
    same = {**old, KEY: CONFIG_DEFAULTS[KEY]}
    m = fit(DistilRNN(embd_dim=8, hidden_size=8), train, dev, loss, _args(tmp_path, resume=True), same, "rnn",
            lambda: None, FP32)
    assert len(m["epochs"]) == 1 and m["config"] == same
    with pytest.raises(UserError, match=rf"\({KEY} differ\)"):  # another value of the key is another recipe
        fit(DistilRNN(embd_dim=8, hidden_size=8), train, dev, loss, _args(tmp_path, resume=True),
            {**old, KEY: not CONFIG_DEFAULTS[KEY]}, "rnn", lambda: None, FP32)


def _run(name: str, config: dict) -> Run:
    dev = {"epoch": 1, "rows": [0, 1], "labels": [0, 1], "p1": [0.2, 0.8]}
    return Run(Path(name), {"config": config}, {"dev": dev})


def test_report_groups_an_older_run_with_its_recipe():
    old = _run("old", {"mode": "rnn", "lr": 1e-3, "seed": 1})
    new = _run("new", {"mode": "rnn", "lr": 1e-3, "seed": 2, KEY: CONFIG_DEFAULTS[KEY]})
    other = _run("other", {"mode": "rnn", "lr": 1e-3, "seed": 3, KEY: not CONFIG_DEFAULTS[KEY]})
    groups = make_groups([old, new, other])
    assert [[r.path.name for r in g.runs] for g in groups] == [["old", "new"], ["other"]]
    # labelled G1, G2 (issue 23), each with the settings that tell it apart
    assert [(g.label, g.shown) for g in groups] == [("G1", {KEY: str(CONFIG_DEFAULTS[KEY])}),
                                                    ("G2", {KEY: str(not CONFIG_DEFAULTS[KEY])})]
