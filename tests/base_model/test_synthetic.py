"""The procedural data spans dark to bright, is seeded, and its captions say so."""
import torch

from dreambooth_offset.base_model import synthetic
from dreambooth_offset.sampling.metrics import luminance
from tests.captions import KIND_WORDS, kind_in_words


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


def test_the_drawn_kind_is_what_the_caption_names():
    g = torch.Generator().manual_seed(3)
    kinds = {d.caption: d.kind for d in (synthetic.render_one(32, g) for _ in range(300))}
    assert set(kinds.values()) == set(synthetic.KINDS)
    for caption, kind in kinds.items():
        assert any(w in caption.split() for w in KIND_WORDS[kind]), (caption, kind)
        assert not any(w in caption.split() for other, ws in KIND_WORDS.items() if other != kind for w in ws), (caption, kind)
        assert kind_in_words(caption) == kind
