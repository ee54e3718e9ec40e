"""A job report people look at: one self-contained HTML page from a job summary (local or s3://).

The page holds: scans by status and error code, the seconds each stage took (``read_s``, ``segment_s``,
``passport_s``, ``write_s``), per-organ volume distributions and a table of the scans whose volumes are
worth a look. Plots are PNGs embedded as base64 ``data:`` URIs, so the page opens offline, from an e-mail
or from S3, with nothing else.

Which volumes are listed, and why (both rules are printed on the page):

* **Outside a broad adult reference range** (:data:`REFERENCE_ML`). The ranges are deliberately wide,
  approximate bounds for adult CT volumetry, meant to catch a segmentation gone wrong (a 12 ml liver, a
  2 litre spleen), not to diagnose anything; children, amputated or transplanted organs fall outside
  them rightly. A phantom or test scan is outside them too.
* **Outside this job's 1.5 IQR fences** (Tukey's fences, ``Q1 - 1.5 IQR`` .. ``Q3 + 1.5 IQR``) of that organ's
  volumes among the scans that succeeded, computed only when at least :data:`MIN_FOR_FENCES` scans have a
  volume for it: quartiles of a handful of scans are noise.

Only scan ids, statuses, error codes, timings and volumes appear: no error messages (they may quote input
paths), no input URIs.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import math
import sys
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

STAGES = ("read_s", "segment_s", "passport_s", "write_s")
ORGANS = ("liver", "spleen", "kidney_left", "kidney_right", "pancreas")

#: Broad adult reference ranges in ml (approximate, for flagging a scan to look at; not diagnostic).
REFERENCE_ML: dict[str, tuple[float, float]] = {
    "liver": (800.0, 2800.0),
    "spleen": (40.0, 600.0),
    "kidney_left": (70.0, 350.0),
    "kidney_right": (70.0, 350.0),
    "pancreas": (25.0, 160.0),
}
MIN_FOR_FENCES = 8
FAILED = ("failed", "rejected")


@dataclass(frozen=True)
class Outlier:
    scan_id: str
    organ: str
    volume_ml: float
    reasons: tuple[str, ...]


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    pos = (len(sorted_values) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def iqr_fences(values: list[float]) -> tuple[float, float] | None:
    """Tukey's 1.5 IQR fences, or ``None`` below :data:`MIN_FOR_FENCES` values."""
    if len(values) < MIN_FOR_FENCES:
        return None
    v = sorted(values)
    q1, q3 = _quantile(v, 0.25), _quantile(v, 0.75)
    return q1 - 1.5 * (q3 - q1), q3 + 1.5 * (q3 - q1)


def _volumes(rows: list[dict], organ: str) -> list[tuple[str, float]]:
    """(scan, ml) of the succeeded scans in which the organ was found. A volume of 0 means not found (out of the
    field of view, e.g. a chest CT's pancreas): counted apart by :func:`absent`, not judged as a volume."""
    col = f"{organ}_ml"
    return [
        (r["scan_id"], float(r[col]))
        for r in rows
        if r.get("status") == "ok" and r.get(col) is not None and float(r[col]) > 0
    ]


def absent(rows: list[dict], organ: str) -> int:
    """Succeeded scans in which the organ was not found (volume 0)."""
    col = f"{organ}_ml"
    return sum(1 for r in rows if r.get("status") == "ok" and r.get(col) is not None and float(r[col]) <= 0)


def outliers(rows: list[dict]) -> list[Outlier]:
    """The succeeded scans with an organ volume outside its reference range or the job's IQR fences."""
    found = []
    for organ in ORGANS:
        vols = _volumes(rows, organ)
        fences = iqr_fences([v for _, v in vols])
        lo_ref, hi_ref = REFERENCE_ML[organ]
        for scan_id, v in vols:
            reasons = []
            if v < lo_ref:
                reasons.append(f"below adult reference {lo_ref:g} ml")
            elif v > hi_ref:
                reasons.append(f"above adult reference {hi_ref:g} ml")
            if fences and v < fences[0]:
                reasons.append(f"below this job's lower IQR fence {fences[0]:.0f} ml")
            elif fences and v > fences[1]:
                reasons.append(f"above this job's upper IQR fence {fences[1]:.0f} ml")
            if reasons:
                found.append(Outlier(scan_id, organ, v, tuple(reasons)))
    return sorted(found, key=lambda o: (o.scan_id, ORGANS.index(o.organ)))


def status_counts(rows: list[dict]) -> Counter:
    """``(status, error_code or "")`` -> scans."""
    return Counter((r.get("status") or "?", r.get("error_code") or "") for r in rows)


# ------------------------------------------------------------------------------------------------ plots


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_status(rows: list[dict]) -> str:
    plt = _pyplot()
    counts = status_counts(rows)
    labels = [s if not c else f"{s}: {c}" for s, c in sorted(counts)]
    values = [counts[k] for k in sorted(counts)]
    colours = ["#2e7d32" if s == "ok" else "#c62828" if s in FAILED else "#9e9e9e" for s, _ in sorted(counts)]
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * max(len(labels), 1)))
    ax.barh(labels, values, color=colours)
    for i, v in enumerate(values):
        ax.text(v, i, f" {v}", va="center")
    ax.invert_yaxis()
    ax.set_xlabel("scans")
    ax.set_title("Scans by status and error code")
    return _png(fig)


def plot_stages(rows: list[dict]) -> str:
    plt = _pyplot()
    data = [[float(r[s]) for r in rows if r.get(s) is not None] for s in STAGES]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.boxplot([d or [float("nan")] for d in data], vert=False, tick_labels=list(STAGES), showfliers=True)
    for i, d in enumerate(data, start=1):  # every scan as a dot, so a handful of scans still shows
        ax.plot(d, [i] * len(d), "o", alpha=0.4, color="#1565c0", markersize=4)
    ax.invert_yaxis()
    ax.set_xlabel("seconds per scan")
    ax.set_title("Seconds per stage")
    return _png(fig)


def plot_organs(rows: list[dict]) -> str:
    plt = _pyplot()
    fig, axes = plt.subplots(len(ORGANS), 1, figsize=(7, 1.3 * len(ORGANS) + 0.6))
    for ax, organ in zip(axes, ORGANS):
        vals = [v for _, v in _volumes(rows, organ)]
        lo, hi = REFERENCE_ML[organ]
        ax.axvspan(lo, hi, color="#a5d6a7", alpha=0.5, label="adult reference range")
        fences = iqr_fences(vals)
        if fences:
            for f in fences:
                ax.axvline(f, color="#ef6c00", linestyle="--", linewidth=1)
        inside = [v for v in vals if lo <= v <= hi]
        outside = [v for v in vals if not lo <= v <= hi]
        # A fixed, deterministic jitter, so scans with close volumes stay visible as separate dots.
        jitter = [((i * 0.618) % 1 - 0.5) * 0.6 for i in range(len(vals))]
        ax.plot(inside, jitter[: len(inside)], "o", color="#1565c0", alpha=0.6)
        ax.plot(outside, jitter[len(inside) :], "o", color="#c62828", alpha=0.9)
        ax.set_ylim(-0.5, 0.5)
        ax.set_yticks([])
        ax.set_ylabel(organ, rotation=0, ha="right", va="center")
        ax.set_xlim(left=0, right=max([hi * 1.15, *(v * 1.1 for v in vals)]))
        ax.tick_params(axis="x", labelsize=8)
    axes[-1].set_xlabel("volume (ml)")
    axes[0].set_title(
        "Organ volumes of the scans that succeeded (green: adult reference, red: outside it, dashed: IQR fences)",
        fontsize=9,
    )
    fig.tight_layout()
    return _png(fig)


# ------------------------------------------------------------------------------------------------- html


def _stage_table(rows: list[dict]) -> str:
    out = ["<table><tr><th>stage</th><th>scans</th><th>median s</th><th>p90 s</th><th>max s</th><th>sum s</th></tr>"]
    for s in (*STAGES, "total_s"):
        v = sorted(float(r[s]) for r in rows if r.get(s) is not None)
        if not v:
            out.append(f"<tr><td>{s}</td><td>0</td><td colspan=4>-</td></tr>")
            continue
        out.append(
            f"<tr><td>{s}</td><td>{len(v)}</td><td>{_quantile(v, 0.5):.2f}</td><td>{_quantile(v, 0.9):.2f}"
            f"</td><td>{v[-1]:.2f}</td><td>{sum(v):.1f}</td></tr>"
        )
    return "".join(out) + "</table>"


def _table_rows(rows: list[dict], counts: dict, found: list) -> tuple[str, str, str]:
    """The HTML rows of the status table, of the scans that did not succeed and of the volumes worth a look."""
    esc = html.escape
    status_rows = "".join(
        f"<tr><td>{esc(s)}</td><td>{esc(c) or '-'}</td><td>{n}</td></tr>" for (s, c), n in sorted(counts.items())
    )
    failed_rows = "".join(
        f"<tr><td>{esc(r['scan_id'])}</td><td>{esc(r.get('status') or '')}</td>"
        f"<td>{esc(r.get('error_code') or '')}</td></tr>"
        for r in sorted(rows, key=lambda r: r["scan_id"])
        if r.get("status") != "ok"
    )
    outlier_rows = "".join(
        f"<tr class=outlier><td>{esc(o.scan_id)}</td><td>{esc(o.organ)}</td>"
        f"<td>{o.volume_ml:.1f}</td><td>{esc('; '.join(o.reasons))}</td></tr>"
        for o in found
    )
    return status_rows, failed_rows, outlier_rows


def render_html(rows: list[dict], *, source: str = "") -> str:
    """The whole page as one string."""
    esc = html.escape
    jobs = sorted({r.get("job_id") or "?" for r in rows})
    counts = status_counts(rows)
    ok = sum(n for (s, _), n in counts.items() if s == "ok")
    failed = sum(n for (s, _), n in counts.items() if s in FAILED)
    found = outliers(rows)
    status_rows, failed_rows, outlier_rows = _table_rows(rows, counts, found)
    missing = ", ".join(f"{o} in {n}" for o in ORGANS if (n := absent(rows, o)))
    ranges = ", ".join(f"{o} {lo:g}-{hi:g} ml" for o, (lo, hi) in REFERENCE_ML.items())
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Job report: {esc(", ".join(jobs))}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:1em auto;padding:0 1em}}
table{{border-collapse:collapse;margin:.5em 0}}td,th{{border:1px solid #ccc;padding:.2em .6em;text-align:left}}
.big{{font-size:1.4em}}.bad{{color:#c62828}}img{{max-width:100%}}</style></head><body>
<h1>Job report: {esc(", ".join(jobs))}</h1>
<p>From <code>{esc(source)}</code>, generated {generated}.</p>
<p class=big>{len(rows)} scans: {ok} ok, <span class={"bad" if failed else ""}>{failed} failed</span>;
{len({o.scan_id for o in found})} scan{"s" if len({o.scan_id for o in found}) != 1 else ""} with a volume worth a
look ({len(found)} organ volume{"s" if len(found) != 1 else ""}).</p>
<h2 id=status>Scans by status and error code</h2>
<img alt="scans by status and error code" src="data:image/png;base64,{plot_status(rows)}">
<table><tr><th>status</th><th>error code</th><th>scans</th></tr>{status_rows}</table>
{
        "<h3>Scans that did not succeed</h3><table><tr><th>scan</th><th>status</th><th>error code</th></tr>"
        f"{failed_rows}</table>"
        if failed_rows
        else ""
    }
<h2 id=stages>Seconds per stage</h2>
<img alt="seconds per stage" src="data:image/png;base64,{plot_stages(rows)}">
{_stage_table(rows)}
<h2 id=volumes>Organ volumes</h2>
<img alt="organ volumes" src="data:image/png;base64,{plot_organs(rows)}">
<h3 id=outliers>Volumes worth a look</h3>
<p>Listed: a succeeded scan whose organ volume is outside a broad adult reference range ({esc(ranges)};
approximate, to catch a segmentation gone wrong, not diagnostic) or outside this job's 1.5 IQR fences
(computed when at least {MIN_FOR_FENCES} scans have that organ). An organ not found (0 ml: outside the field
of view, or missed) is not judged as a volume; not found: {esc(missing) or "none"}.</p>
{
        f"<table><tr><th>scan</th><th>organ</th><th>ml</th><th>why</th></tr>{outlier_rows}</table>"
        if found
        else "<p>None.</p>"
    }
</body></html>
"""


def write_report(summary_uri: str, out_dir: str | Path) -> Path:
    """Read the summary, write ``OUT_DIR/report.html``; returns its path."""
    from ray_app.storage.sinks import read_summary

    rows = read_summary(summary_uri)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.html"
    path.write_text(render_html(rows, source=summary_uri), encoding="utf-8")
    return path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--summary", required=True, help="a job's summary.parquet (local or s3://)")
    p.add_argument("--out", default=".", help="folder for report.html (default: here)")


def run(args: argparse.Namespace) -> int:
    from ray_app.core.errors import RayAppError

    try:
        path = write_report(args.summary, args.out)
    except (RayAppError, OSError, ValueError) as exc:
        print(f"error: cannot write the report from {args.summary}: {exc}", file=sys.stderr)
        return 2
    print(f"report: {path}")
    return 0
