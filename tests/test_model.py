"""GPTConfig presets, GPTModel shapes, init, input checks, backends and the KV cache."""

import json
import math

import pytest
import torch
from fastgpt.kernels import attention_reference
from torch import nn

from fastgpt.backends import BACKENDS
from fastgpt.model import GPTModel, KVCache, MultiHeadAttention, count_parameters, flops_per_token
from fastgpt.model_config import GPTConfig
from tests.tolerance import assert_close_to_reference


def tiny_config(**overrides) -> GPTConfig:
    # vocab 97 and context 32 keep the interpreter runs of the triton backend fast
    fields = dict(vocab_size=97, context_length=32, emb_dim=32, n_heads=4, n_layers=2)
    return GPTConfig(**{**fields, "drop_rate": 0.0, **overrides})


def tiny_model(backend="torch", seed=0, **overrides) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(tiny_config(**overrides), backend=backend).eval()


# --- config ------------------------------------------------------------------------------


# Published GPT-2 sizes (tied head counted once).
@pytest.mark.parametrize(
    "name, n_params",
    [
        ("gpt2-small", 124_439_808),
        ("gpt2-medium", 354_823_168),
        ("gpt2-large", 774_030_080),
        ("gpt2-xl", 1_557_611_200),
    ],
)
def test_preset_parameter_counts(name, n_params):
    config = GPTConfig.from_name(name)
    assert config.vocab_size == 50257 and config.context_length == 1024
    assert config.qkv_bias and config.tie_embeddings
    assert count_parameters(config) == n_params
    with torch.device("meta"):  # the real module, without allocating its weights
        model = GPTModel(config, backend="torch")
    assert model.num_parameters() == n_params
    assert model.num_parameters(non_embedding=True) == n_params - 1024 * config.emb_dim


def test_preset_aliases_and_overrides():
    assert GPTConfig.from_name("gpt2") == GPTConfig.from_name("gpt2-small")
    assert GPTConfig.from_name("GPT2-XL") == GPTConfig.from_name("gpt2-xl")
    assert GPTConfig.from_name("124M") == GPTConfig.from_name("gpt2-small")
    assert GPTConfig.from_name("gpt2", drop_rate=0.0).drop_rate == 0.0
    tiny = GPTConfig.from_name("tiny")
    assert tiny.n_layers == 2 and tiny.context_length == 64
    with pytest.raises(ValueError, match="unknown model preset 'gpt3'"):
        GPTConfig.from_name("gpt3")


def test_config_json_errors_name_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"emb_dim": 32,\n "n_heads": }', encoding="utf-8")
    with pytest.raises(ValueError, match=r"config.json:2:13: malformed JSON"):
        GPTConfig.from_json(path)
    path.write_text('{"emb_dim": 30, "n_heads": 4}', encoding="utf-8")
    with pytest.raises(
        ValueError, match=r"config.json: GPTConfig.emb_dim \(30\) must be a multiple"
    ):
        GPTConfig.from_json(path)
    path.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ValueError, match="expected a JSON object"):
        GPTConfig.from_json(path)


def test_config_round_trips(tmp_path):
    config = tiny_config(qkv_bias=False, tie_embeddings=False)
    assert GPTConfig.from_dict(config.to_dict()) == config
    assert GPTConfig.from_dict({**config.to_dict(), "format": "fastgpt"}) == config
    config.to_json(tmp_path / "c.json")
    assert GPTConfig.from_json(tmp_path / "c.json") == config
    hf = {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 32, "vocab_size": 97}
    (tmp_path / "hf.json").write_text(json.dumps(hf))
    assert GPTConfig.from_json(tmp_path / "hf.json") == tiny_config(drop_rate=0.1, qkv_bias=True)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(emb_dim=30), "multiple of n_heads"),
        (dict(n_layers=0), "n_layers must be a positive int"),
        (dict(drop_rate=1.0), "drop_rate"),
    ],
)
def test_config_rejects_bad_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


# --- model structure and init ------------------------------------------------------------


def test_forward_shapes_and_structure():
    model = tiny_model()
    logits = model(torch.randint(0, 97, (3, 17)))
    assert logits.shape == (3, 17, 97) and logits.dtype == torch.float32
    assert model.out_head.weight is model.tok_emb.weight
    assert len(model.trf_blocks) == 2
    block = model.trf_blocks[0]
    assert isinstance(block.att, MultiHeadAttention)
    assert [n for n, _ in block.named_parameters()] == [
        "norm1.weight", "norm1.bias", "att.qkv.weight", "att.qkv.bias", "att.out_proj.weight",
        "att.out_proj.bias", "norm2.weight", "norm2.bias", "ff.fc1.weight", "ff.fc1.bias",
        "ff.fc2.weight", "ff.fc2.bias",
    ]  # fmt: skip
    assert block.att.qkv.weight.shape == (96, 32) and block.att.qkv.bias is not None
    assert block.ff.fc1.weight.shape == (128, 32) and block.ff.fc2.weight.shape == (32, 128)
    assert model.num_parameters() == count_parameters(model.config)
    untied = tiny_model(tie_embeddings=False, qkv_bias=False)
    assert untied.out_head.weight is not untied.tok_emb.weight
    assert untied.trf_blocks[0].att.qkv.bias is None
    assert untied.num_parameters() == count_parameters(untied.config)
    assert untied.num_parameters(non_embedding=True) == count_parameters(
        untied.config, non_embedding=True
    )


def test_gpt2_init():
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=500, context_length=64, emb_dim=256, n_heads=4, n_layers=8)
    model = GPTModel(config, backend="torch")
    block = model.trf_blocks[3]
    assert abs(model.tok_emb.weight.std().item() - 0.02) < 1e-3
    assert abs(model.pos_emb.weight.std().item() - 0.02) < 1e-3
    assert abs(block.att.qkv.weight.std().item() - 0.02) < 1e-3
    assert abs(block.ff.fc1.weight.std().item() - 0.02) < 1e-3
    residual_std = 0.02 / math.sqrt(2 * 8)
    assert abs(block.att.out_proj.weight.std().item() - residual_std) < 3e-4
    assert abs(block.ff.fc2.weight.std().item() - residual_std) < 3e-4
    for bias in (block.att.qkv.bias, block.att.out_proj.bias, block.ff.fc1.bias):
        assert torch.count_nonzero(bias) == 0
    assert torch.all(block.norm1.weight == 1) and torch.all(block.norm1.bias == 0)


def test_flops_per_token():
    config = GPTConfig.from_name("gpt2-small")
    n = count_parameters(config, non_embedding=True)
    assert n == 124_439_808 - 1024 * 768
    assert flops_per_token(config, 1024) == 6 * n + 12 * 12 * 1024 * 768
    assert flops_per_token(config) == flops_per_token(config, 1024)


def test_out_head_is_replaceable():
    model = tiny_model()
    model.out_head = nn.Linear(32, 2)
    assert model(torch.randint(0, 97, (2, 5))).shape == (2, 5, 2)


def test_dropout_only_in_training():
    model = tiny_model(drop_rate=0.5)
    x = torch.randint(0, 97, (2, 9))
    torch.testing.assert_close(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))


# --- input checks ------------------------------------------------------------------------


def test_rejects_bad_token_ids():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"token id 97 at position \(batch 1, index 2\)"):
        model(torch.tensor([[1, 2, 3], [4, 5, 97]]))
    with pytest.raises(ValueError, match=r"token id -1 at position \(batch 0, index 0\)"):
        model(torch.tensor([[-1, 2, 3]]))
    with pytest.raises(TypeError, match="integer tensor"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="sequence too long: 33 tokens > context_length 32"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        model(torch.zeros(0, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(batch, seq_len\)"):
        model(torch.zeros(4, dtype=torch.long))
    # int32 ids are fine, and a model whose checks are off skips the range check
    assert model(torch.tensor([[1, 96]], dtype=torch.int32)).shape == (1, 2, 97)
    model.check_inputs = False
    assert model(torch.tensor([[1, 50]])).shape == (1, 2, 97)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_logits_at_is_the_full_logits_at_one_position_per_row(backend):
    model = tiny_model(backend=backend)
    x = torch.randint(0, 97, (3, 17))
    at = torch.tensor([16, 0, 9])
    full = model(x)  # (3, 17, V)
    picked = model(x, logits_at=at)  # (3, V): the head ran on 3 rows, not 51
    assert picked.shape == (3, 97)
    rows = torch.arange(3)
    reference64 = tiny_model(backend="torch").double()(x)[rows, at]
    # the same function: only the head's matmul has fewer rows
    assert_close_to_reference(picked, full[rows, at], reference64, dtype=torch.float32)
    cache = model.new_kv_cache()  # with a cache too (generation's prefill)
    torch.testing.assert_close(model(x, kv_cache=cache, logits_at=at), picked)
    assert cache.length == 17


def test_logits_at_rejects_bad_positions():
    model = tiny_model()
    x = torch.randint(0, 97, (2, 5))
    with pytest.raises(ValueError, match=r"logits_at must be a \(2,\) tensor.*got \(3,\)"):
        model(x, logits_at=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"must be a \(2,\) tensor.*got 4"):
        model(x, logits_at=4)
    with pytest.raises(TypeError, match=r"logits_at must be an integer tensor, got torch\.float32"):
        model(x, logits_at=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"logits_at must lie in \[0, 5\).*got 0\.\.5"):
        model(x, logits_at=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match=r"got -1\.\.3"):
        model(x, logits_at=torch.tensor([3, -1]))
    with pytest.raises(ValueError, match="cannot be combined with targets"):
        model(x, targets=x, logits_at=torch.tensor([0, 1]))


# --- backends ----------------------------------------------------------------------------


def test_backend_resolution():
    assert tiny_model(backend="torch").backend == "torch"
    auto = GPTModel(tiny_config(), backend="auto")
    assert auto.backend == ("triton" if torch.cuda.is_available() else "sdpa")
    with pytest.raises(ValueError, match="backend must be one of"):
        GPTModel(tiny_config(), backend="cuda")
    model = tiny_model(backend="torch").set_backend("triton")
    assert model.trf_blocks[1].att.ops.name == "triton" and model.backend == "triton"
    assert model.final_norm.ops.name == "triton"


@pytest.mark.parametrize(
    ("capability", "name"), [((7, 5), "triton+sdpa"), ((8, 0), "triton"), ((9, 0), "triton")]
)
def test_auto_backend_on_a_gpu_follows_its_compute_capability(monkeypatch, capability, name):
    # Below sm_80 (a T4) Triton's dots are FMA loops and the attention kernels refuse: "auto"
    # keeps our LayerNorm, GELU and fused loss there (no dots) with PyTorch's attention.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    model = GPTModel(tiny_config(), backend="auto")
    assert model.backend == name
    ops, triton_ops, sdpa = model.trf_blocks[0].att.ops, BACKENDS["triton"], BACKENDS["sdpa"]
    attention_from = sdpa if name == "triton+sdpa" else triton_ops
    assert ops.attention is attention_from.attention
    assert ops.attention_varlen is attention_from.attention_varlen
    assert ops.decode_attention is attention_from.decode_attention
    for row_wise in ("layer_norm", "add_layer_norm", "linear_gelu", "head_loss"):
        assert getattr(ops, row_wise) is getattr(triton_ops, row_wise), row_wise


@pytest.mark.parametrize("batch, seq_len", [(1, 1), (2, 17), (3, 32)])
def test_triton_and_torch_backends_agree_forward_and_backward(batch, seq_len):
    """fp32 on CPU, the triton backend running our kernels through the interpreter: its logits
    and every parameter's gradient against the torch backend in float64, within the tolerance
    rule of tests/tolerance.py (fp32 torch backend as PyTorch's own error)."""
    x = torch.randint(0, 97, (batch, seq_len))
    targets = torch.randint(0, 97, (batch, seq_len))
    results = {}
    for name, backend, dtype in [
        ("ref64", "torch", torch.float64),
        ("torch32", "torch", torch.float32),
        ("triton32", "triton", torch.float32),
    ]:
        model = tiny_model(backend=backend).to(dtype)  # same seed: same weights
        logits = model(x)
        nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
        results[name] = logits.detach(), {n: p.grad for n, p in model.named_parameters()}
    (ref, ref_grads), (torch32, torch_grads), (triton32, triton_grads) = results.values()
    assert_close_to_reference(triton32, torch32, ref, dtype=torch.float32, name="logits")
    assert ref_grads.keys() == triton_grads.keys()
    for name in ref_grads:
        assert_close_to_reference(
            triton_grads[name],
            torch_grads[name],
            ref_grads[name],
            dtype=torch.float32,
            backward=True,
            name=f"grad {name}",
        )


# --- KV cache ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_kv_cache_matches_full_forward(backend):
    model = tiny_model(backend=backend)
    x = torch.randint(0, 97, (2, 11))
    full = model(x)  # (2, 11, V)
    cache = model.new_kv_cache()
    pieces = [model(x[:, :5], kv_cache=cache)]  # prefill 5
    assert cache.length == 5
    pieces.append(model(x[:, 5:8], kv_cache=cache))  # a chunk: 3 queries vs 8 keys
    for i in range(8, 11):  # one position at a time: 1 query vs i + 1 keys
        pieces.append(model(x[:, i : i + 1], kv_cache=cache))
    assert cache.length == 11
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-4, atol=1e-5)


def test_uniform_decode_step_makes_its_lengths_once_for_every_layer():
    import dataclasses

    model = tiny_model(backend="triton", n_layers=3)
    seen = []

    def spy(q, k, v, lengths):
        seen.append(lengths)
        return BACKENDS["triton"].decode_attention(q, k, v, lengths)

    ops = dataclasses.replace(BACKENDS["triton"], decode_attention=spy)
    for module in model.modules():
        if hasattr(module, "ops"):
            module.ops = ops
    x = torch.randint(0, 97, (2, 7))
    cache = model.new_kv_cache()
    model(x[:, :5], kv_cache=cache)
    assert seen == []  # a prefill runs the flash kernel
    step = model(x[:, 5:6], kv_cache=cache)
    assert len(seen) == 3 and all(t is seen[0] for t in seen)  # one tensor for three layers
    assert seen[0].tolist() == [6, 6] and seen[0].dtype == torch.int32
    model(x[:, 6:7], kv_cache=cache)
    assert seen[3].tolist() == [7, 7] and seen[3] is not seen[0]
    torch.testing.assert_close(step, model(x[:, :6])[:, 5:], rtol=1e-4, atol=1e-5)


def test_kv_cache_buffers_reset_and_overflow():
    model = tiny_model()
    cache = model.new_kv_cache()
    assert isinstance(cache, KVCache) and len(cache) == 2 and cache.length == 0
    x = torch.randint(0, 97, (1, 30))
    model(x, kv_cache=cache)
    k_buffer = cache[0].k
    assert k_buffer.shape == (1, 4, 32, 8)  # (B, H, context_length, hd), preallocated
    model(x[:, :2], kv_cache=cache)
    assert cache.length == 32
    with pytest.raises(ValueError, match="too long: 1 tokens after 32 cached tokens"):
        model(x[:, :1], kv_cache=cache)
    cache.reset()
    assert cache.length == 0
    torch.testing.assert_close(model(x[:, :3], kv_cache=cache), model(x[:, :3]))
    assert cache[0].k is k_buffer  # buffers are reused
    with pytest.raises(ValueError, match="overflow"):
        cache[0].update(torch.zeros(1, 4, 30, 8), torch.zeros(1, 4, 30, 8), start=cache.length)
    with pytest.raises(ValueError, match="reset"):
        model(torch.zeros(3, 1, dtype=torch.long), kv_cache=cache)  # another batch size


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bf16_on_gpu_close_to_fp32(backend):
    """Autocast and a pure-bf16 model on CUDA, with and without the KV cache."""
    model = tiny_model(backend=backend).cuda()
    x = torch.randint(0, 97, (2, 17), device="cuda")
    with torch.no_grad():
        ref = model(x).double()  # fp32 weights and activations
        scale = ref.abs().max().item()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            mixed = model(x)
        assert (mixed.double() - ref).abs().max().item() <= 0.05 * scale + 1e-3
        model.to(torch.bfloat16)
        pure = model(x)
        assert pure.dtype == torch.bfloat16
        assert (pure.double() - ref).abs().max().item() <= 0.1 * scale + 1e-3
        cache = model.new_kv_cache()
        steps = [model(x[:, :9], kv_cache=cache)] + [
            model(x[:, i : i + 1], kv_cache=cache) for i in range(9, 17)
        ]
        assert cache[0].k.dtype == torch.bfloat16
        cached = torch.cat(steps, dim=1).double()
        assert (cached - pure.double()).abs().max().item() <= 0.05 * scale + 1e-3


# --- the attention layer on our kernel ------------------------------------------------------


def _module_reference(module: MultiHeadAttention, x: torch.Tensor) -> torch.Tensor:
    """The same computation as module(x), from its weights, through attention_reference."""
    b, t, _ = x.shape
    heads, head_dim = module.num_heads, module.head_dim
    qkv = torch.nn.functional.linear(x, module.qkv.weight.to(x.dtype), _cast(module.qkv.bias, x))
    q, k, v = qkv.view(b, t, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    ctx = attention_reference(q, k, v, causal=True, upcast=x.dtype == torch.float64)
    ctx = ctx.transpose(1, 2).reshape(b, t, module.d_out)
    return torch.nn.functional.linear(
        ctx, module.out_proj.weight.to(x.dtype), _cast(module.out_proj.bias, x)
    )


def _cast(bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    return None if bias is None else bias.to(x.dtype)


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_attention_layer_on_the_flash_kernel(device, qkv_bias):
    torch.manual_seed(0)
    module = MultiHeadAttention(24, 48, 3, BACKENDS["triton"], qkv_bias=qkv_bias).to(device)
    assert module.qkv.out_features == 3 * 48 and module.head_dim == 16
    x = torch.randn(2, 17, 24, device=device)
    dout = torch.randn(2, 17, 48, device=device)

    def run(fn, x):
        x = x.detach().clone().requires_grad_()
        out = fn(x)
        out.backward(dout.to(x.dtype))
        return out.detach(), x.grad

    kernel = run(module, x)
    same = run(lambda x: _module_reference(module, x), x)
    ref64 = run(lambda x: _module_reference(module, x), x.double())
    assert_close_to_reference(kernel[0], same[0], ref64[0], dtype=torch.float32, name="out")
    assert_close_to_reference(
        kernel[1], same[1], ref64[1], dtype=torch.float32, backward=True, name="dx"
    )
    # training mode applies dropout; eval mode does not
    module.dropout = 0.5
    module.train()
    assert not torch.equal(module(x), kernel[0])
    module.eval()
    assert torch.equal(module(x), kernel[0])


def test_attention_layer_rejects_indivisible_heads():
    with pytest.raises(ValueError, match="multiple"):
        MultiHeadAttention(16, 50, 3, BACKENDS["triton"])


# --- the padded vocabulary and the fused loss ---------------------------------------------


def test_padded_vocabulary_is_the_unpadded_model(tmp_path):
    """vocab_multiple pads the embedding and head rows; logits, losses, generation and the
    saved tensors are those of the unpadded model with the same weights."""
    from safetensors.torch import load_file

    from fastgpt.generation import generate

    model = tiny_model()
    padded = GPTModel(tiny_config(vocab_multiple=128), backend="torch").eval()
    assert padded.tok_emb.weight.shape == (128, 32) and padded.config.padded_vocab_size == 128
    garbage = torch.randn(128 - 97, 32)  # the extra rows: it must never show
    padded.load_state_dict(
        {
            k: torch.cat([v, garbage]) if k in ("tok_emb.weight", "out_head.weight") else v
            for k, v in model.state_dict().items()
        }
    )
    ids, targets = torch.randint(0, 97, (2, 9)), torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert torch.equal(padded(ids), model(ids)) and padded(ids).shape == (2, 9, 97)
        assert torch.equal(padded(ids, targets=targets), model(ids, targets=targets))
    assert torch.equal(generate(padded, ids, 5), generate(model, ids, 5))
    model.save_pretrained(tmp_path / "plain")
    padded.save_pretrained(tmp_path / "padded")
    plain, cut = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("plain", "padded"))
    assert plain.keys() == cut.keys() and all(torch.equal(plain[k], cut[k]) for k in plain)
    # weights of an unpadded model (OpenAI's, say) are padded on load
    again = GPTModel.from_pretrained(tmp_path / "plain", backend="torch", vocab_multiple=128)
    assert again.tok_emb.weight.shape == (128, 32)
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))
    with pytest.raises(ValueError, match="vocab_multiple must be a positive int"):
        tiny_config(vocab_multiple=0)


@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_a_padded_model_starts_from_the_unpadded_ones_weights(tie_embeddings):
    """GPT-2's init and the book's draw only the real vocabulary rows and zero the padding, so
    that padding (the training commands' TRAINING_VOCAB_MULTIPLE) changes no number of a run."""
    from fastgpt.initialization import init_book_weights_

    plain = tiny_model(seed=3, tie_embeddings=tie_embeddings)
    after_plain = torch.randn(3)  # the generator state a run goes on from (data order, dropout)
    padded = tiny_model(seed=3, tie_embeddings=tie_embeddings, vocab_multiple=128)
    assert torch.equal(torch.randn(3), after_plain)
    book = [tiny_model(tie_embeddings=False, vocab_multiple=m) for m in (1, 128)]
    book = [init_book_weights_(m, seed=5) for m in book]
    for a, b in ((plain, padded), book):
        padded_state = b.state_dict()
        for name, tensor in a.state_dict().items():
            rows = padded_state[name]
            if name in ("tok_emb.weight", "out_head.weight"):
                assert rows.shape[0] == 128 and not rows[97:].any(), name
                rows = rows[:97]
            assert torch.equal(rows, tensor), name


def test_training_commands_pad_the_vocabulary(tmp_path):
    """build_model pads a fresh model's and an --init model's vocabulary to
    TRAINING_VOCAB_MULTIPLE rows; a config (a fresh model's or the --init folder's) that pads
    already keeps its own multiple."""
    from fastgpt.train.runner import TRAINING_VOCAB_MULTIPLE, ModelOptions, build_model

    fresh = build_model(ModelOptions(model="tiny"), seed=0)
    assert fresh.config.vocab_multiple == TRAINING_VOCAB_MULTIPLE == 128
    assert fresh.tok_emb.weight.shape[0] % 128 == 0
    tiny_model().save_pretrained(tmp_path / "plain")
    loaded = build_model(ModelOptions(init=str(tmp_path / "plain")))
    assert loaded.config.vocab_multiple == 128 and loaded.tok_emb.weight.shape == (128, 32)
    own = tmp_path / "own.json"
    own.write_text(json.dumps({**tiny_config().to_dict(), "vocab_multiple": 64}))
    assert build_model(ModelOptions(model=str(own))).config.vocab_multiple == 64
    tiny_model(vocab_multiple=8).save_pretrained(tmp_path / "padded")
    loaded = build_model(ModelOptions(init=str(tmp_path / "padded")))
    assert loaded.config.vocab_multiple == 8 and loaded.tok_emb.weight.shape == (104, 32)


def test_fused_loss_trains_like_the_logits_loss():
    """50 AdamW steps of a tiny model with the triton backend's fused head loss (our kernel,
    through the interpreter on CPU) give the losses of the logits loss, by the tolerance rule
    against the same training in float64."""
    from fastgpt.backends import BACKENDS, Ops

    torch_ops = BACKENDS["torch"]
    fused_ops = Ops("torch+fused loss", torch_ops.layer_norm, torch_ops.linear_gelu,
                    torch_ops.attention, BACKENDS["triton"].head_loss)  # fmt: skip
    # one batch, 50 times: the model memorizes it, so the loss falls far
    data = torch.randint(0, 97, (4, 17), generator=torch.Generator().manual_seed(1)).expand(
        50, 4, 17
    )

    def train(ops: Ops, dtype: torch.dtype) -> torch.Tensor:
        model = tiny_model().to(dtype).train()
        for module in model.modules():
            if hasattr(module, "ops"):
                module.ops = ops
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses = []
        for batch in data:
            loss = model(batch[:, :-1], targets=batch[:, 1:])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.detach().double())
        return torch.stack(losses)

    fused, logits, ref64 = (
        train(fused_ops, torch.float32),
        train(torch_ops, torch.float32),
        train(torch_ops, torch.float64),
    )
    assert logits[-1] < logits[0] - 0.5  # it learns
    assert_close_to_reference(fused, logits, ref64, dtype=torch.float32, name="50 losses")


@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_padded_vocabulary_fused_loss_matches_the_unpadded_model(tie_embeddings):
    """The triton backend's fused head loss (our kernel, through the interpreter on CPU) on a
    vocabulary padded to 128 rows whose extra rows hold random values: its loss and every
    gradient are the unpadded model's by the tolerance rule (torch backend in fp32 as PyTorch's
    own error, float64 as the reference), with some targets ignored, and the extra rows of the
    embedding and head get a gradient of exactly zero (no probability, no token id there)."""
    model = tiny_model(tie_embeddings=tie_embeddings)
    padded = GPTModel(
        tiny_config(vocab_multiple=128, tie_embeddings=tie_embeddings), backend="triton"
    ).eval()
    assert padded.backend == "triton" and padded.out_head.weight.shape == (128, 32)
    vocab_rows = ("tok_emb.weight", "out_head.weight")
    garbage = torch.randn(128 - 97, 32, generator=torch.Generator().manual_seed(2))
    padded.load_state_dict(
        {
            k: torch.cat([v, garbage]) if k in vocab_rows else v
            for k, v in model.state_dict().items()
        }
    )
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 97, (2, 9), generator=generator)
    targets = torch.randint(0, 97, (2, 9), generator=generator)
    targets[0, 2] = targets[1, 0] = targets[1, 8] = -100  # ignored: left out of the mean
    targets[0, 8] = 96  # the last real class, next to the first padded row

    def loss_and_grads(net: GPTModel) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = net(ids, targets=targets)  # fp32 or fp64 scalar
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in net.named_parameters()}

    fused, fused_grads = loss_and_grads(padded)
    torch32, torch_grads = loss_and_grads(model)
    ref64, ref_grads = loss_and_grads(tiny_model(tie_embeddings=tie_embeddings).double())
    assert_close_to_reference(fused, torch32, ref64, dtype=torch.float32, name="loss")
    assert fused_grads.keys() == ref_grads.keys()
    for name, grad in fused_grads.items():
        if name in vocab_rows:
            assert grad.shape == (128, 32)
            assert torch.count_nonzero(grad[97:]) == 0, f"{name}: the padded rows got a gradient"
            grad = grad[:97]
        assert_close_to_reference(
            grad,
            torch_grads[name],
            ref_grads[name],
            dtype=torch.float32,
            backward=True,
            name=f"grad {name}",
        )
