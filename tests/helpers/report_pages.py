"""A report page as its reader meets it: rendered by headless Chromium, and its HTML read back as tags, text,
sample rows and thumbnails."""

from __future__ import annotations

import re
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

from PIL import Image


def run_chromium(chromium: str, tmp_path: Path, url: str, *flags: str) -> str:
    profile = tmp_path / f"chromium-profile-{time.monotonic_ns()}"
    command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", *flags, url]  # fmt: skip
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def dump_dom(chromium: str, tmp_path: Path, page: Path) -> str:
    return run_chromium(chromium, tmp_path, page.as_uri(), "--dump-dom")


class Elements(HTMLParser):
    """Every start tag of a page with its attributes, and the text inside elements of a given class."""

    def __init__(self, html: str):
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, {k: v or "" for k, v in attrs}))

    def with_class(self, css: str) -> list[dict[str, str]]:
        return [attrs for _, attrs in self.tags if css in attrs.get("class", "").split()]

    def named(self, tag: str) -> list[dict[str, str]]:
        return [attrs for t, attrs in self.tags if t == tag]


def text(html: str) -> str:
    """What a reader sees of an HTML fragment: block tags as spaces, inline ones dropped, whitespace collapsed."""
    return " ".join(re.sub(r"<[^>]+>", "", re.sub(r"</?(?:tr|td|th|pre|div|h3|p)\b[^>]*>", " ", html)).split())


def sample_row(html: str, row_id: str, page: int | None = None) -> str:
    """The sample table's row of `row_id` (and `page`), as the page's HTML."""
    for row in html.split('<tr class="row">')[1:]:
        row = row.split("</tr>\n<tr class=\"row\">")[0]
        head = row.split("</td>")[0]
        if f"<code>{row_id}</code>" in head and (page is None or f"page {page}</span>" in head):
            return row
    raise AssertionError(f"no sample row {row_id!r} page {page}")


def thumbnail(page: Path, row_html: str) -> Image.Image:
    src = Elements(row_html).named("img")[0]["src"]
    return Image.open(page.parent / src).convert("RGB")


def near(pixel: tuple[int, ...], colour: tuple[int, int, int], tolerance: int = 60) -> bool:
    return sum(abs(a - b) for a, b in zip(pixel, colour)) <= tolerance
