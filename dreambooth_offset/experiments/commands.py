"""`dreambooth-offset experiment NAME`. Each experiment's flags are its schema in
config/commands.py plus the trainer keys of EXPERIMENT_TRAINER_KEYS, declared in the trainer's
schema; values, lowest first: defaults < the shipped base's settings (shipped.py) < flags."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from dreambooth_offset.config import RunConfig, add_arguments, given_values, load_config
from dreambooth_offset.config.commands import (
    EXPERIMENT_TRAINER_KEYS,
    BlackImageConfig,
    BrightnessRangeConfig,
    SubjectExperimentConfig,
)
from dreambooth_offset.errors import UsageError
from dreambooth_offset.experiments.shipped import (SHIPPED_BASE, SHIPPED_BRIGHTNESS_TRAIN, SHIPPED_PRIOR_SIZE,
                                                   SHIPPED_SAMPLING, SHIPPED_SUBJECT_TRAIN)

# (name, schema, summary, trainer settings on the shipped base)
EXPERIMENTS = (
    ("black-image", BlackImageConfig, "Fine-tune on one solid black image without and with offset noise; compare "
                                      "samples.", SHIPPED_BRIGHTNESS_TRAIN),
    ("brightness-range", BrightnessRangeConfig, "Fine-tune on a small captioned set spread over the brightness levels "
                                                "without and with offset noise; compare dark and bright prompts.",
     SHIPPED_BRIGHTNESS_TRAIN),
    ("subject", SubjectExperimentConfig, "DreamBooth a subject without and with offset noise; sample it alone, in a "
                                         "very dark and in a very bright scene; measure brightness and fidelity.",
     SHIPPED_SUBJECT_TRAIN),
)


def register(subparsers) -> None:
    p = subparsers.add_parser("experiment", help="Reproducible experiments (black image, brightness range).")
    sub = p.add_subparsers(dest="experiment", required=True, metavar="NAME")
    for name, schema, summary, shipped_train in EXPERIMENTS:
        shipped = ", ".join(f"{k}={v}" for k, v in {**SHIPPED_SAMPLING, **shipped_train}.items())
        e = sub.add_parser(name, allow_abbrev=False, help=summary,
                           description=f"{summary} Defaults run on the base model the package ships, on CPU, in "
                                       f"minutes; there, sampling and trainer settings default to its own: {shipped}.")
        add_arguments(e, schema, config_file=False)
        add_arguments(e, RunConfig, keys=EXPERIMENT_TRAINER_KEYS, config_file=False,
                      description="Trainer settings for every run (on the shipped base, the defaults are its own).")
        e.set_defaults(func={"black-image": run_black_image, "brightness-range": run_brightness_range,
                             "subject": run_subject}[name])


def parse_settings(items: tuple[str, ...]) -> dict:
    """KEY=VALUE pairs with TOML values (numbers, booleans, lists); a bare word is a string."""
    import tomllib

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--set {item}: expected KEY=VALUE")
        try:
            out[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = value
    return out


def load(args: argparse.Namespace, schema: type):
    """(the experiment's config, the base's path, whether it is the shipped base, the trainer keys
    of every run): defaults < the shipped base's settings (EXPERIMENTS) < flags."""
    given = given_values(args, schema)
    model = given.get("pretrained_model_name_or_path") or str(SHIPPED_BASE)
    shipped = Path(model).resolve() == SHIPPED_BASE
    cfg = load_config(None, {**(SHIPPED_SAMPLING if shipped else {}), **given}, schema)
    if shipped and not (SHIPPED_BASE / "model_index.json").is_file():
        raise UsageError(f"the shipped base is missing from {SHIPPED_BASE}; run `dreambooth-offset pretrain-base`")
    shipped_train = next(train for _, s, _, train in EXPERIMENTS if s is schema) if shipped else {}
    train = {**shipped_train, **given_values(args, RunConfig, EXPERIMENT_TRAINER_KEYS),
             **parse_settings(cfg.study.set)}
    return cfg, model, shipped, train


def check_train(train: dict, with_prior: bool) -> None:
    """Unknown keys and bad values stop here, before minutes of work (prior-set keys come later)."""
    prior = {"with_prior_preservation": True, "class_data_dir": ".", "class_prompt": "an image"}
    load_config(None, {**train, **(prior if with_prior else {})})


def finished(table: str, results: dict, out: Path) -> int:
    print(f"\n{table}\n\nwall time {results['wall_time_s']} s; report: {out / 'report.md'}")
    return 0


def run_black_image(args: argparse.Namespace) -> int:
    from dreambooth_offset.experiments import black_image as bi
    from dreambooth_offset.experiments.report import summary_table

    cfg, model, shipped, train = load(args, BlackImageConfig)
    opts, study = cfg.experiment, cfg.study
    if opts.list_variants:
        for name, overrides in bi.VARIANTS.items():
            print(f"{name:20s} {overrides}")
        return 0
    prior_size = prior_set_size(opts, shipped)
    check_train(train, bool(prior_size or opts.prior_dir or opts.prior_prompts))
    exp = bi.ExperimentConfig(
        model=model, output_dir=Path(opts.output_dir), variants=variants(opts, study, bi), seeds=study.seeds,
        train=train, prompts=study.prompts or default_prompts(shipped, exclude=(opts.black_prompt,)),
        num_images=study.num_images, antithetic=study.antithetic_start_noises,
        num_inference_steps=cfg.sampling.num_inference_steps,
        guidance_scale=cfg.sampling.guidance_scale, sampler=study.sampler, mechanism_check=opts.mechanism_check,
        black_prompt=opts.black_prompt, prior_prompts=opts.prior_prompts, prior_dir=opts.prior_dir,
        output_preservation=opts.output_preservation, jobs=study.jobs,
    )
    if opts.output_preservation and not (prior_size or opts.prior_dir or opts.prior_prompts):
        raise UsageError("--output_preservation takes its captions from the prior set: keep the shipped base's "
                         "(--prior_size N) or give --prior_dir or --prior_prompts")
    if prior_size:
        from dreambooth_offset.experiments.shipped import write_shipped_prior

        prior = write_shipped_prior(exp.output_dir / "data" / "prior", prior_size, [exp.black_prompt, *exp.prompts])
        exp = dataclasses.replace(exp, prior_dir=str(prior))
    results = bi.run_experiment(exp)
    return finished(summary_table(results["runs"], exp.black_prompt), results, exp.output_dir)


def run_brightness_range(args: argparse.Namespace) -> int:
    from dreambooth_offset.experiments import brightness_range as br
    from dreambooth_offset.experiments.report import range_table
    from dreambooth_offset.experiments.runs import GUTTENBERG_PROMPTS, offset_variants

    cfg, model, shipped, train = load(args, BrightnessRangeConfig)
    opts, study = cfg.experiment, cfg.study
    own_data(opts.train_data_dir, "train_data_dir", shipped, "images with .txt captions, as in Guttenberg's "
             "fine-tune", caption_extension=".txt")
    prompts = study.prompts or (br.SHIPPED_PROMPTS if shipped else GUTTENBERG_PROMPTS)
    out = Path(opts.output_dir)
    exp = br.RangeConfig(model=model, output_dir=out, variants=offset_variants(study.noise_offset), seeds=study.seeds,
                         train=with_prior_set(opts, shipped, train, out, prompts), prompts=prompts,
                         train_data_dir=opts.train_data_dir,
                         num_train_images=opts.num_train_images, num_images=study.num_images,
                         antithetic=study.antithetic_start_noises,
                         num_inference_steps=cfg.sampling.num_inference_steps,
                         guidance_scale=cfg.sampling.guidance_scale, sampler=study.sampler, jobs=study.jobs)
    results = br.run_experiment(exp)
    return finished(range_table(results["runs"], list(exp.prompts)), results, exp.output_dir)


def run_subject(args: argparse.Namespace) -> int:
    from dreambooth_offset.experiments import subject as sj
    from dreambooth_offset.experiments.runs import offset_variants

    cfg, model, shipped, train = load(args, SubjectExperimentConfig)
    opts, study = cfg.experiment, cfg.study
    own_data(opts.instance_data_dir, "instance_data_dir", shipped, "your subject's images, with "
             "--instance_prompt and --subject_hue")
    out = Path(opts.output_dir)
    prompts = study.prompts or (sj.SHIPPED_PROMPTS if shipped else (
        opts.instance_prompt, f"{opts.instance_prompt} at night in a very dark room",
        f"{opts.instance_prompt} in the snow on a bright sunny day"))
    train = with_prior_set(opts, shipped, train, out, prompts)
    if opts.instance_data_dir:
        instance = Path(opts.instance_data_dir)
    else:
        from dreambooth_offset.config.recipe import shipped_recipe

        instance = sj.write_subject_images(out / "data" / "subject", sj.NUM_SUBJECT_IMAGES, shipped_recipe().resolution)
    exp = sj.SubjectConfig(model=model, output_dir=out, variants=offset_variants(study.noise_offset), seeds=study.seeds,
                           train=train, prompts=prompts, instance_dir=instance, instance_prompt=opts.instance_prompt,
                           subject_hue=opts.subject_hue, shape=not opts.instance_data_dir, num_images=study.num_images,
                           antithetic=study.antithetic_start_noises,
                           num_inference_steps=cfg.sampling.num_inference_steps,
                           guidance_scale=cfg.sampling.guidance_scale, sampler=study.sampler, jobs=study.jobs)
    results = sj.run_experiment(exp)
    return finished(sj.subject_table(results["runs"], list(exp.prompts)), results, out)


def with_prior_set(opts, shipped: bool, train: dict, out: Path, prompts: tuple[str, ...]) -> dict:
    """`train` with the experiment's prior set: `--prior_dir`, else on the shipped base `--prior_size`
    images of its own training data written to OUT/data/prior (none of them captioned like one of
    `prompts`); checked before minutes of work."""
    from dreambooth_offset.experiments.black_image import prior_keys

    size = opts.prior_size if shipped and not opts.prior_dir else 0
    check_train(train, bool(size or opts.prior_dir))
    if opts.prior_dir:
        return {**prior_keys(Path(opts.prior_dir)), **train}
    if size:
        from dreambooth_offset.experiments.shipped import write_shipped_prior

        return {**prior_keys(write_shipped_prior(out / "data" / "prior", size, list(prompts))), **train}
    return train


def own_data(folder: str | None, flag: str, shipped: bool, what: str, caption_extension: str = "") -> None:
    """The user's data folder of an experiment: required for a base other than the shipped one (which
    brings its own), and checked before minutes of work when given."""
    from dreambooth_offset.training.data import find_images

    if not shipped and not folder:
        raise UsageError(f"--{flag} is required for a base other than the shipped one ({what})")
    if folder:
        find_images(folder, flag, caption_extension=caption_extension)


def variants(opts, study, bi) -> tuple:
    """The runs to compare: named --variants, else one per --noise_offset value."""
    from dreambooth_offset.experiments.runs import offset_variants

    if not opts.variants:
        return offset_variants(study.noise_offset)
    unknown = [v for v in opts.variants if v not in bi.VARIANTS]
    if unknown:
        raise UsageError(f"--variants {unknown[0]}: unknown; known: {', '.join(bi.VARIANTS)}")
    return tuple(bi.Variant(v, bi.VARIANTS[v]) for v in opts.variants)


def default_prompts(shipped: bool, exclude: tuple[str, ...]) -> tuple[str, ...]:
    """The shipped base's own dark / mid / bright prompts, or Guttenberg's four for a real checkpoint."""
    from dreambooth_offset.base_model.pretrain import PROFILE_PROMPTS
    from dreambooth_offset.experiments.runs import GUTTENBERG_PROMPTS

    return tuple(p for p in PROFILE_PROMPTS if p not in exclude) if shipped else GUTTENBERG_PROMPTS


def prior_set_size(opts, shipped: bool) -> int:
    """Images of the shipped base's own training data to train as class images (0: none); checks the
    prior options against the base."""
    size = opts.prior_size
    if size is None:  # the shipped base's default, unless another prior set is given
        size = SHIPPED_PRIOR_SIZE if shipped and not (opts.prior_prompts or opts.prior_dir) else 0
    if size and not shipped:
        raise UsageError("--prior_size draws the shipped base's training data; for another base give "
                         "--prior_dir (your class images) or --prior_prompts (the base's samples)")
    if opts.prior_dir:
        from dreambooth_offset.training.data import find_images

        find_images(opts.prior_dir, "prior_dir", caption_extension=".txt")  # a bad folder stops here
    return size
