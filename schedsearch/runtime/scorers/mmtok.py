"""``mmtok``: greedy maximum coverage of the instruction tokens and of the visual tokens themselves.

MMTok (Dong et al., arXiv 2508.18264, Sec. 3); reference Ironieser/MMTok ``mmtok/core/semantic_selector.py::
mm_coverage_selection`` and ``mmtok_core.py`` (defaults alpha 0.5, text temperature 0.02, vision 0.2). With x the
visual tokens' states and z the instruction tokens' (both L2-normalised):

    P = softmax_over_visual(z x^T / tau_t) / m      (m instruction tokens: how well each visual token covers them)
    Q = softmax_over_visual(x x^T / tau_v) / n      (n visual tokens: how well they cover each other)
    C = [P; alpha Q]                                 ((m + n) rows to cover, n candidate columns)

then n_keep greedy steps: pick the column with the largest coverage gain sum_r max(0, C[r, j] - best[r]), and set
best = max(best, C[:, pick]) (submodular maximum coverage; ties -- gains within 1e-5 of the best -- go to the
earlier token).

Deliberate differences: the reference takes the question's keywords (stop words removed) embedded by the LLM's
token table and, for Q, the vision tower's features; here z are the states of the text tokens after the image and
Q uses the visual tokens' states entering the drop layer (at layer 0 these are the projected features and input
embeddings, the reference's spaces up to the keyword filter and Q's space).
"""

from __future__ import annotations

import torch

from schedsearch.runtime.scorers.base import ScoreContext, mask_indices, text_after_visual, visual_states

#: gains within this fraction of a step's best gain count as equal: a batch and its samples alone differ by float
#: rounding in the encoder, and identical tokens (e.g. LLaVA-NeXT's newlines) must not be ordered by that noise
TIE = 1e-5


def greedy_coverage(cover: torch.Tensor, k: int) -> torch.Tensor:
    """(B, R, n) coverage matrix -> (B, n) scores: k - i for the i-th greedy pick, 0 for the rest."""
    bsz, _, n = cover.shape
    scores = torch.zeros(bsz, n, device=cover.device)
    best = torch.zeros(bsz, cover.shape[1], device=cover.device)
    taken = torch.zeros(bsz, n, dtype=torch.bool, device=cover.device)
    rows = torch.arange(bsz, device=cover.device)
    for i in range(min(k, n)):
        gain = (cover - best[..., None]).clamp_min(0).sum(dim=1).masked_fill(taken, float("-inf"))
        top = gain.max(dim=1, keepdim=True).values
        pick = (gain >= top - TIE * top.abs()).float().argmax(dim=1)  # near-ties (float noise) -> earlier token
        scores[rows, pick] = float(k - i)
        taken[rows, pick] = True
        best = torch.maximum(best, cover[rows, :, pick])
    return scores


class MMTok:
    name = "mmtok"

    def __init__(self, alpha: float = 0.5, text_temperature: float = 0.02, vision_temperature: float = 0.2):
        self.alpha = float(alpha)
        self.tau_t, self.tau_v = float(text_temperature), float(vision_temperature)

    def __call__(self, ctx: ScoreContext) -> torch.Tensor:
        x = torch.nn.functional.normalize(visual_states(ctx), dim=-1)  # (B, n, D)
        idx, valid = mask_indices(text_after_visual(ctx))  # (B, m): the instruction tokens, padded
        hs = ctx.hidden_states
        z = torch.nn.functional.normalize(hs.gather(1, idx[..., None].expand(-1, -1, hs.shape[-1])).float(), dim=-1)
        m = valid.sum(dim=1, keepdim=True).clamp_min(1).float()  # (B, 1)
        p = torch.softmax(z @ x.transpose(1, 2) / self.tau_t, dim=2) / m[..., None]  # (B, m, n)
        p = p * valid[..., None]
        n = x.shape[1]
        q = torch.softmax(x @ x.transpose(1, 2) / self.tau_v, dim=2) / n  # (B, n, n)
        return greedy_coverage(torch.cat([p, self.alpha * q], dim=1), ctx.n_keep)
