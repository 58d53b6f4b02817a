"""apply_schedule: drop visual tokens between decoder layers of a stock transformers VLM.

Lifecycle::

    with apply_schedule(model, schedule, adapter=adapter) as handle:   # hooks installed on THIS instance
        model.generate(**batch)                                        # prefill drops, decode follows
        handle.kept_indices[l]                                         # (B, n_l) original positions alive at layer l
    # on exit every hook is removed; the model is exactly as before

Mechanism (no class is patched; everything is a removable forward pre-hook):

1. A pre-hook on the multimodal base model (the parent of the decoder stack) reads ``input_ids``
   at prefill and asks the adapter which positions are visual tokens.
2. A pre-hook on the decoder stack notes whether this forward is a prefill (empty cache) or a
   decode step, and the 2-D padding mask.
3. A pre-hook on every decoder layer. At prefill, where the schedule's kept count falls at layer
   ``l``, it scores the alive visual tokens (runtime/scorers/), keeps the best ``n_l``, optionally merges
   the pruned ones into kept ones (recycle.py), and compacts ``hidden_states``. For every layer
   after the first drop it gathers the rotary ``(cos, sin)``, the attention mask and position ids
   that the stack computed once for the full sequence, by the survivors' ORIGINAL indices, so
   every survivor keeps its original position (Qwen's 3-D mRoPE included: it is folded into
   cos/sin). Each layer's KV cache therefore holds only its survivors. At decode steps the layer
   gets a mask rebuilt for its own cache: its prefill survivors plus all decoded tokens, with
   padding from the 2-D mask.

Video (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): video tokens are visual tokens like image tokens (the adapter's
``modality_mask``: 1 = image, 2 = video). A schedule with ``modality_keep_ratios`` (schema 1.4) keeps each
modality's own count (the rounding rule per modality, per sample) at every drop, choosing the best-scored tokens of
each modality; without it one count covers all visual tokens. A batch with ``pixel_values_videos`` on a family that
takes no video is refused (its video tokens would not be counted).

Ragged batches: samples may have different numbers of visual tokens (image sizes, numbers of images).
Each sample gets its own kept counts (``kept_counts`` on its own visual count). After a drop every sample's
survivors are right-aligned and a sample with fewer survivors than the longest is filled at the FRONT with
some of its own dropped tokens ("filler" slots, ``_Forward.slot_ok`` False): they stay in the hidden states
so the batch stays rectangular, but no real token attends to them (their key columns are masked in every
layer's mask at prefill and decode, like left padding), scorers never see them (``key_valid``/``text_mask``
exclude them) and recycling never merges them. A drop scores the samples in groups with the same (visual
count, alive visual count, kept count), each group a rectangular sub-batch (``ScoreContext.rows``), so every
scorer sees exactly what it sees for a sample run alone, up to left padding.

Limits (raise a clear error rather than compute something wrong): a prefill must start from an empty cache;
flex-attention block masks are not supported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from schedsearch.errors import SchedsearchError, ScheduleError
from schedsearch.runtime import masks
from schedsearch.runtime.deepstack import DeepStack, deepstack_post_hook
from schedsearch.runtime.recycle import cell_ids, merge_into_kept
from schedsearch.runtime.scorers import External, ScoreContext, build_scorer
from schedsearch.runtime.scorers.base import PrefillView
from schedsearch.schedule import RECYCLING_WEIGHTINGS, kept_counts, modality_kept_counts


class RuntimeScheduleError(SchedsearchError):
    """A batch or model state the runtime cannot prune correctly."""


def _field(obj: Any, name: str, default: Any = None) -> Any:
    if obj is None:
        return default
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _cache_of(kwargs: dict) -> Any:
    """The KV cache handed to a forward: ``cache`` since transformers 5.24, ``past_key_values`` before."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


def _cache_len(past: Any) -> int:
    if past is None:
        return 0
    try:
        return int(past.get_seq_length())
    except Exception:  # noqa: BLE001 - exotic caches: treat as non-empty to avoid pruning wrongly
        return 1


@dataclass
class _Forward:
    """State of one prefill and the decode steps that follow it."""

    visual: torch.Tensor  # (B, N) bool, original sequence
    counts: list[list[int]]  # per sample: kept visual tokens entering each layer
    n_visual: list[int]  # per sample: visual tokens before any drop
    n_prefill: int
    total_len: int
    valid: torch.Tensor | None  # (B, L) bool padding mask (None: no padding)
    coords: torch.Tensor | None = None  # (B, V_max, 3), computed at the first drop when recycling
    time: torch.Tensor | None = None  # (B, V_max, 2) (clip, frame), computed at the first drop for temporal scorers
    modality: torch.Tensor | None = None  # (B, N) long 1 = image, 2 = video (original sequence)
    mod_counts: list[dict[int, list[int]]] | None = None  # per sample, per modality kept counts (modality_keep_ratios)
    vision: dict | None = None  # vision-encoder maps per original visual token (scorers with vision_layers)
    cur_idx: torch.Tensor | None = None  # (B, n) original positions alive (fillers included); None = all
    slot_ok: torch.Tensor | None = None  # (B, n) bool: False at filler slots of a ragged batch; None = none
    alive: list[int] = field(default_factory=list)  # per sample: alive visual tokens
    version: int = 0
    decode: bool = False
    layer_keep: dict[int, torch.Tensor] = field(default_factory=dict)
    layer_ok: dict[int, torch.Tensor | None] = field(default_factory=dict)
    gathered: dict[tuple[int, int], Any] = field(default_factory=dict)

    def slot_valid(self, cur: torch.Tensor) -> torch.Tensor:
        """(B, n) bool: the alive slots ``cur`` that are real tokens (not padding, not fillers)."""
        ok = self.valid.gather(1, cur) if self.valid is not None else torch.ones_like(cur, dtype=torch.bool)
        return ok if self.slot_ok is None else ok & self.slot_ok


class ScheduleHandle:
    """Installed hooks for one (model, schedule). Use as a context manager or call :meth:`remove`."""

    def __init__(self, adapter: Any, schedule: Any, importance: Any = None):
        self.adapter = adapter
        self.schedule = schedule
        self.ratios = [float(r) for r in _field(schedule, "keep_ratios")]
        self.modality_ratios = {str(k): [float(r) for r in v]
                                for k, v in dict(_field(schedule, "modality_keep_ratios", None) or {}).items()}
        scorer = _field(schedule, "scorer")
        params = dict(_field(scorer, "params", {}) or {})
        self.scorer = build_scorer(_field(scorer, "name", "last_token_attention"), params, importance)
        self._maps: list | None = None  # vision-attention maps recorded during the vision tower's run
        if isinstance(self.scorer, External) and importance is None and self.scorer.source == "vision_attention":
            if not hasattr(adapter, "vision_attention_hook"):
                raise ScheduleError(f"scorer external/vision_attention is not available for the {adapter.family} "
                                    "family: pass apply_schedule(..., importance=...)")
            self._maps = []
            self.scorer.importance = self._vision_importance
            self._map_params = (float(self.scorer.t), float(self.scorer.alpha))
        self._vision_request: dict | None = None  # layer -> kinds the scorer reads from the vision encoder
        self._vision_store: list = []  # the adapter's record of the last vision-encoder run
        self._vision_fresh = False  # whether the encoder ran since the last prefill
        if hasattr(self.scorer, "vision_layers"):
            if not hasattr(adapter, "vision_maps_hook"):
                raise ScheduleError(f"scorer {self.scorer.name} reads the vision encoder's attention, which the "
                                    f"{adapter.family} adapter does not provide: choose another scorer")
            try:
                layers = adapter.vision_encoder_layers()
            except ValueError as err:
                raise ScheduleError(f"scorer {self.scorer.name} reads the vision encoder's attention: {err}; "
                                    "choose another scorer") from None
            self._vision_request = self.scorer.vision_layers(*layers)
        recycling = _field(schedule, "recycling")
        self.grid = int(_field(recycling, "grid", 0) or 0) if recycling else 0
        weighting = _field(recycling, "weighting", "importance")
        if weighting not in RECYCLING_WEIGHTINGS:  # a dict schedule skips Schedule's validation
            raise ScheduleError(f"recycling.weighting must be one of {', '.join(RECYCLING_WEIGHTINGS)}, "
                                f"got {weighting!r}")
        cfg = adapter.text_config
        self.num_heads = int(cfg.num_attention_heads)
        self.num_kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.num_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads)
        self._pending: torch.Tensor | None = None  # (B, N) long modality of each position (0 = text)
        self._base_mask: Any = None  # the 2-D padding mask the base model was last called with
        ds_kwargs = tuple(getattr(adapter.spec, "deepstack_kwargs", ()) or ())
        self._deepstack = DeepStack(ds_kwargs) if ds_kwargs else None
        self._batch: dict[str, Any] = {}  # base-model kwargs of the last prefill + the vision tower's call
        self._fwd: _Forward | None = None
        self.kept_indices: dict[int, torch.Tensor] = {}
        self._handles: list[Any] = []
        self._install()

    # ------------------------------------------------------------------ hooks
    def _install(self) -> None:
        text = self.adapter.text_model
        base_path = self.adapter.spec.text_model_path.rsplit(".", 1)[0]
        base = self.adapter.model
        for part in base_path.split(".") if base_path != self.adapter.spec.text_model_path else []:
            base = getattr(base, part)
        self._handles.append(base.register_forward_pre_hook(self._base_pre, with_kwargs=True))
        vision = self.adapter.vision_tower
        if vision is not None:  # generate() runs the encoder before the first forward: record its inputs
            self._handles.append(vision.register_forward_pre_hook(self._vision_pre, with_kwargs=True))
        if self._maps is not None:
            self._handles.append(self.adapter.vision_attention_hook(self._maps))
        if self._vision_request:
            self._handles.append(self.adapter.vision_maps_hook(self._vision_request, self._vision_store))
        self._handles.append(text.register_forward_pre_hook(self._text_pre, with_kwargs=True))
        for i, layer in enumerate(self.adapter.decoder_layers):
            self._handles.append(
                layer.register_forward_pre_hook(lambda m, a, k, _i=i: self._layer_pre(_i, m, a, k), with_kwargs=True)
            )
            if self._deepstack is not None:
                self._handles.append(layer.register_forward_hook(deepstack_post_hook(self._deepstack,
                                                                                    self._deepstack_state, i)))
        if hasattr(self.scorer, "attach"):  # observers of the scorer, after ours: they see the survivors' inputs
            self._handles.extend(self.scorer.attach(text, self._prefill_view))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._fwd = None
        self._pending = None
        self._base_mask = None
        if self._deepstack is not None:
            self._deepstack.clear()
        self._batch = {}
        self._vision_store.clear()

    def __enter__(self) -> ScheduleHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def _base_pre(self, module: Any, args: tuple, kwargs: dict) -> None:
        self._base_mask = kwargs.get("attention_mask")  # Gemma 3's text model gets a dict of 4-D masks instead
        if _cache_len(_cache_of(kwargs)) > 0:
            return None
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            self._pending = None
            return None
        if kwargs.get("pixel_values_videos") is not None and not getattr(self.adapter, "supports_video", False):
            raise RuntimeScheduleError(f"the batch has pixel_values_videos but the {self.adapter.family} adapter does "
                                       "not locate video tokens: pruning would ignore them; use images, or a family "
                                       "that takes video (qwen2_vl, qwen2_5_vl, qwen3_vl)")
        modality = getattr(self.adapter, "modality_mask", None)  # adapters without it: every visual token is an image
        self._pending = modality(input_ids) if modality else self.adapter.visual_mask(input_ids).long()
        vision_call, vision_calls = self._batch.get("_vision_call"), self._batch.get("_vision_calls")
        self._batch = {k: v for k, v in kwargs.items() if v is not None}
        self._batch["input_ids"] = input_ids  # LLaVA-NeXT passes it positionally
        if vision_call is not None:
            self._batch["_vision_call"] = vision_call
            self._batch["_vision_calls"] = vision_calls
        return None

    def _vision_pre(self, module: Any, args: tuple, kwargs: dict) -> None:
        # every encoder run for the coming prefill (generate() encodes images, then videos, before it)
        calls = list(self._batch.get("_vision_calls") or []) if self._vision_fresh else []
        self._batch["_vision_calls"] = [*calls, (args, kwargs)]
        self._batch["_vision_call"] = (args, kwargs)
        self._vision_fresh = True  # the encoder ran for the coming prefill: its maps are this batch's
        if self._maps is not None:
            self._maps.clear()  # a new image batch: maps of an earlier one must not leak into it
        return None

    def _vision_importance(self, batch_info: dict) -> torch.Tensor:
        """(B, V) VFlowOpt importance from the maps recorded during this batch's vision-tower run."""
        from schedsearch.runtime.importance import importance_for_batch, patch_entropy

        if not self._maps:
            raise RuntimeScheduleError(
                "scorer external/vision_attention found no vision-attention map for this batch (the vision encoder "
                "did not run, e.g. precomputed mm_encoder_outputs): pass apply_schedule(..., importance=...)"
            )
        t, alpha = self._map_params
        entropies = None
        call = batch_info.get("_vision_call")
        if alpha and call is not None and hasattr(self.adapter, "merged_token_grey"):
            args, kwargs = call
            pixels = args[0] if args else kwargs.get("hidden_states")
            grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
            entropies = [patch_entropy(g) for g in self.adapter.merged_token_grey(pixels, grid)]
        counts = self.adapter.visual_mask(batch_info["input_ids"]).sum(1).tolist()
        try:
            return importance_for_batch(list(self._maps), counts, t, alpha, entropies)
        except ValueError as err:  # e.g. a video batch: the encoder ran once per modality, maps cover one run
            raise RuntimeScheduleError(f"scorer {self.scorer.name} cannot place the vision encoder's attention "
                                       f"maps on this batch's visual tokens ({err}); on video use another scorer"
                                       ) from None

    def _batch_info(self) -> dict[str, Any]:
        """Base-model kwargs of this prefill plus ``_vision_call`` = (args, kwargs) of the vision tower."""
        return self._batch

    def _deepstack_state(self) -> tuple[bool, torch.Tensor | None]:
        """(a pruning prefill is running and its DeepStack features were taken over, alive original positions)."""
        st = self._fwd
        if st is None or st.decode or self._deepstack is None or self._deepstack.embeds is None:
            return False, None
        return True, st.cur_idx

    def _vision_maps(self) -> dict:
        """The scorer's vision-encoder maps for this prefill, per original visual token (one line if missing)."""
        name = self.scorer.name
        if not self._vision_store and hasattr(self.adapter, "replay_vision"):  # precomputed image features
            self.adapter.replay_vision(self._batch_info(), self._vision_request, self._vision_store)
            self._vision_fresh = False  # the replay ran the encoder for THIS prefill, not the next one
        if not self._vision_store:
            raise RuntimeScheduleError(
                f"scorer {name} needs the vision encoder's attention, but the vision encoder did not run for this "
                "batch (e.g. precomputed image features / mm_encoder_outputs): pass pixel values, or use a scorer "
                "that does not read the vision encoder"
            )
        try:
            return self.adapter.vision_token_maps(self._vision_store, self._batch_info())
        except ValueError as err:
            raise RuntimeScheduleError(f"scorer {name} cannot place the vision encoder's maps: {err}") from None

    def _prefill_view(self) -> PrefillView | None:
        """What observer hooks of the scorer may know about the layer now running (None outside a pruning prefill)."""
        st = self._fwd
        if st is None or st.decode:
            return None
        n = st.n_prefill
        bsz = st.visual.shape[0]
        cur = st.cur_idx if st.cur_idx is not None else torch.arange(n, device=st.visual.device).expand(bsz, n)
        visual = st.visual.gather(1, cur)
        return PrefillView(alive=cur, valid=st.slot_valid(cur),
                           visual=visual if st.slot_ok is None else visual & st.slot_ok)

    def _text_pre(self, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        embeds = kwargs.get("inputs_embeds")
        ids = kwargs.get("input_ids", args[0] if args else None)
        seq = embeds.shape[1] if embeds is not None else ids.shape[1]
        valid = masks.padding_mask(kwargs.get("attention_mask"), self._base_mask, seq)
        if _cache_len(_cache_of(kwargs)) == 0:  # prefill
            if not self._vision_fresh:  # the encoder did not run for this batch: older maps must not be used
                self._vision_store.clear()
            self._vision_fresh = False
            pending, self._pending = self._pending, None
            self._fwd = None
            self.kept_indices = {}
            if self._deepstack is not None:
                self._deepstack.clear()
            if pending is None or pending.shape[1] != seq:
                return None
            visual = pending > 0
            n_vis = [int(v) for v in visual.sum(dim=1).tolist()]
            # each sample by its own count (ragged batches), per modality when the schedule says so
            per_sample = [self._counts(pending[b], v) for b, v in enumerate(n_vis)]
            counts = [c for c, _ in per_sample]
            if all(c == v for v, cs in zip(n_vis, counts, strict=True) for c in cs):
                return None
            mod_counts = None if not self.modality_ratios else [m for _, m in per_sample]
            self._fwd = _Forward(visual=visual, counts=counts, n_visual=n_vis, n_prefill=seq, total_len=seq,
                                 valid=valid, alive=list(n_vis), modality=pending, mod_counts=mod_counts)
            if hasattr(self.scorer, "begin"):  # per-prefill state (External's map, observers' accumulators)
                self.scorer.begin(self._batch_info())
            if self._deepstack is not None and self._deepstack.take(kwargs):  # added at the survivors instead
                return args, kwargs
        elif self._fwd is not None:
            self._fwd.decode = True
            self._fwd.total_len += seq
            self._fwd.valid = valid
        return None

    def _counts(self, modality: torch.Tensor, n_vis: int) -> tuple[list[int], dict[int, list[int]] | None]:
        """One sample's kept visual tokens entering each layer, and per modality (1 image, 2 video) when the
        schedule has ``modality_keep_ratios`` (the contract's rounding rule applied to each modality's own count)."""
        if not self.modality_ratios:
            return kept_counts(self.ratios, n_vis), None
        per = {name: int((modality == code).sum()) for code, name in ((1, "image"), (2, "video"))}
        by_name = modality_kept_counts(self.ratios, self.modality_ratios, per)
        mod_counts = {1: by_name["image"], 2: by_name["video"]}
        return [a + b for a, b in zip(mod_counts[1], mod_counts[2], strict=True)], mod_counts

    def _layer_pre(self, l: int, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        st = self._fwd
        if st is None:
            return None
        hs = args[0] if args else kwargs["hidden_states"]
        if st.decode:
            window = masks.window_of(_cache_of(kwargs), l)
            if l not in st.layer_keep or (kwargs.get("attention_mask") is None and window is None):
                return None
            kwargs["attention_mask"] = self._decode_mask(st, l, kwargs.get("attention_mask"), hs, window, module)
            return args, kwargs
        if any(c[l] < a for c, a in zip(st.counts, st.alive, strict=True)):
            hs = self._drop(st, l, module, hs, kwargs)
        if st.cur_idx is None:
            return None
        st.layer_keep[l] = st.cur_idx
        st.layer_ok[l] = st.slot_ok
        self.kept_indices[l] = st.cur_idx if st.slot_ok is None else st.cur_idx.masked_fill(~st.slot_ok, -1)
        kwargs.update(self._gathered(st, kwargs, module, hs.dtype))
        if args:
            args = (hs, *args[1:])
        else:
            kwargs["hidden_states"] = hs
        return args, kwargs

    # ------------------------------------------------------------ prefill
    def _gathered(self, st: _Forward, kwargs: dict, layer: Any = None, dtype: torch.dtype = torch.float32) -> dict:
        """cos/sin, mask and position ids of the full sequence, gathered to the survivors (memoised); filler slots
        of a ragged batch are masked as keys."""
        mask = kwargs.get("attention_mask")
        key = (st.version, id(mask))
        if key in st.gathered:
            return st.gathered[key]
        idx = st.cur_idx
        bsz = idx.shape[0]
        out: dict[str, Any] = {}
        pe = kwargs.get("position_embeddings")
        if pe is not None:
            out["position_embeddings"] = tuple(_gather_seq(t.expand(bsz, *t.shape[1:]), idx, dim=1) for t in pe)
        pos = kwargs.get("position_ids")
        if isinstance(pos, torch.Tensor):
            out["position_ids"] = _gather_seq(pos.expand(*pos.shape[:-2], bsz, pos.shape[-1]), idx, dim=-1)
        if mask is not None:
            if not isinstance(mask, torch.Tensor):
                raise RuntimeScheduleError(
                    f"attention mask of type {type(mask).__name__} is not supported: load the model with "
                    "attn_implementation='sdpa' or 'eager'"
                )
            if mask.dim() == 4:
                m = mask.expand(bsz, *mask.shape[1:])
                m = _gather_seq(m, idx, dim=2)
                out["attention_mask"] = _gather_seq(m, idx, dim=3)
            else:
                out["attention_mask"] = _gather_seq(mask.expand(bsz, mask.shape[-1]), idx, dim=1)
            if st.slot_ok is not None:
                out["attention_mask"] = masks.mask_keys(out["attention_mask"], st.slot_ok)
        elif st.slot_ok is not None:  # plain causal (no mask was needed before the drop): fillers need one now
            allowed = (idx[:, None, None, :] <= idx[:, None, :, None]) & st.slot_ok[:, None, None, :]
            impl = getattr(getattr(getattr(layer, "self_attn", None), "config", None), "_attn_implementation", None)
            if impl is not None and "flash" in str(impl):  # fillers sit at the front, like left padding
                out["attention_mask"] = st.slot_ok.long()
            else:
                out["attention_mask"] = masks.as_mask_like(allowed, None, impl, dtype)
        st.gathered[key] = out
        return out

    def _drop(self, st: _Forward, l: int, layer: Any, hs: torch.Tensor, kwargs: dict) -> torch.Tensor:
        bsz, n, _ = hs.shape
        cur = st.cur_idx if st.cur_idx is not None else torch.arange(n, device=hs.device).expand(bsz, n)
        is_vis = st.visual.gather(1, cur)
        if st.slot_ok is not None:
            is_vis = is_vis & st.slot_ok
        vis_rank = st.visual.long().cumsum(1) - 1  # original visual order of each visual position
        valid = st.slot_valid(cur)
        cos = sin = None
        pe = kwargs.get("position_embeddings")
        if pe is not None:
            cos, sin = (_gather_seq(t.expand(bsz, *t.shape[1:]), cur, dim=1) for t in pe)
        if (self.grid or getattr(self.scorer, "needs_coords", False)) and st.coords is None:
            try:
                st.coords = self.adapter.visual_coords(self._batch_info())
            except ValueError as err:
                what = "recycling" if self.grid else f"scorer {self.scorer.name}"
                raise RuntimeScheduleError(f"{what} needs the visual tokens' image positions: {err}") from None
        if getattr(self.scorer, "needs_time", False) and st.time is None:
            if not getattr(self.scorer, "needs_coords", False):
                raise RuntimeScheduleError(f"scorer {self.scorer.name} sets needs_time without needs_coords")
            try:
                st.time = self.adapter.visual_time(self._batch_info())
            except ValueError as err:
                raise RuntimeScheduleError(f"scorer {self.scorer.name} needs the visual tokens' frames: "
                                           f"{err}") from None
        if self._vision_request and st.vision is None:
            st.vision = self._vision_maps()
        allowed = masks.layer_allowed(kwargs.get("attention_mask"), cur)
        keep_seq = ~is_vis if st.slot_ok is None else ~is_vis & st.slot_ok  # old fillers go; padding stays
        # samples that drop here, grouped so that each group is a rectangular sub-batch for the scorer
        # (with per-modality counts: also each modality's alive and kept counts)
        groups: dict[tuple, list[int]] = {}
        for b in range(bsz):
            if st.counts[b][l] < st.alive[b]:
                per_mod = () if st.mod_counts is None else tuple(
                    (code, c[l - 1] if l else int((st.modality[b] == code).sum()), c[l])
                    for code, c in sorted(st.mod_counts[b].items()))
                groups.setdefault((st.n_visual[b], st.alive[b], st.counts[b][l], per_mod), []).append(b)
            else:
                keep_seq[b] |= is_vis[b]
        for (n_vis, _, n_keep, per_mod), members in groups.items():
            whole = len(members) == bsz
            rows = None if whole else torch.tensor(members, device=hs.device)

            def sub(t: torch.Tensor | None, rows: torch.Tensor | None = rows) -> torch.Tensor | None:
                return t if t is None or rows is None else t.index_select(0, rows)

            g_vis, g_cur = sub(is_vis), sub(cur)
            vis_local = g_vis.nonzero()[:, 1].view(len(members), -1)
            vis_orig = vis_rank.index_select(0, rows).gather(1, g_cur.gather(1, vis_local)) if rows is not None \
                else vis_rank.gather(1, cur.gather(1, vis_local))
            coords = None
            if st.coords is not None:
                coords = sub(st.coords.to(hs.device)).gather(1, vis_orig[..., None].expand(-1, -1, 3))
            time = None
            if st.time is not None:
                time = sub(st.time.to(hs.device)).gather(1, vis_orig[..., None].expand(-1, -1, 2))
            modality = sub(st.modality).gather(1, g_cur.gather(1, vis_local))
            keep_mod = {code: k for code, _, k in per_mod} if per_mod else None
            vision = st.vision if st.vision is None or rows is None else \
                {k: v.index_select(0, rows.to(v.device)) if isinstance(v, torch.Tensor) else v
                 for k, v in st.vision.items()}
            g_hs, g_valid = sub(hs), sub(valid)
            ctx = ScoreContext(layer=layer, layer_idx=l, hidden_states=g_hs, cos=sub(cos), sin=sub(sin),
                               key_valid=g_valid, visual_local=vis_local, visual_orig=vis_orig,
                               text_mask=~g_vis & g_valid, n_keep=n_keep, head_dim=self.head_dim,
                               num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, coords=coords,
                               attention_mask=sub(allowed),
                               rotary=self.adapter.rotary(l) if hasattr(self.adapter, "rotary") else None,
                               vision=vision, alive_orig=g_cur, n_visual=n_vis, rows=rows, time=time,
                               modality=modality, n_keep_modality=keep_mod)
            with torch.no_grad():
                scores = self.scorer(ctx).float()
            keep_vis = _select(scores, n_keep, modality, keep_mod)
            new_h = g_hs
            merge = getattr(self.scorer, "merge", None)
            if merge is not None:  # the scorer folds pruned tokens into kept ones (kept count unchanged)
                with torch.no_grad():
                    merged = merge(ctx, keep_vis, scores)
                if merged is not None:
                    new_h = new_h.scatter(1, vis_local[..., None].expand(-1, -1, hs.shape[-1]),
                                          merged.to(hs.dtype))
            if self.grid:
                vis_h = _gather_seq(new_h, vis_local, dim=1)
                merged = merge_into_kept(vis_h, keep_vis, scores, cell_ids(coords, self.grid))
                new_h = new_h.scatter(1, vis_local[..., None].expand(-1, -1, hs.shape[-1]), merged)
            g_keep = sub(keep_seq).scatter(1, vis_local, keep_vis)
            if rows is None:
                hs, keep_seq = new_h, g_keep
            else:
                if new_h is not g_hs:
                    hs = hs.index_copy(0, rows, new_h)
                keep_seq = keep_seq.index_copy(0, rows, g_keep)
            for b in members:
                st.alive[b] = n_keep
        # survivors right-aligned; a sample with fewer is filled at the front with its own dropped slots
        lens = keep_seq.sum(dim=1)
        m = int(lens.max())
        local = torch.argsort(keep_seq.to(torch.int8), dim=1, stable=True)[:, n - m:]
        ok = keep_seq.gather(1, local)
        st.cur_idx = cur.gather(1, local)
        st.slot_ok = None if bool(ok.all()) else ok
        st.version += 1
        return _gather_seq(hs, local, dim=1)

    # ------------------------------------------------------------- decode
    def _decode_mask(self, st: _Forward, l: int, mask: Any, hs: torch.Tensor, window: int | None = None,
                     layer: Any = None) -> torch.Tensor:
        """The layer's decode mask over the keys its cache holds: its prefill survivors and the decoded tokens
        (a sliding-window cache only the last ``window - 1`` of them, and the window applies on original
        positions; see masks.py)."""
        keep, q_len = st.layer_keep[l], hs.shape[1]
        bsz, device = keep.shape[0], keep.device
        total = st.total_len
        keys = torch.cat([keep, torch.arange(st.n_prefill, total, device=device).expand(bsz, -1)], dim=1)
        ok = st.layer_ok.get(l)
        if ok is not None:  # filler slots of a ragged batch stay in this layer's cache: never attended
            ok = torch.cat([ok, torch.ones(bsz, total - st.n_prefill, dtype=torch.bool, device=device)], dim=1)
            ok = masks.cached_keys(ok, q_len, window)
        keys = masks.cached_keys(keys, q_len, window)
        valid = st.valid.gather(1, keys) if st.valid is not None and st.valid.shape[1] == total else \
            torch.ones_like(keys, dtype=torch.bool)
        if ok is not None:
            valid = valid & ok
        if mask is not None and not isinstance(mask, torch.Tensor):
            raise RuntimeScheduleError(f"attention mask of type {type(mask).__name__} is not supported at decode")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            if window is not None:
                raise RuntimeScheduleError("a sliding-window layer with a 2-D (flash-attention) mask cannot be "
                                           "pruned at decode: load the model with attn_implementation='sdpa'")
            return valid.to(mask.dtype)
        allowed = masks.decode_allowed(keys, valid, total, q_len, window)
        impl = getattr(getattr(getattr(layer, "self_attn", None), "config", None), "_attn_implementation", None)
        return masks.as_mask_like(allowed, mask, impl, hs.dtype)


def _gather_seq(t: torch.Tensor, idx: torch.Tensor, dim: int) -> torch.Tensor:
    """Gather ``t`` along ``dim`` by per-sample indices ``idx`` (B, k); batch is the dim before
    ``dim`` for hidden/cos/sin (dim=1), and dim 0 for 4-D masks (dim=2/3)."""
    dim = dim % t.dim()
    if dim in (2, 3) and t.dim() == 4:  # mask (B, 1, q, k)
        shape = list(t.shape)
        shape[dim] = idx.shape[1]
        view = [idx.shape[0], 1, 1, 1]
        view[dim] = idx.shape[1]
        return t.gather(dim, idx.view(view).expand(shape))
    if t.dim() == idx.dim() + 1 and dim == 1:  # (B, n, D)
        return t.gather(1, idx[..., None].expand(-1, -1, t.shape[-1]))
    # position ids (..., B, n) or 2-D masks (B, n)
    lead = t.shape[:-2]
    e = idx.expand(*lead, *idx.shape) if lead else idx
    return t.gather(t.dim() - 1, e)


def apply_schedule(
    model: Any,
    schedule: Any = None,
    *,
    adapter: Any = None,
    importance: Any = None,
    budget: float | None = None,
    budget_kind: str = "flops",
    library: Any = None,
) -> ScheduleHandle:
    """Install ``schedule`` on this model instance; returns a handle (context manager).

    ``model`` is a transformers VLM or a schedsearch adapter. ``schedule`` is a :class:`Schedule`,
    a path to a schedule JSON, or a dict with the same fields. Instead of a schedule, ``budget=0.2``
    resolves the best schedule stored in the schedule library (``library``: a path or
    :class:`~schedsearch.library.Library`; default ``$SCHEDSEARCH_HOME``) for this model's fingerprint
    at or under that budget. ``importance`` feeds the ``external`` scorer: a (B, V) tensor per
    original visual token or a callable of the batch.
    """
    from schedsearch.models.base import VLMAdapter

    if isinstance(model, VLMAdapter):
        adapter, model = model, model.model
    if adapter is None:
        from schedsearch.models import adapter_for_model

        adapter = adapter_for_model(model)
    if schedule is None and budget is not None:
        from schedsearch.library import Library

        lib = library if isinstance(library, Library) else Library(library)
        schedule = lib.resolve(adapter.fingerprint(), budget, budget_kind).schedule
    if schedule is None:
        raise ScheduleError("apply_schedule needs a schedule (a Schedule, a path to a schedule JSON, or a dict) "
                            "or budget=... to pick one from the schedule library")
    if isinstance(schedule, (str, bytes)) or hasattr(schedule, "__fspath__"):
        from schedsearch.schedule import load_schedule

        schedule = load_schedule(schedule)
    ratios = _field(schedule, "keep_ratios")
    if ratios is None:
        raise ScheduleError("schedule has no keep_ratios")
    if len(ratios) != adapter.num_layers:
        from schedsearch.errors import IncompatibleScheduleError

        raise IncompatibleScheduleError(
            f"schedule has {len(ratios)} keep_ratios but the model has {adapter.num_layers} decoder layers: "
            "use a schedule made for this model"
        )
    return ScheduleHandle(adapter, schedule, importance)


def _select(scores: torch.Tensor, n_keep: int, modality: torch.Tensor, per_modality: dict[int, int] | None,
            ) -> torch.Tensor:
    """(B, V) bool: the ``n_keep`` best-scored visual tokens (stable ties: the earlier token), or with
    ``per_modality`` = {code: count} the ``count`` best of each modality's tokens."""
    keep = torch.zeros_like(scores, dtype=torch.bool)
    if per_modality is None:
        return keep.scatter_(1, torch.argsort(scores, dim=1, descending=True, stable=True)[:, :n_keep], True)
    for code, count in per_modality.items():
        if count > 0:
            ranked = scores.masked_fill(modality != code, float("-inf"))
            keep.scatter_(1, torch.argsort(ranked, dim=1, descending=True, stable=True)[:, :count], True)
    return keep
