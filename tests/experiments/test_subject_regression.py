"""The subject experiment's regression case on the shipped base, through the real trainer
(docs/dark-and-bright.md): DreamBooth of the plus sign with the 256-image prior set and the UNet's
LoRA on timesteps 300-999, without and with offset noise 0.1, at CI scale
(tests/experiments/ci_scale.py: the shipped settings, lr 2.4e-3, but 200 steps instead of 500, the
subject alone and in a very bright scene), seed 0.

Measured 2026-12-08 over training seeds 0 / 1 / 2 with exactly this configuration (`python -m
tests.experiments.ci_scale OUT subject`; 8 samples from 4 antithetic start-noise pairs): "a very
bright sks object", offset minus no offset, +0.112 / +0.101 / +0.055 (std 0.030); the subject
alone's shape score, offset minus no offset, +0.023 / +0.012 / +0.038, against a spread over seeds
of 0.015 (no offset) and 0.007 (offset). The bright bound is the worst seed's gain moved by one
standard deviation; the fidelity bound is the issue's "no worse than without, within the spread
over seeds" (0.01). At 200 steps neither run has learned much of the plus sign yet (shape
0.48-0.52, the base's samples 0.50; 0.51-0.62 at the default 500 steps), so the fidelity half
guards against the offset run losing it, not the learning itself. Not asserted: the very dark
scene and the issue's 0.15 bars, which need the default's 500 steps (docs/dark-and-bright.md:
-0.18 to -0.27 and +0.15 to +0.25 on three seeds). With 8 independent start noises (2026-12-07)
the same measurement gave +0.119 / +0.110 / +0.050 (std 0.038) and +0.019 / +0.005 / +0.025 (bound
0.013); with the previous default's lr 2e-3 +0.107 / +0.085 / +0.047 and +0.025 / +0.015 / +0.022
(bound 0.017); with all timesteps, +0.055 / +0.070 / +0.036 and +0.002 / +0.019 / +0.029 (bound
0.02).
"""
import pytest

from dreambooth_offset.experiments.subject import SHIPPED_PROMPTS
from tests.experiments.ci_scale import by_seed, subject

BRIGHT_GAIN_AT_LEAST = 0.025  # smallest seed +0.055 - 0.030
SHAPE_LOSS_AT_MOST = 0.01  # the spread of the shape score over seeds


@pytest.mark.slow
def test_offset_noise_brightens_the_bright_scene_without_costing_the_subject(tmp_path):
    runs = by_seed(subject(tmp_path))
    plain, offset = runs[0]["noise_offset=0"], runs[0]["noise_offset=0.1"]
    alone, bright = SHIPPED_PROMPTS[0], SHIPPED_PROMPTS[2]
    gain = offset[bright]["mean_luminance"] - plain[bright]["mean_luminance"]
    assert gain >= BRIGHT_GAIN_AT_LEAST, (gain, offset[bright], plain[bright])
    assert offset[alone]["subject_shape"] >= plain[alone]["subject_shape"] - SHAPE_LOSS_AT_MOST, (offset, plain)
