"""Image-only stand-ins for stock processors that cannot be built without torchvision.

Several stock processors (InternVL, LLaVA-OneVision, SmolVLM, Pixtral / Mistral 3) own a video processor, or
are marked as needing torchvision; where torchvision is unusable (PLATFORM.md: the registry's build is a CUDA one)
``AutoProcessor.from_pretrained`` raises or returns only the tokenizer. The families' PIL image processors work,
so an adapter builds :class:`ImageOnlyProcessor`: the tokenizer, the PIL image processor and the family's rule
for expanding one image placeholder into the model's image tokens -- the same rule the stock processor applies
to images (each adapter's ``expand`` cites the stock method it follows), so ``input_ids``, ``attention_mask``
and the pixel tensors are what the stock processor would give.

Lifecycle::

    proc = load_processor(path, build=lambda tok, improc, template: MyProcessor(tok, improc, template))
    batch = proc(images=[...], text=[...], padding=True, return_tensors="pt")   # like the stock processor
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from schedsearch.errors import ModelLoadError

__all__ = ["ImageOnlyProcessor", "load_processor", "read_chat_template", "stock_processor"]


class ImageOnlyProcessor:
    """Tokenizer + image processor; subclasses set ``image_token`` (the placeholder the chat template writes)
    and implement :meth:`expand`. ``drop`` lists image-processor outputs the model does not take."""

    image_token: str = "<image>"
    drop: tuple[str, ...] = ()
    #: add ``mm_token_type_ids`` (1 at image tokens), which Qwen-style models (GLM-4V) need next to input_ids
    mm_token_types: bool = False

    def __init__(self, tokenizer: Any, image_processor: Any, chat_template: str | None = None, **settings: Any):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        self.settings = settings

    def expand(self, image_inputs: dict, index: int) -> str:  # pragma: no cover - abstract
        """The text that replaces the ``index``-th image placeholder of the batch."""
        raise NotImplementedError

    def process_images(self, images: list[Any], texts: list[str]) -> dict:
        """The image processor's outputs for the batch's images (all of them, in placeholder order)."""
        return dict(self.image_processor(images=images, return_tensors="pt"))

    def __call__(self, images: Any = None, text: Any = None, **kwargs: Any) -> Any:
        from transformers import BatchFeature

        return_tensors = kwargs.pop("return_tensors", None)
        texts = [text] if isinstance(text, str) else list(text or [])
        image_inputs: dict[str, Any] = {}
        flat = _flatten(images)
        if flat:
            image_inputs = self.process_images(flat, texts)
            texts = expand_placeholders(texts, self.image_token,
                                        [self.expand(image_inputs, k) for k in range(len(flat))])
        enc = self.tokenizer(texts, return_tensors=return_tensors, **kwargs)
        data = dict(enc)
        if self.mm_token_types:
            image_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
            ids = data["input_ids"]
            data["mm_token_type_ids"] = ((ids == image_id).long() if hasattr(ids, "long")
                                         else [[int(i == image_id) for i in row] for row in ids])
        data.update({k: v for k, v in image_inputs.items() if k not in self.drop})
        return BatchFeature(data=data, tensor_type=return_tensors)

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("chat_template", self.chat_template)
        return self.tokenizer.apply_chat_template(conversation, **kwargs)

    def batch_decode(self, *args: Any, **kwargs: Any) -> Any:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> Any:
        return self.tokenizer.decode(*args, **kwargs)


def expand_placeholders(texts: list[str], token: str, replacements: list[str], what: str = "images",
                        hint: str = "") -> list[str]:
    """Each ``token`` of the texts, in order across the batch, replaced by the next of ``replacements`` (the
    processor's expansion of one image or video); as many placeholders as replacements, or a ValueError."""
    k, expanded = 0, []
    for t in texts:
        parts = t.split(token)
        if k + len(parts) - 1 > len(replacements):
            raise ValueError(f"text has more {token} placeholders than {what} ({len(replacements)})")
        out = parts[0]
        for p in parts[1:]:
            out += replacements[k] + p
            k += 1
        expanded.append(out)
    if k != len(replacements):
        raise ValueError(f"{len(replacements)} {what} but {k} {token} placeholders in the text{hint}")
    return expanded


def _flatten(images: Any) -> list[Any]:
    if images is None:
        return []
    out: list[Any] = []
    for im in images if isinstance(images, (list, tuple)) else [images]:
        if isinstance(im, (list, tuple)):
            out.extend(im)
        else:
            out.append(im)
    return out


def read_chat_template(path: str | Path, tokenizer: Any) -> str | None:
    """The chat template of a checkpoint: the tokenizer's, chat_template.jinja, or chat_template.json."""
    template = getattr(tokenizer, "chat_template", None)
    if template:
        return template
    for name in ("chat_template.jinja", "chat_template.json"):
        f = Path(path) / name
        if f.is_file():
            text = f.read_text(encoding="utf-8")
            return json.loads(text)["chat_template"] if name.endswith(".json") else text
    return None


def processor_settings(path: str | Path) -> dict:
    """processor_config.json's content ({} if absent): e.g. image_seq_length, patch_size."""
    f = Path(path) / "processor_config.json"
    if not f.is_file():
        return {}
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{str(f)!r} is not valid JSON ({e}); re-download the checkpoint") from None
    return data if isinstance(data, dict) else {}


def stock_processor(path: str) -> Any:
    """``AutoProcessor.from_pretrained(path)`` with left padding, for families whose stock processor needs no
    torchvision; failures are one-line ModelLoadErrors that keep transformers' reason (its ImportError texts
    start with a newline, so the reason is collapsed onto the line rather than cut at it)."""
    from transformers import AutoProcessor

    try:
        proc = AutoProcessor.from_pretrained(path)
    except (OSError, ValueError, ImportError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        raise ModelLoadError(f"cannot load the processor from {path!r}: {msg}") from e
    if getattr(proc, "image_processor", None) is None:
        raise ModelLoadError(f"{path!r} has no image processor (preprocessor_config.json); re-download the "
                             f"checkpoint with its processor files")
    proc.tokenizer.padding_side = "left"
    return proc


def load_processor(path: str, image_processor_class: str,
                   build: Callable[[Any, Any, str, dict], Any]) -> Any:
    """The stock processor if ``AutoProcessor`` builds a complete one, else ``build(tokenizer, image_processor,
    chat_template, processor_settings)`` from the checkpoint's tokenizer and ``transformers.<image_processor_class>``
    (a PIL image processor). Errors are one-line ModelLoadErrors naming the file that is missing and why."""
    import transformers
    from transformers import AutoProcessor, AutoTokenizer

    reason = ""
    try:
        proc = AutoProcessor.from_pretrained(path)
        if getattr(proc, "image_processor", None) is not None and getattr(proc, "tokenizer", None) is not None:
            proc.tokenizer.padding_side = "left"
            return proc
        reason = "AutoProcessor returned no image processor"
    except (ImportError, AttributeError, ValueError, OSError, TypeError, KeyError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
    try:
        tok = AutoTokenizer.from_pretrained(path)
        improc = getattr(transformers, image_processor_class).from_pretrained(path)
    except (OSError, ValueError, TypeError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        raise ModelLoadError(f"cannot load the processor from {path!r}: the stock one failed ({reason}) and the "
                             f"tokenizer / {image_processor_class} could not be read ({msg}); the directory needs "
                             f"tokenizer files and preprocessor_config.json") from e
    tok.padding_side = "left"
    template = read_chat_template(path, tok)
    if template is None:
        raise ModelLoadError(f"no chat template in {path!r} (tokenizer_config.json, chat_template.jinja or "
                             f"chat_template.json); add one or use an instruction-tuned checkpoint")
    return build(tok, improc, template, processor_settings(path))
