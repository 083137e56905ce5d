"""Tokenizers with one token per caption word, and a cache of caption embeddings for training.

The tiny zoo's tokenizers spell words out character by character; a small DiT trained for minutes would have
to learn to read. Here every word of the dataset's captions is one token (a whole-word T5 sentencepiece, a
CLIP byte-pair chain of merges), and any other text still falls back to characters. The text encoders stay
small seeded models that are not trained; their outputs for the few hundred captions are computed once.
"""

from __future__ import annotations

from dataclasses import dataclass
from graphlib import CycleError, TopologicalSorter

import torch

from ..zoo.tiny_parts import CHARACTERS
from .shapes import all_captions


def caption_words() -> list[str]:
    """Every word the dataset's captions use, sorted."""
    return sorted({word for caption in all_captions() for word in caption.split()})


def word_t5_tokenizer(model_max_length: int):
    """A T5 tokenizer whose caption words are single pieces (scored above any spelling in characters)."""
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + c, -1.0) for c in CHARACTERS] + [(c, -2.0) for c in CHARACTERS]
    vocab += [("\u2581" + w, 0.0) for w in caption_words() if len(w) > 1]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def _clip_merges(words: list[str]) -> list[tuple[str, str]]:
    """Byte-pair merges that turn each word into one token.

    A word's merges are the chain ``(w[:k], w[k])``. Chains of prefixes of two or more characters rank first;
    the opening merges (two single characters) are ordered so that a word's own opening merge outranks any
    other word's opening pair that occurs inside it (a topological order), so BPE starts at its first letter.
    """
    def symbols(word: str) -> list[str]:
        return list(word[:-1]) + [word[-1] + "</w>"]

    chains, openings = [], {}
    for word in words:
        parts = symbols(word)
        if len(parts) < 2:
            continue
        openings[word] = (parts[0], parts[1])
        prefix = parts[0] + parts[1]
        for part in parts[2:]:
            if (prefix, part) not in chains:
                chains.append((prefix, part))
            prefix += part
    order = TopologicalSorter()
    for word, opening in openings.items():
        parts = symbols(word)
        inside = {(a, b) for a, b in zip(parts, parts[1:])} - {opening}
        order.add(opening)
        for other in set(openings.values()) & inside:
            order.add(other, opening)  # ``opening`` ranks first
    try:
        ranked = list(order.static_order())
    except CycleError as exc:  # only a change of the caption vocabulary can cause this
        raise ValueError(f"caption words need contradictory merge orders ({exc.args[1]}); rename a word") from None
    return chains + ranked


def word_clip_tokenizer(model_max_length: int):
    """A CLIP byte-pair tokenizer whose caption words are single tokens (characters for anything else)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in CHARACTERS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    merges = _clip_merges(caption_words())
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
    for word in caption_words():
        ids = tokenizer(word, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise ValueError(f"CLIP word tokenizer splits {word!r} into {tokenizer.convert_ids_to_tokens(ids)}")
    return tokenizer


@dataclass
class CaptionEmbeddings:
    """The pipeline's own ``encode_prompt`` output for every caption and for "" (the unconditional prompt)."""

    captions: list[str]
    tensors: dict[str, torch.Tensor]  # name -> [len(captions) + 1, ...]; the last row is ""

    @classmethod
    def compute(cls, pipe, family: str, max_sequence_length: int) -> "CaptionEmbeddings":
        captions = all_captions()
        texts = captions + [""]
        with torch.no_grad():
            if family == "pixart":
                embeds, mask, _, _ = pipe.encode_prompt(texts, do_classifier_free_guidance=False, device="cpu",
                                                        clean_caption=False, max_sequence_length=max_sequence_length)
                tensors = {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}
            elif family == "sd3":
                embeds, _, pooled, _ = pipe.encode_prompt(texts, None, None, do_classifier_free_guidance=False,
                                                          device="cpu", max_sequence_length=max_sequence_length)
                tensors = {"encoder_hidden_states": embeds, "pooled_projections": pooled}
            else:
                raise ValueError(f"unknown family {family!r}; use 'pixart' or 'sd3'")
        return cls(captions, {k: v.detach().clone() for k, v in tensors.items()})

    def rows(self, captions: list[str], drop: torch.Tensor) -> dict[str, torch.Tensor]:
        """Conditioning for a batch; rows where ``drop`` is true get the unconditional "" embedding."""
        index = {c: i for i, c in enumerate(self.captions)}
        ids = torch.tensor([index[c] for c in captions])
        ids = torch.where(drop, torch.full_like(ids, len(self.captions)), ids)
        return {k: v[ids] for k, v in self.tensors.items()}
