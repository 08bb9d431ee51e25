"""Fine-tuning GPT as a text classifier (the book's chapter 6: spam or not).

    labelled texts (file)  -> balance (undersample) -> split 70/10/20 with a seed
      -> token ids, truncated to max_length, padded with <|endoftext|>     (B, T)
      -> GPTModel whose out_head is Linear(emb_dim, num_classes)            (B, T, C)
      -> the logits at each sequence's LAST REAL token                      (B, C)
      -> cross-entropy against the label

Why the last real token: attention is causal, so only the last position has seen the whole
text. With padding after the text, the last *position* would be a padding token, so the batch
carries each example's length and we gather position length - 1.

Two data formats are read:

- the raw UCI SMS Spam Collection: one `label<TAB>text` per line, no header, labels ham/spam
  (ham = 0, spam = 1). Lines are split with `split("\\t", 1)`, so quotes in messages are text,
  not CSV quoting, and all 5574 lines are kept;
- any .csv / .tsv file with a header row and a text and a label column (csv module); its labels
  are mapped to ints in sorted order.

Everything here validates its input and raises ValueError naming the file and line.
"""

from __future__ import annotations

import csv
import io
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fastgpt.errors import ConfigError
from fastgpt.text_data import read_utf8
from fastgpt.tokenizer import EOT_ID

SPAM_LABELS = ("ham", "spam")
"""Label names of the SMS Spam Collection, in id order (ham = 0, spam = 1)."""
TABLE_SUFFIXES = {".csv": ",", ".tsv": "\t", ".tab": "\t"}
LABELS_FILE = "labels.json"
CLASSIFIER_FILE = "classifier.json"


# --- reading labelled texts --------------------------------------------------------------


@dataclass
class LabeledTexts:
    """Texts with integer labels; `label_names[i]` is the name of label i and `sources[k]` says
    where text k came from ("file:line") for error messages."""

    texts: list[str]
    labels: list[int]
    label_names: list[str]
    sources: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int]) -> LabeledTexts:
        return LabeledTexts(
            [self.texts[i] for i in indices],
            [self.labels[i] for i in indices],
            list(self.label_names),
            [self.sources[i] for i in indices] if self.sources else [],
        )


def read_spam_collection(
    path: str | Path, label_names: Sequence[str] = SPAM_LABELS
) -> LabeledTexts:
    """Read the raw UCI file: `label<TAB>text` per line, no header. Blank lines are skipped.

    Raises ValueError for a line without a tab or with a label not in `label_names`
    (message "FILE:LINE: ...")."""
    path = Path(path)
    label_ids = {name: i for i, name in enumerate(label_names)}
    texts, labels, sources = [], [], []
    # Split on "\n" only: iterating a text file would also break lines at a lone "\r".
    lines = read_utf8(path).split("\n")
    for lineno, line in enumerate(lines, start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        if "\t" not in line:
            raise ValueError(
                f"{path}:{lineno}: expected 'label<TAB>text', found no tab in {line[:60]!r}"
            )
        label, text = line.split("\t", 1)
        if label not in label_ids:
            raise ValueError(
                f"{path}:{lineno}: label {label!r} is not one of {', '.join(label_names)}"
            )
        texts.append(text)
        labels.append(label_ids[label])
        sources.append(f"{path}:{lineno}")
    if not texts:
        raise ValueError(f"{path}: no labelled lines found")
    return LabeledTexts(texts, labels, list(label_names), sources)


def read_labeled_table(
    path: str | Path,
    text_column: str = "text",
    label_column: str = "label",
    label_names: Sequence[str] | None = None,
) -> LabeledTexts:
    """Read a .csv (comma) or .tsv (tab) file with a header row, using the csv module.

    Labels become ints in sorted order of their names, unless `label_names` fixes the set and
    order (then a label outside it raises ValueError "FILE:LINE: ...")."""
    path = Path(path)
    delimiter = TABLE_SUFFIXES.get(path.suffix.lower(), ",")
    rows: list[tuple[str, str, str]] = []  # (text, label, source)
    with io.StringIO(read_utf8(path), newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        columns = reader.fieldnames  # None for an empty file, [] for a blank first line
        if columns is None:
            raise ValueError(f"{path}: empty file, no header row")
        for name, what in ((text_column, "text"), (label_column, "label")):
            if name not in columns:
                raise ValueError(
                    f"{path}:1: no {what} column {name!r} in the header (columns: "
                    f"{', '.join(map(repr, columns)) or 'none'}); choose it with "
                    f"--{what}-column"
                )
        try:
            for row in reader:
                where = f"{path}:{reader.line_num}"
                if None in row:
                    raise ValueError(
                        f"{where}: row has more fields than the header ({len(columns)})"
                    )
                if any(row[c] is None for c in columns):
                    raise ValueError(
                        f"{where}: row has fewer fields than the header ({len(columns)})"
                    )
                if not any((v or "").strip() for v in row.values()):
                    continue  # blank line
                if not row[label_column].strip():
                    raise ValueError(f"{where}: empty label (column {label_column!r})")
                rows.append((row[text_column], row[label_column].strip(), where))
        except csv.Error as exc:  # e.g. a field longer than csv.field_size_limit()
            line = reader.reader.line_num  # DictReader.line_num lags a failed row
            raise ValueError(f"{path}:{line}: malformed table: {exc}") from None
    if not rows:
        raise ValueError(f"{path}: no data rows after the header")
    if label_names is None:
        label_names = sorted({label for _, label, _ in rows})
    label_ids = {name: i for i, name in enumerate(label_names)}
    for _, label, where in rows:
        if label not in label_ids:
            raise ValueError(f"{where}: label {label!r} is not one of {', '.join(label_names)}")
    if len(label_ids) < 2:
        raise ValueError(f"{path}: a classifier needs at least 2 labels, found {list(label_ids)}")
    return LabeledTexts(
        [t for t, _, _ in rows],
        [label_ids[label] for _, label, _ in rows],
        list(label_names),
        [w for _, _, w in rows],
    )


def read_labeled_texts(path: str | Path, **table_columns: Any) -> LabeledTexts:
    """A .csv/.tsv table with a header (`read_labeled_table`, which takes the keyword arguments
    text_column, label_column and label_names), else the raw UCI spam format
    (`read_spam_collection`; label_names default ham, spam)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    if path.suffix.lower() in TABLE_SUFFIXES:
        return read_labeled_table(path, **table_columns)
    return read_spam_collection(path, table_columns.get("label_names") or SPAM_LABELS)


# --- balancing and splitting -------------------------------------------------------------


def balance_by_undersampling(data: LabeledTexts, seed: int = 123) -> LabeledTexts:
    """Keep a random `n_min` examples of every class, n_min = size of the smallest class (the
    book keeps all 747 spam and 747 random ham). Original order is kept within the result."""
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(data.labels):
        by_class.setdefault(label, []).append(i)
    if len(by_class) < 2:
        present = [data.label_names[label] for label in by_class]
        raise ValueError(
            f"cannot balance: only one class present ({present[0] if present else 'no texts'}; "
            f"labels {data.label_names})"
        )
    n_min = min(len(v) for v in by_class.values())
    rng = random.Random(seed)
    keep: list[int] = []
    for label in sorted(by_class):
        indices = by_class[label]
        keep.extend(indices if len(indices) == n_min else rng.sample(indices, n_min))
    return data.subset(sorted(keep))


class Splits(NamedTuple):
    """A data set cut three ways: what `split_train_val_test` (LabeledTexts) and
    `instruction.split_instruction_data` (lists of records) return, in this order."""

    train: Any
    val: Any
    test: Any


def split_fractions(
    n: int, fractions: Sequence[float], names: Sequence[str]
) -> list[tuple[int, int]]:
    """[start, end) index ranges for consecutive splits of n items: every split but the last gets
    int(n * fraction), the last the rest (the book's arithmetic). Raises ValueError if one comes
    out empty."""
    if abs(sum(fractions) - 1.0) > 1e-6 or any(f <= 0 for f in fractions):
        raise ValueError(f"split fractions must be positive and sum to 1, got {list(fractions)}")
    sizes = [int(n * f) for f in fractions[:-1]]
    sizes.append(n - sum(sizes))
    ranges, start = [], 0
    for size, name in zip(sizes, names, strict=True):
        if size <= 0:
            raise ValueError(
                f"the {name} split is empty: {n} examples split "
                f"{'/'.join(f'{f:g}' for f in fractions)} give sizes {sizes}; use more data"
            )
        ranges.append((start, start + size))
        start += size
    return ranges


def split_train_val_test(
    data: LabeledTexts, fractions: Sequence[float] = (0.7, 0.1, 0.2), seed: int = 123
) -> Splits:
    """Shuffle with `seed`, then split into train/validation/test (70/10/20 as the book)."""
    order = list(range(len(data)))
    random.Random(seed).shuffle(order)
    ranges = split_fractions(len(order), fractions, ("train", "validation", "test"))
    return Splits(*(data.subset(order[a:b]) for a, b in ranges))


# --- dataset and batches -----------------------------------------------------------------


class ClassificationDataset(Dataset):
    """Token ids of each text, truncated to `max_length` tokens.

    Items are (token_ids: list[int], label: int); `collate` pads them into a batch.
    `longest` is the longest encoded text after truncation.
    """

    def __init__(self, data: LabeledTexts, tokenizer, max_length: int | None = None):
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.data = data
        self.encoded = [tokenizer.encode(t, disallowed_special=()) for t in data.texts]
        # An empty text would have nothing to classify from: let it be one <|endoftext|>.
        self.encoded = [ids if ids else [EOT_ID] for ids in self.encoded]
        if max_length is not None:
            self.encoded = [ids[:max_length] for ids in self.encoded]
        self.labels = list(data.labels)
        self.longest = max(len(ids) for ids in self.encoded)

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, i: int) -> tuple[list[int], int]:
        return self.encoded[i], self.labels[i]


class ClassificationCollate:
    """Pads a list of (token_ids, label) to `pad_to` tokens with <|endoftext|> (to the batch's
    longest when pad_to is None) into a dict:

    input_ids (B, T) long, lengths (B,) long (real tokens per row), labels (B,) long.
    A fixed pad_to (the book pads everything to the longest training text) keeps batch shapes
    constant; with causal attention the padding never changes the last real token's logits.
    """

    def __init__(self, pad_to: int | None = None, pad_id: int = EOT_ID):
        self.pad_to = pad_to
        self.pad_id = pad_id

    def __call__(self, items: Sequence[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
        width = self.pad_to or max(len(ids) for ids, _ in items)
        input_ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        lengths = torch.empty(len(items), dtype=torch.long)
        for row, (ids, _) in enumerate(items):
            ids = ids[:width]
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            lengths[row] = len(ids)
        labels = torch.tensor([label for _, label in items], dtype=torch.long)
        return {"input_ids": input_ids, "lengths": lengths, "labels": labels}


def last_token_logits(
    logits: torch.Tensor, lengths: torch.Tensor, check: bool = True
) -> torch.Tensor:
    """logits (B, T, C), lengths (B,) in [1, T] -> logits at position lengths - 1: (B, C).
    check=False skips the range check of lengths (a host sync) for lengths checked once where
    they were made (`ClassificationCollate`'s are in range by construction)."""
    if logits.dim() != 3 or lengths.shape != logits.shape[:1]:
        raise ValueError(
            f"expected logits (B, T, C) and lengths (B,), got {tuple(logits.shape)} and "
            f"{tuple(lengths.shape)}"
        )
    t = logits.shape[1]
    if check and bool(((lengths < 1) | (lengths > t)).any()):
        raise ValueError(f"lengths must be in [1, {t}], got {lengths.tolist()}")
    index = (lengths - 1).to(logits.device).view(-1, 1, 1).expand(-1, 1, logits.shape[2])
    return logits.gather(1, index).squeeze(1)  # (B, C)


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def classify_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Class logits (B, C) of a batch from `ClassificationCollate`. Its lengths are range-checked
    with the model's inputs (`check_inputs`: off in training, where the collate made them)."""
    device = _model_device(model)
    logits = model(batch["input_ids"].to(device))  # (B, T, C)
    check = getattr(getattr(model, "module", model), "check_inputs", True)  # DDP wraps it
    return last_token_logits(logits, batch["lengths"].to(device), check)  # (B, C)


def classification_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of the last-real-token logits against the labels (a scalar)."""
    logits = classify_logits(model, batch)  # (B, C)
    return F.cross_entropy(logits.float(), batch["labels"].to(logits.device))


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module, loader: DataLoader, max_batches: int | None = None
) -> dict[str, float]:
    """{"loss": mean cross-entropy per example, "accuracy": fraction correct} over the loader
    (the first `max_batches` batches if given). The model's train/eval mode is restored."""
    was_training = model.training
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    try:
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            logits = classify_logits(model, batch).float()  # (B, C)
            labels = batch["labels"].to(logits.device)
            total_loss += F.cross_entropy(logits, labels, reduction="sum").item()
            correct += (logits.argmax(-1) == labels).sum().item()
            count += labels.numel()
    finally:
        model.train(was_training)
    if count == 0:
        return {"loss": float("nan"), "accuracy": float("nan")}
    return {"loss": total_loss / count, "accuracy": correct / count}


def accuracy_metrics(model: nn.Module, loader: DataLoader) -> dict[str, float]:
    """`metrics_fn` for `fastgpt.train.Trainer`: {"accuracy": ...} on the loader it is given."""
    return {"accuracy": evaluate_classifier(model, loader)["accuracy"]}


# --- the model ---------------------------------------------------------------------------


def parse_trainable(spec: str, n_layers: int) -> int | None:
    """'all' -> None (everything), 'head' -> 0 blocks, 'last-N' -> N blocks; ValueError else."""
    if spec == "all":
        return None
    if spec == "head":
        return 0
    if spec.startswith("last-"):
        try:
            n = int(spec.removeprefix("last-"))
        except ValueError:
            n = -1
        if 0 <= n <= n_layers:
            return n
    raise ConfigError(
        "trainable", f"must be all, head or last-N with 0 <= N <= {n_layers}, got {spec!r}"
    )


def replace_head(model: nn.Module, num_classes: int) -> nn.Linear:
    """Swap model.out_head for a fresh Linear(emb_dim, num_classes) (with bias, as the book),
    on the model's device and dtype. Returns the new head."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    old = model.out_head
    weight = old.weight
    head = nn.Linear(model.config.emb_dim, num_classes, device=weight.device, dtype=weight.dtype)
    model.out_head = head
    return head


def set_trainable(model: nn.Module, trainable: str = "last-1") -> None:
    """Freeze everything, then unfreeze the head, the final LayerNorm and the last N blocks
    ('last-N'), only the head ('head'), or everything ('all'). The book trains the last block,
    final_norm and the head: the lower layers' general features are kept, and training is
    cheaper."""
    n_blocks = parse_trainable(trainable, len(model.trf_blocks))
    if n_blocks is None:
        model.requires_grad_(True)
        return
    model.requires_grad_(False)
    model.out_head.requires_grad_(True)
    if n_blocks > 0:
        model.final_norm.requires_grad_(True)
        for block in model.trf_blocks[len(model.trf_blocks) - n_blocks :]:
            block.requires_grad_(True)


def save_classifier_metadata(
    directory: str | Path, label_names: Sequence[str], info: dict[str, Any]
) -> None:
    """Write labels.json ({"labels": [...], "label_to_id": {...}}) and classifier.json (`info`:
    max_length, pad_id, ...) next to a saved model."""
    directory = Path(directory)
    labels = {"labels": list(label_names), "label_to_id": {n: i for i, n in enumerate(label_names)}}
    (directory / LABELS_FILE).write_text(json.dumps(labels, indent=2) + "\n", encoding="utf-8")
    (directory / CLASSIFIER_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def load_classifier_metadata(directory: str | Path) -> tuple[list[str], dict[str, Any]]:
    """(label_names, classifier info) saved by `save_classifier_metadata`."""
    directory = Path(directory)
    labels_path = directory / LABELS_FILE
    if not labels_path.is_file():
        raise FileNotFoundError(
            f"{labels_path} not found: {directory} is not a classifier saved by "
            "`fastgpt finetune-classify`"
        )
    labels = _read_json(labels_path).get("labels")
    if not isinstance(labels, list) or not labels:
        raise ValueError(f'{labels_path}: no "labels" list')
    info_path = directory / CLASSIFIER_FILE
    info = _read_json(info_path) if info_path.is_file() else {}
    max_length = info.get("max_length")
    if max_length is not None and (type(max_length) is not int or max_length < 1):
        raise ValueError(f"{info_path}: max_length must be an integer >= 1, got {max_length!r}")
    return labels, info


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`; ValueError naming the file (and line) otherwise."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{exc.lineno}: malformed JSON: {exc.msg}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def saved_label_names(directory: str | Path) -> list[str] | None:
    """The label names saved beside a classifier checkpoint, or None when `directory` holds
    no labels.json (e.g. a language model, or a hub name)."""
    if not (Path(directory) / LABELS_FILE).is_file():
        return None
    return load_classifier_metadata(directory)[0]


@torch.no_grad()
def classify_texts(
    model: nn.Module, texts: Sequence[str], tokenizer, max_length: int | None = None
) -> torch.Tensor:
    """Class probabilities (N, C) for each text (truncated to max_length and the model's
    context length)."""
    limit = model.config.context_length if max_length is None else max_length
    limit = min(limit, model.config.context_length)
    items = []
    for text in texts:
        ids = tokenizer.encode(text, disallowed_special=())[:limit] or [EOT_ID]
        items.append((ids, 0))
    was_training = model.training
    model.eval()
    try:
        logits = classify_logits(model, ClassificationCollate()(items))  # (N, C)
    finally:
        model.train(was_training)
    return torch.softmax(logits.float(), dim=-1)
