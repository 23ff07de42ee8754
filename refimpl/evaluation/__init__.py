"""Evaluation: augmented generation, the paper's tables at tiny scale, the report and its plots."""
