"""`fastgpt classify`: label texts with a classifier saved by `fastgpt finetune-classify`.

fastgpt classify --model runs/spam "You won a free cruise! Reply WIN to claim"
    spam    0.9876    You won a free cruise! Reply WIN to claim

One line per text: the predicted label, its probability, and the text (tab-separated).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from fastgpt.devices import InferenceOptions
from fastgpt.errors import UsageError
from fastgpt.options import add_options, options_from_args


@dataclass
class ClassifyOptions:
    """Which classifier labels which texts (how the model runs is InferenceOptions)."""

    model: str
    """Folder written by `fastgpt finetune-classify --out`."""
    texts: list[str] = field(metadata={"positional": True, "nargs": "+", "metavar": "TEXT"})
    """Text(s) to classify."""
    all_probs: bool = False
    """Also print every label's probability."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, ClassifyOptions)
    add_options(parser, InferenceOptions, "how the model runs")


def run(args: argparse.Namespace) -> int:
    from fastgpt.classification import classify_texts, load_classifier_metadata
    from fastgpt.model import GPTModel
    from fastgpt.tokenizer import get_tokenizer

    options = options_from_args(ClassifyOptions, args)
    inference = options_from_args(InferenceOptions, args)
    device, dtype = inference.resolve()
    try:
        label_names, info = load_classifier_metadata(options.model)
        model = GPTModel.from_pretrained(
            options.model, backend=inference.backend, device=device, dtype=dtype
        )
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise UsageError(f"cannot load {options.model!r}: {exc}") from exc
    if model.out_head.out_features != len(label_names):
        raise UsageError(
            f"{options.model} has {model.out_head.out_features} outputs but "
            f"{len(label_names)} labels in labels.json"
        )
    probs = classify_texts(model, options.texts, get_tokenizer(), info.get("max_length"))  # (N, C)
    for text, row in zip(options.texts, probs.tolist(), strict=True):
        best = max(range(len(row)), key=row.__getitem__)
        line = f"{label_names[best]}\t{row[best]:.4f}\t{text}"
        if options.all_probs:
            line += "\t" + " ".join(f"{n}={p:.4f}" for n, p in zip(label_names, row, strict=True))
        print(line)
    return 0
