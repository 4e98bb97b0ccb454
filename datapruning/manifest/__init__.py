"""The manifest stage: one parquet per input shard joining every stage, kept.parquet and stats.json."""
