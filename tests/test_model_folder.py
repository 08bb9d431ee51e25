"""Every model folder fastgpt writes is a whole Hugging Face model repository: the tokenizer
(GPT-2's BPE as vocab.json, merges.txt, tokenizer_config.json, made from tiktoken's ranks) and
generation_config.json beside the weights, so that AutoTokenizer, pipeline("text-generation"),
PEFT's AutoPeftModelForCausalLM and lm-evaluation-harness work on it as they do on OpenAI's
GPT-2. The folders: a tiny model pretrained by `fastgpt pretrain`, LoRA adapters trained from it
by `fastgpt finetune-instruct` (saved as adapters, and merged), and `save_pretrained`."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import fastgpt
from fastgpt.cli import main
from fastgpt.hf_format import hf_generation_config
from fastgpt.model import GPTModel
from fastgpt.model_config import GPTConfig
from fastgpt.tokenizer import EOT_ID, byte_level_alphabet, encode, hf_vocab_and_merges

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

CONTEXT = 64
# Unicode, emoji, runs of spaces, tabs and newlines, contractions, digits, <|endoftext|>.
MIXED_TEXT = (
    "Every effort moves you.  Déjà vu — naïve café, 東京 and Ελληνικά 🤖🚀👩‍💻!\n\n\n"
    "    indented\tand\t\ttabbed   trailing   \nI'm sure they'll've 12345 3.14159<|endoftext|>"
    " next document\r\n \n"
)
HF_FILES = ("config.json", "model.safetensors", "generation_config.json", "vocab.json",
            "merges.txt", "tokenizer_config.json")  # fmt: skip


def run_cli(*argv) -> int:
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """{"pretrain", "lora", "merged", "save_pretrained"}: the folders of the module's tests.
    pretrain: a tiny model trained 30 steps on the-verdict.txt; lora and merged: LoRA
    fine-tuned from it (finetune-instruct --init that folder) without and with --merge."""
    data = Path(os.environ.get("FASTGPT_DATA_DIR", "/nonexistent"))
    if not (data / "the-verdict.txt").is_file():
        pytest.skip("FASTGPT_DATA_DIR is not set to a folder with the data files")
    try:
        fastgpt.get_tokenizer()
    except fastgpt.tokenizer.TokenizerUnavailableError as exc:
        pytest.skip(f"GPT-2 BPE not available: {exc}")
    root = tmp_path_factory.mktemp("folders")
    common = ("--no-progress", "--no-checkpoint", "--batch-size", 4, "--eval-every", 0)
    assert run_cli(
        "pretrain", "--model", "tiny", "--data", data / "the-verdict.txt", "--context-length",
        CONTEXT, "--max-steps", 30, "--lr", 3e-3, "--sample-prompt", "", "--out",
        root / "pretrain", "--token-cache", tmp_path_factory.mktemp("tokens"), *common,
    ) == 0  # fmt: skip
    records = json.loads((data / "instruction-data.json").read_text(encoding="utf-8"))[:40]
    (root / "records.json").write_text(json.dumps(records), encoding="utf-8")
    for name, merge in (("lora", ()), ("merged", ("--merge",))):
        assert run_cli(
            "finetune-instruct", "--init", root / "pretrain", "--data", root / "records.json",
            "--max-steps", 2, "--lr", 1e-2, "--lora-rank", 2, "--num-responses", 1,
            "--max-new-tokens", 2, "--out", root / name, *merge, *common,
        ) == 0  # fmt: skip
    torch.manual_seed(0)
    config = GPTConfig.from_name("tiny", context_length=CONTEXT)
    GPTModel(config, backend="torch").save_pretrained(root / "save_pretrained")
    return {p.name: p for p in root.iterdir() if p.is_dir()}


FOLDERS = ["pretrain", "lora", "merged", "save_pretrained"]


# --- GPT-2's BPE in Hugging Face's files ---------------------------------------------------


def test_byte_level_alphabet_is_gpt2s():
    alphabet = byte_level_alphabet()
    assert len(set(alphabet)) == 256 and all(c.isprintable() and not c.isspace() for c in alphabet)
    assert alphabet[ord("A")] == "A" and alphabet[ord(" ")] == "Ġ" and alphabet[ord("\n")] == "Ċ"
    assert alphabet[0] == "Ā" and alphabet[0xAD] == "Ń"  # controls and the soft hyphen: 256...


def _tiktoken_cached(url: str) -> Path | None:
    """The file tiktoken downloaded from `url`, in its cache (named by the URL's sha1)."""
    cache = os.environ.get("TIKTOKEN_CACHE_DIR")
    path = Path(cache) / hashlib.sha1(url.encode()).hexdigest() if cache else None
    return path if path is not None and path.is_file() else None


def test_vocab_and_merges_recovered_from_ranks_are_openais_files(tiktoken_available):
    """The merges recovered from tiktoken's ranks alone are OpenAI's vocab.bpe line for line,
    and the vocabulary its encoder.json (both in tiktoken's cache when it downloaded "gpt2")."""
    vocab, merges = hf_vocab_and_merges()
    assert len(vocab) == 50257 and vocab["<|endoftext|>"] == EOT_ID and len(merges) == 50000
    assert vocab["Ġthe"] == 262 and merges[:2] == ("Ġ t", "Ġ a")
    base = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
    bpe, encoder = _tiktoken_cached(base + "vocab.bpe"), _tiktoken_cached(base + "encoder.json")
    if bpe is None or encoder is None:
        pytest.skip("tiktoken's cache holds no vocab.bpe/encoder.json to compare with")
    lines = bpe.read_text(encoding="utf-8").split("\n")
    assert lines[0] == "#version: 0.2" and tuple(line for line in lines[1:] if line) == merges
    assert json.loads(encoder.read_text(encoding="utf-8")) == vocab


# --- the folders ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", FOLDERS)
def test_auto_tokenizer_gives_fastgpts_ids(folders, name):
    folder = folders[name]
    assert all((folder / f).is_file() for f in HF_FILES), sorted(p.name for p in folder.iterdir())
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    assert len(tokenizer) == 50257 and tokenizer.model_max_length == CONTEXT
    eot = "<|endoftext|>"
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) == (eot, eot, eot)
    assert tokenizer.eos_token_id == EOT_ID and tokenizer.pad_token is None
    for text in (MIXED_TEXT, "Every effort moves you", " ", "\n\n", "a  b   c", ""):
        ids = encode(text)
        assert tokenizer(text)["input_ids"] == ids, text
        assert tokenizer.decode(ids) == text  # no clean-up of spaces: tiktoken's text exactly
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == generation["bos_token_id"] == EOT_ID
    assert transformers.GenerationConfig.from_pretrained(folder).do_sample is False


@pytest.mark.parametrize("name", ["pretrain", "lora", "merged"])
def test_pipeline_generates_fastgpts_greedy_tokens(folders, name):
    """transformers with PEFT installed puts the unmerged adapters on by itself."""
    folder = folders[name]
    prompt = "Every effort moves you"
    pipe = transformers.pipeline("text-generation", model=str(folder), device="cpu")
    out = pipe(prompt, max_new_tokens=12, do_sample=False, return_tensors=True)
    theirs = out[0]["generated_token_ids"]
    model = GPTModel.from_pretrained(folder, backend="torch")
    ids = fastgpt.text_to_token_ids(prompt)
    ours = fastgpt.generate(model, ids, 12, eos_id=EOT_ID)[0].tolist()
    assert theirs == ours and len(ours) > ids.shape[1]
    text = pipe(prompt, max_new_tokens=12, do_sample=False)[0]["generated_text"]
    assert text == fastgpt.token_ids_to_text(ours)


def test_adapters_name_their_base_and_load_in_auto_peft(folders):
    """adapter_config.json names the folder the adapters were trained from (--init):
    AutoPeftModelForCausalLM loads it and puts the adapters on once, with fastgpt's logits."""
    peft = pytest.importorskip("peft")
    folder = folders["lora"]
    info = json.loads((folder / "adapter_config.json").read_text())
    assert info["base_model_name_or_path"] == str(folders["pretrain"].resolve())
    x = fastgpt.text_to_token_ids(MIXED_TEXT)[:, :CONTEXT]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*multiple adapters.*")
        adapted = peft.AutoPeftModelForCausalLM.from_pretrained(folder).eval()
    assert list(adapted.peft_config) == ["default"]
    with torch.no_grad():
        ours = GPTModel.from_pretrained(folder, backend="torch")(x)
        assert (adapted(x).logits - ours).abs().max().item() <= 1e-5
        # the trained adapters change the model: the base alone gives other logits
        base = GPTModel.from_pretrained(folders["pretrain"], backend="torch")(x)
        assert (base - ours).abs().max().item() > 1e-3


def test_adapters_without_a_named_base_name_their_own_folder(tmp_path, tiktoken_available):
    """save_pretrained_with_lora with no base_model, or a classifier (its new head lives only
    in the folder): the folder itself, which holds the frozen base beside the adapters."""
    from fastgpt.lora import LoRALinear, apply_lora, save_pretrained_with_lora

    torch.manual_seed(0)
    model = GPTModel(GPTConfig.from_name("tiny"), backend="torch").eval()
    apply_lora(model, rank=2, alpha=4.0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_B.normal_(std=0.1)
    save_pretrained_with_lora(model, tmp_path / "lm")
    info = json.loads((tmp_path / "lm" / "adapter_config.json").read_text())
    assert info["base_model_name_or_path"] == str((tmp_path / "lm").resolve())
    peft = pytest.importorskip("peft")
    x = torch.randint(0, 50257, (1, 9))
    with warnings.catch_warnings():  # transformers put the adapters on this base already
        warnings.simplefilter("ignore")
        adapted = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "lm").eval()
    with torch.no_grad():
        assert (adapted(x).logits - model(x)).abs().max().item() <= 1e-5

    model.out_head = nn.Linear(32, 2)
    save_pretrained_with_lora(model, tmp_path / "classifier", base_model="gpt2")
    info = json.loads((tmp_path / "classifier" / "adapter_config.json").read_text())
    assert info["base_model_name_or_path"] == str((tmp_path / "classifier").resolve())
    assert not (tmp_path / "classifier" / "generation_config.json").exists()  # no LM head
    assert (tmp_path / "classifier" / "vocab.json").is_file()


def test_a_gpt2_name_as_base_is_its_hub_repository(tmp_path):
    from fastgpt.weights import model_reference

    assert model_reference("gpt2") == "openai-community/gpt2"
    assert model_reference("gpt2-small") == "openai-community/gpt2"
    assert model_reference("gpt2-xl") == "openai-community/gpt2-xl"
    (tmp_path / "gpt2").mkdir()  # a folder of that name wins, as in from_pretrained
    assert model_reference(tmp_path / "gpt2") == str((tmp_path / "gpt2").resolve())


def test_a_model_on_another_vocabulary_gets_no_gpt2_tokenizer(tmp_path):
    model = GPTModel(GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=4,
                               n_layers=1), backend="torch")  # fmt: skip
    model.save_pretrained(tmp_path)
    assert not any((tmp_path / f).exists() for f in ("vocab.json", "merges.txt"))
    assert not (tmp_path / "tokenizer_config.json").exists()
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert generation == hf_generation_config(model.config)
    assert generation["eos_token_id"] is None and generation["do_sample"] is False


def test_without_the_bpe_the_model_is_saved_with_a_warning(tmp_path, monkeypatch):
    """Offline without tiktoken's cache the weights are still saved (after a long run, say)."""
    from fastgpt import tokenizer

    def unavailable():
        raise tokenizer.TokenizerUnavailableError("cannot load the GPT-2 BPE (offline)")

    monkeypatch.setattr(tokenizer, "hf_vocab_and_merges", unavailable)
    model = GPTModel(GPTConfig.from_name("tiny"), backend="torch")
    with pytest.warns(UserWarning, match=r"saved without the tokenizer files: .*offline"):
        model.save_pretrained(tmp_path)
    assert GPTModel.from_pretrained(tmp_path).config == model.config
    assert not any((tmp_path / f).exists() for f in ("vocab.json", "tokenizer_config.json"))


def test_lm_eval_rolling_loglikelihood_is_fastgpts_loss(folders):
    """lm-evaluation-harness's HFLM on the folder: the rolling log-likelihood of a text (each
    token predicted after <|endoftext|> and the tokens before it) is minus fastgpt's summed
    next-token cross-entropy of the same ids."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    folder = folders["pretrain"]
    text = "Every effort moves you, and I'd like to see it 🤖 —  twice\n\nover."
    lm = HFLM(pretrained=str(folder), device="cpu", batch_size=1)
    request = Instance("loglikelihood_rolling", {}, (text,), 0)
    (theirs,) = lm.loglikelihood_rolling([request], disable_tqdm=True)
    ids = torch.tensor([[EOT_ID, *encode(text)]])
    assert ids.shape[1] <= CONTEXT
    model = GPTModel.from_pretrained(folder, backend="torch")
    with torch.no_grad():
        logits = model(ids[:, :-1])
        ours = -torch.nn.functional.cross_entropy(logits[0], ids[0, 1:], reduction="sum")
    assert theirs == pytest.approx(ours.item(), abs=1e-4)
