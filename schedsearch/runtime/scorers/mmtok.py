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


#: greedy_coverage recomputes the gains exactly every this many steps (between, they are updated incrementally)
REFRESH = 32
#: ... and at every step once the best gain falls below this fraction of the first pick's: there the gains are
#: near zero (coverage saturated) and an incremental update's rounding could reorder near-ties, e.g. make a sample
#: in a batch pick differently than alone
TAIL = 1e-3


def greedy_coverage(cover: torch.Tensor, k: int) -> torch.Tensor:
    """(B, R, n) coverage matrix -> (B, n) scores: k - i for the i-th greedy pick, 0 for the rest.

    The gain of column j is sum_r max(0, C[r, j] - best[r]). A pick raises ``best`` only on the rows it covers
    better than the kept set does, and those shrink fast (about R / i rows at step i for Q's peaked rows), so the
    gains are updated on those rows only: O(changed rows x n) a step instead of O(R x n) (4-5 % of a real-width
    pruned prefill at keep 0.2 before, studies/results/bench_scorers.md). Every ``REFRESH`` steps they are
    recomputed exactly, so float drift stays far below the ``TIE`` tolerance, and at every step once the gains are
    small (``TAIL``), where rounding would otherwise decide."""
    bsz, _, n = cover.shape
    scores = torch.zeros(bsz, n, device=cover.device)
    for b in range(bsz):
        c = cover[b]  # (R, n)
        best = torch.zeros(c.shape[0], device=c.device)
        taken = torch.zeros(n, dtype=torch.bool, device=c.device)
        gain = c.clamp_min(0).sum(dim=0)
        first = float(gain.max())
        tail = False  # once the best gain is small, incremental updates would be mostly cancellation noise
        for i in range(min(k, n)):
            if i and (tail or i % REFRESH == 0):
                gain = (c - best[:, None]).clamp_min(0).sum(dim=0)
            g = gain.masked_fill(taken, float("-inf"))
            top = g.max()
            tail = tail or float(top) <= TAIL * first
            pick = int((g >= top - TIE * top.abs()).float().argmax())  # near-ties (float noise) -> earlier token
            scores[b, pick] = float(k - i)
            taken[pick] = True
            col = c[:, pick]
            changed = (col > best).nonzero().squeeze(1)
            if changed.numel():
                part = c[changed]  # (changed rows, n)
                old = (part - best[changed, None]).clamp_min(0).sum(dim=0)
                best[changed] = col[changed]
                gain -= old - (part - best[changed, None]).clamp_min(0).sum(dim=0)
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
