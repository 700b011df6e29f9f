"""Command line: a thin layer over the library (run, plan, submit; inspect, report and verify are in cli_dataset).

User errors print one line naming the problem and the fix and exit 2; they never dump a traceback
(set CONVERT_DEBUG=1 to see one).
"""

from __future__ import annotations

import json
from typing import Any, Callable

import click
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as Progress_
from rich.table import Table

from . import __version__
from .cli_common import EXIT_CODES, WHOLE_PROCESS, console, exit_now, friendly, out_console, quiet_workers
from .cli_dataset import COMMANDS as DATASET_COMMANDS
from .cli_export import export as export_command
from .config import Config, ConfigError, load_config, parse_override
from .redact import redact_url


class _SizeCommand(click.Command):
    """Lets `--size 64 48` (H W) through click, which cannot take a variable number of values."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        merged: list[str] = []
        i = 0
        while i < len(args):
            merged.append(args[i])
            if args[i] == "--size" and i + 2 < len(args) and args[i + 1].isdigit() and args[i + 2].isdigit():
                merged.append(f"{args[i + 1]}x{args[i + 2]}")
                i += 3
                continue
            i += 1
        return super().parse_args(ctx, merged)


def _parse_size(text: str) -> list[int]:
    parts = text.lower().replace(",", "x").split("x")
    try:
        values = [int(p) for p in parts if p]
    except ValueError:
        raise ConfigError(f"--size {text!r}: expected N or H W (e.g. --size 64 or --size 64 48)") from None
    return values * 2 if len(values) == 1 else values


_FLAG_KEYS = {
    "source": "source.uri",
    "output": "output.uri",
    "format": "output.format",
    "resize": "image.resize",
    "shard_size": "shard.size",
    "workers": "cluster.workers",
    "threads": "fetch.threads",
    "scheduler": "cluster.scheduler",
    "scheduler_file": "cluster.scheduler_file",
}


def build_config(config_path: str | None, flags: dict[str, Any], sets: tuple[str, ...]) -> Config:
    """YAML (optional) < explicit flags < --set overrides; validated once."""
    overrides: dict[str, Any] = {}
    for name, key in _FLAG_KEYS.items():
        if flags.get(name) is not None:
            overrides[key] = flags[name]
    if flags.get("size"):
        overrides["image.size"] = _parse_size(flags["size"])
    if flags.get("overwrite"):
        overrides["run.overwrite"] = True
    if flags.get("force_unlock"):
        overrides["output.force_unlock"] = True
    if flags.get("verify_resume"):
        overrides["output.verify_resume"] = True
    if flags.get("fail_on_item_errors"):
        overrides["run.fail_on_item_errors"] = True
    for text in sets:
        key, value = parse_override(text)
        overrides[key] = value
    return load_config(config_path, overrides)


def _format_names() -> list[str]:
    from .formats.base import FORMATS

    return sorted(FORMATS)


def config_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.argument("config_path", required=False, type=click.Path(dir_okay=False)),
        click.option("--source", help="folder, glob, URL list (.txt/.csv/.parquet), CIFAR batches, s3://..."),
        click.option("--output", help="dataset root: local folder or fsspec URL (s3://bucket/out)"),
        click.option("--format", type=click.Choice(_format_names()), help="shard format [output.format]"),
        click.option("--size", help="output size: N or H W"),
        click.option(
            "--resize", type=click.Choice(["center_crop", "pad", "stretch", "none", "keep_ratio", "keep_ratio_largest"])
        ),
        click.option("--shard-size", type=int, help="items per shard"),
        click.option("--workers", type=int, help="LocalCluster worker processes"),
        click.option("--threads", type=int, help="concurrent fetches per shard"),
        click.option("--scheduler", help="address of a running Dask scheduler (tcp://host:8786)"),
        click.option("--scheduler-file", help="Dask scheduler file of a running cluster"),
        click.option("--overwrite", is_flag=True, help="discard existing shards instead of resuming"),
        click.option("--force-unlock", is_flag=True, help="take over the output's lease from a dead (stale) run"),
        click.option("--verify-resume", is_flag=True, help="re-hash committed shards before trusting them"),
        click.option("--fail-on-item-errors", is_flag=True, help="exit 3 if any item failed"),
        click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="any config key, e.g. image.quality=85"),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def entry() -> None:
    """The `convert-dataset` / `python -m convert` entry point: this process ends with the command."""
    WHOLE_PROCESS.append(True)
    main(prog_name="convert-dataset")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="convert-dataset", message="%(prog)s %(version)s")
def main() -> None:
    """Convert image collections into verified HDF5/LMDB shards with Dask."""


@main.command(cls=_SizeCommand)
@config_options
@click.option(
    "--retry-failed",
    "retry_failed",
    is_flag=False,
    flag_value="transient",
    default=None,
    metavar="[STATUS,...]",
    help="rebuild committed shards whose ledgers hold these statuses "
    "(default: timeout,connection_error,http_error (429/5xx),error)",
)
@click.option(
    "--append",
    is_flag=True,
    help="convert only what the source gained since the dataset was written (new rows at the end of a "
    "list, new list files, new objects) into new shards; existing shards are kept as they are",
)
@click.option(
    "--rebuild-changed",
    is_flag=True,
    help="with --append: a list file changed in the middle, removed, or a folder that lost objects: retire "
    "its old shards and convert it again (instead of the error)",
)
@friendly
def run(
    config_path: str | None,
    sets: tuple[str, ...],
    retry_failed: str | None,
    append: bool,
    rebuild_changed: bool,
    **flags: Any,
) -> None:
    """Convert CONFIG_PATH (YAML) and/or the given flags; resumes unless --overwrite (or adds, with --append)."""
    extra: tuple[str, ...] = ("run.append=true",) if append else ()
    extra += ("run.rebuild_changed=true",) if rebuild_changed else ()
    config = build_config(config_path, flags, sets + _retry_sets(retry_failed) + extra)
    _execute(config)


def _retry_sets(value: str | None) -> tuple[str, ...]:
    from .orchestrate import TRANSIENT
    from .specs import Status

    if value is None:
        return ()
    statuses = TRANSIENT if value == "transient" else tuple(v.strip() for v in value.split(",") if v.strip())
    known = {s.value for s in Status}
    bad = [v for v in statuses if v not in known]
    if bad:
        raise ConfigError(f"--retry-failed {','.join(bad)}: unknown status; choose from {', '.join(sorted(known))}")
    return (f"run.retry_failed={json.dumps(list(statuses))}",)


@main.command("plan", cls=_SizeCommand)
@config_options
@click.option("--samples", type=int, default=5, show_default=True, help="sample rows to show")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@friendly
def plan_command(config_path: str | None, sets: tuple[str, ...], samples: int, as_json: bool, **flags: Any) -> None:
    """List and plan only: partitions, items, shards and a few sample rows (nothing is converted)."""
    import tempfile
    import time

    from .orchestrate import plan
    from .secrets import resolve_config
    from .sources import Workdir, shard_refs

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="convert-plan-") as tmp:
        try:
            config = build_config(config_path, flags, sets)
        except ConfigError as exc:  # plan writes nothing: an output is optional here
            if "output" not in str(exc) or flags.get("output"):
                raise
            config = build_config(config_path, {**flags, "output": tmp}, sets)
        config = resolve_config(config.with_absolute_paths())
        found = plan(config, Workdir(tmp))
        seconds = time.perf_counter() - start
        rows: list[dict[str, Any]] = []
        for spec in found.specs:
            if len(rows) >= samples:
                break
            for ref, _ in zip(shard_refs(spec, config.source.storage_options), range(samples - len(rows))):
                rows.append({"key": ref.key, "uri": redact_url(ref.uri), "label": ref.label})
    report = {
        "source": redact_url(config.source.uri),
        "kind": found.kind,
        "partitions": found.partitions,
        "items": found.items,
        "shards": len(found.specs),
        "shard_size": config.shard.size,
        "labels": len(found.label_names) if found.label_names else 0,
        "seconds": round(seconds, 3),
        "samples": rows,
    }
    if as_json:
        out_console.print_json(json.dumps(report))
        return
    out_console.print(
        f"{report['source']}: {found.kind} source, {found.partitions} partitions, {found.items} items "
        f"-> {len(found.specs)} shards of {config.shard.size} (planned in {seconds:.2f} s)",
        highlight=False,
    )
    if found.label_names:
        shown = ", ".join(found.label_names[:10]) + (" ..." if len(found.label_names) > 10 else "")
        out_console.print(f"labels ({len(found.label_names)}): {shown}", highlight=False, markup=False)
    for row in rows:
        out_console.print(f"  {row['key']}  {row['uri']}  label={row['label']}", highlight=False, markup=False)


@main.command(cls=_SizeCommand)
@config_options
@click.option("--cluster", "cluster_kind", type=click.Choice(["slurm", "pbs"]), help="batch system [cluster.kind]")
@click.option("--jobs", type=int, help="worker jobs to start [cluster.jobs]")
@click.option("--cores", type=int, help="cores per job")
@click.option("--memory", help="memory per job, e.g. 16GB")
@click.option("--walltime", help="e.g. 02:00:00")
@click.option("--queue", help="partition / queue")
@click.option("--account", help="account / project to charge")
@click.option("--dry-run", is_flag=True, help="print the generated job script and exit")
@friendly
def submit(config_path: str | None, sets: tuple[str, ...], dry_run: bool, **flags: Any) -> None:
    """Run the conversion on SLURM/PBS worker jobs started through dask-jobqueue.

    Unset job settings fall back to the config's `cluster:` section, then dask's jobqueue.yaml.
    """
    batch = {
        "cluster_kind": "kind",
        "jobs": "jobs",
        "cores": "cores",
        "memory": "memory",
        "walltime": "walltime",
        "queue": "queue",
        "account": "account",
    }
    extra = tuple(f"cluster.{key}={flags.pop(name)}" for name, key in batch.items() if flags.get(name) is not None)
    for name in batch:
        flags.pop(name, None)
    config = build_config(config_path, flags, extra + sets)
    if config.cluster.kind not in ("slurm", "pbs"):
        raise ConfigError("submit needs a batch system: --cluster slurm|pbs (or cluster.kind in the config)")
    if dry_run:
        from .executor.cluster import job_script

        out_console.print(job_script(config.cluster), highlight=False, markup=False)
        return
    _execute(config)


def _execute(config: Config) -> None:
    from .executor.early import can_start_early

    if can_start_early(config.cluster):  # the workers' forkserver imports while this process imports and plans
        from .executor.warm import ensure_forkserver

        ensure_forkserver()
    from .orchestrate import Interrupted
    from .submit import Progress
    from .orchestrate import run as run_conversion

    if config.cluster.kind != "threads":
        quiet_workers()  # no CancelledError lines from the workers when a run is stopped

    columns = (
        TextColumn("[bold]shards"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[items]}"),
        TimeElapsedColumn(),
    )
    progress = Progress_(*columns, console=console, transient=False)
    task = progress.add_task("convert", total=None, items="")

    def on_progress(p: Progress) -> None:
        progress.start()  # shown from the first completed shard on; no-op once started
        eta = f", ETA {p.eta:.0f} s" if p.eta is not None else ""
        items = f"{p.items_done}/{p.items_total} items, {p.items_per_second:.0f} images/s{eta}"
        progress.update(task, completed=p.shards_done, total=p.shards_total, items=items)

    try:  # Ctrl-C / SIGTERM: convert.cli_common (installed by `friendly`) turns them into Interrupted
        summary = run_conversion(config, on_progress=on_progress, log=lambda m: console.print(m, highlight=False))
    except Interrupted as exc:
        progress.stop()
        console.print(str(exc), highlight=False)
        _leave(EXIT_CODES.get(exc.signal_name, 130))
    finally:
        progress.stop()
    print_summary(summary)
    _leave(summary.exit_code(config.run.fail_on_item_errors))


def _leave(code: int) -> None:
    """Exit with `code`, leaving the run's millions of objects to the OS: frozen, they are not walked
    again by the collections of interpreter shutdown (~0.8 s after a LocalCluster run). atexit
    handlers, flushes and every explicit close still happen."""
    import gc

    gc.freeze()
    exit_now(code)


def print_summary(summary: Any) -> None:
    table = Table(title="convert: summary", show_header=False)
    table.add_row("output", summary.output)
    table.add_row(
        "shards",
        f"{summary.shards} ({summary.skipped} resumed, {summary.converted} converted, "
        f"{len(summary.failed_shards)} failed)",
    )
    table.add_row("items ok", str(summary.items_ok))
    failures = {k: v for k, v in summary.by_status.items() if k != "ok"}
    table.add_row("items failed", f"{summary.items_failed} " + (json.dumps(failures) if failures else ""))
    for status, count, keys in summary.top_failures:  # report helper (issue 13): top 3 with example keys
        table.add_row(f"  {status}", f"{count} (e.g. {', '.join(keys)})")
    if summary.items_converted or summary.converted:
        table.add_row("time", f"{summary.seconds:.1f} s ({summary.images_per_second:.0f} images/s)")
    else:
        table.add_row("time", f"{summary.seconds:.1f} s (nothing converted: every shard was already committed)")
    for name, error in summary.failed_shards.items():
        table.add_row(f"FAILED {name}", error)
    console.print(table)


for _command in DATASET_COMMANDS:  # inspect, report, verify: the commands that read a converted dataset
    main.add_command(_command)
main.add_command(export_command)  # export: convert.cli_export
