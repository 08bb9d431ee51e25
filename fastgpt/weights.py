"""Loading and saving GPT-2 weights.

Two folder formats are understood, both a `config.json` beside `model.safetensors` (or, for
Hugging Face, `pytorch_model.bin`):

- Hugging Face `GPT2LMHeadModel` (OpenAI's GPT-2 on the hub): config.json has "n_embd",
  "n_layer", ...; tensors are named transformer.h.{i}.attn.c_attn.weight etc. and the linear
  layers are `Conv1D`s that store their weight as (in, out), so each one is transposed into our
  `nn.Linear` (out, in). c_attn stays fused as our `att.qkv` (same [q | k | v] layout).
- Ours (`save_pretrained`): config.json is our `GPTConfig` plus "format": "fastgpt"; tensors
  carry our own names (`trf_blocks.0.att.qkv.weight`, ...), a tied head is stored once.

Any missing, unexpected or mis-shaped tensor raises a ValueError that lists all of them.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from fastgpt.config import GPTConfig

FORMAT_NAME = "fastgpt"
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
HF_MODEL_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
# Tensors of transformer block i: Hugging Face "h.{i}.<key>" -> ours "trf_blocks.{i}.<value>".
_HF_BLOCK_NAMES = {
    "ln_1.weight": "norm1.weight",
    "ln_1.bias": "norm1.bias",
    "attn.c_attn.weight": "att.qkv.weight",  # fused [q | k | v], kept fused
    "attn.c_attn.bias": "att.qkv.bias",
    "attn.c_proj.weight": "att.out_proj.weight",
    "attn.c_proj.bias": "att.out_proj.bias",
    "ln_2.weight": "norm2.weight",
    "ln_2.bias": "norm2.bias",
    "mlp.c_fc.weight": "ff.fc1.weight",
    "mlp.c_fc.bias": "ff.fc1.bias",
    "mlp.c_proj.weight": "ff.fc2.weight",
    "mlp.c_proj.bias": "ff.fc2.bias",
}
# Buffers some Hugging Face GPT-2 checkpoints carry (the causal mask); not parameters.
_HF_IGNORED = re.compile(r"(^|\.)attn\.(bias|masked_bias)$")


# --- configs -----------------------------------------------------------------------------


def is_hf_config(data: dict[str, Any]) -> bool:
    return data.get("format") != FORMAT_NAME and ("n_embd" in data or "n_layer" in data)


def config_from_hf(data: dict[str, Any], **overrides: Any) -> GPTConfig:
    """Our GPTConfig from a Hugging Face GPT2Config dict; refuses variants we do not model."""
    d = data["n_embd"]
    unsupported = []
    if data.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        unsupported.append(f"activation_function={data['activation_function']!r}")
    if data.get("n_inner") not in (None, 4 * d):
        unsupported.append(f"n_inner={data['n_inner']} (we use 4·n_embd = {4 * d})")
    if abs(data.get("layer_norm_epsilon", 1e-5) - 1e-5) > 1e-12:
        unsupported.append(f"layer_norm_epsilon={data['layer_norm_epsilon']} (we use 1e-5)")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if data.get(flag):
            unsupported.append(f"{flag}=True")
    if data.get("scale_attn_weights", True) is False:
        unsupported.append("scale_attn_weights=False")
    if unsupported:
        raise ValueError("unsupported GPT-2 config: " + ", ".join(unsupported))
    fields = dict(
        vocab_size=data["vocab_size"],
        context_length=data.get("n_positions", data.get("n_ctx", 1024)),
        emb_dim=d,
        n_heads=data["n_head"],
        n_layers=data["n_layer"],
        drop_rate=data.get("resid_pdrop", 0.1),
        qkv_bias=True,
        tie_embeddings=data.get("tie_word_embeddings", True),
    )
    return GPTConfig(**{**fields, **overrides})


def read_config(directory: Path, **overrides: Any) -> tuple[GPTConfig, dict[str, Any], bool]:
    """(config, raw json, is_hf) for the checkpoint folder `directory`."""
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}")
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: line {exc.lineno}: invalid JSON: {exc.msg}") from exc
    if is_hf_config(data):
        return config_from_hf(data, **overrides), data, True
    names = {"vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"}
    if not names <= data.keys():
        raise ValueError(
            f"{path} is neither a fastgpt nor a Hugging Face GPT-2 config "
            f"(missing {sorted(names - data.keys())})"
        )
    config = GPTConfig.from_dict({**data, **overrides})
    return config, data, False


# --- tensors -----------------------------------------------------------------------------


def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of model.safetensors (preferred) or pytorch_model.bin in `directory`."""
    safetensors_path = directory / WEIGHTS_NAME
    bin_path = directory / "pytorch_model.bin"
    if safetensors_path.is_file():
        from safetensors.torch import load_file

        return load_file(str(safetensors_path))
    if bin_path.is_file():
        return torch.load(bin_path, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no {WEIGHTS_NAME} or pytorch_model.bin in {directory}")


def hf_to_fastgpt(hf: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """Rename (and transpose) Hugging Face GPT-2 tensors into our state-dict names.

    Raises ValueError listing tensors that are missing from `hf` or not used."""
    # Hub checkpoints come both with and without the "transformer." prefix.
    src = {k.removeprefix("transformer."): v for k, v in hf.items() if not _HF_IGNORED.search(k)}
    out: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    used: set[str] = set()

    def take(hf_name: str, our_name: str, transpose: bool = False) -> None:
        if hf_name not in src:
            missing.append(hf_name)
            return
        used.add(hf_name)
        t = src[hf_name]
        # Conv1D stores (in, out); nn.Linear wants (out, in).
        out[our_name] = t.t().contiguous() if transpose and t.dim() == 2 else t

    take("wte.weight", "tok_emb.weight")
    take("wpe.weight", "pos_emb.weight")
    for i in range(config.n_layers):
        for hf_name, our_name in _HF_BLOCK_NAMES.items():
            # Conv1D weights (every 2-D tensor of a block) are transposed.
            take(f"h.{i}.{hf_name}", f"trf_blocks.{i}.{our_name}", transpose=True)
    take("ln_f.weight", "final_norm.weight")
    take("ln_f.bias", "final_norm.bias")
    if "lm_head.weight" in src:
        used.add("lm_head.weight")
        if not config.tie_embeddings:
            out["out_head.weight"] = src["lm_head.weight"]
        elif "wte.weight" in src and not torch.equal(src["lm_head.weight"], src["wte.weight"]):
            raise ValueError("lm_head.weight differs from wte.weight but the config ties them")
    elif not config.tie_embeddings:
        missing.append("lm_head.weight")
    unexpected = sorted(set(src) - used)
    if missing or unexpected:
        raise ValueError(_listing("Hugging Face GPT-2 checkpoint", missing, unexpected, []))
    return out


def _listing(what: str, missing: list[str], unexpected: list[str], misshaped: list[str]) -> str:
    parts = [f"{what} does not match the model:"]
    if missing:
        parts.append(f"  missing tensors ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        parts.append(f"  unexpected tensors ({len(unexpected)}): {', '.join(unexpected)}")
    if misshaped:
        parts.append(f"  mis-shaped tensors ({len(misshaped)}): {', '.join(misshaped)}")
    return "\n".join(parts)


def load_state_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Copy `state` into `model`, raising one ValueError that lists every missing,
    unexpected or mis-shaped tensor (a tied head may be absent from `state`)."""
    expected = model.state_dict()
    tied = getattr(model, "out_head", None) is not None and (
        model.out_head.weight is model.tok_emb.weight
    )
    optional = {"out_head.weight"} if tied else set()
    missing = sorted(k for k in expected if k not in state and k not in optional)
    unexpected = sorted(k for k in state if k not in expected)
    misshaped = sorted(
        f"{k} (checkpoint {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
        for k in state
        if k in expected and state[k].shape != expected[k].shape
    )
    if missing or unexpected or misshaped:
        raise ValueError(_listing(what, missing, unexpected, misshaped))
    if tied and "out_head.weight" in state:
        if not torch.equal(state["out_head.weight"], state["tok_emb.weight"]):
            raise ValueError(f"{what}: out_head.weight differs from the tied tok_emb.weight")
        state = {k: v for k, v in state.items() if k != "out_head.weight"}
    model.load_state_dict(state, strict=False)


# --- public entry points -----------------------------------------------------------------


def resolve_checkpoint_dir(name_or_path: str | Path) -> Path:
    """A local folder as is; a hub name ("gpt2", ...) downloaded with huggingface_hub."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.is_file() and path.name in (WEIGHTS_NAME, CONFIG_NAME, "pytorch_model.bin"):
        return path.parent  # a file of a checkpoint: its folder
    name = str(name_or_path)
    hub_name = {"gpt2-small": "gpt2"}.get(name, name)
    if hub_name not in HF_MODEL_NAMES and (path.exists() or "/" in name or path.suffix):
        raise FileNotFoundError(f"{name_or_path} is not a checkpoint folder")
    if hub_name not in HF_MODEL_NAMES:
        raise ValueError(
            f"{name!r} is neither a folder nor a known GPT-2 name ({', '.join(HF_MODEL_NAMES)})"
        )
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise RuntimeError(
            f"downloading {hub_name!r} needs the huggingface_hub package "
            "(pip install huggingface_hub), or pass a local folder with config.json and "
            "model.safetensors"
        ) from exc
    repo_id = f"openai-community/{hub_name}"
    try:
        local = Path(snapshot_download(repo_id=repo_id, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME]))
        if not (local / WEIGHTS_NAME).is_file():  # older uploads: pickle only
            local = Path(snapshot_download(repo_id=repo_id, allow_patterns=["pytorch_model.bin"]))
    except Exception as exc:  # offline, hub unreachable, ...
        raise RuntimeError(
            f"could not download {hub_name!r} from the Hugging Face hub ({exc}); "
            "pass a local folder with config.json and model.safetensors instead"
        ) from exc
    return local


def from_pretrained(
    name_or_path: str | Path,
    backend: str = "auto",
    model_cls: type | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    merge_adapters: bool = True,
    **config_overrides: Any,
):
    """A GPTModel with weights from a Hugging Face GPT-2 folder, one of our checkpoints (see
    `save_pretrained`; LoRA adapters saved beside it are folded in unless
    merge_adapters=False, see `load_checkpoint`), or a hub name. `config_overrides` replace
    config fields that do not change tensor shapes (e.g. drop_rate=0.0). The model is in eval
    mode."""
    if model_cls is None:
        from fastgpt.model import GPTModel as model_cls
    directory = resolve_checkpoint_dir(name_or_path)
    config, _, is_hf = read_config(directory, **config_overrides)
    if not is_hf:
        return load_checkpoint(
            directory, backend, model_cls, device, dtype, merge_adapters, **config_overrides
        )
    tensors = read_tensors(directory)
    state = hf_to_fastgpt(tensors, config)
    model = model_cls(config, backend=backend)
    load_state_strict(model, state, f"Hugging Face checkpoint {directory}")
    return _finish(model, device, dtype)


def load_checkpoint(
    directory: str | Path,
    backend: str = "auto",
    model_cls: type | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    merge_adapters: bool = True,
    **config_overrides: Any,
):
    """A GPTModel from a folder written by `save_pretrained`. A LoRA fine-tuning saved without
    --merge leaves its adapters beside the base weights (lora.json, lora.safetensors): they are
    folded into the weights here, so the folder loads as the fine-tuned model it is. With
    merge_adapters=False the base alone loads (`fastgpt.lora.load_lora_adapters` adds them)."""
    if model_cls is None:
        from fastgpt.model import GPTModel as model_cls
    directory = Path(directory)
    config, raw, is_hf = read_config(directory, **config_overrides)
    if is_hf:
        raise ValueError(f"{directory} holds a Hugging Face checkpoint; use from_pretrained")
    model = model_cls(config, backend=backend)
    head = raw.get("out_head")
    if head and (head["out_features"] != config.vocab_size or head["bias"] or not head["tied"]):
        # e.g. a classifier whose head was replaced by Linear(emb_dim, num_classes)
        model.out_head = torch.nn.Linear(config.emb_dim, head["out_features"], bias=head["bias"])
    load_state_strict(model, read_tensors(directory), f"checkpoint {directory}")
    if merge_adapters:
        from fastgpt.lora import load_lora_adapters

        load_lora_adapters(model, directory, merge=True)
    return _finish(model, device, dtype)


def _finish(model, device, dtype):
    if device is not None:
        model.to(device)
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def save_safetensors(tensors: dict, path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, with the file readable as any file this process writes
    (safetensors 0.8 creates it with mode 0600, whatever the umask)."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def save_pretrained(model, directory: str | Path) -> Path:
    """Write `model.safetensors` (our tensor names; a tied head stored once) and
    `config.json` (our GPTConfig + format, out_head shape, parameter dtype) into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tied = model.out_head.weight is model.tok_emb.weight
    state = {
        k: v.detach().contiguous().cpu()
        for k, v in model.state_dict().items()
        if not (tied and k == "out_head.weight")
    }
    save_safetensors(state, directory / WEIGHTS_NAME, metadata={"format": "pt"})
    config = model.config.to_dict()
    config["tie_embeddings"] = tied
    info = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        **config,
        "out_head": {
            "out_features": model.out_head.out_features,
            "bias": model.out_head.bias is not None,
            "tied": tied,
        },
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "num_parameters": sum(p.numel() for p in model.parameters()),
    }
    with open(directory / CONFIG_NAME, "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)
        f.write("\n")
    return directory
