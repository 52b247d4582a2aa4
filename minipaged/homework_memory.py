"""Memory homework: block tables and reference counts after each operation, by hand.

OS idea: OSTEP's paging homework (`paging-linear-translate.py`, `paging-policy.py`) asks for the
page table and the frames after each step of a random trace; here the trace is admit, append,
fork, free, swap out and swap in on a small paged KV cache (vLLM paper section 4.2-4.5), and the
answers are the block tables, the reference counts, and the copy-on-write and swap mappings.

Each operation is drawn among those the real BlockManager allows now (can_allocate,
can_append_slots, can_swap_out, can_swap_in), then carried out on it; the answers are read back
from it (get_block_table, host_tables, the allocators' ref counts) and from what it returned.
"""

from __future__ import annotations

import random

from minipaged.homework import Problem, Question
from minipaged.reference.block_manager import AllocStatus, BlockManager, BlockMapping
from minipaged.sequence import Sequence, SequenceGroup, SequenceStatus

CONFIG = {"block_size": 4, "num_gpu_blocks": 8, "num_cpu_blocks": 6, "watermark": 0.0}
# How often each kind of operation is drawn; a kind not drawn yet counts three times.
WEIGHTS = {"admit": 3, "append": 5, "fork": 3, "free": 1, "swap_out": 1, "swap_in": 2}
MAX_SEQS_PER_REQUEST = 3
HEADER = (
    "A paged KV cache: blocks of 4 tokens, a device pool of 8 blocks (0-7), a host",
    "(swap) pool of 6 blocks (0-5), no watermark. A request (A, B, ...) starts as one",
    "sequence (A0); fork adds a sequence to its request (A1, A2).",
    "",
    "- A sequence of n tokens holds ceil(n / 4) blocks: a new block only when the last",
    "  one is full.",
    "- A pool hands out its lowest free block first at the start; a freed block is the",
    "  next one handed out (a stack). A table is freed last block first, so its blocks",
    "  come back in table order.",
    "- fork shares every block of the parent: their ref counts go up by one.",
    "- Appending to a sequence whose partly filled last block is shared copies that",
    "  block first (copy-on-write): a new block is allocated, then the shared one's",
    "  ref count goes down.",
    "- swap out / swap in moves every live sequence of a request to the other pool,",
    "  sequence by sequence in table order; a block shared inside the request moves once.",
    "",
    "After each operation, write each live sequence's table (pool, block ids, tokens),",
    "the ref count of every used block (as block:count), and any mapping the operation",
    "returns: copy-on-write (src, dst) pairs or swap (from, to) pairs.",
)


class _Cache:
    """The real BlockManager and the requests and sequences of the problem, by name."""

    def __init__(self) -> None:
        self.manager = BlockManager(**CONFIG)
        self.groups: dict[str, SequenceGroup] = {}
        # the live sequences, in the order they were made
        self.seqs: dict[str, Sequence] = {}

    def legal_ops(self, rng: random.Random, num_requests: int) -> list[tuple]:
        """The operations the manager allows now (their sizes drawn from `rng`)."""
        manager, ops = self.manager, []
        if len(self.groups) < num_requests:
            name = "ABCD"[len(self.groups)]
            ops.append(("admit", name, rng.randint(1, 10)))
        for name, seq in self.seqs.items():
            group = self.groups[name[0]]
            if seq.seq_id in manager.device_tables:
                ops.append(("append", name, rng.randint(1, 5)))
                if len(group.seqs) < MAX_SEQS_PER_REQUEST:
                    ops.append(("fork", name, f"{name[0]}{len(group.seqs)}"))
            if len(self.seqs) > 1:  # keep one: something is always left to do
                ops.append(("free", name))
        for name in self.groups:
            live = [self.seqs[n] for n in self.seqs if n[0] == name]
            if any(seq.seq_id in manager.device_tables for seq in live):
                ops.append(("swap_out", name))
            elif live:
                ops.append(("swap_in", name))
        return [op for op in ops if self._is_legal(op)]

    def _is_legal(self, op: tuple) -> bool:
        kind, name = op[0], op[1]
        if kind == "admit":
            group = SequenceGroup(name, [Sequence(_prompt(name, op[2]))])
            return self.manager.can_allocate(group) == AllocStatus.OK
        if kind == "append":  # add the tokens, ask, take them back
            seq, group = self.seqs[name], self.groups[name[0]]
            seq.output_token_ids += [1] * op[2]
            legal = self.manager.can_append_slots(group)
            del seq.output_token_ids[-op[2] :]
            return legal
        if kind == "swap_out":
            return self.manager.can_swap_out(self.groups[name])
        if kind == "swap_in":
            return self.manager.can_swap_in(self.groups[name])
        return True  # fork and free can always run

    def apply(self, op: tuple) -> BlockMapping:
        """Carry out `op` on the manager; return the mapping it returned ([] if none)."""
        kind, name, manager = op[0], op[1], self.manager
        if kind == "admit":
            seq = Sequence(_prompt(name, op[2]), status=SequenceStatus.RUNNING)
            self.groups[name] = SequenceGroup(name, [seq])
            self.seqs[f"{name}0"] = seq
            manager.allocate(self.groups[name])
        elif kind == "append":
            for _ in range(op[2]):
                self.seqs[name].append_token_id(1)
            return manager.append_slots(self.seqs[name])
        elif kind == "fork":
            parent = self.seqs[name]
            self.seqs[op[2]] = child = parent.fork()
            manager.fork(parent, child)
            self.groups[name[0]].add(child)
        elif kind == "free":
            seq = self.seqs.pop(name)
            manager.free(seq)
            seq.status = SequenceStatus.FINISHED_STOPPED
        elif kind == "swap_out":
            return manager.swap_out(self.groups[name])
        else:
            return manager.swap_in(self.groups[name])
        return []

    def state(self) -> dict:
        """Every live sequence's table and every used block's ref count, read from the manager."""
        manager, tables = self.manager, {}
        for name, seq in self.seqs.items():
            if seq.seq_id in manager.device_tables:
                table, pool = manager.get_block_table(seq), "device"
            else:
                table, pool = manager.host_tables[seq.seq_id], "host"
            tables[name] = (pool, list(table.block_ids), table.num_tokens)
        return {
            "tables": tables,
            "device_ref_counts": _ref_counts(manager.device),
            "host_ref_counts": _ref_counts(manager.host),
        }


def _prompt(name: str, num_tokens: int) -> list[int]:
    """Distinct token ids for each request's prompt (their values do not matter here)."""
    first = 100 * (1 + "ABCD".index(name))
    return list(range(first, first + num_tokens))


def _ref_counts(pool) -> dict[int, int]:
    counts = (pool.ref_count(block) for block in range(pool.num_blocks))
    return {block: count for block, count in enumerate(counts) if count}


def _pick(rng: random.Random, ops: list[tuple], used: set[str]) -> tuple:
    """A kind of operation by WEIGHTS (favouring kinds not drawn yet), then one of that kind."""
    kinds = [kind for kind in WEIGHTS if any(op[0] == kind for op in ops)]
    weights = [WEIGHTS[kind] * (1 if kind in used else 3) for kind in kinds]
    kind = rng.choices(kinds, weights)[0]
    return rng.choice([op for op in ops if op[0] == kind])


def describe(op: tuple) -> str:
    """An operation in words, e.g. "fork A0 -> A1"."""
    kind, name = op[0], op[1]
    if kind == "admit":
        return f"admit request {name}: sequence {name}0 with a prompt of {op[2]} tokens"
    if kind == "append":
        return f"append {op[2]} token{'s' * (op[2] > 1)} to {name}"
    if kind == "fork":
        return f"fork {name} -> {op[2]}"
    if kind == "free":
        return f"free {name}"
    return f"{kind.replace('_', ' ')} request {name}"


def _question(number: int, op: tuple, state: dict, mapping: BlockMapping) -> Question:
    asks, answers = [], []
    for name, (pool, block_ids, num_tokens) in state["tables"].items():
        asks.append(f"{name} table")
        answers.append(f"{pool} {block_ids} ({num_tokens} tokens)")
    for pool in ("device", "host"):
        counts = state[f"{pool}_ref_counts"]
        asks.append(f"{pool} ref counts")
        answers.append(" ".join(f"{b}:{c}" for b, c in counts.items()) or "none used")
    data = dict(state, copy_on_write=[], swap=[])
    if op[0] in ("append", "swap_out", "swap_in"):
        key = "copy_on_write" if op[0] == "append" else "swap"
        data[key] = list(mapping)
        asks.append(
            {"append": "copy-on-write (src, dst)"}.get(op[0], "swap (from, to)")
        )
        answers.append(", ".join(str(pair) for pair in mapping) or "none")
    text = f"{number}. {describe(op)}"
    return Question(text, tuple(asks), tuple(answers), data)


def generate(seed: int) -> Problem:
    """Draw 8 to 10 legal operations on a fresh cache and answer each from the manager."""
    rng = random.Random(seed)
    num_requests, num_ops = rng.randint(2, 4), rng.randint(8, 10)
    cache, ops, questions, used = _Cache(), [], [], set()
    for number in range(1, num_ops + 1):
        legal = cache.legal_ops(rng, num_requests)
        if not legal:  # rare: one sequence left, too long to grow, fork or swap
            break
        op = _pick(rng, legal, used)
        used.add(op[0])
        mapping = cache.apply(op)
        ops.append(op)
        questions.append(_question(number, op, cache.state(), mapping))
    return Problem("memory", seed, dict(CONFIG), tuple(ops), HEADER, tuple(questions))
