"""Tensor parallelism's processes: what each step sends, a worker that dies, closing, garbage
collection, rank 0 dying, torchrun, and the command line. Every test starts worker processes
(marked `multiprocess`; `make check` leaves them out).

These live apart from test_tensor_parallel.py, whose engines stay up for the whole of that module:
one process serves one tensor-parallel engine at a time.
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from test_engine_equivalence import as_requests
from test_tensor_parallel import GREEDY

from minipaged import LLM, SamplingParams


@pytest.mark.multiprocess
def test_each_step_records_what_it_sent():
    with LLM(
        "tiny-llama", tensor_parallel_size=2, num_gpu_blocks=32, block_size=4
    ) as llm:
        llm.generate(as_requests([[5, 6, 7]]), GREEDY, use_tqdm=False)
        comm = llm.runner.last_step
        layers = llm.model.config.num_hidden_layers
        hidden = llm.model.config.hidden_size
        # a decode step of one token: two all-reduces a layer of [1, 1, hidden] fp32
        assert comm.allreduce_calls == 2 * layers
        assert comm.allreduce_bytes == 2 * layers * hidden * 4
        assert comm.broadcast_bytes > 0 and comm.broadcast_s >= 0


@pytest.mark.multiprocess
def test_a_killed_worker_is_named_and_nothing_is_left_behind():
    llm = LLM("tiny-llama", tensor_parallel_size=2, num_gpu_blocks=32, block_size=4)
    (worker,) = llm.runner.processes
    llm.generate(as_requests([[5, 6, 7]]), GREEDY, use_tqdm=False)
    os.kill(worker.pid, signal.SIGKILL)
    worker.join(5)
    with pytest.raises(RuntimeError, match="rank 1"):
        llm.generate(as_requests([[5, 6, 7]]), GREEDY, use_tqdm=False)
    assert not worker.is_alive()
    assert not llm.has_unfinished_requests()  # the failed step's request was aborted
    with pytest.raises(RuntimeError, match="closed"):
        llm.generate(as_requests([[5, 6, 7]]), GREEDY, use_tqdm=False)
    llm.close()  # a second close is harmless
    # a new group can start in this process once the old one is gone
    with LLM(
        "tiny-llama", tensor_parallel_size=2, num_gpu_blocks=32, block_size=4
    ) as again:
        assert again.generate(as_requests([[5]]), GREEDY, use_tqdm=False)


@pytest.mark.multiprocess
def test_garbage_collection_stops_the_workers():
    llm = LLM("tiny-llama", tensor_parallel_size=2, num_gpu_blocks=32, block_size=4)
    (worker,) = llm.runner.processes
    del llm
    gc.collect()
    worker.join(10)
    assert not worker.is_alive() and worker.exitcode == 0


ORPHAN = textwrap.dedent(
    """
    import os
    from minipaged import LLM
    llm = LLM("tiny-llama", tensor_parallel_size=2, num_gpu_blocks=32, block_size=4)
    print(llm.runner.processes[0].pid, flush=True)
    os._exit(3)  # rank 0 dies without closing anything
    """
)


@pytest.mark.multiprocess
def test_a_worker_does_not_outlive_rank_0():
    done = subprocess.run(
        [sys.executable, "-c", ORPHAN], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 3, done.stderr
    pid = int(done.stdout.split()[0])
    for _ in range(50):
        if not _alive(pid):
            break
        time.sleep(0.2)
    assert not _alive(pid), f"worker {pid} outlived rank 0"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead but not yet reaped by init
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


TORCHRUN = textwrap.dedent(
    """
    from minipaged import LLM, SamplingParams
    llm = LLM("tiny-mistral", tensor_parallel_size=2, num_gpu_blocks=32, block_size=4)
    # only rank 0 gets here: rank 1 served inside the constructor and exited
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    out = llm.generate([{"prompt_token_ids": [5, 6, 7, 8]}], params, use_tqdm=False)
    print("tokens", out[0].outputs[0].token_ids, flush=True)
    llm.close()
    """
)


@pytest.mark.multiprocess
def test_under_torchrun_the_ranks_join_its_group(tmp_path):
    script = tmp_path / "tp.py"
    script.write_text(TORCHRUN)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
               "--standalone", str(script)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("tokens")]
    one = LLM("tiny-mistral", num_gpu_blocks=32, block_size=4)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    expected = one.generate(
        [{"prompt_token_ids": [5, 6, 7, 8]}], params, use_tqdm=False
    )
    assert lines == [f"tokens {expected[0].outputs[0].token_ids}"]


@pytest.mark.multiprocess
def test_the_generate_command_takes_tensor_parallel_size(capsys):
    from minipaged.cli import main

    argv = ["generate", "paging", "--max-tokens", "5", "--num-gpu-blocks", "32"]
    assert main([*argv, "--tensor-parallel-size", "2"]) == 0
    two = capsys.readouterr().out
    assert main(argv) == 0
    assert two == capsys.readouterr().out and "token_ids" in two


@pytest.mark.multiprocess
def test_a_server_runs_its_engine_loop_on_two_ranks():
    """The server's engine loop steps from its own thread; the workers follow it the same way."""
    import openai

    from minipaged.serving import running_server

    one = LLM("tiny-llama", num_gpu_blocks=32, block_size=4)
    (expected,) = one.generate(
        ["The cat"], SamplingParams(temperature=0.0, max_tokens=6)
    )
    with LLM(
        "tiny-llama", tensor_parallel_size=2, num_gpu_blocks=32, block_size=4
    ) as llm:
        with running_server(llm) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="none")
            completion = client.completions.create(
                model="tiny-llama", prompt="The cat", max_tokens=6, temperature=0
            )
        assert completion.choices[0].text == expected.outputs[0].text


@pytest.mark.multiprocess
def test_two_ranks_on_the_triton_backend_equal_one():
    """Every rank runs the backend it is given: here Triton's kernels, through the interpreter."""
    prompts = as_requests([[5, 6, 7, 8, 9], [11, 12]])
    kwargs = dict(backend="triton", num_gpu_blocks=16, block_size=4)
    one = LLM("tiny-llama", **kwargs)
    expected = [
        o.outputs[0].token_ids for o in one.generate(prompts, GREEDY, use_tqdm=False)
    ]
    with LLM("tiny-llama", tensor_parallel_size=2, **kwargs) as two:
        outputs = two.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected


def _hangs(rank, world_size, address, errors, parent_pid, *args):
    """A worker that never checks in (an import that hangs)."""
    time.sleep(60)


def _exits(rank, world_size, address, errors, parent_pid, *args):
    """A worker that dies while starting, after saying why."""
    errors.put((rank, "Traceback ...\nImportError: no module named 'spam'"))
    os._exit(3)


@pytest.mark.multiprocess
def test_a_worker_that_never_starts_is_named_after_the_timeout(monkeypatch):
    import datetime

    from minipaged.distributed import group

    monkeypatch.setattr(group, "TIMEOUT", datetime.timedelta(seconds=2))
    with pytest.raises(RuntimeError, match=r"rank\(s\) \[1\] did not start within 2 s"):
        group.spawn_workers(2, "cpu", _hangs, ())
    import torch.distributed as dist

    assert not dist.is_initialized()


@pytest.mark.multiprocess
def test_a_worker_that_dies_while_starting_is_named_with_its_reason():
    from minipaged.distributed import group

    with pytest.raises(
        RuntimeError, match=r"rank 1 failed \(ImportError: no module named 'spam'\)"
    ):
        group.spawn_workers(2, "cpu", _exits, ())
