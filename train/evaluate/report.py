"""``report.html``: one self-contained page a person reads in a browser.

Summary numbers first, then the worst cases as image triplets (generation | nearest training
image | bright-ending heatmap), then every generation in a table sortable by any column. Images
are embedded as base64 PNGs and the sorting is a few lines of inline JavaScript, so the file can
be mailed or attached to an issue as it is.
"""

from __future__ import annotations

import base64
import html
import json
import math
import time
from pathlib import Path
from typing import Any

from train.evaluate.core import EvalResult, worst_first
from train.util import jsonable, write_atomic

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1200px;
     color:#1d232a;padding:0 16px;background:#fafbfc}
h1{font-size:24px;margin:0 0 4px} h2{font-size:18px;margin:28px 0 10px;border-bottom:1px solid #dde2e7;padding-bottom:4px}
.meta{color:#5b6673;font-size:13px;margin-bottom:16px;word-break:break-all}
.cards{display:flex;flex-wrap:wrap;gap:12px}
.card{background:#fff;border:1px solid #dde2e7;border-radius:8px;padding:12px 16px;min-width:150px}
.card .v{font-size:26px;font-weight:650} .card .k{font-size:12px;color:#5b6673;text-transform:uppercase;letter-spacing:.04em}
.card.alert .v{color:#b42318}
.note{font-size:13px;color:#5b6673;max-width:900px}
.cases{display:grid;grid-template-columns:repeat(auto-fill,minmax(520px,1fr));gap:14px}
.case{background:#fff;border:1px solid #dde2e7;border-radius:8px;padding:10px}
.case img{width:100%;image-rendering:pixelated;border-radius:4px}
.case .cap{font-size:13px;margin-top:6px} .tag{display:inline-block;padding:1px 7px;border-radius:10px;font-size:11px;
     font-weight:600;margin-right:6px} .tag.r{background:#fde3e1;color:#b42318} .tag.l{background:#fff1d6;color:#93560b}
.tag.n{background:#e6f4ea;color:#1e6b34} .tag.f{background:#e8e5fb;color:#4b3aa8}
table{border-collapse:collapse;width:100%;background:#fff;font-size:13px}
th,td{border:1px solid #dde2e7;padding:4px 8px;text-align:left} th{background:#eef1f4;cursor:pointer;user-select:none;position:sticky;top:0}
th:after{content:" \\2195";color:#98a2ad} td.num{text-align:right;font-variant-numeric:tabular-nums}
"""

# Click a header to sort by it; click again to reverse. Cells carry data-v for numeric sorting.
_JS = """
document.querySelectorAll('table.sortable th').forEach(function(th, col){
  th.addEventListener('click', function(){
    var body = th.closest('table').tBodies[0], rows = Array.from(body.rows);
    var dir = th.dataset.dir === 'asc' ? -1 : 1; th.dataset.dir = dir === 1 ? 'asc' : 'desc';
    rows.sort(function(a, b){
      var x = a.cells[col].dataset.v, y = b.cells[col].dataset.v;
      var nx = parseFloat(x), ny = parseFloat(y);
      if (!isNaN(nx) && !isNaN(ny)) return (nx - ny) * dir;
      return String(x).localeCompare(String(y)) * dir;
    });
    rows.forEach(function(r){ body.appendChild(r); });
  });
});
"""


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        if value != 0 and (abs(value) >= 1e4 or abs(value) < 1e-3):
            return f"{value:.2e}"
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def _pct(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}%"


def _card(label: str, value: str, alert: bool = False) -> str:
    return (f'<div class="card{" alert" if alert else ""}"><div class="v">{value}</div>'
            f'<div class="k">{html.escape(label)}</div></div>')


def _tags(record: dict) -> str:
    tags = []
    if record.get("replica"):
        tags.append('<span class="tag r">replica</span>')
    if record.get("local_replica"):
        tags.append('<span class="tag l">local replica</span>')
    if record.get("flagged"):
        tags.append('<span class="tag f">flagged</span>')
    if not tags:
        label = "not flagged" if "flag_z" in record else "no copy found"
        tags.append(f'<span class="tag n">{label}</span>')
    return "".join(tags)


EXPLAIN_FULL = ("A generation is a replica when its global similarity to the nearest training image passes the "
                "backend's threshold (pixel: Carlini et al.'s normalized L2 < 1.4; SSCD: cosine > 0.5). It is a "
                "local replica when, inside the bright-ending region (where the model attends to the end-of-text "
                "token at the last step), its normalized L2 to the nearest training image is below the local "
                "threshold while the whole image is not a replica. Magnitudes: ||eps(x_t,c) - eps(x_t,empty)||, "
                "plain and bright-ending-masked, averaged over steps.")
EXPLAIN_DETECT = ("Detect-only: no training images were compared. A generation is flagged when its "
                  "bright-ending-masked noise magnitude is a robust outlier (z > 3.5) among the audited prompts; "
                  "memorized prompts give large text-conditional magnitudes (Wen et al.) concentrated where the "
                  "end-of-text token is attended (Chen et al.). The verdict is relative to the prompts audited.")


def build_report(result: EvalResult, cfg, summary: dict, *, checkpoint: str, model: str, data: str | None,
                 resolution: int, threshold: float | None, truth: dict | None, detect_only: bool = False
                 ) -> tuple[dict, dict[int, bytes]]:
    """The report (what report.json holds) and its panels, worst cases first: one shape for the
    audit CLI and for the eval hook of a training run."""
    records = result.records
    if not detect_only:
        summary = {**summary, "replicas": sum(r["replica"] for r in records),
                   "local_replicas": sum(r["local_replica"] for r in records)}
    # panels were made for the worst cases by the judge's order; detect-only re-ranks by z
    panels = {job: result.panels[job] for job in worst_first(records) if job in result.panels}
    report = {
        "checkpoint": checkpoint, "model": model, "data": data, "mode": "detect-only" if detect_only else "full",
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "settings": {"steps": cfg.steps, "guidance_scale": cfg.guidance_scale, "seeds": list(cfg.seeds),
                     "resolution": resolution, "similarity": None if detect_only else cfg.similarity,
                     "replica_threshold": threshold, "region": cfg.region, "region_quantile": cfg.region_quantile,
                     "local_threshold": cfg.local_threshold, "be_layers": "default (highest-resolution cross-attention)"},
        "summary": summary, "ground_truth": truth,
        "explanation": EXPLAIN_DETECT if detect_only else EXPLAIN_FULL,
        "records": records,
    }
    return report, panels


def write_report(out: Path, report: dict, panels: dict[int, bytes]) -> Path:
    """``out/report.json`` and the self-contained ``out/report.html``; returns the HTML's path."""
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "report.json", json.dumps(jsonable(report), indent=1))
    return write_atomic(out / "report.html", render_report(report, panels).encode("utf-8"))


def render_report(report: dict, panels: dict[int, bytes]) -> str:
    """The HTML page for an audit ``report`` (as written to report.json) and its panels."""
    summary, records = report["summary"], report["records"]
    detect_only = report["mode"] == "detect-only"
    out = ['<!doctype html><html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width,initial-scale=1">',
           "<title>copyguard audit</title>", f"<style>{_CSS}</style></head><body>",
           "<h1>copyguard audit</h1>",
           f'<div class="meta">checkpoint: {html.escape(report["checkpoint"])}<br>data: '
           f'{html.escape(str(report.get("data") or "none (detect-only)"))}<br>mode: {report["mode"]} · '
           f'{report["settings"]["steps"]} DDIM steps · guidance {report["settings"]["guidance_scale"]} · '
           f'similarity: {html.escape(str(report["settings"].get("similarity") or "–"))} · '
           f'{html.escape(report["created"])}</div>']

    out.append('<h2 id="summary">Summary</h2><div class="cards">')
    out.append(_card("prompts", str(summary["num_prompts"])))
    out.append(_card("generations", str(summary["num_generations"])))
    if detect_only:
        out.append(_card("flagged generations", str(summary["flagged"]), summary["flagged"] > 0))
        out.append(_card("flagged rate", _pct(summary["flagged_rate"]), summary["flagged"] > 0))
    else:
        out.append(_card("replica rate", _pct(summary.get("replica_rate")), bool(summary.get("replicas"))))
        out.append(_card("replicas", str(summary.get("replicas", 0)), bool(summary.get("replicas"))))
        out.append(_card("local replica rate", _pct(summary.get("local_replica_rate")),
                         bool(summary.get("local_replicas"))))
        if summary.get("localization_iou") is not None:
            out.append(_card("region-map IoU / all-ones / clean-map IoU",
                             f'{_fmt(summary["localization_iou"], 2)} / {_fmt(summary["trivial_iou"], 2)} / '
                             f'{_fmt(summary.get("clean_map_iou"), 2)}'))
        if summary.get("kid") is not None:
            out.append(_card("KID vs training", _fmt(summary["kid"], 4)))
    out.append(_card("mean magnitude", _fmt(summary.get("magnitude"), 3)))
    out.append(_card("mean BE magnitude", _fmt(summary.get("be_magnitude"), 3)))
    out.append("</div>")
    truth = report.get("ground_truth")
    if truth:
        out.append('<div class="cards" style="margin-top:12px">')
        for name in ("replica", "local_replica"):
            pr = truth[name]
            label = name.replace("_", " ")
            out.append(_card(f"{label} precision (truth)", _fmt(pr["precision"], 2)))
            out.append(_card(f"{label} recall (truth, {pr['positives']} true)", _fmt(pr["recall"], 2)))
        out.append("</div>")
    out.append(f'<p class="note">{html.escape(report["explanation"])}</p>')

    out.append('<h2 id="worst">Worst cases</h2><div class="cases">')
    by_job = {r["job"]: r for r in records}
    heading = "generation | heatmap" if detect_only else "generation | nearest training image | heatmap"
    for job, png in panels.items():
        r = by_job[job]
        sim = r.get("similarity")
        score = (f' · {sim["score_name"]} {_fmt(sim["score"])} (nearest: {html.escape(str(sim["nearest_caption"]))})'
                 if sim else "")
        out.append(f'<div class="case"><img alt="{heading}" src="data:image/png;base64,'
                   f'{base64.b64encode(png).decode()}"><div class="cap">{_tags(r)}<b>{html.escape(r["prompt"])}</b>'
                   f' · seed {r["seed"]}{score} · BE magnitude {_fmt(r["be_magnitude"])}</div></div>')
    if not panels:
        out.append('<p class="note">no generations</p>')
    out.append(f'</div><p class="note">Each row: {heading} (bright-ending map of the last denoising step, '
               "bright = attention to the end-of-text token).</p>")

    columns = ["#", "prompt", "seed", "kind"]
    columns += ["verdict", "flag z"] if detect_only else ["verdict", "score", "nearest sample", "local nL2", "IoU"]
    columns += ["magnitude", "first step", "BE magnitude", "BE mean"]
    out.append('<h2 id="all">All generations</h2><table class="sortable"><thead><tr>')
    out.append("".join(f"<th>{html.escape(c)}</th>" for c in columns) + "</tr></thead><tbody>")
    for r in records:
        def cell(value, numeric=False, text=None):
            shown = text if text is not None else _fmt(value)
            sort = value if value is not None and not (isinstance(value, float) and math.isnan(value)) else ""
            sort = int(sort) if isinstance(sort, bool) else sort
            return f'<td{" class=num" if numeric else ""} data-v="{html.escape(str(sort))}">{shown}</td>'

        verdict = ("flagged" if r.get("flagged") else "–") if detect_only else (
            "replica" if r.get("replica") else "local replica" if r.get("local_replica") else "–")
        row = [cell(r["job"], True), cell(r["prompt"]), cell(r["seed"], True), cell(r["kind"]), cell(verdict)]
        if detect_only:
            row.append(cell(r.get("flag_z"), True))
        else:
            sim, local = r.get("similarity") or {}, r.get("local") or {}
            row += [cell(sim.get("score"), True), cell(sim.get("nearest_sample_id")), cell(local.get("nl2"), True),
                    cell(r.get("iou"), True)]
        row += [cell(r["magnitude"], True), cell(r["magnitude_first"], True), cell(r["be_magnitude"], True),
                cell(r["be_mean"], True)]
        out.append("<tr>" + "".join(row) + "</tr>")
    out.append(f"</tbody></table><script>{_JS}</script></body></html>")
    return "\n".join(out)
