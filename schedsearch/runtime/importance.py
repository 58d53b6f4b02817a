"""Vision-side importance maps (VFlowOpt, Yang et al., arXiv 2508.05211, Sec. 3.2; paraphrased).

From a late vision-encoder layer's head-averaged self-attention A (rows = queries), the attention a
token *receives* is ``r_j = mean_i A_ij``; global tokens have ``r_j > t * mean(r)``; the context
relevance of token j is the mean attention the global tokens pay to it; the importance adds
``alpha * softmax(H)`` with H the entropy of the patch's 256-bin grey histogram.
"""

from __future__ import annotations

import torch


def importance_from_attention(attn: torch.Tensor, t: float, alpha: float = 0.0,
                              entropy: torch.Tensor | None = None) -> torch.Tensor:
    """(V, V) head-averaged attention (rows = queries) -> (V,) importance."""
    received = attn.mean(dim=0)
    glob = received > t * received.mean()
    if not bool(glob.any()):  # the reference averages an empty set here (NaN): take the most-attended token
        glob = received >= received.max()
    rel = attn[glob].mean(dim=0)
    if alpha and entropy is not None:
        rel = rel + alpha * torch.softmax(entropy.float(), dim=0)
    return rel


def patch_entropy(pixels: torch.Tensor, bins: int = 256) -> torch.Tensor:
    """(V, P) grey values of each merged token's pixels -> (V,) Shannon entropy (log2) of a ``bins``-bin histogram.

    Values are binned over the global min..max of ``pixels`` (the processor's normalised pixels stand in
    for 8-bit grey levels; the histogram shape is what matters).
    """
    lo, hi = float(pixels.min()), float(pixels.max())
    idx = ((pixels - lo) / max(hi - lo, 1e-8) * (bins - 1)).round().long().clamp(0, bins - 1)
    counts = torch.zeros(pixels.shape[0], bins, device=pixels.device).scatter_add_(
        1, idx, torch.ones_like(pixels, dtype=torch.float))
    p = counts / counts.sum(dim=1, keepdim=True)
    return -(p * torch.log2(p.clamp_min(1e-12))).sum(dim=1)  # bits, as the reference (siglip_encoder.py)


def importance_for_batch(maps: list[torch.Tensor], counts: list[int], t: float, alpha: float = 0.0,
                         entropies: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Per-image maps -> (B, V) importance, concatenating each sample's images in order.

    ``counts`` is the number of visual tokens per sample; a ragged batch's shorter rows are padded with 0.
    """
    imps = [importance_from_attention(a, t, alpha, None if entropies is None else entropies[i])
            for i, a in enumerate(maps)]
    rows, k = [], 0
    for n in counts:
        parts, got = [], 0
        while got < n and k < len(imps):
            parts.append(imps[k])
            got += imps[k].numel()
            k += 1
        if got != n:
            raise ValueError(f"vision maps cover {got} tokens but the sample has {n} visual tokens")
        rows.append(torch.cat(parts))
    width = max(counts, default=0)
    return torch.stack([torch.cat([r, r.new_zeros(width - r.numel())]) for r in rows])

