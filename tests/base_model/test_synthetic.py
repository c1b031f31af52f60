"""The procedural data spans dark to bright, is seeded, and its captions say so."""
import torch

from dreambooth_offset.base_model import synthetic
from dreambooth_offset.sampling.metrics import luminance


def batch(seed=0, n=300):
    return synthetic.make_batch(n, 32, torch.Generator().manual_seed(seed))


def test_luminance_spreads_and_centres_near_half():
    b = batch()
    y = luminance(b.images).mean(dim=(-1, -2))
    assert b.images.shape == (300, 3, 32, 32)
    assert y.min() < 0.08 and y.max() > 0.92
    assert abs(float(y.mean()) - 0.5) < 0.06


def test_captions_name_the_brightness():
    b = batch()
    y = luminance(b.images).mean(dim=(-1, -2))
    dark = torch.tensor(["very dark" in c for c in b.captions])
    bright = torch.tensor(["very bright" in c for c in b.captions])
    assert float(y[dark].max()) <= 0.12 + 1e-4 and float(y[bright].min()) >= 0.88 - 1e-4


def test_same_seed_same_batch_and_known_words():
    a, b = batch(1, 20), batch(1, 20)
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    words = set(synthetic.caption_words())
    assert all(w in words for c in batch(2).captions for w in c.split())


def test_caption_kind_names_what_the_caption_draws():
    kinds = {c: synthetic.caption_kind(c) for c in batch(3).captions}
    assert set(kinds.values()) == set(synthetic.KINDS)
    marks = {"shape": synthetic.SHAPES, "texture": synthetic.TEXTURES, "landscape": ("sky",), "gradient": ("from",),
             "solid": ("image",)}
    for caption, kind in kinds.items():
        assert any(w in caption.split() for w in marks[kind]), (caption, kind)
        assert not any(w in caption.split() for other, ws in marks.items() if other != kind for w in ws), (caption, kind)
