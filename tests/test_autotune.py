"""kernels/_autotune.py: bucket keys, the on-disk cache, the pinned config where nothing is timed
(the interpreter, CPU), and that tuning keeps the fastest candidate and is paid once."""

import importlib
import json

import pytest
import torch

autotune = importlib.import_module("fastgpt.kernels._autotune")

CANDIDATES = [{"BLOCK_M": 128, "num_warps": 8}, {"BLOCK_M": 64, "num_warps": 4}, {"BLOCK_M": 32}]
DEVICE = "Fake GPU|triton 9.9.9"


class FakeTimer:
    """Times a candidate by the BLOCK_M it launches with, from a table; counts the calls."""

    def __init__(self, ms_by_block_m):
        self.ms_by_block_m = ms_by_block_m
        self.calls = 0

    def __call__(self, fn):
        self.calls += 1
        return self.ms_by_block_m[fn()]


def launch(config):
    return config["BLOCK_M"]


@pytest.mark.parametrize(
    "length, bucket", [(1, 128), (128, 128), (129, 256), (1000, 1024), (1025, 2048), (10**6, 16384)]
)
def test_sequence_lengths_fall_in_power_of_two_buckets(length, bucket):
    assert autotune.seq_bucket(length) == bucket


def test_bucket_key_names_op_dtype_size_bucket_and_arch():
    key = autotune.bucket_key("attention.forward", torch.bfloat16, "D=64", 1000, "sm_90")
    assert key == "attention.forward|bf16|D=64|T<=1024|sm_90"
    assert key != autotune.bucket_key("attention.forward", torch.float16, "D=64", 1000, "sm_90")
    assert key != autotune.bucket_key("attention.forward", torch.bfloat16, "D=64", 1025, "sm_90")
    assert key != autotune.bucket_key("attention.forward", torch.bfloat16, "D=64", 1000, "sm_80")
    with pytest.raises(ValueError, match="sequence length"):
        autotune.bucket_key("attention.forward", torch.bfloat16, "D=64", 0, "sm_90")
    with pytest.raises(TypeError, match="dtype"):
        autotune.bucket_key("attention.forward", torch.int32, "D=64", 8, "sm_90")


def test_the_interpreter_and_cpu_get_the_pinned_config_without_timing(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert autotune.tuning_device_key(torch.device("cpu")) is None
    assert autotune.tuning_device_key(torch.device("cuda")) is None  # interpreter: pinned
    timer = FakeTimer({128: 3.0, 64: 1.0, 32: 2.0})
    cache = autotune.TuningCache(tmp_path / "c.json")
    assert autotune.choose("k", CANDIDATES, launch, None, cache, timer) == CANDIDATES[0]
    assert timer.calls == 0 and not (tmp_path / "c.json").exists()


def test_autotune_off_pins_the_config_on_a_gpu_too(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("FASTGPT_AUTOTUNE", "0")
    assert autotune.tuning_device_key(torch.device("cuda")) is None


def test_a_fake_timer_picks_the_fastest_and_tuning_is_paid_once(tmp_path):
    path = tmp_path / "autotune" / "configs.json"
    timer = FakeTimer({128: 3.0, 64: 1.0, 32: 2.0})
    chosen = autotune.choose("k", CANDIDATES, launch, DEVICE, autotune.TuningCache(path), timer)
    assert chosen == CANDIDATES[1] and timer.calls == 3
    # A new process (a fresh cache object on the same file) reads the choice: nothing timed.
    again = autotune.choose("k", CANDIDATES, launch, DEVICE, autotune.TuningCache(path), timer)
    assert again == CANDIDATES[1] and timer.calls == 3
    stored = json.loads(path.read_text())
    assert stored["version"] == autotune.CACHE_VERSION
    assert stored["devices"][DEVICE]["k"] == {"config": CANDIDATES[1], "ms": [3.0, 1.0, 2.0]}
    # Another GPU or Triton version, or another bucket, tunes again.
    other_timer = FakeTimer({128: 1.0, 64: 2.0, 32: 3.0})
    other_gpu = "Other GPU|triton 9.9.9"
    other = autotune.choose(
        "k", CANDIDATES, launch, other_gpu, autotune.TuningCache(path), other_timer
    )
    assert other == CANDIDATES[0]
    assert autotune.TuningCache(path).get(DEVICE, "k") == CANDIDATES[1]


def test_a_stored_choice_that_is_no_longer_a_candidate_is_tuned_again(tmp_path):
    cache = autotune.TuningCache(tmp_path / "c.json")
    cache.put(DEVICE, "k", {"BLOCK_M": 256}, [1.0])
    timer = FakeTimer({128: 3.0, 64: 1.0, 32: 2.0})
    assert autotune.choose("k", CANDIDATES, launch, DEVICE, cache, timer) == CANDIDATES[1]
    assert timer.calls == 3


def test_a_candidate_that_fails_to_launch_is_skipped(tmp_path):
    def timer(fn):
        if fn() == 64:
            raise RuntimeError("out of resources: shared memory")
        return {128: 3.0, 32: 2.0}[fn()]

    cache = autotune.TuningCache(tmp_path / "c.json")
    assert autotune.choose("k", CANDIDATES, launch, DEVICE, cache, timer) == CANDIDATES[2]
    assert json.loads((tmp_path / "c.json").read_text())["devices"][DEVICE]["k"]["ms"] == [
        3.0, None, 2.0,
    ]  # fmt: skip

    def always_fails(fn):
        raise RuntimeError("out of resources")

    with pytest.raises(RuntimeError, match="out of resources"):
        autotune.choose("k2", CANDIDATES, launch, DEVICE, cache, always_fails)
    with pytest.raises(ValueError, match="no candidate"):
        autotune.choose("k3", [], launch, DEVICE, cache, timer)


@pytest.mark.parametrize("contents", ["not json", '{"version": 0, "devices": {}}', "[1, 2]"])
def test_an_unreadable_cache_file_is_empty(tmp_path, contents):
    path = tmp_path / "c.json"
    path.write_text(contents)
    assert autotune.TuningCache(path).get(DEVICE, "k") is None
    timer = FakeTimer({128: 3.0, 64: 1.0, 32: 2.0})
    assert autotune.choose("k", CANDIDATES, launch, DEVICE, autotune.TuningCache(path), timer)
    assert json.loads(path.read_text())["version"] == autotune.CACHE_VERSION


def test_the_cache_file_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTGPT_AUTOTUNE_CACHE", str(tmp_path / "mine.json"))
    assert autotune.cache_path() == tmp_path / "mine.json"
    assert autotune.default_cache().path == tmp_path / "mine.json"
    monkeypatch.delenv("FASTGPT_AUTOTUNE_CACHE")
    assert autotune.cache_path().parts[-4:] == (".cache", "fastgpt", "autotune", "configs.json")


def test_the_compile_check_launches_every_candidate_but_runs_the_pinned_one(monkeypatch):
    launched = []
    monkeypatch.setattr(autotune, "COMPILE_EVERY_CANDIDATE", True)
    chosen = autotune.choose("k", CANDIDATES, lambda c: launched.append(c["BLOCK_M"]), None)
    assert chosen == CANDIDATES[0] and launched == [64, 32]


@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("head_dim", [16, 64, 128])
def test_the_tma_forward_is_a_candidate_only_where_legal(monkeypatch, head_dim, dropout):
    """The TMA forward (pinned tiles plus "TMA": 1) comes after the other candidates on sm_90,
    16-bit, forward only, and only when the launcher found its tensors legal (`tma`); with
    dropout the key tile widened to 64 (where narrower: head dim 128) follows it, as TMA only."""
    attention = importlib.import_module("fastgpt.kernels.flash_attention")
    monkeypatch.setattr(attention, "triton_interpreter_enabled", lambda: False)
    monkeypatch.setattr(attention, "_target_arch", lambda: 90)
    for dtype in (torch.float16, torch.bfloat16):
        pinned = attention._block_config(dtype, head_dim)["forward"]
        without = attention._config_candidates(dtype, head_dim, "forward", dropout)
        with_tma = attention._config_candidates(dtype, head_dim, "forward", dropout, tma=True)
        wider = [{**pinned, "BLOCK_N": 64, "TMA": 1}] if dropout and pinned["BLOCK_N"] < 64 else []
        assert with_tma == [*without, {**pinned, "TMA": 1}, *wider]
        assert without[0] == pinned and all("TMA" not in c for c in without)
        for kernel in ("dkdv", "dq"):  # the backward has no TMA variant
            assert attention._config_candidates(
                dtype, head_dim, kernel, dropout, tma=True
            ) == attention._config_candidates(dtype, head_dim, kernel, dropout)
    fp32 = attention._config_candidates(torch.float32, head_dim, "forward", dropout, tma=True)
    assert fp32 == [attention._block_config(torch.float32, head_dim)["forward"]]
    monkeypatch.setattr(attention, "_target_arch", lambda: 80)  # no TMA before sm_90
    assert all(
        "TMA" not in c
        for c in attention._config_candidates(torch.float16, head_dim, "forward", dropout, True)
    )
    monkeypatch.setattr(attention, "_target_arch", lambda: 90)
    monkeypatch.setattr(attention, "triton_interpreter_enabled", lambda: True)
    assert attention._config_candidates(torch.float16, head_dim, "forward", dropout, True) == [
        attention._block_config(torch.float16, head_dim)["forward"]
    ]


def test_dropout_widens_the_head_dim_128_forward_only_with_tma(monkeypatch):
    """With dropout at head dim 128 (key tile 32) the forward's 64-key tile is a candidate only
    moved by TMA: its cp.async twin spills; no such tile without TMA or before sm_90."""
    attention = importlib.import_module("fastgpt.kernels.flash_attention")
    monkeypatch.setattr(attention, "triton_interpreter_enabled", lambda: False)
    monkeypatch.setattr(attention.fc, "triton_interpreter_enabled", lambda: False)
    monkeypatch.setattr(attention, "_target_arch", lambda: 90)
    for dtype in (torch.float16, torch.bfloat16):
        pinned = attention._block_config(dtype, 128)["forward"]
        assert pinned["BLOCK_N"] < 64
        with_tma = attention._config_candidates(dtype, 128, "forward", True, tma=True)
        assert [c for c in with_tma if c["BLOCK_N"] >= 64] == [{**pinned, "BLOCK_N": 64, "TMA": 1}]
        narrow = attention._config_candidates(dtype, 128, "forward", True, tma=False)
        assert all(c["BLOCK_N"] < 64 for c in narrow)
    monkeypatch.setattr(attention, "_target_arch", lambda: 80)
    candidates = attention._config_candidates(torch.float16, 128, "forward", True, tma=True)
    assert all(c["BLOCK_N"] < 64 for c in candidates)


@pytest.mark.parametrize("kernel", ["forward", "dkdv", "dq"])
@pytest.mark.parametrize("head_dim", [16, 64, 128])
def test_sm_100_tunes_without_sm_90s_warpgroup_candidates(monkeypatch, kernel, head_dim):
    """sm_100 (tcgen05) takes sm_90's TMA forward but not its halved tile or fewer warps
    (argued from wgmma's 64 rows per 4 warps), nor its extra stage (spills): without dropout
    the pinned config, the forward's key tile widened to 64 where narrower, then the TMA
    forward."""
    attention = importlib.import_module("fastgpt.kernels.flash_attention")
    monkeypatch.setattr(attention, "triton_interpreter_enabled", lambda: False)
    monkeypatch.setattr(attention.fc, "triton_interpreter_enabled", lambda: False)
    monkeypatch.setattr(attention, "_target_arch", lambda: 100)
    pinned = attention._block_config(torch.float16, head_dim)[kernel]
    assert (
        pinned
        == attention.fc.block_config(
            attention.ATTENTION_TILES, torch.float16, head_dim, lambda: 100
        )[kernel]
    )
    want = [pinned]  # no 3-stage tile: sm_100's ptxas spilled them
    if kernel == "forward" and pinned["BLOCK_N"] < 64:
        want.append({**pinned, "BLOCK_N": 64})
    tma = [{**pinned, "TMA": 1}] if kernel == "forward" else []
    candidates = attention._config_candidates(torch.float16, head_dim, kernel, False, tma=True)
    assert candidates == want + tma
    with_dropout = attention._config_candidates(torch.float16, head_dim, kernel, True, tma=True)
    assert with_dropout == [pinned, *tma]


def test_nothing_is_timed_while_tracing_but_a_stored_choice_holds(tmp_path):
    """Under torch.compile tracing or CUDA-graph capture (`no_timing`): the stored choice if
    there is one, else the pinned config, untimed and not stored."""
    timer = FakeTimer({128: 3.0, 64: 1.0, 32: 2.0})
    cache = autotune.TuningCache(tmp_path / "c.json")
    pinned = autotune.choose("k", CANDIDATES, launch, DEVICE, cache, timer, no_timing=True)
    assert pinned == CANDIDATES[0] and timer.calls == 0 and not (tmp_path / "c.json").exists()
    assert autotune.choose("k", CANDIDATES, launch, DEVICE, cache, timer) == CANDIDATES[1]
    stored = autotune.choose("k", CANDIDATES, launch, DEVICE, cache, timer, no_timing=True)
    assert stored == CANDIDATES[1] and timer.calls == 3


def test_fake_tensors_count_as_tracing():
    from torch._subclasses.fake_tensor import FakeTensorMode

    assert not autotune.tracing(torch.zeros(2))
    with FakeTensorMode():
        assert autotune.tracing(torch.zeros(2))


@pytest.mark.parametrize(
    "kernel, own", [("forward", "BLOCK_M"), ("dkdv", "BLOCK_N"), ("dq", "BLOCK_M")]
)
@pytest.mark.parametrize("head_dim", [16, 64, 128])
def test_attention_candidates_keep_the_elements_per_thread(monkeypatch, kernel, own, head_dim):
    """Attention's GPU candidates (16-bit, no dropout): the pinned config first, 3 pipeline
    stages where it has fewer, then each of: (sm_90 only) the program's own tile halved over
    half the warps; the forward's key tile widened to 64 where the pinned one is narrower;
    (sm_90 only) the pinned tile on max(4, rows / 16) warps where it has more (no chained-dot
    product issued twice; sm_90's pinned tiles have rows = 16 x warps, so none gets it). On
    sm_80/sm_86 the pinned tile's own rows are at least the head dim. Head dim 128's forward
    gets the widened tile. Dropout (without TMA), fp32 and the interpreter: pinned only. (The
    target arch is pinned here, and the GPU's tile tables read.)"""
    attention = importlib.import_module("fastgpt.kernels.flash_attention")
    monkeypatch.setattr(attention, "triton_interpreter_enabled", lambda: False)
    monkeypatch.setattr(attention.fc, "triton_interpreter_enabled", lambda: False)

    def check_extras(pinned, candidates, hopper):
        staged = pinned["num_stages"] < 3
        assert candidates[0] == pinned
        assert not staged or candidates[1] == {**pinned, "num_stages": 3}
        for extra in candidates[1 + staged :]:
            halved = hopper and extra == {
                **pinned,
                own: pinned[own] // 2,
                "num_warps": pinned["num_warps"] // 2,
            }
            if halved:
                assert extra[own] >= 64  # sm_90: the halved tile still lowers to wgmma
            wider = kernel == "forward" and pinned["BLOCK_N"] < 64
            wider = wider and extra == {**pinned, "BLOCK_N": 64}
            fewer_warps = hopper and max(4, pinned[own] // 16) < pinned["num_warps"]
            fewer_warps = fewer_warps and extra == {**pinned, "num_warps": 4}
            assert halved + wider + fewer_warps == 1, extra
        assert len({tuple(sorted(c.items())) for c in candidates}) == len(candidates)
        if head_dim == 128 and kernel == "forward":
            assert {**pinned, "BLOCK_N": 64} in candidates
        if hopper:  # 16 rows a warp: no product of a chained dot issued twice
            assert pinned[own] == 16 * pinned["num_warps"]
        else:  # mma.sync: the chain's warps along its rows (an accumulator no wider than tall)
            assert pinned[own] >= head_dim

    monkeypatch.setattr(attention, "_target_arch", lambda: 90)
    pinned = attention._block_config(torch.bfloat16, head_dim)[kernel]
    candidates = attention._config_candidates(torch.bfloat16, head_dim, kernel, False)
    check_extras(pinned, candidates, hopper=True)
    assert attention._config_candidates(torch.bfloat16, head_dim, kernel, True) == [pinned]
    assert attention._config_candidates(torch.float32, head_dim, kernel, False) == [
        attention._block_config(torch.float32, head_dim)[kernel]
    ]
    for arch in (80, 86):  # sm_80 and sm_86: no halved tile
        monkeypatch.setattr(attention, "_target_arch", lambda arch=arch: arch)
        ampere = attention._block_config(torch.bfloat16, head_dim)[kernel]
        ampere_candidates = attention._config_candidates(torch.bfloat16, head_dim, kernel, False)
        check_extras(ampere, ampere_candidates, hopper=False)
    monkeypatch.setattr(attention, "triton_interpreter_enabled", lambda: True)
    assert len(attention._config_candidates(torch.bfloat16, head_dim, kernel, False)) == 1
