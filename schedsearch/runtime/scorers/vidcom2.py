"""``vidcom2``: VidCom2 -- a per-frame budget from frame distinctiveness, then the most distinct tokens per frame.

Liu et al., "Video Compression Commander: Plug-and-Play Inference Acceleration for Video Large Language
Models", arXiv 2505.14454 (EMNLP 2025); reference code ``token_compressor/vidcom2/vidcom2.py`` of
xuyang-liu16/VidCom2 (``vidcom2_compression``), which this follows:

1. features: the ``channel_ratio`` share of channels with the LOWEST variance over the clip's tokens
   (``select_low_var_channels``), each token L2-normalised;
2. similarity of a token to the clip centre ``v`` and to its frame's centre ``f``: a multi-scale Gaussian kernel
   ``sum_a exp(-||x - c||^2 / (2a))`` over a in {1/8, 1/4, 1/2, 1, 2} (``compute_gaussian_scores``);
3. frame budget: frame score ``s_t = -mean_t(v)`` (distinct frames score high), ``p = softmax((s - max s) / T)``
   with ``T = temperature`` (0.01 in the reference), scale ``r_t = base * (1 + p_t - mean p)`` clamped to 1
   (``compute_scales``);
4. per frame keep the ``round(r_t * tokens_per_frame)`` tokens with the lowest ``v + f`` (``select_outlier_indices``).

Here (documented deviations): the total count is the schedule's (the rounding rule), so ``base`` is the kept
share of the clip's alive tokens and the frame quotas ``r_t * n_t`` are rescaled to sum to it exactly (largest
remainders, each capped by the frame's alive tokens); features are the states entering the drop layer (at
layer 0 the vision features entering the LLM). Scores: tokens inside their frame's quota ``2 + u``, the rest
``u``, with ``u = 1 - (v + f) / 10`` in [0, 1] (so the top ``n_keep`` are the quotas). Image tokens score ``u``
against their own image's centre (no budget allocation).
"""

from __future__ import annotations

import math

import torch

from schedsearch.runtime.scorers.base import ScoreContext, visual_states
from schedsearch.runtime.scorers.temporal import check, frame_ids

ALPHAS = tuple(2.0**k for k in range(-3, 2))


def _gauss(x: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    d2 = ((x - centre) ** 2).sum(-1)
    return sum(torch.exp(-d2 / (2 * a)) for a in ALPHAS)


def _quotas(weights: list[float], sizes: list[int], total: int) -> list[int]:
    """Integers <= sizes, summing to min(total, sum sizes), proportional to weights (largest remainders)."""
    total = min(total, sum(sizes))
    quota = [0] * len(sizes)
    left = total
    open_ = [i for i in range(len(sizes)) if sizes[i] > 0]
    while left > 0 and open_:
        w = sum(weights[i] for i in open_) or float(len(open_))
        raw = {i: left * (weights[i] / w if w else 1 / len(open_)) for i in open_}
        add = {i: min(sizes[i] - quota[i], math.floor(raw[i])) for i in open_}
        for i, a in add.items():
            quota[i] += a
        left = total - sum(quota)
        for i in sorted(open_, key=lambda i: (-(raw[i] - math.floor(raw[i])), i)):
            if left == 0:
                break
            if quota[i] < sizes[i]:
                quota[i] += 1
                left -= 1
        open_ = [i for i in open_ if quota[i] < sizes[i]]
    return quota


class VidCom2:
    name = "vidcom2"
    needs_coords = True
    needs_time = True

    def __init__(self, temperature: float = 0.01, channel_ratio: float = 0.5):
        self.temperature = float(temperature)
        self.channel_ratio = float(channel_ratio)

    def __call__(self, ctx: ScoreContext) -> torch.Tensor:
        check(ctx, self.name)
        states = visual_states(ctx)
        bsz, v, d = states.shape
        scores = torch.zeros(bsz, v, device=states.device)
        n_video_alive = int((ctx.time[0, :, 0] >= 0).sum())
        if ctx.n_keep_modality is not None:
            video_keep = int(ctx.n_keep_modality.get(2, 0))
        else:  # one count for all visual tokens: the video's share of it
            video_keep = int(math.floor(ctx.n_keep * n_video_alive / max(v, 1) + 0.5))
        for b in range(bsz):
            clip = ctx.time[b, :, 0]
            frames = frame_ids(ctx, b)
            for c in clip.unique().tolist():
                sel = (clip == c).nonzero().squeeze(1)
                x = states[b, sel]
                k = max(1, int(d * self.channel_ratio))
                chans = torch.topk(x.var(dim=0, unbiased=False), k=min(k, d), largest=False).indices
                x = torch.nn.functional.normalize(x[:, chans], dim=-1)
                fr = frames[sel]
                ids = fr.unique()
                centres = torch.stack([x[fr == i].mean(0) for i in ids])
                f_sim = _gauss(x, centres[torch.searchsorted(ids, fr)])
                if c < 0:  # image tokens: each image is its own picture; no budget allocation
                    scores[b, sel] = 1.0 - f_sim / (2 * len(ALPHAS))
                    continue
                v_sim = _gauss(x, x.mean(0, keepdim=True))
                u = 1.0 - (v_sim + f_sim) / (2 * len(ALPHAS))
                s = torch.stack([-v_sim[fr == i].mean() for i in ids])
                p = torch.softmax((s - s.max()) / self.temperature, dim=0)
                sizes = [int((fr == i).sum()) for i in ids]
                base = video_keep / max(n_video_alive, 1)
                share = [min(1.0, base * (1 + float(p[j] - p.mean()))) * sizes[j] for j in range(len(ids))]
                clip_keep = int(math.floor(video_keep * len(sel) / max(n_video_alive, 1) + 0.5))
                quota = _quotas(share, sizes, clip_keep)
                out = u.clone()
                for j, i in enumerate(ids):
                    members = (fr == i).nonzero().squeeze(1)
                    if quota[j] > 0:
                        top = members[torch.argsort(u[members], descending=True, stable=True)[: quota[j]]]
                        out[top] += 2.0
                scores[b, sel] = out
        return scores
