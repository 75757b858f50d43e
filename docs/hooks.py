"""MkDocs hook: keep the notebook pages self-contained.

mkdocs-jupyter's page template loads MathJax (an empty ``<script src="">`` unless a URL is
given) and, where a notebook has diagrams, Mermaid from a CDN. The notebooks have no LaTeX and
no diagrams, and the site loads nothing from elsewhere, so both loaders are removed.
"""

from __future__ import annotations

import re

_MATHJAX = re.compile(r"<!-- Load mathjax -->.*?<!-- End of mathjax configuration -->", re.DOTALL)
_MERMAID = re.compile(r'<script type="module">(?:(?!</script>).)*?mermaid.*?</script>', re.DOTALL)


def on_post_page(output: str, page, config) -> str:
  if not page.file.src_uri.endswith(".ipynb"):
    return output
  return _MERMAID.sub("", _MATHJAX.sub("", output))
