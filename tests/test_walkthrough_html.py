"""The step-through page (walkthrough_html.py): its states, its self-containment, and a real browser.

The pure-Python tests hold the embedded states to the CLI's own pictures and to the BlockManager;
the browser tests load the committed page from file:// in headless Chromium, click through it and
hold the page's JavaScript mirror of the manager to `replay_ops`, state by state.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path

import pytest

from minipaged import cli
from minipaged.reference.block_allocator import NoFreeBlocksError
from minipaged.reference.block_manager import BlockManager
from minipaged.sequence import Sequence, SequenceGroup
from minipaged.walkthrough_html import (
    embedded_data,
    parse_ops,
    random_ops,
    replay_ops,
    walkthrough_html,
    write_walkthrough_html,
)

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "docs" / "step-through" / "walk.html"
REGENERATE = (
    "regenerate it: python -m minipaged.walkthrough_html docs/step-through/walk.html"
)
APT = "apt-get update && apt-get install -y chromium chromium-driver"


def random_sizes(rng: random.Random) -> dict:
    return {
        "block_size": rng.randint(2, 6),
        "num_gpu_blocks": rng.randint(12, 24),
        "num_cpu_blocks": rng.randint(6, 10),
    }


def random_op_list(rng: random.Random, block_size: int, num_ops: int = 14) -> str:
    """Valid names, many forks and short appends into shared blocks: copy-on-write and OOM happen."""
    live, ops, fresh = [], [], iter(f"S{i}" for i in range(1000))
    for _ in range(num_ops):
        roll = rng.random()
        if not live or roll < 0.2:
            live.append(next(fresh))
            ops.append(f"allocate {live[-1]} {rng.randint(1, 3 * block_size)}")
        elif roll < 0.45:
            live.append(next(fresh))
            ops.append(f"fork {rng.choice(live[:-1])} {live[-1]}")
        elif roll < 0.85:
            ops.append(f"append {rng.choice(live)} {rng.randint(1, block_size + 1)}")
        else:
            ops.append(f"free {live.pop(rng.randrange(len(live)))}")
    return "\n".join(ops) if rng.random() < 0.5 else "; ".join(ops)


# ---- the tour's states against what the CLI prints ----------------------------------------------


def cli_steps(capsys: pytest.CaptureFixture, sizes: dict) -> list[str]:
    """`minipaged memory`'s stdout, cut into its steps."""
    argv = ["memory", "--block-size", str(sizes["block_size"])]
    argv += [
        "--num-gpu-blocks",
        str(sizes["num_gpu_blocks"]),
        "--num-cpu-blocks",
        str(sizes["num_cpu_blocks"]),
    ]
    assert cli.main(argv) == 0
    return [
        chunk.strip("\n")
        for chunk in re.split(r"\n(?=Step \d+\. )", capsys.readouterr().out)[1:]
    ]


def parse_pools(text: str) -> dict[str, dict]:
    """The pool pictures of viz.render_pool in `text`: name -> counts and cell labels."""
    pools, lines = {}, text.splitlines()
    for i, line in enumerate(lines):
        match = re.match(
            r"(device|host) pool: (\d+) blocks of \d+ slots, (\d+) used, (\d+) free",
            line,
        )
        if not match:
            continue
        cells = []
        for row in lines[i + 2 :: 2]:
            if not row.startswith("  ["):
                break
            cells += [cell.strip() for cell in re.findall(r"\[([^\]]*)\]", row)]
        pools[match[1]] = {
            "num_blocks": int(match[2]),
            "num_used": int(match[3]),
            "cells": cells,
        }
    return pools


def parse_tables(text: str) -> dict[str, tuple[int, str, list[int]]]:
    """The block-table lines of viz.render_block_tables: name -> (tokens, pool, physical blocks)."""
    tables = {}
    for match in re.finditer(
        r"^(\S+)\s+(\d+) tokens, (device|host):\s+(.*)$", text, re.MULTILINE
    ):
        blocks = [int(block) for block in re.findall(r"\d+->(\d+)", match[4])]
        tables[match[1]] = (int(match[2]), match[3], blocks)
    return tables


def cell_label(block: dict) -> str:
    if block["ref"] == 0:
        return "~" if block["cached"] else "."
    who = ",".join(block["holders"])
    return who if block["ref"] == 1 else f"{who} x{block['ref']}"


def test_tour_states_match_the_pictures_the_cli_prints(capsys):
    rng = random.Random()
    sizes = random_sizes(rng)
    tour = embedded_data(walkthrough_html(seed=rng.randrange(2**32), **sizes))["tour"]
    steps = cli_steps(capsys, sizes)
    assert len(tour) == len(steps) == 10
    num_tables = 0
    for state, printed in zip(tour, steps, strict=True):
        # the page shows exactly what `minipaged memory` prints
        assert state["text"] == printed
        assert printed.startswith(f"Step {tour.index(state)}. {state['title']}")
        pools = {pool["name"]: pool for pool in state["pools"]}
        assert pools["device"]["num_blocks"] == sizes["num_gpu_blocks"]
        assert pools["host"]["num_blocks"] == sizes["num_cpu_blocks"]
        pictures = parse_pools(printed)
        assert "device" in pictures  # every step draws the device pool
        for name, picture in pictures.items():
            assert picture["num_used"] == pools[name]["num_used"]
            assert picture["cells"] == [
                cell_label(block) for block in pools[name]["blocks"]
            ]
        drawn = {
            t["name"]: (t["num_tokens"], t["pool"], t["block_ids"])
            for t in state["tables"]
        }
        for name, table in parse_tables(printed).items():
            assert drawn[name] == table
            num_tables += 1
    assert num_tables >= 15  # A, B, B' and C appear in most steps' pictures


def test_tour_ends_with_every_block_released_and_the_prefix_cache_kept():
    tour = embedded_data(walkthrough_html(**random_sizes(random.Random())))["tour"]
    device = tour[-1]["pools"][0]
    assert device["num_used"] == 0 and tour[-1]["tables"] == []
    assert any(block["cached"] for block in device["blocks"])
    # A, B, C share
    assert max(b["ref"] for state in tour for b in state["pools"][0]["blocks"]) >= 3


# ---- the playground's replay against the BlockManager, driven step by step -----------------------


def drive_manager(ops: str, block_size: int, num_gpu_blocks: int):
    """Yield (manager, seqs by name) after each operation, stopping at the first out-of-blocks."""
    manager = BlockManager(block_size, num_gpu_blocks, 0, watermark=0.0)
    seqs: dict[str, Sequence] = {}
    yield manager, seqs
    for op in parse_ops(ops):
        verb, name = op[0], op[1]
        try:
            if verb == "allocate":
                seqs[name] = Sequence(list(range(int(op[2]))))
                manager.allocate(SequenceGroup(name, [seqs[name]]))
            elif verb == "fork":
                seqs[op[2]] = seqs[name].fork()
                manager.fork(seqs[name], seqs[op[2]])
            elif verb == "free":
                manager.free(seqs.pop(name))
            else:
                for _ in range(int(op[2]) if len(op) > 2 else 1):
                    seqs[name].append_token_id(1)
                    manager.append_slots(seqs[name])
        except NoFreeBlocksError:
            return
        yield manager, seqs


def assert_state_is(
    state: dict, manager: BlockManager, seqs: dict[str, Sequence]
) -> None:
    device = state["pools"][0]
    assert [block["ref"] for block in device["blocks"]] == [
        manager.device.ref_count(b) for b in range(manager.device.num_blocks)
    ]
    assert device["num_used"] == manager.device.num_used
    expected = {
        name: (len(seq), manager.get_block_table(seq).block_ids)
        for name, seq in seqs.items()
    }
    assert {
        t["name"]: (t["num_tokens"], t["block_ids"]) for t in state["tables"]
    } == expected
    for block in device["blocks"]:
        holders = sorted(
            name for name, (_, ids) in expected.items() if block["id"] in ids
        )
        assert sorted(block["holders"]) == holders


@pytest.mark.parametrize("trial", range(3))
def test_replayed_states_equal_the_manager_after_each_operation(trial):
    rng = random.Random()
    block_size, num_gpu_blocks = rng.randint(2, 5), rng.randint(4, 12)
    ops = random_op_list(rng, block_size)
    result = replay_ops(ops, block_size=block_size, num_gpu_blocks=num_gpu_blocks)
    num_states = 0
    driven = drive_manager(
        ops, block_size, num_gpu_blocks
    )  # one manager, changed in place: compare as it goes
    # strict: as many states
    for state, (manager, seqs) in zip(result["states"], driven, strict=True):
        assert_state_is(state, manager, seqs)
        num_states += 1
    assert (result["error"] is None) == (num_states == len(parse_ops(ops)) + 1)


def test_copy_on_write_shows_in_the_replay():
    rng = random.Random()
    block_size = rng.randint(2, 6)
    # a partly filled last block
    prompt = rng.randint(1, 3) * block_size + rng.randint(1, block_size - 1)
    result = replay_ops(
        f"allocate A {prompt}; fork A B; append B 1",
        block_size=block_size,
        num_gpu_blocks=12,
    )
    forked, written = result["states"][2], result["states"][3]
    tables = {t["name"]: t["block_ids"] for t in written["tables"]}
    assert tables["A"][:-1] == tables["B"][:-1] and tables["A"][-1] != tables["B"][-1]
    assert any("copy-on-write" in line for line in written["caption"])
    assert forked["pools"][0]["num_used"] + 1 == written["pools"][0]["num_used"]


def test_playground_uses_the_seeded_operation_list():
    seed = random.Random().randrange(2**32)
    data = embedded_data(walkthrough_html(seed=seed))
    assert data["playground"] == replay_ops(
        random_ops(seed), block_size=4, num_gpu_blocks=16
    )
    assert data["config"]["seed"] == seed and random_ops(seed) == random_ops(seed)


@pytest.mark.parametrize(
    ("ops", "words"),
    [
        ("allocate A", "takes 2 arguments"),
        ("allocate A 0", "positive int"),
        ("append A x", "positive int"),
        ("append A \u00b2", "positive int"),  # a digit to str.isdigit, not to int()
        ("swap A", "unknown operation"),
        ("fork A", "takes 2 arguments"),
    ],
)
def test_malformed_operations_raise_value_error_naming_them(ops, words):
    with pytest.raises(ValueError, match=words):
        replay_ops(ops)


@pytest.mark.parametrize(
    ("ops", "words"),
    [
        ("append A 1", "no sequence 'A'"),
        ("allocate A 2; allocate A 3", "already exists"),
        ("free Z", "'Z'"),
    ],
)
def test_unknown_or_reused_names_raise_value_error(ops, words):
    with pytest.raises(ValueError, match=words):
        replay_ops(ops)


def test_bad_arguments_raise():
    with pytest.raises(TypeError, match="ops must be a str"):
        parse_ops(["allocate A 2"])
    with pytest.raises(ValueError, match="seed"):
        walkthrough_html(seed=-1)
    with pytest.raises(ValueError, match="num_gpu_blocks >= 12"):
        walkthrough_html(num_gpu_blocks=11)
    with pytest.raises(TypeError, match="block_size must be an int"):
        walkthrough_html(block_size="4")
    with pytest.raises(ValueError, match="block_size"):
        replay_ops("allocate A 2", block_size=0)


# ---- the page itself -------------------------------------------------------------------------------


def test_page_loads_nothing_from_outside():
    html = walkthrough_html(seed=random.Random().randrange(2**32))
    assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", html, re.IGNORECASE)
    assert not re.search(
        r"<(link|img|iframe)\b|\bsrc\s*=|@import|url\(", html, re.IGNORECASE
    )
    # the data and the code, inline
    assert html.count("<script") == 2 and html.count("<style") == 1


def test_committed_page_is_what_the_function_writes_now(tmp_path):
    written = write_walkthrough_html(tmp_path / "walk.html")
    assert COMMITTED.exists(), REGENERATE
    assert COMMITTED.read_text(encoding="utf-8") == written.read_text(
        encoding="utf-8"
    ), f"stale; {REGENERATE}"


# ---- a real browser ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    # a test dependency: not skipped when missing (pip install selenium)
    from selenium import webdriver

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip(f"chromium and chromedriver are missing; install them with: {APT}")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(
        options=options, service=webdriver.ChromeService(executable_path=driver_path)
    )
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture
def page(browser):
    # drop what earlier tests logged; keep what loading the page logs
    browser.get_log("browser")
    browser.get(COMMITTED.as_uri())
    return browser


def console_errors(driver) -> list[dict]:
    """The browser console's errors since the last call (uncaught exceptions, console.error)."""
    return [
        entry
        for entry in driver.get_log("browser")
        if entry["level"] in ("SEVERE", "ERROR")
    ]


def drawn_state(driver) -> dict:
    """What the page draws now: its data attributes and every block cell's holders and ref count."""
    view = driver.find_element("id", "view")
    cells = driver.find_elements("css selector", "#pools [data-pool='device'] .block")
    return {
        "mode": view.get_attribute("data-mode"),
        "step": int(view.get_attribute("data-step")),
        "used": int(view.get_attribute("data-used")),
        "cells": [
            (c.get_attribute("data-holders"), int(c.get_attribute("data-ref")))
            for c in cells
        ],
        "tables": [
            row.get_attribute("data-seq")
            for row in driver.find_elements("css selector", "#tables .table-row")
        ],
    }


def expected_drawing(state: dict, mode: str, step: int) -> dict:
    device = state["pools"][0]
    return {
        "mode": mode,
        "step": step,
        "used": device["num_used"],
        "cells": [(",".join(b["holders"]), b["ref"]) for b in device["blocks"]],
        "tables": [t["name"] for t in state["tables"]],
    }


def test_next_and_back_draw_each_recorded_state(page):
    tour = embedded_data(COMMITTED.read_text(encoding="utf-8"))["tour"]
    assert drawn_state(page) == expected_drawing(tour[0], "tour", 0)
    next_button, back_button = (
        page.find_element("id", "next"),
        page.find_element("id", "back"),
    )
    for step in range(1, len(tour)):
        next_button.click()
        assert drawn_state(page) == expected_drawing(tour[step], "tour", step)
        assert page.find_element("id", "text").text == tour[step]["text"]
    assert not next_button.is_enabled()
    back_button.click()
    assert drawn_state(page) == expected_drawing(tour[-2], "tour", len(tour) - 2)
    body = page.find_element("tag name", "body")
    body.send_keys("\ue012")  # ArrowLeft
    assert drawn_state(page)["step"] == len(tour) - 3
    body.send_keys("\ue014")  # ArrowRight
    assert drawn_state(page) == expected_drawing(tour[-2], "tour", len(tour) - 2)
    assert console_errors(page) == []


def test_javascript_mirror_replays_like_the_block_manager(page):
    rng = random.Random()
    data = embedded_data(COMMITTED.read_text(encoding="utf-8"))
    replay = (
        "return window.minipaged.replayOps(arguments[0], arguments[1], arguments[2]);"
    )
    config = data["config"]
    assert (
        page.execute_script(replay, data["playground"]["ops"], 4, 16)
        == data["playground"]
    )
    assert config["block_size"] == 4 and config["num_gpu_blocks"] == 16
    for _ in range(8):
        block_size, num_gpu_blocks = rng.randint(2, 5), rng.randint(4, 12)
        ops = random_op_list(rng, block_size)
        expected = replay_ops(ops, block_size=block_size, num_gpu_blocks=num_gpu_blocks)
        assert (
            page.execute_script(replay, ops, block_size, num_gpu_blocks) == expected
        ), ops
    seeds = [rng.randrange(2**32) for _ in range(5)] + [0, 2**32 - 1]
    make = (
        "return window.minipaged.randomOps(arguments[0], arguments[1], arguments[2]);"
    )
    for seed in seeds:
        block_size = rng.randint(2, 6)
        assert page.execute_script(make, seed, 12, block_size) == random_ops(
            seed, 12, block_size
        )
    assert console_errors(page) == []


def test_typed_operations_replay_in_the_page(page):
    rng = random.Random()
    ops = random_op_list(rng, 4, num_ops=8)
    expected = replay_ops(ops, block_size=4, num_gpu_blocks=16)
    box = page.find_element("id", "ops")
    box.clear()
    box.send_keys(ops)
    page.find_element("id", "replay").click()
    assert drawn_state(page) == expected_drawing(expected["states"][0], "playground", 0)
    for step in range(1, len(expected["states"])):
        page.find_element("id", "next").click()
        assert drawn_state(page) == expected_drawing(
            expected["states"][step], "playground", step
        )
    assert page.find_element("id", "error").text == (expected["error"] or "")
    box.clear()
    box.send_keys("allocate A 3; explode A")
    page.find_element("id", "replay").click()
    assert "unknown operation" in page.find_element("id", "error").text
    page.find_element("id", "tour").click()
    assert drawn_state(page)["mode"] == "tour"
    assert console_errors(page) == []
