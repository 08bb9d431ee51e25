"""GPTConfig: the hyperparameters that define a GPT-2 model's shape.

config = GPTConfig.from_name("gpt2-small")   # or "gpt2", "gpt2-medium", ..., "tiny"
config = GPTConfig.from_json("checkpoint/config.json")
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class GPTConfig:
    """Shape of a GPT-2 model. Defaults are GPT-2 small (124M parameters)."""

    vocab_size: int = 50257
    """Number of token ids (GPT-2 BPE: 50257, the last one is <|endoftext|>)."""
    context_length: int = 1024
    """Longest sequence the model accepts, in tokens (size of the position embedding)."""
    emb_dim: int = 768
    """Width of the residual stream, d."""
    n_heads: int = 12
    """Attention heads per layer; emb_dim must be a multiple of it."""
    n_layers: int = 12
    """Number of transformer blocks."""
    drop_rate: float = 0.1
    """Dropout probability on embeddings, attention weights and residual branches."""
    qkv_bias: bool = True
    """Whether the query/key/value projection has a bias (OpenAI's weights have one)."""
    tie_embeddings: bool = True
    """Whether the output head shares its weight with the token embedding (as in GPT-2)."""
    vocab_multiple: int = 1
    """Pad the embedding and output head to a multiple of this many rows (128: 50257 -> 50304,
    tensor-core friendly). The extra rows never receive probability: logits, losses,
    generation and saved weights are the unpadded model's."""

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "context_length",
            "emb_dim",
            "n_heads",
            "n_layers",
            "vocab_multiple",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.emb_dim % self.n_heads != 0:
            raise ValueError(
                f"GPTConfig.emb_dim ({self.emb_dim}) must be a multiple of n_heads ({self.n_heads})"
            )
        if not 0.0 <= self.drop_rate < 1.0:
            raise ValueError(f"GPTConfig.drop_rate must be in [0, 1), got {self.drop_rate}")
        memory = _physical_memory()
        if memory is not None and 4 * self.num_parameters > memory:  # before any allocation
            raise ValueError(
                f"GPTConfig: vocab_size {self.vocab_size}, emb_dim {self.emb_dim}, n_layers "
                f"{self.n_layers}, context_length {self.context_length} make "
                f"{self.num_parameters:.3g} parameters, {4 * self.num_parameters / 2**30:,.0f} "
                f"GiB in fp32, more than this machine's {memory / 2**30:,.0f} GiB of memory"
            )

    @property
    def num_parameters(self) -> int:
        """Parameters of a GPTModel of this shape (padded vocabulary rows included): the
        embeddings, and per layer two LayerNorms, qkv, out_proj and the 4d feed-forward."""
        d, rows = self.emb_dim, self.padded_vocab_size
        embeddings = rows * d * (1 if self.tie_embeddings else 2) + self.context_length * d
        layer = 4 * d + 3 * d * d + 3 * d * self.qkv_bias + d * d + d + 8 * d * d + 5 * d
        return embeddings + self.n_layers * layer + 2 * d

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the token embedding and output head: vocab_size rounded up to
        vocab_multiple."""
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

    @property
    def head_dim(self) -> int:
        """Width of one attention head, emb_dim // n_heads."""
        return self.emb_dim // self.n_heads

    # --- presets -------------------------------------------------------------------------

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> GPTConfig:
        """A preset by name ("gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl", "tiny";
        aliases "gpt2", "small", "124M", ...), with fields optionally overridden."""
        key = _ALIASES.get(name.lower(), name.lower())
        if key not in PRESETS:
            known = ", ".join(sorted(PRESETS))
            raise ValueError(f"unknown model preset {name!r}; known presets: {known}")
        return cls(**{**PRESETS[key], **overrides})

    @classmethod
    def from_spec(cls, spec: str | Path, **overrides: Any) -> GPTConfig:
        """A preset name, a config.json path, or a folder holding one (a --model option),
        with fields optionally overridden."""
        path = Path(spec).expanduser()
        if path.is_dir() and (path / "config.json").is_file():
            path = path / "config.json"
        if path.is_file():
            config = cls.from_json(path)
            return dataclasses.replace(config, **overrides) if overrides else config
        if path.suffix == ".json":
            raise FileNotFoundError(f"model config not found: {path}")
        return cls.from_name(str(spec), **overrides)

    # --- serialization -------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GPTConfig:
        """Build from a dict; keys that are not GPTConfig fields are ignored (so a config.json
        may carry extra information such as the format name). A Hugging Face GPT2Config dict
        ("n_embd", "n_layer", ...) is converted."""
        if is_hf_config(data):
            return config_from_hf(data)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def from_json(cls, path: str | Path) -> GPTConfig:
        """Read a config.json (ours or Hugging Face's); ValueError naming the file and line
        for malformed JSON, or the file for a wrong field."""
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"{path}:{exc.lineno}:{exc.colno}: malformed JSON: {exc.msg}"
                ) from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError, KeyError) as exc:
            raise ValueError(f"{path}: {exc}") from exc

    def to_json(self, path: str | Path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")


_GPT2 = dict(vocab_size=50257, context_length=1024, drop_rate=0.1, qkv_bias=True)

PRESETS: dict[str, dict[str, Any]] = {
    "gpt2-small": dict(_GPT2, emb_dim=768, n_layers=12, n_heads=12),  # 124M
    "gpt2-medium": dict(_GPT2, emb_dim=1024, n_layers=24, n_heads=16),  # 355M
    "gpt2-large": dict(_GPT2, emb_dim=1280, n_layers=36, n_heads=20),  # 774M
    "gpt2-xl": dict(_GPT2, emb_dim=1600, n_layers=48, n_heads=25),  # 1558M
    # The book's GPT_CONFIG_124M for training from scratch (chapter 5): no q/k/v bias, an
    # untied output head (162M parameters).
    "gpt2-small-book": dict(
        _GPT2, emb_dim=768, n_layers=12, n_heads=12, qkv_bias=False, tie_embeddings=False
    ),
    # A model that runs in milliseconds on CPU, even through the Triton interpreter.
    "tiny": dict(
        vocab_size=50257, context_length=64, emb_dim=32, n_layers=2, n_heads=4, drop_rate=0.0
    ),
}

_ALIASES: dict[str, str] = {
    "gpt2": "gpt2-small",
    "small": "gpt2-small",
    "124m": "gpt2-small",
    "gpt2-124m": "gpt2-small",
    "medium": "gpt2-medium",
    "355m": "gpt2-medium",
    "gpt2-355m": "gpt2-medium",
    "large": "gpt2-large",
    "774m": "gpt2-large",
    "gpt2-774m": "gpt2-large",
    "xl": "gpt2-xl",
    "1558m": "gpt2-xl",
    "gpt2-1558m": "gpt2-xl",
}


# --- Hugging Face's GPT2Config ------------------------------------------------------------


def _physical_memory() -> int | None:
    """Bytes of memory this machine has (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def is_hf_config(data: dict[str, Any]) -> bool:
    """Whether a config.json dict is Hugging Face's GPT2Config (not one of ours)."""
    return data.get("format") != "fastgpt" and ("n_embd" in data or "n_layer" in data)


def config_from_hf(data: dict[str, Any], **overrides: Any) -> GPTConfig:
    """Our GPTConfig from a Hugging Face GPT2Config dict; refuses variants we do not model."""
    missing = sorted({"vocab_size", "n_embd", "n_head", "n_layer"} - data.keys())
    if missing:
        raise ValueError(f"a Hugging Face GPT-2 config without {', '.join(missing)}")
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
