"""Classification fine-tuning: data parsing and validation, balancing, splitting, padding,
last-real-token selection, freezing, and a small model that learns spam from scratch."""

from __future__ import annotations

import pytest
import torch

from fastgpt.classification import (
    ClassificationCollate,
    ClassificationDataset,
    LabeledTexts,
    balance_by_undersampling,
    classification_loss,
    classify_texts,
    evaluate_classifier,
    last_token_logits,
    parse_trainable,
    read_labeled_table,
    read_labeled_texts,
    read_spam_collection,
    replace_head,
    set_trainable,
    split_train_val_test,
)
from fastgpt.model import GPTModel
from fastgpt.model_config import GPTConfig
from fastgpt.tokenizer import EOT_ID


class ToyTokenizer:
    """One token per character (id = code point % 1000): no BPE files needed."""

    def encode(self, text, disallowed_special=()):
        return [ord(c) % 1000 for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def tiny_classifier(num_classes: int = 2, seed: int = 0) -> GPTModel:
    torch.manual_seed(seed)
    config = GPTConfig.from_name("tiny", context_length=32)
    model = GPTModel(config, backend="torch")
    replace_head(model, num_classes)
    return model


# --- reading -----------------------------------------------------------------------------


def test_spam_collection_keeps_every_line(data_dir):
    data = read_spam_collection(data_dir / "SMSSpamCollection")
    assert len(data) == 5574  # pandas' default quoting would merge lines and give 5572
    assert data.label_names == ["ham", "spam"]
    assert data.labels.count(0) == 4827 and data.labels.count(1) == 747
    assert data.texts[2].startswith("Free entry in 2 a wkly comp")
    assert data.labels[2] == 1
    assert data.sources[0].endswith("SMSSpamCollection:1")


def test_spam_format_quotes_are_text(tmp_path):
    path = tmp_path / "sms.txt"
    path.write_text('ham\t"Hi there\nspam\tWIN "now"\ttab inside\n\nham\tok\r\n', encoding="utf-8")
    data = read_spam_collection(path)
    assert data.texts == ['"Hi there', 'WIN "now"\ttab inside', "ok"]
    assert data.labels == [0, 1, 0]
    assert data.sources[2] == f"{path}:4"  # blank line 3 skipped, numbering kept


@pytest.mark.parametrize(
    "content, message",
    [
        ("ham\tfine\nno tab here\n", ":2: expected 'label<TAB>text'"),
        ("ham\tfine\nspam\tok\neggs\tbad\n", ":3: label 'eggs' is not one of ham, spam"),
        ("\n\n", "no labelled lines"),
    ],
)
def test_spam_format_errors_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "SMSSpamCollection"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match="SMSSpamCollection") as info:
        read_labeled_texts(path)
    assert message in str(info.value)


def test_csv_and_tsv_tables(tmp_path):
    csv_path = tmp_path / "reviews.csv"
    csv_path.write_text(
        'id,body,sentiment\n1,"great, really ""great""",pos\n2,awful,neg\n3,"multi\nline",pos\n',
        encoding="utf-8",
    )
    data = read_labeled_texts(csv_path, text_column="body", label_column="sentiment")
    assert data.texts == ['great, really "great"', "awful", "multi\nline"]
    assert data.label_names == ["neg", "pos"]  # sorted
    assert data.labels == [1, 0, 1]

    tsv_path = tmp_path / "data.tsv"
    tsv_path.write_text("label\ttext\nb\tx\na\ty\nc\tz\n", encoding="utf-8")
    data = read_labeled_texts(tsv_path)
    assert data.label_names == ["a", "b", "c"] and data.labels == [1, 0, 2]


def test_table_errors(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\nhello,a\nbye,b\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"d.csv:1: no text column 'body'.*--text-column"):
        read_labeled_table(path, text_column="body")
    with pytest.raises(ValueError, match=r"d.csv:3: label 'b' is not one of a, c"):
        read_labeled_table(path, label_names=["a", "c"])
    path.write_text("text,label\nhello,a,extra\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"d.csv:2: row has more fields"):
        read_labeled_table(path)
    path.write_text("text,label\nhello\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"d.csv:2: row has fewer fields"):
        read_labeled_table(path)
    path.write_text("text,label\nhello,a\nbye,a\n", encoding="utf-8")
    with pytest.raises(ValueError, match="at least 2 labels"):
        read_labeled_table(path)
    path.write_text("text,label\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no data rows"):
        read_labeled_table(path)
    path.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match=r"d.csv: empty file, no header row"):
        read_labeled_table(path)
    path.write_bytes(b"text,label\nhello,a\ncaf\xe9,b\n")  # Latin-1, not UTF-8
    with pytest.raises(ValueError, match=r"d.csv:3: not UTF-8 text \(byte 0xe9 at offset 22\)"):
        read_labeled_table(path)
    path.write_text("text,label\nhello,a\n" + "x" * 200_000 + ",b\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"d.csv:3: malformed table: field larger"):
        read_labeled_table(path)
    path.write_text("\ufefftext,label\nhello,a\nbye,b\n", encoding="utf-8")  # Excel's BOM
    assert read_labeled_table(path).texts == ["hello", "bye"]
    with pytest.raises(FileNotFoundError):
        read_labeled_texts(tmp_path / "missing.csv")


# --- balancing and splitting -------------------------------------------------------------


def make_texts(n_ham: int, n_spam: int) -> LabeledTexts:
    labels = [0] * n_ham + [1] * n_spam
    texts = [f"text {i}" for i in range(len(labels))]
    return LabeledTexts(texts, labels, ["ham", "spam"], [f"f:{i + 1}" for i in range(len(labels))])


def test_balance_undersamples_the_majority():
    data = make_texts(50, 7)
    balanced = balance_by_undersampling(data, seed=1)
    assert balanced.labels.count(0) == 7 and balanced.labels.count(1) == 7
    spam = [t for t, y in zip(data.texts, data.labels, strict=True) if y == 1]
    assert [t for t, y in zip(balanced.texts, balanced.labels, strict=True) if y == 1] == spam
    assert set(balanced.texts) <= set(data.texts)
    assert balance_by_undersampling(data, seed=1).texts == balanced.texts  # seeded
    assert balance_by_undersampling(data, seed=2).texts != balanced.texts
    with pytest.raises(ValueError, match="only one class"):
        balance_by_undersampling(make_texts(5, 0))


def test_split_is_book_sized_disjoint_and_seeded(data_dir):
    data = balance_by_undersampling(read_spam_collection(data_dir / "SMSSpamCollection"), seed=123)
    assert len(data) == 2 * 747
    splits = split_train_val_test(data, seed=123)
    train, val, test = splits
    assert (splits.train, splits.val, splits.test) == (train, val, test)
    assert (len(train), len(val), len(test)) == (1045, 149, 300)  # the book's sizes
    sources = train.sources + val.sources + test.sources
    assert sorted(sources) == sorted(data.sources)  # a partition
    again = split_train_val_test(data, seed=123)
    assert again[0].sources == train.sources
    assert split_train_val_test(data, seed=7)[0].sources != train.sources


def test_empty_split_is_an_error():
    with pytest.raises(ValueError, match="validation split is empty"):
        split_train_val_test(make_texts(3, 3))


# --- batches and last-token selection ----------------------------------------------------


def test_dataset_truncates_and_collate_pads_with_end_token():
    data = LabeledTexts(["abcdef", "ab", ""], [1, 0, 1], ["n", "y"])
    dataset = ClassificationDataset(data, ToyTokenizer(), max_length=4)
    assert dataset.longest == 4
    assert dataset[0] == ([97, 98, 99, 100], 1)  # truncated to 4 tokens
    assert dataset[2] == ([EOT_ID], 1)  # an empty text still has one token to classify from
    batch = ClassificationCollate(pad_to=5)([dataset[i] for i in range(3)])
    assert batch["input_ids"].tolist() == [
        [97, 98, 99, 100, EOT_ID],
        [97, 98, EOT_ID, EOT_ID, EOT_ID],
        [EOT_ID] * 5,
    ]
    assert batch["lengths"].tolist() == [4, 2, 1]
    assert batch["labels"].tolist() == [1, 0, 1]
    assert ClassificationCollate()([dataset[1]])["input_ids"].shape == (1, 2)  # batch longest


def test_last_token_logits_picks_last_real_token():
    logits = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    picked = last_token_logits(logits, torch.tensor([5, 2]))
    assert torch.equal(picked, torch.stack([logits[0, 4], logits[1, 1]]))
    with pytest.raises(ValueError, match=r"lengths must be in \[1, 5\]"):
        last_token_logits(logits, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="expected logits"):
        last_token_logits(logits, torch.tensor([1, 2, 3]))


@pytest.mark.parametrize("lengths", [[1, 7, 17], [17, 3, 9]])
def test_padded_batch_classifies_like_unpadded_sequences(lengths):
    """The class logits of a padded batch equal those of each sequence run alone: padding
    comes after the last real token and causal attention never lets it back in."""
    model = tiny_classifier(3).eval()
    torch.manual_seed(1)
    items = [(torch.randint(0, 1000, (n,)).tolist(), 0) for n in lengths]
    batch = ClassificationCollate(pad_to=20)(items)
    with torch.no_grad():
        batched = last_token_logits(model(batch["input_ids"]), batch["lengths"])  # (B, C)
        for row, (ids, _) in enumerate(items):
            alone = model(torch.tensor([ids]))[0, -1]  # (C,)
            torch.testing.assert_close(batched[row], alone, rtol=1e-5, atol=1e-5)
        # ... and differ from the naive last position, which is padding for short rows.
        naive = model(batch["input_ids"])[:, -1]
    short = [i for i, n in enumerate(lengths) if n < 20]
    assert not torch.allclose(naive[short], batched[short])


# --- the model ---------------------------------------------------------------------------


def test_replace_head_and_trainable_sets():
    model = tiny_classifier(4)
    assert model.out_head.out_features == 4 and model.out_head.bias is not None
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 4)

    def trainable_names():
        return {n for n, p in model.named_parameters() if p.requires_grad}

    set_trainable(model, "head")
    assert trainable_names() == {"out_head.weight", "out_head.bias"}
    set_trainable(model, "last-1")
    names = trainable_names()
    assert {"final_norm.weight", "final_norm.bias", "out_head.weight"} <= names
    assert any(n.startswith("trf_blocks.1.") for n in names)
    assert not any(n.startswith(("trf_blocks.0.", "tok_emb", "pos_emb")) for n in names)
    set_trainable(model, "last-2")
    assert any(n.startswith("trf_blocks.0.") for n in trainable_names())
    assert "tok_emb.weight" not in trainable_names()
    set_trainable(model, "all")
    assert trainable_names() == {n for n, _ in model.named_parameters()}
    for bad in ("last-3", "last-x", "everything", "last--1"):
        with pytest.raises(ValueError, match="trainable must be all, head or last-N"):
            parse_trainable(bad, 2)
    with pytest.raises(ValueError, match="num_classes"):
        replace_head(model, 1)


def test_loss_evaluate_and_probabilities():
    model = tiny_classifier(2)
    data = LabeledTexts(["spam spam", "hello", "win money"], [1, 0, 1], ["ham", "spam"])
    dataset = ClassificationDataset(data, ToyTokenizer(), max_length=16)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=2, collate_fn=ClassificationCollate(pad_to=dataset.longest)
    )
    batch = next(iter(loader))
    loss = classification_loss(model, batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    logits = last_token_logits(model(batch["input_ids"]), batch["lengths"])
    expected = torch.nn.functional.cross_entropy(logits, batch["labels"])
    torch.testing.assert_close(loss, expected)
    metrics = evaluate_classifier(model, loader)
    assert set(metrics) == {"loss", "accuracy"} and 0.0 <= metrics["accuracy"] <= 1.0
    assert model.training  # mode restored
    probs = classify_texts(model, ["hello", "x" * 100], ToyTokenizer())  # long text truncated
    assert probs.shape == (2, 2)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2))
