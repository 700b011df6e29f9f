"""Image-text lists end to end against img2dataset (issue 19's acceptance), one run, same list.

    flock /tmp/bench.lock python tests/benchmarks/bench_image_text.py [--rows 50000] [--pairs 3]
        [--img2dataset /tmp/i2d-venv/bin/img2dataset]

A LAION-like parquet list served from 127.0.0.1 (nginx when installed, else the Python test server):
captions with Unicode, emoji, newlines, quotes, empty, 10 kB long and null; a float `similarity`; a
`sha256` column with 1 % wrong digests; 2 % of responses with `X-Robots-Tag: noai`, 1 % with
`X-Robots-Tag: otherbot: noai` (must be kept); 3 % of images below `min_size`. Converted by
`convert-dataset run` and by img2dataset (caption_col, save_additional_columns, compute_hash +
verify_hash, disallowed_header_directives, min_image_size, same size and resize) from the same list.

Prints: the set of successful URLs of each and their difference, whether convert's captions are
byte-identical to the list, the opt-out / hash / filter outcomes of each, and whole-process
images/s of each (interleaved pairs, medians) with the ratio (target >= 3x).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_pipeline import _free_port  # noqa: E402

from convert.testing import images as gen  # noqa: E402

CAPTIONS = [
    "a photo of a cat",
    "Ünïcödé — «quotes» and ‘single’ ones",
    "emoji 🐈‍⬛🚀✨ and a flag 🇫🇷",
    "line one\nline two\r\nthree",
    'she said "hello", then left',
    "",
    "   leading and trailing spaces   ",
    "tab\tseparated\tcaption",
    "x" * 10_000,
    "中文标题 日本語のキャプション 한국어",
    None,
    "back\\slash and nul-free",
]

NGINX = """daemon off; user root; worker_processes 1; error_log {tmp}/nginx-error.log; pid {tmp}/nginx.pid;
events {{ worker_connections 4096; }}
http {{ access_log off; sendfile on; tcp_nopush on; keepalive_requests 100000;
  server {{ listen 127.0.0.1:{port}; root {root};
    location /noai/ {{ add_header X-Robots-Tag "noai" always; }}
    location /otherbot/ {{ add_header X-Robots-Tag "otherbot: noai" always; }} }} }}
"""


def make_corpus(root: Path, rows: int, seed: int = 0) -> tuple[Path, dict[str, str]]:
    """Images under root/www/img (and the /noai/, /otherbot/ aliases), plus the URL-less rows as
    (path, caption, similarity, sha256 given, expected outcome)."""
    rng = random.Random(seed)
    www = root / "www"
    (www / "img").mkdir(parents=True)
    normal, small = [], []
    for j in range(150):
        w, h = rng.randint(200, 500), rng.randint(200, 500)
        normal.append(gen.jpeg_bytes(w, h, seed=j))
    for j in range(10):
        small.append(gen.jpeg_bytes(rng.randint(40, 90), rng.randint(110, 200), seed=1000 + j))
    for j, data in enumerate(normal):
        (www / "img" / f"n{j:03d}.jpg").write_bytes(data)
    for j, data in enumerate(small):
        (www / "img" / f"s{j:03d}.jpg").write_bytes(data)
    for alias in ("noai", "otherbot"):
        os.symlink(www / "img", www / alias)
    return www, {f"n{j:03d}": hashlib.sha256(d).hexdigest() for j, d in enumerate(normal)} | {
        f"s{j:03d}": hashlib.sha256(d).hexdigest() for j, d in enumerate(small)
    }


def write_list(path: Path, base: str, digests: dict[str, str], rows: int, seed: int = 0) -> dict[str, str]:
    """The parquet list; returns url -> expected outcome (ok / opted_out / hash_mismatch / filtered)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    urls, caps, sims, shas, expect = [], [], [], [], {}
    for i in range(rows):
        r = rng.random()
        folder, name, outcome = "img", f"n{rng.randrange(150):03d}", "ok"
        if r < 0.03:
            name, outcome = f"s{rng.randrange(10):03d}", "filtered"
        elif r < 0.05:
            folder, outcome = "noai", "opted_out"
        elif r < 0.06:
            folder = "otherbot"  # another bot's directive: kept
        sha = digests[name]
        if outcome == "ok" and rng.random() < 0.01:
            sha, outcome = hashlib.sha256(f"wrong{i}".encode()).hexdigest(), "hash_mismatch"
        url = f"{base}/{folder}/{name}.jpg?n={i:09d}"
        urls.append(url)
        caps.append(CAPTIONS[i % len(CAPTIONS)])
        sims.append(round(rng.random(), 4))
        shas.append(sha)
        expect[url] = outcome
    table = pa.table({"url": urls, "caption": pa.array(caps, pa.string()), "similarity": sims, "sha256": shas})
    pq.write_table(table, path, row_group_size=10_000)
    return expect


def serve(www: Path) -> tuple[subprocess.Popen[str], str]:
    if not shutil.which("nginx"):
        raise SystemExit("this benchmark needs nginx for the X-Robots-Tag locations: apt-get install nginx-light")
    port, tmp = _free_port(), www.parent
    (tmp / "nginx.conf").write_text(NGINX.format(tmp=tmp, port=port, root=www))
    proc = subprocess.Popen(["nginx", "-c", str(tmp / "nginx.conf"), "-p", str(tmp)], text=True)
    time.sleep(0.5)
    return proc, f"http://127.0.0.1:{port}"


def ours_cmd(lst: Path, out: Path, size: int) -> list[str]:
    sets = {
        "source.columns": "[similarity]",
        "source.hash_column": "sha256",
        "image.min_size": "100",
        "fetch.allowed_networks": "[127.0.0.0/8]",
        "fetch.retries": "0",
    }
    return [
        sys.executable,
        "-m",
        "convert",
        "run",
        "--source",
        str(lst),
        "--output",
        str(out),
        "--size",
        str(size),
        "--shard-size",
        "1000",
        "--overwrite",
        *[f"--set={k}={v}" for k, v in sets.items()],
    ]


def i2d_cmd(exe: str, lst: Path, out: Path, size: int) -> list[str]:
    return [
        exe,
        f"--url_list={lst}",
        "--input_format=parquet",
        "--url_col=url",
        "--caption_col=caption",
        '--save_additional_columns=["similarity"]',
        "--compute_hash=sha256",
        "--verify_hash=[sha256,sha256]",
        '--disallowed_header_directives=["noai","noimageai","noindex","noimageindex"]',
        "--min_image_size=100",
        f"--image_size={size}",
        "--resize_mode=center_crop",
        f"--output_folder={out}",
        "--output_format=files",
        "--processes_count=2",
        "--thread_count=32",
        "--number_sample_per_shard=1000",
        "--retries=0",
        "--enable_wandb=False",
        "--distributor=multiprocessing",
    ]


def timed(cmd: list[str]) -> float:
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return time.perf_counter() - t


def our_outcomes(out: Path) -> tuple[dict[str, str], dict[str, str | None]]:
    """url -> status, and url -> stored caption for the ok items (read back through open_dataset)."""
    from convert import open_dataset
    from convert.ledger import iter_ledger
    from convert.store import open_store

    status = {row.uri: row.status.value for _, row, _ in iter_ledger(open_store(str(out)))}
    ds = open_dataset(str(out))
    ok_urls = [row.uri for _, row, _ in iter_ledger(open_store(str(out))) if row.ok]
    return status, dict(zip(ok_urls, ds.column("caption")))


def their_outcomes(out: Path) -> tuple[dict[str, str], dict[str, str | None]]:
    import pyarrow.parquet as pq

    kinds = {
        "Use of image disallowed by X-Robots-Tag directive": "opted_out",
        "hash mismatch": "hash_mismatch",
        "image too small": "filtered",
    }
    status, captions = {}, {}
    for path in sorted(glob.glob(str(out / "*.parquet"))):
        t = pq.read_table(path, columns=["url", "status", "error_message", "caption"]).to_pydict()
        for url, st, err, cap in zip(t["url"], t["status"], t["error_message"], t["caption"]):
            status[url] = "ok" if st == "success" else kinds.get(err or "", f"other: {err}")
            if st == "success":
                captions[url] = cap
    return status, captions


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--img2dataset", default=shutil.which("img2dataset") or "/tmp/i2d-venv/bin/img2dataset")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-image-text-") as d:
        root = Path(d)
        www, digests = make_corpus(root, args.rows)
        server, base = serve(www)
        try:
            lst = root / "laion-like.parquet"
            expect = write_list(lst, base, digests, args.rows)
            captions_in = dict(zip(*_list_columns(lst)))
            ours, theirs = [], []
            for i in range(args.pairs):
                ours.append(args.rows / timed(ours_cmd(lst, root / "ours", args.size)))
                shutil.rmtree(root / "theirs", ignore_errors=True)
                theirs.append(args.rows / timed(i2d_cmd(args.img2dataset, lst, root / "theirs", args.size)))
                print(f"pair {i + 1}: convert {ours[-1]:7.0f} img/s   img2dataset {theirs[-1]:7.0f} img/s", flush=True)
            report(expect, captions_in, our_outcomes(root / "ours"), their_outcomes(root / "theirs"))
            a, b = statistics.median(ours), statistics.median(theirs)
            print(
                f"whole process, median of {args.pairs} interleaved pairs: convert {a:.0f} img/s vs img2dataset "
                f"{b:.0f} img/s = {a / b:.2f}x (target >= 3x: {'met' if a / b >= 3 else 'MISSED'})"
            )
        finally:
            server.terminate()


def _list_columns(lst: Path) -> tuple[list[str], list[str | None]]:
    import pyarrow.parquet as pq

    t = pq.read_table(lst, columns=["url", "caption"]).to_pydict()
    return t["url"], t["caption"]


def report(expect: dict[str, str], captions_in: dict[str, str | None], ours: tuple, theirs: tuple) -> None:
    (our_status, our_caps), (their_status, their_caps) = ours, theirs
    print("outcomes (expected / convert / img2dataset):")
    for kind in ("ok", "opted_out", "hash_mismatch", "filtered"):
        e = sum(v == kind for v in expect.values())
        print(
            f"  {kind:<14} {e:>7} {sum(v == kind for v in our_status.values()):>9} "
            f"{sum(v == kind for v in their_status.values()):>12}"
        )
    others = Counter(v for v in their_status.values() if v.startswith("other"))
    if others:
        print(f"  img2dataset other outcomes: {dict(others.most_common(5))}")
    our_ok = {u for u, s in our_status.items() if s == "ok"}
    their_ok = {u for u, s in their_status.items() if s == "ok"}
    print(
        f"successful URLs: convert {len(our_ok)}, img2dataset {len(their_ok)}, same set: {our_ok == their_ok} "
        f"(only convert {len(our_ok - their_ok)}, only img2dataset {len(their_ok - our_ok)})"
    )
    print(f"convert outcome == expected for every row: {all(our_status.get(u) == k for u, k in expect.items())}")
    same = sum(our_caps[u] == captions_in[u] for u in our_caps)
    print(f"convert captions byte-identical to the list: {same}/{len(our_caps)}")
    same_i2d = sum((their_caps[u] or None) == (captions_in[u] or None) for u in their_caps)
    print(f"img2dataset captions equal to the list (empty == null): {same_i2d}/{len(their_caps)}")


if __name__ == "__main__":
    main()
