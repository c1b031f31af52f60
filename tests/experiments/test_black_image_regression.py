"""The black-image regression case (docs/science.md, "The black-image case") on the shipped base,
through the real trainer: the default experiment's two LoRA fine-tunes on one solid black image with
its 256-image prior set, timesteps 700-999 and the text encoder's LoRA, identical but for the noise,
at CI scale (tests/experiments/ci_scale.py: 200 steps instead of 400; the black and bright
prompts, no mechanism check), seed 0.

Measured 2026-12-08 over training seeds 0 / 1 / 2 with exactly this configuration (`python -m
tests.experiments.ci_scale OUT black-image`; 8 samples from 4 antithetic start-noise pairs),
mean luminance: black prompt without offset 0.385 / 0.483 / 0.458 (std 0.051), with offset 0.041 /
0.057 / 0.088 (std 0.024), gaps 0.345 / 0.426 / 0.370 (std 0.042); the black prompt's slope drops
with offset by 2.49 / 1.91 / 2.01 (std 0.31); the bright prompt with offset minus the base +0.020 /
+0.090 / +0.119 (std 0.051). Each bound is the worst seed's value moved by about one standard
deviation over seeds. The bright bound is the dark/bright-scenes rule (docs/dark-and-bright.md) in
its direction: the default until 2026-12-07 (all timesteps, the UNet's LoRA only) darkened the
bright prompt with offset, by up to -0.25 at 600 steps.

Measured 2026-12-07 with 8 independent start noises (the bounds of then: 0.28, 0.11, 0.25, 1.35,
-0.02): 0.341 / 0.447 / 0.418, 0.038 / 0.051 / 0.082, slope drops 2.10 / 1.64 / 1.72, bright
+0.036 / +0.104 / +0.141; the previous default's settings in this very configuration (seed 0, 200
steps) gave the black prompt 0.388 without and 0.215 with offset, a slope drop of 0.71 and the
bright prompt 0.049 below the base. Not asserted: the dark prompt, which at 200 steps showed no
direction yet (offset minus base -0.154 / +0.011 / +0.061; at the default 400 steps -0.18 to -0.45
on four seeds), the mid prompt, and the issue's absolute bars (docs/black-image-experiment.md).
"""
import pytest

from dreambooth_offset.experiments.black_image import BLACK_PROMPT
from tests.experiments.ci_scale import BLACK_IMAGE_PROMPTS, black_image, by_seed

NO_OFFSET_AT_LEAST = 0.33  # lowest seed 0.385 - 0.051
OFFSET_AT_MOST = 0.11  # highest seed 0.088 + 0.024
GAP_AT_LEAST = 0.30  # smallest seed gap 0.345 - 0.042
SLOPE_DROP_AT_LEAST = 1.6  # smallest drop 1.91 - 0.31
BRIGHT_OVER_BASE_AT_LEAST = -0.03  # smallest seed +0.020 - 0.051


@pytest.mark.slow
def test_offset_noise_learns_black_and_leaves_the_bright_prompt_bright(tmp_path):
    runs = by_seed(black_image(tmp_path))
    base, plain, offset = runs[None]["base"], runs[0]["noise_offset=0"], runs[0]["noise_offset=0.1"]
    black = {"no offset": plain[BLACK_PROMPT], "offset": offset[BLACK_PROMPT]}
    assert black["no offset"]["mean_luminance"] >= NO_OFFSET_AT_LEAST, black
    assert black["offset"]["mean_luminance"] <= OFFSET_AT_MOST, black
    assert black["no offset"]["mean_luminance"] - black["offset"]["mean_luminance"] >= GAP_AT_LEAST, black
    # the diagnostic: without offset the output's mean follows the start noise's; with offset much less
    assert black["no offset"]["slope"] - black["offset"]["slope"] >= SLOPE_DROP_AT_LEAST, black
    bright = BLACK_IMAGE_PROMPTS[0]
    gain = offset[bright]["mean_luminance"] - base[bright]["mean_luminance"]
    assert gain >= BRIGHT_OVER_BASE_AT_LEAST, (bright, offset[bright], base[bright])
