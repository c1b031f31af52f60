"""Statistics, tables, grids and plots of the black-image experiment. Pure where possible."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from dreambooth_offset.sampling.images import make_grid, to_pil
from dreambooth_offset.sampling.metrics import DARK_THRESHOLD, bright_fraction, dark_fraction, luminance, mean_luminance


def fit_line(x: Tensor, y: Tensor) -> tuple[float, float]:
    """Least-squares slope of y on x and the R^2 of that fit (0 when y or x is constant)."""
    x, y = x.double().flatten(), y.double().flatten()
    dx, dy = x - x.mean(), y - y.mean()
    sxx, syy, sxy = (dx * dx).sum(), (dy * dy).sum(), (dx * dy).sum()
    if sxx == 0:
        return 0.0, 0.0
    slope = sxy / sxx
    r2 = (sxy * sxy / (sxx * syy)) if syy > 0 else torch.tensor(0.0)
    return float(slope), float(r2)


@dataclass(frozen=True)
class PromptStats:
    mean_luminance: float  # over the images of one run and prompt
    std: float  # of the per-image mean luminance, across sampling seeds
    dark_fraction: float  # mean fraction of pixels with luminance < 0.05
    bright_fraction: float  # mean fraction of pixels with luminance > 0.95
    slope: float  # of the output latents' channel means on the start noise's, within channels
    r2: float
    # each image's mean luminance in start-noise order: the runs of a study sample the same start
    # noises (the black image's mechanism check apart, which starts from the leak), so a run minus
    # the base can be taken per noise, a paired difference with a far smaller standard error than
    # either run's spread (docs/dark-and-bright.md, "The mid prompt over 64 start noises")
    per_sample_luminance: tuple[float, ...]


def within_channel(means: Tensor) -> Tensor:
    """(N, C) channel means minus each channel's average over the N images."""
    return means - means.mean(dim=0, keepdim=True)


def prompt_stats(images: Tensor, start_latents: Tensor, final_latents: Tensor) -> PromptStats:
    """docs/science.md, "Measuring brightness": a model that cannot move the mean shows slope ~ 1/a_T and high R^2
    (the output mean is read off x_T); one that learned the brightness shows a slope near 0.

    The line is fitted within channels (each channel's mean over the images removed from x and y,
    then all channels pooled): the channels of a latent have different average values, and one
    line through all of them would count those differences as unexplained scatter."""
    lum = mean_luminance(images)
    slope, r2 = fit_line(within_channel(start_latents.mean(dim=(2, 3))), within_channel(final_latents.mean(dim=(2, 3))))
    return PromptStats(
        mean_luminance=float(lum.mean()),
        std=float(lum.std(unbiased=False)),
        dark_fraction=float(dark_fraction(images).mean()),
        bright_fraction=float(bright_fraction(images).mean()),
        slope=slope,
        r2=r2,
        per_sample_luminance=tuple(lum.tolist()),
    )


def stats_dict(stats: PromptStats) -> dict[str, float | list[float]]:
    return {k: [round(x, 4) for x in v] if isinstance(v, tuple) else round(v, 4) for k, v in asdict(stats).items()}


def markdown_table(rows: list[dict], prompts: list[str]) -> str:
    """One line per (run, prompt): the figures of results.json, readable."""
    lines = [
        "| run | train seed | prompt | mean luminance +- std | pixels < 0.05 | slope | R^2 |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for prompt in prompts:
            s = row["prompts"].get(prompt)
            if s is None:
                continue
            lines.append(
                f"| {row['name']} | {row['seed'] if row['seed'] is not None else '-'} | {prompt} | "
                f"{s['mean_luminance']:.3f} +- {s['std']:.3f} | {s['dark_fraction']:.1%} | "
                f"{s['slope']:.2f} | {s['r2']:.2f} |"
            )
    return "\n".join(lines)


def summary_table(rows: list[dict], black_prompt: str) -> str:
    """Per run name, averaged over training seeds (mean +- std over seeds): the black prompt's
    luminance, its fraction of dark pixels and slope, and the training wall time."""
    by_name: dict[str, list[dict]] = {}
    for row in rows:
        if black_prompt in row["prompts"]:
            by_name.setdefault(row["name"], []).append({**row["prompts"][black_prompt], "s": row["train_seconds"]})
    lines = [f"| run | '{black_prompt}': mean luminance | pixels < 0.05 | slope | train s | seeds |",
             "|---|---|---|---|---|---|"]

    def fmt(values: list[float], spec: str) -> str:
        t = torch.tensor(values)
        return f"{t.mean():{spec}}" + (f" +- {t.std(unbiased=False):{spec}}" if len(values) > 1 else "")

    for name, stats in by_name.items():
        lines.append(f"| {name} | {fmt([s['mean_luminance'] for s in stats], '.3f')} | "
                     f"{fmt([s['dark_fraction'] for s in stats], '.2f')} | {fmt([s['slope'] for s in stats], '.2f')} | "
                     f"{fmt([s['s'] for s in stats], '.0f')} | {len(stats)} |")
    return "\n".join(lines)


def range_table(rows: list[dict], prompts: list[str]) -> str:
    """Guttenberg's shape: one line per prompt, one column per run name (base first), each cell the
    mean luminance +- its spread (over sampling seeds for one training seed, over training seeds
    for several), then pixels < 0.05 / > 0.95 and the slope."""
    names = list(dict.fromkeys(row["name"] for row in rows))
    lines = ["| prompt | " + " | ".join(names) + " |", "|---" * (1 + len(names)) + "|"]
    for prompt in prompts:
        cells = []
        for name in names:
            stats = [r["prompts"][prompt] for r in rows if r["name"] == name and prompt in r["prompts"]]
            if not stats:
                cells.append("-")
                continue
            mean = {key: sum(s[key] for s in stats) / len(stats)
                    for key in ("mean_luminance", "dark_fraction", "bright_fraction", "slope")}
            lum = torch.tensor([s["mean_luminance"] for s in stats])
            spread = float(lum.std(unbiased=False)) if len(stats) > 1 else stats[0]["std"]
            cells.append(f"{mean['mean_luminance']:.3f} +- {spread:.3f} (<0.05: {mean['dark_fraction']:.2f}, "
                         f">0.95: {mean['bright_fraction']:.2f}, slope {mean['slope']:.2f})")
        lines.append(f"| {prompt} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def start_noises(n: int, antithetic: bool) -> str:
    """How a study's `n` start noises were drawn, for a report's text."""
    if antithetic:
        return f"{n // 2} start noises (sampling seeds 0..{n // 2 - 1}), each followed by its negation"
    return f"sampling seeds 0..{n - 1}"


# each run (its results row) with {prompt: (mean difference, standard error)}
Differences = list[tuple[dict, dict[str, tuple[float, float]]]]


def paired_section(rows: list[dict], prompts: list[str], *, antithetic: bool, against: str = "base",
                   note: str = "", figure: Path | None = None) -> list[str]:
    """A report's lines on each run minus the run named `against` (paired_table), with a heading
    and what the table is; `note` is added to that. With `figure`, the same differences are drawn
    there (save_differences) and the lines show it."""
    reference = "the base" if against == "base" else against
    kind = "fine-tune minus the base" if against == "base" else f"run minus {against} of its own training seed"
    error = ("its standard error (over the antithetic pairs' means, as the two of a pair are not independent)"
             if antithetic else "its standard error")
    diffs = paired_differences(rows, prompts, antithetic=antithetic, against=against)
    lines = [f"## Difference from {reference}, per start noise", "",
             f"Each {kind}, per prompt, paired by start noise: the mean of the per-sample differences +- {error}. "
             "A bar such as 'within 0.05 of the base' or 'at least 0.15 darker' is read here, with that error." + note,
             "", paired_table(diffs, prompts), ""]
    if figure is not None and diffs:
        save_differences(figure, diffs, prompts, reference)
        lines += [f"![each run minus {reference}, +- 2 standard errors]({figure.name})", ""]
    return lines


def paired_difference(run: list[float], reference: list[float], antithetic: bool) -> tuple[float, float]:
    """Mean of the per-sample differences and its standard error. With antithetic start noises
    (z, -z, z', -z', ...) the error comes from the pairs' means, which are independent draws;
    the samples themselves are not (docs/science.md, "Antithetic start noises")."""
    d = torch.tensor(run, dtype=torch.float64) - torch.tensor(reference, dtype=torch.float64)
    units = d.view(-1, 2).mean(1) if antithetic else d
    return float(d.mean()), float(units.std() / len(units) ** 0.5) if len(units) > 1 else float("nan")


def paired_differences(rows: list[dict], prompts: list[str], *, antithetic: bool,
                       against: str = "base") -> Differences:
    """(row, {prompt: (mean, standard error)}) for each run minus the run named `against` of its own
    training seed (the base, which has none); every row must have been sampled from the same start
    noises. Pairing removes what the start noise does to both runs (docs/dark-and-bright.md, "The mid
    prompt over 64 start noises")."""
    reference = {r["seed"]: r for r in rows if r["name"] == against}
    out = []
    for row in rows:
        ref = reference.get(row["seed"], reference.get(None))
        if row["name"] in ("base", against) or ref is None:
            continue
        out.append((row, {p: paired_difference(row["prompts"][p]["per_sample_luminance"],
                                               ref["prompts"][p]["per_sample_luminance"], antithetic)
                          for p in prompts if p in row["prompts"] and p in ref["prompts"]}))
    return out


def paired_table(diffs: Differences, prompts: list[str]) -> str:
    """paired_differences as a markdown table, '-' where a run lacks a prompt."""
    lines = ["| run | train seed | " + " | ".join(prompts) + " |", "|---" * (2 + len(prompts)) + "|"]
    for row, cells in diffs:
        text = [f"{cells[p][0]:+.3f} +- {cells[p][1]:.3f}" if p in cells else "-" for p in prompts]
        lines.append(f"| {row['name']} | {row['seed']} | " + " | ".join(text) + " |")
    return "\n".join(lines)


def save_differences(path: Path, diffs: Differences, prompts: list[str], reference: str) -> None:
    """paired_differences drawn: one panel per prompt, one line per run, each difference with a bar of
    +- 2 standard errors (about 95 %) and the zero line, so a bar's margin is seen with its error."""
    import textwrap

    plt = _pyplot()
    labels = [f"{row['name']}, seed {row['seed']}" for row, _ in diffs]
    names = list(dict.fromkeys(row["name"] for row, _ in diffs))  # one colour per run name
    fig, axes = plt.subplots(1, len(prompts), figsize=(2.6 * len(prompts) + 2.2, 0.35 * len(diffs) + 1.6),
                             sharey=True, squeeze=False)
    for ax, prompt in zip(axes[0], prompts):
        for i, (row, cells) in enumerate(diffs):
            if prompt in cells:
                mean, se = cells[prompt]
                ax.errorbar(mean, i, xerr=2 * se if se == se else 0.0, fmt="o", capsize=3,
                            color=f"C{names.index(row['name']) % 10}")
        ax.axvline(0.0, color="grey", linewidth=1)
        ax.set_title(textwrap.fill(prompt, 28), fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].set_yticks(range(len(labels)), labels, fontsize=7)
    axes[0][0].invert_yaxis()
    fig.supxlabel(f"mean luminance minus {reference}, paired by start noise (+- 2 standard errors)", fontsize=8)
    _save_figure(fig, path)


def save_grid(path: Path, labelled_rows: list[tuple[str, Tensor]]) -> None:
    """One row of images per run, the same start noise in each column."""
    images = [img for _, batch in labelled_rows for img in to_pil(batch)]
    make_grid(images, cols=len(labelled_rows[0][1])).save(path)


def save_histogram(path: Path, labelled: list[tuple[str, Tensor]], title: str) -> None:
    """Pixel-luminance histograms, one line per run, for one prompt."""
    fig, ax = _pyplot().subplots(figsize=(7, 4))
    bins = torch.linspace(0, 1, 51)
    for label, images in labelled:
        counts = torch.histc(luminance(images).flatten(), bins=50, min=0.0, max=1.0)
        ax.step(bins[:-1].numpy(), (counts / counts.sum()).numpy(), where="post", label=label)
    ax.axvline(DARK_THRESHOLD, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("pixel luminance (Rec. 709)")
    ax.set_ylabel("fraction of pixels")
    ax.set_title(title)
    ax.legend(fontsize=8)
    _save_figure(fig, path)


def _pyplot():
    """matplotlib's pyplot on the file-only backend (no display on a CPU server or in CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
