"""`fastgpt prepare-data` and the shards pretraining maps (fastgpt.corpus), on generated corpora
of about 100 kB (and one of 3 MB): shards decode back to the documents joined by
<|endoftext|>; the same bytes whatever --workers; a second run does nothing; a run interrupted
(an exception, a full disk, SIGKILL) resumes to exactly the shards of an uninterrupted one; bad
inputs are one-line errors; max() reads little of a shard; two ranks (torchrun-style, and
torchrun itself running pretrain) prepare once and read the same tokens."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import random
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import fastgpt.corpus.prepare
import fastgpt.corpus.tokens
import fastgpt.corpus.writer
import fastgpt.tokenizer
from fastgpt.cli import main
from fastgpt.corpus import (
    CorpusOptions,
    ShardedTokens,
    open_split,
    prepare_corpus,
    read_manifest,
    resolve_inputs,
)
from fastgpt.text_data import load_text_datasets

EOT = "<|endoftext|>"
SHARD = 1024  # tokens per shard in these tests: the corpus below makes about 30
WORDS = [
    *["the", "model", "reads", "a", "token", "and", "then", "another", "one", "while", "the"],
    *["loss", "falls", "slowly", "über", "naïve", "café", "東京", "—", "42", "1999", "can't"],
    "won't\tdon't",
]


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        words = rng.choices(WORDS, k=rng.randint(5, 120))
        text = " ".join(words).replace(" one ", " one\n", 1).replace(" a ", "\n\n  a ", 1)
        docs.append(text + (" <|endoftext|> inside" if i == 7 else ""))
    return docs


def write_jsonl(path: Path, docs: list[str], blank_every: int = 0) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i, doc in enumerate(docs):
            f.write(json.dumps({"id": i, "text": doc}, ensure_ascii=i % 2 == 0) + "\n")
            if blank_every and i % blank_every == 0:
                f.write("\n")
    return path


@pytest.fixture
def corpus(tmp_path):
    """Two .jsonl files and a .txt in a folder: 301 documents, about 30k tokens."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    docs_a, docs_b = make_docs(180, seed=1), make_docs(120, seed=2)
    write_jsonl(folder / "a.jsonl", docs_a, blank_every=50)
    write_jsonl(folder / "b.jsonl", docs_b)
    story = "A story in one file.\n\nIt has lines, and\r\nCRLF too.\n" * 40
    (folder / "c.txt").write_text(story, encoding="utf-8", newline="")
    return folder, [*docs_a, *docs_b, story]


def prepare(inputs, out, **kwargs):
    settings = {k: kwargs.pop(k) for k in list(kwargs) if k in CorpusOptions.__dataclass_fields__}
    settings = {"shard_tokens": SHARD, "workers": 1, **settings}
    return prepare_corpus(inputs, out, CorpusOptions(**settings), progress=False, **kwargs)


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.bin"))}


def decode(tokens) -> str:
    return fastgpt.tokenizer.get_tokenizer().decode(np.asarray(tokens).tolist())


# --- the shards --------------------------------------------------------------------------


def test_shards_decode_to_the_documents_joined_by_end_of_text(corpus, tmp_path, tiktoken_available):
    folder, docs = corpus
    result = prepare(folder, tmp_path / "out", val_fraction=0.05, seed=3)
    manifest = result.manifest
    assert manifest["complete"] and manifest["documents"] == len(docs) == 301
    val_docs = round(301 * 0.05)
    split = fastgpt.corpus.prepare.choose_validation(301, 0.05, 3)
    assert sum(split) == val_docs == manifest["splits"]["val"]["documents"]
    for name, index in (("train", 0), ("val", 1)):
        tokens = open_split(tmp_path / "out", name)
        expected = EOT.join(d for d, s in zip(docs, split, strict=True) if s == index)
        assert decode(tokens) == expected, name
        shards = manifest["splits"][name]["shards"]
        assert all(s["tokens"] == SHARD for s in shards[:-1]) and 0 < shards[-1]["tokens"] <= SHARD
        assert len(tokens) == manifest["splits"][name]["tokens"] == sum(s["tokens"] for s in shards)
    assert len(manifest["splits"]["train"]["shards"]) > 5  # documents span shard boundaries
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if "tmp" in p.name) == []


def test_the_same_bytes_whatever_the_workers(corpus, tmp_path, tiktoken_available):
    folder, _ = corpus
    one = prepare(folder, tmp_path / "one", workers=1).manifest
    three = prepare(folder, tmp_path / "three", workers=3, batch_chars=3000).manifest
    assert one == three
    assert shard_bytes(tmp_path / "one") == shard_bytes(tmp_path / "three")


def test_a_corpus_of_megabytes_the_same_bytes_with_two_workers(tmp_path, tiktoken_available):
    """About 3 MB in three files at the default batch size (1 MB of text): several batches
    of one file in flight in two worker processes at once, shards and manifest byte for byte
    those of one worker."""
    folder = tmp_path / "big"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", make_docs(5000, seed=11))
    write_jsonl(folder / "b.jsonl", make_docs(3000, seed=12))
    (folder / "c.txt").write_text("A long story, one document.\n" * 8000, encoding="utf-8")
    size = sum(p.stat().st_size for p in folder.iterdir())
    assert 2_500_000 < size < 4_000_000
    shard = 100_000  # several shards per split, documents across their boundaries
    one = prepare(folder, tmp_path / "one", workers=1, shard_tokens=shard).manifest
    two = prepare(folder, tmp_path / "two", workers=2, shard_tokens=shard).manifest
    assert one == two and one["complete"] and len(one["splits"]["train"]["shards"]) > 5
    assert shard_bytes(tmp_path / "one") == shard_bytes(tmp_path / "two")
    assert (tmp_path / "one" / "manifest.json").read_bytes() == (
        tmp_path / "two" / "manifest.json"
    ).read_bytes()


def test_a_second_run_does_nothing_and_changed_inputs_are_refused(
    corpus, tmp_path, tiktoken_available, monkeypatch, capsys
):
    folder, _ = corpus
    out = tmp_path / "out"
    prepare(folder, out)
    before = shard_bytes(out)

    def no_tokenizer():
        raise AssertionError("tokenized again although prepared")

    monkeypatch.setattr(fastgpt.tokenizer, "get_tokenizer", no_tokenizer)
    assert main(["prepare-data", str(folder), "--out", str(out), "--shard-tokens", str(SHARD),
                 "--workers", "1", "--no-progress"]) == 0  # fmt: skip
    assert "up to date, nothing to do" in capsys.readouterr().out
    monkeypatch.undo()

    assert main(["prepare-data", str(folder), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "other settings (--shard-tokens)" in err and "--overwrite" in err
    (folder / "c.txt").write_text("Edited.\n", encoding="utf-8")
    os.utime(folder / "c.txt", ns=(1, 1))
    with pytest.raises(ValueError, match=r"other inputs .* pass overwrite"):
        prepare(folder, out)
    assert shard_bytes(out) == before  # refused: nothing touched
    result = prepare(folder, out, overwrite=True)
    assert not result.up_to_date and decode(open_split(out, "train")).endswith(f"{EOT}Edited.\n")


# --- interrupted runs --------------------------------------------------------------------


def fail_after(monkeypatch, shards: int, error: Exception):
    """Make the writer raise `error` when it writes shard number `shards` + 1."""
    original, written = fastgpt.corpus.writer.write_shard, []

    def write_shard(path, ids):
        if len(written) == shards:
            raise error
        written.append(path.name)
        original(path, ids)

    monkeypatch.setattr(fastgpt.corpus.writer, "write_shard", write_shard)
    return written


def test_an_interrupted_run_resumes_to_the_same_shards(corpus, tmp_path, tiktoken_available,
                                                        monkeypatch):  # fmt: skip
    folder, _ = corpus
    clean = prepare(folder, tmp_path / "clean", val_fraction=0.1).manifest
    out = tmp_path / "out"
    fail_after(monkeypatch, 9, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        prepare(folder, out, val_fraction=0.1, workers=2, batch_chars=5000)
    monkeypatch.undo()
    partial = read_manifest(out)
    assert not partial["complete"]
    with pytest.raises(ValueError, match="has not finished"):
        open_split(out, "train")  # pretraining refuses a half-prepared corpus
    listed = sum(len(partial["splits"][s]["shards"]) for s in ("train", "val"))
    assert listed == 9
    result = prepare(folder, out, val_fraction=0.1)
    assert result.resumed_shards == 9
    total = sum(clean["splits"][s]["tokens"] for s in ("train", "val"))
    assert 0 < result.tokenized < total - 8 * SHARD  # the finished shards were not redone
    assert result.manifest == clean
    assert shard_bytes(out) == shard_bytes(tmp_path / "clean")


def test_a_full_disk_mid_shard_keeps_the_finished_shards_only(
    corpus, tmp_path, tiktoken_available, monkeypatch
):
    folder, _ = corpus
    prepare(folder, tmp_path / "clean")
    out = tmp_path / "out"
    original, calls = fastgpt.corpus.writer._write_all, []

    def write_all(fd, data):
        calls.append(1)
        if len(calls) == 4:  # half of the fourth shard goes out, then the disk is full
            os.write(fd, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        original(fd, data)

    monkeypatch.setattr(fastgpt.corpus.writer, "_write_all", write_all)
    code = main(["prepare-data", str(folder), "--out", str(out), "--shard-tokens", str(SHARD),
                 "--workers", "1", "--no-progress"])  # fmt: skip
    assert code == 2
    manifest = read_manifest(out)
    assert len(manifest["splits"]["train"]["shards"]) == 3 and not manifest["complete"]
    assert sorted(p.name for p in out.iterdir() if p.suffix != ".json") == [
        ".lock",
        "train-000000.bin",
        "train-000001.bin",
        "train-000002.bin",
    ]  # no partial file: neither under a shard's name nor a temporary one
    monkeypatch.undo()
    assert prepare(folder, out).resumed_shards == 3
    assert shard_bytes(out) == shard_bytes(tmp_path / "clean")


def test_a_killed_process_resumes_and_its_partial_shard_is_not_taken(
    corpus, tmp_path, tiktoken_available
):
    """SIGKILL while the fourth shard is half written: a temporary file stays behind; the next
    run deletes it and ends with the shards of a run never killed."""
    folder, _ = corpus
    prepare(folder, tmp_path / "clean")
    out = tmp_path / "out"
    script = f"""
import os, signal
import fastgpt.corpus.writer as w
calls = []
def write_all(fd, data):
    calls.append(1)
    if len(calls) == 4:
        os.write(fd, data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    while data:
        data = data[os.write(fd, data):]
w._write_all = write_all
from fastgpt.corpus import CorpusOptions, prepare_corpus
prepare_corpus([{str(folder)!r}], {str(out)!r}, CorpusOptions(shard_tokens={SHARD}, workers=2),
               progress=False)
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == -9, done.stderr
    assert [p.name for p in out.glob("*.tmp*")]  # the half-written shard, under a temporary name
    assert len(read_manifest(out)["splits"]["train"]["shards"]) == 3
    assert prepare(folder, out).resumed_shards == 3
    assert not list(out.glob("*.tmp*"))
    assert shard_bytes(out) == shard_bytes(tmp_path / "clean")


# --- bad inputs --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"text": "ok"}', "", '{"text": "bad \xff"}'],
         r"bad\.jsonl:3: not UTF-8 text \(byte 0xff at offset 30\)"),
        (['{"text": "ok"}', '["a list"]'],
         r"bad\.jsonl:2: a JSON line must be an object, got list"),
        (['{"text": "ok"}', '{"body": "x", "id": 1}'],
         r'bad\.jsonl:2: no "text" field \(fields: "body", "id"\); name .* --text-field'),
        (['{"text": "ok"', ], r"bad\.jsonl:1: not a JSON line"),
        (['{"text": 3}'], r'bad\.jsonl:1: "text" is int, not a string'),
        (["", '{"text": ""}', " "], r"empty corpus: .*bad\.jsonl hold no text \(1 documents\)"),
    ],
)  # fmt: skip
def test_bad_json_lines_are_one_line_errors(tmp_path, tiktoken_available, capsys, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes("\n".join(lines).encode("utf-8").replace(b"\xc3\xbf", b"\xff") + b"\n")
    out = tmp_path / "out"
    assert main(["prepare-data", str(path), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    import re

    assert re.search(message, err), err
    assert not read_manifest(out) or not read_manifest(out)["complete"]


def test_bad_files_and_options(tmp_path, tiktoken_available, capsys):
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"fine\nfine\n\xe9 not utf-8\n")
    assert main(["prepare-data", str(binary), "--out", str(tmp_path / "o")]) == 2
    assert "binary.txt:3: not UTF-8 text (byte 0xe9 at offset 10)" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("")
    assert main(["prepare-data", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "o")]) == 2
    assert "empty.txt: empty file" in capsys.readouterr().err
    assert main(["prepare-data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert "data file not found" in capsys.readouterr().err
    assert main(["prepare-data", str(binary)]) == 2
    assert "--out is required" in capsys.readouterr().err
    assert main(["prepare-data", str(binary), "--out", "o", "--shard-tokens", "0"]) == 2
    assert "--shard-tokens must be >= 1" in capsys.readouterr().err
    assert main(["prepare-data", str(binary), "--out", "o", "--val-fraction", "1"]) == 2
    assert "--val-fraction must be in [0, 1)" in capsys.readouterr().err


def test_parquet_rows_are_documents(tmp_path, tiktoken_available, capsys):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    docs = make_docs(50, seed=5)
    table = pa.table({"id": list(range(50)), "text": docs})
    pq.write_table(table, tmp_path / "part-0.parquet", row_group_size=16)
    write_jsonl(tmp_path / "same.jsonl", docs)
    a = prepare(tmp_path / "part-0.parquet", tmp_path / "pq", val_fraction=0.0)
    b = prepare(tmp_path / "same.jsonl", tmp_path / "js", val_fraction=0.0)
    assert decode(open_split(tmp_path / "pq", "train")) == EOT.join(docs)
    assert shard_bytes(tmp_path / "pq") == shard_bytes(tmp_path / "js")
    assert a.manifest["splits"] == b.manifest["splits"]

    pq.write_table(pa.table({"content": docs}), tmp_path / "other.parquet")
    out = str(tmp_path / "o")
    assert main(["prepare-data", str(tmp_path / "other.parquet"), "--out", out]) == 2
    err = capsys.readouterr().err
    assert 'other.parquet: no column "text" (columns: content); name the column' in err
    assert "--text-field" in err
    assert main(["prepare-data", str(tmp_path / "other.parquet"), "--out", out,
                 "--text-field", "content", "--no-progress"]) == 0  # fmt: skip


def test_folders_and_globs(corpus, tmp_path):
    folder, _ = corpus
    (folder / "notes.md").write_text("not picked from a folder")
    names = [p.name for p in resolve_inputs(folder)]
    assert names == ["a.jsonl", "b.jsonl", "c.txt"]
    assert [p.name for p in resolve_inputs([str(folder / "*.jsonl"), folder / "notes.md"])] == [
        "a.jsonl", "b.jsonl", "notes.md"
    ]  # fmt: skip
    with pytest.raises(FileNotFoundError, match="no files match"):
        resolve_inputs(str(folder / "*.parquet"))
    from fastgpt.corpus.sources import JSONL, TEXT, kind_of

    assert [kind_of(Path(n)) for n in ("a.json", "b.NDJSON", "c.md")] == [JSONL, JSONL, TEXT]


# --- reading the shards ------------------------------------------------------------------


def test_sharded_tokens_read_across_shards_by_memory_map(tmp_path):
    stream = np.arange(1000, dtype=np.uint16)
    files, lengths = [], [300, 300, 400]
    for i, (a, b) in enumerate([(0, 300), (300, 600), (600, 1000)]):
        stream[a:b].tofile(tmp_path / f"{i}.bin")
        files.append(tmp_path / f"{i}.bin")
    tokens = ShardedTokens(files, lengths, maxima=[299, 599, 999])
    assert len(tokens) == 1000 and tokens.max() == 999 and tokens[-1] == 999
    assert isinstance(tokens.read(10, 20), np.memmap)  # within a shard: no copy
    assert tokens.read(290, 610).tolist() == list(range(290, 610))
    view = tokens[250:650]
    assert len(view) == 400 and view.read(0, 400).tolist() == list(range(250, 650))
    assert view.max() == 649 and view[:50].max() == 299  # parts of shards are read
    assert view[380:].tolist() == list(range(630, 650))
    again = pickle.loads(pickle.dumps(view))  # DataLoader workers: maps reopened, not copied
    assert len(pickle.dumps(view)) < 2000 and again.read(0, 400).tolist() == view.tolist()


def counted_reads(monkeypatch) -> list[int]:
    """The number of tokens of each ShardedTokens.read from now on (a list filled as they come)."""
    original, reads = ShardedTokens.read, []

    def read(self, start, stop):
        reads.append(stop - start)
        return original(self, start, stop)

    monkeypatch.setattr(ShardedTokens, "read", read)
    return reads


def test_max_of_a_part_of_a_shard_reads_until_the_shard_max(tmp_path, monkeypatch):
    """max() is exact and reads a part of a shard only in chunks up to the first holding the
    shard's max id from the manifest; nothing of a part when a whole shard's max bounds it;
    everything without maxima."""
    rng = np.random.default_rng(0)
    first = rng.integers(0, 500, 1000).astype(np.uint16)
    first[150] = 999  # shard 0's max, early in it
    second, third = rng.integers(0, 800, 1000).astype(np.uint16), np.full(10, 7, np.uint16)
    files = []
    for i, ids in enumerate((first, second, third)):
        ids.tofile(tmp_path / f"{i}.bin")
        files.append(tmp_path / f"{i}.bin")
    maxima = [999, int(second.max()), 7]
    monkeypatch.setattr(fastgpt.corpus.tokens, "MAX_SCAN_TOKENS", 100)
    reads = counted_reads(monkeypatch)
    tokens = ShardedTokens(files, [1000, 1000, 10], maxima)
    stream = np.concatenate([first, second, third]).astype(np.int64)
    cases = [  # (start, stop, tokens max() may read)
        (50, 1500, 200),  # shard 0 from 50: chunks [50, 150), [150, 250) hit 999; shard 1: none
        (300, 1000, 700),  # 999 is not in this part: all of it, to be exact
        (0, 1500, 0),  # shard 0 whole: 999 from the manifest; shard 1's part can't exceed it
        (500, 2010, 500),  # shards 1, 2 whole (max < 999): shard 0's part, 999-free, is read
        (5, 9, 4),
    ]
    for start, stop, budget in cases:
        reads.clear()
        view = tokens[start:stop]
        assert view.max() == stream[start:stop].max(), (start, stop)
        assert sum(reads) == budget, (start, stop, reads)
    assert tokens.max() == 999 and not reads[4:]  # whole shards: the manifest alone
    blind = ShardedTokens(files, [1000, 1000, 10])  # no maxima known: everything is read
    reads.clear()
    assert blind[50:1500].max() == 999 and sum(reads) == 1450


def test_pretrain_vocab_check_reads_little_of_a_cached_corpus(corpus, tmp_path, monkeypatch,
                                                               tiktoken_available):  # fmt: skip
    """pretrain --data FILES: one cached shard, split by position into two parts; the vocab
    check's max() of each stops at its first <|endoftext|> (50256) instead of reading it."""
    folder, _ = corpus
    train, val = load_text_datasets(folder, 32, cache_dir=tmp_path / "cache", progress=False,
                                    workers=1)  # fmt: skip
    assert train.token_ids.num_shards == 1 and len(train.token_ids) > 20_000
    monkeypatch.setattr(fastgpt.corpus.tokens, "MAX_SCAN_TOKENS", 256)
    reads = counted_reads(monkeypatch)
    for part in (train.token_ids, val.token_ids):
        reads.clear()
        assert part.max() == 50256 == np.asarray(part).max()
        assert sum(reads[:-1]) <= 4 * 256  # the last read is np.asarray's, of everything


def test_pretraining_reads_a_prepared_folder(corpus, tmp_path, tiktoken_available, capsys):
    folder, _ = corpus
    out = tmp_path / "prepared"
    prepare(folder, out, val_fraction=0.2)
    train_tokens, val_tokens = open_split(out, "train"), open_split(out, "val")
    train, val = load_text_datasets(out, 64, stride=48)
    assert len(train) == -(-(len(train_tokens) - 64) // 48)  # ceil, over the whole split
    assert len(val) == -(-(len(val_tokens) - 64) // 48)
    stream = np.asarray(train_tokens).astype(np.int64)
    for i in (0, 21, len(train) - 1):  # 21 · 48 = 1008: a window across the first boundary
        inputs, targets = train[i]
        assert inputs.tolist() == stream[i * 48 : i * 48 + 64].tolist()
        assert targets.tolist() == stream[i * 48 + 1 : i * 48 + 65].tolist()
    train64, val64 = load_text_datasets(out, 64)
    printed = f"{len(train64)} training and {len(val64)} validation windows of 64 tokens"
    rc = main(["pretrain", "--data", str(out), "--model", "tiny", "--context-length", "64",
               "--max-steps", "1", "--batch-size", "2", "--out", str(tmp_path / "run"),
               "--no-progress", "--sample-prompt", "", "--eval-every", "0"])  # fmt: skip
    assert rc == 0 and printed in capsys.readouterr().out


def test_pretrain_tokenizes_jsonl_into_its_cache(corpus, tmp_path, tiktoken_available):
    folder, docs = corpus
    train, val = load_text_datasets(folder / "a.jsonl", 32, val_fraction=0.1,
                                    cache_dir=tmp_path / "cache", progress=False)  # fmt: skip
    ids = fastgpt.tokenizer.get_tokenizer().encode(EOT.join(docs[:180]), allowed_special={EOT})
    split = round(len(ids) * 0.9)
    assert train[0][0].tolist() == ids[:32] and val[0][0].tolist() == ids[split : split + 32]
    assert [p.name[:7] for p in (tmp_path / "cache").iterdir()] == ["corpus-"]


# --- two ranks ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, data: str, cache: str, out: str) -> None:
    import time

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2",
                      RANK=str(rank), LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    original = fastgpt.corpus.prepare.tokenize_into_shards

    def counted(*args, **kwargs):
        Path(out, f"prepared-by-{rank}").touch()
        time.sleep(1.0)  # the other rank is surely waiting by now
        return original(*args, **kwargs)

    fastgpt.corpus.prepare.tokenize_into_shards = counted
    train, val = load_text_datasets(data, 32, cache_dir=cache, progress=False, workers=1)
    digest = hashlib.sha256(np.asarray(train.token_ids).tobytes()).hexdigest()
    dist.init_process_group("gloo")
    digests = [None, None]
    dist.all_gather_object(digests, (digest, len(train), len(val)))
    dist.destroy_process_group()
    Path(out, f"rank-{rank}.json").write_text(json.dumps(digests))


def test_two_ranks_prepare_once_and_read_the_same_tokens(corpus, tmp_path, tiktoken_available):
    folder, _ = corpus
    out = tmp_path / "ranks"
    out.mkdir()
    mp.spawn(_rank, args=(_free_port(), str(folder), str(tmp_path / "cache"), str(out)),
             nprocs=2, join=True)  # fmt: skip
    assert sorted(p.name for p in out.glob("prepared-by-*")) == ["prepared-by-0"]
    seen = [json.loads((out / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert seen[0] == seen[1] and seen[0][0] == seen[0][1]  # both ranks: the same tokens
    assert len(list((tmp_path / "cache").iterdir())) == 1


# Run by sitecustomize in each process torchrun starts (RANK set): a mark when the rank tokenizes
# and one with the exit code of its `fastgpt pretrain`, in $MARKS.
_RANK_MARKS = """
import os, time
rank, marks = os.environ.get("RANK"), os.environ.get("FASTGPT_TEST_MARKS")
if rank is not None and marks:
    import fastgpt.cli
    import fastgpt.corpus.prepare as prepare
    tokenize = prepare.tokenize_into_shards
    def counted(*args, **kwargs):
        open(os.path.join(marks, f"prepared-by-{rank}"), "w").close()
        time.sleep(1.0)  # the other rank is surely waiting by now
        return tokenize(*args, **kwargs)
    prepare.tokenize_into_shards = counted
    main = fastgpt.cli.main
    def finished(*args, **kwargs):
        code = main(*args, **kwargs)
        with open(os.path.join(marks, f"finished-{rank}"), "w") as f:
            f.write(str(code))
        return code
    fastgpt.cli.main = finished
"""


@pytest.mark.slow
def test_torchrun_pretrain_prepares_once_and_both_ranks_finish(corpus, tmp_path,
                                                              tiktoken_available):  # fmt: skip
    """The real launcher, not an emulation: `torchrun --nproc_per_node 2 -m fastgpt pretrain
    --data FILES` on CPU (gloo). LOCAL_RANK 0 tokenizes into one corpus folder of the token
    cache while rank 1 waits; both train a step and exit 0."""
    folder, _ = corpus
    marks, cache, hooks = tmp_path / "marks", tmp_path / "cache", tmp_path / "hooks"
    marks.mkdir()
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(_RANK_MARKS, encoding="utf-8")
    path = os.pathsep.join(p for p in (str(hooks), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "FASTGPT_TEST_MARKS": str(marks),
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", "-m", "fastgpt", "pretrain", "--data", str(folder),
               "--token-cache", str(cache), "--tokenize-workers", "1", "--model", "tiny",
               "--context-length", "64", "--batch-size", "2", "--max-steps", "1",
               "--device", "cpu", "--eval-every", "0", "--sample-prompt", "", "--no-progress",
               "--out", str(tmp_path / "run")]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(p.name for p in marks.iterdir()) == ["finished-0", "finished-1",
                                                      "prepared-by-0"]  # fmt: skip
    assert all((marks / f"finished-{r}").read_text() == "0" for r in (0, 1))
    prepared = list(cache.iterdir())
    assert len(prepared) == 1 and prepared[0].name.startswith("corpus-")
    assert read_manifest(prepared[0])["complete"]
    assert done.stdout.count("validation windows of 64 tokens") == 1  # rank 0 alone prints
    assert "on cpu × 2 ranks" in done.stdout
    assert (tmp_path / "run" / "model.safetensors").is_file()
