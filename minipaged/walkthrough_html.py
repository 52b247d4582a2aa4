"""The memory walk-through as one self-contained web page you can step through (`memory --html`).

The idea: an OS course shows paging with a simulator you can step, one memory reference at a time,
watching frames fill and page tables change (OSTEP's homework simulators, ch. 18-22). This module
records the states of the real BlockManager during `minipaged memory`'s tour (walkthrough.py: the
prefix cache, demand paging, fork, copy-on-write, swapping, freeing; vLLM paper section 4) and
writes them into one HTML page, with no network and no other file: Next / Back (or the arrow keys)
draw each step's pool and block tables beside the text the CLI prints.

The page also has a playground: type an operation list such as
`allocate A 6; append A 3; fork A B; append B 1; free A` and it is replayed by a small JavaScript
mirror of allocate / append / fork / free (reference counts, copy-on-write, a LIFO free list, no
prefix caching). `replay_ops` runs the same list on the real BlockManager; the tests hold the mirror
to it, state by state, in a headless browser. A seed makes a random operation list (`random_ops`,
the same generator in Python and JavaScript).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

from minipaged import walkthrough
from minipaged.reference.block_allocator import NoFreeBlocksError
from minipaged.reference.block_manager import BlockManager
from minipaged.sequence import Sequence, SequenceGroup

# verb -> (min, max) args
VERBS = {"allocate": (2, 2), "append": (1, 2), "fork": (2, 2), "free": (1, 1)}
_MASK = 0xFFFFFFFF
# its random operations fork twice and copy on write twice, with no failure
DEFAULT_SEED = 54


# ---- recording states -----------------------------------------------------------------------


def snapshot(manager: BlockManager, names: Mapping[int, str]) -> dict:
    """The manager's state as plain data: each pool's blocks (ref count, holders) and every table.

    Args:
        manager: the block manager.
        names: seq_id -> the label the pictures use ("A", "B'").

    Returns:
        {"pools": [...], "tables": [...]}; a pool of 0 blocks (no swap space) is left out.
    """
    pools = []
    for pool, tables in (
        ("device", manager.device_tables),
        ("host", manager.host_tables),
    ):
        allocator = manager.device if pool == "device" else manager.host
        if allocator.num_blocks == 0:
            continue
        holders: dict[int, list[str]] = {}
        for seq_id in sorted(tables):
            for block in tables[seq_id].block_ids:
                holders.setdefault(block, []).append(_label(seq_id, names))
        is_cached_free = getattr(allocator, "is_cached_free", lambda block: False)
        blocks = [
            {
                "id": b,
                "ref": allocator.ref_count(b),
                "holders": holders.get(b, []),
                "cached": is_cached_free(b),
            }
            for b in range(allocator.num_blocks)
        ]
        used = sum(block["ref"] > 0 for block in blocks)
        pools.append(
            {
                "name": pool,
                "num_blocks": allocator.num_blocks,
                "num_used": used,
                "blocks": blocks,
            }
        )
    tables = [
        {
            "name": _label(seq_id, names),
            "pool": pool,
            "num_tokens": table.num_tokens,
            "block_ids": table.block_ids[:],
        }
        for pool, all_tables in (
            ("device", manager.device_tables),
            ("host", manager.host_tables),
        )
        for seq_id, table in all_tables.items()
    ]
    return {"pools": pools, "tables": sorted(tables, key=lambda t: t["name"])}


def _label(seq_id: int, names: Mapping[int, str]) -> str:
    return names.get(seq_id, f"s{seq_id}")


def tour_states(
    block_size: int = 4, num_gpu_blocks: int = 16, num_cpu_blocks: int = 8
) -> list[dict]:
    """Run `minipaged memory`'s tour and record each step: title, caption, CLI text, state.

    The tour itself (walkthrough.run) makes every move; its on_step and on_show hooks record each
    step and take a snapshot each time the tour draws the pools, so there is no second copy of the
    tour to drift.

    Returns:
        One dict per step: {"title", "caption", "text", "block_size", "pools", "tables"}.

    Raises:
        TypeError: if a size is not an int.
        ValueError: if a size is too small for the tour (walkthrough.check_sizes).
    """
    for name, value in (
        ("block_size", block_size),
        ("num_gpu_blocks", num_gpu_blocks),
        ("num_cpu_blocks", num_cpu_blocks),
    ):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    walkthrough.check_sizes(block_size, num_gpu_blocks, num_cpu_blocks)
    steps: list[dict] = []
    lines: list[str] = []

    def on_step(title: str, explanation: tuple[str, ...]) -> None:
        steps.append(
            {"title": title, "caption": list(explanation), "block_size": block_size}
        )

    def on_show(manager, names) -> None:
        steps[-1].update(snapshot(manager, names))

    walkthrough.run(
        lines.append,
        block_size,
        num_gpu_blocks,
        num_cpu_blocks,
        on_step=on_step,
        on_show=on_show,
    )
    texts: list[list[str]] = []
    for line in lines:
        if line.startswith("\nStep "):
            texts.append([])
        texts[-1].append(line)
    if len(texts) != len(steps) or any("pools" not in step for step in steps):
        raise AssertionError(
            "every step of the tour must print one heading and draw the pools once"
        )
    for step, text in zip(steps, texts, strict=True):
        step["text"] = "\n".join(text).strip("\n")
    return steps


# ---- the playground: operation lists on a real BlockManager ----------------------------------


def parse_ops(text: str) -> list[tuple[str, ...]]:
    """Split an operation list like "allocate A 6; append A 3; fork A B; free A" into tuples.

    Operations are separated by ";" or new lines. `allocate NAME N` admits a request of N prompt
    tokens; `append NAME [K]` decodes K tokens (default 1) one at a time; `fork PARENT CHILD` shares
    PARENT's blocks with a new sequence; `free NAME` releases a sequence's blocks.

    Raises:
        TypeError: if `text` is not a str.
        ValueError: naming the operation, for an unknown verb, a wrong argument count, or a count
            that is not a positive int.
    """
    if not isinstance(text, str):
        raise TypeError(f"ops must be a str, got {type(text).__name__}")
    ops = []
    for raw in text.replace("\n", ";").split(";"):
        words = raw.split()
        if not words:
            continue
        verb, args = words[0].lower(), words[1:]
        if verb not in VERBS:
            raise ValueError(
                f"ops: unknown operation {raw.strip()!r}; expected one of {', '.join(VERBS)}"
            )
        low, high = VERBS[verb]
        if not low <= len(args) <= high:
            raise ValueError(
                f"ops: {raw.strip()!r} takes {low if low == high else f'{low} or {high}'} arguments"
            )
        if verb in ("allocate", "append") and len(args) == 2 and not _is_count(args[1]):
            raise ValueError(
                f"ops: {raw.strip()!r}: the token count must be a positive int"
            )
        ops.append((verb, *args))
    return ops


def _is_count(word: str) -> bool:
    # ASCII digits, as the page's JS
    return re.fullmatch("[0-9]+", word) is not None and int(word) > 0


def format_ops(ops: list[tuple[str, ...]]) -> str:
    """The inverse of `parse_ops`: "allocate A 6; append A 3"."""
    return "; ".join(" ".join(op) for op in ops)


def replay_ops(ops: str, *, block_size: int = 4, num_gpu_blocks: int = 16) -> dict:
    """Replay an operation list on a real BlockManager and record the state after each operation.

    Prefix caching is off and the watermark is 0, as in the page's JavaScript mirror. Running out of
    blocks is an outcome, not a bug: the replay stops there and says so in "error".

    Args:
        ops: the operation list (see `parse_ops`).
        block_size: tokens per block.
        num_gpu_blocks: blocks in the device pool.

    Returns:
        {"ops": normalized list, "states": [...], "error": None or a message}; states[0] is the
        empty pool, then one state per operation that succeeded.

    Raises:
        ValueError: for a malformed list (parse_ops), a name used twice or a name never allocated.
    """
    manager = BlockManager(block_size, num_gpu_blocks, 0, watermark=0.0)
    seqs: dict[str, Sequence] = {}
    names: dict[int, str] = {}
    parsed = parse_ops(ops)
    states = [
        _op_state(
            manager,
            names,
            "Start: an empty pool",
            [f"{num_gpu_blocks} blocks of {block_size} slots"],
        )
    ]
    for number, op in enumerate(parsed, 1):
        _check_names(op, seqs)
        try:
            caption = _apply(manager, op, seqs, names)
        except NoFreeBlocksError:
            return {
                "ops": format_ops(parsed),
                "states": states,
                "error": _oom_message(number, op),
            }
        states.append(_op_state(manager, names, f"{number}. {' '.join(op)}", caption))
    return {"ops": format_ops(parsed), "states": states, "error": None}


def _check_names(op: tuple[str, ...], seqs: Mapping[str, Sequence]) -> None:
    verb, name = op[0], op[1]
    if verb == "allocate" and name in seqs:
        raise ValueError(f"ops: {' '.join(op)!r}: sequence {name!r} already exists")
    if verb != "allocate" and name not in seqs:
        raise ValueError(f"ops: {' '.join(op)!r}: no sequence {name!r} holds blocks")
    if verb == "fork" and op[2] in seqs:
        raise ValueError(f"ops: {' '.join(op)!r}: sequence {op[2]!r} already exists")


def _apply(
    manager: BlockManager, op: tuple[str, ...], seqs: dict, names: dict
) -> list[str]:
    """Do one operation; return the caption lines that say what the manager did."""
    verb, name = op[0], op[1]
    if verb == "allocate":
        seq = Sequence(list(range(1, int(op[2]) + 1)))
        manager.allocate(SequenceGroup(name, [seq]))
        seqs[name], names[seq.seq_id] = seq, name
        return [f"{name} gets blocks {_blocks(manager, seq)}"]
    if verb == "fork":
        child = seqs[name].fork()
        manager.fork(seqs[name], child)
        seqs[op[2]], names[child.seq_id] = child, op[2]
        return [
            f"{op[2]} shares {name}'s blocks {_blocks(manager, child)}: no block allocated"
        ]
    if verb == "free":
        manager.free(seqs.pop(name))
        return [f"{name}'s blocks lose one reference each; a block at 0 is free"]
    seq, caption = seqs[name], []
    for _ in range(int(op[2]) if len(op) > 2 else 1):
        before = len(manager.get_block_table(seq))
        seq.append_token_id(7)
        for src, dst in manager.append_slots(seq):
            caption.append(
                f"copy-on-write: block {src} is shared, {name} copies it to {dst}"
            )
        if len(manager.get_block_table(seq)) > before:
            caption.append(
                f"the last block was full: new block {manager.get_block_table(seq).block_ids[-1]}"
            )
    return caption or [
        f"written into block {manager.get_block_table(seq).block_ids[-1]}, no new block"
    ]


def _blocks(manager: BlockManager, seq: Sequence) -> list[int]:
    return manager.get_block_table(seq).block_ids[:]


def _oom_message(number: int, op: tuple[str, ...]) -> str:
    return f"operation {number} ({' '.join(op)}): not enough free blocks; the replay stops here"


def _op_state(
    manager: BlockManager, names: Mapping[int, str], title: str, caption: list[str]
) -> dict:
    return {
        "title": title,
        "caption": caption,
        "block_size": manager.block_size,
        **snapshot(manager, names),
    }


def random_ops(seed: int, num_ops: int = 10, block_size: int = 4) -> str:
    """A random, valid operation list; the page's JavaScript `randomOps` makes the same one.

    Both use the mulberry32 generator, so a seed typed in the page and `seed=` here agree.

    Raises:
        ValueError: if seed is not an int in [0, 2**32) or num_ops / block_size is not positive.
    """
    for name, value, low, high in (
        ("seed", seed, 0, _MASK),
        ("num_ops", num_ops, 1, 1000),
        ("block_size", block_size, 1, 1 << 20),
    ):
        if (
            not isinstance(value, int)
            or isinstance(value, bool)
            or not low <= value <= high
        ):
            raise ValueError(f"{name} must be an int in [{low}, {high}], got {value!r}")
    rand, live, ops, next_name = _mulberry32(seed), [], [], 0
    for _ in range(num_ops):
        roll = rand()
        if not live or (roll < 0.3 and len(live) < 4):
            name, next_name = (
                chr(65 + next_name % 26) * (1 + next_name // 26),
                next_name + 1,
            )
            ops.append(f"allocate {name} {_randint(rand, 1, 3 * block_size)}")
            live.append(name)
            continue
        target = live[_randint(rand, 0, len(live) - 1)]
        if roll < 0.65:
            ops.append(f"append {target} {_randint(rand, 1, block_size + 1)}")
        elif roll < 0.85 and len(live) < 5:
            name, next_name = (
                chr(65 + next_name % 26) * (1 + next_name // 26),
                next_name + 1,
            )
            ops.append(f"fork {target} {name}")
            live.append(name)
        else:
            ops.append(f"free {target}")
            live.remove(target)
    return "; ".join(ops)


def _mulberry32(seed: int):
    """The mulberry32 generator, bit for bit as in JavaScript (unsigned 32-bit arithmetic)."""
    state = [seed & _MASK]

    def rand() -> float:
        state[0] = (state[0] + 0x6D2B79F5) & _MASK
        t = state[0]
        t = ((t ^ (t >> 15)) * (t | 1)) & _MASK
        t ^= (t + (((t ^ (t >> 7)) * (t | 61)) & _MASK)) & _MASK
        return ((t ^ (t >> 14)) & _MASK) / 2**32

    return rand


def _randint(rand, low: int, high: int) -> int:
    return low + int(rand() * (high - low + 1))


# ---- the page --------------------------------------------------------------------------------


def walkthrough_html(
    *,
    seed: int = DEFAULT_SEED,
    block_size: int = 4,
    num_gpu_blocks: int = 16,
    num_cpu_blocks: int = 8,
) -> str:
    """The step-through page as one HTML string: inline CSS, JS and the recorded states as JSON.

    Args:
        seed: picks the playground's first operation list (`random_ops(seed)`); an int in [0, 2**32).
        block_size: tokens per block (at least 2).
        num_gpu_blocks: blocks in the device pool (at least 12: the tour's peak).
        num_cpu_blocks: blocks in the host pool (at least 6).

    Raises:
        TypeError: if a size is not an int.
        ValueError: if a size is too small for the tour or the seed is not an int in [0, 2**32).
    """
    # validates the sizes first
    tour = tour_states(block_size, num_gpu_blocks, num_cpu_blocks)
    ops = random_ops(seed, block_size=block_size)
    data = {
        "config": {
            "seed": seed,
            "block_size": block_size,
            "num_gpu_blocks": num_gpu_blocks,
            "num_cpu_blocks": num_cpu_blocks,
        },
        "tour": tour,
        "playground": replay_ops(
            ops, block_size=block_size, num_gpu_blocks=num_gpu_blocks
        ),
    }
    # never ends the script
    payload = json.dumps(data, separators=(",", ":")).replace("<", "\\u003c")
    return _TEMPLATE.replace("__DATA__", payload)


def write_walkthrough_html(
    path: str | Path,
    *,
    seed: int = DEFAULT_SEED,
    block_size: int = 4,
    num_gpu_blocks: int = 16,
    num_cpu_blocks: int = 8,
) -> Path:
    """Write `walkthrough_html(...)` to `path` (UTF-8) and return the path; arguments as there.

    Raises:
        TypeError, ValueError: as `walkthrough_html`.
        OSError: if the file cannot be written.
    """
    html = walkthrough_html(
        seed=seed,
        block_size=block_size,
        num_gpu_blocks=num_gpu_blocks,
        num_cpu_blocks=num_cpu_blocks,
    )
    path = Path(path)
    path.write_text(html, encoding="utf-8")
    return path


def embedded_data(html: str) -> dict:
    """The JSON a page from `walkthrough_html` embeds (for tests and tools)."""
    start = html.index(_DATA_OPEN) + len(_DATA_OPEN)
    return json.loads(html[start : html.index("</script>", start)])


_DATA_OPEN = '<script type="application/json" id="minipaged-data">'
_TEMPLATE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>minipaged: the paged KV-cache manager, step by step</title>
<style>
body { font-family: system-ui, sans-serif; margin: 1rem; color: #222; max-width: 64rem; }
h1 { font-size: 1.25rem; margin: 0 0 .6rem; }
h2 { font-size: 1.05rem; margin: 1.2rem 0 .3rem; }
button { font-size: .95rem; margin: 0 .3rem .3rem 0; }
#position { color: #555; margin-left: .4rem; }
#step-title { font-weight: 600; margin: .6rem 0 .2rem; }
.caption { color: #444; margin-bottom: .4rem; }
.pool-title { font: 13px monospace; margin: .6rem 0 .2rem; }
.pool { display: flex; flex-wrap: wrap; gap: 4px; }
.block { width: 4.6rem; min-height: 2.4rem; border: 1px solid #888; border-radius: 4px;
  font: 12px monospace; padding: 2px 3px; box-sizing: border-box; background: #eee; }
.block .id { color: #666; }
.block.free { background: #fff; border-style: dashed; color: #999; }
.block.cached { background: #f1f1fb; border-style: dashed; color: #557; }
.block.shared { border: 2px solid #222; }
#tables { margin-top: .7rem; font: 13px monospace; }
.table-row { display: flex; flex-wrap: wrap; align-items: center; gap: 4px; margin: 3px 0; }
.table-name { min-width: 11rem; }
.entry { border: 1px solid #888; border-radius: 3px; padding: 1px 4px; }
.slots { display: inline-flex; gap: 1px; margin-left: 4px; vertical-align: middle; }
.slot { width: 6px; height: 10px; border: 1px solid #666; background: #fff; }
.slot.full { background: #444; }
pre { background: #f6f6f6; padding: .5rem; overflow-x: auto; font-size: 12px; }
textarea { width: 100%; font-family: monospace; box-sizing: border-box; }
#error { color: #b00020; margin-top: .3rem; }
.legend { color: #555; font-size: .85rem; }
</style>
</head>
<body>
<h1>The paged KV-cache manager, step by step</h1>
<div id="controls">
  <button id="back" type="button">&larr; Back</button>
  <button id="next" type="button">Next &rarr;</button>
  <span id="position"></span>
</div>
<div id="view" data-mode="tour" data-step="0" data-used="0">
  <div id="step-title"></div>
  <div id="caption" class="caption"></div>
  <div id="pools"></div>
  <div id="tables"></div>
  <pre id="text"></pre>
</div>
<p class="legend">A block names the sequences holding it; "x2" is its reference count, a thick border
marks a shared block, "~" a cached-free block (nobody holds it; the prefix cache keeps its K/V).
A table entry "1&rarr;5*" maps logical block 1 to physical block 5 (* shared); its bar shows the
filled slots. The arrow keys step too.</p>
<h2>Playground: replay your own operations</h2>
<p class="legend">Operations, separated by ";": <code>allocate NAME N</code> (a request of N prompt
tokens), <code>append NAME K</code> (K decode steps), <code>fork PARENT CHILD</code>,
<code>free NAME</code>. A small JavaScript mirror of the block manager replays them (no prefix
caching); the tests check it against minipaged's BlockManager.</p>
<textarea id="ops" rows="3" spellcheck="false"></textarea>
<div>
  <button id="replay" type="button">Replay</button>
  <label>seed <input id="seed" type="number" min="0" step="1" value="0"></label>
  <button id="random" type="button">Random operations from the seed</button>
  <button id="tour" type="button">Back to the tour</button>
</div>
<div id="error" role="alert"></div>
<script type="application/json" id="minipaged-data">__DATA__</script>
<script>
"use strict";
(function () {
  const DATA = JSON.parse(document.getElementById("minipaged-data").textContent);
  const CFG = DATA.config;
  const $ = (id) => document.getElementById(id);
  let states = DATA.tour, index = 0, mode = "tour";

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }
  function color(name) {  // one pastel colour per sequence name, neighbours far apart on the wheel
    let h = 0;
    for (const c of name) h = (h * 31 + c.charCodeAt(0)) % 100003;
    return `hsl(${Math.round((h * 137.508) % 360)}, 65%, 84%)`;
  }

  // ---- drawing one state -------------------------------------------------------------------
  function drawPool(pool) {
    const box = el("div", "pool-box");
    box.dataset.pool = pool.name;
    const free = pool.num_blocks - pool.num_used;
    box.appendChild(el("div", "pool-title",
      `${pool.name} pool: ${pool.num_blocks} blocks, ${pool.num_used} used, ${free} free`));
    const row = el("div", "pool");
    for (const b of pool.blocks) {
      const cell = el("div", "block");
      cell.dataset.block = b.id;
      cell.dataset.ref = b.ref;
      cell.dataset.holders = b.holders.join(",");
      cell.appendChild(el("div", "id", "#" + b.id));
      let label = b.holders.join(",") + (b.ref > 1 ? " x" + b.ref : "");
      if (b.ref === 0) {
        label = b.cached ? "~" : ".";
        cell.classList.add(b.cached ? "cached" : "free");
      } else {
        cell.style.background = color(b.holders[0] || "?");
        if (b.ref > 1) cell.classList.add("shared");
      }
      cell.appendChild(el("div", "who", label));
      row.appendChild(cell);
    }
    box.appendChild(row);
    return box;
  }
  function drawTable(state, table) {
    const row = el("div", "table-row");
    row.dataset.seq = table.name;
    row.appendChild(el("span", "table-name", `${table.name}: ${table.num_tokens} tokens, ${table.pool}`));
    const pool = state.pools.find((p) => p.name === table.pool);
    const size = state.block_size;
    table.block_ids.forEach((block, i) => {
      const shared = pool.blocks[block].ref > 1;
      const entry = el("span", "entry", `${i}\u2192${block}${shared ? "*" : ""}`);
      entry.style.background = color(table.name);
      const filled = Math.max(0, Math.min(size, table.num_tokens - i * size));
      const slots = el("span", "slots");
      if (size <= 16) {
        for (let s = 0; s < size; s++) slots.appendChild(el("span", s < filled ? "slot full" : "slot"));
      } else {
        slots.textContent = `${filled}/${size}`;
      }
      entry.appendChild(slots);
      row.appendChild(entry);
    });
    return row;
  }
  function draw() {
    const state = states[index];
    $("step-title").textContent = mode === "tour" ? `Step ${index}. ${state.title}` : state.title;
    $("caption").replaceChildren(...state.caption.map((line) => el("div", "", line)));
    $("pools").replaceChildren(...state.pools.map(drawPool));
    const rows = state.tables.map((table) => drawTable(state, table));
    $("tables").replaceChildren(...(rows.length ? rows : [el("div", "", "no sequence holds blocks")]));
    $("text").textContent = state.text || "";
    $("text").hidden = !state.text;
    const view = $("view");
    view.dataset.mode = mode;
    view.dataset.step = index;
    view.dataset.used = state.pools[0].num_used;
    const where = mode === "tour" ? "Tour (minipaged memory)" : "Playground";
    $("position").textContent = `${where}: step ${index} of ${states.length - 1}`;  // 0: the start
    $("back").disabled = index === 0;
    $("next").disabled = index === states.length - 1;
  }
  function go(delta) {
    const next = Math.max(0, Math.min(states.length - 1, index + delta));
    if (next !== index) {
      index = next;
      draw();
    }
  }

  // ---- the mirror of BlockManager: allocate / append / fork / free -----------------------
  const VERBS = { allocate: [2, 2], append: [1, 2], fork: [2, 2], free: [1, 1] };
  function parseOps(text) {
    const ops = [];
    for (const raw of text.replace(/\n/g, ";").split(";")) {
      const words = raw.split(/\s+/).filter(Boolean);
      if (!words.length) continue;
      const verb = words[0].toLowerCase(), args = words.slice(1), op = words.join(" ");
      if (!Object.prototype.hasOwnProperty.call(VERBS, verb)) {
        throw new Error(`ops: unknown operation '${op}'; expected one of allocate, append, fork, free`);
      }
      const [low, high] = VERBS[verb];
      if (args.length < low || args.length > high) {
        throw new Error(`ops: '${op}' takes ${low === high ? low : low + " or " + high} arguments`);
      }
      const count = args[1];
      if ((verb === "allocate" || verb === "append") && args.length === 2
          && !(/^[0-9]+$/.test(count) && Number(count) > 0)) {
        throw new Error(`ops: '${op}': the token count must be a positive int`);
      }
      ops.push([verb, ...args]);
    }
    return ops;
  }
  class Pool {  // BlockAllocator: a LIFO free list (block 0 first) and reference counts
    constructor(n) {
      this.free = [];
      for (let b = n - 1; b >= 0; b--) this.free.push(b);
      this.ref = new Array(n).fill(0);
    }
    allocate() { const b = this.free.pop(); this.ref[b] = 1; return b; }
    incref(b) { this.ref[b] += 1; }
    release(b) { this.ref[b] -= 1; if (this.ref[b] === 0) this.free.push(b); }
  }
  function snapshot(pool, tables, size, title, caption) {
    const live = [...tables.entries()].sort((a, b) => a[1].order - b[1].order);
    const holders = pool.ref.map(() => []);
    for (const [name, t] of live) for (const b of t.blocks) holders[b].push(name);
    const blocks = pool.ref.map((ref, b) => ({ id: b, ref: ref, holders: holders[b], cached: false }));
    const used = pool.ref.filter((ref) => ref > 0).length;
    const rows = live.map(([name, t]) => (
      { name: name, pool: "device", num_tokens: t.tokens, block_ids: t.blocks.slice() }));
    rows.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
    return { title: title, caption: caption, block_size: size,
      pools: [{ name: "device", num_blocks: pool.ref.length, num_used: used, blocks: blocks }],
      tables: rows };
  }
  function checkNames(op, tables) {
    const [verb, name] = op, text = op.join(" ");
    if (verb === "allocate" && tables.has(name)) {
      throw new Error(`ops: '${text}': sequence '${name}' already exists`);
    }
    if (verb !== "allocate" && !tables.has(name)) {
      throw new Error(`ops: '${text}': no sequence '${name}' holds blocks`);
    }
    if (verb === "fork" && tables.has(op[2])) {
      throw new Error(`ops: '${text}': sequence '${op[2]}' already exists`);
    }
  }
  const list = (blocks) => `[${blocks.join(", ")}]`;
  function apply(op, pool, tables, size, counter) {  // returns caption lines, or null if out of blocks
    const [verb, name] = op;
    if (verb === "allocate") {
      const needed = Math.ceil(Number(op[2]) / size);
      if (needed > pool.free.length) return null;
      const blocks = [];
      for (let i = 0; i < needed; i++) blocks.push(pool.allocate());
      tables.set(name, { blocks: blocks, tokens: Number(op[2]), order: counter.next++ });
      return [`${name} gets blocks ${list(blocks)}`];
    }
    if (verb === "fork") {
      const parent = tables.get(name);
      for (const b of parent.blocks) pool.incref(b);
      tables.set(op[2], { blocks: parent.blocks.slice(), tokens: parent.tokens, order: counter.next++ });
      return [`${op[2]} shares ${name}'s blocks ${list(parent.blocks)}: no block allocated`];
    }
    if (verb === "free") {
      const table = tables.get(name);
      tables.delete(name);
      for (let i = table.blocks.length - 1; i >= 0; i--) pool.release(table.blocks[i]);  // tail first
      return [`${name}'s blocks lose one reference each; a block at 0 is free`];
    }
    const table = tables.get(name), caption = [];
    for (let k = 0; k < (op.length > 2 ? Number(op[2]) : 1); k++) {  // one decode step per token
      const full = table.tokens % size === 0, last = table.blocks[table.blocks.length - 1];
      const cow = !full && pool.ref[last] > 1;  // a shared, partly filled block is about to be written
      if ((full || cow ? 1 : 0) > pool.free.length) return null;
      if (cow) {
        const copy = pool.allocate();
        pool.release(last);
        table.blocks[table.blocks.length - 1] = copy;
        caption.push(`copy-on-write: block ${last} is shared, ${name} copies it to ${copy}`);
      }
      if (full) {
        table.blocks.push(pool.allocate());
        caption.push(`the last block was full: new block ${table.blocks[table.blocks.length - 1]}`);
      }
      table.tokens += 1;
    }
    const last = table.blocks[table.blocks.length - 1];
    if (!caption.length) caption.push(`written into block ${last}, no new block`);
    return caption;
  }
  function replayOps(text, size, numBlocks) {
    const ops = parseOps(text), pool = new Pool(numBlocks), tables = new Map(), counter = { next: 0 };
    const normalized = ops.map((op) => op.join(" ")).join("; ");
    const start = [`${numBlocks} blocks of ${size} slots`];
    const states = [snapshot(pool, tables, size, "Start: an empty pool", start)];
    for (let k = 0; k < ops.length; k++) {
      checkNames(ops[k], tables);
      const caption = apply(ops[k], pool, tables, size, counter);
      if (caption === null) {
        const error = `operation ${k + 1} (${ops[k].join(" ")}): not enough free blocks; `
          + "the replay stops here";
        return { ops: normalized, states: states, error: error };
      }
      states.push(snapshot(pool, tables, size, `${k + 1}. ${ops[k].join(" ")}`, caption));
    }
    return { ops: normalized, states: states, error: null };
  }

  // ---- random operation lists: mulberry32, as random_ops in Python -------------------------
  function mulberry32(seed) {
    let a = seed >>> 0;
    return function () {
      a = (a + 0x6D2B79F5) >>> 0;
      let t = Math.imul(a ^ (a >>> 15), a | 1);
      t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
      return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
    };
  }
  function randomOps(seed, numOps, size) {
    const rand = mulberry32(seed), randint = (low, high) => low + Math.floor(rand() * (high - low + 1));
    const live = [], ops = [];
    let next = 0;
    const newName = () => String.fromCharCode(65 + (next % 26)).repeat(1 + Math.floor(next++ / 26));
    for (let i = 0; i < numOps; i++) {
      const roll = rand();
      if (!live.length || (roll < 0.3 && live.length < 4)) {
        const name = newName();
        ops.push(`allocate ${name} ${randint(1, 3 * size)}`);
        live.push(name);
        continue;
      }
      const target = live[randint(0, live.length - 1)];
      if (roll < 0.65) {
        ops.push(`append ${target} ${randint(1, size + 1)}`);
      } else if (roll < 0.85 && live.length < 5) {
        const name = newName();
        ops.push(`fork ${target} ${name}`);
        live.push(name);
      } else {
        ops.push(`free ${target}`);
        live.splice(live.indexOf(target), 1);
      }
    }
    return ops.join("; ");
  }

  // ---- wiring ------------------------------------------------------------------------------
  function replayTyped() {
    try {
      const result = replayOps($("ops").value, CFG.block_size, CFG.num_gpu_blocks);
      states = result.states;
      mode = "playground";
      index = 0;
      $("error").textContent = result.error || "";
      draw();
    } catch (err) {
      $("error").textContent = err.message;
    }
  }
  $("back").addEventListener("click", () => go(-1));
  $("next").addEventListener("click", () => go(1));
  $("replay").addEventListener("click", replayTyped);
  $("random").addEventListener("click", () => {
    const seed = Number($("seed").value);
    if (!Number.isInteger(seed) || seed < 0 || seed > 4294967295) {
      $("error").textContent = "seed must be an int in [0, 4294967295]";
      return;
    }
    $("ops").value = randomOps(seed, 10, CFG.block_size);
    replayTyped();
  });
  $("tour").addEventListener("click", () => {
    states = DATA.tour;
    mode = "tour";
    index = 0;
    $("error").textContent = "";
    draw();
  });
  document.addEventListener("keydown", (event) => {
    if (event.target.closest && event.target.closest("textarea, input")) return;
    if (event.key === "ArrowRight") go(1);
    if (event.key === "ArrowLeft") go(-1);
  });
  $("ops").value = DATA.playground.ops;
  $("seed").value = CFG.seed;
  window.minipaged = { parseOps: parseOps, replayOps: replayOps, randomOps: randomOps, data: DATA };
  draw();
})();
</script>
</body>
</html>
"""


def main(argv: list[str] | None = None) -> int:
    """`python -m minipaged.walkthrough_html PATH [--seed N]`: write the page to PATH."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m minipaged.walkthrough_html", description=main.__doc__
    )
    parser.add_argument(
        "path", help="where to write the page, e.g. docs/step-through/walk.html"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=DEFAULT_SEED,
        help="the playground's random operations",
    )
    args = parser.parse_args(argv)
    try:
        print(f"wrote {write_walkthrough_html(args.path, seed=args.seed)}")
    except ValueError as error:
        parser.error(str(error))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = [
    "DEFAULT_SEED",
    "embedded_data",
    "format_ops",
    "parse_ops",
    "random_ops",
    "replay_ops",
    "snapshot",
    "tour_states",
    "walkthrough_html",
    "write_walkthrough_html",
]
