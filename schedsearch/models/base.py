"""The adapter interface: everything schedsearch needs to know about one VLM family.

Lifecycle::

    adapter = load_model("qwen2.5-vl")          # registry -> family adapter -> from_pretrained(dir)
    batch = adapter.prepare(images, prompts)     # processor output, left-padded, on the model's device
    vis = adapter.visual_mask(batch["input_ids"])        # (B, N) bool: which positions are visual tokens
    coords = adapter.visual_coords(batch)                # (B, V, 3): image index, row, col in [0, 1)
    h = adapter.last_hidden_state(batch)                 # (B, D): final-norm state of the last token
    with apply_schedule(adapter.model, schedule, adapter=adapter): ...

Only the adapter modules branch on model families; the runtime, FLOPs model and search
use this interface. Facts that are only data (attribute paths, model types, aliases) live in
the ``FamilySpec`` tables of each adapter module, not in code.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL import Image


@dataclass(frozen=True)
class FamilySpec:
    """Data-only facts about one model family (one row per HF class name)."""

    family: str  # stable id written into schedules, e.g. "qwen2_5_vl"
    model_types: tuple[str, ...]  # config.model_type values this family loads
    model_class: str  # transformers class name, e.g. "Qwen2_5_VLForConditionalGeneration"
    text_model_path: str  # attribute path from the top model to the decoder stack, e.g. "model.language_model"
    image_token_attr: str = "image_token_id"  # attribute of the top config holding the image token id
    vision_path: str = ""  # attribute path to the vision tower (its call inputs are recorded for visual_coords)
    #: DeepStack (arXiv 2406.04334, Qwen3-VL): the text model's (visual-position mask, per-layer features) kwargs;
    #: the stock forward adds features[i] at the visual positions after decoder layer i. Empty: no DeepStack.
    deepstack_kwargs: tuple[str, ...] = ()
    #: per-token batch keys the model needs next to input_ids, with the value a generated token gets (Qwen's
    #: mm_token_type_ids and Gemma 3's token_type_ids: 1 = image token, generated 0; PaliGemma's token_type_ids:
    #: 0 = the bidirectional prefix, generated 1). prepare() keeps them; a sequence extended by hand extends them.
    token_types: tuple[tuple[str, int], ...] = ()
    #: False where visual_coords needs batch keys that generate() hands only to the image encoder (LLaVA-NeXT's
    #: and OneVision's image_sizes): schedules that need token positions then work with model(**batch) only
    positions_in_generate: bool = True
    #: how the family takes video ("" = it takes none: prepare refuses videos in one line, and the runtime refuses
    #: a batch with ``pixel_values_videos``): "qwen2" (video grid + mm_token_type_ids 2), "qwen2.5" (also
    #: second_per_grid_ts), "qwen3" (one timestamped segment per temporal patch); attribute of the video token id
    video: str = ""
    video_token_attr: str = "video_token_id"


#: Where a prompt wants its images: ``"what is in <image> ?"``. Without markers, images go before the text.
IMAGE_MARKER = "<image>"


def chat_content(prompt: str, n_images: int, n_videos: int = 0) -> list[dict]:
    """The user turn's content list for ``prompt`` and its ``n_images`` images, for a chat template.

    Images take the places of the prompt's ``<image>`` markers, in order (text pieces are stripped); a prompt
    without markers gets all images before its text, the usual VLM layout. A marker count that differs from
    the number of images is a ValueError (the manifest loader reports it with file and line first). Videos
    (``n_videos``) go after the images and before the text.
    """
    parts = prompt.split(IMAGE_MARKER)
    videos = [{"type": "video"} for _ in range(n_videos)]
    if len(parts) == 1:
        return [{"type": "image"} for _ in range(n_images)] + videos + [{"type": "text", "text": prompt}]
    if len(parts) - 1 != n_images:
        raise ValueError(f"the prompt has {len(parts) - 1} {IMAGE_MARKER} marker(s) but {n_images} image(s)")
    content: list[dict] = list(videos)
    for k, part in enumerate(parts):
        if part.strip():
            content.append({"type": "text", "text": part.strip()})
        if k < n_images:
            content.append({"type": "image"})
    return content


def chat_batch(processor: Any, images: list[list[Any]], prompts: list[str], *, nested: bool = False,
               drop: tuple[str, ...] = ("token_type_ids",), **proc_kwargs: Any) -> Any:
    """Left-padded processor batch for one user turn per sample, rendered with the chat template.

    The template comes from the processor (or its tokenizer); each prompt's images take the places of its
    ``<image>`` markers (:func:`chat_content`). ``nested``: pass images as one list per sample (processors that
    validate per-sample image counts, e.g. Gemma 3, Idefics3) instead of one flat list. Keys in ``drop`` are
    removed from the result (the default drops BERT-style token_type_ids that VLMs do not take).
    """
    if len(images) != len(prompts):
        raise ValueError(f"prepare: {len(images)} image lists but {len(prompts)} prompts; pass one list per prompt")
    owner = processor if getattr(processor, "chat_template", None) else processor.tokenizer
    texts = [owner.apply_chat_template([{"role": "user", "content": chat_content(p, len(imgs))}], tokenize=False,
                                       add_generation_prompt=True) for imgs, p in zip(images, prompts, strict=True)]
    flat = [im for imgs in images for im in imgs]
    processor.tokenizer.padding_side = "left"
    pics: Any = ([list(imgs) for imgs in images] if nested else flat) if flat else None
    batch = processor(images=pics, text=texts, padding=True, return_tensors="pt", **proc_kwargs)
    for key in drop:
        batch.pop(key, None)
    return batch


class VLMAdapter:
    """Base class of family adapters. Subclasses set ``spec`` and implement the abstract methods."""

    spec: ClassVar[FamilySpec]

    def __init__(self, model: Any, processor: Any, name_or_path: str):
        self.model = model
        self.processor = processor
        self.name_or_path = name_or_path

    # ----------------------------------------------------------------- loading
    @classmethod
    def load(
        cls,
        path: str,
        *,
        dtype: Any = None,
        attn_implementation: str | None = None,
        device: str | None = None,
    ) -> VLMAdapter:
        """``spec.model_class.from_pretrained(path)`` and the checkpoint's stock processor (``AutoProcessor``).
        Families whose stock processor needs torchvision override this with an image-only stand-in."""
        from schedsearch.models import load_hf_model
        from schedsearch.models.imageproc import stock_processor

        model = load_hf_model(cls.spec.model_class, path, dtype=dtype, attn_implementation=attn_implementation,
                              device=device)
        return cls(model, stock_processor(path), path)

    # ------------------------------------------------------------ structure
    @property
    def family(self) -> str:
        return self.spec.family

    @property
    def text_model(self) -> Any:
        """The decoder stack module (has ``.layers`` and ``.norm``; receives ``inputs_embeds``)."""
        obj = self.model
        for part in self.spec.text_model_path.split("."):
            obj = getattr(obj, part)
        return obj

    @property
    def decoder_layers(self) -> Any:
        return self.text_model.layers

    @property
    def vision_tower(self) -> Any:
        """The vision encoder module, or None. The runtime records its last call's inputs for visual_coords."""
        if not self.spec.vision_path:
            return None
        obj = self.model
        for part in self.spec.vision_path.split("."):
            obj = getattr(obj, part)
        return obj

    @property
    def num_layers(self) -> int:
        return len(self.decoder_layers)

    @property
    def text_config(self) -> Any:
        return self.model.config.get_text_config()

    @property
    def image_token_id(self) -> int:
        return int(getattr(self.model.config, self.spec.image_token_attr))

    def fingerprint(self) -> str:
        """sha256 of the model's config (canonical JSON, without names/paths/dtype), hex, 16 chars."""
        return config_fingerprint(self.model.config.to_dict())

    # ---------------------------------------------------------------- batches
    def prepare(self, images: list[list[Image.Image]], prompts: list[str],
                videos: list[list[Any]] | None = None) -> Any:  # pragma: no cover
        """Build a left-padded model batch (BatchFeature) from per-sample image lists and prompts.

        ``videos``: per sample a list of clips (:class:`schedsearch.video.Video`, or a list of PIL frames), for
        families that take video (``spec.video``); the others refuse a non-empty list with one line."""
        raise NotImplementedError

    @property
    def supports_video(self) -> bool:
        return bool(self.spec.video)

    def refuse_video(self, videos: Any) -> None:
        """One-line VideoError when ``videos`` holds a clip and this family takes no video."""
        if videos and any(list(v) for v in videos) and not self.supports_video:
            from schedsearch.errors import VideoError

            raise VideoError(f"the {self.family} family takes no video input (video is supported on qwen2_vl, "
                             "qwen2_5_vl, qwen3_vl, qwen3_vl_moe): use images, or a model of those families")

    def visual_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, N) bool: positions holding visual tokens (image and, for video families, video tokens)."""
        return self.modality_mask(input_ids) > 0

    def modality_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, N) long: 0 = text, 1 = image token, 2 = video token (Qwen's ``mm_token_type_ids`` convention)."""
        out = (input_ids == self.image_token_id).long()
        if self.supports_video:
            out = out.masked_fill(input_ids == int(getattr(self.model.config, self.spec.video_token_attr)), 2)
        return out

    def visual_time(self, batch: Any) -> torch.Tensor:
        """(B, V, 2) long per visual token in sequence order: (clip, frame) -- the sample's video number and the
        token's temporal patch in it -- or (-1, 0) for image tokens. Default: no video tokens."""
        import torch

        vis = self.visual_mask(batch["input_ids"])
        n = int(vis.sum(1).max()) if vis.numel() else 0
        out = torch.zeros(vis.shape[0], n, 2, dtype=torch.long, device=vis.device)
        out[..., 0] = -1
        return out

    def visual_coords(self, batch: Any) -> torch.Tensor:  # pragma: no cover - abstract
        """(B, V, 3) float: for every visual token in sequence order, (image index, row, col).

        row/col are the token's cell centre normalised to [0, 1) within its image; tokens that have no
        spatial cell (e.g. LLaVA-NeXT's newline tokens) get the row of their line and col = 1 - eps.
        ``batch`` holds the base model's forward kwargs that are not None and, under ``"_vision_call"``,
        the (args, kwargs) of the vision tower's last call: inside ``generate()`` the encoder runs first
        and e.g. ``image_grid_thw`` reaches only the vision tower.
        """
        raise NotImplementedError

    def precompute_vision(self, batch: Any) -> dict:
        """A copy of ``batch`` whose image features are computed now and passed as ``mm_encoder_outputs``.

        This is the public path ``generate()`` uses (``base_model.get_image_features`` with the batch
        keys its signature names). Pixel tensors are dropped; grid/size keys stay because position ids
        are derived from them. Forward passes on the result skip the vision encoder.
        """
        import inspect

        import torch

        base = self.model.base_model
        fn = getattr(base, "get_image_features", None)
        if fn is None or "pixel_values" not in batch or \
                "mm_encoder_outputs" not in inspect.signature(base.forward).parameters:
            return dict(batch)
        names = [p for p in inspect.signature(fn).parameters if p != "kwargs"]
        inputs = {k: batch[k] for k in names if k in batch}
        with torch.no_grad():
            enc = fn(**inputs, return_dict=True)
        layout = self.image_layout(batch)
        if layout is not None:  # only the pixels tell it (e.g. InternVL's tile grids): keep it with the features
            from schedsearch.models.tiles import LAYOUT_ATTR

            setattr(enc, LAYOUT_ATTR, layout)
        out = {k: v for k, v in batch.items() if k != "pixel_values"}
        out["mm_encoder_outputs"] = {"image": enc}
        self._remember_vision_inputs(enc, inputs)
        return out

    def rotary(self, layer_idx: int) -> Any:
        """How decoder layer ``layer_idx`` rotates q/k, as ``(x, cos, sin) -> x`` for the attention scorers, where it
        is not rotate-half over the whole head (default None). Adapters return the family's own transformers
        function, so scorers follow partial / interleaved rotary and layers without RoPE exactly."""
        return None

    def image_layout(self, batch: Any) -> Any:
        """Layout facts that only the pixels carry (default: none). Families whose ``visual_coords`` needs them
        return them here; ``precompute_vision`` keeps them with the encoder output (``tiles.attached_layout``)."""
        return None

    # Rankings that read the vision encoder's maps need the encoder to run; a batch from precompute_vision skips
    # it. The adapter therefore remembers, while the precomputed features are alive, the inputs they came from,
    # and replay_vision runs the encoder again once per (batch, request), keeping the record it produced.
    def _remember_vision_inputs(self, enc: Any, inputs: dict) -> None:
        import weakref

        table = self.__dict__.setdefault("_vision_inputs", {})
        key = id(enc)
        table[key] = (weakref.ref(enc), inputs)
        records = self.__dict__.setdefault("_vision_records", {})

        def forget(key: int = key) -> None:
            table.pop(key, None)
            for k in [k for k in records if k[0] == key]:
                records.pop(k, None)

        weakref.finalize(enc, forget)

    def replay_vision(self, batch: Any, request: dict, store: list) -> bool:
        """Fill ``store`` for a batch whose image features were precomputed by :meth:`precompute_vision`: from a
        kept record, or by running the encoder again (the caller's ``vision_maps_hook`` for ``request`` must be
        installed). Returns False when the batch's encoder inputs are unknown."""
        import torch

        enc = (batch.get("mm_encoder_outputs") or {}).get("image")
        entry = self.__dict__.get("_vision_inputs", {}).get(id(enc)) if enc is not None else None
        if entry is None or entry[0]() is not enc:
            return False
        key = (id(enc), repr(sorted((k, sorted(v)) for k, v in request.items())))
        records = self.__dict__.setdefault("_vision_records", {})
        if key not in records:
            with torch.no_grad():
                self.model.base_model.get_image_features(**entry[1], return_dict=True)
            if not store:
                return False
            records[key] = store[-1]
        store[:] = [records[key]]
        return True

    # ------------------------------------------------------- vision-encoder maps (optional interface)
    # Rankings that read the vision encoder's attention (FasterVLM, VTC-CLS, VisionZip, HiPrune, FlowCut, HiRED;
    # runtime/scorers/) use three methods. A family that cannot provide them simply does not define them: the
    # runtime then refuses such a scorer with one line when the schedule is applied. Lifecycle::
    #
    #     depth, global_layers = adapter.vision_encoder_layers()       # once, when a schedule is applied
    #     handle = adapter.vision_maps_hook({22: {"cls"}}, store)      # hooks on the encoder, removed on exit
    #     ... the encoder runs (prefill or generate()) ...             # the hook CLEARS store, then records
    #     maps = adapter.vision_token_maps(store, batch)               # per LLM visual token, sequence order
    #
    # * ``vision_encoder_layers() -> (depth, global_layers)``: the number of attention layers of the encoder and
    #   the indices whose attention is global (not windowed); scorers resolve their layer parameters with
    #   ``runtime.scorers.base.resolve_vision_layer``.
    # * ``vision_maps_hook(request, store) -> handle``: ``request`` maps resolved layer indices (0..depth-1) to
    #   sets of kinds from ``models.vision_maps.KINDS``; on every encoder run the hook clears ``store`` and
    #   appends one record of that run (its content is the adapter's business). ``handle.remove()`` undoes it.
    # * ``vision_token_maps(store, batch) -> dict``: turns the last record into ``{(layer, kind): (B, V) or
    #   (B, V, d)}`` per visual token of ``batch`` in sequence order (one sample's images concatenated), plus the
    #   geometry: ``"layout"`` (B, V) long: 0 = the image's base view, k >= 1 = high-resolution tile k, -1 = a
    #   token without a spatial cell (its maps hold NaN); ``"image"`` (B, V) long: which encoded image (a batch-wide
    #   index); ``"cell"`` (B, V, 2): integer (row, col) of the token in its view's grid (tiles: the stitched grid).
    #   ``batch`` is as for :meth:`visual_coords`. Raises ValueError (one line) when the record does not fit.

    def last_hidden_state(self, batch: Any) -> torch.Tensor:
        """(B, D): the last position's hidden state after the decoder's final norm (no lm_head)."""
        import torch

        with torch.no_grad():
            out = self.model.model(**batch, use_cache=False)
        return out.last_hidden_state[:, -1, :]


def config_fingerprint(config_dict: dict) -> str:
    """Stable fingerprint of a model config: architecture numbers only, not names, paths or dtypes."""
    drop = {"_name_or_path", "name_or_path", "torch_dtype", "dtype", "transformers_version", "_commit_hash",
            "architectures", "_attn_implementation", "attn_implementation", "_attn_implementation_autoset",
            "use_cache", "output_attentions", "output_hidden_states", "return_dict"}

    def clean(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: clean(v) for k, v in sorted(obj.items()) if k not in drop}
        if isinstance(obj, (list, tuple)):
            return [clean(v) for v in obj]
        return obj

    blob = json.dumps(clean(config_dict), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class HandleGroup:
    """Several hook handles removed together (what the adapters' ``*_hook`` methods return)."""

    def __init__(self, handles: list[Any]):
        self.handles = list(handles)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
