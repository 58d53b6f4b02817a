"""Hand-written loops of the published pruning rules, to check the runtime's kept sets against (tests, studies).

Nothing here uses the runtime's hooks or scorers: a :func:`reference_run` drives the decoder layers of a model
loaded with ``attn_implementation="eager"`` one by one on ONE sample (no padding), from the stack's own layer-0
input and rotary tables, and at each drop layer asks a *rule* which visual tokens survive. The rules paraphrase the
authors' code (each cites its file); attention maps come from the layers' own eager attention (what the
references read with ``output_attentions``), except FEATHER's RoPE-free map, which its code computes by hand too.

    run = reference_run(adapter, batch, {2: fastv_rule(128)})
    run.kept[2]          # sorted original visual indices alive at layer 2
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class RuleInput:
    """What a rule sees at drop layer ``layer`` (batch of one)."""

    layer: int
    layers: Any  # the decoder layers
    h: torch.Tensor  # (1, n, D) input of layer ``layer``
    pe: tuple[torch.Tensor, torch.Tensor]  # rotary (cos, sin) of the alive tokens
    mask: torch.Tensor  # (1, 1, n, n) additive causal mask over the alive tokens
    prev: tuple[torch.Tensor, tuple, torch.Tensor] | None  # (h, pe, mask) of layer ``layer - 1``; None at layer 0
    vis_pos: torch.Tensor  # (V,) positions of the alive visual tokens in the alive sequence
    vis_orig: torch.Tensor  # (V,) their original visual indices
    n_visual: int  # visual tokens before any drop
    first: bool  # no drop happened before this one
    cells: torch.Tensor | None = None  # (V, 2) integer (row, col) of the alive visual tokens


@dataclass
class RefRun:
    kept: dict[int, list[int]] = field(default_factory=dict)  # drop layer -> sorted original visual indices kept
    final: torch.Tensor | None = None  # (1, n_last, D) output of the last layer


def causal_mask(n: int, dtype: torch.dtype) -> torch.Tensor:
    m = torch.full((n, n), torch.finfo(dtype).min, dtype=dtype).triu(1)
    return m[None, None]


def _capture(adapter: Any, batch: dict) -> tuple[torch.Tensor, tuple]:
    got: dict = {}

    def pre(module: Any, args: tuple, kwargs: dict) -> None:
        got["h"] = args[0] if args else kwargs["hidden_states"]
        got["pe"] = kwargs["position_embeddings"]

    handle = adapter.decoder_layers[0].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad():
            adapter.model(**batch, use_cache=False)
    finally:
        handle.remove()
    return got["h"], got["pe"]


def token_cells(adapter: Any, batch: dict) -> torch.Tensor:
    """(V, 2) integer (row, col) of every visual token of the sample, from the adapter's coordinates."""
    c = adapter.visual_coords(batch)[0]
    out = torch.zeros(c.shape[0], 2, dtype=torch.long)
    for d in (1, 2):
        out[:, d - 1] = torch.searchsorted(torch.unique(c[:, d]), c[:, d].contiguous())
    return out


def _position_ids(adapter: Any, batch: dict) -> torch.Tensor:
    """(3, 1, n) Qwen-VL mRoPE position ids of the sample (the model's own ``get_rope_index``)."""
    base = adapter.model.model
    pos, _ = base.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                 image_grid_thw=batch.get("image_grid_thw"), attention_mask=batch.get("attention_mask"))
    return pos


@torch.no_grad()
def reference_run(adapter: Any, batch: dict, rules: dict[int, Callable[[RuleInput], torch.Tensor]],
                  positions: str = "original") -> RefRun:
    """Run the decoder layer by layer; before layer l in ``rules`` keep the visual tokens the rule returns
    (indices into the alive visual tokens). ``positions="original"``: survivors keep their rotary positions (the
    runtime's convention); ``"renumber"`` (Qwen-VL only): after each drop every survivor's position ids are lowered by
    the number of tokens dropped before it -- PyramidDrop's update (``modeling_llama_pdrop.py``), which for LLaVA's
    1-D positions is the renumbering 0..n-1 its prefill does."""
    if batch["input_ids"].shape[0] != 1:
        raise ValueError("reference_run takes one sample")
    h, (cos, sin) = _capture(adapter, batch)
    pos = _position_ids(adapter, batch) if positions == "renumber" else None
    visual = adapter.visual_mask(batch["input_ids"])[0]
    n_visual = int(visual.sum())
    cells_all = token_cells(adapter, batch) if any(getattr(r, "needs_cells", False) for r in rules.values()) else None
    alive = torch.arange(h.shape[1])
    layers = adapter.decoder_layers
    run = RefRun()
    prev = None
    first = True
    for l, layer in enumerate(layers):
        pe = (cos[:, alive], sin[:, alive]) if pos is None else adapter.text_model.rotary_emb(h, pos)
        mask = causal_mask(len(alive), h.dtype)
        if l in rules:
            is_vis = visual[alive]
            vis_pos = is_vis.nonzero()[:, 0]
            vis_orig = (visual.long().cumsum(0) - 1)[alive[vis_pos]]
            inp = RuleInput(l, layers, h, pe, mask, prev, vis_pos, vis_orig, n_visual, first,
                            None if cells_all is None else cells_all[vis_orig])
            keep = rules[l](inp)
            keep_seq = ~is_vis
            keep_seq[vis_pos[keep]] = True
            h = h[:, keep_seq]
            alive = alive[keep_seq]
            run.kept[l] = sorted(vis_orig[keep].tolist())
            first = False
            if pos is not None:  # lower each survivor's ids by the tokens dropped before it
                dropped_before = (~keep_seq).long().cumsum(0)[keep_seq]
                pos = pos[:, :, keep_seq] - dropped_before
                pe = adapter.text_model.rotary_emb(h, pos)
            else:
                pe = (cos[:, alive], sin[:, alive])
            mask = causal_mask(len(alive), h.dtype)
        prev = (h, pe, mask)
        out = layer(h, attention_mask=mask, position_embeddings=pe)
        h = out[0] if isinstance(out, tuple) else out
    run.final = h
    return run


def eager_attention(layer: Any, h: torch.Tensor, pe: tuple, mask: torch.Tensor) -> torch.Tensor:
    """(1, H, n, n) the attention probabilities ``layer`` computes on input ``h`` (its own eager attention)."""
    _, weights = layer.self_attn(layer.input_layernorm(h), attention_mask=mask, position_embeddings=pe)
    if weights is None:
        raise ValueError("load the model with attn_implementation='eager' to read attention maps")
    return weights


# ----------------------------------------------------------------------------------------------- rules
def fastv_rule(n_keep: int) -> Callable[[RuleInput], torch.Tensor]:
    """FastV (pkunlp-icler/FastV ``modeling_llama.py::fastv_forward``): the attention map returned by layer K-1, mean
    over heads, last query row, image columns, top ``n_keep`` (FastV: ``round(V (1 - R))``)."""

    def rule(x: RuleInput) -> torch.Tensor:
        h, pe, mask = x.prev if x.prev is not None else (x.h, x.pe, x.mask)
        layer = x.layers[x.layer - 1 if x.prev is not None else x.layer]
        att = eager_attention(layer, h, pe, mask).mean(dim=1)[0, -1]
        return att[x.vis_pos].topk(n_keep).indices

    return rule


def pdrop_rule(n_keep: int) -> Callable[[RuleInput], torch.Tensor]:
    """PyramidDrop (Cooperx521/PyramidDrop ``modeling_llama_pdrop.py::pdrop_rank_drop``): the drop layer's OWN q/k on
    its input (``self.layers[rank_layer]``), the last instruction token's row of the causal softmax over all keys,
    mean over heads, image columns, top ``n_keep`` (PyramidDrop: ``int(V lambda^i)``)."""

    def rule(x: RuleInput) -> torch.Tensor:
        att = eager_attention(x.layers[x.layer], x.h, x.pe, x.mask).mean(dim=1)[0, -1]
        return att[x.vis_pos].topk(n_keep).indices

    return rule


def divprune_select(x: torch.Tensor, n_keep: int) -> torch.Tensor:
    """DivPrune (vbdi/divprune ``llava_arch.py::DivPrune``), paraphrased: (V, D) features -> (n_keep,) picks."""
    norm = x.float() / x.float().norm(dim=1, keepdim=True)
    d = 1.0 - norm @ norm.t()
    picks: list[int] = []
    for i in range(n_keep):
        if i == 0:
            score = torch.topk(d, 2, dim=0, largest=False).values[1, :]  # each token's nearest-neighbour distance
        else:
            score = d[torch.tensor(picks)].min(dim=0).values  # distance to the chosen set
        picks.append(int(score.argmax()))
    return torch.tensor(picks)


def divprune_rule(n_keep: int) -> Callable[[RuleInput], torch.Tensor]:
    """DivPrune on the visual states entering the drop layer (the reference: the embeddings entering the LLM)."""

    def rule(x: RuleInput) -> torch.Tensor:
        return divprune_select(x.h[0, x.vis_pos], n_keep)

    return rule


def feather_attention(layer: Any, h: torch.Tensor, vis_pos: torch.Tensor) -> torch.Tensor:
    """FEATHER's map (markendo/FEATHER ``llama2_models.py::calculate_attention_weight`` with RoPE off): the last
    token's un-rotated query against the image keys only, softmax over them, mean over heads -> (V,)."""
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    bsz, n, _ = x.shape
    hd = attn.head_dim
    q = attn.q_proj(x).view(bsz, n, -1, hd).transpose(1, 2)
    k = attn.k_proj(x).view(bsz, n, -1, hd).transpose(1, 2)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    w = torch.matmul(q[:, :, -1:], k[:, :, vis_pos].transpose(2, 3)) / math.sqrt(hd)
    return torch.softmax(w.float(), dim=-1).mean(dim=1)[0, 0]


class _FeatherRule:
    needs_cells = True

    def __init__(self, n_att: int, stride: int):
        self.n_att, self.stride = n_att, stride

    def __call__(self, x: RuleInput) -> torch.Tensor:
        h = x.prev[0] if x.prev is not None else x.h
        layer = x.layers[x.layer - 1 if x.prev is not None else x.layer]
        att = feather_attention(layer, h, x.vis_pos)
        top = att.topk(self.n_att).indices
        if not x.first:
            return top
        grid = ((x.cells % self.stride) == 0).all(dim=1).nonzero()[:, 0]  # grid[::s, ::s]
        return torch.unique(torch.cat([top, grid]))


def feather_rule(n_att: int, stride: int = 3) -> Callable[[RuleInput], torch.Tensor]:
    """FEATHER: first drop = attention top ``n_att`` united with the stride grid; later drops = attention top-k."""
    return _FeatherRule(n_att, stride)


def overlap(ours: list[int], ref: list[int]) -> float:
    """|ours & ref| / |ref| (1.0 when both are empty)."""
    return len(set(ours) & set(ref)) / len(ref) if ref else float(not ours)


def vflow_reference(imp: torch.Tensor, cells: torch.Tensor, keep: float, m: int) -> torch.Tensor:
    """VFlowOpt's vision-stage rule (sihany077/VFlowOpt ``llava_qwen_training_free.py``, "token merging"),
    paraphrased: (V,) importance, (V,) cell ids of m x m-token cells -> (V,) bool kept. The round(V (1 - keep)) +
    int(V / m^2) least important tokens fall out; in each cell the most important of them is kept again."""
    v = imp.shape[0]
    low = torch.sort(imp).indices[: round(v * (1 - keep)) + int(v / m**2)]
    kept = torch.ones(v, dtype=torch.bool)
    kept[low] = False
    for c in torch.unique(cells[low]):
        group = low[cells[low] == c]
        kept[group[imp[group].argmax()]] = True
    return kept


@torch.no_grad()
def runtime_kept(adapter: Any, batch: dict, ratios: list[float], scorer: dict, importance: Any = None,
                 recycling: dict | None = None) -> dict[int, list[int]]:
    """The runtime's kept sets: drop layer -> sorted original visual indices alive there (one sample)."""
    from schedsearch.runtime import apply_schedule

    vis = adapter.visual_mask(batch["input_ids"])[0]
    order = vis.long().cumsum(0) - 1
    sched = {"keep_ratios": list(ratios), "scorer": scorer, "recycling": recycling}
    out: dict[int, list[int]] = {}
    with apply_schedule(adapter.model, sched, adapter=adapter, importance=importance) as h:
        adapter.model(**batch)
        prev = None
        for l in sorted(h.kept_indices):
            idx = h.kept_indices[l][0]
            kept = sorted(order[idx[vis[idx]]].tolist())
            if kept != prev:
                out[l] = kept
            prev = kept
    return out
