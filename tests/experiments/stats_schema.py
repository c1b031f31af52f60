"""The per-prompt figures every experiment writes into results.json, checked the same way everywhere."""

KEYS = {"mean_luminance", "std", "dark_fraction", "bright_fraction", "slope", "r2", "per_sample_luminance"}


def check_prompt_stats(stats: dict, num_images: int) -> None:
    assert set(stats) == KEYS
    per_sample = stats["per_sample_luminance"]  # one per start noise, 4 decimals like the mean
    assert len(per_sample) == num_images and abs(sum(per_sample) / num_images - stats["mean_luminance"]) <= 1e-4
