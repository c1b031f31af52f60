"""The tests' own reading of the shipped base's captions, independent of the renderer's code."""
from dreambooth_offset.base_model import synthetic

# The words that name each kind in a caption (no colour or level word is among them).
KIND_WORDS = {"shape": synthetic.SHAPES, "texture": synthetic.TEXTURES, "landscape": ("sky",), "gradient": ("from",),
              "solid": ("image",)}


def kind_in_words(caption: str) -> str:
    return next(kind for kind, words in KIND_WORDS.items() if set(words) & set(caption.split()))
