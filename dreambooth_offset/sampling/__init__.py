"""Sampling: brightness metrics, images and grids, generation, validation, class images; `generate`."""
