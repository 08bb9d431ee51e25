"""Data pipeline benchmark: preparing a corpus, and the pretraining loader that reads it.

    python benchmarks/data_bench.py                    # ~50 MB corpus, 1 worker vs all cores
    python benchmarks/data_bench.py --mb 10 --batches 200 --json data.json

1. Preparing: a generated ~50 MB .jsonl corpus (documents of 1-5 kB of English-like text drawn
   from the-verdict.txt's words when FASTGPT_DATA_DIR holds it, else from a built-in list) is
   tokenized by `fastgpt.corpus.prepare_corpus` into a fresh folder, once with 1 worker (in
   this process) and once with every core. tokens/s = tokens written / the whole call's wall
   time (counting documents, reading, tokenizing, writing shards and manifest).
2. Loading: the pretraining data path at gpt2-small shapes: `load_text_datasets(folder, 1024)`
   over the prepared shards (memory-mapped), batches of 16 windows drawn in the trainer's
   random order by `fastgpt.train.batches.BatchOrder` (its DataLoader, default collate, no
   worker processes, as `fastgpt pretrain` runs by default). batches/s and tokens/s = 16 · 1024
   tokens per batch / time per batch.

The load average (os.getloadavg) is printed before and after: on a shared machine with a load
far above its core count, the speedup of more workers is not trustworthy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fastgpt.corpus import CorpusOptions, prepare_corpus
from fastgpt.text_data import load_text_datasets
from fastgpt.train.batches import BatchOrder

FALLBACK_TEXT = (
    "the of and to a in that it was he his for with as had you not be her on at by which I "
    "have or from this him but all she they were my are me one their so an said them we who "
    "would been will no when there if more out up into do any your what has man could other "
    "than our some very time upon about may its only now like little then can should made did "
    "us such great before must two these see know over much down after first Mr. good men"
)


def words() -> list[str]:
    data = os.environ.get("FASTGPT_DATA_DIR")
    story = Path(data, "the-verdict.txt") if data else None
    if story and story.is_file():
        return story.read_text(encoding="utf-8").split()
    return FALLBACK_TEXT.split()


def generate_corpus(path: Path, megabytes: float, seed: int = 0) -> int:
    """A .jsonl file of about `megabytes` MB; returns its document count."""
    rng, vocab = random.Random(seed), words()
    target, size, docs = int(megabytes * 1e6), 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while size < target:
            paragraphs = []
            for _ in range(rng.randint(2, 8)):
                paragraphs.append(" ".join(rng.choices(vocab, k=rng.randint(30, 150))))
            line = json.dumps({"id": docs, "text": "\n\n".join(paragraphs)}) + "\n"
            f.write(line)
            size, docs = size + len(line), docs + 1
    return docs


def time_prepare(corpus: Path, out: Path, workers: int) -> dict:
    start = time.perf_counter()
    result = prepare_corpus(corpus, out, CorpusOptions(workers=workers), progress=False)
    seconds = time.perf_counter() - start
    tokens = sum(result.manifest["splits"][s]["tokens"] for s in ("train", "val"))
    return {
        "workers": workers,
        "seconds": seconds,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
    }


def time_loader(folder: Path, batch: int, context: int, batches: int) -> dict:
    train, _ = load_text_datasets(folder, context)
    order = BatchOrder(train, batch_size=batch, grad_accum=1, world_size=1, rank=0, seed=0)
    steps = order.steps(collate_fn=None)
    next(steps)  # the loader is built; the first batch read
    start = time.perf_counter()
    for _ in range(batches):
        ((inputs, _),) = next(steps)
        assert inputs.shape == (batch, context)
    seconds = time.perf_counter() - start
    tokens_per_s = batches * batch * context / seconds
    return {"batch": batch, "context": context, "batches": batches,
            "batches_per_s": batches / seconds, "tokens_per_s": tokens_per_s}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=50, help="corpus size in MB (default 50)")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                        help="workers of the parallel run (default: the cores)")  # fmt: skip
    parser.add_argument("--batches", type=int, default=500, help="loader batches timed")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="data-bench-") as tmp:
        corpus = Path(tmp, "corpus.jsonl")
        docs = generate_corpus(corpus, args.mb)
        mb = corpus.stat().st_size / 1e6
        load = " ".join(f"{x:.2f}" for x in load_before)
        print(f"corpus: {mb:.1f} MB, {docs:,} documents; {os.cpu_count()} cores, load {load}")
        one = time_prepare(corpus, Path(tmp, "one"), 1)
        many = time_prepare(corpus, Path(tmp, "many"), args.workers)
        speedup = many["tokens_per_s"] / one["tokens_per_s"]
        for r in (one, many):
            print(f"prepare, {r['workers']} worker(s): {r['tokens']:,} tokens in "
                  f"{r['seconds']:.2f} s = {r['tokens_per_s']:,.0f} tokens/s "
                  f"({mb / r['seconds']:.2f} MB/s)")  # fmt: skip
        print(f"speedup {args.workers} workers / 1: {speedup:.2f}x")
        loader = time_loader(Path(tmp, "many"), 16, 1024, args.batches)
    load_after = os.getloadavg()
    print(f"loader, batch 16 x 1024 (gpt2-small): {loader['batches_per_s']:,.1f} batches/s = "
          f"{loader['tokens_per_s']:,.0f} tokens/s")  # fmt: skip
    print(f"load average after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    if args.json:
        figures = {"machine": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                   "corpus_mb": mb, "documents": docs, "prepare": [one, many],
                   "speedup": speedup, "loader": loader, "load_before": load_before,
                   "load_after": load_after}  # fmt: skip
        args.json.write_text(json.dumps(figures, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
