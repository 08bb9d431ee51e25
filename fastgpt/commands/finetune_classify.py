"""`fastgpt finetune-classify`: fine-tune GPT-2 as a text classifier (spam by default).

fastgpt finetune-classify --init gpt2 --out runs/spam                 # the book's chapter 6
fastgpt finetune-classify --init gpt2 --out runs/spam --lora-rank 16 --lora-alpha 16 --merge
fastgpt finetune-classify --data reviews.csv --text-column body --label-column stars ...
fastgpt classify --model runs/spam "You won a free cruise!"

Steps: read and validate the data (before any weights are touched), balance the classes by
undersampling, split 70/10/20 with --seed, build the model (--init weights or a fresh
--model; adapters an --init folder holds unmerged are folded in), swap its output head for
Linear(emb_dim, num_classes) (a classifier given as --init with the same labels keeps its
head), freeze all but --trainable (or add LoRA adapters), train with the shared runner, report
loss and accuracy on train/validation/test, and save the model, labels.json, classifier.json
and metrics.json in --out. Under torchrun every rank trains and rank 0 alone evaluates and
writes.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastgpt.download import data_file
from fastgpt.errors import ConfigError, UsageError
from fastgpt.train.distributed import is_main_process
from fastgpt.train.runner import Task, TrainingParts, add_task_arguments, check_vocabulary, run_task

if TYPE_CHECKING:
    from fastgpt.classification import ClassificationDataset, Splits


@dataclass
class ClassifyOptions:
    """What to classify and what to train."""

    data: str | None = field(default=None, metadata={"metavar": "FILE"})
    """Labelled texts: the UCI SMS file (label<TAB>text) or a .csv/.tsv with a header (default:
    the book's SMS Spam Collection, downloaded once)."""
    text_column: str = "text"
    """Text column of a .csv/.tsv --data."""
    label_column: str = "label"
    """Label column of a .csv/.tsv --data."""
    labels: str | None = None
    """Comma-separated label names in id order; other labels are an error (default: ham,spam
    for the SMS file, the sorted labels found for a table)."""
    no_balance: bool = False
    """Keep every example (default: undersample each class to the smallest's size)."""
    max_length: int | None = None
    """Pad/truncate to this many tokens (default: the longest training text, at most the
    model's context length)."""
    trainable: str = "last-1"
    """What to train without LoRA: all, head, or last-N (N last blocks + final norm + head)."""

    def __post_init__(self) -> None:
        if self.max_length is not None and self.max_length < 1:
            raise ConfigError("max_length", f"must be >= 1, got {self.max_length}")
        names = self.label_names
        if names is not None and (len(names) < 2 or len(set(names)) != len(names)):
            raise ConfigError("labels", f"needs at least 2 distinct names, got {self.labels!r}")

    @property
    def label_names(self) -> list[str] | None:
        return [s.strip() for s in self.labels.split(",")] if self.labels else None


@dataclass(kw_only=True)
class ClassifierParts(TrainingParts):
    """ClassifyTask's TrainingParts, with what `finish` evaluates and saves besides them."""

    test_set: ClassificationDataset
    pad_to: int
    """The length every sequence is padded or truncated to."""
    label_names: list[str]


# The book's chapter 6 settings: 5 epochs, batch 8, AdamW lr 5e-5, weight decay 0.1, no dropout.
class ClassifyTask(
    Task, name="finetune-classify", options=ClassifyOptions, uses_lora=True,
    defaults={"epochs": 5, "lr": 5e-5, "dropout": 0.0},
):  # fmt: skip
    """The book's chapter 6: a classifier head on GPT-2, trained on labelled texts."""

    def load_data(self) -> Splits:
        """Read, validate, balance and split the data (touches no weights, writes nothing):
        Splits(train, val, test) of LabeledTexts."""
        from fastgpt.classification import (
            balance_by_undersampling,
            read_labeled_texts,
            split_train_val_test,
        )

        opts, seed = self.options, self.config.seed
        path = data_file(opts.data, "SMSSpamCollection")
        data = read_labeled_texts(
            path,
            text_column=opts.text_column,
            label_column=opts.label_column,
            label_names=opts.label_names,
        )
        if not opts.no_balance:
            data = balance_by_undersampling(data, seed=seed)
        splits = split_train_val_test(data, (0.7, 0.1, 0.2), seed=seed)
        if not is_main_process():
            return splits
        label_names = splits.train.label_names
        print(
            f"data: {len(splits.train)} train, {len(splits.val)} validation, "
            f"{len(splits.test)} test; labels {label_names}"
        )
        present = sorted({label_names[i] for i in splits.train.labels})
        if len(present) < 2:
            print(
                f"fastgpt finetune-classify: warning: the training split holds one class only "
                f"({', '.join(present)}): the classifier cannot learn to tell classes apart "
                "(check the data and --label-column)",
                file=sys.stderr,
            )
        return splits

    def build(self, model, data: Splits) -> ClassifierParts:
        from fastgpt.classification import (
            ClassificationCollate,
            ClassificationDataset,
            accuracy_metrics,
            parse_trainable,
            replace_head,
            saved_label_names,
            set_trainable,
        )
        from fastgpt.tokenizer import EOT_ID, get_tokenizer

        opts, init = self.options, self.model_options.init
        parse_trainable(opts.trainable, len(model.trf_blocks))
        context = model.config.context_length
        if opts.max_length is not None and opts.max_length > context:
            raise UsageError(f"--max-length {opts.max_length} > the model's context {context}")
        check_vocabulary(model, EOT_ID)  # GPT-2 BPE ids, and <|endoftext|> pads: EOT_ID at most
        model.check_inputs = False  # checked once here: no range-check sync per batch
        limit, tokenizer = opts.max_length or context, get_tokenizer()
        train, val, test = (ClassificationDataset(d, tokenizer, max_length=limit) for d in data)
        # The book pads everything to the longest training text; longer val/test texts are cut.
        pad_to = limit if opts.max_length else train.longest
        label_names = data.train.label_names
        # A classifier given as --init keeps its trained head when it has the same labels.
        keep_head = bool(init) and saved_label_names(init) == label_names
        if not keep_head:
            replace_head(model, len(label_names))
        if self.lora.lora_rank:
            self.lora.apply(model)
            if not self.lora.lora_head:
                model.out_head.requires_grad_(True)  # the new head must learn
        else:
            set_trainable(model, opts.trainable)
        if is_main_process():
            print(f"sequences padded/truncated to {pad_to} tokens")
            if keep_head:
                print(f"keeping the classifier head of {init} (labels {label_names})")
        return ClassifierParts(
            train, val, ClassificationCollate(pad_to=pad_to), accuracy_metrics,
            test_set=test, pad_to=pad_to, label_names=label_names,
        )  # fmt: skip

    def loss(self, model, batch):
        from fastgpt.classification import classification_loss

        return classification_loss(model, batch)

    def finish(self, model, parts: ClassifierParts, out_dir: Path, final: dict[str, Any]) -> None:
        import torch

        from fastgpt.classification import evaluate_classifier, save_classifier_metadata
        from fastgpt.lora import save_pretrained_with_lora
        from fastgpt.tokenizer import EOT_ID

        metrics = {}
        splits = {"train": parts.train_set, "validation": parts.val_set, "test": parts.test_set}
        for split, dataset in splits.items():
            loader = torch.utils.data.DataLoader(
                dataset, batch_size=self.config.batch_size, collate_fn=parts.collate_fn
            )
            metrics[split] = evaluate_classifier(model, loader)
            loss, accuracy = metrics[split]["loss"], 100 * metrics[split]["accuracy"]
            print(f"{split:>10}: loss {loss:.4f}  accuracy {accuracy:.2f}%")
        lora = self.lora
        save_pretrained_with_lora(model, out_dir, merge=lora.merge)
        info = {
            "task": "classification",
            "num_classes": len(parts.label_names),
            "max_length": parts.pad_to,
            "pad_id": EOT_ID,
            "text_column": self.options.text_column,
            "label_column": self.options.label_column,
            "trainable": None if lora.lora_rank else self.options.trainable,
            "lora": {"rank": lora.lora_rank, "alpha": lora.lora_alpha, "merged": lora.merge}
            if lora.lora_rank
            else None,
        }
        save_classifier_metadata(out_dir, parts.label_names, info)
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", "utf-8")
        print(f"saved the classifier to {out_dir}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_task_arguments(parser, ClassifyTask)


def run(args: argparse.Namespace) -> int:
    return run_task(ClassifyTask, args)
