"""Pretraining text data: tokenizing with an on-disk cache (chunked exactly like one pass),
folders of .txt files, the book's sliding windows, the train/validation split, and clear
errors for missing, empty, too short or non-UTF-8 files."""

from __future__ import annotations

import hashlib
import io
import math
import os
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

import fastgpt.tokenizer
from fastgpt.text_data import (
    SlidingWindowDataset,
    _text_chunks,
    load_text_datasets,
    resolve_text_files,
    split_train_val,
    tokenize_files,
)
from fastgpt.tokenizer import EOT_ID

# --- windows (no tokenizer needed) -------------------------------------------------------


@pytest.mark.parametrize(
    "n, length, stride",
    [(2, 1, 1), (17, 4, 4), (17, 4, 1), (97, 16, 5), (1023, 64, 64), (65, 64, 1)],
)
def test_sliding_windows_match_the_books_definition(n, length, stride):
    ids = np.arange(n, dtype=np.uint16)
    data = SlidingWindowDataset(ids, length, stride)
    starts = list(range(0, n - length, stride))  # the book's GPTDatasetV1 loop
    assert len(data) == len(starts) == math.ceil((n - length) / stride)
    for i, start in enumerate(starts):
        inputs, targets = data[i]
        assert inputs.dtype == targets.dtype == torch.long
        assert inputs.tolist() == list(range(start, start + length))
        assert targets.tolist() == list(range(start + 1, start + length + 1))
    with pytest.raises(IndexError):
        data[len(data)]


def test_window_arguments_are_checked():
    with pytest.raises(ValueError, match="context_length"):
        SlidingWindowDataset(np.zeros(10, np.uint16), 0)
    with pytest.raises(ValueError, match="stride"):
        SlidingWindowDataset(np.zeros(10, np.uint16), 4, 0)
    assert len(SlidingWindowDataset(np.zeros(4, np.uint16), 4)) == 0  # no target for a window


def test_split_train_val_by_position():
    ids = np.arange(1000, dtype=np.uint16)
    train, val = split_train_val(ids, 16, val_fraction=0.1)
    assert len(train.token_ids) == 900 and len(val.token_ids) == 100
    assert val[0][0][0].item() == 900  # validation is the end of the text
    train, val = split_train_val(ids, 16, val_fraction=0.0)
    assert val is None and len(train.token_ids) == 1000
    with pytest.raises(ValueError, match=r"my\.txt has 10 tokens, fewer than one training window"):
        split_train_val(ids[:10], 16, name="my.txt")
    with pytest.raises(ValueError, match=r"validation part .* shorter than one window"):
        split_train_val(ids[:100], 16, val_fraction=0.1, name="my.txt")
    with pytest.raises(ValueError, match="val_fraction"):
        split_train_val(ids, 16, val_fraction=1.0)


# --- files -------------------------------------------------------------------------------


def test_resolve_files_and_folders(tmp_path):
    (tmp_path / "b.txt").write_text("b")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_text("a")
    (tmp_path / "notes.md").write_text("not text data")
    assert resolve_text_files(tmp_path) == [tmp_path / "b.txt", tmp_path / "sub" / "a.txt"]
    assert resolve_text_files(tmp_path / "b.txt") == [tmp_path / "b.txt"]
    found = resolve_text_files(tmp_path / "**" / "?.txt")
    assert found == [tmp_path / "b.txt", tmp_path / "sub" / "a.txt"]
    with pytest.raises(FileNotFoundError, match="no files match"):
        resolve_text_files(tmp_path / "*.rst")
    with pytest.raises(FileNotFoundError, match=r"data file not found: .*nope\.txt"):
        resolve_text_files(tmp_path / "nope.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"holds no \.txt files"):
        resolve_text_files(tmp_path / "empty")


def test_default_corpus_offline_says_how_to_pass_a_file(tmp_path, monkeypatch):
    """No FASTGPT_DATA_DIR, nothing cached, no network: the error says to pass a file as the
    `data` parameter (the CLI says --data: tests/test_pretrain.py)."""
    monkeypatch.delenv("FASTGPT_DATA_DIR", raising=False)
    monkeypatch.setenv("FASTGPT_CACHE_DIR", str(tmp_path))

    def offline(url, timeout):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(ValueError, match=r"the-verdict\.txt .*pass a file of your own as data$"):
        resolve_text_files(None)


class FakeResponse(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_download_checks_sha256_and_caches_once(tmp_path, monkeypatch):
    """fetch("the-verdict.txt"): a download with the wrong sha256 is refused and not kept; the
    right one is cached and reused without the network; a corrupted cache is fetched again."""
    from fastgpt import download

    text = b"I HAD always thought Jack Gisburn rather a cheap genius"
    spec = download.DataFile("story.txt", "https://example.invalid/story.txt",
                             hashlib.sha256(text).hexdigest())  # fmt: skip
    monkeypatch.setitem(download.DATA_FILES, "story.txt", spec)
    monkeypatch.delenv("FASTGPT_DATA_DIR", raising=False)
    monkeypatch.setenv("FASTGPT_CACHE_DIR", str(tmp_path / "cache"))
    served = {"payload": b"tampered" + text, "downloads": 0}

    def urlopen(url, timeout):
        assert url == spec.url
        served["downloads"] += 1
        return FakeResponse(served["payload"])

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    with pytest.raises(ValueError, match=r"story\.txt .* has sha256 .* expected"):
        download.fetch("story.txt")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())

    served["payload"] = text
    path = download.fetch("story.txt")
    assert path == tmp_path / "cache" / "story.txt" and path.read_bytes() == text
    assert download.fetch("story.txt") == path and served["downloads"] == 2  # cached
    assert download.data_file(None, "story.txt") == path

    path.write_bytes(b"corrupted")
    assert download.fetch("story.txt").read_bytes() == text and served["downloads"] == 3
    assert sorted(p.name for p in path.parent.iterdir()) == ["story.txt"]  # no partial file

    local = tmp_path / "mine.txt"
    local.write_text("my own text")
    assert download.data_file(str(local), "story.txt") == local  # --data wins, no download
    with pytest.raises(FileNotFoundError, match=r"data file not found: .*nope\.txt"):
        download.data_file(tmp_path / "nope.txt", "story.txt")
    with pytest.raises(KeyError, match="unknown data file"):
        download.fetch("nope.txt")


def test_default_corpus_is_the_verdict(data_dir, monkeypatch):
    monkeypatch.setenv("FASTGPT_DATA_DIR", str(data_dir))
    assert resolve_text_files(None)[0].name == "the-verdict.txt"


def test_tokenize_the_verdict_in_chunks_equals_one_pass(tmp_path, data_dir, tiktoken_available):
    path = data_dir / "the-verdict.txt"
    expected = fastgpt.tokenizer.get_tokenizer().encode(path.read_text(encoding="utf-8"))
    assert len(expected) == 5145  # as in the book
    for chunk_chars in (1, 97, 1023, 1 << 22):
        ids = tokenize_files([path], cache_dir=tmp_path / str(chunk_chars), chunk_chars=chunk_chars,
                             progress=False)  # fmt: skip
        assert isinstance(ids, np.memmap) and ids.dtype == np.uint16
        assert ids.tolist() == expected, chunk_chars


def test_token_cache_is_reused_until_the_file_changes(tmp_path, tiktoken_available, monkeypatch):
    text = tmp_path / "story.txt"
    text.write_text("Hello world.\nA second line<|endoftext|>third\n", encoding="utf-8")
    cache = tmp_path / "cache"
    first = tokenize_files([text], cache_dir=cache, progress=False)
    assert EOT_ID in first.tolist()  # the separator text is the special token
    assert len(list(cache.iterdir())) == 1

    def no_tokenizer():
        raise AssertionError("tokenized again although cached")

    monkeypatch.setattr(fastgpt.tokenizer, "get_tokenizer", no_tokenizer)
    again = tokenize_files([text], cache_dir=cache, progress=False)
    assert again.tolist() == first.tolist()
    monkeypatch.undo()

    text.write_text("Different text now.\n", encoding="utf-8")
    os.utime(text, ns=(1, 1))  # a different mtime even on a coarse clock
    changed = tokenize_files([text], cache_dir=cache, progress=False)
    assert changed.tolist() == fastgpt.tokenizer.get_tokenizer().encode("Different text now.\n")
    assert not [p for p in cache.iterdir() if "partial" in p.name]  # no temp files left


def test_files_are_joined_by_end_of_text(tmp_path, tiktoken_available):
    (tmp_path / "a.txt").write_text("first story", encoding="utf-8")
    (tmp_path / "b.txt").write_text("second story", encoding="utf-8")
    enc = fastgpt.tokenizer.get_tokenizer()
    ids = tokenize_files(resolve_text_files(tmp_path), cache_dir=tmp_path / "c", progress=False)
    assert ids.tolist() == [*enc.encode("first story"), EOT_ID, *enc.encode("second story")]


def test_empty_short_and_binary_files_are_clear_errors(tmp_path, tiktoken_available):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"empty\.txt: empty file"):
        load_text_datasets(empty, 16, cache_dir=tmp_path / "c", progress=False)
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.")
    with pytest.raises(ValueError, match=r"short\.txt has 6 tokens, fewer than one training"):
        load_text_datasets(short, 16, cache_dir=tmp_path / "c", progress=False)
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match=r"binary\.txt:1: not UTF-8 text \(byte 0xff at offset 0"):
        load_text_datasets(binary, 16, cache_dir=tmp_path / "c", progress=False)


def test_a_bad_byte_far_into_a_file_is_located_by_line_and_file_offset(tmp_path):
    """The text layer reads in buffers: its error position is not the file's offset."""
    path = tmp_path / "late.txt"
    path.write_bytes("héllo\n".encode() * 3000 + b"bad \xe9 byte\n")  # 7 bytes a line
    with pytest.raises(
        ValueError, match=r"late\.txt:3001: not UTF-8 text \(byte 0xe9 at offset 21004\)"
    ):
        list(_text_chunks(path, chunk_chars=5000))


def test_load_the_verdict_datasets(tmp_path, data_dir, tiktoken_available):
    train, val = load_text_datasets(data_dir / "the-verdict.txt", 256, cache_dir=tmp_path,
                                    progress=False)  # fmt: skip
    # 4630 + 515 tokens; like the book's chapter 5 (which splits characters): 9 training
    # batches of 2 windows and 1 validation batch of 2
    assert (len(train), len(val)) == (18, 2)
    inputs, targets = train[3]
    assert inputs.shape == targets.shape == (256,)
    assert torch.equal(inputs[1:], targets[:-1])


def test_chunk_cuts_never_change_tokens(tmp_path, tiktoken_available):
    """Whitespace runs, CRLF, tabs, digits and contractions around newlines, cut anywhere."""
    text = "a\n\nb\n c \nd\r\ne\t\nf\n'sg\n12\n!\n \n\n  x\nend\n\n"
    path = tmp_path / "ws.txt"
    path.write_bytes(text.encode("utf-8"))
    expected = fastgpt.tokenizer.get_tokenizer().encode(text)
    for chunk_chars in (1, 2, 3, 5, 8):
        ids = tokenize_files([path], cache_dir=tmp_path / str(chunk_chars), chunk_chars=chunk_chars,
                             progress=False)  # fmt: skip
        assert ids.tolist() == expected, chunk_chars
