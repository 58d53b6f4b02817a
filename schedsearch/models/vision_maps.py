"""Per-token maps of one vision-encoder attention layer, computed from the layer's own q/k/v (no attention weights
needed, so every attention backend works). Family-neutral math; the adapters decide which module to hook and how
the encoder's tokens map to the LLM's visual tokens (see ``VLMAdapter.vision_maps_hook`` in base.py).

Kinds (all head-averaged, float32):

* ``cls``: the attention the [CLS] query pays to each token (FasterVLM, arXiv 2412.01818; VisionZip, arXiv
  2412.04467; VTC-CLS, arXiv 2412.05819; HiRED, arXiv 2408.10945). Encoders without a [CLS] token (Qwen) give the
  attention each token *receives* instead (``received``), as VisPruner and LightCompress's VisionZip do for Qwen.
* ``received``: the attention each token receives, averaged over all queries of its segment (HiPrune, arXiv
  2508.00553: ``attn.mean(heads).mean(queries)``).
* ``keys``: the head-mean key of each token (VisionZip's similarity metric for contextual merging).
* ``value_l1``: the L1 norm of the head-mean value (FlowCut, arXiv 2505.19536, Eq. 6).
* ``value_sim``: softmax over tokens of the [CLS] value's dot product with each token's value, head-averaged
  (FlowCut's "semantic" term); without [CLS] the segment's mean value stands in for it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

KINDS = ("cls", "received", "keys", "value_l1", "value_sim")


def check_kinds(kinds: Iterable[str]) -> frozenset[str]:
    out = frozenset(kinds)
    unknown = sorted(out - set(KINDS))
    if unknown:
        raise ValueError(f"vision map kind {unknown[0]!r} is not known: use {', '.join(KINDS)}")
    return out


def head_maps(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, kinds: frozenset[str], scale: float,
              has_cls: bool) -> dict[str, torch.Tensor]:
    """Maps of one attention segment. q, k, v: (..., H, n, hd) (v may be None without value kinds).

    Returns ``{kind: (..., n) or (..., n, hd)}`` for every token of the segment, [CLS] (index 0) included.
    The full attention matrix is formed one head at a time (memory n^2, not H n^2).
    """
    q, k = q.float(), k.float()
    out: dict[str, torch.Tensor] = {}
    heads = q.shape[-3]
    if "received" in kinds or ("cls" in kinds and not has_cls):
        rec = None
        for h in range(heads):
            probs = torch.softmax(q[..., h, :, :] @ k[..., h, :, :].transpose(-1, -2) * scale, dim=-1)
            col = probs.mean(dim=-2)  # mean over queries: attention received
            rec = col if rec is None else rec + col
        out["received"] = rec / heads
    if "cls" in kinds:
        if has_cls:  # one query row: softmax(q_cls k^T / sqrt(d)), head mean
            row = torch.softmax(q[..., :, :1, :] @ k.transpose(-1, -2) * scale, dim=-1)[..., 0, :]
            out["cls"] = row.mean(dim=-2)
        else:
            out["cls"] = out["received"]
    if "keys" in kinds:
        out["keys"] = k.mean(dim=-3)
    if v is not None and kinds & {"value_l1", "value_sim"}:
        v = v.float()
        if "value_l1" in kinds:  # FlowCut: || mean_h v ||_1
            out["value_l1"] = v.mean(dim=-3).abs().sum(dim=-1)
        if "value_sim" in kinds:  # FlowCut: softmax_j(v_cls . v_j) per head (unscaled), head mean
            ref = v[..., :, :1, :] if has_cls else v.mean(dim=-2, keepdim=True)
            out["value_sim"] = torch.softmax(ref @ v.transpose(-1, -2), dim=-1)[..., 0, :].mean(dim=-2)
    return {kind: out[kind] for kind in kinds}


def stack_per_sample(per_image: list[torch.Tensor], counts: list[int]) -> torch.Tensor:
    """Per-image token maps (n_i, ...) -> (B, V, ...), consuming images in order; ``counts`` = visual tokens per
    sample. A ragged batch's shorter samples are padded at the end to the largest count: NaN for float maps, -1
    for integer ones (no spatial cell, no image). Raises ValueError when the images do not cover the samples."""
    rows, k = [], 0
    for n in counts:
        parts, got = [], 0
        while got < n and k < len(per_image):
            parts.append(per_image[k])
            got += per_image[k].shape[0]
            k += 1
        if got != n:
            raise ValueError(f"vision maps cover {got} tokens but a sample has {n} visual tokens")
        rows.append(torch.cat(parts) if parts else per_image[0].new_zeros((0, *per_image[0].shape[1:])))
    if k != len(per_image):
        raise ValueError(f"{len(per_image)} images were encoded but the batch's visual tokens use only {k}")
    width = max(counts, default=0)
    out = []
    for r in rows:
        pad = r.new_full((width - r.shape[0], *r.shape[1:]), float("nan") if r.is_floating_point() else -1)
        out.append(torch.cat([r, pad]))
    return torch.stack(out)
