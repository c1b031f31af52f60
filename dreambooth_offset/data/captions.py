"""kohya's caption options: a caption is comma-separated tags; the first `keep_tokens` stay in
place, the rest may be shuffled or dropped one by one, the whole caption may be dropped (the row
then trains the unconditional branch), and a prefix / suffix goes around what is left. Pure: every
random choice comes from the generator passed in, in a fixed order, so a run (and its resume)
makes the same captions."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CaptionPolicy:
    shuffle: bool = False  # --shuffle_caption
    keep_tokens: int = 0  # --keep_tokens: leading tags that never move or drop
    dropout_rate: float = 0.0  # --caption_dropout_rate: the whole caption becomes ""
    tag_dropout_rate: float = 0.0  # --caption_tag_dropout_rate: each movable tag dropped
    prefix: str = ""  # --caption_prefix
    suffix: str = ""  # --caption_suffix

    @property
    def is_random(self) -> bool:
        return self.shuffle or self.dropout_rate > 0 or self.tag_dropout_rate > 0


def apply_policy(caption: str, policy: CaptionPolicy, generator: torch.Generator | None = None) -> str:
    """The caption one row trains with. Draws (when the policy is random): one number for the
    caption dropout, a permutation of the movable tags, one number per movable tag for tag
    dropout. As kohya's newer sd-scripts, the prefix and suffix are added after shuffling (they
    never move) and not to a dropped caption."""
    if policy.dropout_rate > 0 and float(torch.rand((), generator=generator)) < policy.dropout_rate:
        return ""
    if policy.shuffle or policy.tag_dropout_rate > 0:
        tags = [t.strip() for t in caption.split(",")]
        fixed, movable = tags[:policy.keep_tokens], tags[policy.keep_tokens:]
        if policy.shuffle:
            movable = [movable[i] for i in torch.randperm(len(movable), generator=generator).tolist()]
        if policy.tag_dropout_rate > 0:
            kept = (torch.rand(len(movable), generator=generator) >= policy.tag_dropout_rate).tolist()
            movable = [t for t, keep in zip(movable, kept) if keep]
        caption = ", ".join(fixed + movable)
    return " ".join(part for part in (policy.prefix, caption, policy.suffix) if part)


def caption_policy(data) -> CaptionPolicy:
    """The caption options a run's flags give (`data`: its DataConfig)."""
    return CaptionPolicy(data.shuffle_caption, data.keep_tokens, data.caption_dropout_rate,
                         data.caption_tag_dropout_rate, data.caption_prefix, data.caption_suffix)
