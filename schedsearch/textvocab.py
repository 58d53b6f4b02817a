"""Build small word-level tokenizers locally, without downloading anything.

Used by :mod:`schedsearch.testing.tiny` (random-init test models) and by whoever trains the
shipped toy model. The result is an ordinary ``transformers.PreTrainedTokenizerFast``: it saves
with ``save_pretrained`` and reloads with ``AutoTokenizer.from_pretrained`` like a real one.

Lifecycle::

    tok = build_word_tokenizer(["red", "square", ...],
                               special_tokens=["<|im_start|>", "<|im_end|>", "<|image_pad|>"],
                               chat_template=TEMPLATE, pad_token="<|endoftext|>", eos_token="<|im_end|>")
    tok.save_pretrained(out_dir)        # tokenizer.json + tokenizer_config.json (+ chat template)

Ids are assigned in order: ``special_tokens`` (in the given order, duplicates removed), then the
unknown token if not already listed, then ``words`` (deduplicated, order kept). Special tokens are
matched anywhere in the text before splitting, so ``"<|image_pad|><|image_pad|>"`` is two tokens.
Text is split on whitespace and punctuation (each punctuation character is its own token);
whitespace itself is not a token, so decoding joins tokens with single spaces.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["build_word_tokenizer"]


def build_word_tokenizer(
    words: Iterable[str],
    *,
    special_tokens: Iterable[str],
    chat_template: str | None = None,
    pad_token: str | None = None,
    eos_token: str | None = None,
    bos_token: str | None = None,
    unk_token: str = "<unk>",
    lowercase: bool = True,
    padding_side: str = "left",
    extra_attributes: dict[str, Any] | None = None,
) -> Any:
    """Return a ``PreTrainedTokenizerFast`` with a word-level model over ``words``.

    ``special_tokens`` become special added tokens (never split, skipped by
    ``decode(skip_special_tokens=True)``); ``pad_token`` / ``eos_token`` / ``bos_token`` must be
    among them (or equal ``unk_token``). ``lowercase`` lowercases ordinary text before lookup
    (special tokens are matched first and keep their case). ``extra_attributes`` are passed to the
    tokenizer constructor (e.g. ``{"model_max_length": 512}``).
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    specials: list[str] = []
    for t in special_tokens:
        if t not in specials:
            specials.append(t)
    if unk_token not in specials:
        specials.append(unk_token)
    for field, value in (("pad_token", pad_token), ("eos_token", eos_token), ("bos_token", bos_token)):
        if value is not None and value not in specials:
            raise ValueError(f"build_word_tokenizer: {field}={value!r} is not in special_tokens {specials}; "
                             f"add it to special_tokens")
    vocab: dict[str, int] = {t: i for i, t in enumerate(specials)}
    for w in words:
        w = w.lower() if lowercase else w
        if w and w not in vocab:
            vocab[w] = len(vocab)

    tok = Tokenizer(WordLevel(vocab=vocab, unk_token=unk_token))
    if lowercase:
        tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])

    kwargs: dict[str, Any] = dict(extra_attributes or {})
    kwargs.update(tokenizer_object=tok, unk_token=unk_token, padding_side=padding_side)
    if pad_token is not None:
        kwargs["pad_token"] = pad_token
    if eos_token is not None:
        kwargs["eos_token"] = eos_token
    if bos_token is not None:
        kwargs["bos_token"] = bos_token
    fast = PreTrainedTokenizerFast(**kwargs)
    named = {pad_token, eos_token, bos_token, unk_token}
    fast.add_special_tokens({"additional_special_tokens": [t for t in specials if t not in named]})
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast
