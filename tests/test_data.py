"""CoLA: finding, verifying, downloading and extracting the archive; parsing; tokenizing; batching.

Bugs these tests exist to catch: a corrupted or cut-off download accepted or left behind; a malformed row
that is not named by file and line; sampled rows out of file order; ids that are not tiktoken's GPT-2 BPE;
padding beyond the longest sentence of a batch; training batches that miss or repeat a row, or ignore the
seed; evaluation batches not sorted by length.
"""

from __future__ import annotations

import hashlib
import shutil
import socket
import struct
import threading
import time
from pathlib import Path

import pytest
import tiktoken
import torch

from conftest import SHARED
from data import PAD_TOKEN, batch_rows, collate, ensure_cola, iterate, load_cola, read_tsv, tokenize
from errors import UserError

# The official archive's SHA-256, as published with the shared copy (shared/README.md).
OFFICIAL_SHA256 = "2cf856f46df11c143d38e0cf2f9f34ff2fdb088c521cd859f5c4b9581683278b"
ARCHIVE_NAME = "cola_public_1.1.zip"
TSVS = ("in_domain_train.tsv", "in_domain_dev.tsv", "out_of_domain_dev.tsv")


@pytest.fixture(scope="module")
def archive(cola_dir) -> Path:
    """The official archive: shared/ has it; elsewhere conftest's cola_dir fixture downloaded it."""
    path = cola_dir / ARCHIVE_NAME
    if not path.is_file():
        pytest.skip(f"no {ARCHIVE_NAME} in {cola_dir}")
    return path


def assert_extracted_like_official(raw: Path, reference_raw: Path) -> None:
    for name in TSVS:
        assert (raw / name).read_bytes() == (reference_raw / name).read_bytes(), name


# ---------------------------------------------------------------- finding and loading

def test_ensure_cola_uses_the_extracted_copy(cola_dir):
    raw = ensure_cola(cola_dir)
    assert all((raw / name).is_file() for name in TSVS)
    if (SHARED / "cola" / "cola_public" / "raw").is_dir() and cola_dir == SHARED / "cola":
        assert raw == SHARED / "cola" / "cola_public" / "raw"


def test_load_cola_sizes_and_labels(cola, cola_dir):
    assert {k: len(v) for k, v in cola.items()} == {"train": 8551, "dev": 527, "ood_dev": 516}
    for ds in cola.values():
        assert set(ds.labels) == {0, 1}
        assert len(ds.sentences) == len(ds.ids) == len(ds.labels)
    assert sum(cola["dev"].labels) == 365
    assert cola["dev"].majority_acc == pytest.approx(365 / 527)
    # the sentence is the 4th tab-separated column, the label the 2nd
    first = (ensure_cola(cola_dir) / "in_domain_dev.tsv").read_text(encoding="utf-8").splitlines()[0].split("\t")
    assert cola["dev"].sentences[0] == first[3] == "The sailors rode the breeze clear of the rocks."
    assert cola["dev"].labels[0] == int(first[1])


def test_max_samples_keeps_sampled_rows_in_file_order(cola_dir, cola):
    small = load_cola(cola_dir, max_train_samples=20, max_eval_samples=7)
    assert (len(small["train"]), len(small["dev"]), len(small["ood_dev"])) == (20, 7, 7)
    assert small["train"].rows == sorted(small["train"].rows) and len(set(small["train"].rows)) == 20
    assert small["train"].sentences == [cola["train"].sentences[i] for i in small["train"].rows]
    assert small["dev"].labels == [cola["dev"].labels[i] for i in small["dev"].rows]


def test_max_samples_zero_is_a_user_error(cola_dir):
    with pytest.raises(UserError, match="empty"):
        load_cola(cola_dir, max_train_samples=0)
    with pytest.raises(UserError, match="empty"):
        load_cola(cola_dir, max_eval_samples=0)


def test_data_dir_that_is_a_file_is_a_user_error(tmp_path):
    f = tmp_path / "not_a_dir"
    f.write_text("x")
    with pytest.raises(UserError, match="not_a_dir"):
        ensure_cola(f)


# ---------------------------------------------------------------- malformed TSV

GOOD = "gj04\t1\t\tThe sailors rode the breeze clear of the rocks.\ngj04\t0\t*\tThe rope stretched the pulley.\n"


@pytest.mark.parametrize("bad_line, what", [
    ("gj04\t1\tThe weights made the rope stretch.\n", "column"),  # 3 columns
    ("gj04\t1\t\tOne\textra\n", "column"),                            # 5 columns
    ("gj04\t2\t\tThe weights made the rope stretch.\n", "'2'"),       # label 2
])
def test_malformed_row_names_file_and_line(tmp_path, bad_line, what):
    path = tmp_path / "bad.tsv"
    path.write_text(GOOD + bad_line + GOOD, encoding="utf-8")
    with pytest.raises(UserError) as e:
        read_tsv(path)
    assert f"{path}:3:" in str(e.value)
    assert what in str(e.value)


def test_malformed_split_is_reported_through_load_cola(tmp_path, cola_dir):
    raw = tmp_path / "cola_public" / "raw"
    raw.mkdir(parents=True)
    for name in TSVS:
        shutil.copy(ensure_cola(cola_dir) / name, raw / name)
    lines = (raw / "in_domain_dev.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    lines[4] = lines[4].replace("\t1\t", "\tyes\t", 1).replace("\t0\t", "\tyes\t", 1)
    (raw / "in_domain_dev.tsv").write_text("".join(lines), encoding="utf-8")
    with pytest.raises(UserError) as e:
        load_cola(tmp_path)
    assert f"{raw / 'in_domain_dev.tsv'}:5:" in str(e.value)


def test_valid_rows_parse(tmp_path):
    path = tmp_path / "ok.tsv"
    path.write_text(GOOD + "\n", encoding="utf-8")  # a trailing blank line is not a row
    sentences, labels = read_tsv(path)
    assert sentences == ["The sailors rode the breeze clear of the rocks.", "The rope stretched the pulley."]
    assert labels == [1, 0]


# ---------------------------------------------------------------- archive, hash, download

def test_archive_is_verified_and_extracted(tmp_path, archive, cola_dir):
    shutil.copy(archive, tmp_path / ARCHIVE_NAME)
    raw = ensure_cola(tmp_path)
    assert raw == tmp_path / "cola_public" / "raw"
    assert_extracted_like_official(raw, ensure_cola(cola_dir))
    assert ensure_cola(tmp_path) == raw  # a second call uses the extracted copy


def test_corrupted_archive_is_refused_and_removed(tmp_path, archive):
    data = bytearray(archive.read_bytes())
    for i in range(1000, 1016):
        data[i] ^= 0xFF
    bad = tmp_path / ARCHIVE_NAME
    bad.write_bytes(bytes(data))
    actual = hashlib.sha256(bytes(data)).hexdigest()
    with pytest.raises(UserError) as e:
        ensure_cola(tmp_path)
    assert OFFICIAL_SHA256 in str(e.value) and actual in str(e.value)
    assert not bad.exists()
    assert not (tmp_path / "cola_public").exists()


def test_download_route(tmp_path, archive, cola_dir):
    data_dir = tmp_path / "fresh" / "data"  # does not exist yet
    raw = ensure_cola(data_dir, url=archive.resolve().as_uri())
    assert raw == data_dir / "cola_public" / "raw"
    assert hashlib.sha256((data_dir / ARCHIVE_NAME).read_bytes()).hexdigest() == OFFICIAL_SHA256
    assert not list(data_dir.glob("*.part"))
    assert_extracted_like_official(raw, ensure_cola(cola_dir))


def test_download_of_missing_url_fails_cleanly(tmp_path):
    url = (tmp_path / "nowhere" / ARCHIVE_NAME).as_uri()
    with pytest.raises(UserError) as e:
        ensure_cola(tmp_path / "data", url=url)
    assert url in str(e.value)
    assert not (tmp_path / "data").exists()  # no archive, no .part, not even the directory it made


def test_download_cut_off_midway_leaves_no_part_file(tmp_path, archive, monkeypatch):
    """A server that sends half the archive and then resets the connection."""
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    body = archive.read_bytes()
    data_dir = tmp_path / "data"
    part = data_dir / (ARCHIVE_NAME + ".part")
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(60)
    seen = {}

    def serve():
        conn, _ = srv.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/zip\r\nContent-Length: "
                     + str(len(body)).encode() + b"\r\n\r\n" + body[:len(body) // 2])
        deadline = time.monotonic() + 30  # wait until the client is writing the partial file
        while time.monotonic() < deadline and not (part.is_file() and part.stat().st_size > 0):
            time.sleep(0.01)
        seen["part"] = part.is_file()
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with RST
        conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        with pytest.raises(UserError, match="could not download"):
            ensure_cola(data_dir, url=f"http://127.0.0.1:{srv.getsockname()[1]}/{ARCHIVE_NAME}")
    finally:
        t.join(60)
        srv.close()
    assert seen.get("part"), "the download never wrote its .part file"
    assert not part.exists()
    assert not (data_dir / ARCHIVE_NAME).exists()


# ---------------------------------------------------------------- tokenizing and batching

def test_ids_are_tiktoken_gpt2(cola):
    enc = tiktoken.get_encoding("gpt2")
    for name, step in (("dev", 1), ("ood_dev", 1), ("train", 17)):
        ds = cola[name]
        for i in range(0, len(ds), step):
            assert ds.ids[i] == enc.encode_ordinary(ds.sentences[i])
    assert all(PAD_TOKEN not in ids for ids in cola["train"].ids)


def test_collate_pads_to_the_longest_in_the_batch(cola):
    ds = cola["dev"]
    rows = [7, 0, 300, 42]
    b = collate(ds, rows)
    lengths = [len(ds.ids[i]) for i in rows]
    assert b.ids.shape == (4, max(lengths))
    assert b.lengths.tolist() == lengths
    assert b.labels.tolist() == [ds.labels[i] for i in rows]
    assert b.index.tolist() == rows
    for j, i in enumerate(rows):
        assert b.ids[j, :lengths[j]].tolist() == ds.ids[i]
        assert (b.ids[j, lengths[j]:] == PAD_TOKEN).all()
    assert b.ids.dtype == torch.long


def test_training_batches_cover_every_row_once_and_depend_on_the_seed(cola):
    lengths = [len(x) for x in cola["train"].ids]
    a = batch_rows(lengths, 32, shuffle=True, seed=5)
    assert sorted(i for b in a for i in b) == list(range(len(lengths)))
    assert all(1 <= len(b) <= 32 for b in a)
    assert batch_rows(lengths, 32, shuffle=True, seed=5) == a
    other = batch_rows(lengths, 32, shuffle=True, seed=6)
    assert other != a
    assert sorted(i for b in other for i in b) == list(range(len(lengths)))
    # not just the same batches in another order: the batches themselves differ
    assert {tuple(sorted(b)) for b in a} != {tuple(sorted(b)) for b in other}


def test_eval_batches_are_length_sorted(cola):
    ds = cola["dev"]
    lengths = [len(x) for x in ds.ids]
    batches = batch_rows(lengths, 32, shuffle=False)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(ds)))
    assert [lengths[i] for i in flat] == sorted(lengths)
    assert [len(b) for b in batches[:-1]] == [32] * (len(batches) - 1)
    seen = []
    for b in iterate(ds, 32, shuffle=False):
        seen += b.index.tolist()
        assert (b.lengths == b.ids.size(1)).any()  # padded to its own longest row
    assert sorted(seen) == list(range(len(ds)))


def test_training_epoch_is_mostly_real_tokens(cola):
    """Length bucketing: under 10% of the tokens computed in a training epoch (batch 32) are padding."""
    ds = cola["train"]
    for seed in (0, 1):
        total = real = 0
        rows = 0
        for b in iterate(ds, 32, shuffle=True, seed=seed):
            total += b.ids.numel()
            real += int(b.lengths.sum())
            rows += len(b.lengths)
        assert rows == len(ds)
        assert real == sum(max(len(x), 1) for x in ds.ids)
        assert (total - real) / total < 0.10, (total - real) / total


def test_tokenize_empty_is_a_user_error():
    with pytest.raises(UserError):
        tokenize("train", [], [])
    with pytest.raises(UserError):
        tokenize("train", ["A sentence."], [1], max_samples=0)


def test_more_samples_than_rows_says_so(cola_dir, capsys):
    """--max_train_samples 100000 uses all 8,551 rows: said in one line, not silently."""
    data = load_cola(cola_dir, 100000, 600)
    out = capsys.readouterr().out.splitlines()
    assert len(data["train"]) == 8551 and len(data["dev"]) == 527 and len(data["ood_dev"]) == 516
    assert out == ["note: --max_train_samples 100000 is more than train's 8551 rows: all of them are used",
                   "note: --max_eval_samples 600 is more than dev's 527 rows: all of them are used",
                   "note: --max_eval_samples 600 is more than ood_dev's 516 rows: all of them are used"]
