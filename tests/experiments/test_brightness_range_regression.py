"""The brightness-range experiment's regression case on the shipped base, through the real trainer
(docs/dark-and-bright.md): the default's 40-image fine-tune with its prior set, timesteps 700-999
and the text encoder's LoRA, without and with offset noise 0.1, at CI scale
(tests/experiments/ci_scale.py: the shipped settings but 100 steps instead of 400; the dark circle
and the bright landscape), seed 0.

Measured 2026-12-08 over training seeds 0 / 1 / 2 with this configuration and its 40 images over
every (brightness level, kind of image) cell (`python -m tests.experiments.ci_scale OUT
brightness-range`; 8 samples from 4 antithetic start-noise pairs): the slope of the output's
channel means on the start noise's drops with offset by 1.221 / 1.015 / 1.159 (dark circle, std
0.106) and 1.341 / 0.989 / 1.090 (bright landscape, std 0.182); the no-offset run stays within
0.046 of the base on both prompts and every seed (-0.045 / -0.017 / -0.046 and -0.042 / +0.011 /
-0.019, std up to 0.027). Bounds: the worst seed's value moved by about one standard deviation over
seeds. Not asserted at this scale: the luminance moving (offset minus no offset, dark circle -0.157
/ +0.034 / -0.040, bright landscape +0.151 / +0.100 / +0.059: the dark circle shows no direction on
seed 1 after 100 steps), the mid prompt (not sampled here; with 8 independent start noises on
2026-12-07 its offset run minus the base read -0.031 / +0.051 / +0.070 at this scale), and the
issue's absolute bars. With 8 independent start noises (2026-12-07) the slope drops were 1.037 /
0.853 / 0.925 and 1.031 / 0.834 / 0.873 and the no-offset run within 0.048 (bounds 0.7 and 0.08).
"""
import pytest

from tests.experiments.ci_scale import RANGE_PROMPTS, brightness_range, by_seed

SLOPE_DROP_AT_LEAST = 0.8  # smallest drop 0.989 - 0.18
NO_OFFSET_WITHIN = 0.08  # largest |no offset - base| 0.046 + 0.027


@pytest.mark.slow
def test_offset_noise_stops_reading_the_start_noise(tmp_path):
    runs = by_seed(brightness_range(tmp_path))
    base, plain, offset = runs[None]["base"], runs[0]["noise_offset=0"], runs[0]["noise_offset=0.1"]
    for prompt in RANGE_PROMPTS:
        assert plain[prompt]["slope"] - offset[prompt]["slope"] >= SLOPE_DROP_AT_LEAST, (prompt, plain, offset)
        assert abs(plain[prompt]["mean_luminance"] - base[prompt]["mean_luminance"]) <= NO_OFFSET_WITHIN, prompt
