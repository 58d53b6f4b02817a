"""``evs``: Efficient Video Sampling -- keep the video tokens that changed since the previous frame.

Bagrov et al., "Efficient Video Sampling: Pruning Temporally Redundant Tokens for Faster VLM Inference",
arXiv 2510.14624; the reference is vLLM's ``vllm/multimodal/evs.py`` (``compute_retention_mask``; the same code
in sglang ``python/sglang/srt/multimodal/evs/evs_core.py``): per clip, the dissimilarity of a token is
``1 - cos(x_t, x_{t-1})`` with the token at the same (row, col) of the previous frame; every token of the first
frame gets 255 so the whole first frame is kept; the clip keeps its top ``(1 - q)`` share by dissimilarity
(stable order). There ``x`` are the merged vision features before the LLM and the kept share is
``max(tokens_per_frame, int(T * tokens_per_frame * (1 - q)))``.

Here (our deviations, documented): ``x`` are the states entering the drop layer (at layer 0 those ARE the
vision features entering the LLM); the count comes from the schedule (the rounding rule), not from ``q``, so a
schedule below one frame's worth drops first-frame tokens too (stable order: earlier ones kept); after an
earlier drop the predecessor is the latest ALIVE token of that cell (see :mod:`.temporal`); image tokens score
255 like a first frame (EVS ranks only video; give images their own ratio with ``modality_keep_ratios``).
"""

from __future__ import annotations

import torch

from schedsearch.runtime.scorers.base import ScoreContext, visual_states
from schedsearch.runtime.scorers.temporal import check, predecessors

FIRST = 255.0  # the reference's score of a first-frame token (always kept first)


class EVS:
    name = "evs"
    needs_coords = True
    needs_time = True

    def __call__(self, ctx: ScoreContext) -> torch.Tensor:
        check(ctx, self.name)
        x = torch.nn.functional.normalize(visual_states(ctx), dim=-1)
        scores = torch.full(x.shape[:2], FIRST, device=x.device)
        for b in range(x.shape[0]):
            prev = predecessors(ctx, b)
            has = prev >= 0
            if bool(has.any()):
                sim = (x[b, has] * x[b, prev[has]]).sum(-1)
                scores[b, has] = (1.0 - sim).clamp(min=0.0)
        return scores
