"""Turn an identity set and its bucket plan into what the training loop reads: one latent per photo (at the
photo's planned size) and the text features of its caption. A process encodes only the photos of the
identities it owns; the caches make every photo cost one VAE pass over all runs."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..training.protocol import TextConditioning
from .cache import item_latent
from .dataset import IdentitySet
from .sampler import BucketPlan

DEFAULT_META_CAPTION = "photo of a person"


@dataclass
class Prepared:
    """Per photo index: its latent ``(C, h, w)`` and caption key; ``conds``: features per caption."""

    latents: dict[int, torch.Tensor]
    captions: dict[int, str]
    conds: dict[str, TextConditioning]


def prepare(
    data: IdentitySet,
    plan: BucketPlan,
    owns: Callable[[int], bool],
    encode: Callable[[], Callable[[torch.Tensor], torch.Tensor]],
    encoder_id: str,
    text: Callable[[str], TextConditioning],
    cache_dir: str | os.PathLike | None = None,
    default_caption: str = DEFAULT_META_CAPTION,
    on_item: Callable[[int, int], None] | None = None,
) -> Prepared:
    """Latents and text features for every planned photo of an owned identity.

    ``encode()`` is called at most once, and only if some photo is not cached yet (so a warm cache never
    loads the VAE); ``text(caption)`` once per distinct caption.
    """
    encoder: list[Callable[[torch.Tensor], torch.Tensor]] = []

    def lazy(images: torch.Tensor) -> torch.Tensor:
        if not encoder:
            encoder.append(encode())
        return encoder[0](images)

    sizes = plan.bucket_of()
    todo = [i for i in sorted(sizes) if owns(data.items[i].identity)]
    latents, captions, conds = {}, {}, {}
    for n, i in enumerate(todo):
        item = data.items[i]
        latents[i] = item_latent(item, sizes[i], data.face_boxes.get(item.path), encoder_id, lazy, cache_dir)
        captions[i] = item.caption or default_caption
        if captions[i] not in conds:
            conds[captions[i]] = text(captions[i])
        if on_item is not None:
            on_item(n + 1, len(todo))
    return Prepared(latents, captions, conds)
