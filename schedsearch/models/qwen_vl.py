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
"""

from __future__ import annotations

from typing import Any

from schedsearch.errors import ModelLoadError
from schedsearch.models import load_hf_model
from schedsearch.models.base import FamilySpec, VLMAdapter, chat_content

__all__ = ["QWEN_SPECS", "Qwen25VLAdapter", "Qwen2VLAdapter", "QwenImageProcessor", "load_qwen_processor"]

QWEN_SPECS: dict[str, FamilySpec] = {
    "qwen2_5_vl": FamilySpec(family="qwen2_5_vl", model_types=("qwen2_5_vl",),
                             model_class="Qwen2_5_VLForConditionalGeneration",
                             text_model_path="model.language_model", image_token_attr="image_token_id",
                             vision_path="model.visual", token_types=(("mm_token_type_ids", 0),)),
    "qwen2_vl": FamilySpec(family="qwen2_vl", model_types=("qwen2_vl",),
                           model_class="Qwen2VLForConditionalGeneration",
                           text_model_path="model.language_model", image_token_attr="image_token_id",
                           vision_path="model.visual", token_types=(("mm_token_type_ids", 0),)),
}
IMAGE_TOKEN = "<|image_pad|>"  # the placeholder the chat template writes once per image


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

    def __call__(self, images: Any = None, text: Any = None, **kwargs: Any) -> Any:
        from transformers import BatchFeature

        return_tensors = kwargs.pop("return_tensors", None)
        texts = [text] if isinstance(text, str) else list(text or [])
        image_inputs: dict[str, Any] = {}
        if images is not None and len(images) > 0:
            image_inputs = dict(self.image_processor(images=images, return_tensors="pt"))
            grid = image_inputs["image_grid_thw"]
            merge = int(self.image_processor.merge_size) ** 2
            counts = [int(g.prod()) // merge for g in grid]
            k = 0
            expanded = []
            for t in texts:
                parts = t.split(self.image_token)
                if k + len(parts) - 1 > len(counts):
                    raise ValueError(f"text has more {self.image_token} placeholders than images ({len(counts)})")
                out = parts[0]
                for p in parts[1:]:
                    out += self.image_token * counts[k] + p
                    k += 1
                expanded.append(out)
            if k != len(counts):
                raise ValueError(f"{len(counts)} images but {k} {self.image_token} placeholders in the text")
            texts = expanded
        enc = self.tokenizer(texts, return_tensors=return_tensors, **kwargs)
        data = dict(enc)
        ids = data["input_ids"]
        if hasattr(ids, "long"):
            data["mm_token_type_ids"] = (ids == self.image_token_id).long()
        else:
            data["mm_token_type_ids"] = [[int(i == self.image_token_id) for i in row] for row in ids]
        data.update(image_inputs)
        return BatchFeature(data=data, tensor_type=return_tensors)

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("chat_template", self.chat_template)
        return self.tokenizer.apply_chat_template(conversation, **kwargs)

    def batch_decode(self, *args: Any, **kwargs: Any) -> Any:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> Any:
        return self.tokenizer.decode(*args, **kwargs)


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

    def prepare(self, images: list[list[Any]], prompts: list[str]) -> Any:
        if len(images) != len(prompts):
            raise ValueError(f"prepare: {len(images)} image lists but {len(prompts)} prompts; pass one list per prompt")
        texts = []
        for imgs, prompt in zip(images, prompts, strict=False):
            content = chat_content(prompt, len(imgs))
            texts.append(self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                            tokenize=False, add_generation_prompt=True))
        flat = [im for imgs in images for im in imgs]
        self.processor.tokenizer.padding_side = "left"
        batch = self.processor(images=flat or None, text=texts, padding=True, return_tensors="pt")
        if "mm_token_type_ids" not in batch:  # stock processors of some versions: Qwen needs it (PLATFORM.md)
            batch["mm_token_type_ids"] = (batch["input_ids"] == self.image_token_id).long()
        batch.pop("token_type_ids", None)
        return batch.to(self.model.device)

    def visual_coords(self, batch: Any) -> Any:
        import torch

        grid = batch.get("image_grid_thw")
        if grid is None and batch.get("_vision_call") is not None:
            args, kwargs = batch["_vision_call"]
            grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        if grid is None:
            raise ValueError("visual_coords: the batch has no image_grid_thw (and no recorded vision call); "
                             "pass the processor's output")
        input_ids = batch["input_ids"]
        m = self.merge_size
        per_image = []
        for t, h, w in grid.tolist():
            hh, ww = h // m, w // m
            r = (torch.arange(hh, dtype=torch.float32) + 0.5) / hh
            c = (torch.arange(ww, dtype=torch.float32) + 0.5) / ww
            rc = torch.stack(torch.meshgrid(r, c, indexing="ij"), dim=-1).reshape(-1, 2)
            per_image.append(rc.repeat(int(t), 1))
        return _assign_images(per_image, self.visual_mask(input_ids))

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
            h = args[0] if args else kwargs["hidden_states"]
            cu = kwargs["cu_seqlens"]
            cos, sin = kwargs["position_embeddings"]
            n = h.shape[0]
            with torch.no_grad():
                q, k, _ = module.qkv(h).reshape(n, 3, module.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
                q, k = q.float(), k.float()
                c, s_ = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
                half = q.shape[-1] // 2
                rot = lambda x: torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # noqa: E731
                q, k = q * c + rot(q) * s_, k * c + rot(k) * s_  # RoFormer rotate-half, as the tower does
                window = self._window_index(visual, grid_box.get("grid"), n // unit, h.device)
                bounds = cu.tolist()
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

        handles = [visual.register_forward_pre_hook(tower_pre, with_kwargs=True),
                   attn.register_forward_pre_hook(attn_pre, with_kwargs=True)]

        class _Handle:
            def remove(self_inner) -> None:
                for hd in handles:
                    hd.remove()

        return _Handle()

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


def _assign_images(per_image: list[Any], vis_mask: Any) -> Any:
    """Stack per-image (n_i, 2) row/col tables into (B, V, 3), consuming images in sequence order."""
    import torch

    counts = vis_mask.sum(1).tolist()
    if len(set(counts)) > 1:
        raise ValueError(f"visual_coords: samples have different numbers of visual tokens {counts}; "
                         f"batch samples with the same image sizes")
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
    return torch.stack(rows).to(vis_mask.device)


class Qwen25VLAdapter(_QwenAdapter):
    spec = QWEN_SPECS["qwen2_5_vl"]


class Qwen2VLAdapter(_QwenAdapter):
    spec = QWEN_SPECS["qwen2_vl"]
