"""The issue-13 rankings against hand-written loops of their authors' published rules, on small inputs.

Vision-side rankings run on the tiny LLaVA (CLIP with [CLS]) and Qwen towers, whose eager attention weights give
the reference's inputs; decoder-side rankings run on hand-made score contexts.
"""

from __future__ import annotations

import re

import pytest
import torch

from schedsearch.errors import ScheduleError
from schedsearch.runtime import apply_schedule
from schedsearch.runtime.scorers import build_scorer
from schedsearch.testing.tiny import tiny_images


def _kept_at0(ad, batch, name, params, keep=0.25):
    """Visual positions (per sample, sorted) kept by a schedule that drops to ``keep`` before decoder layer 0."""
    sched = {"keep_ratios": [keep] * ad.num_layers, "scorer": {"name": name, "params": params}, "recycling": None}
    vis = ad.visual_mask(batch["input_ids"])
    with torch.no_grad(), apply_schedule(ad.model, sched, adapter=ad) as h:
        ad.model(**batch)
        idx = h.kept_indices[0]
    order = vis.long().cumsum(1) - 1  # visual order of each visual position
    return [sorted(int(order[b, i]) for i in idx[b].tolist() if vis[b, i]) for b in range(idx.shape[0])]


def _top_by_hand(values: list[float], k: int) -> list[int]:
    """Indices of the k largest values (earlier index wins ties), sorted: the references' torch.topk + sort."""
    ranked = sorted(range(len(values)), key=lambda j: (-values[j], j))
    return sorted(ranked[:k])


def _eager_attentions(ad, batch):
    ad.model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return [a.float() for a in ad.vision_tower(batch["pixel_values"], output_attentions=True).attentions]
    finally:
        ad.model.set_attn_implementation("sdpa")


@pytest.fixture(scope="module")
def llava(tiny_dir):
    from schedsearch.models import load_model

    ad = load_model(tiny_dir("llava"))
    batch = ad.prepare([[im] for im in tiny_images(2, seed=3)], ["what is it?", "where is the square?"])
    return ad, batch


@pytest.fixture(scope="module")
def qwen(tiny_dir):
    from schedsearch.models import load_model

    ad = load_model(tiny_dir("qwen2_5_vl"))
    batch = ad.prepare([[im] for im in tiny_images(2, seed=3)], ["what is it?", "where is the square?"])
    return ad, batch


# ----------------------------------------------------------------------------- FasterVLM / VTC-CLS
def test_fastervlm_keeps_the_top_cls_attention_of_the_penultimate_layer(llava):
    ad, batch = llava
    att = _eager_attentions(ad, batch)  # per layer (B, H, 1 + P, 1 + P)
    n = att[0].shape[-1] - 1
    k = round(0.25 * n)
    kept = _kept_at0(ad, batch, "fastervlm", {"layer": -2})
    for b in range(2):  # FasterVLM: image_attentions = attentions[-2][:, :, 0, 1:].mean(heads); topk
        cls = [sum(float(att[-2][b, h, 0, 1 + j]) for h in range(att[-2].shape[1])) for j in range(n)]
        assert kept[b] == _top_by_hand(cls, k)
    assert _kept_at0(ad, batch, "fastervlm", {"layer": 0}) == kept  # -2 of this 2-layer tower is layer 0
    assert _kept_at0(ad, batch, "fastervlm", {"layer": 1}) != kept


def test_vtc_cls_sums_cls_attention_over_the_layer_range(llava):
    ad, batch = llava
    att = _eager_attentions(ad, batch)
    n = att[0].shape[-1] - 1
    k = round(0.25 * n)
    kept = _kept_at0(ad, batch, "vtc_cls", {"start": 0, "end": -1})
    heads = att[0].shape[1]
    for b in range(2):  # VTC-CLS: sum over layers start..end of attentions[l].mean(heads)[0, 1:]
        total = [sum(float(att[l][b, h, 0, 1 + j]) / heads for l in range(len(att)) for h in range(heads))
                 for j in range(n)]
        assert kept[b] == _top_by_hand(total, k)
    with pytest.raises(ScheduleError, match="start=1 comes after params.end=0"):
        with apply_schedule(ad.model, {"keep_ratios": [0.5] * ad.num_layers,
                                       "scorer": {"name": "vtc_cls", "params": {"start": 1, "end": 0}}}, adapter=ad):
            pass


def test_fastervlm_on_qwen_ranks_by_attention_received(qwen):
    """No [CLS]: the mean attention each merged token receives in the last full-attention block (LightCompress's
    VisPruner/VisionZip for Qwen: column sums, averaged over the 2x2 patches)."""
    ad, batch = qwen
    depth, glob = ad.vision_encoder_layers()
    maps = ad.vision_attention(batch, block=glob[-1])  # per image (V, V): rows average queries, columns sum keys
    kept = _kept_at0(ad, batch, "fastervlm", {"layer": -2})
    for b, m in enumerate(maps):
        received = [float(m[:, j].sum()) for j in range(m.shape[1])]
        assert kept[b] == _top_by_hand(received, round(0.25 * m.shape[1]))


def test_vision_scorers_refuse_families_without_maps_and_batches_without_an_encoder_run(qwen):
    ad, batch = qwen
    from schedsearch.runtime import RuntimeScheduleError

    pre = ad.precompute_vision(batch)  # the encoder does not run in the forward below ...
    enc = pre["mm_encoder_outputs"]["image"]
    pre["mm_encoder_outputs"] = {"image": type(enc)(**enc)}  # ... and these features' inputs are unknown
    sched = {"keep_ratios": [0.5] * ad.num_layers, "scorer": {"name": "fastervlm", "params": {}}}
    with apply_schedule(ad.model, sched, adapter=ad), pytest.raises(RuntimeScheduleError,
                                                                     match="vision encoder did not run"):
        with torch.no_grad():
            ad.model(**pre)

    class NoMaps:  # an adapter without the optional interface
        family = "fake"

    from schedsearch.runtime.apply import ScheduleHandle

    with pytest.raises(ScheduleError, match="fake adapter does not provide"):
        ScheduleHandle(NoMaps(), sched)


def test_registry_builds_the_new_names():
    assert build_scorer("fastervlm", {}).layer == -2
    assert (build_scorer("vtc_cls", {}).start, build_scorer("vtc_cls", {}).end) == (-8, -2)
    with pytest.raises(ScheduleError, match="scorer.params.layer=99 is outside"):
        build_scorer("fastervlm", {"layer": 99})


# ----------------------------------------------------------------------------- hand-made contexts
def _ctx(h: torch.Tensor, n_keep: int, vision: dict | None = None, text: torch.Tensor | None = None,
         coords: torch.Tensor | None = None, layer=None):
    """Alive sequence = [1 text token, the visual tokens h (B, V, D), the text tokens ``text`` (B, T, D)]."""
    from schedsearch.runtime.scorers import ScoreContext

    bsz, v, d = h.shape
    t = 0 if text is None else text.shape[1]
    hs = torch.cat([torch.zeros(bsz, 1, d), h] + ([] if text is None else [text]), dim=1)
    n = 1 + v + t
    vis = torch.arange(1, v + 1).expand(bsz, v)
    text_mask = torch.ones(bsz, n, dtype=torch.bool)
    text_mask[:, 1 : v + 1] = False
    return ScoreContext(layer=layer, layer_idx=0, hidden_states=hs, cos=None, sin=None,
                        key_valid=torch.ones(bsz, n, dtype=torch.bool), visual_local=vis, visual_orig=vis - 1,
                        text_mask=text_mask, n_keep=n_keep, head_dim=d, num_heads=1, num_kv_heads=1, coords=coords,
                        vision=vision, alive_orig=torch.arange(n).expand(bsz, n), n_visual=v)


def _installed(name, params, depth=24, glob=None):
    sc = build_scorer(name, params)
    req = sc.vision_layers(depth, tuple(glob or range(depth))) if hasattr(sc, "vision_layers") else {}
    return sc, req


def _visionzip_by_hand(attn, keys, h, n_keep, frac):
    """VisionZip's clip_encoder forward for one image, written as loops (no [CLS] token in the inputs)."""
    v = len(attn)
    c = 0 if frac == 0 else min(n_keep, max(1, round(frac * n_keep)))
    d = n_keep - c
    dominant = sorted(range(v), key=lambda j: (-attn[j], j))[:d]
    rest = [j for j in range(v) if j not in dominant]
    step = max(1, len(rest) // c) if c else 1
    targets = [rest[i] for i in range(0, len(rest), step)][:c] if c else []
    unit = [k / k.norm() for k in keys]
    groups = {t: [] for t in targets}
    for j in rest:
        if j in targets:
            continue
        best = max(targets, key=lambda t: (float(unit[j] @ unit[t]), -targets.index(t)))
        groups[best].append(j)
    merged = {t: h[t] + (sum(h[j] for j in groups[t]) / len(groups[t]) if groups[t] else 0) for t in targets}
    return sorted(dominant + targets), merged


@pytest.mark.parametrize("n_keep", [5, 8, 12])
def test_visionzip_matches_the_reference_loop(n_keep):
    gen = torch.Generator().manual_seed(n_keep)
    bsz, v = 2, 20
    attn = torch.rand(bsz, v, generator=gen)
    keys = torch.randn(bsz, v, 6, generator=gen)
    h = torch.randn(bsz, v, 8, generator=gen)
    sc, req = _installed("visionzip", {"contextual": 0.25})
    (layer,) = req
    ctx = _ctx(h, n_keep, vision={(layer, "cls"): attn, (layer, "keys"): keys})
    scores = sc(ctx)
    keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.argsort(1, descending=True)[:, :n_keep], True)
    new = sc.merge(ctx, keep, scores)
    for b in range(bsz):
        want_keep, want_merged = _visionzip_by_hand(attn[b].tolist(), list(keys[b]), list(h[b]), n_keep, 0.25)
        assert sorted(keep[b].nonzero().flatten().tolist()) == want_keep
        for t, vec in want_merged.items():
            torch.testing.assert_close(new[b, t], vec)
        untouched = [j for j in range(v) if j not in want_merged]
        torch.testing.assert_close(new[b, untouched], h[b, untouched])


def test_visionzip_prune_only_and_state_similarity():
    h = torch.randn(1, 10, 4)
    attn = torch.arange(10.0)[None]
    sc, req = _installed("visionzip", {"contextual": 0.0})
    (layer,) = req
    ctx = _ctx(h, 3, vision={(layer, "cls"): attn, (layer, "keys"): h})
    assert sorted(sc(ctx)[0].nonzero().flatten().tolist()) == [7, 8, 9]
    assert sc.merge(ctx, None, None) is None
    sc2, req2 = _installed("visionzip", {"similarity": "states"})
    assert req2 == {22: ("cls",)}  # no vision keys needed
    (layer,) = req2
    assert int((sc2(_ctx(h, 4, vision={(layer, "cls"): attn})) > 0).sum()) == 4


# ----------------------------------------------------------------------------- HiPrune
def _grid_vision(side: int, bsz: int, maps: dict) -> dict:
    cell = torch.stack([torch.arange(side * side) // side, torch.arange(side * side) % side], -1).float()
    return {**maps, "cell": cell.expand(bsz, -1, -1), "image": torch.zeros(bsz, side * side, dtype=torch.long),
            "layout": torch.zeros(bsz, side * side, dtype=torch.long)}


def _hiprune_by_hand(obj, deep, n_keep, alpha, side, raster):
    """HiPrune's encode_images for one image as loops; ``raster``: the reference's +-1 / +-width neighbours with
    clamping (else true grid neighbours)."""
    v = len(obj)
    k = round(n_keep * alpha / 5)
    anchors = sorted(range(v), key=lambda j: (-obj[j], j))[:k]
    chosen = set(anchors)
    for a in anchors:
        if raster:
            near = [min(max(a + d, 0), v - 1) for d in (-1, 1, -side, side)]
        else:
            r, c = divmod(a, side)
            near = [(r + dr) * side + c + dc for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1))
                    if 0 <= r + dr < side and 0 <= c + dc < side]
        chosen.update(near)
    rest = sorted((j for j in range(v) if j not in chosen), key=lambda j: (-deep[j], j))
    return sorted(chosen | set(rest[: n_keep - len(chosen)]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hiprune_matches_the_reference_loop(seed):
    gen = torch.Generator().manual_seed(seed)
    side, bsz, n_keep, alpha = 8, 2, 20, 0.5
    obj, deep = torch.rand(bsz, side * side, generator=gen), torch.rand(bsz, side * side, generator=gen)
    sc, req = _installed("hiprune", {"alpha": alpha})
    lo, hi = sc._layers
    ctx = _ctx(torch.randn(bsz, side * side, 4), n_keep,
               vision=_grid_vision(side, bsz, {(lo, "received"): obj, (hi, "received"): deep}))
    scores = sc(ctx)
    for b in range(bsz):
        kept = sorted(scores[b].argsort(descending=True, stable=True)[:n_keep].tolist())
        assert kept == _hiprune_by_hand(obj[b].tolist(), deep[b].tolist(), n_keep, alpha, side, raster=False)


def test_hiprune_interior_anchors_agree_with_the_raster_rule():
    side, n_keep = 8, 15
    obj = torch.zeros(1, 64)
    obj[0, [18, 29, 45]] = torch.tensor([0.9, 0.8, 0.7])  # interior cells: raster +-1/+-8 = grid neighbours
    deep = torch.linspace(0, 1, 64)[None]
    sc, _ = _installed("hiprune", {"alpha": 1.0})
    lo, hi = sc._layers
    ctx = _ctx(torch.randn(1, 64, 4), n_keep, vision=_grid_vision(side, 1, {(lo, "received"): obj,
                                                                           (hi, "received"): deep}))
    kept = sorted(sc(ctx)[0].argsort(descending=True, stable=True)[:n_keep].tolist())
    assert kept == _hiprune_by_hand(obj[0].tolist(), deep[0].tolist(), n_keep, 1.0, side, raster=True)
    assert {17, 19, 10, 26} <= set(kept)  # the first anchor's four neighbours


# ----------------------------------------------------------------------------- DART
class _FakeLayer(torch.nn.Module):
    """A decoder layer's parts that key-based rankings use: identity input norm, a linear k_proj / q_proj."""

    def __init__(self, d: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.input_layernorm = torch.nn.Identity()
        self.self_attn = torch.nn.Module()
        self.self_attn.k_proj = torch.nn.Linear(d, d, bias=False)
        self.self_attn.q_proj = torch.nn.Linear(d, d, bias=False)


def _rope_free(ctx):
    n, d = ctx.hidden_states.shape[1], ctx.head_dim
    ctx.cos = torch.ones(ctx.hidden_states.shape[0], n, d)
    ctx.sin = torch.zeros(ctx.hidden_states.shape[0], n, d)
    return ctx


def _dart_by_hand(keys, states, n_vis, p_img, p_txt, n_keep):
    """get_retained_image_token for one sample (sequence = [text, visual x n_vis, text...]) with pivots visited in
    sequence order. keys/states: per position."""
    l1 = [float(k.abs().sum()) for k in keys]
    vis = list(range(1, 1 + n_vis))
    txt = list(range(1 + n_vis, len(keys)))
    img_piv = sorted(vis, key=lambda i: (-l1[i], i))[:p_img]
    txt_piv = sorted(txt, key=lambda i: (-l1[i], i))[:p_txt]
    per = int(n_keep / (p_img + p_txt))  # the reference's TOKEN_TOPK
    chosen = set(img_piv)
    valid = [i for i in vis if i not in img_piv]
    for piv in sorted(img_piv + txt_piv):
        cos = [float(torch.nn.functional.cosine_similarity(states[piv], states[i], dim=0)) for i in valid]
        best = sorted(range(len(valid)), key=lambda j: (cos[j], j))[:per]  # topk of -cos
        picked = [valid[j] for j in best]
        chosen.update(picked)
        valid = [i for i in valid if i not in picked]
    return sorted(i - 1 for i in chosen)


@pytest.mark.parametrize("n_keep", [12, 20])  # n_keep = 8q + 4: the reference then keeps exactly n_keep
def test_dart_matches_the_reference_loop(n_keep):
    gen = torch.Generator().manual_seed(n_keep)
    d, v, t = 8, 30, 6
    h, text = torch.randn(2, v, d, generator=gen), torch.randn(2, t, d, generator=gen)
    layer = _FakeLayer(d, seed=n_keep)
    ctx = _rope_free(_ctx(h, n_keep, text=text, layer=layer))
    sc = build_scorer("dart", {})
    scores = sc(ctx)  # used outside apply_schedule: the layer's own keys, no final norm
    with torch.no_grad():
        keys = layer.self_attn.k_proj(ctx.hidden_states)
    for b in range(2):
        kept = sorted(scores[b].argsort(descending=True, stable=True)[:n_keep].tolist())
        want = _dart_by_hand(list(keys[b]), list(ctx.hidden_states[b]), v, 4, 4, n_keep)
        assert kept == want
        assert int((scores[b] > 0).sum()) == n_keep


def test_dart_uses_the_previous_layers_keys_inside_the_runtime(tiny_dir):
    """In apply_schedule the pivots come from layer K-1's keys: the ranking at K = 2 differs from one that would
    use layer 2's own keys, and equals the hand rule on layer 1's recorded input."""
    from schedsearch.models import load_model
    from schedsearch.runtime.scorers.base import layer_keys

    ad = load_model(tiny_dir("qwen2_5_vl"))
    batch = ad.prepare([[im] for im in tiny_images(1, seed=4)], ["where is the square in the picture?"])
    seen = {}
    hooks = [ad.decoder_layers[i].register_forward_pre_hook(
        lambda m, a, kw, _i=i: seen.__setitem__(_i, (a[0] if a else kw["hidden_states"],
                                                     kw["position_embeddings"])), with_kwargs=True)
        for i in (1,)]
    try:
        with torch.no_grad():
            ad.model(**batch)
    finally:
        for hk in hooks:
            hk.remove()
    sched = {"keep_ratios": [1.0, 1.0] + [0.5] * (ad.num_layers - 2),
             "scorer": {"name": "dart", "params": {"image_pivots": 1, "text_pivots": 0}}}
    vis = ad.visual_mask(batch["input_ids"])[0]
    with torch.no_grad(), apply_schedule(ad.model, sched, adapter=ad) as h:
        ad.model(**batch)
        kept = h.kept_indices[2][0]
    kept_vis = kept[vis[kept]]
    hs1, (cos, sin) = seen[1]
    from schedsearch.runtime.scorers import ScoreContext

    cfg = ad.text_config
    ctx1 = ScoreContext(layer=ad.decoder_layers[1], layer_idx=1, hidden_states=hs1, cos=cos, sin=sin,
                        key_valid=torch.ones_like(vis)[None], visual_local=vis.nonzero().T,
                        visual_orig=torch.arange(int(vis.sum()))[None], text_mask=~vis[None], n_keep=1,
                        head_dim=cfg.hidden_size // cfg.num_attention_heads, num_heads=cfg.num_attention_heads,
                        num_kv_heads=cfg.num_key_value_heads)
    with torch.no_grad():
        l1 = layer_keys(ctx1).abs().sum(dim=(1, 3))[0]
    pos = vis.nonzero().flatten()
    pivot = int(pos[torch.argsort(l1[pos], descending=True, stable=True)[0]])
    assert pivot in kept_vis.tolist()  # the layer-1 key-norm pivot survives


# ----------------------------------------------------------------------------- TransPrune
@pytest.mark.parametrize(("iga", "start", "window"), [(True, 1, (1, 2)), (False, 1, (1, 2)), (True, -1, (2,))])
def test_transprune_matches_the_reference_rule(tiny_dir, iga, start, window):
    """Drop before layer 3 of the tiny Qwen, transitions accumulated over layers 1-2 (start 1) or, by default, from
    the layer before the first drop: the kept set equals TTV/sum + IGA/sum computed by loops over the captured
    sublayer inputs/outputs and eager attention weights."""
    from schedsearch.models import load_model

    ad = load_model(tiny_dir("qwen2_5_vl"))
    batch = ad.prepare([[im] for im in tiny_images(1, seed=5)], ["is the red square left of the circle?"])
    cap: dict = {}
    hooks = []
    for i in (1, 2):
        layer = ad.decoder_layers[i]
        hooks.append(layer.self_attn.register_forward_hook(
            lambda m, a, kw, out, _i=i: cap.__setitem__((_i, "attn"), (kw["hidden_states"][0], out[0][0])),
            with_kwargs=True))
        hooks.append(layer.mlp.register_forward_hook(
            lambda m, a, out, _i=i: cap.__setitem__((_i, "mlp"), (a[0][0], out[0]))))
    ad.model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            att = ad.model(**batch, output_attentions=True).attentions[3][0].float()  # (H, n, n)
    finally:
        ad.model.set_attn_implementation("sdpa")
        for hk in hooks:
            hk.remove()
    ids = batch["input_ids"][0]
    vis = ad.visual_mask(batch["input_ids"])[0]
    pos = vis.nonzero().flatten().tolist()
    after = [i for i in range(len(ids)) if i > pos[-1]]
    ttv = []
    for j in pos:
        total = 0.0
        for (layer, _), (x, y) in cap.items():
            if layer not in window:
                continue
            cos = torch.nn.functional.cosine_similarity
            e = [float(torch.exp(1 - cos(x[i], y[i], dim=0))) for i in range(len(ids))]
            total += float(y[j].norm() / x[j].norm()) * e[j] / sum(e)
        ttv.append(total)
    iga_raw = [float(att[:, after, j].mean()) for j in pos]
    score = [t / sum(ttv) + (g / sum(iga_raw) if iga else 0.0) for t, g in zip(ttv, iga_raw, strict=True)]
    n_keep = len(pos) // 2
    sched = {"keep_ratios": [1.0, 1.0, 1.0, 0.5],
             "scorer": {"name": "transprune", "params": {"start": start, "iga": iga}}}
    with torch.no_grad(), apply_schedule(ad.model, sched, adapter=ad) as h:
        ad.model(**batch)
        kept = h.kept_indices[3][0]
    got = sorted(pos.index(i) for i in kept.tolist() if vis[i])
    assert got == _top_by_hand(score, n_keep)


# ----------------------------------------------------------------------------- FlowCut
def test_flowcut_matches_the_reference_score(llava):
    """Per layer (CLS attn / sum + CLS-value softmax / sum) * ||mean-head value||_1, EMA 0.5 over layers 0..1,
    from the eager attention weights and the values of each layer's captured input, as loops."""
    ad, batch = llava
    att = _eager_attentions(ad, batch)
    inputs = {}
    hooks = [ad.vision_tower.encoder.layers[i].self_attn.register_forward_pre_hook(
        lambda m, a, kw, _i=i: inputs.__setitem__(_i, kw["hidden_states"]), with_kwargs=True) for i in (0, 1)]
    try:
        with torch.no_grad():
            ad.vision_tower(batch["pixel_values"])
    finally:
        for hk in hooks:
            hk.remove()
    n = att[0].shape[-1] - 1
    k = round(0.25 * n)
    kept = _kept_at0(ad, batch, "flowcut", {"layer": -1})
    for b in range(2):
        cum = None
        for layer in (0, 1):
            mod = ad.vision_tower.encoder.layers[layer].self_attn
            heads, hd = mod.num_heads, mod.head_dim
            with torch.no_grad():
                vals = mod.v_proj(inputs[layer][b]).view(-1, heads, hd)  # (1 + P, H, hd)
            cls = [sum(float(att[layer][b, h, 0, 1 + j]) for h in range(heads)) / heads for j in range(n)]
            sims = []
            for h in range(heads):
                dots = torch.stack([vals[0, h] @ vals[i, h] for i in range(n + 1)])
                sims.append(torch.softmax(dots, 0)[1:])
            sim = [float(sum(s[j] for s in sims) / heads) for j in range(n)]
            l1 = [float(vals[1 + j].mean(0).abs().sum()) for j in range(n)]
            s = [(cls[j] / sum(cls) + sim[j] / sum(sim)) * l1[j] for j in range(n)]
            cum = s if cum is None else [0.5 * c + 0.5 * x for c, x in zip(cum, s, strict=True)]
        assert kept[b] == _top_by_hand(cum, k)


# ----------------------------------------------------------------------------- MMTok
def _mmtok_by_hand(x, z, k, alpha, tau_t, tau_v):
    """mm_coverage_selection's non-JIT loop for one sample, with explicit Python loops for the gains."""
    x = [v / v.norm() for v in x]
    z = [v / v.norm() for v in z]
    m, n = len(z), len(x)
    p = [torch.softmax(torch.stack([zi @ xj for xj in x]) / tau_t, 0) / m for zi in z]
    q = [torch.softmax(torch.stack([xi @ xj for xj in x]) / tau_v, 0) / n for xi in x]
    rows = [list(map(float, r)) for r in p] + [[alpha * float(c) for c in r] for r in q]
    best = [0.0] * len(rows)
    picks = []
    for _ in range(k):
        gains = [-1.0 if j in picks else sum(max(0.0, r[j] - bst) for r, bst in zip(rows, best, strict=True))
                 for j in range(n)]
        j = max(range(n), key=lambda c: (gains[c], -c))
        picks.append(j)
        best = [max(bst, r[j]) for r, bst in zip(rows, best, strict=True)]
    return picks


def test_mmtok_matches_the_reference_loop():
    gen = torch.Generator().manual_seed(7)
    h, text = torch.randn(2, 16, 6, generator=gen), torch.randn(2, 5, 6, generator=gen)
    sc = build_scorer("mmtok", {"text_temperature": 0.1})
    scores = sc(_ctx(h, 6, text=text))
    for b in range(2):
        order = scores[b].argsort(descending=True, stable=True)[:6].tolist()
        assert order == _mmtok_by_hand(list(h[b]), list(text[b]), 6, 0.5, 0.1, 0.2)


# ----------------------------------------------------------------------------- ToDRE
def _relevance_by_hand(ctx, layer):
    """Mean over the text tokens after the image of their softmax attention (causal, one head) to each visual
    token, from the fake layer's q/k."""
    hs = ctx.hidden_states[0]
    with torch.no_grad():
        q, k = layer.self_attn.q_proj(hs), layer.self_attn.k_proj(hs)
    v = ctx.visual_local.shape[1]
    after = list(range(1 + v, hs.shape[0]))
    rel = []
    for j in range(1, 1 + v):
        total = 0.0
        for i in after:
            logits = torch.stack([q[i] @ k[t] for t in range(i + 1)]) * ctx.head_dim**-0.5
            total += float(torch.softmax(logits, 0)[j])
        rel.append(total / len(after))
    return rel


def test_todre_k_center_from_the_most_relevant_token_then_relevance():
    gen = torch.Generator().manual_seed(11)
    d, v = 8, 14
    h, text = torch.randn(1, v, d, generator=gen), torch.randn(1, 4, d, generator=gen)
    layer = _FakeLayer(d, seed=3)
    sc = build_scorer("todre", {})
    ctx = _rope_free(_ctx(h, 5, text=text, layer=layer))
    rel = _relevance_by_hand(ctx, layer)
    picks = [max(range(v), key=lambda j: (rel[j], -j))]  # greedy k-center, cosine distance, by loops
    unit = [x / x.norm() for x in h[0]]
    while len(picks) < 5:
        far = {j: min(1 - float(unit[j] @ unit[c]) for c in picks) for j in range(v) if j not in picks}
        picks.append(max(far, key=lambda j: (far[j], -j)))
    assert sc(ctx)[0].argsort(descending=True, stable=True)[:5].tolist() == picks
    later = _rope_free(_ctx(h, 5, text=text, layer=layer))
    later.n_visual = v + 10  # some visual tokens were dropped before: the relevance stage
    got = sc(later)[0]
    torch.testing.assert_close(got, torch.tensor(rel), atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- SparseVLM
def _cluster_by_hand(x, c):
    """SparseVLM's cluster_and_merge for one sample as loops (deterministic tie break as documented)."""
    n, d = len(x), x[0].numel()
    dist = [[float((x[i] - x[j]).norm()) / d**0.5 for j in range(n)] for i in range(n)]
    dens = [float(torch.exp(-(torch.tensor(sorted(dist[i])[:c]) ** 2).mean())) + i * 1e-9 for i in range(n)]
    dmax = max(max(r) for r in dist)
    delta = [min([dist[i][j] for j in range(n) if dens[j] > dens[i]], default=dmax) for i in range(n)]
    score = [delta[i] * dens[i] for i in range(n)]
    centres = sorted(range(n), key=lambda i: (-score[i], i))[:c]
    assign = [min(range(c), key=lambda k: (dist[centres[k]][i], k)) for i in range(n)]
    for k, ci in enumerate(centres):
        assign[ci] = k
    means = [sum(x[i] for i in range(n) if assign[i] == k) / assign.count(k) for k in range(c)]
    return centres, means


def test_sparsevlm_density_peak_clustering_by_hand():
    from schedsearch.runtime.scorers.sparsevlm import dpc_knn

    gen = torch.Generator().manual_seed(2)
    x = torch.cat([torch.randn(6, 4, generator=gen) + 5, torch.randn(7, 4, generator=gen) - 5])[None]
    centres, assign = dpc_knn(x, 2)
    want_c, _ = _cluster_by_hand(list(x[0]), 2)
    assert centres[0].tolist() == want_c
    assert len(set(assign[0, :6].tolist())) == 1 and len(set(assign[0, 6:].tolist())) == 1  # the two blobs


def test_sparsevlm_matches_the_reference_rule():
    from schedsearch.runtime.scorers.sparsevlm import recycled_counts

    gen = torch.Generator().manual_seed(9)
    d, v, t, n_keep = 8, 40, 5, 12
    h, text = torch.randn(1, v, d, generator=gen), torch.randn(1, t, d, generator=gen)
    layer = _FakeLayer(d, seed=5)
    ctx = _rope_free(_ctx(h, n_keep, text=text, layer=layer))
    sc = build_scorer("sparsevlm", {})
    scores = sc(ctx)
    keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.argsort(1, descending=True)[:, :n_keep], True)
    new = sc.merge(ctx, keep, scores)
    # 1. raters: softmax over the text after the image of v . t, mean over visual tokens, above the mean
    hs = ctx.hidden_states[0]
    txt = list(range(1 + v, 1 + v + t))
    r = [sum(float(torch.softmax(torch.stack([hs[j] @ hs[i] for i in txt]), 0)[k]) for j in range(1, 1 + v)) / v
         for k in range(t)]
    raters = [txt[k] for k in range(t) if r[k] > sum(r) / t]
    # 2. relation: raters' mean attention (one head, causal) to each visual token
    with torch.no_grad():
        q, k = layer.self_attn.q_proj(hs), layer.self_attn.k_proj(hs)
    rel = []
    for j in range(1, 1 + v):
        rows = [torch.softmax(torch.stack([q[i] @ k[s] for s in range(i + 1)]) * d**-0.5, 0)[j] for i in raters]
        rel.append(float(sum(rows)) / len(raters))
    n_top, c = recycled_counts(v, n_keep)
    order = sorted(range(v), key=lambda j: (-rel[j], j))
    top, pruned = order[:n_top], order[n_top:]
    cand = pruned[: int(0.3 * len(pruned)) + 1]
    centres, means = _cluster_by_hand([h[0, j] for j in cand], c)
    assert sorted(keep[0].nonzero().flatten().tolist()) == sorted(top + [cand[i] for i in centres])
    for i, m in zip(centres, means, strict=True):
        torch.testing.assert_close(new[0, cand[i]], m)
    assert c >= 1 and n_top + c == n_keep


def test_sparsevlm_counts_follow_the_reference_rules():
    from schedsearch.runtime.scorers.sparsevlm import recycled_counts

    for v, n_keep in ((576, 192), (576, 64), (40, 12), (2880, 320)):
        n_top, c = recycled_counts(v, n_keep)
        n_rec = int(0.3 * (v - n_top)) + 1
        assert n_top + c == n_keep and c == int(n_rec / 10) + 1


# ----------------------------------------------------------------------------- HiRED
def _hired_ctx(side, early, late, n_keep):
    """One image: a side x side base view, then two side x side tiles stitched left | right, then newlines."""
    base = [(0, 0, (r + 0.5) / side, (c + 0.5) / side) for r in range(side) for c in range(side)]
    hi = [(1 + c // side, 0, (r + 0.5) / side, (c + 0.5) / (2 * side)) for r in range(side) for c in range(2 * side)]
    rows = base + hi + [(-1, -1, 0.5, 1.0)] * 2  # two newline tokens
    layout = torch.tensor([[r[0] for r in rows]])
    coords = torch.tensor([[(0.0, r[2], r[3]) for r in rows]])
    v = len(rows)
    vision = {"layout": layout, "image": torch.where(layout >= 0, 0, -1),
              "cell": torch.zeros(1, v, 2), (0, "cls"): early, (22, "cls"): late}
    return _ctx(torch.randn(1, v, 4), n_keep, vision=vision, coords=coords), layout[0].tolist()


def test_hired_matches_the_rule_by_hand():
    side, alpha, n_keep = 4, 0.5, 13
    gen = torch.Generator().manual_seed(1)
    v = side * side * 3 + 2
    early, late = torch.rand(1, v, generator=gen), torch.rand(1, v, generator=gen)
    early[0, : side * side] = 0.0
    early[0, [1, 2, 4, 5, 6]] = 1.0  # the early layer's top base tokens lie in the left half: tile 1
    sc, _ = _installed("hired", {"alpha": alpha})
    ctx, layout = _hired_ctx(side, early, late, n_keep)
    kept = sorted(sc(ctx)[0].argsort(descending=True, stable=True)[:n_keep].tolist())
    # by hand: base gets int(13 * 0.5) = 6; the tiles 7, split by where the top int(16 * 0.5) = 8 early base
    # tokens fall (nearest high-res token); leftovers by late attention; newlines never
    e, lt = early[0].tolist(), late[0].tolist()
    base = [j for j in range(v) if layout[j] == 0]
    top = lambda js, k: sorted(js, key=lambda j: (-lt[j], j))[:k]  # noqa: E731
    want = set(top(base, 6))
    top_early = sorted(base, key=lambda j: (-e[j], j))[:8]
    owner = [1 if (j % side + 0.5) / side < 0.5 else 2 for j in top_early]  # left half of the image -> tile 1
    for t in (1, 2):
        want |= set(top([j for j in range(v) if layout[j] == t], int(owner.count(t) / 8 * 7)))
    rest = [j for j in range(v) if j not in want and layout[j] >= 0]
    want |= set(top(rest, n_keep - len(want)))
    assert kept == sorted(want)
    assert sum(1 for j in kept if layout[j] == 0) >= 6 and not any(layout[j] == -1 for j in kept)


def test_hired_single_partition_is_top_k_of_the_late_layer(llava):
    ad, batch = llava
    att = _eager_attentions(ad, batch)
    n = att[0].shape[-1] - 1
    kept = _kept_at0(ad, batch, "hired", {})
    for b in range(2):
        late = [float(att[-2][b, :, 0, 1 + j].mean()) for j in range(n)]
        assert kept[b] == _top_by_hand(late, round(0.25 * n))


# ----------------------------------------------------------------------------- parameters
@pytest.mark.parametrize(("name", "params", "needle"), [
    ("visionzip", {"contextual": 2.0}, "scorer.params.contextual=2.0 is outside [0, 1]"),
    ("visionzip", {"similarity": "keys"}, "scorer.params.similarity='keys' is not known: use one of vision_keys"),
    ("hiprune", {"alpha": "x"}, "scorer.params.alpha='x' is not a number"),
    ("hiprune", {"object_layer": 1.5}, "scorer.params.object_layer=1.5 is not an integer"),
    ("dart", {"image_pivots": 0}, "scorer.params.image_pivots=0 is outside [1, 256]"),
    ("transprune", {"iga": 1}, "scorer.params.iga=1 is not a boolean"),
    ("mmtok", {"text_temperature": 0.0}, "scorer.params.text_temperature=0.0 is outside"),
    ("sparsevlm", {"merge": True}, "scorer.params.merge is not a parameter of scorer 'sparsevlm'"),
    ("todre", {"k": 1}, "scorer.params.k is not a parameter of scorer 'todre' (known: none)"),
    ("hired", {"late_layer": -65}, "scorer.params.late_layer=-65 is outside [-64, 63]"),
])
def test_bad_params_are_refused_like_validate(name, params, needle):
    from schedsearch.schedule import Scorer

    with pytest.raises(ScheduleError, match=re.escape(needle)):
        Scorer(name=name, params=params)
    with pytest.raises(ScheduleError):
        build_scorer(name, params)
