"""Command line: a thin layer over the library (run, submit, inspect, verify).

User errors print one line naming the problem and the fix and exit 2; they never dump a traceback
(set CONVERT_DEBUG=1 to see one).
"""

from __future__ import annotations

import functools
import json
import os
import sys
from typing import Any, Callable

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .config import Config, ConfigError, load_config, parse_override

console = Console(stderr=True, soft_wrap=True)
out_console = Console(soft_wrap=True)


def _user_errors() -> tuple[type[BaseException], ...]:
    from .manifest import ManifestError
    from .persist import PersistError
    from .cluster import ClusterError
    from .sources import SourceError

    return (ConfigError, ManifestError, SourceError, PersistError, ClusterError, FileNotFoundError, PermissionError,
            ImportError)  # fmt: skip


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn user-facing exceptions into a one-line error and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except click.exceptions.Exit:
            raise
        except Exception as exc:
            if os.environ.get("CONVERT_DEBUG"):
                raise
            user = isinstance(exc, _user_errors())
            label = "error" if user else f"error ({type(exc).__name__})"
            lines = str(exc).strip().splitlines() or [type(exc).__name__]
            console.print(f"[bold red]{label}:[/] {lines[0]}", highlight=False)
            if type(exc).__name__ == "ClusterError" and len(lines) > 1:  # job script, sbatch/squeue output
                console.print("\n".join(lines[1:]), highlight=False, markup=False)
            if not user:
                console.print("set CONVERT_DEBUG=1 for the full traceback", style="dim")
            sys.exit(2)

    return wrapper


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
    if flags.get("fail_on_item_errors"):
        overrides["run.fail_on_item_errors"] = True
    for text in sets:
        key, value = parse_override(text)
        overrides[key] = value
    return load_config(config_path, overrides)


def config_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.argument("config_path", required=False, type=click.Path(dir_okay=False)),
        click.option("--source", help="folder, glob, URL list (.txt/.csv/.parquet), CIFAR batches, s3://..."),
        click.option("--output", help="dataset root: local folder or fsspec URL (s3://bucket/out)"),
        click.option("--format", type=click.Choice(["hdf5", "lmdb"])),
        click.option("--size", help="output size: N or H W"),
        click.option("--resize", type=click.Choice(["center_crop", "pad", "stretch", "none"])),
        click.option("--shard-size", type=int, help="items per shard"),
        click.option("--workers", type=int, help="LocalCluster worker processes"),
        click.option("--threads", type=int, help="concurrent fetches per shard"),
        click.option("--scheduler", help="address of a running Dask scheduler (tcp://host:8786)"),
        click.option("--scheduler-file", help="Dask scheduler file of a running cluster"),
        click.option("--overwrite", is_flag=True, help="discard existing shards instead of resuming"),
        click.option("--fail-on-item-errors", is_flag=True, help="exit 3 if any item failed"),
        click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="any config key, e.g. image.quality=85"),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Convert image collections into verified HDF5/LMDB shards with Dask."""


@main.command(cls=_SizeCommand)
@config_options
@friendly
def run(config_path: str | None, sets: tuple[str, ...], **flags: Any) -> None:
    """Convert CONFIG_PATH (YAML) and/or the given flags; resumes unless --overwrite."""
    config = build_config(config_path, flags, sets)
    _execute(config)


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
    batch = {"cluster_kind": "kind", "jobs": "jobs", "cores": "cores", "memory": "memory",
             "walltime": "walltime", "queue": "queue", "account": "account"}  # fmt: skip
    extra = tuple(f"cluster.{key}={flags.pop(name)}" for name, key in batch.items() if flags.get(name) is not None)
    for name in batch:
        flags.pop(name, None)
    config = build_config(config_path, flags, extra + sets)
    if config.cluster.kind == "local":
        raise ConfigError("submit needs a batch system: --cluster slurm|pbs (or cluster.kind in the config)")
    if dry_run:
        from .cluster import job_script

        out_console.print(job_script(config.cluster), highlight=False, markup=False)
        return
    _execute(config)


def _execute(config: Config) -> None:
    from .graph import run as run_graph

    columns = (TextColumn("[bold]shards"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    progress = Progress(*columns, console=console, transient=False)
    task = progress.add_task("convert", total=None)

    def on_progress(name: str, done: int, total: int) -> None:
        progress.start()  # shown from the first completed shard on; no-op once started
        progress.update(task, completed=done, total=total)

    try:
        summary = run_graph(config, on_progress=on_progress, log=lambda m: console.print(m, highlight=False))
    finally:
        progress.stop()
    print_summary(summary)
    sys.exit(summary.exit_code(config.run.fail_on_item_errors))


def print_summary(summary: Any) -> None:
    table = Table(title="convert: summary", show_header=False)
    table.add_row("output", summary.output)
    table.add_row("shards", f"{summary.shards} ({summary.skipped} resumed, {summary.converted} converted, "
                  f"{len(summary.failed_shards)} failed)")  # fmt: skip
    table.add_row("items ok", str(summary.items_ok))
    failures = {k: v for k, v in summary.by_status.items() if k != "ok"}
    table.add_row("items failed", f"{summary.items_failed} " + (json.dumps(failures) if failures else ""))
    table.add_row("time", f"{summary.seconds:.1f} s ({summary.images_per_second:.0f} images/s)")
    for name, error in summary.failed_shards.items():
        table.add_row(f"FAILED {name}", error)
    console.print(table)


@main.command()
@click.argument("uri")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("--storage-option", "options", multiple=True, metavar="KEY=VALUE")
@friendly
def inspect(uri: str, as_json: bool, options: tuple[str, ...]) -> None:
    """Show shards, counts, failures and the config used."""
    from .manifest import leftovers, read_manifest
    from .store import open_store

    out = open_store(uri, _options(options))
    manifest = read_manifest(out)
    debris = leftovers(out)
    if as_json:
        report = {**manifest, "leftovers": [{"kind": d.kind, "url": d.url, "detail": d.detail} for d in debris]}
        out_console.print_json(json.dumps(report))
        return
    totals = manifest["totals"]
    out_console.print(f"[bold]{uri}[/]  format={manifest['format']}  source={manifest['source_kind']}  "
                      f"complete={manifest['complete']}")  # fmt: skip
    out_console.print(f"items {totals['items']}  ok {totals['ok']}  failed {totals['failed']}  "
                      f"by status {totals['by_status']}  bytes {totals['bytes']}")  # fmt: skip
    table = Table("shard", "items", "ok", "failed", "bytes", "shape", "sha256")
    for s in manifest["shards"]:
        shape = "x".join(map(str, s["image_shape"])) if s["image_shape"] else s["encoding"]
        table.add_row(s["name"], str(s["count"]), str(s["ok"]), str(s["failed"]), str(s["bytes"]), shape, s["sha256"][:12])
    out_console.print(table)
    for name, error in manifest.get("failed_shards", {}).items():
        out_console.print(f"[red]failed shard {name}[/]: {error}")
    for d in debris:
        out_console.print(f"[yellow]leftover {d.kind}[/]: {d.url} {d.detail}".rstrip())
    if manifest.get("label_names"):
        out_console.print(f"labels: {manifest['label_names']}")
    out_console.print("config: " + json.dumps(manifest["config"]), highlight=False)


@main.command()
@click.argument("uri")
@click.option("--storage-option", "options", multiple=True, metavar="KEY=VALUE")
@friendly
def verify(uri: str, options: tuple[str, ...]) -> None:
    """Re-hash every shard against the manifest; exit 0 only if all match."""
    from .manifest import verify as verify_output
    from .store import open_store

    checks = verify_output(open_store(uri, _options(options)))
    bad = [c for c in checks if not c.ok]
    for c in bad:
        out_console.print(f"[red]FAIL[/] {c.name}: {c.problem}")
    out_console.print(f"{len(checks) - len(bad)}/{len(checks)} shards match the manifest")
    sys.exit(1 if bad else 0)


def _options(pairs: tuple[str, ...]) -> dict[str, Any]:
    return dict(parse_override(p) for p in pairs)


if __name__ == "__main__":
    main()
