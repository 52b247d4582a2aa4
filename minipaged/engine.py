"""LLM: the serving engine. Each step: schedule -> swap / copy blocks -> model step -> sample.

OS idea: the kernel's main loop: pick what runs (the scheduler), fix up memory (page in, copy on
write), let it run a time slice, account for what happened (OSTEP ch. 6-7). KV counterpart: vLLM
paper section 4.5-5: the engine drives the scheduler and the block manager (policy, on the CPU) and
the model runner with its backend (mechanism, on the device), one iteration at a time.

    llm = LLM("tiny-llama")
    outs = llm.generate(["Hello"], SamplingParams(temperature=0.0, max_tokens=8))
"""

from __future__ import annotations

import functools
import heapq
import itertools
import os
import threading
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq

import torch
from tqdm import tqdm  # the plain bar: tqdm.auto warns in a notebook without ipywidgets

from minipaged.backend import get_backend
from minipaged.beam_search import BeamState
from minipaged.config import CacheConfig, SchedulerConfig, kv_cache_bytes_per_block
from minipaged.distributed.sharding import check_divisible, local_kv_heads
from minipaged.limits import (
    check_pool_memory,
    check_supported_dtype,
    resolve_device,
    resolve_dtype,
)
from minipaged.model_runner import ModelRunner, kv_shape
from minipaged.outputs import (
    BeamSearchOutput,
    CompletionOutput,
    EngineStats,
    RequestMetrics,
    RequestOutput,
    StepStats,
)
from minipaged.presets import PRESETS, ByteTokenizer, load_preset
from minipaged.reference.block_manager import BlockManager
from minipaged.reference.scheduler import Scheduler, SchedulerOutput
from minipaged.sampling import (
    BeamSearchParams,
    SamplingParams,
    sample,
    seeded_generator,
    top_logprobs,
)
from minipaged.sequence import Sequence, SequenceGroup, SequenceStatus

# bytes of device KV pool when num_gpu_blocks is None on CPU
DEFAULT_KV_CACHE_MEMORY_CPU = 64 * 2**20
# of the GPU's free memory when num_gpu_blocks is None on CUDA
KV_CACHE_FRACTION_CUDA = 0.5

# the StepStats an engine keeps (the most recent), so a server does not grow
DEFAULT_MAX_STEP_STATS = 10_000

Prompt = str | dict


def _serialized(method):
    """Run an LLM method under the engine's lock: callers on several threads take turns.

    The engine's state (queues, block tables, the pools) has one owner at a time. A second
    thread calling generate() waits until the first call has returned, then runs: serialized,
    like a system call on a kernel with one big lock. The lock is re-entrant, so generate() may
    call step().
    """

    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return locked


class LLM:
    """A serving engine for a transformers decoder model on a paged KV cache (vLLM's `LLM`).

    Args:
        model: a preset name (see presets.PRESETS; None is "tiny-llama", the embedded default), a
            local checkpoint directory, or a transformers model object (which is switched to the
            "minipaged" attention for good: `model.set_attn_implementation("sdpa")` switches it back).
            Must be None when `runner` is given: the runner brings its own model, or none.
        backend: "reference" or "triton" (the kernel contract's implementations).
        block_size: tokens per KV block.
        num_gpu_blocks: blocks in the device pool; None: derived from `kv_cache_memory` (below).
        num_cpu_blocks: blocks in the host swap space; None: as many as num_gpu_blocks.
        preemption_mode: "recompute" or "swap".
        enable_prefix_caching: share full prompt blocks across requests (a bool).
        device: "cpu" or "cuda" ("cuda:N"). The Triton backend runs on "cpu" only through Triton's
            interpreter (TRITON_INTERPRET=1, which `import minipaged` sets on a machine without a GPU).
        dtype: the model's dtype: torch.float32, float16 or bfloat16, or a name ("float16", "fp16",
            "bf16", "auto", ...). None or "auto": float32 for presets, the checkpoint's otherwise.
        seed: an int; seeds the preset's weights and the requests that bring no seed of their own.
        tokenizer: for a model object; presets bring a byte-level one, directories their own.
        kv_cache_memory: bytes for the device pool when num_gpu_blocks is None (default 64 MiB on
            CPU, half the free GPU memory on CUDA). num_gpu_blocks = kv_cache_memory // bytes per
            block, and bytes per block = 2 x layers x block_size x kv_heads x head_dim x dtype size.
        max_num_seqs: the most sequences running at once.
        max_num_batched_tokens: the most tokens a step computes, prefills, decodes and swap-ins
            together (None: max(max_model_len + max_num_seqs, 2048), so that the longest prompt
            always fits beside a full batch of decodes and the budget binds only when set).
        max_model_len: the longest prompt plus output (None: the model's maximum positions).
        watermark: fraction of device blocks kept free at admission.
        batching: "iteration" (default: the batch is formed anew every step) or "static" (a new
            batch only once the last one has finished; the experiments' FasterTransformer).
        enable_chunked_prefill: compute long prompts in chunks that fill what each step's
            budget leaves after the decodes (docs/concepts/chunked-prefill.md); the budget
            (max_num_batched_tokens) then defaults to max(512, max_num_seqs). Parallel samples
            and beams fork once the whole prompt is computed.
        tensor_parallel_size: ranks that split the model Megatron-style, each with its share of
            the KV heads in pools of the same blocks (docs/concepts/tensor-parallel.md). On one
            machine the engine starts the other N - 1 ranks itself; under torchrun it joins the
            group, and ranks other than 0 serve inside this constructor and exit when rank 0
            closes. Call close() (or use `with LLM(...) as llm:`) to stop the workers.
        runner: what executes each step (None: a ModelRunner running `model` on `backend`). A
            simulated runner (experiments/simulated_runner.py) computes no tensors: it returns
            null-policy logits and the time the step would take, and the engine's clock then runs
            on simulated time. The loop around it is the same.
        block_manager: the memory manager the scheduler drives (None: a BlockManager built from
            the arguments above). The experiments pass the baselines' reservation managers here
            (experiments/reservation.py), so that one scheduler serves every system.
        max_step_stats: how many StepStats `step_stats` keeps, the most recent (None: all, as an
            experiment that plots every step wants). A long-running server keeps a few.

    Raises:
        ValueError: naming the argument, for an unknown backend, preset, device or dtype, a bad
            setting, pools larger than the memory free (both figures given), or backend="triton"
            with device="cpu" while Triton's interpreter is off.
        TypeError: naming the argument, for a value of the wrong type (seed="0", ...).

    Attributes:
        model_name: the preset's name or the checkpoint directory as given (a model object's
            `config.name_or_path`; None under a runner): what `minipaged serve` lists by default.

    Threads: every method takes the engine's lock, so calls from several threads are serialized
    (a second generate() waits for the first to return), never interleaved.
    """

    def __init__(
        self,
        model: str | torch.nn.Module | None = None,
        backend: str = "reference",
        block_size: int = 16,
        num_gpu_blocks: int | None = None,
        num_cpu_blocks: int | None = None,
        preemption_mode: str = "recompute",
        enable_prefix_caching: bool = False,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        seed: int = 0,
        *,
        tokenizer: object = None,
        kv_cache_memory: int | None = None,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int | None = None,
        max_model_len: int | None = None,
        watermark: float = 0.01,
        batching: str = "iteration",
        enable_chunked_prefill: bool = False,
        tensor_parallel_size: int = 1,
        runner: object = None,
        block_manager: object = None,
        max_step_stats: int | None = DEFAULT_MAX_STEP_STATS,
    ) -> None:
        # ValueError for an unknown name, before any loading
        self.backend = get_backend(backend)
        # ValueError naming device: an unknown name, or CUDA that is not here
        resolve_device(device)
        _check_backend_device(self.backend.name, device)
        dtype = resolve_dtype(dtype)
        _check_arguments(seed, enable_prefix_caching, max_step_stats)
        _check_tensor_parallel(tensor_parallel_size, runner, block_manager)
        self.tensor_parallel_size = tensor_parallel_size
        if runner is not None and model is not None:
            raise ValueError(
                "model must be None when runner is given (the runner brings its model)"
            )
        self.model_name = _model_name(model, runner)
        if runner is None:
            self.model, self.tokenizer = _load_model(
                model or "tiny-llama", dtype, seed, tokenizer
            )
            check_supported_dtype(
                next(self.model.parameters()).dtype, "the model's dtype"
            )
            if tensor_parallel_size > 1:  # before any pool is sized by the heads
                check_divisible(self.model.config, tensor_parallel_size)
            positions = _max_positions(self.model.config)
            self.vocab_size = self.model.config.get_text_config().vocab_size
            self.eos_token_id = _eos_id(self.model, self.tokenizer)
        else:
            self.model, self.tokenizer = None, tokenizer
            positions, self.vocab_size = runner.max_model_len, runner.vocab_size
            self.eos_token_id = getattr(runner, "eos_token_id", None)
        self.cache_config = None  # a block_manager given brings its own sizes
        if block_manager is None:
            if num_gpu_blocks is None:
                if self.model is None:
                    raise ValueError(
                        "num_gpu_blocks must be given with a runner (no model to size it by)"
                    )
                num_gpu_blocks = _kv_cache_memory(
                    kv_cache_memory, device
                ) // _bytes_per_block(self.model, block_size, tensor_parallel_size)
            self.cache_config = cc = CacheConfig(
                block_size=block_size,
                num_gpu_blocks=num_gpu_blocks,
                num_cpu_blocks=num_gpu_blocks
                if num_cpu_blocks is None
                else num_cpu_blocks,
                watermark=watermark,
                enable_prefix_caching=enable_prefix_caching,
            )
            check_pool_memory(  # before the manager's lists and the pools exist
                cc.num_gpu_blocks,
                cc.num_cpu_blocks,
                0
                if self.model is None
                else _bytes_per_block(self.model, block_size, tensor_parallel_size),
                torch.device(device),
            )
            block_manager = BlockManager(
                cc.block_size,
                cc.num_gpu_blocks,
                cc.num_cpu_blocks,
                cc.watermark,
                cc.enable_prefix_caching,
            )
        window = None if self.model is None else _sliding_window(self.model.config)
        limit = positions if window is None else min(positions, window)
        limit_why = (
            f"the model's {positions} positions"
            if limit == positions
            else (
                f"the model's sliding window of {window} tokens: minipaged's attention has no window"
            )
        )
        model_len = limit if max_model_len is None else max_model_len
        self._model_len_why = "as given" if max_model_len is not None else limit_why
        if isinstance(model_len, int) and model_len > limit:
            raise ValueError(f"max_model_len must be <= {limit_why}, got {model_len}")
        budget = max_num_batched_tokens
        # a bad max_num_seqs or max_model_len is SchedulerConfig's to name
        if budget is None and enable_chunked_prefill is True:
            # vLLM's default chunk budget; the decodes of a full batch always fit
            budget = max(512, max_num_seqs) if type(max_num_seqs) is int else 512
        elif budget is None:
            sizes = (model_len, max_num_seqs)
            budget = (
                max(sum(sizes), 2048) if all(type(x) is int for x in sizes) else 2048
            )
        self.scheduler_config = SchedulerConfig(
            max_model_len=model_len,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=budget,
            preemption_mode=preemption_mode,
            batching=batching,
            enable_chunked_prefill=enable_chunked_prefill,
        )
        self.block_manager = block_manager
        self.scheduler = Scheduler(self.scheduler_config, self.block_manager)
        if runner is None and tensor_parallel_size > 1:
            from minipaged.distributed.runner import start

            runner = start(
                self.model,
                self.backend,
                self.block_manager,
                device,
                tensor_parallel_size,
            )
        elif runner is None:
            runner = ModelRunner(self.model, self.backend, self.block_manager, device)
        self.runner = runner
        self.seed = seed
        self.simulated = bool(getattr(runner, "simulated", False))
        self._start = time.perf_counter()
        self._simulated_time = 0.0
        # (arrival, order, group): a heap
        self._pending: list[tuple[float, int, SequenceGroup]] = []
        self._metrics: dict[str, RequestMetrics] = {}
        self.step_observers: list[Callable[[LLM, SchedulerOutput], None]] = []
        self.step_stats: list[StepStats] = []  # the last max_step_stats steps
        self.max_step_stats = max_step_stats
        self._lock = threading.RLock()
        self.stats = EngineStats()
        self._request_ids = itertools.count()
        self._requests: dict[str, tuple[SequenceGroup, object, str | None]] = {}
        self._generators: dict[int, torch.Generator] = {}
        self._beams: dict[str, BeamState] = {}
        # chunked prefill: the seed of a request whose n samples fork once its prompt is done
        self._samples_to_fork: dict[str, int] = {}

    # ---- the public API
    # ------------------------------------------------------------------------

    @_serialized
    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs in the prompts' order.

        Prompts are strings (tokenized by the model's tokenizer) or `{"prompt_token_ids": [...]}`.
        One SamplingParams applies to all prompts, or give one per prompt.

        If anything fails on the way (a model error, Ctrl-C), this call's requests are aborted and
        their blocks freed before the error propagates: the engine then serves the next call.

        Raises:
            ValueError: naming the field, for a prompt or a parameter that can never be served;
                nothing is queued then.
        """
        prompts = _prompt_list(prompts)
        params = sampling_params if sampling_params is not None else SamplingParams()
        params_list = (
            list(params)
            if isinstance(params, (list, tuple))
            else [params] * len(prompts)
        )
        if len(params_list) != len(prompts):
            raise ValueError(
                f"sampling_params must be one, or one per prompt ({len(prompts)}), got {len(params_list)}"
            )
        if not all(isinstance(sp, SamplingParams) for sp in params_list):
            raise ValueError(
                "sampling_params must be SamplingParams (use beam_search for BeamSearchParams)"
            )
        self._check_idle()
        requests = [
            self._prepare(p, sp) for p, sp in zip(prompts, params_list, strict=True)
        ]  # all checked first
        return self._run(requests, use_tqdm)

    @_serialized
    def beam_search(
        self,
        prompts: Prompt | Seq[Prompt],
        params: BeamSearchParams,
        use_tqdm: bool = False,
    ) -> list[BeamSearchOutput]:
        """Beam search for every prompt; each output holds beam_width beams, best first.

        The beams of a request are sequences of one group: they share blocks through fork, a beam
        that is dropped frees its blocks, and the scoring is transformers' (see beam_search.py).

        Raises:
            ValueError: naming the field, as for generate.
        """
        prompts = _prompt_list(prompts)
        if not isinstance(params, BeamSearchParams):
            raise ValueError(
                f"params must be BeamSearchParams, got {type(params).__name__}"
            )
        self._check_idle()
        requests = [self._prepare(p, params) for p in prompts]
        return self._run(requests, use_tqdm)

    @_serialized
    def add_request(
        self,
        prompt: Prompt,
        params: SamplingParams | BeamSearchParams,
        arrival_time: float | None = None,
    ) -> str:
        """Queue one request (checked now); returns its request id. Drive it with step().

        Args:
            prompt: a string or {"prompt_token_ids": [...]}.
            params: SamplingParams or BeamSearchParams.
            arrival_time: when the request arrives, on the engine's clock (see now()); None: now.
                A request from the future waits, unseen by the scheduler, until the clock reaches
                it: this is how a trace of arrivals is replayed, in real or simulated time.

        Raises:
            ValueError: naming the field, for a request that can never be served.
        """
        if arrival_time is not None and (
            not isinstance(arrival_time, (int, float))
            or isinstance(arrival_time, bool)
            or arrival_time < 0
        ):
            raise ValueError(
                f"arrival_time must be a number of seconds >= 0, got {arrival_time!r}"
            )
        return self._submit(*self._prepare(prompt, params), arrival_time)

    @_serialized
    def close(self) -> None:
        """Stop the tensor-parallel workers and leave their process group (nothing to do with
        one rank). Garbage collection does the same; calling it twice is harmless."""
        close = getattr(self.runner, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def abort_request(self, request_id: str | Seq[str]) -> None:
        """Cancel requests wherever they are: still to arrive, waiting, running or swapped out.

        Their blocks go back to the pools at once (device and host), and they are forgotten: no
        output will come for them. Unknown or already finished ids are ignored, as in vLLM, so a
        server may abort a request whose client has gone without checking it first.

        Args:
            request_id: an id from add_request, or a list of them.
        """
        ids = [request_id] if isinstance(request_id, str) else request_id
        if not isinstance(ids, (list, tuple)) or not all(
            isinstance(rid, str) for rid in ids
        ):
            raise TypeError(
                f"request_id must be a string or a list of strings, got {request_id!r}"
            )
        for rid in ids:
            entry = self._requests.get(rid)
            if entry is None:
                continue
            group = entry[0]
            if any(pending is group for _, _, pending in self._pending):
                self._pending = [p for p in self._pending if p[2] is not group]
                heapq.heapify(self._pending)
            self.scheduler.abort(group)  # frees its blocks, drops it from its queue
            self._forget(rid)
            self.stats.aborted_requests += 1

    @_serialized
    def request_output(self, request_id: str) -> RequestOutput | None:
        """The state of an unfinished request: its samples so far (finished=False), for streaming.

        Each CompletionOutput holds the tokens generated so far and their text; finish_reason is
        set for a sample that has ended while its siblings go on. None when the id is unknown:
        a finished request's output is returned once, by the step() that finished it.

        Raises:
            ValueError: for a beam-search request (its beams are only known at the end).
        """
        entry = self._requests.get(request_id)
        if entry is None:
            return None
        group, params, text = entry
        if isinstance(params, BeamSearchParams):
            raise ValueError(
                "request_output: a beam search has no partial output (its beams change)"
            )
        completions = [
            self._completion(i, seq, params) for i, seq in enumerate(group.seqs)
        ]
        return RequestOutput(
            request_id,
            text,
            list(group.seqs[0].prompt_token_ids),
            completions,
            finished=False,
            metrics=self._metrics[request_id],
        )

    @_serialized
    def has_unfinished_requests(self) -> bool:
        """Is any request queued, running, swapped out or still to arrive?"""
        return self.scheduler.has_unfinished() or bool(self._pending)

    def now(self) -> float:
        """The engine's clock, in seconds: simulated time under a simulated runner (the sum of its
        steps' times and of the idle gaps between arrivals), else wall time since the engine was built."""
        return (
            self._simulated_time
            if self.simulated
            else time.perf_counter() - self._start
        )

    @_serialized
    def step(self) -> list[RequestOutput | BeamSearchOutput]:
        """Run one iteration: schedule, move blocks, run the model, sample. Returns what finished.

        Requests whose arrival time has come join the waiting queue first. When nothing has
        arrived yet, the clock moves to the next arrival (a simulated clock jumps, a wall clock
        sleeps), so a step always runs while any request is unfinished.
        """
        self._admit_arrivals()
        if not self.scheduler.has_unfinished():
            if not self._pending:
                return []
            # idle: nothing to run until the next arrival
            self._wait_until(self._pending[0][0])
            self._admit_arrivals()
        start = self.now()
        try:
            out = self.scheduler.schedule()
            if not out.scheduled and not out.preempted:
                raise RuntimeError(
                    "the scheduler made no progress: no request can run (a bug, please report)"
                )
        # the queues may be half changed: no request in them can be trusted, and one left
        # there would fail the same way at every step (a server would never answer it)
        except BaseException:
            self.abort_request(list(self._requests))
            raise
        try:
            logits = self.runner.execute(out)  # [num_seqs, vocab]
            if self.simulated:
                self._simulated_time += self.runner.step_time(out)
            for item in out.scheduled:
                # all its tokens, or the prompt up to this chunk's end
                item.seq.num_computed_tokens = item.seq_len
                # a request starts with a prefill (its whole prompt, or its first chunk)
                if item.is_prefill:
                    metrics = self._metrics[item.group.request_id]
                    if metrics.first_scheduled_time is None:
                        metrics.first_scheduled_time = start
            # before finished sequences give their blocks back: the true footprint
            self._record(out, start)
            return self._process(out, logits)
        # a model error, or Ctrl-C: the step's requests are in an unknown state
        except BaseException:
            self._abort_step(out)
            raise

    def _abort_step(self, out: SchedulerOutput) -> None:
        """Abort the requests a failed step touched, so the engine can go on serving the others.

        A scheduled sequence may have its new token sampled or not, its copy-on-write copy done or
        not; a group swapped out in this step may have host blocks that never received its K/V.
        None of them can be trusted, so all are aborted (their blocks freed); the rest of the
        queues are untouched and the next step runs as usual.
        """
        swapped_out = {
            request_id for request_id, mode in out.preempted if mode == "swap"
        }
        request_ids = {item.group.request_id for item in out.scheduled} | swapped_out
        self.abort_request(sorted(request_ids))

    # ---- requests
    # ------------------------------------------------------------------------------

    def _prepare(self, prompt: Prompt, params) -> tuple[list[int], str | None, object]:
        """Tokenize and check one request; raise ValueError naming the field if it can never run."""
        if not isinstance(params, (SamplingParams, BeamSearchParams)):
            raise ValueError(
                f"params must be SamplingParams or BeamSearchParams, got {type(params).__name__}"
            )
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(
                    'prompt is a string but the model has no tokenizer: pass {"prompt_token_ids": [...]}'
                )
            token_ids, text = self._encode(prompt), prompt
        elif isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            token_ids, text = prompt["prompt_token_ids"], None
            if not isinstance(token_ids, (list, tuple)):
                raise TypeError(
                    f"prompt_token_ids must be a list of ints, got {type(token_ids).__name__}"
                )
            token_ids = list(token_ids)
        else:
            raise ValueError(
                f'prompt must be a string or {{"prompt_token_ids": [...]}}, got {type(prompt).__name__}'
            )
        if not token_ids:
            raise ValueError("prompt must not be empty (it has no tokens)")
        bad = [
            t for t in token_ids if type(t) is not int or not 0 <= t < self.vocab_size
        ]
        if bad:
            raise ValueError(
                f"prompt_token_ids must be ints in [0, {self.vocab_size}), got {bad[:5]}"
            )
        total = len(token_ids) + params.max_tokens
        limit = self.scheduler_config.max_model_len
        if total > limit:
            raise ValueError(
                f"prompt ({len(token_ids)} tokens) plus max_tokens ({params.max_tokens}) is {total}, "
                f"beyond max_model_len={limit} ({self._model_len_why}): this request can never fit"
            )
        width = params.n if isinstance(params, SamplingParams) else params.beam_width
        if width > self.scheduler_config.max_num_seqs:
            name = "n" if isinstance(params, SamplingParams) else "beam_width"
            raise ValueError(
                f"{name}={width} is more than max_num_seqs={self.scheduler_config.max_num_seqs}"
            )
        # the one fit test
        self.block_manager.check_fits(len(token_ids), params.max_tokens, width)
        return token_ids, text, params

    def _encode(self, prompt: str) -> list[int]:
        """Tokenize a text prompt; text that cannot be encoded is the caller's error, named as such."""
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ValueError(
                f"prompt is not valid text: {error.reason} at index {error.start} "
                f"({prompt[error.start : error.end]!r}, a lone surrogate cannot be encoded)"
            ) from None
        try:
            return list(self.tokenizer.encode(prompt))
        # the tokenizer's own complaint, attributed to the prompt
        except Exception as error:
            raise ValueError(f"prompt could not be tokenized: {error}") from error

    def _submit(
        self, token_ids: list[int], text: str | None, params, arrival_time=None
    ) -> str:
        request_id = str(next(self._request_ids))
        now = self.now()
        arrival = now if arrival_time is None else float(arrival_time)
        first = Sequence(list(token_ids))
        if isinstance(params, SamplingParams):
            seed = (
                params.seed
                if params.seed is not None
                else self.seed * 1_000_003 + int(request_id)
            )
            # n samples share the prompt; with chunked prefill one sequence
            # computes it, and the others fork once it is done (_fork_samples)
            seqs = [first]
            if self.scheduler_config.enable_chunked_prefill and params.n > 1:
                self._samples_to_fork[request_id] = seed
            else:
                seqs += [first.fork() for _ in range(params.n - 1)]
            for index, seq in enumerate(seqs):
                self._generators[seq.seq_id] = seeded_generator(
                    seed, index, self.runner.device
                )
            width = params.n
        else:
            # one sequence until the first step forks
            seqs, width = [first], params.beam_width
            self._beams[request_id] = BeamState(
                params, len(token_ids), self._eos(params)
            )
        group = SequenceGroup(
            request_id, seqs, arrival, max_seqs=width, max_tokens=params.max_tokens
        )
        self._requests[request_id] = (group, params, text)
        self._metrics[request_id] = RequestMetrics(arrival_time=arrival)
        if arrival <= now:
            self.scheduler.add(group)
        # from the future: it joins the waiting queue when the clock reaches it (step)
        else:
            heapq.heappush(self._pending, (arrival, int(request_id), group))
        return request_id

    def _admit_arrivals(self) -> None:
        """Move the requests whose arrival time has come to the scheduler's waiting queue."""
        now = self.now()
        while self._pending and self._pending[0][0] <= now:
            self.scheduler.add(heapq.heappop(self._pending)[2])

    def _wait_until(self, when: float) -> None:
        if self.simulated:
            self._simulated_time = max(self._simulated_time, when)
        else:
            time.sleep(max(0.0, when - self.now()))

    def _check_idle(self) -> None:
        if self.has_unfinished_requests():
            raise ValueError(
                "requests added with add_request are unfinished: drive them with step() first"
            )

    def _eos(self, params) -> int | None:
        return None if params.ignore_eos else self.eos_token_id

    def _run(self, requests: list[tuple], use_tqdm: bool) -> list:
        """Submit checked requests and step until all have finished; on any failure, abort them."""
        request_ids: list[str] = []
        outputs: dict[str, object] = {}
        try:
            request_ids.extend(self._submit(*request) for request in requests)
            with tqdm(
                total=len(request_ids), desc="requests", disable=not use_tqdm
            ) as bar:
                while len(outputs) < len(request_ids):
                    for output in self.step():
                        outputs[output.request_id] = output
                        bar.update(1)
        except BaseException:  # an error or Ctrl-C: leave nothing of this call behind
            self.abort_request([rid for rid in request_ids if rid not in outputs])
            raise
        return [outputs[request_id] for request_id in request_ids]

    # ---- after the model step
    # ------------------------------------------------------------------

    def _process(self, out: SchedulerOutput, logits: torch.Tensor) -> list:
        rows: dict[str, list[int]] = {}
        for i, item in enumerate(out.scheduled):
            # a chunk that leaves part of its prompt for later steps samples nothing
            if item.completes_sequence:
                rows.setdefault(item.group.request_id, []).append(i)
        finished, end = [], self.now()
        for request_id, indices in rows.items():
            group, params, _ = self._requests[request_id]
            metrics = self._metrics[request_id]
            # its first step: the prompt ran, a token came out
            if metrics.first_token_time is None:
                metrics.first_token_time = end
            if isinstance(params, BeamSearchParams):
                seqs = [out.scheduled[i].seq for i in indices]
                done = self._beams[request_id].step(
                    seqs, logits[indices], group, self.block_manager
                )
                self.stats.generated_tokens += len(seqs)
            else:
                samples = [(out.scheduled[i].seq, i) for i in indices]
                samples += self._fork_samples(group, params, samples)
                for seq, i in samples:
                    self._sample(seq, logits[i], params)
                done = group.is_finished()
            if done:
                self.scheduler.finish(group)
                metrics.finished_time = end
                finished.append(self._output(request_id))
        return finished

    def _fork_samples(
        self, group: SequenceGroup, params: SamplingParams, samples: list
    ) -> list[tuple[Sequence, int]]:
        """Chunked prefill: the n - 1 other samples of a request fork from its one sequence once
        the prompt is computed (like fork() after exec of the common part), each with its own
        generator, to sample its first token from the same logits.

        Returns:
            (child, logits row) for each child; [] for a request with nothing to fork.
        """
        seed = self._samples_to_fork.pop(group.request_id, None)
        if seed is None:
            return []
        ((parent, row),) = samples
        children = []
        for index in range(1, params.n):
            child = parent.fork()
            self.block_manager.fork(parent, child)
            group.add(child)
            self._generators[child.seq_id] = seeded_generator(
                seed, index, self.runner.device
            )
            children.append((child, row))
        return children

    def _sample(
        self, seq: Sequence, logits: torch.Tensor, params: SamplingParams
    ) -> None:
        token, logprob = sample(logits, params, self._generators[seq.seq_id])
        seq.append_token_id(token, logprob)
        if params.logprobs is not None:
            seq.output_top_logprobs.append(top_logprobs(logits, params.logprobs))
        self.stats.generated_tokens += 1
        if token == self._eos(params):
            seq.status = SequenceStatus.FINISHED_STOPPED
        elif token in params.stop_token_ids:
            seq.status, seq.stop_reason = SequenceStatus.FINISHED_STOPPED, token
        elif params.stop and (stop := self._stop_string(seq, params)) is not None:
            seq.status, seq.stop_reason = SequenceStatus.FINISHED_STOPPED, stop
        elif (
            len(seq.output_token_ids) >= params.max_tokens
            or len(seq) >= self.scheduler_config.max_model_len
        ):
            seq.status = SequenceStatus.FINISHED_LENGTH_CAPPED
        if seq.is_finished():
            self.block_manager.free(seq)
            del self._generators[seq.seq_id]

    def _stop_string(self, seq: Sequence, params: SamplingParams) -> str | None:
        """The first stop string that the sample's text now contains, if any."""
        text = self._decode(seq.output_token_ids)
        hits = [(text.find(stop), stop) for stop in params.stop if stop in text]
        return min(hits)[1] if hits else None

    def _completion(
        self, index: int, seq: Sequence, params: SamplingParams
    ) -> CompletionOutput:
        """One sample as the caller sees it; its text stops before the stop string or stop token that
        ended it (its token_ids keep every token sampled), as vLLM's does by default."""
        # a stop token: in token_ids, not in the text
        if isinstance(seq.stop_reason, int):
            text = self._decode(seq.output_token_ids[:-1])
        else:
            text = self._decode(seq.output_token_ids)
        if isinstance(seq.stop_reason, str):
            text = text[: text.find(seq.stop_reason)]
        if not seq.is_finished():
            reason = None
        else:
            reason = (
                "stop" if seq.status == SequenceStatus.FINISHED_STOPPED else "length"
            )
        return CompletionOutput(
            index=index,
            text=text,
            token_ids=list(seq.output_token_ids),
            cumulative_logprob=seq.cumulative_logprob,
            logprobs=list(seq.output_logprobs),
            finish_reason=reason,
            stop_reason=seq.stop_reason,
            top_logprobs=list(seq.output_top_logprobs)
            if params.logprobs is not None
            else None,
        )

    def _output(self, request_id: str):
        group, params, text = self._requests[request_id]
        prompt_ids = group.seqs[0].prompt_token_ids
        if isinstance(params, BeamSearchParams):
            output = self._beams[request_id].output(
                request_id, prompt_ids, self._decode
            )
            output.metrics = self._metrics[request_id]
        else:
            completions = [
                self._completion(i, seq, params) for i, seq in enumerate(group.seqs)
            ]
            output = RequestOutput(
                request_id,
                text,
                list(prompt_ids),
                completions,
                metrics=self._metrics[request_id],
            )
        self._forget(request_id)
        return output

    def _forget(self, request_id: str) -> None:
        """Drop everything the engine keeps about a request that has finished or been aborted."""
        group, _, _ = self._requests.pop(request_id)
        self._metrics.pop(request_id, None)
        self._beams.pop(request_id, None)
        self._samples_to_fork.pop(request_id, None)
        for seq in group.seqs:
            self._generators.pop(seq.seq_id, None)

    def _decode(self, token_ids: list[int]) -> str:
        return (
            self.tokenizer.decode(token_ids, skip_special_tokens=True)
            if self.tokenizer is not None
            else ""
        )

    def _record(self, out: SchedulerOutput, start: float) -> None:
        # the device pool alone: memory_stats() would add a line per sequence, every step
        manager = self.block_manager
        device = manager.device_stats()
        step = StepStats(
            step=self.stats.steps,
            time=start,
            duration=self.now() - start,
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_swapped=len(self.scheduler.swapped),
            num_seqs=len(out.scheduled),
            num_batched_tokens=out.num_batched_tokens,
            num_prefill_tokens=sum(
                s.num_query_tokens for s in out.scheduled if s.is_prefill
            ),
            blocks_free=device.num_free,
            blocks_used=device.num_used,
            blocks_shared=device.num_shared,
            kv_utilization=device.utilization,
            preempted=list(out.preempted),
            blocks_swapped_out=len(out.blocks_to_swap_out),
            blocks_swapped_in=len(out.blocks_to_swap_in),
            blocks_copied=len(out.blocks_to_copy),
        )
        self.step_stats.append(step)
        if (
            self.max_step_stats is not None
            and len(self.step_stats) > self.max_step_stats
        ):
            del self.step_stats[0]  # the oldest goes: a bounded history
        s = self.stats
        s.mean_kv_utilization = (
            s.mean_kv_utilization * s.steps + step.kv_utilization
        ) / (s.steps + 1)
        s.steps += 1
        s.num_preemptions = dict(self.scheduler.num_preemptions)
        s.blocks_swapped_out = manager.blocks_swapped_out
        s.blocks_swapped_in = manager.blocks_swapped_in
        s.cow_copies = manager.cow_copies
        s.prefix_cache_hits = manager.prefix_cache_hits
        s.prefix_cache_misses = manager.prefix_cache_misses
        s.peak_blocks_used = max(s.peak_blocks_used, device.num_used)
        s.max_blocks_saved_by_sharing = max(
            s.max_blocks_saved_by_sharing, device.blocks_saved_by_sharing
        )
        # e.g. the experiments' per-step memory breakdown
        for observe in self.step_observers:
            observe(self, out)


def _check_arguments(
    seed: object, enable_prefix_caching: object, max_step_stats: object
) -> None:
    """Type checks that name the argument (a string seed would fail only at the first sample)."""
    if type(seed) is not int:
        raise TypeError(f"seed must be an int, got {seed!r}")
    if not isinstance(enable_prefix_caching, bool):
        raise TypeError(
            f"enable_prefix_caching must be True or False, got {enable_prefix_caching!r}"
        )
    if max_step_stats is not None and (
        type(max_step_stats) is not int or max_step_stats < 0
    ):
        raise ValueError(
            f"max_step_stats must be None or an int >= 0, got {max_step_stats!r}"
        )


def _check_tensor_parallel(size: object, runner: object, block_manager: object) -> None:
    """tensor_parallel_size: an int >= 1, and > 1 only when the engine runs its own model."""
    if type(size) is not int or size < 1:
        raise ValueError(f"tensor_parallel_size must be an int >= 1, got {size!r}")
    if size > 1 and (runner is not None or block_manager is not None):
        raise ValueError(
            "tensor_parallel_size > 1 runs the model on several ranks: give no runner or "
            "block_manager (a simulated runner prices tensor parallelism in its CostModel)"
        )


def _model_name(model: object, runner: object) -> str | None:
    """What the model is called: the preset's name or the checkpoint directory, as given."""
    if runner is not None:
        return None
    if model is None or isinstance(model, str):
        return model or "tiny-llama"
    config = getattr(model, "config", None)
    return getattr(config, "name_or_path", None) or None


def _sliding_window(config) -> int | None:
    """The model's attention window if any layer uses one (minipaged's attention attends to all)."""
    config = config.get_text_config()
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if not window or (
        layer_types is not None and "sliding_attention" not in layer_types
    ):
        return None
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return int(window)


def _prompt_list(prompts: object) -> list:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, (list, tuple)):
        return list(prompts)
    raise ValueError(
        f"prompts must be a prompt or a list of prompts, got {type(prompts).__name__}"
    )


def _load_model(model, dtype, seed, tokenizer):
    """(model, tokenizer) from a preset name, a local directory or a model object."""
    if isinstance(model, torch.nn.Module):
        return model.eval(), tokenizer
    if not isinstance(model, str):
        raise ValueError(
            f"model must be a preset name, a local directory or a model, got {type(model).__name__}"
        )
    if model in PRESETS:
        return load_preset(
            model, seed, dtype or torch.float32
        ), tokenizer or ByteTokenizer()
    if os.path.isdir(model):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            loaded = AutoModelForCausalLM.from_pretrained(
                model, dtype=dtype or "auto", local_files_only=True
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            first_line = (
                str(error).strip().splitlines()[0]
                if str(error).strip()
                else type(error).__name__
            )
            raise ValueError(
                f"model={model!r}: cannot load a checkpoint from this directory: {first_line}"
            ) from error
        if tokenizer is None:
            try:
                tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=True)
            except (OSError, ValueError):
                tokenizer = None  # token-id prompts still work
        return loaded.eval(), tokenizer
    raise ValueError(
        f"model must be a preset ({', '.join(PRESETS)}) or a local directory, got {model!r}"
    )


def _check_backend_device(backend: str, device: str | torch.device) -> None:
    """Refuse, before loading anything, a Triton backend on the CPU without Triton's interpreter.

    Compiled Triton kernels run on CUDA tensors only; CPU tensors run through the interpreter, which
    must be on before triton is imported (minipaged/_triton_env.py). Caught here, the mistake is one
    clear message at construction rather than an error in the first step of generate.
    """
    if backend != "triton" or torch.device(device).type == "cuda":
        return
    # the backend is loaded: this imports nothing new
    from minipaged.fast.cache_ops import interpreting

    if not interpreting():
        raise ValueError(
            f"device={str(device)!r} with backend='triton' needs Triton's interpreter, which is off "
            "(TRITON_INTERPRET is not 1): use device='cuda', or set TRITON_INTERPRET=1 before triton "
            "(or minipaged) is imported, or use backend='reference'"
        )


def _kv_cache_memory(kv_cache_memory: int | None, device: str) -> int:
    if kv_cache_memory is not None:
        if not isinstance(kv_cache_memory, int) or kv_cache_memory <= 0:
            raise ValueError(
                f"kv_cache_memory must be a positive number of bytes, got {kv_cache_memory!r}"
            )
        return kv_cache_memory
    if torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free * KV_CACHE_FRACTION_CUDA)
    return DEFAULT_KV_CACHE_MEMORY_CPU


def _bytes_per_block(model: torch.nn.Module, block_size: int, tp: int = 1) -> int:
    """Bytes of one block's K and V in every layer, in one rank's pools (its share of the heads)."""
    num_layers, _, head_dim = kv_shape(model.config)
    num_kv_heads = local_kv_heads(model.config, tp)
    dtype_bytes = next(model.parameters()).dtype.itemsize
    return kv_cache_bytes_per_block(
        block_size, num_layers, num_kv_heads, head_dim, dtype_bytes
    )


def _max_positions(config) -> int:
    config = config.get_text_config()
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    return 2048


def _eos_id(model, tokenizer) -> int | None:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        eos = (
            getattr(model.generation_config, "eos_token_id", None)
            or model.config.eos_token_id
        )
    return eos[0] if isinstance(eos, list) else eos
