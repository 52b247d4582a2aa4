"""The homework generators: answers that the real managers give, text that is reproducible.

Each problem is replayed here, from its operation list (memory) or its requests (scheduler), on a
fresh BlockManager or Scheduler driven the way the engine drives it; the answers the problem
carries must be what the replay reads back, operation by operation, step by step. The seeds are
fresh each run (they are in every message, to reproduce a failure).
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

from minipaged.cli import main
from minipaged.config import SchedulerConfig
from minipaged.homework import (
    BLANK,
    make_problem,
    memory_problem,
    render,
    scheduler_problem,
)
from minipaged.reference.block_manager import AllocStatus, BlockManager
from minipaged.reference.scheduler import Scheduler
from minipaged.sequence import Sequence, SequenceGroup, SequenceStatus

SEEDS = random.Random().sample(range(1_000_000), 50)


# ---- independent replays -----------------------------------------------------------------


def replay_memory(problem) -> list[dict]:
    """Carry out the problem's operations on a fresh BlockManager; after each, what it holds.

    Before each operation the manager's own check must allow it (the generator drew only legal ones).
    """
    manager = BlockManager(**problem.config)
    groups, seqs, states = {}, {}, []
    for op in problem.operations:
        kind, name = op[0], op[1]
        cow, swap = [], []
        if kind == "admit":
            group = SequenceGroup(name, [Sequence([7] * op[2])])
            assert manager.can_allocate(group) == AllocStatus.OK, op
            manager.allocate(group)
            groups[name], seqs[f"{name}0"] = group, group.seqs[0]
        elif kind == "append":
            for _ in range(op[2]):
                seqs[name].append_token_id(3)
            assert manager.can_append_slots(groups[name[0]]), op
            cow = manager.append_slots(seqs[name])
        elif kind == "fork":
            child = seqs[name].fork()
            manager.fork(seqs[name], child)
            groups[name[0]].add(child)
            seqs[op[2]] = child
        elif kind == "free":
            seq = seqs.pop(name)
            manager.free(seq)
            seq.status = SequenceStatus.FINISHED_STOPPED
        elif kind == "swap_out":
            assert manager.can_swap_out(groups[name]), op
            swap = manager.swap_out(groups[name])
        else:
            assert kind == "swap_in", op
            assert manager.can_swap_in(groups[name]), op
            swap = manager.swap_in(groups[name])
        tables = {}
        for seq_name, seq in seqs.items():
            location = manager.seq_memory(seq).location
            table = (
                manager.device_tables if location == "device" else manager.host_tables
            )[seq.seq_id]
            tables[seq_name] = (location, list(table.block_ids), len(seq))
        states.append(
            {
                "tables": tables,
                "device_ref_counts": ref_counts(manager.device),
                "host_ref_counts": ref_counts(manager.host),
                "copy_on_write": cow,
                "swap": swap,
            }
        )
    return states


def ref_counts(pool) -> dict[int, int]:
    used = [b for b in range(pool.num_blocks) if b not in pool.free_list]
    assert len(used) == pool.num_used
    return {b: pool.ref_count(b) for b in used}


def replay_scheduler(problem) -> list[dict]:
    """Drive a fresh Scheduler over the problem's requests as the engine does; each step's decisions."""
    config = problem.config
    manager = BlockManager(
        config["block_size"], config["num_gpu_blocks"], config["num_cpu_blocks"], 0.0
    )
    scheduler = Scheduler(
        SchedulerConfig(preemption_mode=config["preemption_mode"]), manager
    )
    requests = list(problem.operations)
    max_tokens = {r[1]: r[4] for r in requests}
    steps = []
    for step in range(len(problem.questions)):
        for i, (_, name, prompt_len, arrival, _) in enumerate(requests):
            if arrival == step:
                prompt = [5] * prompt_len
                scheduler.add(SequenceGroup(name, [Sequence(prompt)], float(i)))
        swapped = {g.request_id for g in scheduler.swapped}
        out = scheduler.schedule()
        finished = []
        for item in out.scheduled:
            item.seq.num_computed_tokens = len(item.seq)
            item.seq.append_token_id(9)
            if len(item.seq.output_token_ids) == max_tokens[item.group.request_id]:
                item.seq.status = SequenceStatus.FINISHED_LENGTH_CAPPED
                manager.free(item.seq)
                scheduler.finish(item.group)
                finished.append(item.group.request_id)
        names = [item.group.request_id for item in out.scheduled]
        steps.append(
            {
                "prefill": [
                    (item.group.request_id, item.num_query_tokens)
                    for item in out.scheduled
                    if item.is_prefill
                ],
                "decode": [
                    item.group.request_id
                    for item in out.scheduled
                    if not item.is_prefill
                ],
                "preempted": list(out.preempted),
                "swapped_in": [name for name in names if name in swapped],
                "finished": finished,
            }
        )
    assert not scheduler.has_unfinished(), (
        "the problem must end with every request done"
    )
    return steps


# ---- the answers are the managers' -------------------------------------------------------


def test_memory_answers_match_a_replay():
    kinds, cow = set(), False
    for seed in SEEDS:
        problem = memory_problem(seed)
        states = replay_memory(problem)
        assert len(states) == len(problem.questions) >= 8, seed
        for question, state in zip(problem.questions, states, strict=True):
            assert question.data == state, (seed, question.text)
            # the printed answers are the data's
            assert all(
                f"{location} {ids} ({n} tokens)" in question.answers
                for location, ids, n in state["tables"].values()
            ), (seed, question.text)
        kinds |= {op[0] for op in problem.operations}
        cow |= any(q.data["copy_on_write"] for q in problem.questions)
    assert kinds == {"admit", "append", "fork", "free", "swap_out", "swap_in"}
    assert cow, "some problem must copy on write"


def test_scheduler_answers_match_a_replay():
    modes, swapped_in = set(), False
    for seed in SEEDS:
        problem = scheduler_problem(seed)
        assert len(problem.questions) <= 12, seed
        steps = replay_scheduler(problem)
        for question, step in zip(problem.questions, steps, strict=True):
            assert question.data == step, (seed, question.text)
        finished = [name for step in steps for name in step["finished"]]
        assert sorted(finished) == sorted(r[1] for r in problem.operations), seed
        modes.add(problem.config["preemption_mode"])
        swapped_in |= any(step["swapped_in"] for step in steps)
    assert modes == {"swap", "recompute"} and swapped_in


# ---- the text ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["memory", "scheduler"])
def test_same_seed_same_text_different_seeds_different_problems(kind):
    texts = [render(make_problem(kind, seed), solve=True) for seed in SEEDS[:20]]
    again = [render(make_problem(kind, seed), solve=True) for seed in SEEDS[:20]]
    assert texts == again
    problems = {
        (repr(p.config), p.operations)
        for p in (make_problem(kind, seed) for seed in SEEDS[:20])
    }
    assert len(problems) == 20, SEEDS[:20]


@pytest.mark.parametrize("kind", ["memory", "scheduler"])
def test_without_solve_every_answer_is_a_blank(kind):
    for seed in SEEDS[:10]:
        problem = make_problem(kind, seed)
        text, solved = render(problem, solve=False), render(problem, solve=True)
        body = text.splitlines()[2 + len(problem.header) :]
        texts = {q.text for q in problem.questions}
        for line in body:
            assert (
                not line
                or line in texts
                or re.fullmatch(rf"   [\w ,()-]+: +{BLANK}", line)
            ), (seed, line)
        num_asks = sum(len(q.asks) for q in problem.questions)
        assert text.count(BLANK) == num_asks and BLANK not in solved
        for question in problem.questions:
            for answer in question.answers:
                assert answer in solved, (seed, answer)


# ---- the command line --------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["memory", "scheduler"])
def test_cli_prints_the_problem(kind, capsys):
    seed = SEEDS[0]
    assert main(["homework", kind, "--seed", str(seed)]) == 0
    assert capsys.readouterr().out == render(make_problem(kind, seed), solve=False)
    assert main(["homework", kind, "--seed", str(seed), "--solve"]) == 0
    assert capsys.readouterr().out == render(make_problem(kind, seed), solve=True)
    assert main(["homework", kind]) == 0
    assert capsys.readouterr().out == render(make_problem(kind, 0), solve=False)


def test_cli_refuses_a_negative_seed_and_an_unknown_kind(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["homework", "memory", "--seed", str(-random.randint(1, 99))])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--seed" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as exit_info:
        main(["homework", "disk"])
    assert exit_info.value.code == 2 and "kind" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("kind", "seed", "named"),
    [
        ("memory", -1, "seed"),
        ("scheduler", True, "seed"),
        ("memory", "3", "seed"),
        ("tlb", 0, "kind"),
    ],
)
def test_bad_arguments_raise_naming_them(kind, seed, named):
    with pytest.raises(ValueError, match=named):
        make_problem(kind, seed)


# ---- the docs page shows real output -----------------------------------------------------


def test_the_docs_examples_are_what_the_commands_print(capsys):
    """Each ```text block of docs/homework.md that starts with `$ minipaged homework ...` shows
    that command's output: every piece between `[...]` lines appears in it, in order."""
    page = (Path(__file__).resolve().parents[1] / "docs" / "homework.md").read_text()
    blocks = re.findall(r"```text\n\$ minipaged (homework .*?)\n(.*?)```", page, re.S)
    assert len(blocks) >= 3
    for command, shown in blocks:
        assert main(command.split()) == 0
        out, start = capsys.readouterr().out, 0
        for piece in shown.split("[...]\n"):
            found = out.find(piece, start)
            assert found >= 0, (command, piece)
            start = found + len(piece)
