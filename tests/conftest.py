"""Shared fixtures. Real CoLA and real tiktoken: from GPT2_COLA_DIR and TIKTOKEN_CACHE_DIR when set (a machine
with no network: bench/gpu_check.sh sets them to its carried folder), else from ../shared when it is there (CI,
offline), else from the clone's own cola/ and tiktoken/ where the README's quick start puts them, otherwise
downloaded once through data.py's own downloader and tiktoken's, into a cache (a user's fresh clone)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))

LOCAL = [SHARED, ROOT]  # ../shared (CI), then the clone itself (the quick start's cola/ and tiktoken/)
TIKTOKEN_DIR = next((d / "tiktoken" for d in LOCAL if (d / "tiktoken").is_dir()), None)
if TIKTOKEN_DIR:
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(TIKTOKEN_DIR))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the hub; local checkpoints only
COLA_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gpt2-lora-cola"
# a --data_dir that already holds CoLA's cola_public/raw/, or None: then COLA_CACHE, filled on first use
if os.environ.get("GPT2_COLA_DIR"):
    COLA_DIR: Path | None = Path(os.environ["GPT2_COLA_DIR"]).resolve()
else:
    COLA_DIR = next((d / "cola" for d in LOCAL if (d / "cola" / "cola_public" / "raw").is_dir()), None)


def pytest_sessionstart(session: pytest.Session) -> None:
    """Fetch what every test needs once, now, or stop with one line (ERROR: ..., exit status 4): offline, that
    beats an error per test."""
    import tempfile

    from data import ensure_cola, get_encoder
    from errors import UserError
    if COLA_DIR and not (COLA_DIR / "cola_public" / "raw").is_dir():
        raise pytest.UsageError(f"GPT2_COLA_DIR={COLA_DIR} holds no cola_public/raw/ (CoLA's raw TSVs)")
    try:
        if COLA_DIR is None:
            ensure_cola(COLA_CACHE)
        get_encoder()
    except UserError as e:
        bpe_cache = os.environ.get("TIKTOKEN_CACHE_DIR") or Path(tempfile.gettempdir()) / "data-gym-cache"
        raise pytest.UsageError(f"the tests need CoLA (0.3 MB, cached in {COLA_CACHE}) and tiktoken's GPT-2 BPE "
                                f"files (1.5 MB, cached in {bpe_cache}), downloaded on first use; {e}") from None


@pytest.fixture(scope="session")
def cola_dir() -> Path:
    """A --data_dir holding CoLA."""
    return COLA_DIR or COLA_CACHE


@pytest.fixture(scope="session")
def cola(cola_dir):
    """The three tokenized splits, full size."""
    from data import load_cola
    return load_cola(cola_dir)


def make_gpt2_checkpoint(path: Path, n_layer: int = 2, n_head: int = 2, n_embd: int = 32, n_positions: int = 128,
                         seed: int = 0) -> Path:
    """Save a random transformers GPT-2 (LM head) checkpoint; loaded back through GPT.from_pretrained."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_positions)
    GPT2LMHeadModel(config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    return make_gpt2_checkpoint(tmp_path_factory.mktemp("tiny_gpt2"))


@pytest.fixture(scope="session")
def lora_ref(tmp_path_factory, tiny_gpt2, cola_dir) -> Path:
    """An uninterrupted 3-epoch train_lora.py run (test_robustness.py's flags, LORA_ROWS rows): what an
    interrupted and resumed run must equal (test_robustness.py, test_cli.py); also a distillation teacher.
    Session-scoped, so the two modules share one run."""
    from test_robustness import EPOCHS, LORA_ROWS, cli, lora_args, ok
    out = tmp_path_factory.mktemp("lora_ref") / "lora"
    ok(cli("train_lora.py", *lora_args(tiny_gpt2, cola_dir, out, rows=LORA_ROWS, epochs=EPOCHS)))
    return out
