"""Names in an output root shared by the modules that own its parts (records, lease, manifest)."""

SHARDS_DIR = "shards"  # shard files, their records and (locally) the staged temps of running tasks
