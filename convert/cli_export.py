"""Command line: `convert-dataset export URI --to webdataset OUTPUT` (convert.export does the work).

A standalone click command importing only the shared parts (convert.cli_common); `convert.cli`
attaches it to its group (`main.add_command(export_command)`).
"""

from __future__ import annotations

import click

from .cli_common import console, friendly, storage_options
from .export import IMAGE_FORMATS, ExportError, export_webdataset
from .redact import redact_url
from .shardcache import parse_size


@click.command("export")
@click.argument("uri")
@click.option("--to", "to", type=click.Choice(["webdataset"]), required=True, help="output format")
@click.argument("output")
@click.option(
    "--maxcount", type=click.IntRange(min=1), default=None, help="items per tar (default: one tar per source shard)"
)
@click.option("--shard-size", "shard_size", default=None, metavar="SIZE", help="about SIZE bytes per tar, e.g. 1GB")
@click.option(
    "--image-format",
    "image_format",
    type=click.Choice(IMAGE_FORMATS),
    default="auto",
    show_default=True,
    help="raw pixels as .npy (auto) or re-encoded as png/jpg; stored encodings are kept as they are",
)
@click.option("--storage-option", "options", multiple=True, metavar="KEY=VALUE", help="for URI (repeatable)")
@click.option("--output-option", "output_options", multiple=True, metavar="KEY=VALUE", help="for OUTPUT (repeatable)")
@click.option("--overwrite", is_flag=True, help="rewrite every tar instead of resuming")
@friendly
def export(
    uri: str,
    to: str,
    output: str,
    maxcount: int | None,
    shard_size: str | None,
    image_format: str,
    options: tuple[str, ...],
    output_options: tuple[str, ...],
    overwrite: bool,
) -> None:
    """Write the converted dataset URI as WebDataset tars under OUTPUT (resumes an interrupted export)."""
    summary = export_webdataset(
        uri,
        output,
        maxcount=maxcount,
        shard_size=_size(shard_size),
        image_format=image_format,
        storage_options=storage_options(options),
        output_options=storage_options(output_options),
        overwrite=overwrite,
        log=lambda m: console.print(m, highlight=False),
    )
    console.print(
        f"exported {summary.items} items to {redact_url(output)}: {summary.tars} tars "
        f"({summary.written} written, {summary.skipped} already complete) in {summary.seconds:.1f} s",
        highlight=False,
    )


def _size(text: str | None) -> int | None:
    try:
        return parse_size(text)
    except ValueError:
        raise ExportError(f"--shard-size {text!r}: expected bytes or a size like '1GB' or '512MiB'") from None
