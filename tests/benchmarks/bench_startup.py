"""Fixed cost of a small `convert-dataset run` with the default config: old code vs this tree, same run.

Each variant is a real `python -m convert run` subprocess; its output lines are timestamped as they
arrive, which splits the whole-process wall time into phases:

    start -> plan line      interpreter, imports, lease, planning (`import` alone is measured apart)
    plan -> "cluster:"      executor start-up still left after planning
    "cluster:" -> summary   the conversion
    summary -> exit         teardown (the process exits; EOF = its stdout/stderr closed, what `| tee` waits for)

Variants, interleaved per round, medians of --rounds:
    old       the code of --baseline-ref (default 5ce5214: LocalCluster by default, started while
              planning), extracted with git archive
    local     this tree with cluster.kind=local (the LocalCluster path as it is now)
    new       this tree's default (cluster.kind=auto: a small plan runs in this process)

Two workloads: a tiny run (--tiny local images) and the URL list (--urls, e.g. /tmp/urls5k.csv served
by nginx on 127.0.0.1; skipped when the file is missing).

    flock /tmp/bench.lock python tests/benchmarks/bench_startup.py [--rounds 3] [--tiny 10] [--urls /tmp/urls5k.csv]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BASELINE = "5ce5214"  # main before cluster.kind=auto (issue 21 item 2)
PHASES = ("import", "plan", "cluster", "convert", "teardown", "eof", "wall")


def extract(ref: str, dest: Path) -> Path:
    """The `convert` package of git `ref`, unpacked under dest (nothing in the repository changes)."""
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "convert"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def import_seconds(tree: Path, env_extra: dict[str, str]) -> float:
    """Wall seconds of `python -c "import convert.cli"` from this tree (interpreter start included)."""
    env = dict(os.environ, PYTHONPATH=str(tree), **env_extra)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import convert.cli"], check=True, env=env, cwd=tree.parent)
    return time.perf_counter() - start


def timed_run(tree: Path, args: list[str], env_extra: dict[str, str]) -> dict[str, float]:
    """One CLI run: seconds from start to each marker line, to process exit and to EOF of its output."""
    env = dict(os.environ, PYTHONPATH=str(tree), **env_extra)  # run from tree.parent: `-m` puts the cwd first
    imported = import_seconds(tree, env_extra)
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "convert", "run", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=tree.parent,
    )
    marks: dict[str, float] = {}
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            now = time.perf_counter() - start
            lines.append(line)
            if " items from " in line and "plan" not in marks:
                marks["plan"] = now
            elif line.startswith("cluster:") and "cluster" not in marks:
                marks["cluster"] = now
            elif "convert: summary" in line:
                marks["summary"] = now
        marks["eof"] = time.perf_counter() - start

    reader = threading.Thread(target=read)
    reader.start()
    code = proc.wait(timeout=600)
    marks["exit"] = time.perf_counter() - start
    reader.join(60)
    if code != 0 or not {"plan", "cluster", "summary"} <= set(marks):
        raise SystemExit(f"run failed (exit {code}):\n{''.join(lines[-20:])}")
    return {
        "import": imported,
        "plan": marks["plan"],
        "cluster": marks["cluster"] - marks["plan"],
        "convert": marks["summary"] - marks["cluster"],
        "teardown": marks["exit"] - marks["summary"],
        "eof": marks["eof"] - marks["summary"],
        "wall": marks["eof"],
    }


def report(title: str, results: dict[str, list[dict[str, float]]]) -> None:
    med = {v: {p: statistics.median(r[p] for r in runs) for p in PHASES} for v, runs in results.items()}
    print(f"\n{title} (medians of {len(next(iter(results.values())))}; seconds)")
    print(f"{'variant':8}" + "".join(f"{p:>10}" for p in PHASES) + "   [teardown = to exit, eof = to output closed]")
    for variant, m in med.items():
        print(f"{variant:8}" + "".join(f"{m[p]:10.2f}" for p in PHASES))
    old, new = med["old"], med["new"]
    fixed_old = old["plan"] + old["cluster"] + old["eof"]
    fixed_new = new["plan"] + new["cluster"] + new["eof"]
    print(
        f"fixed cost (plan + cluster + summary->EOF): old {fixed_old:.2f} s, new {fixed_new:.2f} s, "
        f"saved {fixed_old - fixed_new:.2f} s ({fixed_old / fixed_new:.2f}x); "
        f"wall old/new {old['wall'] / new['wall']:.2f}x; executor-ready (start -> cluster line) "
        f"old {old['plan'] + old['cluster']:.2f} s, local {med['local']['plan'] + med['local']['cluster']:.2f} s, "
        f"new {new['plan'] + new['cluster']:.2f} s"
    )


def workload(
    name: str, trees: dict[str, tuple[Path, list[str], dict[str, str]]], args: list[str], out: Path, rounds: int
) -> None:
    results: dict[str, list[dict[str, float]]] = {v: [] for v in trees}
    for i in range(rounds):
        for variant, (tree, extra, env) in trees.items():
            shutil.rmtree(out, ignore_errors=True)
            results[variant].append(timed_run(tree, [*args, *extra, "--output", str(out), "--overwrite"], env))
            r = results[variant][-1]
            print(
                f"  {name} round {i + 1} {variant:6} wall {r['wall']:6.2f} s  (import {r['import']:.2f}, plan {r['plan']:.2f}, cluster "
                f"{r['cluster']:.2f}, convert {r['convert']:.2f}, exit {r['teardown']:.2f}, eof {r['eof']:.2f})",
                flush=True,
            )
    report(name, results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tiny", type=int, default=10, help="local images in the tiny run")
    parser.add_argument("--urls", default="/tmp/urls5k.csv", help="URL list for the large run ('' to skip)")
    parser.add_argument("--baseline-ref", default=BASELINE, help="git ref of the old code [%(default)s]")
    a = parser.parse_args()
    ref = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", a.baseline_ref], check=True, capture_output=True, text=True
    ).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp_:
        tmp = Path(tmp_)
        sys.path.insert(0, str(ROOT))
        from convert.testing.images import write_image_folder

        write_image_folder(tmp / "tiny", {"a": a.tiny // 2, "b": a.tiny - a.tiny // 2}, size=(64, 64))
        trees = {
            "old": (extract(ref, tmp / "old"), [], {}),
            "local": (ROOT, ["--set", "cluster.kind=local"], {}),
            "new": (ROOT, [], {}),
        }
        print(f"old = {ref[:12]}, new = {ROOT}; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
        workload(
            f"tiny ({a.tiny} local images)",
            trees,
            ["--source", str(tmp / "tiny"), "--size", "32"],
            tmp / "out",
            a.rounds,
        )
        from convert.testing.http import StaticServer

        with StaticServer(root=tmp / "tiny") as srv:  # the same images as a URL list, on 127.0.0.1
            urls = tmp / "tiny.txt"
            urls.write_text(
                "".join(
                    f"{srv.url_for(str(p.relative_to(tmp / 'tiny')))}\n" for p in sorted((tmp / "tiny").rglob("*.jpg"))
                )
            )
            args = ["--source", str(urls), "--size", "32", "--set", "fetch.allow_private_networks=true"]
            workload(f"tiny URL list ({a.tiny} URLs)", trees, args, tmp / "out", a.rounds)
        if a.urls and Path(a.urls).is_file():
            args = [
                "--source",
                a.urls,
                "--size",
                "64",
                "--shard-size",
                "250",
                "--set",
                "fetch.allow_private_networks=true",
            ]
            workload(f"URL list ({a.urls})", trees, args, tmp / "out", a.rounds)
        print(f"\nload average at the end {os.getloadavg()[0]:.2f} (2 cores shared: other jobs may have run)")


if __name__ == "__main__":
    main()
