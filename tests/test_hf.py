"""fastgpt and Hugging Face: folders fastgpt writes load in transformers (GPT2LMHeadModel,
AutoModelForCausalLM, GPT2ForSequenceClassification, PEFT adapters), and `patch_hf_gpt2` puts
our kernels into transformers' GPT-2 with the same logits, gradients and generated tokens as
its eager model (the tolerance rule of tests/tolerance.py). Tiny random configs, no hub."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from torch import nn

import fastgpt
from fastgpt.model import GPTModel
from fastgpt.model_config import GPTConfig
from tests.tolerance import assert_close_to_reference

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

VOCAB = 97


def tiny_fastgpt(seed=0, **overrides) -> GPTModel:
    """A random tiny GPTModel whose biases and norms are randomized too (so that a wrongly
    mapped tensor cannot hide behind zeros and ones)."""
    torch.manual_seed(seed)
    fields = dict(vocab_size=VOCAB, context_length=32, emb_dim=32, n_heads=4, n_layers=2)
    model = GPTModel(GPTConfig(**{**fields, "drop_rate": 0.0, **overrides}), backend="torch")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def hf_logits(model_class, folder, x):
    hf = model_class.from_pretrained(folder).eval()
    with torch.no_grad():
        return hf(x).logits


# --- fastgpt's folders in transformers ---------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [{}, {"qkv_bias": False}, {"tie_embeddings": False}],
    ids=["gpt2", "no-qkv-bias", "untied"],
)
def test_saved_folder_loads_as_hf_gpt2(tmp_path, overrides):
    model = tiny_fastgpt(**overrides)
    model.save_pretrained(tmp_path)
    x = torch.randint(0, VOCAB, (2, 11))
    with torch.no_grad():
        ours = model(x)
    for model_class in (transformers.GPT2LMHeadModel, transformers.AutoModelForCausalLM):
        theirs = hf_logits(model_class, tmp_path, x)
        assert (theirs - ours).abs().max().item() <= 1e-5, model_class.__name__
    config = transformers.GPT2Config.from_pretrained(tmp_path)
    assert (config.model_type, config.n_embd, config.n_layer, config.n_head) == ("gpt2", 32, 2, 4)
    assert config.n_positions == 32 and config.activation_function == "gelu_new"
    assert config.tie_word_embeddings == overrides.get("tie_embeddings", True)
    info = json.loads((tmp_path / "config.json").read_text())
    assert info["format"] == "fastgpt" and info["format_version"] == 2
    assert info["architectures"] == ["GPT2LMHeadModel"]
    back = GPTModel.from_pretrained(tmp_path, backend="torch")
    assert back.config == model.config  # qkv_bias=False comes back from our fields
    with torch.no_grad():
        torch.testing.assert_close(back(x), ours, rtol=0, atol=0)


def test_folder_trained_on_in_transformers_loads_back(tmp_path):
    """A model without q/k/v biases goes to transformers (zero c_attn biases), is changed
    there (the biases become nonzero) and saved by transformers: fastgpt loads what it
    computes, with qkv_bias switched on."""
    tiny_fastgpt(qkv_bias=False).save_pretrained(tmp_path / "ours")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ours").eval()
    assert torch.count_nonzero(hf.transformer.h[0].attn.c_attn.bias) == 0
    with torch.no_grad():
        hf.transformer.h[1].attn.c_attn.bias.normal_()
    hf.save_pretrained(tmp_path / "hf")
    back = GPTModel.from_pretrained(tmp_path / "hf", backend="torch")
    assert back.config.qkv_bias
    x = torch.randint(0, VOCAB, (1, 7))
    with torch.no_grad():
        assert (back(x) - hf(x).logits).abs().max().item() <= 1e-5


def test_classifier_without_bias_loads_as_sequence_classifier(tmp_path):
    model = tiny_fastgpt(vocab_size=50257)
    model.out_head = nn.Linear(32, 3, bias=False)
    model.save_pretrained(tmp_path)
    info = json.loads((tmp_path / "config.json").read_text())
    assert (
        info["architectures"] == ["GPT2ForSequenceClassification"] and info["pad_token_id"] == 50256
    )
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == "GPT2ForSequenceClassification" and hf.config.num_labels == 3
    # right padding with <|endoftext|>, as fastgpt pads: HF pools the last real token too
    x = torch.randint(0, 50000, (2, 9))
    x[1, 6:] = 50256
    with torch.no_grad():
        ours = model(x)[torch.arange(2), torch.tensor([8, 5])]  # (2, 3) at the last real token
        assert (hf(x).logits - ours).abs().max().item() <= 1e-5


def test_classifier_with_bias_says_why_not_and_loads_as_body(tmp_path):
    """A head with a bias (what finetune-classify trains) has no transformers GPT-2 class:
    config.json says so and declares the body, which loads exactly."""
    model = tiny_fastgpt()
    model.out_head = nn.Linear(32, 2)
    with torch.no_grad():
        model.out_head.bias.normal_()
    model.save_pretrained(tmp_path)
    info = json.loads((tmp_path / "config.json").read_text())
    assert info["architectures"] == ["GPT2Model"]
    assert (
        "score.bias" in info["fastgpt_note"]
        and "GPT2ForSequenceClassification" in info["fastgpt_note"]
    )
    from safetensors.torch import load_file

    head = load_file(str(tmp_path / "model.safetensors"))
    body = transformers.AutoModel.from_pretrained(tmp_path).eval()
    x = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        hidden = body(x).last_hidden_state
        theirs = hidden @ head["score.weight"].T + head["score.bias"]
        assert (theirs - model(x)).abs().max().item() <= 1e-5
        loaded = GPTModel.from_pretrained(tmp_path, backend="torch")  # as tiny_fastgpt runs
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_hf_sequence_classifier_loads_in_fastgpt(tmp_path):
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, n_positions=32, vocab_size=VOCAB, num_labels=4
    )
    hf = transformers.GPT2ForSequenceClassification(config).eval()
    hf.save_pretrained(tmp_path)
    model = GPTModel.from_pretrained(tmp_path, backend="torch")
    assert model.out_head.out_features == 4 and model.out_head.bias is None
    x = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        assert (model(x)[:, -1] - hf(x).logits).abs().max().item() <= 1e-5


def test_lora_adapters_load_in_peft(tmp_path):
    peft = pytest.importorskip("peft")
    from fastgpt.lora import LoRALinear, apply_lora, save_pretrained_with_lora

    model = tiny_fastgpt()
    apply_lora(model, rank=3, alpha=6.0, include_head=True)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_B.normal_(std=0.1)
    save_pretrained_with_lora(model, tmp_path)
    info = json.loads((tmp_path / "adapter_config.json").read_text())
    assert info["target_modules"] == ["c_attn", "c_fc", "c_proj", "lm_head"]
    x = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        ours = model(x)
        base = transformers.GPT2LMHeadModel.from_pretrained(tmp_path)
        with warnings.catch_warnings():  # "already found a peft_config": transformers with
            warnings.simplefilter("ignore")  # peft installed loaded them already, see below
            adapted = peft.PeftModel.from_pretrained(base, tmp_path).eval()
        assert (adapted(x).logits - ours).abs().max().item() <= 1e-5
        # transformers with peft installed loads the adapters beside the model by itself (seen
        # from 5.12 on; 5.4, the oldest we support, loads the base alone)
        if tuple(int(n) for n in transformers.__version__.split(".")[:2]) >= (5, 12):
            hf = hf_logits(transformers.GPT2LMHeadModel, tmp_path, x)
            assert (hf - ours).abs().max() <= 1e-5
        assert (GPTModel.from_pretrained(tmp_path)(x) - ours).abs().max().item() <= 1e-5


# --- patch_hf_gpt2: our kernels inside transformers' GPT-2 -------------------------------


def hf_pair(device, seed=0, n_layer=1, **overrides):
    """(eager HF GPT2LMHeadModel, patched deep copy): random tiny weights, biases and norms
    randomized, no dropout unless overridden."""
    torch.manual_seed(seed)
    drop = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    fields = dict(n_embd=32, n_layer=n_layer, n_head=4, n_positions=32, vocab_size=VOCAB)
    config = transformers.GPT2Config(**{**fields, **drop, **overrides})
    config._attn_implementation = "eager"
    eager = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, p in eager.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    eager.to(device)
    return eager, fastgpt.patch_hf_gpt2(copy.deepcopy(eager))


@pytest.fixture
def kernel_calls(monkeypatch):
    """Calls of attention through our kernel ("kernel": (Tq, Tk, dropout_p)), the varlen
    kernel ("varlen": (cu_seqlens_q, cu_seqlens_k, dropout_p)) and the masked (eager) path."""
    from fastgpt import hf_patch

    calls = {"kernel": [], "varlen": [], "masked": 0}
    kernel = hf_patch.attention
    varlen = hf_patch.attention_varlen

    def spy(q, k, v, **kwargs):
        calls["kernel"].append((q.shape[2], k.shape[2], kwargs["dropout_p"]))
        return kernel(q, k, v, **kwargs)

    def spy_varlen(q, k, v, cu_q, cu_k, *args, **kwargs):
        calls["varlen"].append((cu_q.tolist(), cu_k.tolist(), kwargs["dropout_p"]))
        return varlen(q, k, v, cu_q, cu_k, *args, **kwargs)

    masked = hf_patch.masked_attention

    def spy_masked(*args):
        calls["masked"] += 1
        return masked(*args)

    monkeypatch.setattr(hf_patch, "attention", spy)
    monkeypatch.setattr(hf_patch, "attention_varlen", spy_varlen)
    monkeypatch.setattr(hf_patch, "masked_attention", spy_masked)
    return calls


def test_patch_swaps_layers_and_keeps_parameters(device):
    eager, patched = hf_pair(device)
    names = [type(m).__name__ for m in patched.modules()]
    assert names.count("FastLayerNorm") == 3 and "FastGPT2MLP" in names
    assert patched.config._attn_implementation == "fastgpt"
    assert patched.state_dict().keys() == eager.state_dict().keys()
    assert fastgpt.patch_hf_gpt2(patched) is patched  # patching twice changes nothing more
    assert "FastFastGPT2MLP" not in [type(m).__name__ for m in patched.modules()]
    body = fastgpt.patch_hf_gpt2(transformers.GPT2Model(eager.config))  # the bare body too
    assert type(body.ln_f).__name__ == "FastLayerNorm"
    with pytest.raises(TypeError, match="GPT2Model"):
        fastgpt.patch_hf_gpt2(nn.Linear(2, 2))
    odd = transformers.GPT2Config(n_embd=36, n_layer=1, n_head=3, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="head dim 12"):
        fastgpt.patch_hf_gpt2(transformers.GPT2LMHeadModel(odd))


def _padding(kind: str, b: int, t: int) -> torch.Tensor | None:
    if kind == "none":
        return None
    mask = torch.ones(b, t, dtype=torch.long)
    if kind == "left":
        mask[0, :3] = 0
    elif kind == "right":
        mask[1, t - 4 :] = 0
    elif kind == "both":  # one run of real tokens in the middle
        mask[0, :2] = 0
        mask[0, t - 3 :] = 0
    else:  # "holes": not one run, no varlen layout
        mask[0, 4] = 0
    return mask


# cu_seqlens of the real rows of _padding(kind, 2, 10): the varlen kernel's sequences
PACKED = {"left": [0, 7, 17], "right": [0, 10, 16], "both": [0, 5, 15]}


@pytest.mark.parametrize("padding", ["none", "left", "right", "both", "holes"])
def test_patched_logits_and_gradients_match_eager(device, padding, kernel_calls):
    """Padding rows included: their logits and the gradients through them are eager's."""
    eager, patched = hf_pair(device)
    reference = copy.deepcopy(eager).double()
    x = torch.randint(0, VOCAB, (2, 10), device=device)
    mask = _padding(padding, 2, 10)
    mask = None if mask is None else mask.to(device)
    weights = torch.randn(2, 10, VOCAB, device=device, dtype=torch.float64)  # a random loss
    results = {}
    for name, model in (("patched", patched), ("eager", eager), ("reference", reference)):
        logits = model(x, attention_mask=mask).logits
        (logits * weights.to(logits.dtype)).sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        results[name] = logits, grads
    assert (len(kernel_calls["kernel"]) > 0) == (padding == "none")
    # real rows on the varlen kernel, the padding rows (and a mask with holes) as eager does
    assert (kernel_calls["masked"] > 0) == (padding != "none")
    expected = [(PACKED[padding], PACKED[padding], 0.0)] if padding in PACKED else []
    assert kernel_calls["varlen"] == expected
    (ours, our_grads), (theirs, their_grads), (exact, exact_grads) = results.values()
    kw = dict(dtype=torch.float32)
    assert_close_to_reference(ours, theirs, exact, name=f"logits, {padding} padding", **kw)
    for n, grad in our_grads.items():
        assert_close_to_reference(grad, their_grads[n], exact_grads[n], backward=True, name=n, **kw)


def test_padding_plan_is_built_once_per_mask(device, monkeypatch, kernel_calls):
    # transformers hands every layer the same mask tensor: one plan (and its host syncs) per
    # forward, not per layer; a new mask, or the same one edited in place, gets a new plan.
    from fastgpt import hf_patch

    built = []
    build = hf_patch._build_padding_plan
    monkeypatch.setattr(hf_patch, "_build_padding_plan", lambda *a: built.append(1) or build(*a))
    _, patched = hf_pair(device, n_layer=3)
    x = torch.randint(0, VOCAB, (2, 10), device=device)
    with torch.no_grad():
        patched(x, attention_mask=_padding("left", 2, 10).to(device))
        assert len(built) == 1 and len(kernel_calls["varlen"]) == 3
        patched(x, attention_mask=_padding("right", 2, 10).to(device))
        assert len(built) == 2 and kernel_calls["varlen"][-1][0] == PACKED["right"]
        mask = torch.ones(2, 1, 10, 10, dtype=torch.bool, device=device).tril()
        query = torch.zeros(2, 4, 10, 8, device=device)
        first = hf_patch.padding_plan(patched.transformer.h[0].attn, query, query, mask)
        assert first.cu_q.tolist() == [0, 10, 20] and len(built) == 3
        mask[0, :, :, :3] = False  # the same tensor, edited in place: left padding now
        second = hf_patch.padding_plan(patched.transformer.h[0].attn, query, query, mask)
        assert second.cu_q.tolist() == [0, 7, 17] and len(built) == 4


def test_patched_dropout_in_training(device, kernel_calls):
    eager, patched = hf_pair(device, attn_pdrop=0.5)
    x = torch.randint(0, VOCAB, (1, 8), device=device)
    with torch.no_grad():
        evaluated = patched(x).logits
        assert (evaluated - eager(x).logits).abs().max() < 1e-5  # eval: no dropout
        assert {p for *_, p in kernel_calls["kernel"]} == {0.0}
        patched.train()
        first, second = patched(x).logits, patched(x).logits
    assert kernel_calls["kernel"][-1][2] == 0.5
    assert not torch.allclose(first, second) and not torch.allclose(first, evaluated)
    mask = torch.ones_like(x)
    mask[0, :2] = 0
    with torch.no_grad():
        patched(x, attention_mask=mask)
    assert kernel_calls["varlen"] == [([0, 6], [0, 6], 0.5)]  # padded batches drop out too


@pytest.mark.parametrize("padding", ["none", "left"])
def test_patched_generate_gives_the_same_tokens(device, padding, kernel_calls):
    eager, patched = hf_pair(device)
    prompt = torch.randint(1, VOCAB, (2, 5), device=device)
    mask = torch.ones_like(prompt)
    if padding == "left":
        mask[1, :2] = 0
        prompt[1, :2] = 0
    options = dict(attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    ours = patched.generate(prompt, **options)
    assert torch.equal(ours, eager.generate(prompt, **options))
    if padding == "none":  # the KV cache's decode steps ran on the kernel: 1 query, all keys
        assert kernel_calls["kernel"] == [(5, 5, 0.0), (1, 6, 0.0), (1, 7, 0.0)]
    else:  # the prompt's real rows, then each decode step's one query per row, on varlen
        assert kernel_calls["kernel"] == []
        assert kernel_calls["varlen"] == [
            ([0, 5, 8], [0, 5, 8], 0.0),
            ([0, 1, 2], [0, 6, 10], 0.0),
            ([0, 1, 2], [0, 7, 12], 0.0),
        ]


def test_patch_refuses_a_transformers_older_than_its_mask_interface(monkeypatch):
    import sys

    from fastgpt.hf_patch import register_attention

    # the module object register_attention imports (peft's import can replace this file's)
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "5.3.0")
    with pytest.raises(ImportError, match=r"needs transformers >= 5.4 \(found 5.3.0\)"):
        register_attention()
