"""The CI-scale configurations of the black-image, brightness-range and subject regression tests,
shared by the tests and by the script that measured their bounds over training seeds (`python -m
tests.experiments.ci_scale OUT_DIR [NAME]`, which prints each seed's figures)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from dreambooth_offset.base_model.pretrain import PROFILE_PROMPTS
from dreambooth_offset.config.commands import PriorSetOptions
from dreambooth_offset.experiments.commands import with_prior_set
from dreambooth_offset.experiments.runs import offset_variants
from dreambooth_offset.experiments.shipped import (SHIPPED_BASE, SHIPPED_BRIGHTNESS_TRAIN, SHIPPED_PRIOR_SIZE,
                                                   SHIPPED_SAMPLING, SHIPPED_SUBJECT_TRAIN, write_shipped_prior)

SUBJECT_STEPS = 200  # the subject: two fifths of the default's 500; the learning rate still decays linearly to 0 over the run
RANGE_STEPS = 100  # the brightness range: a quarter of its default's 400
BLACK_STEPS = 200  # the black image: half its default's 400
BLACK_IMAGE_PROMPTS = (PROFILE_PROMPTS[3],)  # the black image's bright prompt, beside the black one
# Two of each experiment's prompts (sampling is about a third of a run's time); the brightness
# range still trains on the default's 40 images (which leave out all five of its prompts).
RANGE_PROMPTS = ("a very dark red circle on a blue background",
                 "a very bright landscape with a blue sky and green ground and a sun")


def black_image(out: Path, seeds: tuple[int, ...] = (0,)):
    """The default experiment (its prior set, the shipped settings) at BLACK_STEPS: the black and
    bright prompts, no mechanism check."""
    from dreambooth_offset.experiments import black_image as bi

    prior = write_shipped_prior(out / "data" / "prior", SHIPPED_PRIOR_SIZE, list(PROFILE_PROMPTS))  # as the default
    cfg = bi.ExperimentConfig(model=str(SHIPPED_BASE), output_dir=out, variants=offset_variants((0.0, 0.1)),
                              seeds=seeds, train={**SHIPPED_BRIGHTNESS_TRAIN, "max_train_steps": BLACK_STEPS},
                              prompts=BLACK_IMAGE_PROMPTS, mechanism_check=False, prior_dir=str(prior),
                              **SHIPPED_SAMPLING)
    return bi.run_experiment(cfg)


def brightness_range(out: Path, seeds: tuple[int, ...] = (0,)):
    from dreambooth_offset.experiments import brightness_range as br

    data = br.write_training_set(out / "data" / "train", br.RangeConfig.num_train_images, br.SHIPPED_PROMPTS)
    prior = with_prior_set(PriorSetOptions(), True, {}, out, br.SHIPPED_PROMPTS)
    cfg = br.RangeConfig(model=str(SHIPPED_BASE), output_dir=out, variants=offset_variants((0.0, 0.1)), seeds=seeds,
                         train={**prior, **SHIPPED_BRIGHTNESS_TRAIN, "max_train_steps": RANGE_STEPS},
                         prompts=RANGE_PROMPTS, train_data_dir=str(data), **SHIPPED_SAMPLING)
    return br.run_experiment(cfg)


def subject(out: Path, seeds: tuple[int, ...] = (0,)):
    from dreambooth_offset.config.recipe import shipped_recipe
    from dreambooth_offset.experiments import subject as sj

    prior = with_prior_set(PriorSetOptions(), True, {}, out, sj.SHIPPED_PROMPTS)
    instance = sj.write_subject_images(out / "data" / "subject", sj.NUM_SUBJECT_IMAGES, shipped_recipe().resolution)
    cfg = sj.SubjectConfig(model=str(SHIPPED_BASE), output_dir=out, variants=offset_variants((0.0, 0.1)), seeds=seeds,
                           train={**prior, **SHIPPED_SUBJECT_TRAIN, "max_train_steps": SUBJECT_STEPS},
                           prompts=(sj.SHIPPED_PROMPTS[0], sj.SHIPPED_PROMPTS[2]),
                           instance_dir=instance, shape=True, **SHIPPED_SAMPLING)
    return sj.run_experiment(cfg)


def by_seed(results: dict) -> dict:
    """{seed: {run name: {prompt: stats}}} of the fine-tunes, and the base under seed None."""
    out: dict = {}
    for row in results["runs"]:
        out.setdefault(row["seed"], {})[row["name"]] = row["prompts"]
    return out


if __name__ == "__main__":  # python -m tests.experiments.ci_scale OUT_DIR [black-image | brightness-range | subject]
    root, only = Path(sys.argv[1]), sys.argv[2:]
    for name, run in (("black-image", black_image), ("brightness-range", brightness_range), ("subject", subject)):
        if only and name not in only:
            continue
        results = run(root / name, (0, 1, 2))
        print(name, results["wall_time_s"], "s")
        print(json.dumps(by_seed(results), indent=1))
