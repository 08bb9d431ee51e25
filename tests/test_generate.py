"""Generation: greedy (with and without the KV cache, vs Hugging Face), batched prompts,
sampling, eos, the context window, bad input, and the `fastgpt generate` command."""

import io
import sys

import pytest
import torch

from fastgpt.generation import generate, sample_next_token
from fastgpt.model import GPTModel
from fastgpt.model_config import GPTConfig


def tiny_model(
    backend="torch", seed=0, context_length=32, vocab_size=97, vocab_multiple=1
) -> GPTModel:
    torch.manual_seed(seed)
    config = GPTConfig(
        vocab_size=vocab_size,
        context_length=context_length,
        emb_dim=32,
        n_heads=4,
        n_layers=2,
        drop_rate=0.0,
        vocab_multiple=vocab_multiple,
    )
    model = GPTModel(config, backend=backend).eval()
    with torch.no_grad():  # larger weights than GPT-2's init: less flat, more varied tokens
        for p in model.parameters():
            p.mul_(5.0)
    return model


@pytest.mark.parametrize("backend, batch, new", [("torch", 3, 12), ("triton", 2, 5)])
def test_greedy_with_and_without_cache_agree(backend, batch, new):
    """The triton case runs the attention kernel with one query against the cached keys."""
    model = tiny_model(backend)
    prompt = torch.randint(0, 97, (batch, 6))  # a batch of prompts of one length
    cached = generate(model, prompt, max_new_tokens=new, use_cache=True)
    uncached = generate(model, prompt, max_new_tokens=new, use_cache=False)
    assert cached.shape == (batch, 6 + new)
    assert torch.equal(cached[:, :6], prompt)
    assert torch.equal(cached, uncached)
    assert len(set(cached[0, 6:].tolist())) > 1  # not a degenerate repetition of one token


def test_batched_prompts_generate_each_row_as_alone():
    model = tiny_model()
    prompt = torch.randint(0, 97, (3, 5))
    batched = generate(model, prompt, max_new_tokens=8)
    for row in range(3):
        assert torch.equal(batched[row : row + 1], generate(model, prompt[row : row + 1], 8))
    assert len({tuple(r) for r in batched[:, 5:].tolist()}) > 1  # rows really differ


def test_greedy_is_argmax_of_the_full_forward():
    model = tiny_model()
    out = generate(model, torch.randint(0, 97, (2, 4)), max_new_tokens=5)
    with torch.no_grad():
        logits = model(out[:, :-1])  # (2, 8, V)
    assert torch.equal(logits[:, 3:].argmax(-1), out[:, 4:])


def test_runs_past_the_context_window_like_the_uncached_path():
    model = tiny_model(context_length=16)
    prompt = torch.randint(0, 97, (2, 10))
    cached = generate(model, prompt, max_new_tokens=20, use_cache=True)
    assert cached.shape == (2, 30)
    assert torch.equal(cached, generate(model, prompt, max_new_tokens=20, use_cache=False))
    # a prompt longer than the context keeps its last context_length tokens
    long_prompt = torch.randint(0, 97, (1, 40))
    out = generate(model, long_prompt, max_new_tokens=3)
    assert torch.equal(out[:, 40:], generate(model, long_prompt[:, -16:], max_new_tokens=3)[:, 16:])


def test_greedy_matches_hugging_face_generate():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=999)
    hf = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.mul_(5.0)
    state = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items()}
    from fastgpt.weights import config_from_hf, hf_to_fastgpt

    ours = GPTModel(config_from_hf(config.to_dict()), backend="torch")
    ours.load_state_dict(hf_to_fastgpt(state, ours.config), strict=False)
    prompt = torch.randint(0, 999, (2, 7))
    expected = hf.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=20,
        do_sample=False,
        pad_token_id=0,
    )
    assert torch.equal(generate(ours, prompt, max_new_tokens=20), expected)
    assert torch.equal(generate(ours, prompt, max_new_tokens=20, use_cache=False), expected)


def test_eos_stops_and_pads_finished_sequences():
    model = tiny_model()
    prompt = torch.randint(0, 97, (2, 5))
    free = generate(model, prompt, max_new_tokens=10)
    eos = int(free[0, 7])  # the third token sequence 0 produces
    out = generate(model, prompt, max_new_tokens=10, eos_id=eos)
    first_eos = [row.tolist().index(eos) if eos in row.tolist() else None for row in out[:, 5:]]
    for b in range(2):
        if first_eos[b] is not None:  # after its first eos a sequence only gets eos
            assert torch.all(out[b, 5 + first_eos[b] :] == eos)
            assert torch.equal(out[b, : 5 + first_eos[b]], free[b, : 5 + first_eos[b]])
    if all(i is not None for i in first_eos):  # all finished: stopped early
        assert out.shape[1] == 5 + max(first_eos) + 1
    else:
        assert out.shape[1] == 15
    # a single sequence stops right after its eos
    single = generate(model, prompt[:1], max_new_tokens=10, eos_id=eos)
    assert single.shape == (1, 8) and single[0, -1] == eos


def test_sampling_is_reproducible_and_respects_top_k_and_top_p():
    model = tiny_model()
    prompt = torch.randint(0, 97, (2, 4))

    def sample(seed, **kwargs):
        g = torch.Generator().manual_seed(seed)
        return generate(model, prompt, 15, temperature=1.0, generator=g, **kwargs)

    assert torch.equal(sample(1), sample(1))
    assert not torch.equal(sample(1), sample(2))
    greedy = generate(model, prompt, 15)
    assert torch.equal(sample(3, top_k=1), greedy)
    assert torch.equal(sample(3, top_p=1e-6), greedy)
    assert not torch.equal(sample(3, top_k=5), greedy)


def test_sample_next_token_filters():
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0, -1.0]]).repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    top_k = sample_next_token(logits, 1.0, top_k=2, generator=g)
    assert set(top_k.flatten().tolist()) == {1, 2}
    probs = torch.softmax(logits[0], -1)  # [.03, .64, .24, .09, .01]
    top_p = sample_next_token(logits, 1.0, top_p=0.8, generator=g)
    assert set(top_p.flatten().tolist()) == {1, 2}  # .64 < .8 <= .64 + .24
    counts = torch.bincount(top_p.flatten(), minlength=5).float() / 4000
    renormalized = probs[1] / (probs[1] + probs[2])
    assert abs(counts[1].item() - renormalized.item()) < 0.03
    hot = sample_next_token(logits, 100.0, generator=g)  # nearly uniform
    assert set(hot.flatten().tolist()) == {0, 1, 2, 3, 4}
    assert sample_next_token(logits[:1], 0.0).item() == 1


@pytest.mark.parametrize("vocab_multiple", [1, 128])
def test_generated_ids_skip_the_range_check(vocab_multiple):
    """The model's per-call id check (a host sync per step on CUDA) is off while generating, a
    padded vocabulary included (the training commands' models), and on again after."""
    model = tiny_model(vocab_multiple=vocab_multiple)
    checking = []
    generate(model, torch.randint(0, 97, (2, 3)), 3, on_step=lambda _: checking.append(
        model.check_inputs))  # fmt: skip
    assert checking == [False] * 3 and model.check_inputs


def test_on_step_sees_each_step_and_training_mode_is_restored():
    model = tiny_model().train()
    prompt = torch.randint(0, 97, (2, 3))
    steps = []
    out = generate(model, prompt, 4, on_step=steps.append)
    assert len(steps) == 4 and all(s.shape == (2, 1) for s in steps)
    assert model.training and model.check_inputs
    assert torch.equal(torch.cat([prompt, *steps], 1), out)
    assert generate(model, prompt, 0).shape == (2, 3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(temperature=-0.5), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_p=1.5), "top_p"),
    ],
)
def test_rejects_bad_arguments(kwargs, message):
    model = tiny_model()
    args = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(ValueError, match=message):
        generate(model, torch.zeros(1, 2, dtype=torch.long), **args)
    with pytest.raises(ValueError, match=r"\(batch, seq_len\)"):
        generate(model, torch.zeros(4, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="out of range"):
        generate(model, torch.tensor([[5, 97]]), 3)
    with pytest.raises(ValueError, match="empty"):
        generate(model, torch.zeros(1, 0, dtype=torch.long), 3)
    with pytest.raises(TypeError, match="integer tensor"):
        generate(model, torch.zeros(1, 2), 3)


# --- ragged batches, the static cache, compiled decoding -----------------------------------


@pytest.mark.parametrize("backend", ["torch", "triton", "sdpa"])
def test_ragged_prompts_generate_each_as_alone(backend):
    """Prompts of lengths 1, 7 and 3 in one batch: each row's tokens are those it gets alone
    (the triton case runs the split-KV decode kernel through the interpreter)."""
    model = tiny_model(backend)
    torch.manual_seed(1)
    prompts = [torch.randint(0, 97, (n,)) for n in (1, 7, 3)]
    new = 4 if backend == "triton" else 10  # the interpreter is slow
    ragged = generate(model, prompts, max_new_tokens=new)
    assert isinstance(ragged, list) and [len(r) for r in ragged] == [1 + new, 7 + new, 3 + new]
    # Alone: on the same weights with the torch backend (for triton: a cheap cross-check)
    alone_model = model if backend != "triton" else tiny_model("torch")
    for prompt, row in zip(prompts, ragged, strict=True):
        alone = generate(alone_model, prompt[None], max_new_tokens=new)[0]
        assert torch.equal(row, alone)
    assert generate(model, [p.tolist() for p in prompts], new, use_cache=False)[1].tolist() == (
        ragged[1].tolist()
    )


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cached_steps_run_the_backends_cache_ops(backend):
    """A one-token step runs the backend's `decode_attention` where it has one (triton's
    split-KV kernel), for prompts of one length and ragged ones alike; the steps of a backend
    without one run its `masked_attention` on ragged rows and its plain attention on rows of
    one length; prefills (right-padded) run plain causal attention. Same tokens as before."""
    import dataclasses

    from fastgpt.model import _LAYERS_WITH_OPS

    model = tiny_model(backend)
    ops = model.final_norm.ops
    calls = {"decode_attention": 0, "masked_attention": 0}

    def counted(name):
        def call(*args, **kwargs):
            calls[name] += 1
            return getattr(ops, name)(*args, **kwargs)

        return call if getattr(ops, name) is not None else None

    wrapped = dataclasses.replace(ops, **{n: counted(n) for n in calls})
    torch.manual_seed(2)
    even = torch.randint(0, 97, (2, 5))
    ragged = [torch.randint(0, 97, (n,)) for n in (2, 5)]
    expected = [generate(model, even, 3), generate(model, ragged, 3)]
    for module in model.modules():
        if isinstance(module, _LAYERS_WITH_OPS):
            module.ops = wrapped
    steps = 2 * model.config.n_layers  # 3 new tokens: a prefill, then 2 one-token steps
    assert torch.equal(generate(model, even, 3), expected[0])
    if backend == "triton":
        assert calls == {"decode_attention": steps, "masked_attention": 0}
    else:
        assert calls == {"decode_attention": 0, "masked_attention": 0}
    calls.update(dict.fromkeys(calls, 0))
    got = generate(model, ragged, 3)
    assert all(torch.equal(a, b) for a, b in zip(got, expected[1], strict=True))
    if backend == "triton":
        assert calls == {"decode_attention": steps, "masked_attention": 0}
    else:
        assert calls == {"decode_attention": 0, "masked_attention": steps}


def test_ragged_rows_past_the_context_window_and_eos_per_row():
    model = tiny_model(context_length=16)
    torch.manual_seed(2)
    prompts = [torch.randint(0, 97, (n,)) for n in (14, 2)]
    ragged = generate(model, prompts, max_new_tokens=9)  # row 0 slides past 16, row 1 not
    for prompt, row in zip(prompts, ragged, strict=True):
        assert torch.equal(row, generate(model, prompt[None], 9, use_cache=False)[0])
    eos = int(ragged[1][4])  # row 1's third new token
    stopped = generate(model, prompts, max_new_tokens=9, eos_id=eos)
    assert len(stopped[1]) == 2 + 3 and stopped[1][-1] == eos  # stops at its own eos
    for prompt, row in zip(prompts, stopped, strict=True):  # each row as alone
        assert torch.equal(row, generate(model, prompt[None], 9, eos_id=eos)[0])


def test_eos_is_checked_on_the_device_and_output_is_trimmed(monkeypatch):
    """With eos looked at only every few steps, the output still ends where it finished."""
    import fastgpt.generation as generation

    model = tiny_model()
    prompt = torch.randint(0, 97, (2, 5))
    free = generate(model, prompt, max_new_tokens=12)
    eos = int(free[0, 6])
    expected = generate(model, prompt, max_new_tokens=12, eos_id=eos, on_step=lambda ids: None)
    monkeypatch.setattr(generation, "EOS_CHECK_EVERY", 5)
    assert torch.equal(generate(model, prompt, max_new_tokens=12, eos_id=eos), expected)


def test_per_row_cache_lengths_errors():
    model = tiny_model()
    cache = model.new_kv_cache(batch_size=2)  # static: buffers allocated at once
    assert cache[0].k.shape == (2, 4, 32, 8) and cache.lengths is None
    with pytest.raises(ValueError, match="lengths must lie in"):
        cache.set_lengths([1, 2])  # nothing cached yet
    model(torch.randint(0, 97, (2, 30)), kv_cache=cache)
    with pytest.raises(ValueError, match="one length per cached row"):
        cache.set_lengths([30])
    cache.set_lengths([30, 12])
    assert cache.lengths.tolist() == [30, 12] and cache.length == 30
    model(torch.zeros(2, 2, dtype=torch.long), kv_cache=cache)
    assert cache.lengths.tolist() == [32, 14] and cache.length == 32
    with pytest.raises(ValueError, match="too long: 1 tokens after 32 cached tokens"):
        model(torch.zeros(2, 1, dtype=torch.long), kv_cache=cache)
    buffer = cache[0].k
    cache.reset()
    assert cache.length == 0 and cache.lengths is None
    model(torch.zeros(2, 3, dtype=torch.long), kv_cache=cache)
    assert cache[0].k is buffer  # reused


def test_rejects_bad_prompt_lists():
    model = tiny_model()
    with pytest.raises(ValueError, match="empty list"):
        generate(model, [], 3)
    with pytest.raises(ValueError, match="prompt 1 must be a non-empty 1-D"):
        generate(model, [[1, 2], []], 3)
    with pytest.raises(ValueError, match="out of range"):
        generate(model, [[1, 2], [97]], 3)
    with pytest.raises(TypeError, match="list of 1-D prompts"):
        generate(model, "hello", 3)
    with pytest.raises(ValueError, match="compile"):
        generate(model, [[1]], 3, compile=True, use_cache=False)


@pytest.mark.slow
def test_compiled_decoding_matches_eager():
    """Inductor on CPU (one compile, ~20 s): greedy ragged and sampled output as eager."""
    model = tiny_model()
    prompts = [[5, 6, 7], [8], [9, 10, 11, 12, 13]]
    eager = generate(model, prompts, max_new_tokens=8)
    compiled = generate(model, prompts, max_new_tokens=8, compile=True)
    assert [r.tolist() for r in compiled] == [r.tolist() for r in eager]

    def sampled(compile):
        gen = torch.Generator().manual_seed(3)
        return generate(model, prompts, 8, temperature=1.0, generator=gen, compile=compile)

    assert [r.tolist() for r in sampled(True)] == [r.tolist() for r in sampled(False)]


class RecordingStdout(io.StringIO):
    """stdout that remembers each write, to see text arrive piece by piece."""

    def __init__(self):
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def test_generate_command_streams_text(tmp_path, monkeypatch, capsys, tiktoken_available):
    from fastgpt.cli import main

    torch.manual_seed(0)
    GPTModel(GPTConfig.from_name("tiny")).save_pretrained(tmp_path)
    base = ["generate", "--model", str(tmp_path), "--prompt", "Every effort moves you"]
    base += ["--device", "cpu", "--backend", "torch", "--max-new-tokens", "8"]

    def run(*extra: str) -> str:
        stdout = RecordingStdout()
        monkeypatch.setattr(sys, "stdout", stdout)
        assert main([*base, *extra]) == 0
        monkeypatch.undo()
        assert stdout.writes[0] == "Every effort moves you"
        assert len(stdout.writes) >= 1 + 8 + 1  # the prompt, each token as produced, "\n"
        return stdout.getvalue()

    greedy = run()
    assert greedy.startswith("Every effort moves you") and len(greedy) > len(base[4]) + 1
    assert run("--no-cache") == greedy
    sampled = ["--temperature", "1.0", "--top-k", "50", "--top-p", "0.9"]
    first = run(*sampled, "--seed", "1")
    assert run(*sampled, "--seed", "1") == first
    assert any(run(*sampled, "--seed", str(seed)) != first for seed in (2, 3))

    assert main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "cannot load" in capsys.readouterr().err
    assert main([*base[:3], "--prompt", ""]) == 2
    assert "the prompt is empty" in capsys.readouterr().err
    # bad options fail before anything is loaded (the model folder does not exist)
    missing = ["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"]
    assert main([*missing, "--top-p", "1.5"]) == 2
    err = capsys.readouterr().err
    assert "--top-p must be in (0, 1]" in err and "cannot load" not in err  # the flag's name
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main([*missing, "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda: no CUDA GPU is available" in err and "cannot load" not in err


def test_generate_command_batches_several_prompts(
    tmp_path, monkeypatch, capsys, tiktoken_available
):
    """--prompt repeated and --prompts-file: one batch, each completion labelled, each what
    its prompt gives alone."""
    from fastgpt.cli import main

    torch.manual_seed(0)
    GPTModel(GPTConfig.from_name("tiny")).save_pretrained(tmp_path)
    base = ["generate", "--model", str(tmp_path), "--device", "cpu", "--backend", "torch"]
    base += ["--max-new-tokens", "5"]

    def run(*extra: str) -> str:
        assert main([*base, *extra]) == 0
        return capsys.readouterr().out

    alone = [run("--prompt", text).rstrip("\n") for text in ("Every effort", "A", "Hi there")]
    (tmp_path / "prompts.txt").write_text("A\n\nHi there\n", encoding="utf-8")
    out = run("--prompt", "Every effort", "--prompts-file", str(tmp_path / "prompts.txt"))
    assert out.splitlines() == [f"[{i}] {text}" for i, text in enumerate(alone, 1)]
    assert main([*base, "--prompts-file", str(tmp_path / "none.txt")]) == 2
    assert "cannot read --prompts-file" in capsys.readouterr().err
    assert main(base) == 2
    assert "give a prompt" in capsys.readouterr().err


def test_generate_command_uses_unmerged_lora_adapters(tmp_path, monkeypatch, tiktoken_available):
    """A folder saved unmerged by a fine-tuning command generates with its adapters."""
    from fastgpt.cli import main
    from fastgpt.lora import apply_lora, save_pretrained_with_lora
    from fastgpt.tokenizer import text_to_token_ids, token_ids_to_text

    torch.manual_seed(0)
    model = GPTModel(GPTConfig.from_name("tiny"), backend="torch")
    apply_lora(model, rank=2, alpha=4.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()  # as if trained: the adapters change the output
    save_pretrained_with_lora(model, tmp_path)
    prompt = text_to_token_ids("Every effort moves you")
    expected = token_ids_to_text(generate(model, prompt, 6))
    base = generate(
        GPTModel.from_pretrained(tmp_path, backend="torch", merge_adapters=False), prompt, 6
    )
    assert token_ids_to_text(base) != expected  # the base alone would say something else
    stdout = RecordingStdout()
    monkeypatch.setattr(sys, "stdout", stdout)
    argv = ["generate", "--model", str(tmp_path), "--prompt", "Every effort moves you"]
    assert main([*argv, "--max-new-tokens", "6", "--device", "cpu"]) == 0
    monkeypatch.undo()
    assert stdout.getvalue() == expected + "\n"


def test_commands_offline_without_the_bpe_say_what_to_do(tmp_path, monkeypatch, capsys):
    """No cached GPT-2 BPE and no network: an error naming TIKTOKEN_CACHE_DIR (was a requests
    ConnectionError traceback)."""
    import tiktoken

    from fastgpt.cli import main
    from fastgpt.tokenizer import get_tokenizer

    def offline(name):
        raise ConnectionError(f"Failed to resolve 'openaipublic.blob.core.windows.net' ({name})")

    GPTModel(GPTConfig.from_name("tiny")).save_pretrained(tmp_path)
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    get_tokenizer.cache_clear()
    try:
        assert main(["generate", "--model", str(tmp_path), "--prompt", "hi"]) == 2
    finally:
        get_tokenizer.cache_clear()
    err = capsys.readouterr().err
    assert "fastgpt generate: error: cannot load the GPT-2 BPE" in err
    assert "TIKTOKEN_CACHE_DIR" in err and "Failed to resolve" in err


def test_ctrl_c_is_one_line_and_status_130(tmp_path, monkeypatch, capsys):
    import fastgpt.commands.generate
    from fastgpt.cli import main

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(fastgpt.commands.generate, "run", interrupted)
    assert main(["generate", "--model", str(tmp_path), "--prompt", "hi"]) == 130
    assert capsys.readouterr().err == "fastgpt generate: interrupted\n"


def test_ctrl_c_while_generating_ends_the_line_first(tmp_path, monkeypatch, tiktoken_available):
    """The streamed text's line is ended before "interrupted" is printed (not glued to it)."""
    import fastgpt.generation
    from fastgpt.cli import main

    GPTModel(GPTConfig.from_name("tiny")).save_pretrained(tmp_path)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fastgpt.generation, "generate", interrupted)
    stdout = RecordingStdout()
    monkeypatch.setattr(sys, "stdout", stdout)
    argv = ["generate", "--model", str(tmp_path), "--prompt", "Hi", "--backend", "torch"]
    assert main(argv) == 130
    assert stdout.getvalue() == "Hi\n"


def test_a_prompt_longer_than_the_context_says_what_is_dropped(
    tmp_path, monkeypatch, capsys, tiktoken_available
):
    from fastgpt.cli import main

    GPTModel(GPTConfig.from_name("tiny", context_length=8)).save_pretrained(tmp_path)
    monkeypatch.setattr(sys, "stdout", RecordingStdout())
    prompt = "one two three four five six seven eight nine ten"  # 10 tokens
    argv = ["generate", "--model", str(tmp_path), "--prompt", prompt, "--max-new-tokens", "2"]
    assert main([*argv, "--backend", "torch"]) == 0
    assert (
        "the prompt has 10 tokens, more than the model's context of 8: its first 2 tokens"
        " are dropped" in capsys.readouterr().err
    )


def test_generate_command_dtype(tmp_path, monkeypatch, tiktoken_available):
    """--dtype sets the weights' dtype; auto is fp32 on CPU and bf16 on a bf16-capable GPU."""
    import fastgpt.generation
    from fastgpt.cli import main
    from fastgpt.devices import resolve_dtype

    torch.manual_seed(0)
    GPTModel(GPTConfig.from_name("tiny")).save_pretrained(tmp_path)
    ran_in = []
    original = fastgpt.generation.generate

    def recording_generate(model, *args, **kwargs):
        ran_in.append(next(model.parameters()).dtype)
        return original(model, *args, **kwargs)

    monkeypatch.setattr(fastgpt.generation, "generate", recording_generate)
    monkeypatch.setattr(sys, "stdout", RecordingStdout())
    argv = ["generate", "--model", str(tmp_path), "--prompt", "Every effort", "--device", "cpu"]
    argv += ["--backend", "torch", "--max-new-tokens", "3"]
    assert main(argv) == 0
    assert main([*argv, "--dtype", "bf16"]) == 0
    assert ran_in == [torch.float32, torch.bfloat16]

    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("fp16", torch.device("cpu")) == torch.float16
