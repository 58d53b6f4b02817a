"""``dart``: pivot tokens, then per pivot the tokens least similar to it (duplication-aware).

DART (Wen et al., arXiv 2502.11494, Sec. 3); reference ZichenWen1/DART (mirror xqy1111111/DART)
``Qwen2-VL/Qwen2VL_DART/modeling_qwen2_vl_self.py::get_retained_image_token`` and LightCompress
``token_reduction/dart.py``. At the drop before layer K (the reference: K = 2):

1. pivots: the ``image_pivots`` visual tokens and ``text_pivots`` instruction tokens (after the image) with the
   largest L1 norm of their keys in layer K-1 (all heads, after RoPE: the KV cache's keys);
2. states: the tokens entering layer K, through the model's final norm;
3. for each pivot in turn, the k_j remaining visual tokens (not image pivots, not yet chosen) least cosine-similar
   to it are kept; image pivots are kept, text pivots are not.

Deliberate differences: the reference gives every pivot int(n_keep / P) tokens (P = pivots), which keeps
n_keep - (n_keep mod P) + image_pivots tokens; here the n_keep - image_pivots slots are split as evenly as possible
(k_j = m // P, the first m mod P pivots one more), so exactly n_keep are kept. The reference visits pivots in a
Python set's order; here in sequence order. At K = 0 (no earlier layer) layer 0's own keys are used.
"""

from __future__ import annotations

from typing import Any

import torch

from schedsearch.runtime.scorers.base import ScoreContext, layer_keys, text_after_visual, visual_states
from schedsearch.runtime.scorers.observers import ReadsPreviousLayer


class DART(ReadsPreviousLayer):
    name = "dart"

    def __init__(self, image_pivots: int = 4, text_pivots: int = 4):
        self.image_pivots, self.text_pivots = int(image_pivots), int(text_pivots)
        super().__init__()
        self._norm: Any = None

    def attach(self, text_model: Any, view: Any) -> list:
        self._norm = getattr(text_model, "norm", None)
        return super().attach(text_model, view)

    def __call__(self, ctx: ScoreContext) -> torch.Tensor:
        bsz, v = ctx.visual_local.shape
        n_keep = min(ctx.n_keep, v)
        scores = torch.zeros(bsz, v, device=ctx.visual_local.device)
        if n_keep == 0:
            return scores
        prev = self._prev.context(ctx)
        k = layer_keys(prev)  # (B, H_kv, n, hd) keys of layer K-1 (the KV cache's, RoPE applied)
        l1 = k.float().abs().sum(dim=(1, 3))  # (B, n): L1 norm over all heads' keys
        vis_l1 = l1.gather(1, ctx.visual_local)
        p_img = min(self.image_pivots, n_keep)
        img_piv = torch.argsort(vis_l1, dim=1, descending=True, stable=True)[:, :p_img]  # visual order
        text = text_after_visual(ctx)
        p_txt = min(self.text_pivots, int(text.sum(dim=1).min()))
        txt_piv = torch.argsort(l1.masked_fill(~text, float("-inf")), dim=1, descending=True, stable=True)[:, :p_txt]
        h = visual_states(ctx)
        if self._norm is not None:  # DART compares the states through the model's final norm
            h = self._norm(h.to(ctx.hidden_states.dtype)).float()
        h = torch.nn.functional.normalize(h, dim=-1)
        t_all = ctx.hidden_states.gather(1, txt_piv[..., None].expand(-1, -1, ctx.hidden_states.shape[-1]))
        if self._norm is not None:
            t_all = self._norm(t_all)
        t_all = torch.nn.functional.normalize(t_all.float(), dim=-1)
        # pivots in sequence order: an image pivot's position is its visual token's, a text pivot's its own
        piv_pos = torch.cat([ctx.visual_local.gather(1, img_piv), txt_piv], dim=1)
        piv_vec = torch.cat([h.gather(1, img_piv[..., None].expand(-1, -1, h.shape[-1])), t_all], dim=1)
        order = torch.argsort(piv_pos, dim=1, stable=True)
        piv_vec = piv_vec.gather(1, order[..., None].expand(-1, -1, h.shape[-1]))
        rows = torch.arange(bsz, device=scores.device)[:, None]
        taken = torch.zeros(bsz, v, dtype=torch.bool, device=scores.device)
        taken[rows, img_piv] = True
        scores[rows, img_piv] = float(n_keep + 1)  # image pivots first
        n_piv = p_img + p_txt
        m = n_keep - p_img
        rank = 0
        for j in range(n_piv if m > 0 else 0):
            kj = m // n_piv + (1 if j < m % n_piv else 0)
            if kj == 0:
                continue
            dis = -(h @ piv_vec[:, j, :, None])[..., 0]  # DART: -cos(pivot, token), largest first
            pick = torch.argsort(dis.masked_fill(taken, float("-inf")), dim=1, descending=True, stable=True)[:, :kj]
            taken[rows, pick] = True
            scores[rows, pick] = torch.arange(n_keep - rank, n_keep - rank - kj, -1, device=scores.device).float()
            rank += kj
        return scores
