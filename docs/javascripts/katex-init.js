// Typeset the docs' math with the KaTeX copy in vendor/katex (see vendor/SOURCES.txt): no CDN.
// pymdownx.arithmatex (generic mode) leaves each formula as \( ... \) in a span.arithmatex, or as
// \[ ... \] in a div.arithmatex; only those elements are rendered, so a "$" in prose stays a dollar.
// document$ is mkdocs-material's page observable: it fires on the first load and after every
// instant navigation.
document$.subscribe(({ body }) => {
  for (const element of body.querySelectorAll(".arithmatex")) {
    renderMathInElement(element, {
      delimiters: [
        { left: "\\(", right: "\\)", display: false },
        { left: "\\[", right: "\\]", display: true },
      ],
      throwOnError: false,
    });
  }
});
