"""The brightness-range experiment's regression case on the shipped base, through the real trainer
(docs/dark-and-bright.md): the default's 40-image fine-tune with its prior set, timesteps 700-999
and the text encoder's LoRA, without and with offset noise 0.1, at CI scale
(tests/experiments/ci_scale.py: the shipped settings but 100 steps instead of 400; the dark circle
and the bright landscape), seed 0.

Measured 2026-12-07 over training seeds 0 / 1 / 2 with this configuration and its 40 images over
every (brightness level, kind of image) cell (`python -m tests.experiments.ci_scale OUT
brightness-range`, then also sampling the mid prompt, which the test leaves out to keep the suite
within 10 minutes; each prompt is sampled from the same start noises whatever the others): the
slope of the output's channel means on the start noise's drops with offset by 1.037 / 0.853 /
0.925 (dark circle) and 1.031 / 0.834 / 0.873 (bright landscape) (std over seeds 0.09-0.10); the
no-offset run stays within 0.048 of the base on both prompts and every seed (std over seeds up to
0.028). Bounds: the worst seed's value moved by about one standard deviation over seeds. Not
asserted at this scale: the luminance moving (offset minus no offset, dark circle -0.140 / +0.042
/ -0.034, bright landscape +0.158 / +0.101 / +0.066: the dark circle shows no direction on seed 1
after 100 steps), the mid prompt (slope drop 1.066 / 0.901 / 0.927; offset minus base -0.031 /
+0.051 / +0.070; at the default 400 steps +0.016 / +0.091 / +0.145, docs/dark-and-bright.md), and
the issue's absolute bars.
"""
import pytest

from tests.experiments.ci_scale import RANGE_PROMPTS, brightness_range, by_seed

SLOPE_DROP_AT_LEAST = 0.7  # smallest drop 0.834 - 0.10
NO_OFFSET_WITHIN = 0.08  # largest |no offset - base| 0.048 + 0.028


@pytest.mark.slow
def test_offset_noise_stops_reading_the_start_noise(tmp_path):
    runs = by_seed(brightness_range(tmp_path))
    base, plain, offset = runs[None]["base"], runs[0]["noise_offset=0"], runs[0]["noise_offset=0.1"]
    for prompt in RANGE_PROMPTS:
        assert plain[prompt]["slope"] - offset[prompt]["slope"] >= SLOPE_DROP_AT_LEAST, (prompt, plain, offset)
        assert abs(plain[prompt]["mean_luminance"] - base[prompt]["mean_luminance"]) <= NO_OFFSET_WITHIN, prompt
