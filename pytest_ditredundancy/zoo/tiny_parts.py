"""Offline building blocks for tiny pipelines: in-memory tokenizers and small random text encoders.

No hub access: tokenizers are built from a character-level vocabulary held in memory, and text encoders
from small configs with weights drawn from a fixed seed, so the same seed always gives the same model.
"""

from __future__ import annotations

import string
from contextlib import contextmanager
from typing import Iterator

import torch

#: Characters every tiny tokenizer knows; anything else becomes the unknown token.
CHARACTERS = string.ascii_lowercase + string.digits + ".,;:!?'\"-()&/"


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Draw random weights from ``seed`` without disturbing the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def t5_tokenizer(model_max_length: int = 32):
    """A sentencepiece-style T5 tokenizer (also used for UMT5/mT5) over :data:`CHARACTERS`."""
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + c, -1.0) for c in CHARACTERS] + [(c, -2.0) for c in CHARACTERS]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def clip_tokenizer(model_max_length: int = 77):
    """A byte-pair CLIP tokenizer with no merges (one token per character)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in CHARACTERS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def bert_tokenizer(model_max_length: int = 77):
    """A WordPiece BERT tokenizer (HunyuanDiT's first text encoder)."""
    from transformers import BertTokenizer

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4}
    for c in CHARACTERS:
        vocab[c] = len(vocab)
        vocab["##" + c] = len(vocab)
    return BertTokenizer(vocab=vocab, model_max_length=model_max_length)


def gemma_tokenizer(model_max_length: int = 64):
    """A byte-pair Gemma tokenizer with no merges (Sana, Lumina2)."""
    from transformers import GemmaTokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4, "\u2581": 5}
    for c in CHARACTERS:
        vocab[c] = len(vocab)
        vocab["\u2581" + c] = len(vocab)
    return GemmaTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def vocab_size(tokenizer) -> int:
    return len(tokenizer)


def t5_encoder(seed: int, d_model: int = 32, vocab: int = 128, layers: int = 2, umt5: bool = False):
    """A small T5 (or UMT5) encoder-only model."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config_cls, model_cls = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    config = config_cls(
        vocab_size=vocab, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=layers, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=1,
    )
    with seeded(seed):
        return model_cls(config).eval()


def clip_text_encoder(seed: int, hidden: int = 32, vocab: int = 128, projection_dim: int | None = None,
                      max_positions: int = 77):
    """A small CLIP text model; with ``projection_dim`` the ``WithProjection`` variant (SD3)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=max_positions, projection_dim=projection_dim or hidden,
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_act="gelu",
    )
    with seeded(seed):
        model = CLIPTextModelWithProjection(config) if projection_dim else CLIPTextModel(config)
    return model.eval()


def bert_encoder(seed: int, hidden: int = 32, vocab: int = 128, max_positions: int = 128):
    """A small BERT encoder (HunyuanDiT)."""
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=2 * hidden, max_position_embeddings=max_positions,
    )
    with seeded(seed):
        return BertModel(config, add_pooling_layer=False).eval()


def gemma2_encoder(seed: int, hidden: int = 32, vocab: int = 128, head_dim: int = 8):
    """A small Gemma2 decoder used as text encoder (Sana, Lumina2)."""
    from transformers import Gemma2Config, Gemma2Model

    config = Gemma2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=256,
        sliding_window=64, pad_token_id=0, bos_token_id=2, eos_token_id=1,
    )
    with seeded(seed):
        return Gemma2Model(config).eval()


def tiny_vae(seed: int, scale_factor: int = 8, latent_channels: int = 4, scaling_factor: float = 0.18215,
             shift_factor: float | None = None, channels: int = 8):
    """A small ``AutoencoderKL`` whose spatial downscale is ``scale_factor`` (a power of two).

    Pipelines read their VAE scale factor from the number of blocks, so the block count sets the latent
    resolution. The mid-block attention is left out: the only attention the tiny pipelines run per step is
    the transformer's, and the decoder stays cheap. VAEs with a ``shift_factor`` (SD3 / Flux style) have no
    quant convs, like the real ones.
    """
    from diffusers import AutoencoderKL

    blocks = scale_factor.bit_length()  # 1 -> 1 block, 2 -> 2, 4 -> 3, 8 -> 4
    if 2 ** (blocks - 1) != scale_factor:
        raise ValueError(f"scale_factor must be a power of two, got {scale_factor}")
    with seeded(seed):
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
            block_out_channels=(channels,) * blocks, layers_per_block=1, latent_channels=latent_channels,
            norm_num_groups=2, sample_size=32, scaling_factor=scaling_factor, shift_factor=shift_factor,
            use_quant_conv=shift_factor is None, use_post_quant_conv=shift_factor is None,
            mid_block_add_attention=False,
        )
    return vae.eval()
