"""Every registered ranking on every supported family: it prunes, or it refuses with one line.

"No scorer can crash a schedule that ``validate`` accepted" (issue 13) and "every family holds the runtime's
guarantees" (issue 16) meet here: for each (family, scorer) pair, a schedule with the scorer's default parameters
either runs a pruned prefill that keeps exactly the contract's count at every layer and leaves the model as it
was, or raises one of the project's errors with a one-line message (e.g. a vision-encoder ranking on a family
that exposes no vision maps). Anything else -- a traceback from inside a scorer -- fails.
"""

from __future__ import annotations

import pytest
import torch

from schedsearch.errors import SchedsearchError
from schedsearch.runtime import apply_schedule
from schedsearch.schedule import kept_counts
from schedsearch.scorer_specs import SCORERS
from schedsearch.testing.tiny import tiny_images

# scorers that need something a schedule alone cannot give (a caller's map): checked elsewhere
_NEEDS_CALLER = {"external"}
SCORER_NAMES = [n for n in SCORERS if n not in _NEEDS_CALLER]


@pytest.mark.slow
@torch.no_grad()
def test_every_scorer_prunes_or_refuses_in_one_line(family_adapter):
    ad = family_adapter
    imgs = tiny_images(2, seed=3)
    batch = ad.prepare([[imgs[0]], [imgs[1]]], ["is there a red square in the top left ?", "what colour is it ?"])
    n_vis = int(ad.visual_mask(batch["input_ids"])[0].sum())
    n = ad.num_layers
    ratios = [1.0] + [0.5] * (n - 2) + [0.25] if n > 2 else [0.5] * n
    ref = ad.model(**batch).logits[:, -1]
    ran, refused = [], {}
    for name in SCORER_NAMES:
        sched = {"keep_ratios": ratios, "scorer": {"name": name, "params": {}}, "recycling": None}
        try:
            with apply_schedule(ad.model, sched, adapter=ad) as handle:
                out = ad.model(**batch).logits[:, -1]
                kept = {layer: idx.shape[1] for layer, idx in handle.kept_indices.items()}
        except SchedsearchError as err:
            assert "\n" not in str(err) and str(err).strip(), (name, str(err))
            refused[name] = str(err)
            continue
        assert torch.isfinite(out).all(), name
        want = kept_counts(ratios, n_vis)
        text = int(batch["input_ids"].shape[1]) - n_vis
        for layer, alive in kept.items():  # alive = text (incl. padding) + the kept visual tokens
            assert alive == text + want[layer], (name, layer, alive, text, want[layer])
        ran.append(name)
    # the model is as before, and the position-only and attention rankings run on every family
    assert torch.equal(ad.model(**batch).logits[:, -1], ref)
    assert {"uniform", "random", "last_token_attention", "text_attention", "diverse"} <= set(ran), refused
