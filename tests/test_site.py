"""The built docs site works offline, from disk, with its math rendered and its tutorials downloadable.

A student should be able to open `site/index.html` from disk (file://), without a network, and read
everything: every page, the search, the equations, the tutorials with their outputs. This module
builds the site once (`mkdocs build --strict`, which executes the tutorials afresh: one to two
minutes) and checks the built HTML:

- the equations are arithmatex output, load the KaTeX copy served by the site, and every one of them
  parses with that KaTeX (through Node.js);
- no page loads anything from the network: no script, stylesheet, font, image or frame from
  http(s)://, and no stylesheet that fetches one;
- every internal link and asset resolves to a file of the site, as browsing from disk needs;
- the search index is inlined as a script (the offline plugin), for search from disk;
- the executed tutorials show no warning, error or other stderr output;
- every tutorial page links a .ipynb beside it, a valid notebook with the tutorial's cells.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import jupytext
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = sorted((ROOT / "tutorials").glob("*.py"))
KATEX_DIR = "javascripts/vendor/katex"
# Pages whose equations were written as math (Eq. 4 of the paper; the online softmax and log-sum-exp merge).
MATH_PAGES = ["concepts/reading-through-the-table.html", "kernels/triton-decode.html"]
# Tags whose src/href/srcset/data/poster make the browser fetch something (an <a href> does not).
LOADING_TAGS = {
    "script",
    "link",
    "img",
    "iframe",
    "source",
    "audio",
    "video",
    "embed",
    "object",
    "track",
    "input",
}
LOADING_ATTRS = {"src", "href", "srcset", "data", "poster"}
NETWORK = re.compile(r"^\s*(?:https?:)?//", re.IGNORECASE)
CSS_URL = re.compile(r"""(?:url\(\s*|@import\s+)["']?(?P<url>[^"')\s;]+)""")
STDERR_OUTPUT = re.compile(
    r"<div[^>]*data-mime-type=\"application/vnd\.jupyter\.stderr\"[^>]*>(?P<text>.*?)</div>",
    re.S,
)
STYLE = re.compile(r"<style\b[^>]*>(?P<css>.*?)</style>", re.S)


class TagCollector(HTMLParser):
    """Every start tag of a page, with its attributes, and the text of every arithmatex element."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.formulas: list[str] = []
        self._math_depth = 0  # > 0 inside a .arithmatex element
        self._depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {name: value or "" for name, value in attrs}
        self.tags.append((tag, attributes))
        if tag in ("span", "div"):
            self._depth += 1
            if (
                self._math_depth == 0
                and "arithmatex" in attributes.get("class", "").split()
            ):
                self._math_depth = self._depth
                self.formulas.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("span", "div"):
            if self._math_depth == self._depth:
                self._math_depth = 0
            self._depth -= 1

    def handle_data(self, data: str) -> None:
        if self._math_depth:
            self.formulas[-1] += data


def parse(page: Path) -> TagCollector:
    collector = TagCollector()
    collector.feed(page.read_text(encoding="utf-8"))
    return collector


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site, built once for the module, with the tutorials executed afresh (no output cache)."""
    site_dir = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "MINIPAGED_DOCS_CACHE": "false"}
    command = [
        sys.executable,
        "-m",
        "mkdocs",
        "build",
        "--strict",
        "--site-dir",
        str(site_dir),
    ]
    result = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, (
        f"mkdocs build failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    )
    return site_dir


@pytest.fixture(scope="module")
def pages(site) -> dict[str, TagCollector]:
    """Every built HTML page, parsed, by its path relative to the site."""
    return {
        page.relative_to(site).as_posix(): parse(page)
        for page in sorted(site.rglob("*.html"))
    }


def test_the_build_has_every_page(site, pages):
    assert "index.html" in pages
    for page in [*MATH_PAGES, *(f"tutorials/{t.stem}.html" for t in TUTORIALS)]:
        assert page in pages, f"{page} was not built"


@pytest.mark.parametrize("page", MATH_PAGES)
def test_math_pages_carry_arithmatex_output_and_load_katex_from_the_site(
    site, pages, page
):
    collector = pages[page]
    displayed = [f for f in collector.formulas if f.strip().startswith("\\[")]
    inline = [f for f in collector.formulas if f.strip().startswith("\\(")]
    assert displayed, f"{page}: no display equation (div.arithmatex with \\[ ... \\])"
    assert inline, f"{page}: no inline math (span.arithmatex with \\( ... \\))"
    scripts = [attrs.get("src", "") for tag, attrs in collector.tags if tag == "script"]
    styles = [attrs.get("href", "") for tag, attrs in collector.tags if tag == "link"]
    for needed, loaded in (
        ("katex.min.js", scripts),
        ("auto-render.min.js", scripts),
        ("katex-init.js", scripts),
    ):
        assert any(src.endswith(needed) for src in loaded), (
            f"{page} does not load {needed}"
        )
    assert any(href.endswith("katex.min.css") for href in styles), (
        f"{page} does not load katex.min.css"
    )


def test_reading_through_the_table_states_eq_4_as_math(pages):
    formulas = " ".join(pages["concepts/reading-through-the-table.html"].formulas)
    for piece in (
        "A_{ij}",
        "\\frac",
        "\\sqrt{d}",
        "\\lceil i/B \\rceil",
        "V_j A_{ij}^\\top",
    ):
        assert piece in formulas, f"Eq. 4 lacks {piece!r}"


def test_triton_decode_states_the_log_sum_exp_merge_as_math(pages):
    formulas = " ".join(pages["kernels/triton-decode.html"].formulas)
    for piece in (
        "\\mathit{lse}_c",
        "\\mathit{lse}_{\\max}",
        "\\log \\sum_{j \\in J_c}",
        "\\mathit{out}_c",
    ):
        assert piece in formulas, f"the merge lacks {piece!r}"


def test_every_formula_parses_with_the_sites_katex(site, pages):
    """A formula KaTeX cannot parse shows as red source text in the browser; catch it at build time."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js is not installed: KaTeX cannot be run outside a browser")
    formulas = []
    for page, collector in pages.items():
        for text in collector.formulas:
            text = text.strip()
            display = text.startswith("\\[")
            formulas.append({"page": page, "display": display, "tex": text[2:-2]})
    assert len(formulas) >= 10, f"only {len(formulas)} formulas in the site"
    script = """
const katex = require(process.argv[1]);
const formulas = JSON.parse(require("fs").readFileSync(0, "utf8"));
const errors = [];
for (const f of formulas) {
  try { katex.renderToString(f.tex, { displayMode: f.display, throwOnError: true }); }
  catch (e) { errors.push(`${f.page}: ${e.message}`); }
}
console.log(JSON.stringify(errors));
"""
    katex_js = site / KATEX_DIR / "katex.min.js"
    result = subprocess.run(
        [node, "-e", script, str(katex_js)],
        input=json.dumps(formulas),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


def test_no_page_loads_anything_from_the_network(pages):
    loads = []
    for page, collector in pages.items():
        for tag, attrs in collector.tags:
            if tag not in LOADING_TAGS:
                continue
            for name in LOADING_ATTRS & attrs.keys():
                for url in attrs[name].split(","):  # srcset lists several
                    if NETWORK.match(url):
                        loads.append(f"{page}: <{tag} {name}={url.strip()!r}>")
    assert loads == []


def test_no_inline_script_fetches_from_the_network(site):
    """nbconvert's template imports mermaid and MathJax from a CDN in inline scripts; the hooks strip them."""
    fetches = []
    for page in site.rglob("*.html"):
        for body in re.findall(
            r"<script\b[^>]*>(.*?)</script>", page.read_text(encoding="utf-8"), re.S
        ):
            if re.search(r"https?://", body):
                fetches.append(f"{page.relative_to(site)}: {body.strip()[:120]!r}")
    assert fetches == []


def test_no_stylesheet_fetches_from_the_network(site):
    """No CSS url() or @import reaches the network (fonts included): with `font: false` none should."""
    fetches = []
    sheets = {path: path.read_text(encoding="utf-8") for path in site.rglob("*.css")}
    # <style> elements (nbconvert inlines Jupyter's CSS)
    for page in site.rglob("*.html"):
        sheets[page] = " ".join(
            m["css"] for m in STYLE.finditer(page.read_text(encoding="utf-8"))
        )
    for path, css in sheets.items():
        for match in CSS_URL.finditer(css):
            if NETWORK.match(match["url"]):
                fetches.append(f"{path.relative_to(site)}: {match['url']}")
    assert fetches == []


def internal_targets(collector: TagCollector) -> list[str]:
    """The URLs a page points to inside the site: links and loaded assets, without fragment or query."""
    targets = []
    for tag, attrs in collector.tags:
        for name in ("href", "src"):
            url = attrs.get(name)
            if not url or tag not in LOADING_TAGS | {"a"}:
                continue
            parts = urlsplit(url)
            # http(s), mailto, data; or "#anchor"
            if parts.scheme or parts.netloc or not parts.path:
                continue
            targets.append(unquote(parts.path))
    return targets


def test_every_internal_link_resolves_to_a_file(site, pages):
    """From disk there is no server to turn `page/` into `page/index.html`: every link must name a file."""
    broken = []
    checked = 0
    for page, collector in pages.items():
        # a server shows it at any depth, so its links are site-absolute
        if page == "404.html":
            continue
        base = (site / page).parent
        for target in internal_targets(collector):
            checked += 1
            resolved = (
                (base / target).resolve()
                if not target.startswith("/")
                else Path(target)
            )
            if not resolved.is_file() or site.resolve() not in resolved.parents:
                broken.append(f"{page} -> {target}")
    assert checked > 10 * len(pages), (
        f"only {checked} internal links in {len(pages)} pages"
    )
    assert broken == []


def test_search_index_is_inlined_for_search_from_disk(site):
    script = (site / "search" / "search_index.js").read_text(encoding="utf-8")
    prefix = "var __index = "
    assert script.startswith(prefix)
    index = json.loads(script[len(prefix) :])
    locations = {doc["location"].split("#")[0] for doc in index["docs"]}
    for page in [*MATH_PAGES, *(f"tutorials/{t.stem}.html" for t in TUTORIALS)]:
        assert page in locations, f"{page} is not in the search index"


# the student copy's docs build does not execute the tutorials: they call the tasks' stubs
EXECUTED = re.search(r"^\s*execute: true\b", (ROOT / "mkdocs.yml").read_text(), re.M)


@pytest.mark.skipif(
    not EXECUTED, reason="mkdocs.yml does not execute the tutorials (a student copy)"
)
@pytest.mark.parametrize("tutorial", TUTORIALS, ids=lambda path: path.stem)
def test_tutorial_output_has_no_warning_error_or_stderr(site, tutorial):
    html = (site / "tutorials" / f"{tutorial.stem}.html").read_text(encoding="utf-8")
    stderr = [m["text"].strip()[:300] for m in STDERR_OUTPUT.finditer(html)]
    assert stderr == [], f"{tutorial.name} writes to stderr when executed"
    # Each cell's output area runs until the next cell begins.
    areas = [
        chunk.split('<div class="jp-Cell ')[0]
        for chunk in html.split("jp-OutputArea jp-Cell-outputArea")[1:]
    ]
    outputs = re.sub(r"<[^>]+>", " ", " ".join(areas))
    assert outputs.strip(), f"{tutorial.name} shows no output: was it executed?"
    for noise in (r"\w*Warning\b", r"Traceback \(most recent call last\)"):
        found = re.findall(noise, outputs)
        assert found == [], f"{tutorial.name}'s output has {found}"


@pytest.mark.parametrize("tutorial", TUTORIALS, ids=lambda path: path.stem)
def test_tutorial_page_links_its_notebook(site, pages, tutorial):
    page = pages[f"tutorials/{tutorial.stem}.html"]
    links = [attrs.get("href") for tag, attrs in page.tags if tag == "a"]
    assert f"{tutorial.stem}.ipynb" in links, (
        f"the page of {tutorial.name} does not link its .ipynb"
    )
    assert f"{tutorial.stem}.py" in links, (
        f"the page of {tutorial.name} does not link its .py"
    )
    assert (
        site / "tutorials" / f"{tutorial.stem}.py"
    ).read_text() == tutorial.read_text()

    notebook = nbformat.read(
        site / "tutorials" / f"{tutorial.stem}.ipynb", as_version=4
    )
    nbformat.validate(notebook)
    assert notebook.metadata["kernelspec"]["language"] == "python"
    expected = jupytext.read(tutorial)
    assert [(c.cell_type, c.source) for c in notebook.cells] == [
        (c.cell_type, c.source) for c in expected.cells
    ]
    assert any(c.cell_type == "code" for c in notebook.cells)


FIGURE_PAGES = [
    *(
        f"concepts/{name}.html"
        for name in (
            "pages-and-frames",
            "page-table",
            "frame-allocator",
            "demand-paging",
            "fork",
            "copy-on-write",
            "prefix-caching",
            "swapping",
        )
    ),
    "index.html",
    "kernels/triton-decode.html",
    "kernels/triton-prefill.html",
]


@pytest.mark.parametrize("page", FIGURE_PAGES)
def test_every_concept_page_and_the_home_page_show_a_figure_that_is_in_the_site(
    site, pages, page
):
    figures = [
        attrs["src"]
        for tag, attrs in pages[page].tags
        if tag == "img" and attrs.get("src", "").endswith(".svg")
    ]
    assert figures, f"{page} shows no figure"
    for src in figures:
        assert (site / page).parent.joinpath(src).resolve().is_file(), (
            f"{page}: {src} is not in the site"
        )
