"""Ready-made recipes, one per method (``python -m datapruning.pipelines.<name>``), and the reference trainer."""

RECIPES = ("ssp", "semdedup_dbp", "dp4tl_lm", "dp4tl_fm", "el2n_ccs", "random_kd", "clip_dbp")  # modules beside train
