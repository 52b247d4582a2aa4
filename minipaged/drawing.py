"""SVG pictures of paged KV memory, drawn from a real BlockManager.

OS idea: an OS textbook draws physical memory as a row of frames and each process's page table as
arrows from its virtual pages to the frames that hold them (OSTEP ch. 18-20); a shared frame has
two arrows pointing at it, and a page copied on write gets its own frame. KV counterpart: the vLLM
paper's Figures 6-9 draw exactly that for KV blocks. viz.py draws it as text; this module draws it
as a self-contained SVG (no fonts, scripts or files outside it) for the docs:

- every sequence is a row of logical blocks, each saying which physical block backs it and how many
  of its slots hold a token, with an arrow to that physical block;
- the device (GPU) pool is a row of physical blocks below, each with its filled slots, its holders
  and, when shared, its reference count; the host (CPU swap) pool sits above the rows when it holds
  blocks, so the arrows of swapped-out sequences point up;
- copy-on-write copies are an arc from the source block to its copy; blocks the prefix cache keeps
  though nobody holds them are dashed.

Every drawn block and table entry carries data attributes (`data-block`, `data-ref-count`,
`data-seqs`, `data-seq`, `data-logical`, `data-physical`, ...) that state what it shows, so a test
can hold the picture to the manager's state. Only the standard library is used.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from xml.sax.saxutils import escape

from minipaged.reference.block_manager import BlockManager
from minipaged.reference.block_table import BlockTable

# Okabe-Ito
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#8C6D31", "#444444")
SHARED = "#D55E00"  # a block held by two or more tables, and copy-on-write arcs
OTHER = "#9A9A9A"  # a block held by a sequence the picture does not draw
CACHED = "#C8C8C8"  # cached-free: nobody holds it, the prefix cache keeps its K/V
# px: outer margin, the label column, space between blocks
MARGIN, LABEL_W, GAP = 12, 96, 10
# px: row heights and the room the arrows cross
SEQ_H, POOL_H, ROW_GAP, ARROW_GAP = 44, 58, 14, 46
TITLE_CHAR_W = 7.6  # px: a generous width of one character of a 13px bold title
# one square per slot up to MAX_SLOTS per block, else a fill bar
SLOT_W, MAX_SLOTS = 12, 8
STYLE = (
    "text{font-family:sans-serif;font-size:11px;fill:#222}.t{font-size:13px;font-weight:bold}"
    ".s{font-size:9px;fill:#555}.m{font-family:monospace;font-size:8px;fill:#777}"
    ".b{fill:#fff;stroke:#888}.sh{fill:#FFF1E6;stroke:#D55E00;stroke-width:2.5}"
    ".cf{fill:#F5F5F5;stroke:#888;stroke-dasharray:4 3}.f{fill:#fff;stroke:#CCC}"
    ".q{fill:none;stroke:#AAA;stroke-width:.8}.a{fill:none;stroke-width:1.4;opacity:.7}"
)
LEGEND = {
    "shared": (SHARED, "shared: ref count > 1"),
    "cached": (CACHED, "cached-free: kept by the prefix cache"),
    "cow": (SHARED, "copy-on-write copy"),
    "other": (OTHER, "held by another sequence"),
}


@dataclass
class Panel:
    """One drawn snapshot of a manager: SVG elements laid out from (0, 0), and their extent."""

    body: str
    width: float
    height: float
    features: set[str] = field(default_factory=set)  # which legend entries it needs


def seq_color(seq_id: int, names: Mapping[int, str] | None = None) -> str:
    """A sequence's colour: by its place in `names` when named, else by its id."""
    order = list(names or {})
    return PALETTE[(order.index(seq_id) if seq_id in order else seq_id) % len(PALETTE)]


def rect(
    x: float,
    y: float,
    w: float,
    h: float,
    cls: str = "",
    fill: str = "",
    extra: str = "",
) -> str:
    """An SVG rectangle; `cls` names a class of the shared style, `fill` overrides its colour."""
    attrs = f' class="{cls}"' if cls else ""
    # inline style: it beats the class's fill
    attrs += f' style="fill:{fill}"' if fill else ""
    return (
        f'<rect x="{x:g}" y="{y:g}" width="{w:g}" height="{h:g}" rx="3"{attrs}{extra}/>'
    )


def text(
    x: float, y: float, label: str, cls: str = "", anchor: str = "start", fill: str = ""
) -> str:
    """An SVG text element at baseline (x, y); the label is escaped."""
    attrs = f' class="{cls}"' if cls else ""
    attrs += f' text-anchor="{anchor}"' if anchor != "start" else ""
    attrs += f' style="fill:{fill}"' if fill else ""
    return f'<text x="{x:g}" y="{y:g}"{attrs}>{escape(label)}</text>'


def arrow(
    x1: float, y1: float, x2: float, y2: float, color: str, dash: bool = False
) -> str:
    """A vertical S-curve from (x1, y1) to (x2, y2) with a head at (x2, y2), up or down."""
    d = (y2 - y1) / 2
    head = 6 if y2 > y1 else -6
    dashed = ' stroke-dasharray="4 3"' if dash else ""
    curve = f"M{x1:g} {y1:g}C{x1:g} {y1 + d:g} {x2:g} {y2 - d:g} {x2:g} {y2 - head:g}"
    tip = f"M{x2 - 4:g} {y2 - head:g}L{x2 + 4:g} {y2 - head:g}L{x2:g} {y2:g}Z"
    return f'<path class="a" d="{curve}" stroke="{color}"{dashed}/><path d="{tip}" fill="{color}"/>'


def document(body: str, width: float, height: float, title: str) -> str:
    """Wrap elements into a standalone SVG document with the shared style and an accessible title."""
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:g}" height="{height:g}" '
        f'viewBox="0 0 {width:g} {height:g}" role="img">\n<title>{escape(title)}</title>\n'
        f"<style>{STYLE}</style>\n"
        f'<rect width="{width:g}" height="{height:g}" fill="#fff"/>\n{body}\n</svg>\n'
    )


def cell_width(block_size: int) -> int:
    """Width of one block: a square per slot (or a bar for large blocks) plus padding."""
    return (
        max(52, min(block_size, MAX_SLOTS) * SLOT_W + 12)
        if block_size <= MAX_SLOTS
        else 64
    )


def slots(
    x: float,
    y: float,
    block_size: int,
    filled: int,
    color: str,
    first: int | None = None,
) -> str:
    """A block's slots, filled ones in `color` (always a prefix: a block fills left to right).

    Up to MAX_SLOTS slots are squares, numbered from `first` when given (slot or position ids);
    larger blocks are one bar filled in proportion, with the count under it.
    """
    squares = block_size <= MAX_SLOTS
    width = block_size * SLOT_W if squares else cell_width(block_size) - 12
    parts = []
    if filled:
        parts.append(
            f'<rect x="{x:g}" y="{y:g}" width="{width * filled / block_size:g}" height="{SLOT_W}" '
            f'style="fill:{color}"/>'
        )
    outline = f"M{x:g} {y:g}h{width:g}v{SLOT_W}h{-width:g}Z"
    if squares:
        outline += "".join(
            f"M{x + i * SLOT_W:g} {y:g}v{SLOT_W}" for i in range(1, block_size)
        )
    parts.append(f'<path class="q" d="{outline}"/>')
    if squares and first is not None:  # number each slot under its square
        parts += [
            text(x + i * SLOT_W + 6, y + 21, str(first + i), "m", "middle")
            for i in range(block_size)
        ]
    if not squares:
        parts.append(
            text(x + width / 2, y + 22, f"{filled}/{block_size}", "m", "middle")
        )
    return "".join(parts)


def holders_of(tables: Mapping[int, BlockTable]) -> dict[int, list[int]]:
    """Physical block -> the sequence ids whose tables name it, in id order."""
    holders: dict[int, list[int]] = {}
    for seq_id in sorted(tables):
        for block in tables[seq_id].block_ids:
            holders.setdefault(block, []).append(seq_id)
    return holders


def filled_slots(table: BlockTable, logical: int) -> int:
    """Slots of logical block `logical` that hold a token (only the last can be partly filled)."""
    return max(0, min(table.block_size, table.num_tokens - logical * table.block_size))


@dataclass
class _Layout:
    """Where each block of one panel sits: the two pools, the rows of sequences, the arrows."""

    manager: BlockManager
    names: Mapping[int, str]
    drawn: list[int]
    per_row: int
    show_slots: bool
    cw: int = 0
    parts: list[str] = field(default_factory=list)
    arrows: list[str] = field(default_factory=list)
    features: set[str] = field(default_factory=set)
    pool_xy: dict[tuple[str, int], tuple[float, float]] = field(default_factory=dict)

    def x_of(self, index: int) -> float:
        return MARGIN + LABEL_W + (index % self.per_row) * (self.cw + GAP)

    def rows(self, n: int) -> int:
        return max(1, -(-n // self.per_row))


@dataclass
class _Block:
    """What the picture says about one physical block."""

    block: int
    state: str  # "used", "free" or "cached-free"
    ref_count: int
    seqs: list[int]  # the seq_ids whose tables name it
    # slots holding a token: the most any holder filled; a cached block is full
    filled: int
    name: str | None  # its prefix-cache hash, if it has one

    def attrs(self, pool: str) -> str:
        attrs = (
            f'data-pool="{pool}" data-block="{self.block}" data-state="{self.state}" '
            f'data-ref-count="{self.ref_count}" data-seqs="{",".join(map(str, self.seqs))}" '
            f'data-filled="{self.filled}"'
        )
        return attrs + (f' data-hash="{self.name}"' if self.name else "")


def _blocks(manager: BlockManager, pool: str) -> list[_Block]:
    """Read one pool's state from the manager: holders, reference counts, fill, cache names."""
    allocator = manager.device if pool == "device" else manager.host
    tables = manager.device_tables if pool == "device" else manager.host_tables
    holders = holders_of(tables)
    cached_free = getattr(allocator, "is_cached_free", lambda block: False)
    block_hash = getattr(allocator, "block_hash", lambda block: None)
    fill: dict[int, int] = {}
    for table in tables.values():
        for i, block in enumerate(table.block_ids):
            fill[block] = max(fill.get(block, 0), filled_slots(table, i))
    blocks = []
    for block in range(allocator.num_blocks):
        ref = allocator.ref_count(block)
        state = "used" if ref else "cached-free" if cached_free(block) else "free"
        filled = manager.block_size if state == "cached-free" else fill.get(block, 0)
        blocks.append(
            _Block(block, state, ref, holders.get(block, []), filled, block_hash(block))
        )
    return blocks


def _draw_pool(lay: _Layout, pool: str, y: float, free_list: bool) -> float:
    """Draw one pool's physical blocks from height y; returns the height used."""
    allocator = lay.manager.device if pool == "device" else lay.manager.host
    lay.parts.append(text(MARGIN, y + 16, f"{pool} pool", "t"))
    lay.parts.append(
        text(
            MARGIN, y + 29, "GPU memory" if pool == "device" else "CPU swap space", "s"
        )
    )
    lay.parts.append(
        text(
            MARGIN, y + 41, f"{allocator.num_free} of {allocator.num_blocks} free", "s"
        )
    )
    # allocate() pops from the right; the order is what the frame-allocator page teaches
    if free_list:
        order = ",".join(map(str, allocator.free_list))
        label = text(MARGIN, y + 53, f"free list: [{order}]", "s")
        lay.parts.append(f'<g data-free-list="{order}">{label}</g>')
    for cell in _blocks(lay.manager, pool):
        x, top = lay.x_of(cell.block), y + (cell.block // lay.per_row) * (POOL_H + GAP)
        lay.pool_xy[(pool, cell.block)] = (x, top)
        lay.parts.append(f"<g {cell.attrs(pool)}>{_block_cell(lay, cell, x, top)}</g>")
    return lay.rows(allocator.num_blocks) * (POOL_H + GAP) - GAP


def _block_cell(lay: _Layout, cell: _Block, x: float, y: float) -> str:
    """One physical block: its id, its slots, and who holds it (or free / cached)."""
    shown = [s for s in cell.seqs if s in lay.drawn]
    shared = len(cell.seqs) > 1
    who = ",".join(_label(s, lay.names) for s in shown) or "other"
    if shared:
        cls, color, feature, who = (
            "sh",
            SHARED,
            "shared",
            f"{who} \u00d7{len(cell.seqs)}",
        )
    elif cell.state == "cached-free":
        cls, color, feature, who = "cf", CACHED, "cached", "cached"
    elif cell.state == "free":
        cls, color, feature, who = "f", "", "", "free"
    elif not shown:
        cls, color, feature = "b", OTHER, "other"
    else:
        cls, color, feature = "b", seq_color(shown[0], lay.names), ""
    lay.features.update([feature] if feature else [])
    parts = [rect(x, y, lay.cw, POOL_H, cls), text(x + 5, y + 13, f"#{cell.block}")]
    if cell.name:  # a prefix-cache name: the first hex digits of its chained hash
        parts.append(text(x + lay.cw - 4, y + 12, cell.name[:4], "m", "end"))
    first = cell.block * lay.manager.block_size if lay.show_slots else None
    parts.append(
        slots(x + 6, y + 19, lay.manager.block_size, cell.filled, color, first)
    )
    parts.append(
        text(
            x + lay.cw / 2, y + POOL_H - 6, who, "s", "middle", SHARED if shared else ""
        )
    )
    return "".join(parts)


def _label(seq_id: int, names: Mapping[int, str]) -> str:
    return names.get(seq_id, f"s{seq_id}")


def _draw_table(lay: _Layout, seq_id: int, pool: str, y: float) -> float:
    """One sequence's block table as a row of logical blocks from height y; returns the height."""
    manager = lay.manager
    table = (manager.device_tables if pool == "device" else manager.host_tables)[seq_id]
    allocator = manager.device if pool == "device" else manager.host
    color, size = seq_color(seq_id, lay.names), manager.block_size
    parts = [
        f'<g data-table="{seq_id}" data-location="{pool}" data-num-tokens="{table.num_tokens}">',
        text(MARGIN, y + 18, _label(seq_id, lay.names), "t", fill=color),
        text(
            MARGIN,
            y + 31,
            f"{table.num_tokens} tokens" + (", on host" if pool == "host" else ""),
            "s",
        ),
    ]
    for i, block in enumerate(table.block_ids):
        x, top = lay.x_of(i), y + (i // lay.per_row) * (SEQ_H + GAP)
        filled, shared = filled_slots(table, i), allocator.ref_count(block) > 1
        parts.append(
            f'<g data-seq="{seq_id}" data-location="{pool}" data-logical="{i}" data-physical="{block}" '
            f'data-filled="{filled}">'
        )
        parts.append(rect(x, top, lay.cw, SEQ_H, "b", extra=f' style="stroke:{color}"'))
        parts.append(
            text(x + 5, top + 13, f"{i} \u2192 #{block}", fill=SHARED if shared else "")
        )
        parts.append(
            slots(
                x + 6,
                top + 18,
                size,
                filled,
                color,
                i * size if lay.show_slots else None,
            )
        )
        parts.append("</g>")
        px, py = lay.pool_xy[(pool, block)]
        if pool == "device":
            lay.arrows.append(
                arrow(x + lay.cw / 2, top + SEQ_H, px + lay.cw / 2, py, color)
            )
        else:
            lay.arrows.append(
                arrow(
                    x + lay.cw / 2, top, px + lay.cw / 2, py + POOL_H, color, dash=True
                )
            )
    lay.parts.append("".join(parts) + "</g>")
    return lay.rows(len(table)) * (SEQ_H + GAP) - GAP


def _draw_cow(lay: _Layout, cow: list[tuple[int, int]]) -> float:
    """Arcs under the device pool from each copied block to its copy; returns the height used."""
    for src, dst in cow:
        (sx, sy), (dx, dy) = lay.pool_xy[("device", src)], lay.pool_xy[("device", dst)]
        x1, x2, low = sx + lay.cw / 2, dx + lay.cw / 2, max(sy, dy) + POOL_H + 26
        y1, y2 = sy + POOL_H, dy + POOL_H
        curve = f"M{x1:g} {y1:g}C{x1:g} {low:g} {x2:g} {low:g} {x2:g} {y2 + 6:g}"
        tip = f"M{x2 - 4:g} {y2 + 6:g}L{x2 + 4:g} {y2 + 6:g}L{x2:g} {y2:g}Z"
        label = text(
            (x1 + x2) / 2, low + 4, f"copy #{src} \u2192 #{dst}", "s", "middle", SHARED
        )
        lay.parts.append(
            f'<g data-cow-src="{src}" data-cow-dst="{dst}"><path class="a" stroke="{SHARED}" '
            f'stroke-dasharray="4 3" d="{curve}"/><path d="{tip}" fill="{SHARED}"/>{label}</g>'
        )
        lay.features.add("cow")
    return 36 if cow else 0


def draw_panel(
    manager: BlockManager,
    names: Mapping[int, str] | None = None,
    *,
    seqs: Iterable[int] | None = None,
    title: str | None = None,
    cow: Iterable[tuple[int, int]] = (),
    show_host: bool | None = None,
    show_slots: bool = False,
    show_free_list: bool = False,
    per_row: int = 12,
) -> Panel:
    """Draw the manager's state now: block tables above, the device pool below, host pool on top.

    Args:
        manager: the block manager to draw (read only).
        names: seq_id -> a short label such as "A" (default "s<seq_id>"); also fixes the colours.
        seqs: the seq_ids whose tables to draw (default: every sequence holding blocks); blocks held
            only by others read "other".
        title: a line above the picture.
        cow: copy-on-write (src, dst) pairs, as append_slots returned them, to draw as arcs.
        show_host: draw the host pool; by default only when it holds blocks.
        show_slots: number each slot (pool slot ids in physical blocks, positions in logical ones).
        show_free_list: list the free blocks in the order `allocate` hands them out (top on the right).
        per_row: blocks per row before a pool or a table wraps.

    Returns:
        A Panel: pass one or more to `compose` for a document.

    Raises:
        ValueError: if `per_row` is not a positive int, or a pair in `cow` names no device block.
    """
    if not isinstance(per_row, int) or isinstance(per_row, bool) or per_row < 1:
        raise ValueError(f"per_row must be a positive int, got {per_row!r}")
    cow = list(cow)
    for pair in cow:
        if len(pair) != 2 or not all(0 <= b < manager.device.num_blocks for b in pair):
            raise ValueError(
                f"cow must hold (src, dst) device block pairs, got {pair!r}"
            )
    names = dict(names or {})
    tables = {**manager.host_tables, **manager.device_tables}
    drawn = sorted(
        tables,
        key=lambda s: (s not in names, list(names).index(s) if s in names else s),
    )
    drawn = [s for s in drawn if seqs is None or s in set(seqs)]
    if show_host is None:
        show_host = manager.host.num_used > 0
    longest = max([manager.device.num_blocks, *(len(tables[s]) for s in drawn)])
    width_blocks = min(
        per_row, max(1, longest, manager.host.num_blocks if show_host else 0)
    )
    lay = _Layout(
        manager, names, drawn, per_row, show_slots, cell_width(manager.block_size)
    )
    y = 0.0
    if title:
        lay.parts.append(text(MARGIN, 16, title, "t"))
        y = 26.0
    host_seqs = [s for s in drawn if s in manager.host_tables]
    device_seqs = [s for s in drawn if s in manager.device_tables]
    # The pools come first so that the tables' arrows know where to point; rows are placed after.
    if show_host:
        y += _draw_pool(lay, "host", y, False) + ARROW_GAP
    seq_top = y
    y += sum(
        _rows_height(lay, len(tables[s])) + ROW_GAP for s in host_seqs + device_seqs
    )
    y += ARROW_GAP - ROW_GAP if host_seqs + device_seqs else 0
    y += _draw_pool(lay, "device", y, show_free_list)
    y += _draw_cow(lay, cow)
    for s in host_seqs:
        seq_top += _draw_table(lay, s, "host", seq_top) + ROW_GAP
    for s in device_seqs:
        seq_top += _draw_table(lay, s, "device", seq_top) + ROW_GAP
    y += 8 + _summary(lay, y + 8)
    width = MARGIN * 2 + LABEL_W + width_blocks * (lay.cw + GAP) - GAP
    # room for the title
    width = max(width, MARGIN * 2 + TITLE_CHAR_W * len(title or ""))
    return Panel(
        "".join(lay.arrows) + "\n" + "\n".join(lay.parts), width, y, lay.features
    )


def _rows_height(lay: _Layout, num_blocks: int) -> float:
    return lay.rows(num_blocks) * (SEQ_H + GAP) - GAP


def _summary(lay: _Layout, y: float) -> float:
    """One line of memory_stats() under the pool: what the picture adds up to."""
    stats = lay.manager.memory_stats()
    device = stats.device
    line = f"device: {device.num_used}/{device.num_blocks} blocks used"
    line += f" ({device.num_shared} shared)" if device.num_shared else ""
    line += f", {device.slots_used}/{device.slots_allocated} slots hold a token"
    if stats.host.num_blocks:
        line += f"; host: {stats.host.num_used}/{stats.host.num_blocks} blocks used"
    line += f"; copies on write: {stats.cow_copies}" if stats.cow_copies else ""
    if lay.manager.watermark_blocks:
        line += f"; watermark: {lay.manager.watermark_blocks} kept free at admission"
    lay.parts.append(text(MARGIN, y + 10, line, "s"))
    return 14


def compose(panels: Iterable[Panel], title: str) -> str:
    """Stack panels top to bottom into one SVG document, with a legend for what they use.

    Args:
        panels: from draw_panel, in reading order.
        title: the picture's accessible title (read by screen readers; not drawn).
    """
    panels = list(panels)
    if not panels:
        raise ValueError("panels must hold at least one Panel")
    body, y = [], MARGIN
    for i, panel in enumerate(panels):
        body.append(
            f'<g data-panel="{i}" transform="translate(0 {y:g})">{panel.body}</g>'
        )
        y += panel.height + 18
    features = set().union(*(p.features for p in panels))
    x = MARGIN
    for key in (k for k in LEGEND if k in features):
        color, label = LEGEND[key]
        body.append(rect(x, y, 12, 12, fill=color) + text(x + 16, y + 10, label, "s"))
        x += 24 + 5.2 * len(label)
    height = y + (22 if features else 0)
    width = max(max(p.width for p in panels), x + MARGIN)
    return document("\n".join(body), width, height, title)


def draw_manager(
    manager: BlockManager, names: Mapping[int, str] | None = None, **kwargs
) -> str:
    """The manager's state as one SVG document: `draw_panel` (same arguments) then `compose`."""
    title = kwargs.get("title") or "block tables and KV block pools"
    return compose([draw_panel(manager, names, **kwargs)], title)


__all__ = [
    "Panel",
    "arrow",
    "compose",
    "document",
    "draw_manager",
    "draw_panel",
    "rect",
    "seq_color",
    "text",
]
