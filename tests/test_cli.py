"""The `minipaged` command line: the demo, generate and the walk-through run, show what they claim,
and bad input fails with a message, never a traceback."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minipaged import LLM, SamplingParams, __version__
from minipaged.cli import main
from minipaged.demo import DemoConfig, run_demo
from minipaged.walkthrough import run

REPO_ROOT = Path(__file__).resolve().parents[1]

KEY_LINES = [
    "Step 0. An empty device pool",
    "(demand paging)",
    "fork(B, B'): blocks used before 5, after 5",
    "B  += 311: append_slots returned [(3, 5)]: copy 3 to 5",  # a copy-on-write pair
    "allocate(C): 2 hits, 1 miss",  # a prefix-cache hit
    "swap_out(B) returned (device, host) pairs for swap_blocks:",
    "[(0, 0), (1, 1), (5, 2), (8, 3), (3, 4), (9, 5)]",
    "swap_in(B) returned (host, device) pairs for swap_blocks: [(3, 9), (5, 8)]",
    # swap-in finds cached blocks (a swap cache)
    "4 of B's 6 blocks found in the prefix cache",
    # a block-table line
    "A    13 tokens, device: 0->0*[####] 1->1*[####] 2->2[####] 3->4[#...]",
    "B    13 tokens, host:   0->0*[####] 1->1*[####] 2->2[####] 3->3[#...]",
    "[A,B,B',C x4]",  # a block shared four ways in the pool picture
    "device pool: 16 blocks of 4 slots, 0 used, 16 free (6 cached-free)",
    "prefix cache: 4 hits, 3 misses; copied on write: 1 block; swapped: 6 out, 2 in",
]


def test_memory_walkthrough(capsys):
    assert main(["memory"]) == 0
    out = capsys.readouterr().out
    for line in KEY_LINES:
        assert line in out, line
    assert max(len(line) for line in out.splitlines()) <= 80  # fits a terminal


def test_walkthrough_sizes_are_options(capsys):
    assert (
        main(
            [
                "memory",
                "--block-size",
                "8",
                "--num-gpu-blocks",
                "12",
                "--num-cpu-blocks",
                "6",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "device pool: 12 blocks of 8 slots" in out
    assert "[########]" in out


@pytest.mark.parametrize("block_size", [2, 3, 16])
def test_walkthrough_holds_for_other_block_sizes(block_size):
    lines: list[str] = []
    stats = run(out=lines.append, block_size=block_size)
    assert stats.device.num_used == 0 and stats.host.num_used == 0
    assert stats.cow_copies == 1 and stats.prefix_cache_hits == 4
    assert stats.blocks_swapped_out == 6, (
        "B's group: 4 unique blocks before the extra tokens, 2 after"
    )
    assert 0 < stats.blocks_swapped_in < stats.blocks_swapped_out, (
        "some blocks are found in the cache"
    )
    assert any("append_slots returned [(" in line for line in lines)


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"minipaged {__version__}"


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for command in ["demo", "generate", "memory", "assignment", "experiment", "serve"]:
        # a line of the list
        assert re.search(rf"^    {command}\b", out, flags=re.MULTILINE), command


@pytest.mark.parametrize(
    "argv", [["no-such-command"], ["memory", "--block-size", "x"], ["demo", "--bogus"]]
)
def test_malformed_command_lines_exit_2_with_the_usage(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "usage: minipaged" in capsys.readouterr().err


def test_a_size_the_walkthrough_refuses_exits_2_with_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["memory", "--block-size", "1"])
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("minipaged memory: error: ") and "block_size" in line


def test_assignment_writes_the_student_version(tmp_path, capsys):
    dest = tmp_path / "student"
    assert main(["assignment", str(dest), "--source", str(REPO_ROOT)]) == 0
    out = capsys.readouterr().out
    assert "minipaged/reference/block_allocator.py" in out
    allocator = (dest / "minipaged" / "reference" / "block_allocator.py").read_text()
    assert (
        "raise NotImplementedError" in allocator
        and "self._free_list.pop()" not in allocator
    )


def test_assignment_refuses_an_existing_dest_or_a_bad_source(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["assignment", str(tmp_path), "--source", str(REPO_ROOT)])
    assert (
        exit_info.value.code == 2 and "dest must not exist" in capsys.readouterr().err
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["assignment", str(tmp_path / "new"), "--source", str(tmp_path)])
    assert (
        exit_info.value.code == 2
        and "--source must be a minipaged checkout" in capsys.readouterr().err
    )


# ---- minipaged demo: the engine on a mixed workload -------------------------------------------


@pytest.fixture(scope="module")
def demo_report():
    return run_demo()


def test_demo_shows_every_mechanism(demo_report):
    """The default pool is small enough for a swap; sharing, prefix hits and copy-on-write all happen."""
    m = demo_report.memory
    assert m["preemptions"]["swap"] >= 1 and m["preemptions"]["recompute"] == 0
    assert m["blocks_swapped_out"] > 0 and m["blocks_swapped_in"] > 0
    assert m["prefix_cache_hits"] > 0, "the questions share the system prompt's blocks"
    assert m["max_blocks_saved_by_sharing"] > 0 and m["cow_copies"] > 0
    assert m["peak_blocks_used"] <= m["num_gpu_blocks"]
    assert 0 < m["mean_kv_utilization"] <= 1
    assert any("preempted by swap" in event for event in demo_report.events)
    t = demo_report.throughput
    assert t["generated_tokens"] > 0 and t["wall_s"] > 0 and t["tokens_per_s"] > 0


def test_demo_outputs_have_the_shapes_asked_for(demo_report):
    config = demo_report.config
    kinds = [out.kind for out in demo_report.outputs]
    assert kinds == ["greedy"] * 4 + ["sampling n=3", "beam search, width 3"]
    for out in demo_report.outputs[:4]:
        assert len(out.token_ids) == 1 and len(out.token_ids[0]) == config.max_tokens
    samples = demo_report.outputs[4].token_ids
    assert len(samples) == 3 and all(len(ids) == config.max_tokens for ids in samples)
    assert len({tuple(ids) for ids in samples}) == 3, "three different samples"
    beams = demo_report.outputs[5].token_ids
    assert len(beams) == 3 and all(len(ids) == config.beam_max_tokens for ids in beams)


def test_demo_preemption_and_sharing_do_not_change_the_tokens(demo_report):
    """Swapping out and in, prefix hits and copy-on-write are invisible in the outputs: a pool big
    enough for everything at once gives the same tokens, greedy, sampled and beams alike."""
    roomy = run_demo(DemoConfig(num_gpu_blocks=200))
    assert roomy.memory["preemptions"] == {"recompute": 0, "swap": 0}
    assert [o.token_ids for o in roomy.outputs] == [
        o.token_ids for o in demo_report.outputs
    ]


def test_demo_restores_torch_threads():
    threads = torch.get_num_threads()
    run_demo(DemoConfig(max_tokens=2, beam_max_tokens=2, num_gpu_blocks=200))
    assert torch.get_num_threads() == threads


def test_demo_command_prints_outputs_and_the_memory_report(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    for text in [
        "[0] greedy: 'What is a page table?'",
        "[4] sampling n=3: ",
        "sample 2: text ",
        "[5] beam search, width 3: ",
        "beam 2: text ",
        "ids  ",
        "Memory events",
        "preempted by swap",
        "blocks swapped back in",
        "mean KV utilization",
        "blocks saved by sharing, at peak",
        "prefix-cache hits",
        "copy-on-write copies",
        "tokens/s",
    ]:
        assert text in out, text
    assert re.search(r"preemptions +[1-9]\d* by swap, 0 by recompute", out)
    assert max(len(line) for line in out.splitlines()) <= 80  # fits a terminal


def test_demo_with_a_roomy_pool_says_everything_fit(capsys):
    assert main(["demo", "--num-gpu-blocks", "200"]) == 0
    out = capsys.readouterr().out
    assert "none: everything fit" in out and "0 by swap, 0 by recompute" in out


def test_python_dash_m_runs_the_demo():
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]
        ),
    }
    result = subprocess.run(
        [sys.executable, "-m", "minipaged", "demo"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "Memory report" in result.stdout and "by swap" in result.stdout
    assert "Traceback" not in result.stderr


# ---- minipaged generate ----------------------------------------------------------------------


def _token_ids(out: str) -> list[list[int]]:
    return [
        ast.literal_eval(line.split("token_ids: ", 1)[1])
        for line in out.splitlines()
        if "token_ids: " in line
    ]


def test_generate_prints_text_and_token_ids_of_greedy_outputs(capsys):
    assert (
        main(
            [
                "generate",
                "Hello",
                "Paging is",
                "--max-tokens",
                "5",
                "--num-gpu-blocks",
                "64",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert (
        "prompt: 'Hello' (6 tokens)" in out and "prompt: 'Paging is' (10 tokens)" in out
    )
    assert out.count("    text: ") == 2 and "finish_reason length" in out
    llm = LLM("tiny-llama", num_gpu_blocks=64)
    expected = llm.generate(
        ["Hello", "Paging is"],
        SamplingParams(temperature=0, max_tokens=5),
        use_tqdm=False,
    )
    assert _token_ids(out) == [r.outputs[0].token_ids for r in expected]


def test_generate_with_sampling_options(capsys):
    argv = [
        "generate",
        "Hi",
        "--n",
        "2",
        "--temperature",
        "0.8",
        "--top-p",
        "0.9",
        "--top-k",
        "50",
    ]
    argv += [
        "--seed",
        "7",
        "--max-tokens",
        "4",
        "--block-size",
        "4",
        "--num-gpu-blocks",
        "8",
    ]
    argv += ["--preemption-mode", "swap", "--enable-prefix-caching", "--ignore-eos"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert "output 0:" in first and "output 1:" in first
    ids = _token_ids(first)
    assert len(ids) == 2 and all(len(i) == 4 for i in ids)
    assert main(argv) == 0
    assert capsys.readouterr().out == first, "a seeded request repeats"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate"], "the following arguments are required: PROMPT"),
        (
            ["generate", "x", "--max-tokens", "two"],
            "argument --max-tokens: invalid int value: 'two'",
        ),
        (
            ["generate", "x", "--preemption-mode", "later"],
            "argument --preemption-mode: invalid choice",
        ),
        (["generate", "x", "--backend", "cuda"], "argument --backend: invalid choice"),
        (["generate", "x", "--dtype", "float8"], "argument --dtype: invalid choice"),
    ],
)
def test_generate_refuses_a_malformed_command_line_with_the_usage(
    argv, message, capsys
):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert (
        f"usage: minipaged {argv[0]}" in err
        and message in err
        and "Traceback" not in err
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", "x", "--n", "0"], "n must be an int >= 1, got 0"),
        (
            ["generate", "x", "--temperature", "-1"],
            "temperature must be 0 (greedy) or a finite number",
        ),
        (["generate", "x", "--top-p", "0"], "top_p must be in (0, 1]"),
        (["generate", "x", "--model", "no-such-model"], "model must be a preset"),
        (["generate", "x", "--num-gpu-blocks", "1"], "this request can never fit"),
        (["generate", "x", "--block-size", "0"], "block_size must be a positive int"),
        (["demo", "--num-gpu-blocks", "2"], "this request can never fit"),
    ],
)
def test_generate_and_demo_refuse_bad_values_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"minipaged {argv[0]}: error: ") and message in line


def test_memory_html_writes_the_interactive_page_and_checks_its_path_first(
    tmp_path, capsys
):
    from minipaged.walkthrough_html import walkthrough_html

    out = tmp_path / "walk.html"
    assert (
        main(
            [
                "memory",
                "--block-size",
                "3",
                "--num-gpu-blocks",
                "14",
                "--html",
                str(out),
            ]
        )
        == 0
    )
    assert f"wrote the interactive walk-through to {out}" in capsys.readouterr().out
    sizes = {"block_size": 3, "num_gpu_blocks": 14, "num_cpu_blocks": 8}
    assert out.read_text() == walkthrough_html(**sizes)
    with pytest.raises(SystemExit) as exit_info:
        # a folder: refused before the tour runs
        main(["memory", "--html", str(tmp_path)])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert "Step 0" not in captured.out and "is a folder" in captured.err
