"""Spherical k-means (faiss, faiss-gpu or torch-CUDA): fit on a sample, assign in blocks.

The cluster stage is ``cluster.stage``.
"""
from __future__ import annotations

from .kmeans import assign, faiss_gpus, fit_kmeans, resolve_backend, sample_size

__all__ = ["assign", "faiss_gpus", "fit_kmeans", "resolve_backend", "sample_size"]
