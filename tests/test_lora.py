"""LoRA: initialization, trainable counts, gradients only in adapters, merging."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fastgpt.lora import (
    LoRALinear,
    apply_lora,
    describe_parameters,
    has_lora,
    merge_lora,
)
from fastgpt.model import GPTModel
from fastgpt.model_config import GPTConfig


@pytest.mark.parametrize("in_features, out_features, rank", [(17, 5, 1), (8, 97, 4), (1, 1, 2)])
def test_lora_linear_starts_equal_and_matches_reference(in_features, out_features, rank):
    torch.manual_seed(0)
    base = nn.Linear(in_features, out_features)
    layer = LoRALinear(base, rank=rank, alpha=3.0)
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert layer.lora_A.shape == (rank, in_features) and layer.lora_B.shape == (out_features, rank)
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), ...)
    assert layer.lora_A.abs().max() <= bound
    x = torch.randn(3, 7, in_features, dtype=torch.float32)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)  # B = 0: exactly the base
    with torch.no_grad():
        layer.lora_B.normal_()
    x64 = x.double()
    reference = x64 @ base.weight.double().T + base.bias.double()
    reference += (3.0 / rank) * x64 @ layer.lora_A.double().T @ layer.lora_B.double().T
    torch.testing.assert_close(layer(x).double(), reference, rtol=1e-5, atol=1e-5)


def test_lora_linear_rejects_bad_arguments():
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(nn.Linear(2, 2), rank=0, alpha=1.0)
    with pytest.raises(ValueError, match="alpha"):
        LoRALinear(nn.Linear(2, 2), rank=1, alpha=0.0)
    with pytest.raises(TypeError, match=r"nn\.Linear"):
        LoRALinear(nn.Conv1d(2, 2, 1), rank=1, alpha=1.0)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a tied parameter counts once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def tiny_model(**overrides) -> GPTModel:
    torch.manual_seed(0)
    config = GPTConfig.from_name("tiny", context_length=32, **overrides)
    return GPTModel(config, backend="torch")


@pytest.mark.parametrize("rank", [1, 3, 8])
def test_trainable_count_for_rank(rank):
    model = tiny_model()
    _, total_before = count_parameters(model)
    wrapped = apply_lora(model, rank=rank, alpha=2 * rank)
    d, layers = model.config.emb_dim, model.config.n_layers
    assert len(wrapped) == 4 * layers
    # r·(in + out) per Linear: qkv d->3d, out_proj d->d, fc1 d->4d, fc2 4d->d  => 16·d·r
    expected = layers * rank * (4 * d + 2 * d + 5 * d + 5 * d)
    trainable, total = count_parameters(model)
    assert trainable == expected
    assert total == total_before + expected
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    assert f"trainable {expected:,} of {total:,}" in describe_parameters(model)
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        apply_lora(model, rank=rank, alpha=1.0)


def test_lora_head_and_classifier_head():
    model = tiny_model(tie_embeddings=False)
    model.out_head = nn.Linear(model.config.emb_dim, 2)
    apply_lora(model, rank=2, alpha=4.0, include_head=True)
    assert isinstance(model.out_head, LoRALinear)
    trainable, _ = count_parameters(model)
    d = model.config.emb_dim
    assert trainable == model.config.n_layers * 2 * 16 * d + 2 * (d + 2)


def test_only_adapters_change_and_merge_gives_same_logits():
    model = tiny_model()
    apply_lora(model, rank=4, alpha=8.0, include_head=True)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    tokens = torch.randint(0, 50257, (2, 17))
    for _ in range(3):
        logits = model(tokens[:, :-1])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name  # bitwise unchanged
    assert any(torch.count_nonzero(m.lora_B) > 0 for m in model.modules() if hasattr(m, "lora_B"))

    model.eval()
    with torch.no_grad():
        adapted = model(tokens)
    assert merge_lora(model) == 4 * model.config.n_layers + 1
    assert not has_lora(model)
    assert not any(p.requires_grad for p in model.parameters())  # frozen stays frozen
    assert all(type(m) is nn.Linear for m in (model.trf_blocks[0].att.qkv, model.out_head))
    with torch.no_grad():
        merged = model(tokens)
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)
    # The merged head no longer shares the token embedding (it carries the adapter's update).
    assert model.out_head.weight is not model.tok_emb.weight


def adapted_logits(model: GPTModel, tokens: torch.Tensor) -> torch.Tensor:
    """Give every adapter a nonzero B (as training would) and return the model's logits."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(std=0.1)
        return model.eval()(tokens)


def test_merged_model_saves_and_loads(tmp_path):
    model = tiny_model()
    model.out_head = nn.Linear(model.config.emb_dim, 3)
    apply_lora(model, rank=2, alpha=2.0)
    tokens = torch.randint(0, 50257, (1, 9))
    adapted = adapted_logits(model, tokens)
    merge_lora(model)
    model.save_pretrained(tmp_path / "m")
    loaded = GPTModel.from_pretrained(tmp_path / "m", backend="torch")
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), adapted, rtol=1e-5, atol=1e-5)


def test_unmerged_adapters_save_and_load(tmp_path):
    from fastgpt.lora import load_lora_adapters, save_pretrained_with_lora

    model = tiny_model()
    apply_lora(model, rank=3, alpha=6.0, include_head=True)
    tokens = torch.randint(0, 50257, (2, 11))
    adapted = adapted_logits(model, tokens)
    save_pretrained_with_lora(model, tmp_path / "m")
    assert has_lora(model)  # the model itself keeps its adapters
    # loading the folder folds the adapters in: the fine-tuned model, not its base
    with torch.no_grad():
        for folded in (
            GPTModel.from_pretrained(tmp_path / "m", backend="torch"),
            GPTModel.from_pretrained(tmp_path / "m" / "model.safetensors", backend="torch"),
        ):
            assert not has_lora(folded)
            torch.testing.assert_close(folded(tokens), adapted, rtol=1e-5, atol=1e-5)
    loaded = GPTModel.from_pretrained(
        tmp_path / "m", backend="torch", merge_adapters=False
    )  # the base
    with torch.no_grad():
        assert not torch.allclose(loaded(tokens), adapted)
    assert load_lora_adapters(loaded, tmp_path / "m")
    assert has_lora(loaded) and count_parameters(loaded)[0] == count_parameters(model)[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(tokens), adapted, rtol=1e-5, atol=1e-5)
    assert not load_lora_adapters(tiny_model(), tmp_path / "nothing-here")

    # merge=True folds them into plain weights, trainable flags untouched (continuing from it)
    merged = GPTModel.from_pretrained(tmp_path / "m", backend="torch", merge_adapters=False).train()
    assert load_lora_adapters(merged, tmp_path / "m" / "model.safetensors", merge=True)
    assert not has_lora(merged) and all(p.requires_grad for p in merged.parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(tokens), adapted, rtol=1e-5, atol=1e-5)

    # saving merged into the same folder removes the adapters of the earlier save
    save_pretrained_with_lora(model, tmp_path / "m", merge=True)
    assert not has_lora(model) and not (tmp_path / "m" / "lora.json").exists()
    with torch.no_grad():
        reloaded = GPTModel.from_pretrained(tmp_path / "m", backend="torch")
        torch.testing.assert_close(reloaded(tokens), adapted, rtol=1e-5, atol=1e-5)


def test_bad_adapter_files(tmp_path):
    from fastgpt.lora import load_lora_adapters, save_pretrained_with_lora

    model = tiny_model()
    apply_lora(model, rank=2, alpha=4.0)
    save_pretrained_with_lora(model, tmp_path)
    smaller = tiny_model(n_layers=1)
    with pytest.raises(ValueError, match=r"has no module 'trf_blocks\.1\."):
        load_lora_adapters(smaller, tmp_path)
    assert not has_lora(smaller)  # checked before any module was wrapped or frozen
    assert all(p.requires_grad for p in smaller.parameters())
    (tmp_path / "lora.json").write_text('{"rank": 2}', encoding="utf-8")  # the older layout
    with pytest.raises(ValueError, match=r"both adapter_config\.json and lora\.json"):
        load_lora_adapters(tiny_model(), tmp_path)
    (tmp_path / "adapter_config.json").unlink()
    with pytest.raises(ValueError, match=r"lora\.json: malformed LoRA config"):
        load_lora_adapters(tiny_model(), tmp_path)


def test_adapters_are_saved_in_peft_layout(tmp_path):
    import json

    from safetensors.torch import load_file

    from fastgpt.lora import save_pretrained_with_lora

    model = tiny_model()
    apply_lora(model, rank=2, alpha=4.0)
    save_pretrained_with_lora(model, tmp_path)
    assert not (tmp_path / "lora.json").exists() and not (tmp_path / "lora.safetensors").exists()
    info = json.loads((tmp_path / "adapter_config.json").read_text(encoding="utf-8"))
    assert info["peft_type"] == "LORA" and info["task_type"] == "CAUSAL_LM"
    assert (info["r"], info["lora_alpha"], info["fan_in_fan_out"]) == (2, 4.0, True)
    assert info["target_modules"] == ["c_attn", "c_fc", "c_proj"]
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert len(tensors) == 2 * 4 * model.config.n_layers
    qkv = model.trf_blocks[0].att.qkv
    a = tensors["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"]
    b = tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]
    assert torch.equal(a, qkv.lora_A.detach()) and torch.equal(b, qkv.lora_B.detach())
    assert "base_model.model.transformer.h.1.mlp.c_proj.lora_B.weight" in tensors

    # a classifier's head adapter is on transformers' `score`; a subset gets full names
    classifier = tiny_model()
    classifier.out_head = nn.Linear(classifier.config.emb_dim, 2)
    apply_lora(classifier, rank=2, alpha=4.0, include_head=True)
    merge_lora(classifier.trf_blocks[1])
    save_pretrained_with_lora(classifier, tmp_path / "cls")
    info = json.loads((tmp_path / "cls" / "adapter_config.json").read_text(encoding="utf-8"))
    assert info["task_type"] is None and "score" in info["target_modules"]
    assert "transformer.h.0.attn.c_attn" in info["target_modules"]
    assert not any(t.startswith("transformer.h.1.") for t in info["target_modules"])


def test_adapters_saved_before_peft_layout_still_load(tmp_path):
    """fastgpt's older layout, written by hand: lora.json and lora.safetensors (our names)
    beside a plain checkpoint."""
    import json

    from fastgpt.lora import load_lora_adapters
    from fastgpt.weights import save_safetensors

    model = tiny_model()
    names = apply_lora(model, rank=2, alpha=3.0)
    tokens = torch.randint(0, 50257, (2, 7))
    adapted = adapted_logits(model, tokens)
    base = tiny_model()  # the same seed: the same base weights
    base.save_pretrained(tmp_path)
    tensors = {}
    for name in names:
        module = model.get_submodule(name)
        tensors[f"{name}.lora_A"] = module.lora_A.detach().clone()
        tensors[f"{name}.lora_B"] = module.lora_B.detach().clone()
    save_safetensors(tensors, tmp_path / "lora.safetensors")
    info = {"rank": 2, "alpha": 3.0, "modules": names}
    (tmp_path / "lora.json").write_text(json.dumps(info), encoding="utf-8")
    with torch.no_grad():
        folded = GPTModel.from_pretrained(tmp_path, backend="torch")
        torch.testing.assert_close(folded(tokens), adapted, rtol=1e-5, atol=1e-5)
    unmerged = GPTModel.from_pretrained(tmp_path, backend="torch", merge_adapters=False)
    assert load_lora_adapters(unmerged, tmp_path) and has_lora(unmerged)


def test_bad_peft_adapter_files(tmp_path):
    import json

    from fastgpt.lora import load_lora_adapters, save_pretrained_with_lora

    model = tiny_model()
    apply_lora(model, rank=2, alpha=4.0)
    save_pretrained_with_lora(model, tmp_path)
    path = tmp_path / "adapter_config.json"
    info = json.loads(path.read_text(encoding="utf-8"))
    path.write_text(json.dumps({**info, "use_dora": True}), encoding="utf-8")
    with pytest.raises(ValueError, match=r"adapter_config\.json: malformed LoRA config.*use_dora"):
        load_lora_adapters(tiny_model(), tmp_path)
    path.write_text(json.dumps({**info, "r": 3}), encoding="utf-8")
    with pytest.raises(ValueError, match="missing or mis-shaped adapter"):
        load_lora_adapters(tiny_model(), tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors is missing"):
        load_lora_adapters(tiny_model(), tmp_path)
