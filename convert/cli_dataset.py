"""Command line, the dataset side: `inspect`, `report` and `verify` read a converted dataset (or the
committed records of a partial run); they never change it, except `verify --repair`, which removes
failing shards so the next `run` rebuilds exactly those. `convert.cli` registers `COMMANDS` on
its group; this module imports only the shared parts (convert.cli_common), never convert.cli.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click
from rich.markup import escape
from rich.table import Table

from .cli_common import console, friendly, out_console, storage_options
from .config import ConfigError
from .redact import redact_options, redact_text, redact_url


@click.command()
@click.argument("uri")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option(
    "--failures", is_flag=True, help="list failed items instead: key, uri, status, error (one per line, tab-separated)"
)
@click.option(
    "--status", "statuses", multiple=True, metavar="STATUS", help="with --failures: only this status (repeatable)"
)
@click.option("--storage-option", "options", multiple=True, metavar="KEY=VALUE")
@friendly
def inspect(uri: str, as_json: bool, failures: bool, statuses: tuple[str, ...], options: tuple[str, ...]) -> None:
    """Show shards, counts, failures and the config used (a partial run: its committed shards)."""
    from .ledger import load_run
    from .report_data import stored_columns
    from .shards import leftovers
    from .store import open_store

    out = open_store(uri, storage_options(options))
    run = load_run(out)
    if failures or statuses:
        _print_failures(run, statuses)
        return
    debris = leftovers(out)
    columns = [{"name": c.name, "type": c.type} for c in stored_columns(run)]
    if as_json:
        # plain text: rich's highlighter took ~1.5 ms per shard (10^5 shards: minutes), and JSON is for programs
        click.echo(json.dumps(_inspect_data(run, debris, columns), indent=2))
        return
    _print_inspect(redact_url(uri), run, debris, columns)


def _inspect_data(run: Any, debris: list[Any], columns: list[dict[str, str]]) -> dict[str, Any]:
    """`inspect --json`: the manifest (its config redacted again, for older or edited manifests),
    or a partial run's state; the shard summaries; the stored columns ({name, type}); the leftovers."""
    if run.manifest is not None:
        data = {**run.manifest, "shards": list(run.shards), "config": redact_options(run.manifest["config"])}
    else:
        data = {
            "partial": True,
            "state": run.state(),
            "format": run.format,
            "planned_shards": run.planned,
            "totals": run.totals,
            "shards": list(run.shards),
        }
    leftover = [{"kind": d.kind, "url": d.url, "detail": d.detail} for d in debris]
    return {**data, "columns": columns, "leftovers": leftover}


def _print_inspect(uri: str, run: Any, debris: list[Any], columns: list[dict[str, str]]) -> None:
    manifest, totals = run.manifest, run.totals
    if manifest is None:
        out_console.print(f"[bold]{escape(uri)}[/]  format={run.format}  [yellow]{run.state()}[/]")
    else:
        out_console.print(
            f"[bold]{escape(uri)}[/]  format={manifest['format']}  source={manifest['source_kind']}  "
            f"complete={manifest['complete']}"
        )
    out_console.print(
        f"items {totals['items']}  ok {totals['ok']}  failed {totals['failed']}  "
        f"by status {totals['by_status']}  bytes {totals['bytes']}"
    )
    table = Table("shard", "items", "ok", "failed", "bytes", "shape", "sha256")
    for s in run.shards:
        shape = "x".join(map(str, s["image_shape"])) if s["image_shape"] else s["encoding"]
        table.add_row(
            s["name"], str(s["count"]), str(s["ok"]), str(s["failed"]), str(s["bytes"]), shape, s["sha256"][:12]
        )
    out_console.print(table)
    for name, error in run.failed_shards.items():
        out_console.print(f"[red]failed shard {name}[/]: {error}")
    for d in debris:
        out_console.print(f"[yellow]leftover {d.kind}[/]: {d.url} {d.detail}".rstrip())
    _print_stages(run.shards)
    if run.label_names:
        out_console.print(f"labels: {run.label_names}")
    shown = ", ".join(f"{c['name']} ({c['type']})" for c in columns) or "none (only image, label and key)"
    out_console.print(f"columns: {escape(shown)}", highlight=False, soft_wrap=True)  # names come from the list
    _print_history(manifest)
    if manifest is not None:
        out_console.print("config: " + json.dumps(redact_options(manifest["config"])), highlight=False)


def _print_history(manifest: dict[str, Any] | None) -> None:
    """The generations an append wrote (`run --append`): one line each, oldest first."""
    history = (manifest or {}).get("history")
    if not isinstance(history, list) or len(history) < 2:
        return
    out_console.print(f"generation {manifest.get('generation')} (history, oldest first):")  # type: ignore[union-attr]
    for h in history:
        if isinstance(h, dict):
            out_console.print(
                f"  generation {h.get('generation')}  {h.get('created')}  shards {h.get('shards')}  "
                f"items {h.get('items')}",
                highlight=False,
            )


def _print_stages(shards: list[dict[str, Any]]) -> None:
    """Where the conversion's time went: per-stage seconds summed over shards (convert.timing), and
    per image. Threads overlap, so the stages of a shard can add up to more than its wall time."""
    totals: dict[str, float] = {}
    for s in shards:
        for stage, seconds in (s.get("stages") or {}).items():
            totals[stage] = totals.get(stage, 0.0) + seconds
    from .timing import STAGES

    items = sum(s["count"] for s in shards)
    if totals and items:
        order = [k for k in STAGES if k in totals] + sorted(set(totals) - set(STAGES))
        parts = [f"{k} {totals[k]:.1f} s ({totals[k] * 1e3 / items:.2f} ms/item)" for k in order]
        out_console.print("time per stage, summed over shards: " + ", ".join(parts), highlight=False)


def _print_failures(run: Any, statuses: tuple[str, ...]) -> None:
    """key, uri (credentials redacted), status, error: one tab-separated line per item, shard by shard."""
    from .ledger import iter_ledger
    from .specs import Status

    known = [s.value for s in Status]
    unknown = sorted(set(statuses) - set(known))
    if unknown:
        raise ConfigError(f"--status {unknown[0]!r}: expected one of {', '.join(known)}")
    wanted = set(statuses) if statuses else set(known) - {Status.OK.value}
    if run.partial:
        console.print(run.state(), highlight=False)  # stderr: stdout stays one item per line
    for row in iter_ledger(run, wanted):
        item = row.item
        error = redact_text(" ".join(item.error.split()))
        click.echo(f"{item.key}\t{redact_url(item.uri)}\t{item.status.value}\t{error}")


@click.command()
@click.argument("uri")
@click.option(
    "--html",
    "html_target",
    metavar="FILE",
    help="where to write the page [default: <root>/report.html; a remote dataset: ./<name>-report.html]; "
    "an fsspec URL (s3://...) is written there with the dataset's storage options",
)
@click.option(
    "--samples-per-label",
    "k",
    type=click.IntRange(0, 256),
    default=8,
    show_default=True,
    help="thumbnails per label, read back from the shards",
)
@click.option("--storage-option", "options", multiple=True, metavar="KEY=VALUE")
@friendly
def report(uri: str, html_target: str | None, k: int, options: tuple[str, ...]) -> None:
    """Write one self-contained HTML page: summary, samples as stored, failures, shards, source stats."""
    from .report import default_target, write_report

    path, state = write_report(uri, html_target, storage_options(options), k)
    if html_target is None and not default_target(uri)[1]:
        console.print(
            f"the dataset is remote: wrote the report locally (pass --html {uri.rstrip('/')}/report.html "
            "to store it beside the data)",
            highlight=False,
        )
    console.print(f"report of {uri}: {state}", highlight=False)
    click.echo(os.path.abspath(path) if "://" not in path else path)


@click.command()
@click.argument("uri")
@click.option("--storage-option", "options", multiple=True, metavar="KEY=VALUE")
@click.option("--repair", is_flag=True, help="remove failing shards so the next run rebuilds exactly those")
@friendly
def verify(uri: str, options: tuple[str, ...], repair: bool) -> None:
    """Re-hash every shard against the manifest; exit 0 only if all match."""
    from .shards import repair as repair_output
    from .shards import verify as verify_output
    from .store import open_store

    store = open_store(uri, storage_options(options))
    checks = verify_output(store)
    bad = [c for c in checks if not c.ok]
    for c in bad:
        out_console.print(f"[red]FAIL[/] {c.name}: {c.problem}")
    out_console.print(f"{len(checks) - len(bad)}/{len(checks)} shards match the manifest")
    merged = _merge_kind(store) if repair and bad else None
    if merged == "copied":  # its shards are its own copies: remove the failing ones, recopy them
        from .merge import merge_command

        command = repair_output(store, checks, merge_command)
        out_console.print(
            f"removed {len(bad)} failing copies and the manifest; copy them again with the same merge:",
            highlight=False,
        )
        click.echo(command)
        sys.exit(1)
    if merged == "referenced":
        out_console.print(
            "[red]--repair[/] does not apply to a merged dataset: its shards belong to the sources; "
            "run verify --repair on the source that fails, then merge again",
            highlight=False,
        )
        sys.exit(1)
    if repair and bad:
        command = repair_output(store, checks)
        out_console.print(
            f"removed {len(bad)} failing shards and the manifest; rebuild exactly those with the "
            "run that made the dataset (plus its storage/cluster options):",
            highlight=False,
        )
        click.echo(command)  # plain: no console markup or wrapping inside a shell command
    sys.exit(1 if bad else 0)


def _merge_kind(store: Any) -> str | None:
    """None for a converted dataset; "copied" for a merge made with --copy (every part's shards
    live under its root), "referenced" for one whose index points at its sources' shards."""
    try:
        parts = json.loads(store.read_bytes("manifest.json")).get("parts")
    except (ValueError, AttributeError, OSError):
        return None
    if not parts:
        return None
    return "copied" if all(isinstance(p, dict) and p.get("uri") is None for p in parts) else "referenced"


@click.command("merge")
@click.argument("sources", nargs=-1, required=True)
@click.option("--output", "output", required=True, help="the merged dataset's root")
@click.option("--prefix-keys", is_flag=True, help="read keys as <source>/<key> instead of refusing duplicates")
@click.option("--allow-mixed-shapes", is_flag=True, help="allow raw images of different fixed shapes")
@click.option("--copy", is_flag=True, help="copy the sources' shards under OUTPUT (sources on another store)")
@click.option("--storage-option", "options", multiple=True, metavar="KEY=VALUE")
@friendly
def merge(
    sources: tuple[str, ...],
    output: str,
    prefix_keys: bool,
    allow_mixed_shapes: bool,
    copy: bool,
    options: tuple[str, ...],
) -> None:
    """Merge converted datasets into one whose index references their shards (or a copy of them)."""
    from .merge import merge_datasets

    merge_datasets(
        list(sources),
        output,
        prefix_keys=prefix_keys,
        allow_mixed_shapes=allow_mixed_shapes,
        copy=copy,
        storage_options=storage_options(options),
        log=lambda m: console.print(m, highlight=False),
    )


COMMANDS = (inspect, report, verify, merge)
