"""One torch.distributed rank for tests/test_elastic.py, run as its own process.

    python tests/elastic_ranks.py RANK WORLD PORT URI WORKERS OUT_JSON [--stop-after K] [--state STATE_JSON]

Joins a gloo process group on 127.0.0.1:PORT, reads epoch 1 (or its first K batches) of a
StreamingDataset through a StreamingDataLoader with WORKERS workers (batch size 3), optionally after
loading STATE_JSON, and writes {"keys": [...], "state": ...} to OUT_JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch.distributed as dist

from convert.torch import StreamingDataLoader, StreamingDataset


def main() -> None:
    p = argparse.ArgumentParser()
    for name in ("rank", "world", "port"):
        p.add_argument(name, type=int)
    p.add_argument("uri")
    p.add_argument("workers", type=int)
    p.add_argument("out")
    p.add_argument("--stop-after", type=int)
    p.add_argument("--state")
    a = p.parse_args()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{a.port}", rank=a.rank, world_size=a.world)
    try:
        ds = StreamingDataset(a.uri, seed=7, shuffle_block=10, cache_dir=str(Path(a.out).parent / "cache"))
        ds.set_epoch(1)
        loader = StreamingDataLoader(ds, batch_size=3, num_workers=a.workers)
        if a.state:
            loader.load_state_dict(json.loads(Path(a.state).read_text()))
        keys, state = [], None
        for i, batch in enumerate(loader):
            keys += batch["key"]
            if a.stop_after is not None and i + 1 == a.stop_after:
                state = loader.state_dict()
                break
        Path(a.out).write_text(json.dumps({"keys": keys, "state": state, "len": len(loader)}))
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
