"""The experiments' docs pages say what their JSON says.

Every table of results on docs/experiments/*.md, and every number the prose quotes from a run, sits
between `gen:KEY` and `/gen` HTML comments and is rendered from docs/experiments/img/NAME.json by
minipaged.experiments.pages. These tests fail when a page and its JSON disagree: re-measure a figure
(scripts/make_experiment_figures.py rewrites the page too) or edit a number by hand, and the page must
follow. They read the committed JSON only; nothing is measured.
"""

from __future__ import annotations

import copy
import json

import pytest

from minipaged.experiments import EXPERIMENTS
from minipaged.experiments.pages import (
    DOCS,
    PAGES,
    page_parts,
    render,
    stale_parts,
    sync_page,
    sync_pages,
)

# The number of each page that its conclusions rest on: (experiment, row filter, key).
HEADLINES = {
    "memory-waste": ({"allocator": "paged"}, "token_states"),
    "batch-size": ({"allocator": "paged", "rate": 2.0}, "mean_batch_size"),
    "sharing": (
        {"workload": "sharegpt-like", "mode": "parallel", "width": 2},
        "saving",
    ),
    "shared-prefix": (
        {"prefix_len": 341, "prefix_caching": True},
        "throughput_vs_orca_oracle",
    ),
    "block-size": ({"part": "time", "block_size": 256}, "seconds_per_step"),
    "swap-vs-recompute": ({"block_size": 1}, "recompute_s"),
    "chunked-prefill": ({"rate": 8.0, "chunking": True, "budget": 128}, "itl_p99"),
}


def load(experiment: str) -> dict:
    return json.loads((DOCS / "img" / f"{experiment}.json").read_text())


@pytest.mark.parametrize("page", list(PAGES))
def test_the_page_says_what_its_json_says(page):
    filename, _ = PAGES[page]
    problems = stale_parts((DOCS / filename).read_text(), page_parts(page))
    assert not problems, (
        f"docs/experiments/{filename} disagrees with its JSON; run "
        "`PYTHONPATH=. python scripts/make_experiment_figures.py --pages-only` and reread the prose:\n"
        + "\n".join(problems)
    )


def test_every_experiment_has_a_page_with_its_results_and_the_papers():
    for name in EXPERIMENTS:
        filename, experiment = PAGES[name]
        assert experiment == name
        text = (DOCS / filename).read_text()
        assert "<!-- gen:results -->" in text or "<!-- gen:batch -->" in text, filename
        assert "## Beside the paper" in text, filename


@pytest.mark.parametrize("experiment", list(HEADLINES))
def test_a_changed_json_number_makes_the_page_stale(experiment):
    """The guard works: one number of the JSON changes, the page no longer agrees with it."""
    data = load(experiment)
    where, key = HEADLINES[experiment]
    changed = copy.deepcopy(data)
    row = next(r for r in changed["rows"] if all(r[k] == v for k, v in where.items()))
    row[key] *= 0.8
    text = (DOCS / PAGES[experiment][0]).read_text()
    assert not stale_parts(text, render(experiment, data))
    problems = stale_parts(text, render(experiment, changed))
    assert problems and all("the JSON gives" in p for p in problems)


@pytest.mark.parametrize("experiment", list(HEADLINES))
def test_every_row_is_on_the_page(experiment):
    """Scaling every measured number of one row changes what the page shows: no row is left out."""
    data = load(experiment)
    for i in range(len(data["rows"])):
        changed = copy.deepcopy(data)
        for key, value in changed["rows"][i].items():
            # not settings
            if isinstance(value, float) and value and key not in ("rate", "window_s"):
                changed["rows"][i][key] = value * 1.37
        before, after = render(experiment, data), render(experiment, changed)
        assert any(before[k] != after[k] for k in before), (experiment, i)


def test_sync_rewrites_a_stale_part_and_nothing_else():
    page = "Text <!-- gen:a -->1.0 ms<!-- /gen --> and\n\n<!-- gen:t -->\n\n| x |\n\n<!-- /gen -->\n"
    parts = {"a": "2.0 ms", "t": "| y |\n| --- |"}
    assert stale_parts(page, parts) == [
        "a: the page says '1.0 ms', the JSON gives '2.0 ms'",
        "t: the page says '| x |', the JSON gives '| y |\\n| --- |'",
    ]
    synced = sync_page(page, parts)
    assert (
        synced
        == "Text <!-- gen:a -->2.0 ms<!-- /gen --> and\n\n<!-- gen:t -->\n\n| y |\n| --- |\n\n<!-- /gen -->\n"
    )
    assert stale_parts(synced, parts) == []
    assert stale_parts(synced, {**parts, "b": "3"}) == ["b: not on the page"]
    assert stale_parts(synced, {"a": "2.0 ms"}) == ["t: no such part (known: a)"]
    # an inline part at the start of a line would end the paragraph in Markdown: refused
    assert stale_parts("Text\n  <!-- gen:a -->2.0 ms<!-- /gen --> and", parts) == [
        "a: an inline part starts a line",
        "t: not on the page",
    ]


def test_sync_pages_repairs_a_copy_of_the_docs(tmp_path):
    """What `make_experiment_figures.py --pages-only` does, on a copy: a number edited by hand on a
    page is put back from the JSON, and only the pages of the experiments named are touched."""
    import shutil

    docs = tmp_path / "experiments"
    shutil.copytree(DOCS, docs)
    page = docs / "swap-vs-recompute.md"
    good = page.read_text()
    page.write_text(good.replace("<!-- gen:ratio-1 -->", "<!-- gen:ratio-1 -->9", 1))
    # not this page's experiment: left alone
    assert sync_pages(["block-size"], docs) == []
    assert page.read_text() != good
    assert (
        sync_pages(["swap-vs-recompute"], docs) == [page] and page.read_text() == good
    )
    assert sync_pages(None, docs) == []  # every page already agrees with its JSON


def test_parallel_sampling_follows_the_pages_rule_of_thumb():
    """docs/experiments/sharing.md: n samples save about (n - 1) / n of the full prompt blocks one
    sequence holds (prompt_block_share), on the documented run."""
    for r in load("sharing")["rows"]:
        if r["mode"] == "parallel":
            rule = (r["width"] - 1) / r["width"] * r["prompt_block_share"]
            assert r["saving_of_totals"] == pytest.approx(rule, rel=0.15), r


def test_the_documented_sharing_run_keeps_the_sequence_budget():
    """docs/experiments/sharing.md: no step of the documented run runs more than the scheduler's 256
    sequences, beam searches included (a group counts its width from admission, before it forks)."""
    for r in load("sharing")["rows"]:
        assert 0 < r["mean_seqs"] <= r["max_seqs"] <= 256, r


def test_memory_waste_goal_is_stated_as_measured():
    """The page states the goal (>= 96% token states for paged at block size 16) with the measured
    figure; it is printed, not asserted, so this only checks the page reports the run."""
    paged = next(r for r in load("memory-waste")["rows"] if r["allocator"] == "paged")
    text = (DOCS / "memory-waste.md").read_text()
    assert f"<!-- gen:paged -->{100 * paged['token_states']:.1f}%<!-- /gen -->" in text


def test_the_buddy_rounding_on_the_memory_waste_page():
    """docs/experiments/memory-waste.md: buddy placement rounds each range up to a power of two;
    weighting each request by how long it runs (its output_len steps), an Oracle range is 76% of
    its buddy block and a Pow2 range 75%, so about a quarter of what Oracle's ranges hold is
    rounding: the measured internal fragmentation of Oracle, over the memory its ranges hold."""
    from minipaged.experiments.baselines import reservation_size
    from minipaged.experiments.serving import MAX_MODEL_LEN, sharegpt_load

    def buddy(size: int) -> int:
        return min(MAX_MODEL_LEN, 1 << (size - 1).bit_length())

    workload = sharegpt_load(2.0, 1_000.0, seed=0)  # the experiment's requests
    keep = {}
    for policy in ("oracle", "pow2"):
        sizes = [
            (
                r.output_len,
                reservation_size(policy, r.prompt_len, r.output_len, MAX_MODEL_LEN),
            )
            for r in workload
        ]
        keep[policy] = sum(o * s for o, s in sizes) / sum(
            o * buddy(s) for o, s in sizes
        )
    assert (round(100 * keep["oracle"]), round(100 * keep["pow2"])) == (76, 75)
    oracle = next(
        r for r in load("memory-waste")["rows"] if r["allocator"] == "orca-oracle"
    )
    held = (
        oracle["token_states"] + oracle["reserved"] + oracle["internal_fragmentation"]
    )
    assert oracle["internal_fragmentation"] / held == pytest.approx(
        1 - keep["oracle"], abs=0.02
    )
    text = " ".join((DOCS / "memory-waste.md").read_text().split())
    assert "an Oracle range is 76% of its buddy block and a Pow2 range 75%" in text


def test_the_documented_run_strands_free_blocks_while_requests_wait():
    """docs/experiments/memory-waste.md: paged allocation and vAttention reserve nothing and leave no
    holes, but their free blocks are stranded while a request waits for more than they hold."""
    for r in load("memory-waste")["rows"]:
        if r["allocator"] in ("paged", "vattention"):
            assert r["reserved"] == r["external_fragmentation"] == 0.0
            assert r["stranded"] > 0.0 and r["mean_waiting"] > 0.0, r["allocator"]


def test_littles_law_on_the_batch_size_page():
    """docs/experiments/batch-size.md: while paged allocation keeps up, its batch is rate x mean
    output x mean step (Little's law), at every rate of the documented run where it keeps up."""
    from minipaged.workloads import SHAREGPT

    kept = [
        r
        for r in load("batch-size")["rows"]
        if r["allocator"] == "paged" and r["throughput_rps"] >= 0.95 * r["rate"]
    ]
    assert {r["rate"] for r in kept} >= {0.5, 1.0, 1.5, 2.0}
    for r in kept:
        predicted = r["rate"] * SHAREGPT.mean_output_len * r["mean_step_s"]
        assert r["mean_batch_size"] == pytest.approx(predicted, rel=0.1), r["rate"]


def test_shared_prefix_rate_part_is_on_its_page():
    """The throughput part of shared-prefix (Fig. 16): its max_rate table and every point's latency
    come from the JSON; vLLM's max_rate behind the 5-shot prefix, changed, makes the table stale."""
    data = load("shared-prefix")
    text = (DOCS / PAGES["shared-prefix"][0]).read_text()
    assert "<!-- gen:rates -->" in text and "<!-- gen:rate-points -->" in text
    changed = copy.deepcopy(data)
    summaries = [r for r in changed["rows"] if r["part"] == "max_rate"]
    row = next(r for r in summaries if (r["prefix_len"], r["system"]) == (341, "vLLM"))
    row["max_rate"] *= 2
    problems = stale_parts(text, render("shared-prefix", changed))
    assert "rates" in [p.split(":")[0] for p in problems]
    table = render("shared-prefix", data)["rate-points"]
    assert all(
        f"{r['normalized_latency']:.3f}" in table
        for r in data["rows"]
        if r["part"] == "rate"
    )
