"""Rows -> engine prompts: `PromptBuilder` (one row -> token ids + pixels) and `PromptStream`
(an endless, shuffled, resumable supply of built prompts for the RL loop).

The builder tokenizes the rendered prompt itself (`tokenizer(text, add_special_tokens=False)`)
and checks that the number of image-pad tokens in the ids equals what the vision tower will
emit for the pixels it produced: a mismatch (a tokenizer that splits the pad string, a question
that contains one) would otherwise fail deep inside a model forward on some rank, or silently
misalign image features.

The stream builds prompts lazily (decoding happens only for rows actually drawn), remembers
rows that failed to build so they are skipped without retrying in later epochs, and its state
(epoch, position, failures) is a small JSON dict, so a resumed run draws exactly the prompts
the uninterrupted run would have.
"""
from __future__ import annotations

import hashlib
import logging
import random
import warnings
from dataclasses import dataclass, field

import torch
from PIL import Image

from eureka_megatron.data.chat import render_prompt
from eureka_megatron.data.images import load_image
from eureka_megatron.data.jsonl import DataError, Row, SkippedRow
from eureka_megatron.data.prompt import Prompt
from eureka_megatron.models.family import ChatTokens, Family
from eureka_megatron.models.images import ImageOptions
from eureka_megatron.models.registry import family_named

__all__ = ["DataError", "PromptItem", "PromptBuilder", "PromptStream"]

logger = logging.getLogger(__name__)


@dataclass
class PromptItem:
    prompt: Prompt      # input_ids, mm_inputs, images (paths), text
    answer: str
    row_id: str
    source: str         # "file.jsonl:LINE"
    meta: dict = field(default_factory=dict)


class PromptBuilder:
    """Turns a `Row` into a `PromptItem` for one VLM family (a name or its `Family`); the
    keyword arguments after `max_prompt_length` are `ImageOptions` (each family reads its own)."""

    def __init__(self, family: str | Family, tokenizer, *, system_prompt: str | None,
                 max_prompt_length: int, chat: ChatTokens | None = None, **image_options):
        fam = family_named(family) if isinstance(family, str) else family
        if not fam.is_vlm:
            raise ValueError(f"model family {fam.name!r} takes no images: prompts are built for "
                             "the VLM families")
        if max_prompt_length < 1:
            raise ValueError(f"max_prompt_length must be >= 1, got {max_prompt_length}")
        self.options = ImageOptions(**image_options).validate()
        fam.check_images(self.options)
        self.family = fam.name
        self._max_tiles = self.options.max_tiles if fam.tiles_images else None
        self._image_inputs = fam.image_inputs
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.max_prompt_length = max_prompt_length
        self.chat = chat or fam.chat
        self.image_token_id = self._single_token_id(self.chat.image_pad)

    def _single_token_id(self, token: str) -> int:
        ids = self.tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1 or ids[0] == getattr(self.tokenizer, "unk_token_id", None):
            raise ValueError(f"the tokenizer does not have {token!r} as one token (got ids {ids}); "
                             f"is it the {self.family} checkpoint's tokenizer?")
        return int(ids[0])

    def build(self, row: Row) -> PromptItem:
        """Decode, preprocess, render and tokenize one row; DataError(reason) if it cannot be used."""
        mm_inputs, counts = self._pixels(row) if row.images else ({}, [])
        if sum(counts) >= self.max_prompt_length:
            raise DataError(f"{row.source}: {sum(counts)} image tokens alone exceed "
                            f"max_prompt_length {self.max_prompt_length}")
        system = row.system_prompt if row.system_prompt is not None else self.system_prompt
        try:
            text = render_prompt(self.chat, row.question, counts, system)
        except ValueError as e:
            raise DataError(f"{row.source}: {e}") from None
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        found = sum(1 for t in ids if t == self.image_token_id)
        if found != sum(counts):
            raise DataError(f"{row.source}: {found} {self.chat.image_pad} tokens in the prompt ids, "
                            f"expected {sum(counts)} for {len(counts)} image(s)")
        if len(ids) > self.max_prompt_length:
            raise DataError(f"{row.source}: prompt is {len(ids)} tokens, over max_prompt_length "
                            f"{self.max_prompt_length}")
        prompt = Prompt(input_ids=ids, mm_inputs=mm_inputs, images=list(row.images), text=text,
                        max_tiles=self._max_tiles if row.images else None)
        return PromptItem(prompt=prompt, answer=row.answer, row_id=row.id, source=row.source,
                          meta=dict(row.meta))

    def _pixels(self, row: Row) -> tuple[dict[str, torch.Tensor], list[int]]:
        images = [load_image(p) for p in row.images]
        try:
            return self._image_inputs(images, self.options)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise DataError(f"{row.source}: cannot preprocess image: {e}") from None


class PromptStream:
    """Endless, resumable stream of PromptItems: shuffled per epoch by seed; bad rows (build
    errors) skipped with a warning naming row.source, counted, and not retried."""

    STATE_VERSION = 1

    def __init__(self, rows: list[Row], builder: PromptBuilder, *, seed: int, shuffle: bool = True):
        if not rows:
            raise DataError("PromptStream needs at least one row")
        self._rows = list(rows)
        self._builder = builder
        self._seed = int(seed)
        self._shuffle = bool(shuffle)
        self._digest = hashlib.sha256("\n".join(f"{r.id}\t{r.source}" for r in self._rows)
                                      .encode("utf-8")).hexdigest()[:16]
        self._bad: dict[int, SkippedRow] = {}  # row index -> why it cannot be built
        self._set_epoch(0)

    def _set_epoch(self, epoch: int, position: int = 0, yielded: int = 0) -> None:
        self._epoch, self._pos, self._yielded = epoch, position, yielded
        self._order = list(range(len(self._rows)))
        if self._shuffle:  # str seeds hash with sha512: the same order in every process
            random.Random(f"eureka-prompts/{self._seed}/{epoch}").shuffle(self._order)

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def skipped(self) -> int:
        return len(self._bad)

    @property
    def skipped_sources(self) -> list[SkippedRow]:
        return list(self._bad.values())

    def __len__(self) -> int:
        return len(self._rows)

    def next_batch(self, k: int) -> list[PromptItem]:
        """The next k prompts, crossing epoch boundaries as needed."""
        if k < 1:
            raise ValueError(f"batch size must be >= 1, got {k}")
        out: list[PromptItem] = []
        while len(out) < k:
            if self._pos == len(self._order):
                if self._yielded == 0:
                    raise DataError(f"a whole epoch of {len(self._rows)} rows gave no usable prompt "
                                    f"({self.skipped} failed to build; first: "
                                    f"{next(iter(self._bad.values()), None)})")
                self._set_epoch(self._epoch + 1)
            index = self._order[self._pos]
            self._pos += 1
            if index in self._bad:
                continue
            row = self._rows[index]
            try:
                item = self._builder.build(row)
            except DataError as e:
                reason = str(e).removeprefix(f"{row.source}: ")
                self._bad[index] = SkippedRow(row.source, reason)
                warnings.warn(f"skipping prompt {row.source}: {reason}", stacklevel=2)
                continue
            self._yielded += 1
            out.append(item)
        return out

    def state_dict(self) -> dict:
        return {
            "version": self.STATE_VERSION, "seed": self._seed, "shuffle": self._shuffle,
            "num_rows": len(self._rows), "rows_digest": self._digest,
            "epoch": self._epoch, "position": self._pos, "yielded_in_epoch": self._yielded,
            "skipped": self.skipped,
            "bad_rows": [[i, s.source, s.reason] for i, s in self._bad.items()],
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` was taken; the rows, seed and shuffle must be the same."""
        if state.get("version") != self.STATE_VERSION:
            raise ValueError(f"unsupported PromptStream state version {state.get('version')!r}")
        mine = {"seed": self._seed, "shuffle": self._shuffle, "num_rows": len(self._rows),
                "rows_digest": self._digest}
        diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if diff:
            raise DataError("cannot resume the prompt stream: the data or its order changed "
                            + ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items()))
        position = int(state["position"])
        if not 0 <= position <= len(self._rows):
            raise ValueError(f"PromptStream state position {position} out of range")
        self._bad = {int(i): SkippedRow(src, reason) for i, src, reason in state["bad_rows"]}
        self._set_epoch(int(state["epoch"]), position, int(state["yielded_in_epoch"]))
