"""report.html: one compare run as a single self-contained file to share.

Everything is inside the file: the figures as inline SVG (:func:`fastmmio.report.plots.figure_svg`),
the terminal tables as the terminal render (:func:`fastmmio.report.compare.render`, recorded by
rich and exported with inline styles), a few lines of CSS in a ``<style>`` element; no script,
no link, no image or font fetched from anywhere. Sections (each an ``id``): ``verdict`` (the
bottom line first, then the ``headline`` figure, then the reasons), ``tables``, ``breakdown``, ``calibration``, ``host``, ``profile`` (every price with
its basis, interval and source), ``command`` (the command line, time and version that made the
run, and the saved run it was re-rendered from).
"""

from __future__ import annotations

import io
import json
from html import escape
from typing import Any, Iterable, Sequence

from rich.console import Console

from fastmmio import __version__
from fastmmio.compare.run import CompareRun

SECTIONS = ("verdict", "headline", "tables", "breakdown", "calibration", "host", "profile",
            "command")

_CSS = """
body { font-family: sans-serif; max-width: 1200px; margin: 1em auto; padding: 0 1em;
       color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; border-bottom: 1px solid #ccc; }
table.data { border-collapse: collapse; font-size: 0.85em; }
table.data td, table.data th { border: 1px solid #ddd; padding: 2px 6px; text-align: left;
       vertical-align: top; }
table.data td.num { text-align: right; }
pre.term { font-size: 0.72em; line-height: 1.2; overflow-x: auto; background: #fff; }
figure svg { max-width: 100%; height: auto; }
ul.findings li { margin-bottom: 0.4em; }
code { background: #f4f4f4; padding: 0 3px; }
"""


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]],
           numeric: Sequence[int] = ()) -> str:
    out = ["<table class=\"data\"><thead><tr>"]
    out += [f"<th>{escape(h)}</th>" for h in headers]
    out.append("</tr></thead><tbody>")
    for r in rows:
        out.append("<tr>" + "".join(
            ('<td class="num">' if i in numeric else "<td>") + escape(_s(v)) + "</td>"
            for i, v in enumerate(r)) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _s(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.2f}".rstrip("0").rstrip(".") if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


def _section(key: str, title: str, body: str) -> str:
    return f'<section id="{key}"><h2>{escape(title)}</h2>\n{body}\n</section>\n'


def _terminal(run: CompareRun) -> str:
    """The terminal render, recorded and exported as HTML with inline styles."""
    from fastmmio.report.compare import render

    console = Console(record=True, width=200, file=io.StringIO(), color_system="truecolor",
                      force_terminal=True)
    render(console, run, verdict_text=False)
    return console.export_html(inline_styles=True,
                               code_format='<pre class="term"><code>{code}</code></pre>')


def _figure(svg: str | None, caption: str) -> str:
    if not svg:
        return "<p>(no figure: nothing to draw in this run)</p>"
    return f"<figure>{svg}<figcaption>{escape(caption)}</figcaption></figure>"


def report_html(run: CompareRun, *, headline_svg: str | None = None,
                breakdown_svg: str | None = None) -> str:
    """The whole report as one HTML document (see the module docstring)."""
    parts = []
    v = run.verdict
    # the answer first: the bottom line, then the headline figure, then the reasons
    if v is not None:
        bottom = [f for f in v.findings if f.topic == "bottom-line"]
        rest = [f for f in v.findings if f.topic != "bottom-line"]
        items = "".join(f"<li>{escape(f.text)}</li>" for f in rest)
        note = f"<p><em>{escape(v.review_note)}</em></p>" if v.review_note else ""
        parts.append(_section(
            "verdict", "Verdict: is MMIO as fast as port I/O?",
            "".join(f"<p><b>{escape(f.text)}</b></p>" for f in bottom)
            + _figure(headline_svg, "Each variant's doorbell as a multiple of the PIO "
                      "ioeventfd under the same machine setting; the shaded band is 'as "
                      "fast' (within the tolerance); error bars: 90% of sampled price sets, "
                      "when sampled.").replace("<figure>", '<figure id="headline">', 1)
            + f'<h3>Why</h3><ul class="findings">{items}</ul>{note}'))
    else:
        parts.append(_section("verdict", "Verdict", "<p>Not computed (--no-verdict).</p>"
                              + _figure(headline_svg, "")))
    parts.append(_section("tables", "Tables", _terminal(run)))
    parts.append(_section("breakdown", "Cycles per notification by component",
                          _figure(breakdown_svg, "Stacked cost-model components; routes that "
                                  "exit to userspace in their own panel.")))
    if run.calibration:
        cal = _table(("kvm-unit-tests", "route", "published", "simulated", "residual %",
                      "profile's fit %"),
                     ((r.kut, r.route, r.published, r.simulated, f"{r.percent:+.2f}",
                       None if r.recorded_percent is None else f"{r.recorded_percent:+.2f}")
                      for r in run.calibration), numeric=(2, 3, 4, 5))
    else:
        cal = "<p>The profile has no calibration against published figures.</p>"
    parts.append(_section("calibration", "Calibration", cal))
    k = run.kvm
    host = f"<p>Status: {escape(k.status)}{': ' + escape(k.reason) if k.reason else ''}</p>"
    if k.host is not None:
        host += _table(("field", "value"), k.host.to_json().items())
        host += f"<p>{escape(k.comparable())}</p>"
    parts.append(_section("host", "Host record (this host's KVM)", host))
    p = run.profile
    prices = [(f"{'nested:' if nested else ''}{key}", pr.cycles, pr.component, pr.basis,
               None if pr.interval is None else f"{pr.low:g} - {pr.high:g}", pr.source)
              for nested, table in ((False, p.prices),
                                    (True, p.nested.prices if p.nested else {}))
              for key, pr in table.items()]
    prof = (f"<p><b>{escape(p.name)}</b>: {escape(p.description)} (CPU: {escape(p.cpu)}; "
            f"read from {escape(p.origin)})</p>"
            + _table(("price", "cycles", "component", "basis", "interval", "source"), prices,
                     numeric=(1,))
            + (_table(("free event", "why"), ((f.key, f.reason) for f in p.free.values()))
               if p.free else ""))
    parts.append(_section("profile", "Cost profile: every price and its source", prof))
    cmd = (f"<p><code>{escape(' '.join(run.argv))}</code></p>"
           f"<p>fastmmio {escape(__version__)}, {escape(run.started_utc)} (UTC)</p>")
    if run.origin:
        cmd += ("<p>Re-rendered from a saved run: <code>"
                f"{escape(json.dumps(run.origin))}</code></p>")
    parts.append(_section("command", "How this report was made", cmd))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>fastmmio compare: {escape(p.name)}</title><style>{_CSS}</style></head>"
            "<body>\n<h1>fastmmio compare: is MMIO as fast as port I/O?</h1>\n"
            + "".join(parts) + "</body></html>\n")
