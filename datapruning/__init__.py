"""datapruning: make image and image-text training data smaller without making models worse.

One package per stage (``embed``, ``cluster``, ``score``, ``select``, ``manifest``), run in order by
``datapruning.runner`` over the run folder that ``datapruning.run`` owns; the pruning methods are pure
functions in ``datapruning.metrics`` and ``datapruning.select``; trainers read manifests with
``datapruning.consumers.loaders``.
"""
__version__ = "0.2.0"
