"""The brightness-range experiment's regression case on the shipped base, through the real trainer
(docs/dark-and-bright.md): the default's 40-image fine-tune with its prior set, timesteps 700-999
and the text encoder's LoRA, without and with offset noise 0.1, at CI scale
(tests/experiments/ci_scale.py: the shipped settings but 100 steps instead of 400; the dark circle
and the bright landscape), seed 0.

Measured 2026-12-07 over training seeds 0 / 1 / 2 with this configuration (`python -m
tests.experiments.ci_scale OUT brightness-range`, then also sampling the mid prompt, which the
test leaves out to keep the suite within 10 minutes; each prompt is sampled from the same start
noises whatever the others): the slope of the output's channel means on the start noise's drops
with offset by 1.081 / 0.852 / 0.820 (dark circle) and 1.103 / 0.836 / 0.785 (bright landscape)
(std over seeds 0.14-0.17); the no-offset run stays within 0.033 of the base on both prompts and
every seed (std over seeds up to 0.022). Bounds: the worst seed's value moved by about one
standard deviation over seeds. Not asserted at this scale: the luminance moving (offset minus no
offset, dark circle -0.127 / -0.011 / -0.061, bright landscape +0.092 / -0.019 / +0.082: seed 1
shows no direction after 100 steps), the mid prompt (slope drop 1.133 / 0.874 / 0.839; offset
minus base -0.006 / +0.036 / +0.070; at the default 400 steps it brightens by 0.07-0.21,
docs/dark-and-bright.md), and the issue's absolute bars.
"""
import pytest

from tests.experiments.ci_scale import RANGE_PROMPTS, brightness_range, by_seed

SLOPE_DROP_AT_LEAST = 0.6  # smallest drop 0.785 - 0.17
NO_OFFSET_WITHIN = 0.05  # largest |no offset - base| 0.033 + 0.022


@pytest.mark.slow
def test_offset_noise_stops_reading_the_start_noise(tmp_path):
    runs = by_seed(brightness_range(tmp_path))
    base, plain, offset = runs[None]["base"], runs[0]["noise_offset=0"], runs[0]["noise_offset=0.1"]
    for prompt in RANGE_PROMPTS:
        assert plain[prompt]["slope"] - offset[prompt]["slope"] >= SLOPE_DROP_AT_LEAST, (prompt, plain, offset)
        assert abs(plain[prompt]["mean_luminance"] - base[prompt]["mean_luminance"]) <= NO_OFFSET_WITHIN, prompt
