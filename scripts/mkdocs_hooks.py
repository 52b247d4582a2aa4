"""mkdocs hooks: the tutorial pages work offline, from disk, and offer their notebook for download.

The docs are meant to be read anywhere, a laptop on a plane included: `site/index.html` opened from
disk must show everything without a network. mkdocs.yml does most of it (mkdocs-material's offline
plugin, no web fonts, KaTeX served from the site); these hooks do what is left on the pages that
mkdocs-jupyter renders from `tutorials/*.py`:

- keep a third-party warning out of the executed tutorials' output: transformers and huggingface_hub
  import `tqdm.auto`, which warns "IProgress not found" in any kernel without ipywidgets (installing
  ipywidgets instead would turn progress bars into widgets that need JavaScript from a CDN);
- strip the scripts that nbconvert's template puts in every notebook page and that would reach the
  network: MathJax 2 (mkdocs-jupyter leaves its URL empty, a `<script src="">`, plus its config;
  the docs typeset math with KaTeX instead) and a module script that imports mermaid from a CDN
  when a page has a mermaid diagram (the tutorials have none);
- point the tutorials' links at the pages' files: mkdocs does not process a notebook's markdown, so a
  link written for directory URLs (`../../concepts/page-table/`, seen from `tutorials/NAME/`) or to a
  source file (`../concepts/page-table.md`, seen from `docs/tutorials/`) is rewritten to the target
  page's URL in this build (`../concepts/page-table.html` from disk), and one that names no page is a
  warning, which fails the strict build;
- write each tutorial as a Jupyter notebook (`.ipynb`, converted from the percent-format `.py` by
  jupytext, without outputs) beside its page, and link both from the top of the page.

mkdocs.yml loads this file through its `hooks:` list; each `on_*` function below is an mkdocs event.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
from pathlib import Path

import jupytext
from mkdocs.utils import get_relative_url

log = logging.getLogger("mkdocs.hooks.minipaged")

# A warnings filter for PYTHONWARNINGS, which the tutorials' kernels inherit from the build: ignore
# warnings whose message starts with this text (tqdm.auto's TqdmWarning), and nothing else.
TQDM_WIDGETS_FILTER = "ignore:IProgress not found"
# One <script ...>...</script> element: its attributes, then its body.
SCRIPT = re.compile(r"<script\b(?P<attrs>[^>]*)>(?P<body>.*?)</script>", re.DOTALL)
URL = re.compile(r"https?://")
# The href of a link: the path, then an optional #fragment.
HREF = re.compile(r'(?P<open><a\b[^>]*?\bhref=")(?P<path>[^"#]*)(?P<fragment>#[^"]*)?"')
FIRST_H1_END = re.compile(r"</h1>")


def is_notebook_page(page) -> bool:
    """Whether mkdocs-jupyter renders `page` (a tutorial, `tutorials/*.py`)."""
    return page.file.src_uri.endswith((".py", ".ipynb"))


def directory_url(src_uri: str) -> str:
    """The URL a source file's page has with directory URLs: `concepts/fork.md` -> `concepts/fork/`."""
    stem = posixpath.splitext(src_uri)[0]
    if posixpath.basename(stem) in ("index", "README"):
        stem = posixpath.dirname(stem)
    return f"{stem}/" if stem else ""


def on_config(config):
    """Add the tqdm filter to PYTHONWARNINGS before mkdocs-jupyter starts the tutorials' kernels."""
    filters = [f for f in os.environ.get("PYTHONWARNINGS", "").split(",") if f]
    if TQDM_WIDGETS_FILTER not in filters:
        os.environ["PYTHONWARNINGS"] = ",".join([*filters, TQDM_WIDGETS_FILTER])
    return config


def loads_from_network(script: re.Match) -> bool:
    """Whether a notebook page's <script> element would fetch something (or is MathJax's config)."""
    attrs, body = script["attrs"], script["body"]
    return (
        'src=""' in attrs
        or "x-mathjax-config" in attrs
        or bool(URL.search(attrs + body))
    )


def relink(link: re.Match, page, pages_by_url: dict) -> str:
    """Rewrite one link of a notebook page to its target page's URL in this build."""
    path = link["path"]
    if (
        not path
        or ":" in path
        or path.startswith("/")
        or not (path.endswith("/") or path.endswith(".md"))
    ):
        # an anchor, an outbound URL, an absolute path or a file: left as written
        return link[0]
    # a source file, relative to the notebook's own source file
    if path.endswith(".md"):
        target = directory_url(
            posixpath.normpath(
                posixpath.join(posixpath.dirname(page.file.src_uri), path)
            )
        )
    else:  # a directory URL, relative to the page's directory URL
        target = posixpath.normpath(
            posixpath.join(directory_url(page.file.src_uri), path)
        )
        target = "" if target == "." else f"{target}/"
    if target not in pages_by_url:
        log.warning(
            "%s links %r, which names no page of the docs", page.file.src_uri, path
        )
        return link[0]
    return f'{link["open"]}{get_relative_url(pages_by_url[target].url, page.url)}{link["fragment"] or ""}"'


def download_note(stem: str) -> str:
    """The HTML note that links a tutorial's notebook and script, both beside its page."""
    return (
        '<div class="admonition tip notebook-download"><p class="admonition-title">Run it yourself</p>'
        f'<p>Download this tutorial as a Jupyter notebook, <a href="{stem}.ipynb" download>{stem}.ipynb</a>, '
        f'or as the percent-format script it is written in, <a href="{stem}.py" download>{stem}.py</a> '
        "(<code>jupytext</code> converts one to the other). It needs <code>minipaged</code> installed: "
        "<code>pip install -e .</code> in a checkout.</p></div>"
    )


def on_page_content(html: str, page, config, files) -> str:
    """On a notebook page: strip the network scripts, fix the links, add the download note."""
    if not is_notebook_page(page):
        return html
    html = SCRIPT.sub(
        lambda script: "" if loads_from_network(script) else script[0], html
    )
    pages_by_url = {directory_url(f.src_uri): f for f in files.documentation_pages()}
    html = HREF.sub(lambda link: relink(link, page, pages_by_url), html)
    note = download_note(Path(page.file.src_uri).stem)
    heading = FIRST_H1_END.search(html)
    if heading is None:
        return note + html
    return html[: heading.end()] + note + html[heading.end() :]


def on_post_page(output: str, page, config) -> str:
    """Write a tutorial's `.ipynb` beside its page (the `.py` is copied by mkdocs-jupyter itself)."""
    if is_notebook_page(page):
        notebook = jupytext.read(page.file.abs_src_path)
        notebook.metadata.setdefault(
            "kernelspec",
            {"name": "python3", "display_name": "Python 3", "language": "python"},
        )
        target = Path(page.file.abs_dest_path).with_suffix(".ipynb")
        target.parent.mkdir(parents=True, exist_ok=True)
        jupytext.write(notebook, target, fmt="ipynb")
    return output
