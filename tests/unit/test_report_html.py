"""report.html (issue 13, point 6): one self-contained file (no script, link, or reference
outside itself) with the verdict, the headline figure, the tables, the calibration, the host
record, the profile with every price's source, and the command line; rendered headless by
Debian's chromium where it is installed."""

from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from fastmmio.compare.run import CompareOptions, run_compare
from fastmmio.report.compare import write_outputs
from fastmmio.report.html import SECTIONS

URL_ATTRS = {"src", "href", "xlink:href", "action", "data", "poster", "srcset", "background"}


class Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.ids: set[str] = set()
        self.external: list[str] = []
        self.text: list[str] = []
        self.style = ""
        self._in_style = False

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for k, v in attrs:
            if k == "id":
                self.ids.add(v)
            if k in URL_ATTRS and v and not v.startswith("#"):
                self.external.append(f"<{tag} {k}={v}>")
            if k == "style" and v and "url(" in v and "url(#" not in v:
                self.external.append(f"<{tag} style={v}>")
        self._in_style = tag == "style"

    def handle_endtag(self, tag):
        self._in_style = False

    def handle_data(self, data):
        self.text.append(data)
        if self._in_style:
            self.style += data


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, object]:
    run = run_compare(CompareOptions(routes=("pio-eventfd-len1", "mmio-eventfd-len0",
                                             "pio-user"), kvm=False, review=False))
    run.argv = ["fastmmio", "compare", "pio-eventfd-len1", "--no-kvm"]
    out = tmp_path_factory.mktemp("html")
    paths = write_outputs(run, out)
    assert out / "report.html" in paths
    return out / "report.html", run


def test_report_is_self_contained_and_has_every_section(report):
    path, run = report
    page = Page()
    page.feed(path.read_text())
    assert page.external == []
    assert not {"script", "link", "img", "iframe", "object", "embed"} & set(page.tags)
    assert "@import" not in page.style and "url(" not in page.style
    assert set(SECTIONS) <= page.ids and "headline" in page.ids
    assert page.tags.count("svg") == 2  # the headline figure and the breakdown, inline
    text = " ".join(" ".join(page.text).split())
    assert "fastmmio compare pio-eventfd-len1 --no-kvm" in text  # the command line
    assert run.verdict.findings[-1].text.split(":")[0] in text  # the bottom line
    for key, price in run.profile.prices.items():  # every price with its source
        assert key in text and " ".join(price.source.split()) in text
    if run.calibration:
        assert all(row.kut in text for row in run.calibration)
    else:
        assert "The profile has no calibration against published figures." in text
    assert "not measured (--no-kvm)" in text  # the terminal tables
    assert "Status: skipped" in text  # the host record


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed "
                    "(apt-get install chromium) to render report.html headless")
def test_chromium_renders_the_report(report, tmp_path):
    path, _ = report
    png = tmp_path / "shot.png"
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-extensions", "--window-size=1100,900", f"--screenshot={png}",
         f"--user-data-dir={tmp_path / 'profile'}",  # not one shared with another run
         path.resolve().as_uri()],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert png.exists(), proc.stderr[-2000:]
    from PIL import Image

    im = Image.open(png).convert("L")
    assert im.size == (1100, 900)
    # something is drawn: not a blank page (the figure and text darken many pixels)
    dark = sum(im.histogram()[:128])
    assert dark > 0.01 * im.size[0] * im.size[1]
