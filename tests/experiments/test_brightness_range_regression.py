"""The brightness-range experiment's regression case on the shipped base, through the real trainer
(docs/dark-and-bright.md): the default's 40-image fine-tune without and with offset noise 0.1, at
CI scale (tests/experiments/ci_scale.py: the shipped settings but 200 steps instead of 600, the
bright landscape and the mid prompt), seed 0.

Measured 2026-12-03 over training seeds 0 / 1 / 2 with exactly this configuration (`python -m
tests.experiments.ci_scale`): the slope of the output's channel means on the start noise's drops
with offset by 0.347 / 0.336 / 0.378 (bright landscape) and 0.384 / 0.305 / 0.396 (mid) (std of a
prompt's drops 0.02-0.04); the no-offset run stays within 0.031 of the base on both prompts and
every seed (std over seeds 0.010); the mid prompt within 0.020 of the base in both runs. Bounds:
the worst seed's value moved by about one standard deviation over seeds; for the mid prompt the
issue's own bar (+-0.05). Not asserted at this scale: the bright landscape brightening (offset
minus no offset -0.091 / +0.056 / +0.018 at 200 steps; +0.052 / +0.083 / +0.061 at 300 steps and
+0.063 to +0.085 at the default 600, docs/dark-and-bright.md), and the issue's absolute bars.
"""
import pytest

from tests.experiments.ci_scale import RANGE_PROMPTS, brightness_range, by_seed

SLOPE_DROP_AT_LEAST = 0.26  # smallest drop 0.305 - 0.04
NO_OFFSET_WITHIN = 0.04  # largest |no offset - base| 0.031 + 0.010
MID_WITHIN = 0.05  # the bar for the mid prompt


@pytest.mark.slow
def test_offset_noise_stops_reading_the_start_noise_and_keeps_the_mid_prompt(tmp_path):
    runs = by_seed(brightness_range(tmp_path))
    base, plain, offset = runs[None]["base"], runs[0]["noise_offset=0"], runs[0]["noise_offset=0.1"]
    for prompt in RANGE_PROMPTS:
        assert plain[prompt]["slope"] - offset[prompt]["slope"] >= SLOPE_DROP_AT_LEAST, (prompt, plain, offset)
        assert abs(plain[prompt]["mean_luminance"] - base[prompt]["mean_luminance"]) <= NO_OFFSET_WITHIN, prompt
    mid = RANGE_PROMPTS[1]
    assert abs(offset[mid]["mean_luminance"] - base[mid]["mean_luminance"]) <= MID_WITHIN, (offset[mid], base[mid])
