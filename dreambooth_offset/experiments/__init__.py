"""Reproducible experiments on the shipped base or a real checkpoint; `experiment NAME`."""
