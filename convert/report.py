"""`convert-dataset report`: one self-contained HTML page showing a converted (or partial) dataset.

    html = render_report(uri, storage_options, samples_per_label=8)
    path = write_report(uri, html_target=None, storage_options={})   # -> where it was written

The page needs no network: CSS and JS are inline, thumbnails are PNG data: URIs of the pixels read
back from the shards (lossless, so what you see is what training gets), charts are matplotlib SVGs
(Agg, no display; `convert.report_charts`) as data: URIs, and a Content-Security-Policy meta tag
forbids every other source. Captions and every other stored text go through Jinja2's autoescape
(and `textContent` in the viewer): a caption is shown, never parsed. Gathering lives in
`convert.report_data`; this module only renders.
"""

from __future__ import annotations

import base64
import calendar
import io
import json
import time
from collections import Counter
from typing import Any

import numpy as np

from .ledger import LedgerRow, RunView, load_run
from .redact import redact_options, redact_text, redact_url
from .report_charts import column_chart, run_charts
from .report_data import (
    CAPTION,
    CAPTION_FULL,
    MAX_LABELS,
    ColumnStats,
    SampleView,
    Scan,
    caption_preview,
    column_stats,
    read_samples,
    scan_ledger,
    stored_columns,
)
from .store import is_local, open_object, open_store

MAX_COLUMN_CHARTS = 32  # columns drawn (every column is listed in the table)
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
FAILURE_CAP = 1000
MAX_SIDE = 512  # embedded sample images larger than this (unresized sources) are downscaled
REPORT_NAME = "report.html"


def render_report(
    uri: str, storage_options: dict[str, Any] | None = None, samples_per_label: int = 8, failure_cap: int = FAILURE_CAP
) -> str:
    """The report page of the dataset at `uri` (complete or partial) as an HTML string."""
    return _render(uri, storage_options, samples_per_label, failure_cap)[0]


def _render(
    uri: str, storage_options: dict[str, Any] | None, samples_per_label: int, failure_cap: int
) -> tuple[str, str]:
    _require_extras()
    out = open_store(uri, dict(storage_options or {}))
    run = load_run(out)
    scan = scan_ledger(run, samples_per_label, failure_cap)
    samples = read_samples(run, scan)
    names = _label_names(run, scan)
    columns = stored_columns(run)
    stats = column_stats(run, columns)
    html = _template().render(
        csp=CSP,
        title=f"convert report: {redact_url(out.url(''))}",
        summary=_summary(run, scan, names),
        config=_config_text(run.config),
        groups=[_group(names, label, views) for label, views in samples.items()],
        captions=stats is not None and any(c.name == CAPTION for c in columns),  # values readable
        samples_per_label=samples_per_label,
        labels_total=len(run.label_names) if run.label_names else None,
        labels_capped=len(samples) >= MAX_LABELS,
        failures=[_failure(row) for row in scan.failures],
        failed_total=scan.failed_total,
        failure_statuses=sorted({row.item.status.value for row in scan.failures}),
        failed_shards=run.failed_shards,
        shards=[_shard_row(s) for s in run.shards],
        charts=run_charts(run, scan),
        columns=[{"name": c.name, "type": c.type} for c in columns],
        column_stats=None if stats is None else [_column_row(s, i < MAX_COLUMN_CHARTS) for i, s in enumerate(stats)],
        column_charts_capped=len(columns) > MAX_COLUMN_CHARTS,
        source_unknown=scan.sources.unknown,
        source_known=scan.sources.known,
        generated=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    )
    return html, run.state()


def default_target(uri: str) -> tuple[str, bool]:
    """(where the report goes by default, whether that is inside the dataset root).

    A local dataset gets `<root>/report.html`; for a remote one the page is written to the current
    directory as `<dataset name>-report.html` (pass --html s3://... to store it beside the data).
    """
    out = open_store(uri)
    local = out.local_path(REPORT_NAME)
    if local is not None:
        return local, True
    name = out.url().rstrip("/").rsplit("/", 1)[-1] or "dataset"
    return f"{name}-report.html", False


def write_report(
    uri: str, html_target: str | None = None, storage_options: dict[str, Any] | None = None, samples_per_label: int = 8
) -> tuple[str, str]:
    """Render and write the report; returns (its path or URL, the run's state line). An fsspec URL
    target gets the dataset's storage options (so `--html s3://bucket/ds/report.html` works like the data)."""
    html, state = _render(uri, storage_options, samples_per_label, FAILURE_CAP)
    target = html_target or default_target(uri)[0]
    if not is_local(target):
        store, rel = open_object(target, storage_options, "report")
        store.write_bytes(rel, html.encode())
        return target, state
    with open(target, "w", encoding="utf-8") as f:
        f.write(html)
    return target, state


def _require_extras() -> None:
    """Jinja2 and matplotlib are an extra: say how to install them instead of a bare ImportError."""
    try:
        import jinja2  # noqa: F401
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"convert-dataset report needs {exc.name}: pip install 'convert[report]'") from None


# -- data for the template ------------------------------------------------------------------------
def _summary(run: RunView, scan: Scan, names: dict[int, str]) -> dict[str, Any]:
    totals = run.totals
    started = [s["started"] for s in run.shards if s.get("started")]
    finished = [s["finished"] for s in run.shards if s.get("finished")]
    span = max(finished) - min(started) if started and finished else 0.0
    shapes = Counter("x".join(map(str, s["image_shape"])) if s["image_shape"] else "variable" for s in run.shards)
    encodings = Counter(s["encoding"] for s in run.shards)
    return {
        "uri": redact_url(run.out.url("")),
        "state": run.state(),
        "partial": run.partial,
        "format": run.format,
        "items": totals["items"],
        "ok": totals["ok"],
        "failed": totals["failed"],
        "by_status": {k: v for k, v in sorted(scan.by_status.items(), key=lambda kv: -kv[1]) if k != "ok"},
        "shards": len(run.shards),
        "planned": run.planned,
        "bytes": _human_bytes(totals["bytes"]),
        "shape": ", ".join(shapes),
        "encoding": ", ".join(encodings),
        "labels": [names[k] for k in sorted(names)],
        "labels_inferred": bool(names) and not run.label_names,
        "start": _when(min(started)) if started else "not recorded",
        "end": _when(max(finished)) if finished else _created(run.manifest),
        "rate": f"{sum(s['ok'] for s in run.shards) / span:,.1f} images/s over {span:,.1f} s"
        if span > 0
        else "not recorded (shards carry no start/end times)",
    }


def _config_text(config: dict[str, Any] | None) -> str | None:
    """The recorded config as YAML, redacted again by the one rule (convert.redact): the manifest's
    copy already is, this guards older or hand-edited manifests."""
    import yaml

    return None if config is None else yaml.safe_dump(redact_options(config), sort_keys=False, default_flow_style=None)


def _label_names(run: RunView, scan: Scan) -> dict[int, str]:
    """The manifest's label names; for a partial run, names inferred from ImageFolder-style keys."""
    if run.label_names:
        return dict(enumerate(run.label_names))
    return scan.label_names_from_keys()


def _label_name(names: dict[int, str], label: int | None) -> str:
    if label is None:
        return "unlabelled"
    return names.get(label, f"label {label}")


def _group(names: dict[int, str], label: int | None, views: list[SampleView]) -> dict[str, Any]:
    return {"label": label, "name": _label_name(names, label), "samples": [_sample(names, v) for v in views]}


def _sample(names: dict[int, str], view: SampleView) -> dict[str, Any]:
    h, w, c = view.image.shape
    shape = f"{h}x{w}x{c}" + (f" (shown at most {MAX_SIDE} px a side)" if max(h, w) > MAX_SIDE else "")
    return {
        "key": view.key,
        "label": view.label,
        "name": _label_name(names, view.label),
        "uri": redact_url(view.uri),
        "shard": view.shard,
        "index": view.index,
        "shape": shape,
        "src": png_data_uri(view.image),
        "caption": None if view.caption is None else caption_preview(view.caption),
        "caption_full": None if view.caption is None else caption_preview(view.caption, CAPTION_FULL, flat=False),
    }


def _column_row(stats: ColumnStats, chart: bool) -> dict[str, Any]:
    """One line of the column table: counts, nulls, a type-specific summary, and its chart."""
    if stats.type == "string":
        lengths = sorted(stats.lengths)
        detail = (f"length {lengths[0]:,}..{lengths[-1]:,} characters" if lengths else "no non-empty value") + (
            f", {stats.empty:,} empty" if stats.empty else ""
        )
    elif stats.type == "bool":
        detail = f"{stats.true:,} true, {stats.values - stats.true:,} false"
    elif stats.finite:
        detail = f"min {stats.low:.6g}, max {stats.high:.6g}, mean {stats.mean:.6g}"
        detail += f" ({stats.values - stats.finite:,} NaN/inf)" if stats.values > stats.finite else ""
    else:
        detail = "no finite value"
    return {
        "name": stats.name,
        "type": stats.type,
        "count": stats.count,
        "nulls": stats.nulls,
        "detail": detail,
        "chart": column_chart(stats) if chart else None,
    }


def png_data_uri(image: np.ndarray, max_side: int = MAX_SIDE) -> str:
    """Lossless PNG data: URI of an H x W x C uint8 image (C = 1 or 3). Images larger than
    `max_side` (unresized sources) are downscaled so the page stays a few MB; the rest are exact."""
    from PIL import Image

    img = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
    if max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _failure(row: LedgerRow) -> dict[str, Any]:
    item = row.item
    return {
        "key": item.key,
        "uri": redact_url(item.uri),
        "status": item.status.value,
        "error": redact_text(item.error),
        "shard": row.shard or "-",
    }


def _shard_row(s: dict[str, Any]) -> dict[str, Any]:
    seconds = s["finished"] - s["started"] if s.get("started") and s.get("finished") else None
    return {
        "name": s["name"],
        "count": s["count"],
        "ok": s["ok"],
        "bytes": _human_bytes(s["bytes"]),
        "sha256": s["sha256"][:12],
        "seconds": f"{seconds:.2f}" if seconds is not None else "-",
        "stages": json.dumps({k: round(v, 3) for k, v in s.get("stages", {}).items()}) if s.get("stages") else "-",
    }


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return str(n)


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def _created(manifest: dict[str, Any] | None) -> str:
    """The manifest's write time (ISO 8601, UTC) in the page's format, when no shard times exist."""
    created = (manifest or {}).get("created")
    if not created:
        return "not recorded"
    try:
        return _when(calendar.timegm(time.strptime(created, "%Y-%m-%dT%H:%M:%SZ"))) + " (manifest written)"
    except ValueError:
        return str(created)


def _template() -> Any:
    from jinja2 import Environment, PackageLoader, StrictUndefined

    env = Environment(
        loader=PackageLoader("convert", "templates"),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return env.get_template("report.html.j2")
