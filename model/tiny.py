"""A tiny InstructBLIP (random weights, tokenizers built in code) for tests, benchmarks and the engine's tests.

Nothing here downloads: the configuration, both tokenizers (a word-level BERT-style one for the Q-Former
and a word-level Llama-style one for the LLM) and the image processor are built from values in this file.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (
    BlipImageProcessorPil,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipProcessor,
    InstructBlipQFormerConfig,
    InstructBlipVisionConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
    T5Config,
)

# A small English vocabulary: enough for prompts such as "Question: what is the man doing? Short answer:".
_WORD_LIST = (
    "the a an is are was what who where when how why which video frame scene man woman person people "
    "dog cat car ball red blue green white black walking running sitting standing jumping playing "
    "cooking eating talking holding doing happening question short answer describe in on of and to "
    "with at it this that there yes no one two three left right up down first then now"
)
WORDS = _WORD_LIST.split()
PUNCTUATION = list("?:.,!")

QFORMER_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
LLM_SPECIAL = ["<unk>", "<s>", "</s>", "<pad>"]


def _word_tokenizer(
    special: list[str], template: str, template_tokens: list[str], words: Sequence[str] | None = None
) -> Tokenizer:
    words = _vocabulary(words)
    vocab = {tok: i for i, tok in enumerate(special + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=special[1] if special[0] == "[PAD]" else special[0]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(t, vocab[t]) for t in template_tokens]
    )
    tok.decoder = decoders.WordPiece()  # joins words with spaces
    return tok


def _vocabulary(words: Sequence[str] | None) -> list[str]:
    """The word list (default: WORDS) plus PUNCTUATION, lower-cased, each once, in order."""
    out: list[str] = []
    for w in [*(WORDS if words is None else words), *PUNCTUATION]:
        w = w.lower()
        if not w or any(c.isspace() for c in w):
            raise ValueError(f"tokenizer words must be non-empty and free of spaces, got {w!r}")
        if w not in out:
            out.append(w)
    return out


def tiny_qformer_tokenizer(words: Sequence[str] | None = None) -> PreTrainedTokenizerFast:
    """BERT-style: "[CLS] words [SEP]", as InstructBLIP's bert-base-uncased Q-Former tokenizer.

    words: the word-level vocabulary (default: WORDS); punctuation "?:.,!" is always added.
    """
    tok = _word_tokenizer(QFORMER_SPECIAL, "[CLS] $A [SEP]", ["[CLS]", "[SEP]"], words)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def tiny_llm_tokenizer(words: Sequence[str] | None = None) -> PreTrainedTokenizerFast:
    """Llama-style: "<s> words", eos "</s>", with InstructBLIP's "<image>" placeholder token added.

    words: the word-level vocabulary (default: WORDS); punctuation "?:.,!" is always added.
    """
    tok = _word_tokenizer(LLM_SPECIAL, "<s> $A", ["<s>"], words)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.add_tokens(["<image>"], special_tokens=True)
    return fast


def tiny_processor(
    image_size: int = 32, num_query_tokens: int = 4, words: Sequence[str] | None = None
) -> InstructBlipProcessor:
    """InstructBlipProcessor with the tiny tokenizers (vocabulary `words`, default WORDS) and an image
    processor for `image_size` pixels."""
    image_processor = BlipImageProcessorPil(size={"height": image_size, "width": image_size})
    return InstructBlipProcessor(
        image_processor=image_processor,
        tokenizer=tiny_llm_tokenizer(words),
        qformer_tokenizer=tiny_qformer_tokenizer(words),
        num_query_tokens=num_query_tokens,
    )


def tiny_config(
    processor: InstructBlipProcessor,
    *,
    image_size: int = 32,
    patch_size: int = 8,
    vision_hidden: int = 32,
    qformer_hidden: int = 32,
    llm_hidden: int = 32,
    num_query_tokens: int = 4,
    qformer_layers: int = 2,
    llm: str = "llama",
) -> InstructBlipConfig:
    """InstructBlipConfig of a few thousand parameters per module: (image_size / patch_size)² + 1 vision tokens.

    llm: "llama" (decoder-only, as Vicuna) or "t5" (encoder-decoder, as Flan-T5).
    """
    llm_tok = processor.tokenizer
    vision = InstructBlipVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        qkv_bias=True,
    )
    qformer = InstructBlipQFormerConfig(
        vocab_size=len(processor.qformer_tokenizer),
        hidden_size=qformer_hidden,
        num_hidden_layers=qformer_layers,
        num_attention_heads=4,
        intermediate_size=2 * qformer_hidden,
        max_position_embeddings=64,
        encoder_hidden_size=vision_hidden,
        pad_token_id=processor.qformer_tokenizer.pad_token_id,
    )
    if llm not in ("llama", "t5"):
        raise ValueError(f"llm must be 'llama' or 't5', got {llm!r}")
    text = T5Config(
        vocab_size=len(llm_tok),
        d_model=llm_hidden,
        d_kv=llm_hidden // 4,
        d_ff=2 * llm_hidden,
        num_layers=2,
        num_heads=4,
        decoder_start_token_id=llm_tok.pad_token_id,
        pad_token_id=llm_tok.pad_token_id,
        eos_token_id=llm_tok.eos_token_id,
    ) if llm == "t5" else LlamaConfig(
        vocab_size=len(llm_tok),
        hidden_size=llm_hidden,
        intermediate_size=2 * llm_hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=llm_tok.bos_token_id,
        eos_token_id=llm_tok.eos_token_id,
        pad_token_id=llm_tok.pad_token_id,
        tie_word_embeddings=False,
    )
    return InstructBlipConfig(
        vision_config=vision.to_dict(),
        qformer_config=qformer.to_dict(),
        text_config=text.to_dict(),
        num_query_tokens=num_query_tokens,
        image_token_index=llm_tok.convert_tokens_to_ids("<image>"),
    )


def tiny_instructblip(seed: int = 0, **config_kwargs) -> tuple[InstructBlipForConditionalGeneration, InstructBlipProcessor]:
    """A random tiny transformers InstructBLIP and its processor, deterministic for a seed.

    The weights are re-drawn with std 0.2 (transformers initialises query tokens to zero and most
    weights tiny, which would make every frame look alike); config_kwargs go to `tiny_config`.
    """
    image_size = config_kwargs.get("image_size", 32)
    processor = tiny_processor(image_size, config_kwargs.get("num_query_tokens", 4))
    config = tiny_config(processor, **config_kwargs)
    gen = torch.Generator().manual_seed(seed)
    model = InstructBlipForConditionalGeneration(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            elif "norm" in name.lower():
                p.copy_(1.0 + torch.randn(p.shape, generator=gen) * 0.05)
            else:
                # T5 has no 1/sqrt(d) attention scaling: smaller weights keep its answers varied.
                t5 = config_kwargs.get("llm") == "t5" and name.startswith("language_model.")
                p.copy_(torch.randn(p.shape, generator=gen) * (0.1 if t5 else 0.2))
    return model.eval(), processor
