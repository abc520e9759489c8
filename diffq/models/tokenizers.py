"""In-memory word-level tokenizers for tiny models (no hub download).

``build_word_tokenizer`` turns a word list into a ``PreTrainedTokenizerFast`` that the diffusers
pipelines can call (padding, truncation, tensors, batch_decode) and save/load with the pipeline.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from diffq.errors import ConfigError

__all__ = ["DEFAULT_WORDS", "build_word_tokenizer", "unknown_words"]

DEFAULT_WORDS: tuple[str, ...] = (
    "a photo of an the and with on in at to of is are there this that it its one two three four"
    " five six seven eight nine ten zero some many few no left right above below top bottom front"
    " behind next near far big small large tiny tall short long round flat bright dark light"
    " red green blue yellow orange purple pink brown black white gray grey gold silver"
    " circle square triangle rectangle star heart oval diamond cube sphere cone shape shapes"
    " cat cats dog dogs bird car tree house person man woman child horse boat flower sky sea"
    " mountain city street room table chair cup apple banana painting picture image drawing"
    " portrait landscape closeup sitting standing running flying , . ! ? - ' \""
).split()

_SPECIALS = {
    "clip": {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<|startoftext|>",
             "eos_token": "<|endoftext|>"},
    "t5": {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"},
}


def _pieces(tok: Tokenizer, words: Sequence[str]) -> list[str]:
    """Normalise and pre-tokenise the given words exactly as the tokenizer will see text."""
    seen: dict[str, None] = {}
    for word in words:
        normalized = tok.normalizer.normalize_str(word)
        for piece, _ in tok.pre_tokenizer.pre_tokenize_str(normalized):
            seen.setdefault(piece, None)
    return list(seen)


def build_word_tokenizer(
    words: Sequence[str] = DEFAULT_WORDS,
    max_length: int = 77,
    style: Literal["clip", "t5"] = "clip",
) -> PreTrainedTokenizerFast:
    """A lowercase word-level tokenizer over ``words``; unknown words map to the UNK token.

    ``style="clip"`` wraps every text as ``BOS ... EOS`` (ids: pad 0, unk 1, bos 2, eos 3);
    ``style="t5"`` appends ``EOS`` only (ids: pad 0, eos 1, unk 2). Entries that are phrases
    ("a photo of") are split into their words.
    """
    if style not in _SPECIALS:
        raise ConfigError(f"unknown tokenizer style {style!r}: use 'clip' or 't5'")
    specials = _SPECIALS[style]
    n_added = 2 if style == "clip" else 1
    if max_length <= n_added:
        raise ConfigError(f"tokenizer max_length {max_length} leaves no room for words: use a value > {n_added}")
    tok = Tokenizer(models.WordLevel(vocab={}, unk_token=specials["unk_token"]))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    special_tokens = list(specials.values())
    pieces = [p for p in _pieces(tok, words) if p not in special_tokens]
    vocab = {token: i for i, token in enumerate(special_tokens + pieces)}
    tok.model = models.WordLevel(vocab=vocab, unk_token=specials["unk_token"])
    tok.add_special_tokens(special_tokens)
    eos = specials["eos_token"]
    if style == "clip":
        bos = specials["bos_token"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} $B {eos}",
            special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])],
        )
    else:
        tok.post_processor = processors.TemplateProcessing(
            single=f"$A {eos}", pair=f"$A {eos} $B {eos}", special_tokens=[(eos, vocab[eos])],
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=max_length, padding_side="right", **specials
    )


def unknown_words(tokenizer: Any, prompts: Sequence[str]) -> dict[str, list[str]]:
    """Words of each prompt that a word-level ``tokenizer`` maps to its unknown token."""
    unk = tokenizer.unk_token_id
    out: dict[str, list[str]] = {}
    for prompt in prompts:
        words = prompt.split()
        enc = tokenizer(words, is_split_into_words=True, add_special_tokens=False)
        bad = sorted({words[w] for i, w in zip(enc.input_ids, enc.word_ids()) if i == unk})
        if bad:
            out[prompt] = bad
    return out
