"""The search objective: how far a schedule moves the model's last-token state.

    obj = Objective(adapter, samples, heldout_fraction=0.25, seed=0, cache_dir=".schedsearch/cache")
    obj.score(schedule)                 # mean over the search split of 1 - cos(h, h_pruned)
    obj.score(schedule, split="heldout")
    obj.budget_fn("flops")              # ratios -> achieved budget on the search split

``h`` is the last token's hidden state after the decoder's final norm (VFlowOpt, arXiv 2508.05211,
Sec. 3.4, maximises the summed cosine similarity; we minimise the mean of its complement). Option
``metric="kl"``: KL(p || p_pruned) of the next-token distribution.

Cost control, so one trial costs about one pruned forward over the search split:
* the unpruned reference is computed ONCE per (model, calibration set, split) and cached on disk
  under a content hash (VFlowOpt's released loop recomputes it at every call);
* vision-encoder outputs are computed once per batch and passed as ``mm_encoder_outputs`` (the
  public path ``generate()`` uses), since no schedule changes them;
* batches are built once; everything runs under ``torch.no_grad()`` and in eval mode.

Device and dtype follow the model: batches, cached vision features and the reference live on the model's
device; states are compared in float32 whatever the model's dtype. The on-disk reference is stored on the CPU
and its cache key includes the dtype and the device kind, so a bfloat16 or GPU run never reuses a float32 CPU
reference (or the other way round).
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from schedsearch.errors import SchedsearchError
from schedsearch.evaluation import make_batches, token_counts
from schedsearch.flops import DecoderShape, budget_report
from schedsearch.runtime import apply_schedule
from schedsearch.schedule import kept_counts

SPLITS = ("search", "heldout")


class UnsupportedForModel(SchedsearchError, ValueError):
    """A search setting this model's adapter cannot serve (one line, exit 2)."""


def split_samples(samples: Sequence[Any], heldout_fraction: float, seed: int) -> tuple[list, list]:
    """Deterministic shuffle-split; the held-out part is never seen by the search."""
    idx = list(range(len(samples)))
    random.Random(seed).shuffle(idx)
    n_held = int(round(len(samples) * heldout_fraction))
    if heldout_fraction > 0 and len(samples) >= 2:
        n_held = min(max(1, n_held), len(samples) - 1)
    held = sorted(idx[:n_held])
    search = sorted(idx[n_held:])
    return [samples[i] for i in search], [samples[i] for i in held]


class Objective:
    def __init__(self, adapter: Any, samples: Sequence[Any], *, heldout_fraction: float = 0.25, seed: int = 0,
                 batch_size: int = 16, metric: str = "cosine", cache_dir: str | Path | None = None,
                 calibration_hash: str | None = None, vision_maps: bool = False):
        if metric not in ("cosine", "kl"):
            raise ValueError(f"metric={metric!r}: use 'cosine' or 'kl'")
        self.adapter = adapter
        self.metric = metric
        self.adapter.model.eval()
        parts = split_samples(samples, heldout_fraction, seed)
        self.samples = dict(zip(SPLITS, parts, strict=False))
        self.shape = DecoderShape.from_config(adapter.text_config)
        self.batches: dict[str, list[dict]] = {}
        # VFlowOpt-style maps: per split, per batch, per image (V_i, V_i) attention and (V_i,) patch entropy
        self.maps: dict[str, list[list[torch.Tensor]]] = {}
        self.entropy: dict[str, list[list[torch.Tensor]]] = {}
        self.vis_counts: dict[str, list[list[int]]] = {}
        self.counts: dict[str, list[tuple[int, int]]] = {}
        self._cache_dir = Path(cache_dir) if cache_dir else None
        self._calibration_hash = calibration_hash
        self._seed = seed
        self._heldout_fraction = heldout_fraction
        with torch.no_grad():
            for name, part in self.samples.items():
                raw = make_batches(adapter, part, batch_size) if part else []
                self.counts[name] = token_counts(adapter, raw)
                if vision_maps:
                    self._vision_maps(name, raw)
                self.batches[name] = [adapter.precompute_vision(b) for b in raw]
        self.reference = {name: self._reference(name) for name in SPLITS}

    def _vision_maps(self, split: str, raw: list) -> None:
        if not (hasattr(self.adapter, "vision_attention") and hasattr(self.adapter, "merged_token_grey")):
            raise UnsupportedForModel(
                f"method vflow needs vision-attention maps, which the {self.adapter.family} adapter does not provide "
                "(they exist for the Qwen-style towers: Qwen2-VL, Qwen2.5-VL, Qwen3-VL, GLM-4V): use psigmoid, "
                "pcosine or gsearch")
        from schedsearch.runtime.importance import patch_entropy

        self.maps[split], self.entropy[split], self.vis_counts[split] = [], [], []
        for b in raw:
            self.maps[split].append(self.adapter.vision_attention(b))
            greys = self.adapter.merged_token_grey(b["pixel_values"], b["image_grid_thw"])
            self.entropy[split].append([patch_entropy(g) for g in greys])
            self.vis_counts[split].append(self.adapter.visual_mask(b["input_ids"]).sum(1).tolist())

    def importance(self, schedule: Any, split: str) -> list[torch.Tensor] | None:
        """Per-batch (B, V) maps for a schedule whose scorer is vflow or external/vision_attention, else None."""
        scorer = schedule.get("scorer") if isinstance(schedule, dict) else getattr(schedule, "scorer", None)
        name = scorer.get("name") if isinstance(scorer, dict) else getattr(scorer, "name", None)
        params = (scorer.get("params") if isinstance(scorer, dict) else getattr(scorer, "params", None)) or {}
        if not (name == "vflow" or (name == "external" and params.get("source") == "vision_attention")):
            return None
        if split not in self.maps:
            raise UnsupportedForModel(f"ranking {name} needs the vision encoder's attention maps, which this objective "
                                      "did not record (the model has none, or vision_maps=False)")
        from schedsearch.runtime.importance import importance_for_batch

        t, alpha = float(params.get("t", 1.0)), float(params.get("alpha", 0.0))
        return [importance_for_batch(m, c, t, alpha, e) for m, c, e in
                zip(self.maps[split], self.vis_counts[split], self.entropy[split], strict=True)]

    # ------------------------------------------------------------------ cache
    def _key(self, split: str) -> str:
        """Cache key of a split's reference: model config, weights digest, dtype, device kind, data and split."""
        h = hashlib.sha256()
        first = next(self.adapter.model.parameters())
        # a bfloat16 or GPU reference differs from a float32 CPU one in the last digits: never mix them
        for part in (self.adapter.fingerprint(), str(self.adapter.name_or_path), self.metric, split,
                     str(self._seed), str(self._heldout_fraction), self._calibration_hash or "",
                     repr(self.counts[split]), str(first.dtype), first.device.type):
            h.update(part.encode())
            h.update(b"\0")
        # the weights themselves: a cheap digest of a few tensors, so retrained weights miss the cache
        # (first 64 values, copied to the CPU as float32: works for any device and dtype)
        for i, p in enumerate(self.adapter.model.parameters()):
            if i % 7 == 0:
                h.update(p.detach().flatten()[:64].float().cpu().numpy().tobytes())
        return h.hexdigest()[:24]

    @property
    def device(self) -> torch.device:
        """Where the model (and so every batch, cached feature and reference) lives."""
        return next(self.adapter.model.parameters()).device

    def _reference(self, split: str) -> torch.Tensor:
        if not self.batches[split]:
            return torch.empty(0)
        path = None
        if self._cache_dir is not None and self._calibration_hash:
            path = self._cache_dir / f"ref-{self._key(split)}.pt"
            if path.exists():
                try:  # stored on the CPU (a cache written on a GPU machine loads anywhere), used on the device
                    return torch.load(path, weights_only=True, map_location="cpu").to(self.device)
                except Exception:  # noqa: BLE001 - a corrupt cache entry is recomputed
                    pass
        ref = self._outputs(split, None)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")  # workers sharing a cache never share a temp file
            torch.save(ref.cpu(), tmp)
            tmp.replace(path)
        return ref

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def _outputs(self, split: str, schedule: Any, importance: Any = None) -> torch.Tensor:
        outs = []
        if schedule is not None and importance is None:
            importance = self.importance(schedule, split)
        for i, b in enumerate(self.batches[split]):
            if schedule is None:
                outs.append(self._one(b))
            else:
                imp = importance[i] if isinstance(importance, list) else importance
                with apply_schedule(self.adapter.model, schedule, adapter=self.adapter, importance=imp):
                    outs.append(self._one(b))
        return torch.cat(outs)

    def _one(self, batch: dict) -> torch.Tensor:
        if self.metric == "cosine":
            return self.adapter.last_hidden_state(batch).float()
        logits = self.adapter.model(**batch, use_cache=False, logits_to_keep=1).logits[:, -1]
        return torch.log_softmax(logits.float(), dim=-1)

    def per_sample(self, schedule: Any, split: str = "search", importance: Any = None) -> torch.Tensor:
        got = self._outputs(split, schedule, importance)
        ref = self.reference[split]
        if self.metric == "cosine":
            return 1.0 - torch.nn.functional.cosine_similarity(ref, got, dim=-1)
        return (ref.exp() * (ref - got)).sum(-1)  # KL(p_ref || p_pruned)

    def score(self, schedule: Any, split: str = "search", importance: Any = None) -> float:
        if not self.batches[split]:
            raise ValueError(f"the {split} split is empty: use more calibration samples")
        return float(self.per_sample(schedule, split, importance).mean())

    # ------------------------------------------------------------------ budget
    def budget_fn(self, kind: str = "flops", split: str = "search"):
        """ratios -> achieved budget on ``split``; equal to ``budget_report(...).value(kind)`` (tested), but
        samples with identical (text, visual) counts are evaluated once, since the bisections call this
        hundreds of times per trial."""
        from collections import Counter

        from schedsearch.flops import kv_cache_bytes, prefill_flops

        if kind not in ("flops", "kv", "tokens"):
            return lambda ratios: budget_report(self.shape, self.counts[split], list(ratios)).value(kind)
        groups = sorted(Counter(self.counts[split]).items())
        full = [1.0] * self.shape.num_layers

        def total(ratios: Sequence[float]) -> float:
            if kind == "flops":
                return sum(m * sum(prefill_flops(self.shape, t, v, ratios)) for (t, v), m in groups)
            if kind == "kv":
                return sum(m * kv_cache_bytes(self.shape, t, v, ratios) for (t, v), m in groups)
            return sum(m * sum(kept_counts(ratios, v)) / len(ratios) for (t, v), m in groups)

        denom = total(full) if kind != "tokens" else sum(m * v for (t, v), m in groups)

        def fn(ratios: Sequence[float]) -> float:
            return total(list(ratios)) / denom if denom else 1.0

        return fn
