"""LoRA: low-rank adaptation (Hu et al. 2021; the book's appendix E).

A frozen Linear W (out, in) is adapted by a trainable low-rank update:

    y = x Wᵀ + b + (alpha / r) · x Aᵀ Bᵀ        A (r, in), B (out, r)

A starts Kaiming-uniform and B at zero, so the adapted model starts exactly equal to the base
model, and only r·(in + out) numbers per layer are trained. After training the update folds
into the weight, W' = W + (alpha / r) · B A, giving a plain nn.Linear with no extra cost
(`merge_lora`).

    apply_lora(model, rank=8, alpha=16)        # freezes the model, wraps qkv/out_proj/fc1/fc2
    ... train ...
    merge_lora(model)                          # plain nn.Linear again, for save_pretrained
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fastgpt import hf_format
from fastgpt.errors import ConfigError
from fastgpt.weights import model_reference, read_safetensors, save_safetensors, write_json

LORA_TARGETS = ("att.qkv", "att.out_proj", "ff.fc1", "ff.fc2")
"""The Linear modules of each transformer block that `apply_lora` wraps."""


class LoRALinear(nn.Module):
    """A frozen nn.Linear `base` plus a trainable rank-`rank` update scaled by alpha / rank."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ValueError(f"LoRA rank must be a positive int, got {rank!r}")
        if not (math.isfinite(alpha) and alpha > 0):  # NaN would pass `alpha <= 0`
            raise ValueError(f"LoRA alpha must be a finite number > 0, got {alpha}")
        self.base = base
        base.requires_grad_(False)
        self.rank = rank
        self.alpha = float(alpha)
        self.scaling = self.alpha / rank
        weight = base.weight
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **factory))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **factory))  # (out, r)
        # The Linear layer's own default init, so x Aᵀ has a sensible scale from the start.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight (out, in) (what code reading `.weight` of a Linear expects)."""
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def delta_weight(self) -> torch.Tensor:
        """(alpha / r) · B A, shape (out, in): what merging adds to the base weight."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (..., in) -> (..., r) -> (..., out): never forms the (out, in) update.
        update = (x @ self.lora_A.t()) @ self.lora_B.t()
        return self.base(x) + update * self.scaling

    def merged(self) -> nn.Linear:
        """A plain nn.Linear computing the same function (weights copied; requires_grad as
        the base weight's)."""
        base = self.base
        linear = nn.Linear(
            base.in_features,
            base.out_features,
            bias=base.bias is not None,
            device=base.weight.device,
            dtype=base.weight.dtype,
        )
        with torch.no_grad():
            delta = self.delta_weight().float()
            linear.weight.copy_((base.weight.float() + delta).to(base.weight.dtype))
            if base.bias is not None:
                linear.bias.copy_(base.bias)
        return linear.requires_grad_(base.weight.requires_grad)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}"


def _get(module: nn.Module, dotted: str) -> nn.Module:
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


def _set(module: nn.Module, dotted: str, value: nn.Module) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        module = getattr(module, part)
    setattr(module, last, value)


def apply_lora(model: nn.Module, rank: int, alpha: float, include_head: bool = False) -> list[str]:
    """Freeze every parameter of `model`, then wrap att.qkv, att.out_proj, ff.fc1 and ff.fc2 of
    every transformer block (and out_head when include_head) in LoRALinear. Returns the names
    of the wrapped modules. Only the adapters are trainable afterwards; unfreeze anything else
    (e.g. a new classifier head) after calling this."""
    model.requires_grad_(False)
    names = [f"trf_blocks.{i}.{t}" for i in range(len(model.trf_blocks)) for t in LORA_TARGETS]
    if include_head:
        names.append("out_head")
    for name in names:
        module = _get(model, name)
        if isinstance(module, LoRALinear):
            raise ValueError(f"{name} already has a LoRA adapter")
        _set(model, name, LoRALinear(module, rank, alpha))
    return names


def merge_lora(model: nn.Module) -> int:
    """Replace every LoRALinear in `model` by its merged nn.Linear, in place. Returns how many
    were merged."""
    wrapped = [name for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name in wrapped:
        _set(model, name, _get(model, name).merged())
    return len(wrapped)


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def describe_parameters(model: nn.Module) -> str:
    """ "trainable 1,234 of 124,439,808 parameters (0.00%)" (a tied parameter counts once)."""
    params = list(model.parameters())  # parameters() already yields each tensor once
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    share = 100.0 * trainable / total if total else 0.0
    return f"trainable {trainable:,} of {total:,} parameters ({share:.2f}%)"


# --- saving and loading adapters ---------------------------------------------------------

PEFT_ADAPTERS_FILE = "adapter_model.safetensors"
PEFT_ADAPTERS_CONFIG = "adapter_config.json"
# The layout of fastgpt before PEFT's: still read, no longer written.
ADAPTERS_FILE = "lora.safetensors"
ADAPTERS_CONFIG = "lora.json"
_ADAPTER_FILES = (PEFT_ADAPTERS_FILE, PEFT_ADAPTERS_CONFIG, ADAPTERS_FILE, ADAPTERS_CONFIG)


def _lora_candidates(model: nn.Module) -> list[str]:
    """Every module name `apply_lora` can wrap (with include_head)."""
    blocks = range(len(model.trf_blocks))
    return [*(f"trf_blocks.{i}.{t}" for i in blocks for t in LORA_TARGETS), "out_head"]


def save_pretrained_with_lora(
    model: nn.Module,
    directory: str | Path,
    merge: bool = False,
    base_model: str | Path | None = None,
) -> Path:
    """Save a LoRA-adapted model. merge=True folds the adapters into plain weights first (the
    model is changed in place) and saves one plain checkpoint. Otherwise the frozen base model
    is saved via `save_pretrained` (config.json + model.safetensors, transformers' GPT-2
    layout) plus the adapters in PEFT's layout: adapter_model.safetensors (names such as
    base_model.model.transformer.h.0.attn.c_attn.lora_A.weight) and adapter_config.json (r,
    lora_alpha, target_modules c_attn/c_proj/c_fc, fan_in_fan_out; see `load_lora_adapters`).

    adapter_config.json's base_model_name_or_path, the model `peft.AutoPeftModelForCausalLM
    .from_pretrained(d)` puts the adapters on, is `base_model` (the hub name or folder the
    model was loaded from, all of it frozen but the adapters) for a language model, as its
    absolute path or hub repository; else (a classifier, whose new head exists only here, or
    no `base_model`) this folder itself. transformers with PEFT installed applies the adapters
    beside a folder's weights itself: `AutoModelForCausalLM.from_pretrained(d)` loads the
    adapted model too. A model without adapters is just `save_pretrained`-ed."""
    directory = Path(directory)
    if merge:
        merge_lora(model)
    wrapped = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    ranks = {m.rank for m in wrapped.values()}
    alphas = {m.alpha for m in wrapped.values()}
    if len(ranks) > 1 or len(alphas) > 1:
        raise ValueError(f"adapters of mixed rank/alpha cannot be saved: {ranks}, {alphas}")
    for name, module in wrapped.items():  # swap the bases in for saving, then back
        _set(model, name, module.base)
    try:
        model.save_pretrained(directory)
    finally:
        for name, module in wrapped.items():
            _set(model, name, module)
    for stale in _ADAPTER_FILES:  # adapters of an earlier save would be loaded with this one
        (directory / stale).unlink(missing_ok=True)
    if not wrapped:
        return directory
    classifier = model.out_head.out_features != model.config.padded_vocab_size
    hf_names = {name: hf_format.hf_module_name(name, classifier) for name in wrapped}
    tensors = {}
    for name, module in wrapped.items():
        for part in ("lora_A", "lora_B"):
            tensor = getattr(module, part).detach().contiguous().cpu()
            tensors[hf_format.peft_tensor_name(hf_names[name], part)] = tensor
    save_safetensors(tensors, directory / PEFT_ADAPTERS_FILE, metadata={"format": "pt"})
    candidates = [hf_format.hf_module_name(n, classifier) for n in _lora_candidates(model)]
    targets = hf_format.peft_target_modules(list(hf_names.values()), candidates)
    base = model_reference(directory if classifier or base_model is None else base_model)
    info = hf_format.peft_adapter_config(ranks.pop(), alphas.pop(), targets, not classifier, base)
    write_json(directory / PEFT_ADAPTERS_CONFIG, info)
    return directory


def _read_adapters(directory: Path) -> tuple[Path, int, float, dict[str, torch.Tensor]] | None:
    """(config path, rank, alpha, {"<our module>.lora_A"/".lora_B": tensor}) of the adapters
    in `directory`: PEFT's adapter_config.json, else fastgpt's older lora.json; None when
    there are none. ValueError for a malformed config or adapters fastgpt cannot hold."""
    peft = (directory / PEFT_ADAPTERS_CONFIG).is_file()
    config_path = directory / (PEFT_ADAPTERS_CONFIG if peft else ADAPTERS_CONFIG)
    if not config_path.is_file():
        return None
    if peft and (directory / ADAPTERS_CONFIG).is_file():
        raise ValueError(
            f"{directory} holds both {PEFT_ADAPTERS_CONFIG} and {ADAPTERS_CONFIG} (fastgpt's "
            "older layout): remove the one that does not belong to model.safetensors"
        )
    try:
        info = json.loads(config_path.read_text(encoding="utf-8"))
        if peft:
            rank, alpha = hf_format.read_peft_adapter_config(info)
        else:
            rank, alpha, names = int(info["rank"]), float(info["alpha"]), list(info["modules"])
        if not (math.isfinite(alpha) and alpha > 0):  # JSON may hold NaN or Infinity
            raise ValueError(f"alpha must be a finite number > 0, got {alpha}")
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{config_path}: malformed LoRA config ({exc!r})") from exc
    tensors_path = directory / (PEFT_ADAPTERS_FILE if peft else ADAPTERS_FILE)
    if not tensors_path.is_file():
        raise ValueError(f"{config_path}: {tensors_path.name} is missing beside it")
    tensors = read_safetensors(tensors_path)
    if not peft:  # our names already; only the modules lora.json lists
        return config_path, rank, alpha, {f"{n}.{p}": tensors.get(f"{n}.{p}") for n in names
                                          for p in ("lora_A", "lora_B")}  # fmt: skip
    ours = {}
    for key, tensor in tensors.items():
        module, lora, part = key.removeprefix(hf_format.PEFT_PREFIX).rpartition(".lora_")
        try:
            if not lora or part not in ("A.weight", "B.weight"):
                raise ValueError(f"{key} is not a LoRA matrix fastgpt reads")
            ours[f"{hf_format.our_module_name(module)}.lora_{part[0]}"] = tensor
        except ValueError as exc:
            raise ValueError(f"{tensors_path}: {exc}") from None
    return config_path, rank, alpha, ours


def load_lora_adapters(model: nn.Module, directory: str | Path, merge: bool = False) -> bool:
    """If the checkpoint folder `directory` (or the folder of a file in it) holds adapters
    (PEFT's adapter_config.json and adapter_model.safetensors, or fastgpt's older lora.json
    and lora.safetensors), wrap the modules they name and load them, leaving the model frozen
    but for them; with merge=True fold them straight into plain weights instead (requires_grad
    flags kept). Returns whether adapters were found; ValueError for a malformed or
    mismatched file."""
    directory = Path(directory)
    if directory.is_file():
        directory = directory.parent
    found = _read_adapters(directory)
    if found is None:
        return False
    config_path, rank, alpha, tensors = found
    names = sorted({key.rsplit(".", 1)[0] for key in tensors})
    bases = {}  # every adapter is checked before the model is touched
    for name in names:
        try:
            base = bases[name] = _get(model, name)
        except AttributeError:
            raise ValueError(f"{config_path}: the model has no module {name!r}") from None
        shapes = {"lora_A": (rank, base.in_features), "lora_B": (base.out_features, rank)}
        for part, shape in shapes.items():
            key = f"{name}.{part}"
            if tensors.get(key) is None or tuple(tensors[key].shape) != shape:
                raise ValueError(f"{config_path}: missing or mis-shaped adapter {key}")
    if not merge:
        model.requires_grad_(False)
    for name, base in bases.items():
        trainable = base.weight.requires_grad
        layer = LoRALinear(base, rank, alpha)  # freezes base
        with torch.no_grad():
            layer.lora_A.copy_(tensors[f"{name}.lora_A"])
            layer.lora_B.copy_(tensors[f"{name}.lora_B"])
        if merge:
            base.requires_grad_(trainable)
            layer = layer.merged()
        _set(model, name, layer)
    return True


# --- the options of both fine-tuning commands -------------------------------------------


@dataclass
class LoRAOptions:
    """LoRA as the fine-tuning commands take it (all off by default)."""

    lora_rank: int | None = field(default=None, metadata={"metavar": "R"})
    """Adapter rank (off by default)."""
    lora_alpha: float | None = field(default=None, metadata={"metavar": "A"})
    """Scale alpha/R of the update (default 2R)."""
    lora_head: bool = False
    """Also put an adapter on the output head."""
    merge: bool = False
    """Fold the adapters into plain Linear weights when saving (default: save the base model
    plus the adapters, adapter_model.safetensors)."""

    def __post_init__(self) -> None:
        if self.lora_rank is None:
            for name in ("lora_alpha", "lora_head", "merge"):
                if getattr(self, name):
                    raise ConfigError(name, "needs {lora_rank}")
            return
        if self.lora_rank < 1:
            raise ConfigError("lora_rank", f"must be >= 1, got {self.lora_rank}")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise ConfigError("lora_alpha", f"must be > 0, got {self.lora_alpha}")

    def apply(self, model: nn.Module) -> list[str]:
        """`apply_lora` with these options (alpha defaults to 2·rank); nothing without a rank."""
        if not self.lora_rank:
            return []
        alpha = self.lora_alpha if self.lora_alpha is not None else 2.0 * self.lora_rank
        # qkv, out_proj, fc1 and fc2 have emb_dim on one side: a larger rank adds parameters,
        # not expressiveness (a small head, e.g. a classifier's, may well take a larger one).
        width = model.config.emb_dim
        if self.lora_rank > width:
            raise ConfigError(
                "lora_rank", f"must be at most {width}, the width of the adapted layers "
                f"(emb_dim), got {self.lora_rank}"
            )  # fmt: skip
        return apply_lora(model, self.lora_rank, alpha, include_head=self.lora_head)
