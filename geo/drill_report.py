"""The drill's self-contained HTML report: one summary table, then per run a timeline
chart (inline SVG: acknowledgements per 100 ms for ledger writes and orders, market-data
deliveries, the leader key's vacancy, the fault and each tier's recovery), the measured
figures and the trace id of the first order acknowledged after the failover. No script,
no stylesheet or font from elsewhere: the file opens offline."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from geo.drill import extra_columns

W, H = 900, 260  # chart size in px
PAD_L, PAD_R, PAD_T, PAD_B = 50, 20, 16, 34
BIN_S = 0.1
TIER_COLOURS = {"ledger": "#1b7837", "matching": "#2166ac", "order-entry": "#762a83",
                "market-data": "#b35806"}


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _bins(times: list[float], lo: float, hi: float) -> list[int]:
    n = max(1, int((hi - lo) / BIN_S) + 1)
    out = [0] * n
    for t in times:
        i = int((t - lo) / BIN_S)
        if 0 <= i < n:
            out[i] += 1
    return out


def timeline_svg(run: dict[str, Any]) -> str:
    tl = run.get("timeline") or {}
    lo, hi = float(tl.get("from_s", -1.0)), float(tl.get("to_s", 1.0))
    hi = max(hi, lo + 0.5)
    pw, ph = W - PAD_L - PAD_R, H - PAD_T - PAD_B

    def x(t: float) -> float:
        return PAD_L + (t - lo) / (hi - lo) * pw

    series = [("ledger acks", tl.get("ledger_acks", []), "#1b7837"),
              ("order acks", tl.get("order_acks", []), "#762a83"),
              ("market-data deliveries", tl.get("md_deliveries", []), "#b35806")]
    binned = [(name, _bins(ts, lo, hi), colour) for name, ts, colour in series]
    top = max([1] + [max(b) for _, b, _ in binned if b])
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
             f'viewBox="0 0 {W} {H}" role="img" aria-label="drill timeline">',
             f'<rect x="{PAD_L}" y="{PAD_T}" width="{pw}" height="{ph}" fill="#fafafa" '
             'stroke="#ccc"/>']
    # Leader key vacant (no term observed): shaded.
    key = tl.get("leader_key", [])
    start = None
    for t, term in [*key, (hi, 0)]:
        if term is None and start is None:
            start = t
        elif term is not None and start is not None:
            width = max(1.0, x(t) - x(start))
            parts.append(f'<rect x="{x(start):.1f}" y="{PAD_T}" width="{width:.1f}" '
                         f'height="{ph}" fill="#fdd" opacity="0.7"><title>leader key vacant '
                         f'{start:.3f}s to {t:.3f}s</title></rect>')
            start = None
    for name, b, colour in binned:
        pts = " ".join(f"{x(lo + i * BIN_S):.1f},{PAD_T + ph - v / top * ph:.1f}"
                       for i, v in enumerate(b))
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" '
                     f'points="{pts}"><title>{_e(name)} per {BIN_S * 1000:.0f} ms</title>'
                     '</polyline>')
    marks: list[tuple[str, float, str]] = [("fault", 0.0, "#d7191c")]
    for k in ("lease_expiry_s", "new_term_s", "rto_s"):
        if run.get(k) is not None:
            marks.append((k.removesuffix("_s").replace("_", " "), float(run[k]), "#555"))
    for t in run.get("tiers", []):
        if t.get("recovered_s") is not None:
            marks.append((t["name"], float(t["recovered_s"]),
                          TIER_COLOURS.get(t["name"], "#333")))
    for name, t in (tl.get("markers") or {}).items():
        marks.append((name, float(t), "#999"))
    for i, (name, t, colour) in enumerate(marks):
        if not lo <= t <= hi:
            continue
        y = PAD_T + 10 + (i % 6) * 12
        parts.append(f'<line x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{PAD_T}" y2="{PAD_T + ph}" '
                     f'stroke="{colour}" stroke-dasharray="3,2"><title>{_e(name)} '
                     f'{t:.3f}s</title></line>')
        parts.append(f'<text x="{x(t) + 2:.1f}" y="{y}" font-size="10" fill="{colour}">'
                     f'{_e(name)} {t * 1000:.0f}ms</text>')
    # Axes.
    step = 0.5 if hi - lo <= 8 else 1.0 if hi - lo <= 20 else 5.0
    t = step * int(lo / step)
    while t <= hi:
        if t >= lo:
            parts.append(f'<line x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{PAD_T + ph}" '
                         f'y2="{PAD_T + ph + 4}" stroke="#333"/>'
                         f'<text x="{x(t):.1f}" y="{PAD_T + ph + 16}" font-size="10" '
                         f'text-anchor="middle">{t:g}s</text>')
        t += step
    parts.append(f'<text x="{PAD_L - 6}" y="{PAD_T + 8}" font-size="10" text-anchor="end">'
                 f'{top}</text><text x="{PAD_L - 6}" y="{PAD_T + ph}" font-size="10" '
                 f'text-anchor="end">0</text>')
    lx = PAD_L
    for name, _b, colour in binned:
        parts.append(f'<rect x="{lx}" y="{H - 12}" width="10" height="3" fill="{colour}"/>'
                     f'<text x="{lx + 14}" y="{H - 8}" font-size="10">{_e(name)} / 100 ms</text>')
        lx += 200
    parts.append(f'<rect x="{lx}" y="{H - 16}" width="10" height="8" fill="#fdd"/>'
                 f'<text x="{lx + 14}" y="{H - 8}" font-size="10">leader key vacant</text>')
    parts.append("</svg>")
    return "".join(parts)


def _ms(v: Any) -> str:
    return "-" if v is None else f"{float(v) * 1000:.0f} ms"


def render(scenario: str, seed: int, results: list[dict[str, Any]]) -> str:
    extra = extra_columns(results)  # region-loss's rejoin, switchover-leader-lost's key
    rows = []
    for r in results:
        rows.append("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in (
            r["scenario"], r["seed"], _ms(r.get("lease_expiry_s")), _ms(r.get("new_term_s")),
            _ms(r.get("rto_s")), r.get("acked_lost", "-"), r.get("duplicates", "-"),
            r.get("stale_writes_rejected", "-"), (r.get("in_doubt") or {}).get("total", "-"),
            r.get("hashes_agree", "-"), *(f(r.get(k)) for _, k, f in extra),
            "ok" if r.get("ok") else "FAILED " + r.get("error", ""))) + "</tr>")
    sections = []
    for r in results:
        tiers = "".join(f"<li>{_e(t['name'])}: {_ms(t['recovered_s'])}"
                        f"{' (went down)' if t.get('down') else ''}</li>"
                        for t in r.get("tiers", []))
        tid = (r.get("trace_ids") or {}).get("first_order_after_failover", "")
        detail = {k: v for k, v in r.items() if k not in ("timeline", "tiers", "engines")}
        sections.append(
            f"<section><h2>{_e(r['scenario'])}, seed {_e(r['seed'])}</h2>"
            f"<p>{_e(r.get('fault', ''))}</p>{timeline_svg(r) if 'timeline' in r else ''}"
            f"<h3>Tiers (recovery order)</h3><ol>{tiers}</ol>"
            f"<p>Trace id of the first order acknowledged after the failover: "
            f"<code>{_e(tid) or '(none: tracing disabled, orders carry no traceparent)'}"
            f"</code></p><h3>Engines</h3><pre>{_e(json.dumps(r.get('engines', {}), indent=1))}"
            f"</pre><details><summary>all figures</summary><pre>"
            f"{_e(json.dumps(detail, indent=1, default=str))}</pre></details></section>")
    return (
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>xdc drill {_e(scenario)}</title><style>body{{font-family:sans-serif;"
        "margin:1.5em;max-width:960px}}table{{border-collapse:collapse}}td,th{{border:1px "
        "solid #ccc;padding:2px 6px;font-size:13px}}pre{{font-size:11px;background:#f6f6f6;"
        "padding:6px;overflow:auto}}</style></head><body>"
        f"<h1>xdc drill {_e(scenario)} (seed {_e(seed)}, {len(results)} run(s))</h1>"
        "<table><tr><th>scenario</th><th>seed</th><th>lease expiry</th><th>new term</th>"
        "<th>RTO</th><th>acked lost</th><th>duplicates</th><th>stale writes rejected</th>"
        "<th>in doubt</th><th>hashes agree</th>"
        + "".join(f"<th>{_e(h)}</th>" for h, _, _ in extra) + "<th>result</th></tr>"
        + "".join(rows)
        + "</table>" + "".join(sections) + "</body></html>\n")


def write_html(path: str, scenario: str, seed: int, results: list[dict[str, Any]]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(render(scenario, seed, results))
