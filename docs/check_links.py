"""Checks a built site: every internal link and anchor resolves, and nothing loads from elsewhere.

  python docs/check_links.py site        # after `mkdocs build --strict`

Every ``.html`` page under the site folder is parsed. Each ``href`` and ``src`` that stays on the
site (no scheme, not protocol-relative) must name a file that exists, and its ``#fragment`` an
``id`` (or ``name``) in that file. A script, stylesheet, image or frame loaded from another host
is an error too: the site is meant to work offline. Links to other sites are not fetched.
Prints each problem as ``page: link (why)``; exits with status 1 if there is any.
"""

from __future__ import annotations

import html.parser
import pathlib
import sys
import urllib.parse

# What a browser fetches with the page, rather than on a click.
LOADED_TAGS = ("script", "img", "iframe", "source", "audio", "video", "embed")
LOADED_RELS = {"stylesheet", "preconnect", "preload", "modulepreload", "icon", "dns-prefetch"}


class Page(html.parser.HTMLParser):
  """The anchors a page defines and the links it makes, as ``(value, loaded with the page)``."""

  def __init__(self) -> None:
    super().__init__()
    self.anchors: set[str] = set()
    self.links: list[tuple[str, bool]] = []

  def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
    named = {name: value for name, value in attrs if value is not None}
    if "id" in named:
      self.anchors.add(named["id"])
    if tag == "a" and "name" in named:
      self.anchors.add(named["name"])
    loaded = tag in LOADED_TAGS or (
      tag == "link" and bool(LOADED_RELS & set(named.get("rel", "").split()))
    )
    for attribute in ("href", "src"):
      if attribute in named:
        self.links.append((named[attribute], loaded))


def parse(path: pathlib.Path) -> Page:
  page = Page()
  page.feed(path.read_text(encoding="utf-8"))
  return page


def problems(site: pathlib.Path) -> list[str]:
  """Every broken internal link or anchor, and every resource loaded from another host."""
  pages = {path.resolve(): parse(path) for path in sorted(site.rglob("*.html"))}
  found = []
  for path, page in pages.items():
    where = path.relative_to(site.resolve())
    for value, loaded in page.links:
      url = urllib.parse.urlsplit(value)
      if url.scheme in ("mailto", "data", "javascript"):
        continue
      if url.scheme or value.startswith("//"):
        if loaded:
          found.append(f"{where}: {value} (loaded from another host)")
        continue
      base = site.resolve() if url.path.startswith("/") else path.parent
      relative = urllib.parse.unquote(url.path).lstrip("/")
      target = (base / relative).resolve() if url.path else path
      if target.is_dir():
        target = target / "index.html"
      if not target.exists():
        found.append(f"{where}: {value} (no such file)")
        continue
      if url.fragment and target.suffix == ".html":
        anchors = pages[target].anchors if target in pages else parse(target).anchors
        if urllib.parse.unquote(url.fragment) not in anchors:
          found.append(f"{where}: {value} (no anchor #{url.fragment} in {target.name})")
  return found


def main(argv: list[str]) -> int:
  site = pathlib.Path(argv[0] if argv else "site")
  if not (site / "index.html").is_file():
    print(f"check_links: {site} holds no index.html; build the site first", file=sys.stderr)
    return 1
  found = problems(site)
  for problem in found:
    print(problem)
  pages = sum(1 for _ in site.rglob("*.html"))
  print(f"check_links: {pages} pages, {len(found)} problems", file=sys.stderr)
  return 1 if found else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
