"""Loading and saving GPT-2 weights: plain tensor and config I/O.

Three folder layouts are read, each a `config.json` beside `model.safetensors` (or, for
Hugging Face, `pytorch_model.bin`):

- Hugging Face `GPT2LMHeadModel` (OpenAI's GPT-2 on the hub): config.json has "n_embd",
  "n_layer", ...; tensors are named transformer.h.{i}.attn.c_attn.weight etc. and the linear
  layers are `Conv1D`s that store their weight as (in, out), so each one is transposed into our
  `nn.Linear` (out, in). c_attn stays fused as our `att.qkv` (same [q | k | v] layout).
- Ours, format_version 2 (what `GPTModel.save_pretrained` writes now): the Hugging Face layout
  above, with our GPTConfig fields and "format": "fastgpt" beside GPT2Config's in config.json
  (see `fastgpt/hf_format.py`), so that transformers loads it too.
- Ours, format_version 1 (written before): config.json is our `GPTConfig` plus "format":
  "fastgpt"; tensors carry our own names (`trf_blocks.0.att.qkv.weight`, ...), a tied head is
  stored once.

Any missing, unexpected or mis-shaped tensor raises a ValueError that lists all of them. This
module reads and writes tensors and configs only; `GPTModel.from_pretrained` builds the model.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from fastgpt.errors import UsageError
from fastgpt.files import write_atomically
from fastgpt.hf_format import HF_BLOCK_NAMES
from fastgpt.model_config import GPTConfig, config_from_hf, is_hf_config

FORMAT_NAME = "fastgpt"
FORMAT_VERSION = 2  # 1: our own tensor names; 2: Hugging Face's GPT-2 layout (hf_format.py)
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
HF_MODEL_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
# Buffers some Hugging Face GPT-2 checkpoints carry (the causal mask); not parameters.
_HF_IGNORED = re.compile(r"(^|\.)attn\.(bias|masked_bias)$")


# --- configs -----------------------------------------------------------------------------


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
        return read_safetensors(safetensors_path)
    if bin_path.is_file():
        try:  # weights_only: tensors and plain containers, a pickle that runs code is refused
            return torch.load(bin_path, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, pickle.UnpicklingError) as exc:
            raise UsageError(
                f"{bin_path}: not a readable weights file ({_first_line(exc)})"
            ) from None
    raise FileNotFoundError(f"no {WEIGHTS_NAME} or pytorch_model.bin in {directory}")


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file; UsageError naming the file when it is empty,
    truncated or not safetensors."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise UsageError(
            f"{path}: not a readable safetensors file ({_first_line(exc)}); save the model again"
        ) from None


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__


def hf_to_fastgpt(hf: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """Rename (and transpose) Hugging Face GPT-2 tensors into our state-dict names. The head is
    lm_head.weight (untied), or score.weight (and score.bias) for a classifier; with
    config.qkv_bias False, c_attn biases may be absent (then `drop_zero_qkv_bias` applies).

    Raises ValueError listing tensors that are missing from `hf` or not used."""
    # Hub checkpoints come both with and without the "transformer." prefix.
    src = {k.removeprefix("transformer."): v for k, v in hf.items() if not _HF_IGNORED.search(k)}
    out: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    used: set[str] = set()

    def take(hf_name: str, our_name: str, transpose: bool = False) -> None:
        if hf_name not in src:
            if not (hf_name.endswith("attn.c_attn.bias") and not config.qkv_bias):
                missing.append(hf_name)
            return
        used.add(hf_name)
        t = src[hf_name]
        # Conv1D stores (in, out); nn.Linear wants (out, in).
        out[our_name] = t.t().contiguous() if transpose and t.dim() == 2 else t

    take("wte.weight", "tok_emb.weight")
    take("wpe.weight", "pos_emb.weight")
    for i in range(config.n_layers):
        for hf_name, our_name in HF_BLOCK_NAMES.items():
            # Conv1D weights (every 2-D tensor of a block) are transposed.
            take(f"h.{i}.{hf_name}", f"trf_blocks.{i}.{our_name}", transpose=True)
    take("ln_f.weight", "final_norm.weight")
    take("ln_f.bias", "final_norm.bias")
    _take_head(src, config, out, missing, used)
    unexpected = sorted(set(src) - used)
    if missing or unexpected:
        raise ValueError(_listing("Hugging Face GPT-2 checkpoint", missing, unexpected, []))
    return out


def _take_head(src: dict, config: GPTConfig, out: dict, missing: list, used: set) -> None:
    """The output head of `hf_to_fastgpt`: a classifier's score.*, or lm_head.*."""
    prefix = "score" if "score.weight" in src else "lm_head"
    for part in ("weight", "bias"):
        name = f"{prefix}.{part}"
        if name in src:
            used.add(name)
            out[f"out_head.{part}"] = src[name]
    if prefix == "score" or "lm_head.bias" in src:
        return
    if "lm_head.weight" not in src:
        if not config.tie_embeddings:
            missing.append("lm_head.weight")
    elif config.tie_embeddings:
        del out["out_head.weight"]  # the tied copy
        if "wte.weight" in src and not torch.equal(src["lm_head.weight"], src["wte.weight"]):
            raise ValueError("lm_head.weight differs from wte.weight but the config ties them")


def uses_hf_names(raw: dict[str, Any], is_hf: bool) -> bool:
    """Whether the folder whose config.json is `raw` stores Hugging Face's tensor names (a
    Hugging Face folder, or ours from format_version 2 on) rather than ours (version 1)."""
    if is_hf:
        return True
    version = raw.get("format_version", 1)
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise ValueError(
            f"checkpoint format_version {version!r} is not one this fastgpt reads (1 to "
            f"{FORMAT_VERSION}); it was written by a newer fastgpt"
        )
    return version >= 2


def replaced_head(tensors: dict[str, torch.Tensor], vocab_size: int) -> tuple[int, bool] | None:
    """(out_features, bias) of the output head the tensors (our names) hold when it is not
    GPTModel's own Linear(emb_dim, vocab_size, bias=False), e.g. a classifier's; else None."""
    weight = tensors.get("out_head.weight")
    has_bias = "out_head.bias" in tensors
    if weight is None or (weight.shape[0] == vocab_size and not has_bias):
        return None
    return weight.shape[0], has_bias


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
    repo_id = hub_repo_id(name)
    if repo_id is None and (path.exists() or "/" in name or path.suffix):
        raise FileNotFoundError(f"{name_or_path} is not a checkpoint folder")
    if repo_id is None:
        raise ValueError(
            f"{name!r} is neither a folder nor a known GPT-2 name ({', '.join(HF_MODEL_NAMES)})"
        )
    hub_name = repo_id.rpartition("/")[2]
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise RuntimeError(
            f"downloading {hub_name!r} needs the huggingface_hub package "
            "(pip install huggingface_hub), or pass a local folder with config.json and "
            "model.safetensors"
        ) from exc
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


def hub_repo_id(name: str) -> str | None:
    """The Hugging Face hub repository of OpenAI's GPT-2 `name` ("gpt2", "gpt2-small",
    "gpt2-medium", "gpt2-large", "gpt2-xl"): "openai-community/gpt2", ...; else None."""
    name = {"gpt2-small": "gpt2"}.get(name, name)
    return f"openai-community/{name}" if name in HF_MODEL_NAMES else None


def model_reference(name_or_path: str | Path) -> str:
    """How a folder written elsewhere names the model `name_or_path` (a folder: its absolute
    path; a GPT-2 name: its hub repository), e.g. as the base of LoRA adapters."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return str(path.resolve())
    return hub_repo_id(str(name_or_path)) or str(name_or_path)


def save_safetensors(tensors: dict, path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file through `write_atomically` (a failed save leaves no torn file),
    with the file readable as any file this process writes (safetensors 0.8 creates it with
    mode 0600, whatever the umask)."""
    from safetensors.torch import save_file

    umask = os.umask(0)
    os.umask(umask)

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, 0o666 & ~umask)

    write_atomically(Path(path), write)


def write_json(path: Path, data: Any) -> None:
    """`data` as indented JSON (UTF-8, a final newline): the config files of a folder."""
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def save_checkpoint(
    directory: str | Path,
    state: dict[str, torch.Tensor],
    config: dict[str, Any],
    out_head: dict[str, Any],
    num_parameters: int,
    hf_config: dict[str, Any] | None = None,
    generation_config: dict[str, Any] | None = None,
    tokenizer_config: dict[str, Any] | None = None,
) -> Path:
    """Write our format into `directory` (created): model.safetensors with `state` (tensor
    names as given: Hugging Face's from `GPTModel.save_pretrained`) and config.json with the
    GPT2Config fields `hf_config`, then `config` (GPTConfig fields), the format's name and
    version, the output head's shape `out_head` and the parameters' dtype. Beside them, when
    given: generation_config.json, and GPT-2's BPE as vocab.json and merges.txt with
    tokenizer_config.json (left out, with a warning, when tiktoken cannot load the BPE: the
    weights are never lost to a missing tokenizer)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    save_safetensors(tensors, directory / WEIGHTS_NAME, metadata={"format": "pt"})
    dtype = next(iter(tensors.values())).dtype if tensors else torch.float32
    info = {
        **(hf_config or {}),
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        **config,
        "out_head": out_head,
        "dtype": str(dtype).removeprefix("torch."),
        "num_parameters": num_parameters,
    }
    write_json(directory / CONFIG_NAME, info)
    if generation_config is not None:
        write_json(directory / GENERATION_CONFIG_NAME, generation_config)
    if tokenizer_config is not None:
        from fastgpt.tokenizer import TokenizerUnavailableError, save_hf_vocab_and_merges

        try:
            save_hf_vocab_and_merges(directory)
        except TokenizerUnavailableError as exc:  # offline without tiktoken's cache: the model
            warnings.warn(f"{directory}: saved without the tokenizer files: {exc}", stacklevel=2)
        else:
            write_json(directory / TOKENIZER_CONFIG_NAME, tokenizer_config)
    return directory


def vocab_rows(tensors: dict[str, torch.Tensor], rows: int, to: int) -> dict[str, torch.Tensor]:
    """The token embedding and a language head (tensors of `rows` rows) cut or zero-padded to
    `to` rows; other tensors as they are. How a padded vocabulary is saved unpadded and
    loaded padded again."""
    if rows == to:
        return tensors
    out = dict(tensors)
    for name in ("tok_emb.weight", "out_head.weight"):
        t = out.get(name)
        if t is None or t.shape[0] != rows:
            continue  # absent (tied) or a classifier's head
        if to < rows:
            out[name] = t[:to]
        else:
            out[name] = torch.cat([t, t.new_zeros(to - rows, *t.shape[1:])])
    return out
