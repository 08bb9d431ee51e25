"""Loading Hugging Face GPT-2 checkpoints and saving/loading our own (fastgpt/weights.py)."""

import json

import pytest
import torch
from torch import nn

from fastgpt.model import GPTModel
from fastgpt.model_config import GPTConfig
from tests.tolerance import assert_close_to_reference

transformers = pytest.importorskip("transformers")


def make_hf_model(seed=0, **overrides):
    """A random tiny GPT2LMHeadModel; its biases and LayerNorms are randomized too so that a
    wrongly mapped tensor cannot hide behind zeros and ones."""
    torch.manual_seed(seed)
    fields = dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=999)
    config = transformers.GPT2Config(**{**fields, **overrides})
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_gpt2")
    make_hf_model().save_pretrained(path)
    return path


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_from_pretrained_matches_hf_logits(hf_dir, backend):
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    model = GPTModel.from_pretrained(hf_dir, backend=backend)
    assert model.backend == backend and not model.training
    assert model.config == GPTConfig(
        vocab_size=999, context_length=64, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.1
    )
    assert model.out_head.weight is model.tok_emb.weight
    x = torch.randint(0, 999, (2, 19))
    with torch.no_grad():
        ours = model(x)
        hf32 = hf(x).logits
        hf64 = hf.double()(x).logits
    # HF in float64 is the exact reference; HF in fp32 shows what fp32 rounding costs.
    assert_close_to_reference(ours, hf32, hf64, dtype=torch.float32, name=f"logits {backend}")


def test_from_pretrained_reads_pytorch_model_bin(tmp_path):
    """The layout of the original OpenAI upload on the hub: pytorch_model.bin without the
    "transformer." prefix, with the causal-mask buffers and a (tied) lm_head.weight."""
    hf = make_hf_model(seed=1)
    hf.config.save_pretrained(tmp_path)
    state = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items()}
    state["lm_head.weight"] = state["wte.weight"].clone()
    for i in range(2):
        state[f"h.{i}.attn.bias"] = torch.ones(1, 1, 64, 64).tril()
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, tmp_path / "pytorch_model.bin")
    model = GPTModel.from_pretrained(tmp_path, backend="torch")
    x = torch.randint(0, 999, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, rtol=1e-4, atol=1e-5)


def test_from_pretrained_by_hub_name(hf_dir, monkeypatch):
    """A GPT-2 name goes to huggingface_hub (stubbed here: no network in tests)."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    requests = []

    def snapshot_download(repo_id, allow_patterns):
        requests.append((repo_id, allow_patterns))
        return str(hf_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    for name, repo_id in [
        ("gpt2", "openai-community/gpt2"),
        ("gpt2-medium", "openai-community/gpt2-medium"),
    ]:
        model = GPTModel.from_pretrained(name, backend="torch")
        assert model.config.vocab_size == 999  # what the stub handed over
        assert requests.pop() == (repo_id, ["config.json", "model.safetensors"])


def test_from_pretrained_config_overrides(hf_dir):
    model = GPTModel.from_pretrained(hf_dir, backend="torch", drop_rate=0.0)
    assert model.config.drop_rate == 0.0


def _rewrite_hf(src, dst, edit):
    """Copy the HF checkpoint in `src` to `dst` with its tensors passed through `edit`."""
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(str(src / "model.safetensors"))
    save_file(edit(dict(tensors)), str(dst / "model.safetensors"), metadata={"format": "pt"})


def test_from_pretrained_lists_missing_unexpected_and_misshaped(hf_dir, tmp_path):
    def drop_and_add(t):
        del t["transformer.h.1.mlp.c_fc.bias"]
        del t["transformer.ln_f.weight"]
        t["transformer.h.0.extra.weight"] = torch.zeros(3)
        return t

    _rewrite_hf(hf_dir, tmp_path / "a", drop_and_add)
    with pytest.raises(ValueError) as info:
        GPTModel.from_pretrained(tmp_path / "a", backend="torch")
    message = str(info.value)
    assert "missing tensors (2): h.1.mlp.c_fc.bias, ln_f.weight" in message
    assert "unexpected tensors (1): h.0.extra.weight" in message

    def misshape(t):
        t["transformer.h.0.attn.c_proj.weight"] = torch.zeros(32, 31)
        return t

    _rewrite_hf(hf_dir, tmp_path / "b", misshape)
    with pytest.raises(ValueError, match=r"mis-shaped tensors \(1\): trf_blocks.0.att.out_proj"):
        GPTModel.from_pretrained(tmp_path / "b", backend="torch")


def test_from_pretrained_refuses_unsupported_config(tmp_path):
    make_hf_model(activation_function="relu").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="activation_function='relu'"):
        GPTModel.from_pretrained(tmp_path)


def test_from_pretrained_bad_names(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        GPTModel.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="neither a folder nor a known GPT-2 name"):
        GPTModel.from_pretrained("gpt5")
    with pytest.raises(FileNotFoundError):
        GPTModel.from_pretrained(tmp_path / "nope")
    # A hub name with the hub unreachable: a clear error, not a traceback from deep inside.
    huggingface_hub = pytest.importorskip("huggingface_hub")

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(RuntimeError, match=r"could not download 'gpt2'.*local folder"):
        GPTModel.from_pretrained("gpt2")


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=97, context_length=32, emb_dim=32, n_heads=4, n_layers=2)
    model = GPTModel(config, backend="torch").eval()
    model.save_pretrained(tmp_path / "ckpt")
    info = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert info["format"] == "fastgpt" and info["dtype"] == "float32"
    assert GPTConfig.from_json(tmp_path / "ckpt" / "config.json") == config
    # readable like the config beside it (safetensors alone would make it 0600)
    config_mode = (tmp_path / "ckpt" / "config.json").stat().st_mode & 0o777
    assert (tmp_path / "ckpt" / "model.safetensors").stat().st_mode & 0o777 == config_mode
    x = torch.randint(0, 97, (2, 9))
    for loaded in (
        GPTModel.from_pretrained(tmp_path / "ckpt", backend="triton"),
        GPTModel.from_pretrained(tmp_path / "ckpt", backend="torch"),  # detects our format
        GPTModel.from_pretrained(tmp_path / "ckpt" / "model.safetensors"),
    ):
        assert loaded.config == config
        assert loaded.out_head.weight is loaded.tok_emb.weight
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(x), rtol=1e-4, atol=1e-5)


def test_save_and_load_untied_and_replaced_head(tmp_path):
    torch.manual_seed(0)
    config = GPTConfig(
        vocab_size=97, context_length=32, emb_dim=32, n_heads=4, n_layers=2, tie_embeddings=False
    )
    model = GPTModel(config, backend="torch").eval()
    model.save_pretrained(tmp_path / "untied")
    loaded = GPTModel.from_pretrained(tmp_path / "untied", backend="torch")
    torch.testing.assert_close(loaded.out_head.weight, model.out_head.weight)
    assert loaded.out_head.weight is not loaded.tok_emb.weight

    classifier = GPTModel(GPTConfig.from_dict({**config.to_dict(), "tie_embeddings": True}))
    classifier.out_head = nn.Linear(32, 2)  # as fine-tuning for classification does
    classifier.save_pretrained(tmp_path / "cls")
    loaded = GPTModel.from_pretrained(tmp_path / "cls", backend="torch")
    assert loaded.out_head.out_features == 2
    torch.testing.assert_close(loaded.out_head.bias, classifier.out_head.bias)


def save_v1(model: GPTModel, directory) -> None:
    """A folder as fastgpt wrote it before the Hugging Face layout (format_version 1): our own
    tensor names (a tied head stored once) and our GPTConfig fields only."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tied = model.out_head.weight is model.tok_emb.weight
    state = model.state_dict()
    state = {k: v.contiguous() for k, v in state.items() if not (tied and k == "out_head.weight")}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    head = {"out_features": model.out_head.out_features, "bias": model.out_head.bias is not None,
            "tied": tied}  # fmt: skip
    info = {"format": "fastgpt", "format_version": 1, **model.config.to_dict(),
            "tie_embeddings": tied, "out_head": head, "dtype": "float32",
            "num_parameters": model.num_parameters()}  # fmt: skip
    (directory / "config.json").write_text(json.dumps(info, indent=2) + "\n")


def test_load_lists_bad_tensors_in_our_format(tmp_path):
    from safetensors.torch import load_file, save_file

    config = GPTConfig(vocab_size=97, context_length=32, emb_dim=32, n_heads=4, n_layers=2)
    save_v1(GPTModel(config), tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["trf_blocks.1.norm2.bias"]
    tensors["trf_blocks.0.att.qkv.weight"] = torch.zeros(96, 33)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError) as info:
        GPTModel.from_pretrained(tmp_path)
    assert "missing tensors (1): trf_blocks.1.norm2.bias" in str(info.value)
    assert "trf_blocks.0.att.qkv.weight (checkpoint (96, 33), model (96, 32))" in str(info.value)


def test_load_lists_bad_tensors_in_the_hf_layout(tmp_path):
    from safetensors.torch import load_file, save_file

    config = GPTConfig(vocab_size=97, context_length=32, emb_dim=32, n_heads=4, n_layers=2)
    GPTModel(config).save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    missing = {k: v for k, v in tensors.items() if k != "transformer.h.1.ln_2.bias"}
    save_file(missing, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing tensors \(1\): h\.1\.ln_2\.bias"):
        GPTModel.from_pretrained(tmp_path)
    save_file({**tensors, "transformer.h.0.attn.c_attn.weight": torch.zeros(33, 96)},
              str(tmp_path / "model.safetensors"))  # fmt: skip
    with pytest.raises(
        ValueError, match=r"qkv\.weight \(checkpoint \(96, 33\), model \(96, 32\)\)"
    ):
        GPTModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("variant", ["lm", "untied", "no-qkv-bias", "classifier"])
def test_folders_written_before_the_hf_layout_still_load(tmp_path, variant):
    torch.manual_seed(0)
    overrides = {"untied": {"tie_embeddings": False}, "no-qkv-bias": {"qkv_bias": False}}
    config = GPTConfig(vocab_size=97, context_length=32, emb_dim=32, n_heads=4, n_layers=2,
                       **overrides.get(variant, {}))  # fmt: skip
    model = GPTModel(config, backend="torch").eval()
    if variant == "classifier":
        model.out_head = nn.Linear(32, 2)
    save_v1(model, tmp_path)
    loaded = GPTModel.from_pretrained(tmp_path, backend="torch")
    assert loaded.config.qkv_bias == (variant != "no-qkv-bias")
    tied = variant not in ("untied", "classifier")
    assert (loaded.out_head.weight is loaded.tok_emb.weight) == tied
    x = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    loaded.save_pretrained(tmp_path / "v2")  # and re-saved, in the new layout
    assert json.loads((tmp_path / "v2" / "config.json").read_text())["format_version"] == 2
    with torch.no_grad():
        reloaded = GPTModel.from_pretrained(tmp_path / "v2", backend="torch")
        torch.testing.assert_close(reloaded(x), model(x), rtol=0, atol=0)


def test_saved_tensors_have_hf_names_and_conv1d_layout(tmp_path):
    from safetensors.torch import load_file

    config = GPTConfig(vocab_size=97, context_length=32, emb_dim=32, n_heads=4, n_layers=2,
                       qkv_bias=False)  # fmt: skip
    model = GPTModel(config)
    model.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert "lm_head.weight" not in tensors  # tied: stored once, as transformers does
    assert set(tensors) == {
        "transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight",
        "transformer.ln_f.bias",
        *(f"transformer.h.{i}.{n}" for i in range(2) for n in (
            "ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias",
            "attn.c_proj.weight", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias",
            "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")),
    }  # fmt: skip
    fc1 = model.trf_blocks[1].ff.fc1.weight  # (4d, d)
    assert torch.equal(tensors["transformer.h.1.mlp.c_fc.weight"], fc1.detach().T)  # (d, 4d)
    assert torch.count_nonzero(tensors["transformer.h.0.attn.c_attn.bias"]) == 0  # no qkv bias
    info = json.loads((tmp_path / "config.json").read_text())
    assert info["qkv_bias"] is False and info["n_embd"] == 32 and info["model_type"] == "gpt2"


def test_refuses_newer_format_and_unsaveable_models(tmp_path):
    from fastgpt.lora import apply_lora

    config = GPTConfig(vocab_size=97, context_length=32, emb_dim=32, n_heads=4, n_layers=2)
    model = GPTModel(config)
    model.save_pretrained(tmp_path)
    info = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**info, "format_version": 3}))
    with pytest.raises(ValueError, match=r"format_version 3 .* newer fastgpt"):
        GPTModel.from_pretrained(tmp_path)
    apply_lora(model, rank=2, alpha=2.0)
    with pytest.raises(
        ValueError, match=r"without a GPT-2 name: .*lora_A.*save_pretrained_with_lora"
    ):
        model.save_pretrained(tmp_path / "lora")


@pytest.mark.parametrize("earlier", [None, b"the earlier model"])
def test_a_save_that_finds_the_disk_full_leaves_no_torn_file(tmp_path, monkeypatch, earlier):
    """safetensors writes part of the file, then the disk is full: DiskFullError names the
    file, and the folder holds what it held before (no half-written model.safetensors, no
    temporary file)."""
    import errno

    import safetensors.torch

    from fastgpt.errors import DiskFullError
    from fastgpt.weights import save_safetensors

    path = tmp_path / "model.safetensors"
    if earlier is not None:
        path.write_bytes(earlier)

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(DiskFullError, match=r"model\.safetensors"):
        save_safetensors({"w": torch.zeros(3)}, path)
    assert [p.name for p in tmp_path.iterdir()] == ([] if earlier is None else [path.name])
    if earlier is not None:
        assert path.read_bytes() == earlier
