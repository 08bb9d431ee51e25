"""`fastgpt finetune-classify`: fine-tune GPT-2 as a text classifier (spam by default).

fastgpt finetune-classify --init gpt2 --out runs/spam                 # the book's chapter 6
fastgpt finetune-classify --init gpt2 --out runs/spam --lora-rank 16 --lora-alpha 16 --merge
fastgpt finetune-classify --data reviews.csv --text-column body --label-column stars ...
fastgpt classify --model runs/spam "You won a free cruise!"

Steps: read and validate the data (before any weights are touched), balance the classes by
undersampling, split 70/10/20 with --seed, build the model (--init weights or a fresh
--model; adapters an --init folder holds unmerged are folded in), swap its output head for
Linear(emb_dim, num_classes) (a classifier given as --init with the same labels keeps its
head), freeze all but --trainable (or add LoRA adapters), train with the shared training
engine, report loss and accuracy on train/validation/test, and save the model, labels.json,
classifier.json and metrics.json in --out. Under torchrun every rank trains and rank 0 alone
evaluates and writes.
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

from fastgpt.cli import command_error

fail = functools.partial(command_error, "finetune-classify")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fastgpt.engine import add_training_arguments
    from fastgpt.lora import add_lora_arguments

    add_training_arguments(parser, default_epochs=5)
    # The book's chapter 6 settings (5 epochs, batch 8, AdamW lr 5e-5, weight decay 0.1).
    parser.set_defaults(batch_size=8, lr=5e-5)
    group = parser.add_argument_group("classification")
    group.add_argument(
        "--text-column", default="text", help="text column of a .csv/.tsv --data (default text)"
    )
    group.add_argument(
        "--label-column", default="label", help="label column of a .csv/.tsv --data (default label)"
    )
    group.add_argument(
        "--labels",
        default=None,
        help="comma-separated label names in id order; other labels are an error (default: "
        "ham,spam for the SMS file, the sorted labels found for a table)",
    )
    group.add_argument(
        "--no-balance",
        action="store_true",
        help="keep every example (default: undersample each class to the smallest's size)",
    )
    group.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="pad/truncate to this many tokens (default: the longest training text, at most "
        "the model's context length)",
    )
    group.add_argument(
        "--trainable",
        default="last-1",
        help="what to train without LoRA: all, head, or last-N (N last blocks + final norm + "
        "head; default last-1)",
    )
    add_lora_arguments(parser)


def prepare_data(args: argparse.Namespace):
    """Read, validate, balance and split the data: (train, val, test) LabeledTexts.
    Raises ValueError / FileNotFoundError; touches no weights and writes nothing."""
    from fastgpt.classification import (
        balance_by_undersampling,
        read_labeled_texts,
        split_train_val_test,
    )
    from fastgpt.download import data_file

    path = data_file(args.data, "SMSSpamCollection")
    label_names = [s.strip() for s in args.labels.split(",")] if args.labels else None
    if label_names is not None and (
        len(label_names) < 2 or len(set(label_names)) != len(label_names)
    ):
        raise ValueError(f"--labels needs at least 2 distinct names, got {args.labels!r}")
    data = read_labeled_texts(path, args.text_column, args.label_column, label_names)
    if not args.no_balance:
        data = balance_by_undersampling(data, seed=args.seed)
    return split_train_val_test(data, (0.7, 0.1, 0.2), seed=args.seed)


def run(args: argparse.Namespace) -> int:
    from fastgpt.engine import is_main_process, train_config_from_args
    from fastgpt.lora import check_lora_arguments

    try:
        check_lora_arguments(args)
        if args.max_length is not None and args.max_length < 1:
            raise ValueError(f"--max-length must be >= 1, got {args.max_length}")
        config = train_config_from_args(args)
        train_texts, val_texts, test_texts = prepare_data(args)
    except (ValueError, FileNotFoundError) as exc:
        return fail(exc)
    if is_main_process():
        print(
            f"data: {len(train_texts)} train, {len(val_texts)} validation, "
            f"{len(test_texts)} test; labels {train_texts.label_names}"
        )
    return _train(args, config, train_texts, val_texts, test_texts)


def _train(args, config, train_texts, val_texts, test_texts) -> int:
    import torch

    from fastgpt.classification import (
        ClassificationCollate,
        ClassificationDataset,
        accuracy_metrics,
        classification_loss,
        evaluate_classifier,
        parse_trainable,
        replace_head,
        save_classifier_metadata,
        saved_label_names,
        set_trainable,
    )
    from fastgpt.engine import NonFiniteLossError, Trainer, build_model_from_args, is_main_process
    from fastgpt.lora import (
        apply_lora_from_args,
        describe_parameters,
        save_pretrained_with_lora,
    )
    from fastgpt.tokenizer import EOT_ID, get_tokenizer

    main = is_main_process()
    label_names = train_texts.label_names
    try:
        model = build_model_from_args(args)
        parse_trainable(args.trainable, len(model.trf_blocks))
        context = model.config.context_length
        if args.max_length is not None and args.max_length > context:
            raise ValueError(f"--max-length {args.max_length} > the model's context {context}")
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        return fail(exc)
    limit = args.max_length or context
    tokenizer = get_tokenizer()
    train_set = ClassificationDataset(train_texts, tokenizer, max_length=limit)
    val_set = ClassificationDataset(val_texts, tokenizer, max_length=limit)
    test_set = ClassificationDataset(test_texts, tokenizer, max_length=limit)
    # The book pads everything to the longest training text; longer val/test texts are cut.
    pad_to = limit if args.max_length else train_set.longest

    # A classifier given as --init keeps its trained head when it has the same labels.
    keep_head = bool(args.init) and saved_label_names(args.init) == label_names
    if not keep_head:
        replace_head(model, len(label_names))
    if args.lora_rank:
        apply_lora_from_args(model, args)
        if not args.lora_head:
            model.out_head.requires_grad_(True)  # the new head must learn
    else:
        set_trainable(model, args.trainable)
    if main:
        print(f"sequences padded/truncated to {pad_to} tokens")
        if keep_head:
            print(f"keeping the classifier head of {args.init} (labels {label_names})")
        print(describe_parameters(model))

    collate = ClassificationCollate(pad_to=pad_to)
    try:
        trainer = Trainer(
            model,
            train_set,
            val_set,
            classification_loss,
            config,
            collate_fn=collate,
            metrics_fn=accuracy_metrics,
        )
        trainer.fit()
    except (ValueError, FileNotFoundError) as exc:
        return fail(exc)
    except NonFiniteLossError as exc:
        return fail(exc, code=1)
    if not main:  # rank 0 alone evaluates and writes; the process group is gone by now
        return 0

    metrics = {}
    for name, dataset in (("train", train_set), ("validation", val_set), ("test", test_set)):
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=config.batch_size, collate_fn=collate
        )
        metrics[name] = evaluate_classifier(model, loader)
        print(
            f"{name:>10}: loss {metrics[name]['loss']:.4f}  "
            f"accuracy {100 * metrics[name]['accuracy']:.2f}%"
        )

    out = Path(config.out_dir)
    save_pretrained_with_lora(model, out, merge=args.merge)
    info = {
        "task": "classification",
        "num_classes": len(label_names),
        "max_length": pad_to,
        "pad_id": EOT_ID,
        "text_column": args.text_column,
        "label_column": args.label_column,
        "trainable": None if args.lora_rank else args.trainable,
        "lora": {"rank": args.lora_rank, "alpha": args.lora_alpha, "merged": bool(args.merge)}
        if args.lora_rank
        else None,
    }
    save_classifier_metadata(out, label_names, info)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    print(f"saved the classifier to {out}")
    return 0
