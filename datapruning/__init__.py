"""datapruning: make image and image-text training data smaller without making models worse.

Stages (embed, cluster, score, select, manifest) live in ``datapruning.stages`` and run through
``datapruning.runner``; the pruning methods are pure functions in ``datapruning.metrics`` and
``datapruning.select``; trainers read manifests with ``datapruning.loaders``.
"""
__version__ = "0.1.0"
