"""An engine that survives its users (issue 13): abort, failure recovery, threads, up-front limits.

Each test does what a hostile but realistic user did to the engine (a step that fails, Ctrl-C, two
threads, a pool of 10**9 blocks, a seed given as a string) and then checks the two things that
matter: every block is back in its pool, and the same engine answers the next request with the
tokens a fresh engine gives.
"""

from __future__ import annotations

import gc
import threading
import tracemalloc

import pytest
import torch
import transformers

from minipaged import LLM, SamplingParams
from minipaged import engine as engine_module
from minipaged import sequence as sequence_module
from minipaged.limits import (
    BOOKKEEPING_BYTES_PER_BLOCK,
    check_pool_memory,
    resolve_dtype,
)
from minipaged.sequence import Sequence

BLOCK_SIZE = 4
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def random_ids(seed: int, length: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, 259, (length,), generator=gen).tolist()


PROMPTS = [{"prompt_token_ids": random_ids(seed, 5 + 3 * seed)} for seed in range(4)]


def make_llm(**kw) -> LLM:
    kw = {"num_gpu_blocks": 48, "block_size": BLOCK_SIZE, **kw}
    return LLM("tiny-llama", **kw)


@pytest.fixture(scope="module")
def expected() -> list[list[int]]:
    """What a fresh engine answers to PROMPTS: a recovered engine must answer the same."""
    return tokens(make_llm().generate(PROMPTS, GREEDY, use_tqdm=False))


def tokens(outputs) -> list[list[int]]:
    return [out.outputs[0].token_ids for out in outputs]


def assert_all_free(llm: LLM) -> None:
    memory = llm.block_manager.memory_stats()
    assert memory.device.num_used == 0 and memory.host.num_used == 0
    assert not llm.has_unfinished_requests()
    assert (
        not llm._requests
        and not llm._metrics
        and not llm._generators
        and not llm._beams
    )


# ---- 2. one failed step must not wedge the engine ---------------------------------------------------


class FailOnCall:
    """Wraps runner.execute: the call numbered `fail_at` raises `error` instead of running."""

    def __init__(self, execute, fail_at: int, error: BaseException) -> None:
        self.execute, self.fail_at, self.error, self.calls = execute, fail_at, error, 0

    def __call__(self, out):
        self.calls += 1
        if self.calls == self.fail_at:
            raise self.error
        return self.execute(out)


@pytest.mark.parametrize("error", [RuntimeError("model exploded"), KeyboardInterrupt()])
@pytest.mark.parametrize("fail_at", [1, 3])
def test_a_failed_generate_frees_its_requests_and_the_next_call_is_right(
    error, fail_at, expected
):
    llm = make_llm()
    execute = llm.runner.execute
    llm.runner.execute = FailOnCall(execute, fail_at, error)
    with pytest.raises(type(error)):
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert_all_free(llm)
    llm.runner.execute = execute
    assert tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == expected
    assert_all_free(llm)


def test_a_failure_in_sampling_midway_through_a_step_is_recovered(
    monkeypatch, expected
):
    """Some sequences of the step have their token, some not: all of the step's requests go."""
    llm = make_llm()
    calls = []

    def flaky_sample(logits, params, generator):
        calls.append(1)
        if len(calls) == 6:  # the second sequence of the second step
            raise FloatingPointError("NaN logits")
        return real_sample(logits, params, generator)

    real_sample = engine_module.sample
    monkeypatch.setattr(engine_module, "sample", flaky_sample)
    with pytest.raises(FloatingPointError):
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert_all_free(llm)
    monkeypatch.setattr(engine_module, "sample", real_sample)
    assert tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == expected


def test_a_failed_step_aborts_only_the_requests_it_ran(expected):
    """With one sequence a step, the request waiting its turn survives the failure and is right."""
    llm = make_llm(max_num_seqs=1, max_num_batched_tokens=64)
    first = llm.add_request(PROMPTS[0], GREEDY)
    second = llm.add_request(PROMPTS[1], GREEDY)
    llm.step()  # the first request's prompt
    execute = llm.runner.execute
    llm.runner.execute = FailOnCall(execute, 1, RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        llm.step()
    llm.runner.execute = execute
    assert llm.request_output(first) is None  # aborted and forgotten
    assert llm.request_output(second) is not None  # untouched, still waiting
    outputs = []
    while llm.has_unfinished_requests():
        outputs += llm.step()
    assert [out.request_id for out in outputs] == [second]
    assert outputs[0].outputs[0].token_ids == expected[1]
    assert_all_free(llm)
    assert llm.stats.aborted_requests == 1


def test_a_failed_schedule_aborts_every_request_and_the_engine_serves_on(
    monkeypatch, expected
):
    """The scheduler raised partway: its queues cannot be trusted, so every request goes (left
    queued, each would fail the same way at every step, and a server would never answer it)."""
    llm = make_llm()
    ids = [llm.add_request(prompt, GREEDY) for prompt in PROMPTS[:2]]
    llm.step()
    schedule = llm.scheduler.schedule

    def broken_schedule():
        schedule()
        raise RuntimeError("scheduler bug")

    monkeypatch.setattr(llm.scheduler, "schedule", broken_schedule)
    with pytest.raises(RuntimeError, match="scheduler bug"):
        llm.step()
    assert [llm.request_output(i) for i in ids] == [None, None]
    assert_all_free(llm)
    assert llm.stats.aborted_requests == 2
    monkeypatch.setattr(llm.scheduler, "schedule", schedule)
    assert tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == expected


def test_a_failed_swap_step_aborts_the_group_it_swapped_out():
    """A group swapped out in a step that failed has host blocks that never got its K/V: aborted."""
    llm = make_llm(num_gpu_blocks=12, num_cpu_blocks=32, preemption_mode="swap")
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    ids = [llm.add_request(p, params) for p in PROMPTS[:3]]
    execute = llm.runner.execute

    def fail_on_swap(out):
        if out.blocks_to_swap_out:
            fail_on_swap.preempted = [
                rid for rid, mode in out.preempted if mode == "swap"
            ]
            raise RuntimeError("swap failed")
        return execute(out)

    llm.runner.execute = fail_on_swap
    with pytest.raises(RuntimeError, match="swap failed"):
        while llm.has_unfinished_requests():
            llm.step()
    llm.runner.execute = execute
    assert fail_on_swap.preempted and all(
        llm.request_output(rid) is None for rid in fail_on_swap.preempted
    )
    assert llm.block_manager.memory_stats().host.num_used == 0
    while llm.has_unfinished_requests():
        llm.step()
    assert_all_free(llm)
    assert len(ids) == 3


def test_sampling_parameters_that_would_fail_are_refused_at_submission():
    for temperature in (1e-38, 1e-300, 0.001):
        with pytest.raises(ValueError, match="temperature"):
            SamplingParams(temperature=temperature)
    assert SamplingParams(temperature=0.01).temperature == 0.01


def test_a_sliding_window_model_caps_max_model_len_at_its_window(expected):
    """minipaged's attention has no window: past it the model would compute something else."""
    config = transformers.MistralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=8,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    model = transformers.MistralForCausalLM(config).eval()
    llm = LLM(model, num_gpu_blocks=32, block_size=BLOCK_SIZE)
    assert llm.scheduler_config.max_model_len == 8
    with pytest.raises(ValueError, match="sliding window"):
        llm.generate(
            {"prompt_token_ids": list(range(20))},
            SamplingParams(max_tokens=4),
            use_tqdm=False,
        )
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(model, num_gpu_blocks=32, block_size=BLOCK_SIZE, max_model_len=16)
    prompt = [5, 9, 2]
    out = llm.generate(
        {"prompt_token_ids": prompt},
        SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
    )
    model.set_attn_implementation("sdpa")
    reference = model.generate(
        torch.tensor([prompt]), max_new_tokens=5, do_sample=False, eos_token_id=None
    )
    assert out[0].outputs[0].token_ids == reference[0, 3:].tolist()
    assert_all_free(llm)


# ---- abort_request -----------------------------------------------------------------------------------


def test_abort_a_waiting_a_running_and_a_future_request(expected):
    llm = make_llm(max_num_seqs=2)
    ids = [llm.add_request(p, GREEDY) for p in PROMPTS[:3]]
    future = llm.add_request(PROMPTS[3], GREEDY, arrival_time=llm.now() + 3600)
    llm.step()  # the first two run, the third waits
    running, waiting = ids[0], ids[2]
    assert llm.request_output(running).outputs[0].token_ids == expected[0][:1]
    llm.abort_request([running, waiting, future, "no-such-id"])
    for rid in (running, waiting, future):
        assert llm.request_output(rid) is None
    outputs = []
    while llm.has_unfinished_requests():
        outputs += llm.step()
    assert [(out.request_id, out.outputs[0].token_ids) for out in outputs] == [
        (ids[1], expected[1])
    ]
    assert_all_free(llm)
    llm.abort_request(ids[1])  # finished: ignored
    assert llm.stats.aborted_requests == 3


def test_abort_a_swapped_out_request_frees_its_host_blocks():
    llm = make_llm(num_gpu_blocks=12, num_cpu_blocks=32, preemption_mode="swap")
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    ids = [llm.add_request(p, params) for p in PROMPTS[:3]]
    while not llm.scheduler.swapped:
        assert llm.has_unfinished_requests(), "the pool is meant to force a swap"
        llm.step()
    victim = llm.scheduler.swapped[0].request_id
    assert llm.block_manager.memory_stats().host.num_used > 0
    llm.abort_request(victim)
    assert llm.block_manager.memory_stats().host.num_used == 0
    finished = []
    while llm.has_unfinished_requests():
        finished += [out.request_id for out in llm.step()]
    assert sorted(finished) == sorted(set(ids) - {victim})
    assert_all_free(llm)


def test_request_output_grows_token_by_token_and_ends_as_the_finished_output(expected):
    llm = make_llm()
    rid = llm.add_request(PROMPTS[2], GREEDY)
    seen = []
    finished = []
    while not finished:
        finished = llm.step()
        if not finished:
            partial = llm.request_output(rid)
            assert not partial.finished and partial.outputs[0].finish_reason is None
            seen.append(partial.outputs[0].token_ids)
    assert seen == [expected[2][:k] for k in range(1, len(expected[2]))]
    assert finished[0].finished and finished[0].outputs[0].token_ids == expected[2]
    assert llm.request_output(rid) is None


# ---- 3. threads ---------------------------------------------------------------------------------------


def test_generate_from_several_threads_is_serialized_and_every_caller_gets_its_answer(
    expected,
):
    llm = make_llm()
    results: dict[int, list] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def call(i: int) -> None:
        try:
            barrier.wait()
            prompts = PROMPTS[i:] + PROMPTS[:i]  # each thread its own order
            results[i] = tokens(llm.generate(prompts, GREEDY, use_tqdm=False))
        except BaseException as error:  # reported below, not lost in the thread
            errors.append(error)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for i in range(4):
        assert results[i] == expected[i:] + expected[:i]
    assert_all_free(llm)


# ---- 4. nothing grows without bound -------------------------------------------------------------------


def test_sequence_ids_take_constant_memory_and_never_repeat():
    explicit = Sequence([1, 2], seq_id=sequence_module._next_seq_id[0] + 1000)
    # an explicit id is never handed out again
    assert explicit.fork().seq_id > explicit.seq_id
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    last = -1
    for _ in range(20_000):
        seq_id = Sequence([1]).seq_id
        assert seq_id > last  # fresh ids only go up: none repeats
        last = seq_id
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    growth = sum(
        stat.size_diff
        for stat in after.compare_to(before, "filename")
        if stat.traceback[0].filename.endswith("sequence.py")
    )
    assert growth < 4096  # a set of every id would hold about a megabyte here
    assert not hasattr(sequence_module, "_taken_seq_ids")


def test_step_stats_keep_only_the_last_max_step_stats():
    llm = make_llm(max_step_stats=5)
    llm.generate(
        PROMPTS,
        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
        use_tqdm=False,
    )
    assert llm.stats.steps > 5
    assert [s.step for s in llm.step_stats] == list(
        range(llm.stats.steps - 5, llm.stats.steps)
    )
    unbounded = make_llm(max_step_stats=None)
    unbounded.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert len(unbounded.step_stats) == unbounded.stats.steps


# ---- 1 and 5. up-front checks that name the argument ---------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_gpu_blocks": 10**9},
        {"num_gpu_blocks": 16, "num_cpu_blocks": 10**9},
        {"num_gpu_blocks": 10**7},
    ],
)
def test_huge_pools_are_refused_before_anything_is_allocated(kwargs, monkeypatch):
    def never(*args, **kw):
        raise AssertionError("the block manager was built before the size check")

    monkeypatch.setattr(engine_module, "BlockManager", never)
    with pytest.raises(ValueError) as caught:
        LLM("tiny-llama", block_size=BLOCK_SIZE, **kwargs)
    message = str(caught.value)
    assert "num_gpu_blocks" in message and "num_cpu_blocks" in message
    assert "need" in message and "available" in message


def test_check_pool_memory_gives_both_figures():
    bpb = 1024
    check_pool_memory(
        10,
        10,
        bpb,
        torch.device("cpu"),
        free_host=20 * (bpb + BOOKKEEPING_BYTES_PER_BLOCK),
    )
    with pytest.raises(ValueError, match=r"needs 1\.0 MiB .* has 512\.0 KiB free"):
        check_pool_memory(
            1024, 0, bpb, torch.device("cuda"), free_device=512 * 1024, free_host=10**9
        )
    with pytest.raises(ValueError, match="num_cpu_blocks=100"):
        check_pool_memory(1, 100, bpb, torch.device("cpu"), free_host=50 * bpb)


BAD_ARGUMENTS = [
    ({"device": "cpuu"}, ValueError, "device"),
    ({"device": "meta"}, ValueError, "device"),
    ({"device": "cuda:99"}, ValueError, "device"),
    ({"device": 3}, TypeError, "device"),
    ({"dtype": "fp64"}, ValueError, "dtype"),
    ({"dtype": torch.float64}, ValueError, "dtype"),
    ({"dtype": torch.int8}, ValueError, "dtype"),
    ({"dtype": 16}, TypeError, "dtype"),
    ({"seed": "0"}, TypeError, "seed"),
    ({"seed": None}, TypeError, "seed"),
    ({"seed": 1.5}, TypeError, "seed"),
    ({"enable_prefix_caching": "no"}, TypeError, "enable_prefix_caching"),
    ({"enable_prefix_caching": 1}, TypeError, "enable_prefix_caching"),
    ({"max_step_stats": -1}, ValueError, "max_step_stats"),
]


@pytest.mark.parametrize(("kwargs", "error", "name"), BAD_ARGUMENTS)
def test_bad_engine_arguments_are_refused_naming_the_argument(kwargs, error, name):
    with pytest.raises(error, match=name):
        make_llm(**kwargs)


def test_cuda_without_cuda_is_a_value_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: device='cuda' is valid here")
    with pytest.raises(ValueError, match=r"device='cuda'.*no CUDA"):
        make_llm(device="cuda")


def test_a_model_object_in_float64_is_refused():
    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
        )
    ).to(torch.float64)
    with pytest.raises(ValueError, match="dtype"):
        LLM(model, num_gpu_blocks=8)


def test_dtype_names_as_vllm_accepts_them():
    assert (
        resolve_dtype("half") is torch.float16
        and resolve_dtype("bf16") is torch.bfloat16
    )
    assert resolve_dtype("auto") is None
    assert make_llm(dtype="fp16", num_gpu_blocks=8).model.dtype == torch.float16


def test_a_broken_checkpoint_directory_is_a_value_error_naming_model(tmp_path):
    (tmp_path / "config.json").write_text("{ not json")
    with pytest.raises(ValueError, match="model="):
        LLM(str(tmp_path), num_gpu_blocks=8)
    (tmp_path / "config.json").write_text('{"model_type": "nope"}')
    with pytest.raises(ValueError, match="model="):
        LLM(str(tmp_path), num_gpu_blocks=8)


@pytest.mark.parametrize(
    ("prompt", "error", "name"),
    [
        ({"prompt_token_ids": None}, TypeError, "prompt_token_ids"),
        ({"prompt_token_ids": "abc"}, TypeError, "prompt_token_ids"),
        ({"prompt_token_ids": [1, None]}, ValueError, "prompt_token_ids"),
        ("a lone \ud800 surrogate", ValueError, "prompt"),
    ],
)
def test_bad_prompts_are_refused_naming_the_field_and_the_engine_still_serves(
    prompt, error, name, expected
):
    llm = make_llm()
    with pytest.raises(error, match=name):
        llm.generate(prompt, GREEDY, use_tqdm=False)
    assert tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == expected


# ---- stop strings, stop tokens, top logprobs --------------------------------------------------------


def test_stop_token_ids_end_a_sample_on_that_token_even_with_ignore_eos(expected):
    llm = make_llm()
    reference = expected[3]
    cut = next(i for i in range(1, len(reference)) if reference[i] not in reference[:i])
    params = SamplingParams(
        temperature=0.0, max_tokens=6, ignore_eos=True, stop_token_ids=[reference[cut]]
    )
    out = llm.generate(PROMPTS[3], params, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == reference[: cut + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", reference[cut])


def test_a_stop_string_ends_a_sample_and_is_cut_from_its_text():
    llm = make_llm()
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    full = llm.generate("Once upon", params, use_tqdm=False)[0].outputs[0]
    text = full.text
    start = next(  # a stop string that first occurs at `start`, of whole characters
        i
        for i in range(2, len(text) - 1)
        if text.find(text[i : i + 2]) == i and "\ufffd" not in text[i : i + 2]
    )
    stop = text[start : start + 2]
    out = llm.generate(
        "Once upon",
        SamplingParams(**{**params.__dict__, "stop": ["\x00\x00", stop]}),
        use_tqdm=False,
    )
    sample = out[0].outputs[0]
    assert sample.text == text[:start]
    assert (sample.finish_reason, sample.stop_reason) == ("stop", stop)
    # tokens up to the stop, all kept
    assert sample.token_ids == full.token_ids[: len(sample.token_ids)]
    assert stop in llm._decode(sample.token_ids) and stop not in llm._decode(
        sample.token_ids[:-1]
    )


def test_logprobs_report_the_top_tokens_of_each_step():
    llm = make_llm()
    out = llm.generate(
        PROMPTS[0],
        SamplingParams(temperature=0.0, max_tokens=5, logprobs=3, ignore_eos=True),
        use_tqdm=False,
    )
    sample = out[0].outputs[0]
    assert len(sample.top_logprobs) == len(sample.token_ids) == 5
    for token, logprob, top in zip(
        sample.token_ids, sample.logprobs, sample.top_logprobs, strict=True
    ):
        assert len(top) == 3
        # greedy: the sampled token is the most likely
        assert max(top, key=top.get) == token
        assert top[token] == pytest.approx(logprob)
        assert all(value <= logprob + 1e-6 for value in top.values())
    plain = llm.generate(PROMPTS[0], GREEDY, use_tqdm=False)[0].outputs[0]
    assert plain.top_logprobs is None


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"stop": ""}, "stop"),
        ({"stop": [1]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"stop_token_ids": "3"}, "stop_token_ids"),
        ({"logprobs": -1}, "logprobs"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
    ],
)
def test_bad_stop_and_logprob_parameters_name_the_field(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)
