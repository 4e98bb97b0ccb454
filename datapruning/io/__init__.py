"""Readers and writers: shard discovery, webdataset tars, embedding parquet, clip-retrieval folders."""
