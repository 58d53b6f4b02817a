"""Vision-encoder maps (models/vision_maps.py + the adapters' vision_maps_hook / vision_token_maps) against the
attention weights the encoder itself returns with eager attention, on the tiny families."""

from __future__ import annotations

import pytest
import torch

from schedsearch.models.vision_maps import head_maps, stack_per_sample
from schedsearch.runtime.scorers.base import resolve_vision_layer
from schedsearch.testing.tiny import tiny_images

KINDS = frozenset({"cls", "received", "keys", "value_l1", "value_sim"})


def _batch(ad, n=2, seed=0):
    imgs = tiny_images(n, seed=seed)
    return ad.prepare([[im] for im in imgs], ["what is it?"] * n)


def _record(ad, batch, request):
    store: list = []
    handle = ad.vision_maps_hook(request, store)
    try:
        with torch.no_grad():
            ad.model(**batch)
    finally:
        handle.remove()
    return store


def test_head_maps_by_hand():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 5, 4, generator=gen) for _ in range(3))  # (H, n, hd)
    maps = head_maps(q, k, v, KINDS, 0.5, has_cls=True)
    for j in range(5):
        cls = sum(torch.softmax(q[h, 0] @ k[h].T * 0.5, 0)[j] for h in range(2)) / 2
        rec = sum(torch.softmax(q[h, i] @ k[h].T * 0.5, 0)[j] for h in range(2) for i in range(5)) / 10
        sim = sum(torch.softmax(v[h, 0] @ v[h].T, 0)[j] for h in range(2)) / 2
        assert maps["cls"][j].item() == pytest.approx(cls.item(), abs=1e-6)
        assert maps["received"][j].item() == pytest.approx(rec.item(), abs=1e-6)
        assert maps["value_sim"][j].item() == pytest.approx(sim.item(), abs=1e-6)
        assert maps["value_l1"][j].item() == pytest.approx(float(((v[0, j] + v[1, j]) / 2).abs().sum()), abs=1e-5)
    torch.testing.assert_close(maps["keys"], k.mean(0))
    no_cls = head_maps(q, k, v, frozenset({"cls", "value_sim"}), 0.5, has_cls=False)
    torch.testing.assert_close(no_cls["cls"], maps["received"])  # no [CLS]: the attention received
    ref = v.mean(dim=1, keepdim=True)
    torch.testing.assert_close(no_cls["value_sim"], torch.softmax(ref @ v.transpose(1, 2), -1)[:, 0].mean(0))


@pytest.mark.parametrize(("index", "depth", "glob", "want"), [
    (-2, 24, range(24), 22), (8, 24, range(24), 8), (-16, 2, range(2), 0), (40, 24, range(24), 23),
    (-2, 32, (7, 15, 23, 31), 31), (16, 32, (7, 15, 23, 31), 15), (19, 32, (7, 15, 23, 31), 23),
    (-2, 2, (1,), 1), (0, 2, (1,), 1),
])
def test_resolve_vision_layer(index, depth, glob, want):
    assert resolve_vision_layer(index, depth, tuple(glob)) == want


def test_stack_per_sample_checks_cover():
    maps = [torch.arange(3.0), torch.arange(3.0) + 10, torch.arange(2.0)]
    with pytest.raises(ValueError, match="use only 2"):
        stack_per_sample(maps, [3, 3])
    with pytest.raises(ValueError, match="cover 5 tokens but a sample has 4"):
        stack_per_sample(maps[1:], [4])
    out = stack_per_sample(maps[:2], [3, 3])
    assert out.tolist() == [[0, 1, 2], [10, 11, 12]]


@torch.no_grad()
def test_llava_maps_match_eager_attentions(tiny_dir):
    from schedsearch.models import load_model

    for fam in ("llava", "llava_next"):
        ad = load_model(tiny_dir(fam))
        ad.model.set_attn_implementation("eager")
        try:
            batch = _batch(ad)
            store = _record(ad, batch, {0: KINDS, 1: frozenset({"cls"})})
            out = ad.vision_tower(batch["pixel_values"].flatten(0, 1) if fam == "llava_next" else
                                  batch["pixel_values"], output_attentions=True)
            for layer in (0, 1):
                att = out.attentions[layer].float()  # (crops, H, 1 + P, 1 + P)
                if fam == "llava":  # one crop per image: crops of the tower == images
                    torch.testing.assert_close(store[-1][(layer, "cls")], att[:, :, 0, 1:].mean(1))
            if fam == "llava":
                want = out.attentions[0].float().mean(1).mean(1)[:, 1:]  # HiPrune's "global attention"
                torch.testing.assert_close(store[-1][(0, "received")], want)
            maps = ad.vision_token_maps(store, batch)
            vis = ad.visual_mask(batch["input_ids"])
            assert maps[(0, "cls")].shape == vis.shape[:1] + (int(vis[0].sum()),)
            assert maps[(0, "keys")].shape[-1] == ad.vision_tower.encoder.layers[0].self_attn.head_dim
            if fam == "llava_next":  # newline tokens: NaN maps, layout -1; base view 0 then tile 1
                layout = maps["layout"][0]
                assert set(layout.tolist()) == {-1, 0, 1}
                assert bool(maps[(0, "cls")][0][layout == -1].isnan().all())
                assert not bool(maps[(0, "cls")][0][layout >= 0].isnan().any())
                coords = ad.visual_coords(dict(batch))
                assert bool((coords[0][layout == -1][:, 2] > 0.99).all())  # newline = the line-end column
                base = out.attentions[0].float()[0, :, 0, 1:].mean(0)  # crop 0 of image 0 = its base view
                torch.testing.assert_close(maps[(0, "cls")][0][: base.numel()], base)
        finally:
            ad.model.set_attn_implementation("sdpa")


@torch.no_grad()
def test_qwen_received_matches_the_vflow_map(tiny_dir):
    """Qwen has no [CLS]: 'cls' is the attention received; per merged token it equals the VFlowOpt map's column
    mean (that map sums keys over a merged token's patches and averages queries) divided by the merge unit."""
    from schedsearch.models import load_model

    for fam in ("qwen2_5_vl", "qwen2_vl"):
        ad = load_model(tiny_dir(fam))
        depth, glob = ad.vision_encoder_layers()
        layer = glob[-1]
        batch = _batch(ad)
        store = _record(ad, batch, {layer: KINDS})
        maps = ad.vision_token_maps(store, batch)
        full = ad.vision_attention(batch, block=layer)  # per image (V_i, V_i)
        unit = ad.merge_size**2
        want = torch.stack([m.mean(0) / unit for m in full])
        torch.testing.assert_close(maps[(layer, "received")], want, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(maps[(layer, "cls")], maps[(layer, "received")])
        assert maps[(layer, "keys")].shape[:2] == want.shape
        assert maps["layout"].tolist() == torch.zeros_like(want, dtype=torch.long).tolist()


@torch.no_grad()
def test_geometry_agrees_with_visual_coords(tiny_adapter):
    """'cell' (integer grid cell), 'image' and 'layout' describe the same tokens visual_coords places."""
    ad = tiny_adapter
    depth, glob = ad.vision_encoder_layers()
    for size in ((112, 112), (112, 70)):  # a wide image: LLaVA-NeXT unpads the stitched tiles
        imgs = tiny_images(2, size=size, seed=1)
        batch = ad.prepare([[im] for im in imgs], ["what is it?"] * 2)
        maps = ad.vision_token_maps(_record(ad, batch, {glob[-1]: frozenset({"cls"})}), batch)
        coords = ad.visual_coords(dict(batch))
        spatial = maps["layout"] >= 0
        for b in range(coords.shape[0]):
            for view in set(maps["layout"][b][spatial[b]].clamp(max=1).tolist()):  # base view vs stitched tiles
                sel = spatial[b] & (maps["layout"][b].clamp(max=1) == view)
                cell, rc = maps["cell"][b][sel], coords[b][sel][:, 1:]
                cell = cell - cell.min(dim=0).values  # unpadding crops whole rows / columns of the stitched grid
                h, w = cell[:, 0].max() + 1, cell[:, 1].max() + 1  # grid size of the view
                torch.testing.assert_close(rc, torch.stack([(cell[:, 0] + 0.5) / h, (cell[:, 1] + 0.5) / w], -1))
            assert len(set(maps["image"][b].tolist()) - {-1}) == 1  # one image per sample here
