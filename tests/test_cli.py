"""The command line as a user runs it: real subprocesses, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from convert.testing import images as gen

pytestmark = pytest.mark.cluster


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "convert", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    gen.write_image_folder(root, {"a": 4, "b": 4}, size=(50, 40))
    (root / "b" / "zero.jpg").write_bytes(b"")
    out = tmp_path_factory.mktemp("out") / "ds"
    result = cli(
        "run",
        "--source",
        str(root),
        "--output",
        str(out),
        "--format",
        "lmdb",
        "--size",
        "24",
        "32",
        "--shard-size",
        "4",
        "--workers",
        "1",
        "--threads",
        "2",
        "--set",
        "image.quality=85",
    )
    return root, out, result


def test_run_summary_and_exit_zero_with_item_failures(converted):
    _, _, result = converted
    assert result.returncode == 0, result.stderr
    assert "items ok" in result.stderr and "decode_error" in result.stderr and "images/s" in result.stderr


def test_inspect_json_reflects_flags(converted):
    _, out, _ = converted
    result = cli("inspect", str(out), "--json")
    manifest = json.loads(result.stdout)
    assert manifest["totals"]["ok"] == 8 and manifest["totals"]["by_status"] == {"decode_error": 1, "ok": 8}
    assert manifest["shards"][0]["image_shape"] == [24, 32, 3]
    assert manifest["config"]["image"]["quality"] == 85 and manifest["format"] == "lmdb"
    assert manifest["label_names"] == ["a", "b"]
    human = cli("inspect", str(out))
    assert "shard-00000" in human.stdout and "complete=True" in human.stdout
    # where the time went, from the shard records' stage clocks, summed and per item
    stages = next(line for line in human.stdout.splitlines() if line.startswith("time per stage"))
    assert "fetch " in stages and "decode " in stages and "ms/item" in stages
    decode = sum(s["stages"].get("decode", 0.0) for s in manifest["shards"])
    assert f"decode {decode:.1f} s ({decode * 1e3 / 9:.2f} ms/item)" in stages


def test_verify_exit_codes(converted, tmp_path):
    _, out, _ = converted
    assert cli("verify", str(out)).returncode == 0
    shard = sorted((out / "shards").glob("*.lmdb"))[0]
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = cli("verify", str(out))
    assert result.returncode == 1 and f"FAIL {shard.stem}" in result.stdout


def test_fail_on_item_errors_and_resume(converted):
    root, out, _ = converted
    result = cli(
        "run",
        "--source",
        str(root),
        "--output",
        str(out),
        "--format",
        "lmdb",
        "--size",
        "24",
        "32",
        "--shard-size",
        "4",
        "--workers",
        "1",
        "--set",
        "image.quality=85",
        "--fail-on-item-errors",
    )
    assert result.returncode == 3, result.stderr
    assert "resumed" in result.stderr


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--set", "image.sise=3"], "unknown key 'image.sise'"),
        (["--format", "tfrecord"], "Invalid value for '--format'"),
        (["--set", "image.resize=zoom"], "image.resize: 'zoom' is not allowed"),
        (["--source", "/definitely/not/here"], "does not exist"),
    ],
)
def test_bad_input_is_one_line_without_traceback(tmp_path, args, expected):
    base = {"--source": str(tmp_path), "--output": str(tmp_path / "o")}
    for i in range(0, len(args) - 1, 2):
        base.pop(args[i], None)
    flat = [x for kv in base.items() for x in kv]
    result = cli("run", *flat, *args)
    assert result.returncode == 2
    assert expected in result.stderr and "Traceback" not in result.stderr


def test_missing_config_file_and_inspect_of_nothing(tmp_path):
    result = cli("run", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2 and "not found" in result.stderr
    result = cli("inspect", str(tmp_path))
    assert result.returncode == 2 and "manifest.json not found" in result.stderr


def test_inspect_reports_leftovers_of_killed_attempts(converted):
    _, out, _ = converted
    debris = out / "shards" / ".shard-00001.0123456789ab.partial.lmdb"
    debris.write_bytes(b"half a shard")
    try:
        report = json.loads(cli("inspect", str(out), "--json").stdout)
        assert {"kind": "partial", "url": str(debris), "detail": ""} in report["leftovers"]
        assert "leftover partial" in cli("inspect", str(out)).stdout
    finally:
        debris.unlink()


# -- report helper (issue 13): end-of-run messages, --version -------------------------------------
REPO = Path(__file__).resolve().parents[1]


def demo_run(out: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}  # keep rich's summary table cells on one line
    return subprocess.run(
        [sys.executable, "-m", "convert", "run", "configs/demo.yaml", "--output", str(out), *flags],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        env=env,
    )


def test_rerun_says_what_changed_counts_only_its_own_items_and_drops_old_format(tmp_path):
    from convert.dataset import open_dataset

    out = tmp_path / "demo"
    first = demo_run(out)
    assert first.returncode == 0, first.stderr
    assert "decode_error" in first.stderr and "1 (e.g. dog/dog_broken.jpg)" in first.stderr  # top failure + example key
    assert "images/s" in first.stderr
    again = demo_run(out)  # nothing to do: no invented rate
    assert again.returncode == 0 and "nothing converted" in again.stderr and "images/s" not in again.stderr
    smaller = demo_run(out, "--size", "32")
    assert "image.size changed: 64 → 32; 3 shards will be rebuilt" in smaller.stderr
    lmdb = demo_run(out, "--size", "32", "--format", "lmdb")
    assert lmdb.returncode == 0 and "output.format changed: hdf5 → lmdb; 3 shards will be rebuilt" in lmdb.stderr
    assert "removed 3 files of earlier settings" in lmdb.stderr
    names = sorted(p.name for p in (out / "shards").iterdir())
    assert names == sorted([f"shard-0000{i}.lmdb" for i in range(3)] + [f"shard-0000{i}.record.gz" for i in range(3)])
    with open_dataset(str(out)) as ds:
        assert len(ds) == 36 and ds[0]["image"].shape == (32, 32, 3)


def test_version():
    from convert import __version__

    result = cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"convert-dataset {__version__}"


@pytest.mark.parametrize(
    "readme, marker",
    [("cluster/slurm/README.md", "#SBATCH --cpus-per-task=8"), ("cluster/pbs/README.md", "#PBS -l select=1:ncpus=8")],
)
def test_cluster_readme_dry_run_lines_run_as_written(readme, marker):
    """Every `--dry-run` command in the SLURM/PBS READMEs, copied as a user would, prints a job script."""
    import re
    import shlex

    text = (REPO / readme).read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    lines = [line.split("  #")[0].strip() for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    commands = [line for line in lines if line.startswith("convert-dataset") and "--dry-run" in line]
    assert commands, f"no dry-run line in {readme}"
    for command in commands:
        args = shlex.split(command)[1:]
        result = subprocess.run(
            [sys.executable, "-m", "convert", *args], capture_output=True, text=True, cwd=REPO, timeout=120
        )
        assert result.returncode == 0, f"{command}: {result.stderr}"
        assert marker in result.stdout


def test_docs_the_configs_and_readmes_point_at_exist():
    """configs/*.yaml comments and the Markdown files link only to files that exist (docs/s3.md, ...)."""
    import re

    missing = []
    for yaml_file in (REPO / "configs").glob("*.yaml"):
        for ref in re.findall(r"\b((?:docs|configs|cluster)/[\w./-]+\.(?:md|yaml))", yaml_file.read_text()):
            if not (REPO / ref).is_file():
                missing.append(f"{yaml_file.name}: {ref}")
    for md in [REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "cluster").glob("*/README.md")]:
        for ref in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", md.read_text()):
            if not (md.parent / ref).exists():
                missing.append(f"{md.relative_to(REPO)}: {ref}")
    assert missing == []


def test_submit_without_a_batch_system_is_one_line_not_a_local_run(tmp_path: Path) -> None:
    """With cluster.kind defaulting to auto, `submit` without --cluster must refuse, not convert here."""
    gen.write_image_folder(tmp_path / "src", {"a": 2}, size=(16, 16))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "convert",
            "submit",
            "--source",
            str(tmp_path / "src"),
            "--output",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "submit needs a batch system: --cluster slurm|pbs" in proc.stderr
    assert not (tmp_path / "out").exists()
