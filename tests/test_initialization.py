"""fastgpt.initialization: the book's default initialization, bit for bit, and chapter 5's
first evaluation.

The reference is a small, faithful copy of the book's chapter-4 model classes (below, as a
test fixture): built with torch.manual_seed(s), its parameters must equal ours after
init_book_weights_ from the same seed, and both must compute the same logits.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from torch import nn

from fastgpt.initialization import init_book_weights_
from fastgpt.losses import next_token_loss
from fastgpt.model import GPTModel
from fastgpt.model_config import GPTConfig
from fastgpt.text_data import SlidingWindowDataset
from fastgpt.tokenizer import get_tokenizer
from fastgpt.train import TrainConfig, Trainer, evaluate_loss

# --- the book's GPTModel (chapter 4), as the reference ---------------------------------


class BookMultiHeadAttention(nn.Module):
    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        self.d_out, self.num_heads, self.head_dim = d_out, num_heads, d_out // num_heads
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        mask = torch.triu(torch.ones(context_length, context_length), diagonal=1)
        self.register_buffer("mask", mask)

    def forward(self, x):
        b, t, _ = x.shape

        def heads(y):  # (B, T, d_out) -> (B, H, T, hd)
            return y.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.W_query(x)), heads(self.W_key(x)), heads(self.W_value(x))
        scores = (q @ k.transpose(2, 3)).masked_fill(self.mask.bool()[:t, :t], -torch.inf)
        weights = self.dropout(torch.softmax(scores / k.shape[-1] ** 0.5, dim=-1))
        ctx = (weights @ v).transpose(1, 2).reshape(b, t, self.d_out)
        return self.out_proj(ctx)


class BookLayerNorm(nn.Module):
    def __init__(self, emb_dim):
        super().__init__()
        self.eps = 1e-5
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x):
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        return self.scale * (x - mean) / torch.sqrt(var + self.eps) + self.shift


class BookGELU(nn.Module):
    def forward(self, x):
        c = torch.sqrt(torch.tensor(2.0 / torch.pi))
        return 0.5 * x * (1 + torch.tanh(c * (x + 0.044715 * torch.pow(x, 3))))


class BookFeedForward(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d = cfg["emb_dim"]
        self.layers = nn.Sequential(nn.Linear(d, 4 * d), BookGELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        return self.layers(x)


class BookTransformerBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.att = BookMultiHeadAttention(
            cfg["emb_dim"],
            cfg["emb_dim"],
            cfg["context_length"],
            cfg["drop_rate"],
            cfg["n_heads"],
            cfg["qkv_bias"],
        )
        self.ff = BookFeedForward(cfg)
        self.norm1 = BookLayerNorm(cfg["emb_dim"])
        self.norm2 = BookLayerNorm(cfg["emb_dim"])
        self.drop_shortcut = nn.Dropout(cfg["drop_rate"])

    def forward(self, x):
        x = x + self.drop_shortcut(self.att(self.norm1(x)))
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


class BookGPTModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.drop_emb = nn.Dropout(cfg["drop_rate"])
        self.trf_blocks = nn.Sequential(
            *[BookTransformerBlock(cfg) for _ in range(cfg["n_layers"])]
        )
        self.final_norm = BookLayerNorm(cfg["emb_dim"])
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)

    def forward(self, in_idx):
        t = in_idx.shape[1]
        x = self.tok_emb(in_idx) + self.pos_emb(torch.arange(t, device=in_idx.device))
        x = self.trf_blocks(self.drop_emb(x))
        return self.out_head(self.final_norm(x))


# --- helpers ---------------------------------------------------------------------------


def _configs(qkv_bias: bool) -> tuple[dict, GPTConfig]:
    book = dict(
        vocab_size=97,
        context_length=16,
        emb_dim=24,
        n_heads=4,
        n_layers=3,
        drop_rate=0.1,
        qkv_bias=qkv_bias,
    )
    ours = GPTConfig(**book, tie_embeddings=False)
    return book, ours


def _book_state_as_ours(book: BookGPTModel) -> dict[str, torch.Tensor]:
    """The book model's parameters under our names (fused qkv rows [q | k | v])."""
    sd = book.state_dict()
    out = {
        "tok_emb.weight": sd["tok_emb.weight"],
        "pos_emb.weight": sd["pos_emb.weight"],
        "final_norm.weight": sd["final_norm.scale"],
        "final_norm.bias": sd["final_norm.shift"],
        "out_head.weight": sd["out_head.weight"],
    }
    for i in range(len(book.trf_blocks)):
        b, o = f"trf_blocks.{i}.", f"trf_blocks.{i}."
        qkv = [sd[f"{b}att.W_{n}.weight"] for n in ("query", "key", "value")]
        out[o + "att.qkv.weight"] = torch.cat(qkv)
        if f"{b}att.W_query.bias" in sd:
            out[o + "att.qkv.bias"] = torch.cat(
                [sd[f"{b}att.W_{n}.bias"] for n in ("query", "key", "value")]
            )
        for ours, theirs in (
            ("att.out_proj", "att.out_proj"),
            ("ff.fc1", "ff.layers.0"),
            ("ff.fc2", "ff.layers.2"),
        ):
            out[f"{o}{ours}.weight"] = sd[f"{b}{theirs}.weight"]
            out[f"{o}{ours}.bias"] = sd[f"{b}{theirs}.bias"]
        for n in ("norm1", "norm2"):
            out[f"{o}{n}.weight"] = sd[f"{b}{n}.scale"]
            out[f"{o}{n}.bias"] = sd[f"{b}{n}.shift"]
    return out


# --- bit-for-bit against the book's model -----------------------------------------------


@pytest.mark.parametrize("qkv_bias", [False, True])
@pytest.mark.parametrize("seed", [123, 7])
def test_book_init_matches_the_books_model_bit_for_bit(qkv_bias, seed):
    book_cfg, cfg = _configs(qkv_bias)
    torch.manual_seed(seed)
    book = BookGPTModel(book_cfg)
    after_book = torch.get_rng_state()

    ours = GPTModel(cfg, backend="torch")  # GPT-2 init first: must be fully overwritten
    torch.manual_seed(seed)
    init_book_weights_(ours)  # global RNG, as the book's constructor
    # The global RNG ends where the book's does (data order and dropout follow from it).
    assert torch.equal(torch.get_rng_state(), after_book)

    expected = _book_state_as_ours(book)
    got = dict(ours.named_parameters())
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        assert torch.equal(got[name], value), name

    # The same stream from a seed alone, without touching the global RNG.
    again = GPTModel(cfg, backend="torch")
    torch.manual_seed(999)
    state = torch.get_rng_state()
    init_book_weights_(again, seed=seed)
    assert torch.equal(torch.get_rng_state(), state)
    for name, p in again.named_parameters():
        assert torch.equal(p, expected[name]), name

    # Same parameters, same function: the logits agree (eval mode, no dropout).
    book.eval()
    ours.eval()
    ids = torch.randint(0, cfg.vocab_size, (2, cfg.context_length))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), book(ids), atol=2e-6, rtol=0)


def test_book_init_differs_from_gpt2_init_and_between_seeds():
    _, cfg = _configs(False)
    a = init_book_weights_(GPTModel(cfg, backend="torch"), seed=1)
    b = init_book_weights_(GPTModel(cfg, backend="torch"), seed=2)
    assert not torch.equal(a.tok_emb.weight, b.tok_emb.weight)
    assert a.tok_emb.weight.std() > 0.9  # N(0, 1), not GPT-2's N(0, 0.02)
    bound = 1 / cfg.emb_dim**0.5
    w = a.trf_blocks[0].att.qkv.weight
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound  # U(±1/√d)
    assert a.trf_blocks[0].att.out_proj.bias.abs().max() > 0  # biases are drawn, not zero


def test_book_init_rejects_a_tied_head(tmp_path, tiktoken_available, capsys):
    cfg = GPTConfig.from_name("tiny")  # tied
    with pytest.raises(ValueError, match=r"untied.*tie_embeddings=False"):
        init_book_weights_(GPTModel(cfg, backend="torch"), seed=1)
    # The command line names the flag that gives an untied model, not a Python argument.
    from fastgpt.cli import main

    data = tmp_path / "story.txt"
    data.write_text("Once upon a time there was a model. " * 40, encoding="utf-8")
    code = main(["pretrain", "--data", str(data), "--model", "tiny", "--weight-init", "book",
                 "--context-length", "16", "--no-progress",
                 "--out", str(tmp_path / "run")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "--model gpt2-small-book" in err and len(err.strip().splitlines()) == 1


def test_book_init_rejects_seed_and_generator_together():
    _, cfg = _configs(False)
    with pytest.raises(ValueError, match="not both"):
        init_book_weights_(GPTModel(cfg), seed=1, generator=torch.Generator())


# --- chapter 5: the first evaluation of the 124M model ----------------------------------

BOOK_FIRST_EVAL = (9.781, 9.933)  # train / val loss after the first optimizer step


def test_chapter5_first_evaluation_matches_the_book(data_dir, tiktoken_available, tmp_path):
    """One step of the book's GPT_CONFIG_124M (context 256, no qkv bias, untied head, dropout
    0.1) on the-verdict.txt with fastgpt's Trainer (AdamW lr 4e-4, weight decay 0.1, batch 2,
    no clipping), then the book's evaluate_model: eval-mode loss over 5 train batches and the
    validation batches. The book prints 9.781 / 9.933 at its step 0 (after one step)."""
    started = time.perf_counter()
    # The book's data: 90/10 split of the characters, each part tokenized, windows of 256.
    text = (data_dir / "the-verdict.txt").read_text(encoding="utf-8")
    cut = int(0.9 * len(text))
    tok = get_tokenizer()
    train = SlidingWindowDataset(np.array(tok.encode(text[:cut])), 256)
    val = SlidingWindowDataset(np.array(tok.encode(text[cut:])), 256)
    assert (len(train), len(val)) == (18, 2)  # the book's 9 training batches and 1 validation

    cfg = GPTConfig.from_name(
        "gpt2-small", context_length=256, qkv_bias=False, tie_embeddings=False
    )
    with torch.device("meta"):  # skip GPT-2's init: every parameter is drawn below
        model = GPTModel(cfg, backend="torch")
    init_book_weights_(model.to_empty(device="cpu"), seed=123)
    assert sum(p.numel() for p in model.parameters()) == 162_419_712  # the book's 163M

    config = TrainConfig(
        out_dir=str(tmp_path),
        max_steps=1,
        batch_size=2,
        lr=4e-4,
        warmup_steps=0,
        min_lr=4e-4,
        grad_clip=0.0,
        weight_decay=0.1,
        eval_every=0,
        eval_batches=1,
        save_checkpoint=False,
        plot=False,
        progress=False,
        device="cpu",
    )
    Trainer(model, train, None, next_token_loss, config).fit()
    loader = lambda data: torch.utils.data.DataLoader(data, batch_size=2)
    with torch.no_grad():
        train_loss = evaluate_loss(model, loader(train), next_token_loss, 5)
        val_loss = evaluate_loss(model, loader(val), next_token_loss, 5)
    elapsed = time.perf_counter() - started
    print(f"first evaluation: train {train_loss:.3f}, val {val_loss:.3f} ({elapsed:.1f} s)")
    assert train_loss == pytest.approx(BOOK_FIRST_EVAL[0], rel=0.02)
    assert val_loss == pytest.approx(BOOK_FIRST_EVAL[1], rel=0.02)
