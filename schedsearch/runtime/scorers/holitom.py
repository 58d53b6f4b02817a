"""``holitom``: HoliTom -- temporal segments of static tokens merged over time, the rest merged in space.

Shao et al., "HoliTom: Holistic Token Merging for Fast Video Large Language Models", arXiv 2505.21334
(NeurIPS 2025), Sec. 3; reference code ``holitom/llava_arch.py`` of cokeshao/HoliTom, which this follows:

1. ``feature_sim[t, p] = cos(x_{t,p}, x_{t+1,p})`` between consecutive frames at every position p;
2. global redundancy-aware temporal segmentation (``select_static_windows``): a dynamic programme splits the
   frames into windows [s, e] (length <= ``max_window``) maximising the sum over windows of
   ``(e - s) * #{p : feature_sim[t, p] > tau for all t in [s, e)}`` -- the tokens merged away;
3. in a window, a position whose similarity stays above ``tau`` is static: its tokens are merged into one (the
   window mean, ``get_static_dynamic_features``); the other (dynamic) tokens of each frame are reduced by
   attention-dominant tokens plus DPC-KNN cluster centres, each pruned token merged into the nearest centre as
   ``beta * centre + (1 - beta) * mean(members)`` (``merge_tokens_by_clustering``).

Here (documented deviations): the kept count is the schedule's; ranking: a static window's first token
("head") and dynamic tokens score ``1 + u`` and the other static tokens ``u / 10``, where ``u = (1 - cos(x, frame
mean)) / 2`` (distinct tokens first; the reference ranks dynamic tokens by vision-attention and DPC-KNN
density, which this runtime does not have at decoder layers); merging (``merge``): each pruned static token is
averaged into its window head when the head is kept (the window mean), every other pruned token into the most
similar kept token of its own frame or image (``beta`` weighting as the reference). States are those entering
the drop layer; after an earlier drop missing tokens make a position dynamic. Image tokens are spatial only.
``tau`` defaults to 0.8 and ``beta`` to 0.6 here (our defaults; both are parameters).
"""

from __future__ import annotations

import torch

from schedsearch.runtime.scorers.base import ScoreContext, visual_states
from schedsearch.runtime.scorers.temporal import cell_ids, check, frame_ids


def segment(static: torch.Tensor, max_window: int) -> list[tuple[int, int]]:
    """Windows [s, e] over T frames maximising sum (e - s) * #positions static over the whole window.

    ``static`` (T-1, P) bool: position p similar between frames t and t+1. The dynamic programme of the
    reference's ``select_static_windows`` (dp[i] = best over windows ending at frame i)."""
    t_len = static.shape[0] + 1
    dp = [0.0] * t_len
    start = list(range(t_len))
    for i in range(t_len):
        best, best_j = (dp[i - 1] if i > 0 else 0.0), i
        for size in range(2, min(i + 1, max_window) + 1):
            j = i - size + 1
            kept = int(static[j:i].all(dim=0).sum())
            val = (dp[j - 1] if j > 0 else 0.0) + kept * (size - 1)
            if val > best:
                best, best_j = val, j
        dp[i], start[i] = best, best_j
    out, i = [], t_len - 1
    while i >= 0:
        out.append((start[i], i))
        i = start[i] - 1
    return out[::-1]


class HoliTom:
    name = "holitom"
    needs_coords = True
    needs_time = True

    def __init__(self, tau: float = 0.8, max_window: int = 8, beta: float = 0.6):
        self.tau, self.max_window, self.beta = float(tau), int(max_window), float(beta)

    def __call__(self, ctx: ScoreContext) -> torch.Tensor:
        check(ctx, self.name)
        x = torch.nn.functional.normalize(visual_states(ctx), dim=-1)
        bsz, v, _ = x.shape
        scores = torch.zeros(bsz, v, device=x.device)
        heads = torch.full((bsz, v), -1, dtype=torch.long, device=x.device)  # static member -> its window head
        for b in range(bsz):
            frames = frame_ids(ctx, b)
            mean = torch.zeros(int(frames.max()) + 1, x.shape[-1], device=x.device).index_add_(0, frames, x[b])
            mean = torch.nn.functional.normalize(mean, dim=-1)
            u = (1.0 - (x[b] * mean[frames]).sum(-1)) / 2
            scores[b] = 1.0 + u
            cells = cell_ids(ctx, b)
            clip, fno = ctx.time[b, :, 0], ctx.time[b, :, 1]
            for c in clip[clip >= 0].unique().tolist():
                sel = clip == c
                f_vals = fno[sel].unique().tolist()
                c_vals = cells[sel].unique()
                grid = torch.full((len(f_vals), len(c_vals)), -1, dtype=torch.long, device=x.device)
                idx = sel.nonzero().squeeze(1)
                grid[torch.tensor([f_vals.index(f) for f in fno[idx].tolist()], device=x.device),
                     torch.searchsorted(c_vals, cells[idx])] = idx
                if len(f_vals) < 2:
                    continue
                a, n = grid[:-1], grid[1:]
                both = (a >= 0) & (n >= 0)
                sim = torch.zeros(a.shape, device=x.device)
                sim[both] = (x[b, a[both]] * x[b, n[both]]).sum(-1)
                static = both & (sim > self.tau)
                for s, e in segment(static, self.max_window):
                    if e == s:
                        continue
                    still = static[s:e].all(dim=0)  # static over the whole window
                    for p in still.nonzero().squeeze(1).tolist():
                        head, members = int(grid[s, p]), grid[s + 1 : e + 1, p]
                        scores[b, members] = u[members] / 10
                        heads[b, members] = head
        ctx.scratch["holitom_heads"] = heads
        return scores

    def merge(self, ctx: ScoreContext, keep: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        h = visual_states(ctx)
        x = torch.nn.functional.normalize(h, dim=-1)
        heads = ctx.scratch.get("holitom_heads")
        out = h.clone()
        for b in range(h.shape[0]):
            frames = frame_ids(ctx, b)
            target = torch.full((h.shape[1],), -1, dtype=torch.long, device=h.device)
            static = (heads[b] >= 0) & ~keep[b]
            static &= keep[b, heads[b].clamp(min=0)]
            target[static] = heads[b, static]
            rest = (~keep[b] & ~static).nonzero().squeeze(1)
            kept = keep[b].nonzero().squeeze(1)
            if rest.numel() and kept.numel():  # the most similar kept token of the same picture
                sim = (x[b, rest] @ x[b, kept].T).masked_fill(frames[rest][:, None] != frames[kept][None], -2.0)
                best = sim.max(dim=1)
                found = best.values > -2.0
                target[rest[found]] = kept[best.indices[found]]
            # per target: the window mean of a static position (target + its static members), then, when pruned
            # tokens of the same picture merge into it, beta * that + (1 - beta) * their mean (summed, no loop)
            d = h.shape[-1]
            temporal = (target >= 0) & static
            spatial = (target >= 0) & ~static
            tsum = h[b].clone().float().index_add_(0, target[temporal], h[b, temporal].float())
            tcnt = torch.ones(h.shape[1], device=h.device).index_add_(
                0, target[temporal], torch.ones(int(temporal.sum()), device=h.device))
            ssum = torch.zeros(h.shape[1], d, device=h.device).index_add_(0, target[spatial], h[b, spatial].float())
            scnt = torch.zeros(h.shape[1], device=h.device).index_add_(
                0, target[spatial], torch.ones(int(spatial.sum()), device=h.device))
            acc = tsum / tcnt[:, None]
            smean = ssum / scnt.clamp(min=1)[:, None]
            mixed = torch.where(scnt[:, None] > 0, self.beta * acc + (1 - self.beta) * smean, acc)
            touched = torch.zeros(h.shape[1], dtype=torch.bool, device=h.device)
            touched[target[target >= 0]] = True
            out[b, touched] = mixed[touched].to(h.dtype)
        return out
