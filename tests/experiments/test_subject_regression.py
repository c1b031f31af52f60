"""The subject experiment's regression case on the shipped base, through the real trainer
(docs/dark-and-bright.md): DreamBooth of the plus sign with the 256-image prior set, without and
with offset noise 0.1, at CI scale (tests/experiments/ci_scale.py: the shipped settings but 200
steps instead of 600, the subject alone and in a very bright scene), seed 0.

Measured 2026-12-03 over training seeds 0 / 1 / 2 with exactly this configuration (`python -m
tests.experiments.ci_scale`): "a very bright sks object", offset minus no offset, +0.055 / +0.070 /
+0.036 (std 0.014); the subject alone's shape score, offset minus no offset, +0.002 / +0.019 /
+0.029, against a spread over seeds of 0.003 (no offset) and 0.014 (offset). The bright bound is
the worst seed's gain moved by one standard deviation; the fidelity bound is the issue's "no worse
than without, within the spread over seeds" (0.01). At 200 steps neither run has learned much of
the plus sign yet (shape 0.48-0.52, the base's samples 0.49; 0.54-0.58 at the default 600 steps),
so the fidelity half guards against the offset run losing it, not the learning itself. Not
asserted: the very dark scene (-0.083 / +0.075 / +0.023 at 300 steps: no direction) and the
issue's 0.15 bars, which the default meets on some seeds only.
"""
import pytest

from dreambooth_offset.experiments.subject import SHIPPED_PROMPTS
from tests.experiments.ci_scale import by_seed, subject

BRIGHT_GAIN_AT_LEAST = 0.02  # smallest seed +0.036 - 0.014
SHAPE_LOSS_AT_MOST = 0.01  # the spread of the shape score over seeds


@pytest.mark.slow
def test_offset_noise_brightens_the_bright_scene_without_costing_the_subject(tmp_path):
    runs = by_seed(subject(tmp_path))
    plain, offset = runs[0]["noise_offset=0"], runs[0]["noise_offset=0.1"]
    alone, bright = SHIPPED_PROMPTS[0], SHIPPED_PROMPTS[2]
    gain = offset[bright]["mean_luminance"] - plain[bright]["mean_luminance"]
    assert gain >= BRIGHT_GAIN_AT_LEAST, (gain, offset[bright], plain[bright])
    assert offset[alone]["subject_shape"] >= plain[alone]["subject_shape"] - SHAPE_LOSS_AT_MOST, (offset, plain)
