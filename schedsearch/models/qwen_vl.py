"""Qwen2-VL and Qwen2.5-VL adapters.

Lifecycle::

    adapter = Qwen25VLAdapter.load(dir)      # from_pretrained(dir) + processor (image-only if needed)
    batch = adapter.prepare([[img], [img]], ["q1", "q2"])   # chat template, left padding, mm_token_type_ids
    adapter.visual_coords(batch)             # (B, V, 3) from image_grid_thw and the merge size

The stock ``Qwen2VLProcessor`` / ``Qwen2_5_VLProcessor`` need a video processor, which needs
torchvision; where torchvision is unusable ``AutoProcessor`` raises or returns only the tokenizer.
:class:`QwenImageProcessor` then stands in: the tokenizer plus the PIL image processor
(``Qwen2VLImageProcessorPil``), producing the same ``input_ids`` (each ``<|image_pad|>`` expanded to
``t*h*w / merge**2`` copies), ``attention_mask``, ``pixel_values``, ``image_grid_thw`` and
``mm_token_type_ids`` (1 = image token) as the stock processor does for images.

Video (no torchvision needed either): :meth:`QwenImageProcessor.__call__` takes ``videos=`` (sampled clips,
:class:`schedsearch.video.Video`) and builds ``pixel_values_videos`` / ``video_grid_thw`` the way the stock
``Qwen2VLVideoProcessor.patchify`` does (transformers ``video_processing_qwen2_vl.py``): frames padded to a
multiple of ``temporal_patch_size`` by repeating the last one, every ``temporal_patch_size`` consecutive frames
one temporal patch, patches in (t, h/merge, w/merge, merge, merge) order. Each frame goes through the PIL image
processor (same resize, rescale, normalise as images); its patch rows hold the frame repeated over the
temporal axis, so a temporal patch is the frames' first temporal slices side by side -- the stock video layout.
``<|video_pad|>`` expands to ``t*h*w / merge**2`` copies (Qwen2/2.5-VL; Qwen2.5-VL also gets
``second_per_grid_ts = temporal_patch_size / fps``) or, for Qwen3-VL, to one ``<T seconds><|vision_start|>``
... ``<|vision_end|>`` segment per temporal patch (``Qwen3VLProcessor.replace_video_token``);
``mm_token_type_ids`` is 2 at video tokens.
"""

from __future__ import annotations

from typing import Any

from schedsearch.errors import ModelLoadError
from schedsearch.models import load_hf_model
from schedsearch.models.base import FamilySpec, HandleGroup, VLMAdapter, chat_content
from schedsearch.models.imageproc import expand_placeholders

__all__ = ["QWEN_SPECS", "Qwen25VLAdapter", "Qwen2VLAdapter", "QwenImageProcessor", "load_qwen_processor"]

QWEN_SPECS: dict[str, FamilySpec] = {
    "qwen2_5_vl": FamilySpec(family="qwen2_5_vl", model_types=("qwen2_5_vl",),
                             model_class="Qwen2_5_VLForConditionalGeneration",
                             text_model_path="model.language_model", image_token_attr="image_token_id",
                             vision_path="model.visual", token_types=(("mm_token_type_ids", 0),), video="qwen2.5"),
    "qwen2_vl": FamilySpec(family="qwen2_vl", model_types=("qwen2_vl",),
                           model_class="Qwen2VLForConditionalGeneration",
                           text_model_path="model.language_model", image_token_attr="image_token_id",
                           vision_path="model.visual", token_types=(("mm_token_type_ids", 0),), video="qwen2"),
}
IMAGE_TOKEN = "<|image_pad|>"  # the placeholder the chat template writes once per image
VIDEO_TOKEN = "<|video_pad|>"  # ... and once per video


class QwenImageProcessor:
    """Image-only stand-in for the stock Qwen-VL processor (tokenizer + PIL image processor).

    Call it like the stock processor: ``proc(images=[...], text=[...], padding=True, return_tensors="pt")``.
    ``images`` are all images of the batch in the order their placeholders appear in ``text``.
    """

    def __init__(self, tokenizer: Any, image_processor: Any, chat_template: str | None = None):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        self.image_token = getattr(tokenizer, "image_token", None) or IMAGE_TOKEN
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token = getattr(tokenizer, "video_token", None) or VIDEO_TOKEN
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)

    def __call__(self, images: Any = None, text: Any = None, videos: Any = None, video_style: str = "qwen2.5",
                 **kwargs: Any) -> Any:
        from transformers import BatchFeature

        return_tensors = kwargs.pop("return_tensors", None)
        texts = [text] if isinstance(text, str) else list(text or [])
        video_inputs: dict[str, Any] = {}
        if videos is not None and len(videos) > 0:
            video_inputs, texts = self._videos(list(videos), texts, video_style)
        image_inputs: dict[str, Any] = {}
        if images is not None and len(images) > 0:
            image_inputs = dict(self.image_processor(images=images, return_tensors="pt"))
            grid = image_inputs["image_grid_thw"]
            merge = int(self.image_processor.merge_size) ** 2
            texts = expand_placeholders(texts, self.image_token,
                                        [self.image_token * (int(g.prod()) // merge) for g in grid])
        enc = self.tokenizer(texts, return_tensors=return_tensors, **kwargs)
        data = dict(enc)
        ids = data["input_ids"]
        if hasattr(ids, "long"):
            data["mm_token_type_ids"] = (ids == self.image_token_id).long().masked_fill(ids == self.video_token_id, 2)
        else:
            data["mm_token_type_ids"] = [[1 if i == self.image_token_id else 2 if i == self.video_token_id else 0
                                          for i in row] for row in ids]
        data.update(image_inputs)
        data.update(video_inputs)
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _videos(self, videos: list[Any], texts: list[str], style: str) -> tuple[dict[str, Any], list[str]]:
        """``pixel_values_videos``, ``video_grid_thw`` (+ ``second_per_grid_ts`` for Qwen2.5-VL) and the texts
        with each ``<|video_pad|>`` expanded; see the module docstring for the layout."""
        import numpy as np
        import torch

        proc = self.image_processor
        tps = int(getattr(proc, "temporal_patch_size", 2))
        merge = int(proc.merge_size)
        patches, grids, seconds, placeholders = [], [], [], []
        for clip in videos:
            frames = list(getattr(clip, "frames", clip))
            if not frames:
                raise ValueError("a video has no frames")
            fps = float(getattr(clip, "fps", 0) or 1.0)
            times = list(getattr(clip, "timestamps", None) or [i / fps for i in range(len(frames))])
            frames += [frames[-1]] * (-len(frames) % tps)  # pad with the last frame, as the stock patchify does
            times += [times[-1]] * (len(frames) - len(times))
            out = proc(images=frames, return_tensors="np")
            grid = np.asarray(out["image_grid_thw"])
            if len({tuple(g) for g in grid.tolist()}) != 1:
                raise ValueError("the frames of a video resize to different grids: give frames of one size")
            _, gh, gw = (int(x) for x in grid[0])
            pv = np.asarray(out["pixel_values"], dtype=np.float32)
            channels = pv.shape[1] // (tps * proc.patch_size**2)
            per = pv.reshape(len(frames), gh * gw, channels, tps, proc.patch_size, proc.patch_size)[:, :, :, 0]
            gt = len(frames) // tps
            per = per.reshape(gt, tps, gh * gw, channels, proc.patch_size, proc.patch_size).transpose(0, 2, 3, 1, 4, 5)
            patches.append(per.reshape(gt * gh * gw, channels * tps * proc.patch_size**2))
            grids.append([gt, gh, gw])
            seconds.append(tps / fps)
            n_frame = gh * gw // merge**2
            if style == "qwen3":  # Qwen3VLProcessor: one timestamped segment per temporal patch
                stamps = [(times[i] + times[i + tps - 1]) / 2 for i in range(0, len(times), tps)]
                placeholders.append("".join(f"<{t:.1f} seconds><|vision_start|>{self.video_token * n_frame}"
                                            "<|vision_end|>" for t in stamps))
            else:
                placeholders.append(self.video_token * (gt * n_frame))
        expanded = expand_placeholders(texts, self.video_token, placeholders, "videos",
                                       " (does the chat template place {'type': 'video'} items?)")
        data: dict[str, Any] = {"pixel_values_videos": torch.from_numpy(np.concatenate(patches)),
                                "video_grid_thw": torch.tensor(grids, dtype=torch.long)}
        if style == "qwen2.5":
            data["second_per_grid_ts"] = torch.tensor(seconds, dtype=torch.float32)
        return data, expanded

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any:
        """The stock processor's contract: text by default; with ``tokenize=True`` the model inputs, images included.

        Images are the ``{"type": "image", "image": PIL image | path}`` (or ``"path"``/``"url"`` to a local file)
        items of the messages, in order; ``return_dict=True`` returns the full :class:`BatchFeature`
        (``input_ids``, ``attention_mask``, ``pixel_values``, ``image_grid_thw``, ``mm_token_type_ids``), otherwise
        ``input_ids`` only. One conversation or a list of conversations (then padded on the left).
        """
        kwargs.setdefault("chat_template", self.chat_template)
        tokenize = kwargs.pop("tokenize", False)
        return_dict = kwargs.pop("return_dict", False)
        return_tensors = kwargs.pop("return_tensors", None)
        padding = kwargs.pop("padding", True)
        if not tokenize:
            return self.tokenizer.apply_chat_template(conversation, tokenize=False, **kwargs)
        batched = bool(conversation) and isinstance(conversation[0], list | tuple)
        convs = list(conversation) if batched else [conversation]
        texts = [self.tokenizer.apply_chat_template(c, tokenize=False, **kwargs) for c in convs]
        images = [_image_of(item) for c in convs for msg in c for item in _content(msg) if _is_image(item)]
        out = self(images=images or None, text=texts, padding=padding, return_tensors=return_tensors)
        return out if return_dict else out["input_ids"]

    def batch_decode(self, *args: Any, **kwargs: Any) -> Any:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> Any:
        return self.tokenizer.decode(*args, **kwargs)


def _content(message: Any) -> list:
    content = message.get("content") if isinstance(message, dict) else None
    return content if isinstance(content, list) else []


def _is_image(item: Any) -> bool:
    return isinstance(item, dict) and item.get("type") == "image"


def _image_of(item: dict) -> Any:
    """The PIL image of a chat content item: ``image`` (a PIL image or a path), ``path`` or ``url`` (local file)."""
    from PIL import Image

    src = item.get("image", item.get("path", item.get("url")))
    if src is None:
        raise ValueError("an image item of the conversation has no 'image', 'path' or 'url'")
    if isinstance(src, Image.Image):
        return src
    name = str(src).removeprefix("file://")
    if "://" in name:
        raise ValueError(f"image {src!r}: only local files and PIL images are supported (nothing is downloaded)")
    with Image.open(name) as im:
        return im.convert("RGB")


def load_qwen_processor(path: str) -> Any:
    """The stock processor where it can be built, otherwise :class:`QwenImageProcessor`.

    The stock one is kept only if it has an image processor (``AutoProcessor`` silently returns a bare
    tokenizer, or raises ImportError, when torchvision is missing).
    """
    from transformers import AutoProcessor, AutoTokenizer

    try:
        proc = AutoProcessor.from_pretrained(path)
        if getattr(proc, "image_processor", None) is not None and getattr(proc, "tokenizer", None) is not None:
            proc.tokenizer.padding_side = "left"
            return proc
    except (ImportError, AttributeError, ValueError, OSError):
        pass
    from transformers import Qwen2VLImageProcessorPil

    try:
        tok = AutoTokenizer.from_pretrained(path)
        improc = Qwen2VLImageProcessorPil.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load the tokenizer/image processor from {path!r}: {str(e).splitlines()[0]}; "
                             f"the directory needs tokenizer files and preprocessor_config.json") from e
    tok.padding_side = "left"
    template = getattr(tok, "chat_template", None)
    if template is None:
        for name in ("chat_template.jinja", "chat_template.json"):
            f = __import__("pathlib").Path(path) / name
            if f.is_file():
                text = f.read_text(encoding="utf-8")
                template = __import__("json").loads(text)["chat_template"] if name.endswith(".json") else text
                break
    if template is None:
        raise ModelLoadError(f"no chat template in {path!r} (tokenizer_config.json, chat_template.jinja or "
                             f"chat_template.json); add one or use an -Instruct checkpoint")
    return QwenImageProcessor(tok, improc, chat_template=template)


class _QwenAdapter(VLMAdapter):
    """Shared Qwen-VL logic; subclasses only pick their ``spec`` row."""

    @classmethod
    def load(cls, path: str, *, dtype: Any = None, attn_implementation: str | None = None,
             device: str | None = None) -> VLMAdapter:
        model = load_hf_model(cls.spec.model_class, path, dtype=dtype, attn_implementation=attn_implementation,
                              device=device)
        return cls(model, load_qwen_processor(path), path)

    @property
    def merge_size(self) -> int:
        return int(self.model.config.vision_config.spatial_merge_size)

    def prepare(self, images: list[list[Any]], prompts: list[str], videos: list[list[Any]] | None = None) -> Any:
        if len(images) != len(prompts):
            raise ValueError(f"prepare: {len(images)} image lists but {len(prompts)} prompts; pass one list per prompt")
        videos = [list(v) for v in videos] if videos is not None else [[] for _ in prompts]
        if len(videos) != len(prompts):
            raise ValueError(f"prepare: {len(videos)} video lists but {len(prompts)} prompts; pass one list per prompt")
        texts = []
        for imgs, vids, prompt in zip(images, videos, prompts, strict=False):
            content = chat_content(prompt, len(imgs), len(vids))
            texts.append(self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                            tokenize=False, add_generation_prompt=True))
        flat = [im for imgs in images for im in imgs]
        clips = [v for vids in videos for v in vids]
        self.processor.tokenizer.padding_side = "left"
        if clips:  # the stock video processor needs torchvision: video always goes through the stand-in
            proc = self.processor
            if not isinstance(proc, QwenImageProcessor):
                proc = QwenImageProcessor(proc.tokenizer, proc.image_processor, getattr(proc, "chat_template", None))
            batch = proc(images=flat or None, text=texts, videos=clips, video_style=self.spec.video, padding=True,
                         return_tensors="pt")
        else:
            batch = self.processor(images=flat or None, text=texts, padding=True, return_tensors="pt")
        if "mm_token_type_ids" not in batch:  # stock processors of some versions: Qwen needs it (PLATFORM.md)
            batch["mm_token_type_ids"] = self.modality_mask(batch["input_ids"])
        batch.pop("token_type_ids", None)
        return batch.to(self.model.device)

    def visual_coords(self, batch: Any) -> Any:
        """(B, V, 3): (item, row, col) per visual token; every image is an item and so is every temporal patch of
        a video (frame-local rows/cols: spatial rankings and recycling see frames as separate pictures)."""
        return self._token_table(batch)[..., :3]

    def visual_time(self, batch: Any) -> Any:
        """(B, V, 2) long: (clip, frame) per visual token -- the sample's video number and temporal patch -- or
        (-1, 0) for image tokens (see :meth:`VLMAdapter.visual_time`)."""
        return self._token_table(batch)[..., 3:].long()

    def _token_table(self, batch: Any) -> Any:
        """(B, V_max, 5) float per visual token in sequence order: item, row, col, clip, frame (a sample with fewer
        visual tokens than the batch's largest is padded with zero rows at the end).

        Images come from ``image_grid_thw`` and videos from ``video_grid_thw``, each consumed in sequence order as
        its tokens appear (``mm_token_type_ids`` 1 / 2); a Qwen3-VL video's per-frame segments consume one clip.
        """
        import torch

        input_ids = batch["input_ids"]
        grids = {1: batch.get("image_grid_thw"), 2: batch.get("video_grid_thw")}
        mod = self.modality_mask(input_ids)
        m = self.merge_size
        if grids[1] is None and grids[2] is None:  # inside generate(): only the encoder runs saw the grids
            calls = batch.get("_vision_calls") or ([batch["_vision_call"]] if batch.get("_vision_call") else [])
            need = {k: int((mod == k).sum()) for k in (1, 2)}
            for args, kwargs in reversed(calls):  # generate() encodes images first, then videos
                g = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
                n_tok = int((g.prod(-1) // m**2).sum()) if g is not None else -1
                for k in (2, 1):
                    if grids[k] is None and need[k] > 0 and n_tok == need[k]:
                        grids[k] = g
                        break
        for k, what in ((1, "image_grid_thw"), (2, "video_grid_thw")):
            if bool((mod == k).any()) and grids[k] is None:
                raise ValueError(f"visual_coords: the batch has no {what} (and no recorded vision call); "
                                 "pass the processor's output")
        tables = {1: [], 2: []}
        for k in (1, 2):
            for t, h, w in (grids[k].tolist() if grids[k] is not None else []):
                hh, ww = h // m, w // m
                r = (torch.arange(hh, dtype=torch.float32) + 0.5) / hh
                c = (torch.arange(ww, dtype=torch.float32) + 0.5) / ww
                rc = torch.stack(torch.meshgrid(r, c, indexing="ij"), dim=-1).reshape(-1, 2).repeat(int(t), 1)
                frame = torch.arange(int(t), dtype=torch.float32).repeat_interleave(hh * ww)[:, None]
                tables[k].append(torch.cat([rc, frame], dim=1))  # row, col, frame
        pos = {1: 0, 2: 0}  # next item of each modality (batch-wide, in processor order)
        rows = []
        for b in range(input_ids.shape[0]):
            kinds = mod[b][mod[b] > 0].tolist()
            out = torch.zeros(len(kinds), 5)
            i, item_base, clip = 0, 0, -1
            while i < len(kinds):
                k = kinds[i]
                if pos[k] >= len(tables[k]):
                    what = "images" if k == 1 else "videos"
                    raise ValueError(f"visual_coords: the batch's visual tokens need more {what} than the "
                                     f"{len(tables[k])} its grid lists")
                tab = tables[k][pos[k]]
                pos[k] += 1
                take = min(len(tab), len(kinds) - i)
                if kinds[i : i + take] != [k] * take:
                    raise ValueError(f"visual_coords: an {'image' if k == 1 else 'video'} of {len(tab)} tokens does "
                                     "not line up with the sample's visual tokens")
                if k == 2:
                    clip += 1
                out[i : i + take, 0] = item_base + (tab[:take, 2] if k == 2 else 0)
                out[i : i + take, 1:3] = tab[:take, :2]
                out[i : i + take, 3] = clip if k == 2 else -1
                out[i : i + take, 4] = tab[:take, 2] if k == 2 else 0
                item_base += int(tab[:, 2].max()) + 1 if k == 2 else 1
                i += take
            rows.append(out)
        for k in (1, 2):
            if pos[k] != len(tables[k]):
                what = "images" if k == 1 else "videos"
                raise ValueError(f"visual_coords: {len(tables[k])} {what} but only {pos[k]} used by the batch's "
                                 "visual tokens")
        width = max((len(r) for r in rows), default=0)  # a ragged batch: shorter samples padded with zero rows
        return torch.stack([torch.cat([r, r.new_zeros(width - len(r), 5)]) for r in rows]).to(input_ids.device)

    # ------------------------------------------------------------ vision attention (VFlowOpt-style maps)
    def vision_attention_hook(self, store: list, block: int | None = None) -> Any:
        """Record, on every vision-tower run, each image's head-averaged self-attention of a late
        full-attention block, aggregated to the merged tokens the LLM sees, in their original order.

        Appends one (V_i, V_i) float tensor per image to ``store``; returns the hook handle. The q/k are
        computed from the block's own ``qkv`` projection and vision RoPE (no attention weights needed).
        Patches of one merged token are consecutive inside the tower; Qwen2.5-VL additionally permutes
        merge units into windows, undone here with the tower's own window index.
        """
        import torch

        visual = self.vision_tower
        full = list(getattr(visual, "fullatt_block_indexes", None) or range(len(visual.blocks)))
        attn = visual.blocks[full[-1] if block is None else block].attn
        unit = self.merge_size**2
        grid_box: dict[str, Any] = {}

        def tower_pre(module: Any, args: tuple, kwargs: dict) -> None:
            grid_box["grid"] = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)

        def attn_pre(module: Any, args: tuple, kwargs: dict) -> None:
            with torch.no_grad():
                q, k, _ = _qwen_qkv(module, args, kwargs)
                n = q.shape[0]
                window = self._window_index(visual, grid_box.get("grid"), n // unit, q.device)
                bounds = kwargs["cu_seqlens"].tolist()
                for a, b in zip(bounds[:-1], bounds[1:], strict=False):
                    qa, ka = q[a:b].transpose(0, 1), k[a:b].transpose(0, 1)  # (H, n_i, hd)
                    probs = torch.softmax(qa @ ka.transpose(-1, -2) * module.scaling, dim=-1).mean(0)
                    v = (b - a) // unit
                    merged = probs.reshape(v, unit, v, unit).sum(dim=3).mean(dim=1)  # rows stay distributions
                    w = window[a // unit : b // unit] - a // unit  # permuted position -> original merged index
                    orig = torch.empty_like(merged)
                    orig[w[:, None], w[None, :]] = merged
                    store.append(orig)
            return None

        return HandleGroup([visual.register_forward_pre_hook(tower_pre, with_kwargs=True),
                            attn.register_forward_pre_hook(attn_pre, with_kwargs=True)])

    # ------------------------------------------------------------ vision maps (ranking by vision attention)
    def vision_encoder_layers(self) -> tuple[int, tuple[int, ...]]:
        """(depth, blocks with global attention): Qwen2.5-VL's ``fullatt_block_indexes``; Qwen2-VL: every block."""
        visual = self.vision_tower
        depth = len(visual.blocks)
        return depth, tuple(getattr(visual, "fullatt_block_indexes", None) or range(depth))

    def vision_maps_hook(self, request: dict[int, frozenset], store: list) -> Any:
        """See :meth:`VLMAdapter.vision_maps_hook`. Each run appends ``{"grid": grid_thw, (layer, kind): map}``
        with maps over all merged tokens of the run in their ORIGINAL order (window permutation undone): a
        merged token's value is the mean over its ``merge_size**2`` patches (LightCompress's VisionZip/VisPruner
        for Qwen average the 4 patches' received attention the same way)."""
        import torch

        from schedsearch.models.vision_maps import check_kinds, head_maps

        visual = self.vision_tower
        unit = self.merge_size**2
        request = {int(layer): check_kinds(kinds) for layer, kinds in request.items()}

        def tower_pre(module: Any, args: tuple, kwargs: dict) -> None:
            store.clear()
            store.append({"grid": kwargs.get("grid_thw", args[1] if len(args) > 1 else None)})

        def block_pre(layer: int, module: Any, args: tuple, kwargs: dict) -> None:
            if not store:
                return None
            kinds = request[layer]
            with torch.no_grad():
                q, k, v = _qwen_qkv(module, args, kwargs)
                n = q.shape[0]
                parts: dict[str, list] = {kind: [] for kind in kinds}
                bounds = kwargs["cu_seqlens"].tolist()
                for a, b in zip(bounds[:-1], bounds[1:], strict=False):  # one segment = one image / frame
                    seg = head_maps(q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1),
                                    kinds, module.scaling, has_cls=False)
                    for kind, val in seg.items():
                        parts[kind].append(val)
                window = self._window_index(visual, store[-1]["grid"], n // unit, q.device)
                for kind, vals in parts.items():
                    val = torch.cat(vals)
                    val = val.reshape(n // unit, unit, *val.shape[1:]).mean(dim=1)  # merged tokens, tower order
                    orig = torch.empty_like(val)
                    orig[window] = val  # window[i] = original index of the i-th merged token in tower order
                    store[-1][(layer, kind)] = orig
            return None

        handles = [visual.register_forward_pre_hook(tower_pre, with_kwargs=True)]
        for layer in request:
            handles.append(visual.blocks[layer].attn.register_forward_pre_hook(
                lambda m, a, kw, _l=layer: block_pre(_l, m, a, kw), with_kwargs=True))
        return HandleGroup(handles)

    def vision_token_maps(self, store: list, batch: Any) -> dict:
        """See :meth:`VLMAdapter.vision_token_maps`: the last run's maps split per image by ``grid_thw``."""
        import torch

        from schedsearch.models.vision_maps import stack_per_sample

        if not store or store[-1].get("grid") is None:
            raise ValueError("no vision-encoder run was recorded for this batch")
        rec = store[-1]
        m = self.merge_size
        sizes, images, cells = [], [], []
        for k, (t, h, w) in enumerate(rec["grid"].tolist()):
            hh, ww = h // m, w // m
            sizes.append(t * hh * ww)
            images.append(torch.full((t * hh * ww,), k, dtype=torch.long))
            cell = torch.arange(hh * ww)
            frame = torch.arange(t).repeat_interleave(hh * ww)
            # frames stacked with a gap row, so tokens of different frames are never grid neighbours
            cells.append(torch.stack([(cell.repeat(t) // ww + frame * (hh + 1)).float(),
                                      (cell.repeat(t) % ww).float()], dim=-1))
        counts = self.visual_mask(batch["input_ids"]).sum(1).tolist()
        out: dict = {key: stack_per_sample(list(torch.split(val, sizes)), counts)
                     for key, val in rec.items() if key != "grid"}
        out["image"] = stack_per_sample(images, counts)
        out["cell"] = stack_per_sample(cells, counts)
        out["layout"] = torch.zeros_like(out["image"])
        return out

    @staticmethod
    def _window_index(visual: Any, grid: Any, n_units: int, device: Any) -> Any:
        import torch

        if grid is None or not hasattr(visual, "window_size"):
            return torch.arange(n_units, device=device)
        from transformers.vision_utils import get_vision_window_index

        idx, _ = get_vision_window_index(grid, spatial_merge_size=visual.spatial_merge_size,
                                         window_size=visual.window_size, patch_size=visual.patch_size)
        return idx.to(device)

    def merged_token_grey(self, pixel_values: Any, grid: Any) -> list[Any]:
        """Per image, (V_i, K) grey values of the pixels under each merged token (for patch entropy).

        The processor lays out each patch row as C x T x p x p with the patches of one merged token
        consecutive, so a merged token's pixels are ``unit`` consecutive rows.
        """
        unit = self.merge_size**2
        channels = int(self.model.config.vision_config.in_channels)
        grey = pixel_values.float().reshape(pixel_values.shape[0], channels, -1).mean(dim=1)
        out, k = [], 0
        for t, h, w in grid.tolist():
            n = int(t * h * w)
            out.append(grey[k : k + n].reshape(n // unit, -1))
            k += n
        return out

    def vision_attention(self, batch: Any, block: int | None = None) -> list[Any]:
        """Run the vision tower once on ``batch`` and return the per-image maps of :meth:`vision_attention_hook`."""
        import torch

        store: list = []
        handle = self.vision_attention_hook(store, block)
        try:
            with torch.no_grad():
                self.model.base_model.get_image_features(pixel_values=batch["pixel_values"],
                                                         image_grid_thw=batch["image_grid_thw"])
        finally:
            handle.remove()
        return store


def _qwen_qkv(module: Any, args: tuple, kwargs: dict) -> tuple[Any, Any, Any]:
    """(q, k, v), each (n, heads, head_dim) float32, of a Qwen vision attention call, with the tower's RoPE on q/k."""
    import torch

    h = args[0] if args else kwargs["hidden_states"]
    cos, sin = kwargs["position_embeddings"]
    n = h.shape[0]
    q, k, v = module.qkv(h).reshape(n, 3, module.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = q.float(), k.float()
    c, s_ = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
    half = q.shape[-1] // 2

    def rot(x: Any) -> Any:
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    return q * c + rot(q) * s_, k * c + rot(k) * s_, v.float()  # RoFormer rotate-half, as the tower does


def _assign_images(per_image: list[Any], vis_mask: Any) -> Any:
    """Stack per-image (n_i, 2) row/col tables into (B, V, 3), consuming images in sequence order; samples with
    fewer visual tokens than the batch's largest (a ragged batch) are padded with zero rows at the end."""
    import torch

    counts = vis_mask.sum(1).tolist()
    rows, k = [], 0
    for n in counts:
        parts, got, idx = [], 0, 0
        while got < n:
            if k >= len(per_image):
                raise ValueError(f"visual_coords: the batch has {sum(counts)} visual tokens but the images give "
                                 f"only {sum(len(p) for p in per_image)}")
            rc = per_image[k]
            parts.append(torch.cat([torch.full((len(rc), 1), float(idx)), rc], dim=1))
            got += len(rc)
            k += 1
            idx += 1
        if got != n:
            raise ValueError(f"visual_coords: image features ({got}) do not line up with the sample's {n} visual "
                             f"tokens")
        rows.append(torch.cat(parts) if parts else torch.zeros(0, 3))
    if k != len(per_image):
        raise ValueError(f"visual_coords: {len(per_image)} images but only {k} used by the batch's visual tokens")
    width = max(counts, default=0)
    return torch.stack([torch.cat([r, r.new_zeros(width - len(r), 3)]) for r in rows]).to(vis_mask.device)


class Qwen25VLAdapter(_QwenAdapter):
    spec = QWEN_SPECS["qwen2_5_vl"]


class Qwen2VLAdapter(_QwenAdapter):
    spec = QWEN_SPECS["qwen2_vl"]
