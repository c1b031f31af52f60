"""kohya's dataset layout and caption options: `N_name` concept folders (repeats, folder-name
captions, several concepts, reg folders as class images) and --shuffle_caption / --keep_tokens /
--caption_dropout_rate / --caption_tag_dropout_rate / --caption_prefix / --caption_suffix."""
from collections import Counter

import pytest
import torch

from dreambooth_offset.cli import main
from dreambooth_offset.data.captions import CaptionPolicy, apply_policy
from dreambooth_offset.data.subsets import kohya_subsets
from dreambooth_offset.errors import UsageError
from dreambooth_offset.training.family import tokenize
from dreambooth_offset.training.prepare import prepare
from tests.tiny import assert_resume_is_bit_exact, flags, overrides, write_images


def concepts(root, names_and_colours):
    for name, colours in names_and_colours.items():
        write_images(root / name, colours)
    return root


def test_concept_folders_give_repeats_and_captions_and_bad_names_are_refused(tmp_path):
    root = concepts(tmp_path / "train", {"10_sks dog": [(200, 0, 0)], "2_a_cat": [(0, 0, 200)]})
    subsets = kohya_subsets(root, "train_data_dir")
    assert [(s.image_dir.name, s.caption, s.num_repeats) for s in subsets] == [("10_sks dog", "sks dog", 10),
                                                                              ("2_a_cat", "a_cat", 2)]  # by name
    for bad in ("dog", "0_dog", "x_dog"):
        (root / bad).mkdir()
        with pytest.raises(UsageError, match=f"--train_data_dir .*{bad}: a concept folder is named N_name"):
            kohya_subsets(root, "train_data_dir")
        (root / bad).rmdir()
    with pytest.raises(UsageError, match="no concept folders"):
        kohya_subsets(tmp_path / "train" / "10_sks dog", "train_data_dir")


def test_caption_options_do_what_kohya_documents():
    g = torch.Generator().manual_seed(0)
    caption = "sks dog, red collar, grass, sunny"
    shuffled = CaptionPolicy(shuffle=True, keep_tokens=1)
    seen = {apply_policy(caption, shuffled, g) for _ in range(200)}
    assert len(seen) == 6 and all(c.startswith("sks dog, ") for c in seen)  # 3! orders of the movable tags
    assert apply_policy(caption, CaptionPolicy(dropout_rate=1.0), g) == ""
    assert apply_policy(caption, CaptionPolicy(tag_dropout_rate=1.0, keep_tokens=2), g) == "sks dog, red collar"
    kept = Counter(t for _ in range(2000) for t in apply_policy(caption, CaptionPolicy(tag_dropout_rate=0.25), g)
                   .split(", ") if t)
    # each tag kept with probability 0.75: 1500 of 2000, binomial sd 19.4; 5 sd either side
    assert all(abs(n - 1500) < 5 * 19.4 for n in kept.values()) and len(kept) == 4
    fixed = CaptionPolicy(prefix="masterpiece,", suffix="photo")
    assert apply_policy(caption, fixed) == "masterpiece, sks dog, red collar, grass, sunny photo"
    assert apply_policy(caption, CaptionPolicy(dropout_rate=1.0, prefix="p")) == ""  # not on dropped ones
    a, b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert [apply_policy(caption, shuffled, a) for _ in range(5)] == [apply_policy(caption, shuffled, b) for _ in range(5)]


def test_train_and_reg_folders_feed_the_batches(tiny_model, tmp_path):
    train = concepts(tmp_path / "train", {"3_sks dog": [(200, 0, 0)], "1_sks cat": [(0, 0, 200)]})
    (train / "1_sks cat" / "img0.txt").write_text("sks cat, sitting")
    reg = concepts(tmp_path / "reg", {"1_dog": [(90, 90, 90), (60, 60, 60)]})
    cfg = overrides(tiny_model, "", tmp_path / "out", instance_prompt="", train_data_dir=str(train),
                    reg_data_dir=str(reg), caption_extension=".txt", train_batch_size=1)
    run = prepare(cfg)
    batches = run.batches
    assert batches.slots == {"instance": [0, 1, 1, 1], "class": [0, 1]}  # folders in name order: 1_, then 3_
    assert batches.captions == {"instance": ["sks cat, sitting", "sks dog"], "class": ["dog", "dog"]}
    rows = [batches(step, torch.Generator().manual_seed(0)) for step in range(8)]
    assert all(b.num_instance == 1 and b.latents.shape[0] == 2 for b in rows)  # instance || class rows
    dog, cat = (tokenize(run.parts.tokenizers, [c])[0] for c in ("sks dog", "sks cat, sitting"))
    firsts = Counter("dog" if torch.equal(b.input_ids[0], dog) else "cat" if torch.equal(b.input_ids[0], cat)
                     else "?" for b in rows)
    assert firsts == {"dog": 6, "cat": 2}  # two epochs of 3 + 1 places
    assert run.dataset == {
        "tag_frequency": {"1_sks cat": {"sks cat": 1, "sitting": 1}, "3_sks dog": {"sks dog": 1}, "1_dog": {"dog": 2}},
        "dataset_dirs": {"1_sks cat": {"n_repeats": 1, "img_count": 1}, "3_sks dog": {"n_repeats": 3, "img_count": 1},
                         "1_dog": {"n_repeats": 1, "img_count": 2}},
        "num_train_images": 4, "num_reg_images": 2}


def test_the_webui_file_carries_kohyas_dataset_keys_and_export_writes_the_same(sd1_model, tmp_path):
    import json

    from dreambooth_offset.webui.lora_file import read_lora_file

    train = concepts(tmp_path / "train", {"2_sks dog": [(200, 0, 0), (150, 0, 0)]})
    (train / "2_sks dog" / "img1.txt").write_text("sks dog, Grass ")
    out = tmp_path / "out"
    assert main(flags(sd1_model, "", out, instance_prompt="", train_data_dir=train, caption_extension=".txt",
                      max_train_steps=1, output_name="sks")) == 0
    _, trained = read_lora_file(out / "sks.safetensors")
    assert json.loads(trained["ss_tag_frequency"]) == {"2_sks dog": {"sks dog": 2, "grass": 1}}
    assert json.loads(trained["ss_dataset_dirs"]) == {"2_sks dog": {"n_repeats": 2, "img_count": 2}}
    assert (trained["ss_num_train_images"], trained["ss_num_reg_images"]) == ("4", "0")
    assert main(["export", str(out), "-o", str(tmp_path / "exported.safetensors")]) == 0
    _, exported = read_lora_file(tmp_path / "exported.safetensors")
    assert all(exported[k] == trained[k] for k in trained if k.startswith(("ss_tag", "ss_dataset", "ss_num_")))


def test_caption_dropout_trains_the_empty_caption(tiny_model, instance_dir, tmp_path):
    run = prepare(overrides(tiny_model, instance_dir, tmp_path / "out", caption_dropout_rate=1.0))
    batch = run.batches(0, torch.Generator().manual_seed(0))
    empty = tokenize(run.parts.tokenizers, [""])[0]
    assert batch.conditioning is None and all(torch.equal(row, empty) for row in batch.input_ids)


def test_flags_that_cannot_go_together_are_refused(tiny_model, instance_dir, tmp_path):
    with pytest.raises(UsageError, match="instance_data_dir and train_data_dir both set"):
        overrides(tiny_model, instance_dir, tmp_path, train_data_dir=str(tmp_path))
    with pytest.raises(UsageError, match="reg_data_dir and with_prior_preservation both set"):
        overrides(tiny_model, instance_dir, tmp_path, reg_data_dir=str(tmp_path), with_prior_preservation=True,
                  class_data_dir=str(tmp_path), class_prompt="a dog")
    with pytest.raises(UsageError, match="caption_dropout_rate = 1.5"):
        overrides(tiny_model, instance_dir, tmp_path, caption_dropout_rate=1.5)


def test_resume_is_bit_exact_with_repeats_and_random_captions(tiny_model, tmp_path):
    train = concepts(tmp_path / "train", {"3_sks dog": [(200, 0, 0), (180, 20, 0)], "1_sks cat": [(0, 0, 200)]})
    for i, img in enumerate(sorted((train / "3_sks dog").glob("*.png"))):
        img.with_suffix(".txt").write_text(f"sks dog, tag{i}, red, outdoors")
    assert_resume_is_bit_exact(tiny_model, "", tmp_path, instance_prompt="", train_data_dir=train,
                               caption_extension=".txt", shuffle_caption=True, keep_tokens=1, caption_dropout_rate=0.3,
                               caption_tag_dropout_rate=0.2, max_train_steps=4, checkpointing_steps=2,
                               train_text_encoder=True, seed=4)