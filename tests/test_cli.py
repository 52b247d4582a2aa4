"""The `minipaged` command line: the walk-through runs, shows what it claims, and bad input fails."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from minipaged import __version__
from minipaged.cli import main
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
    "4 of B's 6 blocks found in the prefix cache",  # swap-in finds cached blocks (a swap cache)
    "A    13 tokens, device: 0->0*[####] 1->1*[####] 2->2[####] 3->4[#...]",  # a block-table line
    "B    13 tokens, host:   0->0*[####] 1->1*[####] 2->2[####] 3->3[#...]",
    "[A,B,B',C x4]",  # a block shared four ways in the pool picture
    "device pool: 16 blocks of 4 slots, 0 used, 16 free (6 cached-free)",
    "prefix cache: 4 hits, 3 misses; copied on write: 1 block; swapped: 6 out, 2 in",
]


@pytest.mark.parametrize("command", ["demo", "memory"])
def test_walkthrough_commands(command, capsys):
    assert main([command]) == 0
    out = capsys.readouterr().out
    for line in KEY_LINES:
        assert line in out, line
    assert max(len(line) for line in out.splitlines()) <= 80  # fits a terminal


def test_walkthrough_sizes_are_options(capsys):
    assert main(["memory", "--block-size", "8", "--num-gpu-blocks", "12", "--num-cpu-blocks", "6"]) == 0
    out = capsys.readouterr().out
    assert "device pool: 12 blocks of 8 slots" in out
    assert "[########]" in out


@pytest.mark.parametrize("block_size", [2, 3, 16])
def test_walkthrough_holds_for_other_block_sizes(block_size):
    lines: list[str] = []
    stats = run(out=lines.append, block_size=block_size)
    assert stats.device.num_used == 0 and stats.host.num_used == 0
    assert stats.cow_copies == 1 and stats.prefix_cache_hits == 4
    assert stats.blocks_swapped_out == 6, "B's group: 4 unique blocks before the extra tokens, 2 after"
    assert 0 < stats.blocks_swapped_in < stats.blocks_swapped_out, "some blocks are found in the cache"
    assert any("append_slots returned [(" in line for line in lines)


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"minipaged {__version__}"


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "demo" in out and "memory" in out


@pytest.mark.parametrize("argv", [["no-such-command"], ["memory", "--block-size", "1"], ["demo", "--bogus"]])
def test_bad_arguments_exit_nonzero(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code != 0
    assert "usage: minipaged" in capsys.readouterr().err


def test_python_dash_m_runs_the_demo():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
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
    assert "copy-on-write" in result.stdout
    assert "allocate(C): 2 hits" in result.stdout


def test_assignment_writes_the_student_version(tmp_path, capsys):
    dest = tmp_path / "student"
    assert main(["assignment", str(dest), "--source", str(REPO_ROOT)]) == 0
    out = capsys.readouterr().out
    assert "minipaged/reference/block_allocator.py" in out
    allocator = (dest / "minipaged" / "reference" / "block_allocator.py").read_text()
    assert "raise NotImplementedError" in allocator and "self._free_list.pop()" not in allocator


def test_assignment_refuses_an_existing_dest_or_a_bad_source(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["assignment", str(tmp_path), "--source", str(REPO_ROOT)])
    assert exit_info.value.code == 2 and "dest must not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["assignment", str(tmp_path / "new"), "--source", str(tmp_path)])
    assert exit_info.value.code == 2 and "--source must be a minipaged checkout" in capsys.readouterr().err
