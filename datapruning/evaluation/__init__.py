"""Evaluation of a run: pruning curves with a linear probe, plots, and the HTML report."""
