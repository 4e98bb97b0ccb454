"""Pipeline stages: each reads the previous stage's files, calls pure functions, and writes per-shard outputs."""
