"""Video inputs (issue 17): the Qwen video path, per-modality schedules, and one-line refusals.

Tiny random-init checkpoints of the real transformers classes (tests/conftest.py ``tiny_dir``); clips are built
from ``tiny_images`` frames. What is checked: video tokens are visual tokens (a schedule prunes them -- before
the fix a video batch ran unpruned), a keep-0.5 schedule keeps the rounding rule's count of each modality, cached
generate equals recompute, the model is unchanged after exit, and bad videos / video on a family without video
are one line.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from schedsearch.errors import CalibrationError, VideoError
from schedsearch.runtime import RuntimeScheduleError, apply_schedule
from schedsearch.schedule import kept_counts
from schedsearch.testing.tiny import schedule_for, tiny_images
from schedsearch.video import Video, load_video

VIDEO_FAMILIES = ("qwen2_5_vl", "qwen3_vl")
_ADAPTERS: dict = {}


@pytest.fixture(scope="module", params=VIDEO_FAMILIES)
def vad(request, tiny_dir):
    from schedsearch.models import load_model

    if request.param not in _ADAPTERS:
        _ADAPTERS[request.param] = load_model(tiny_dir(request.param))
    return _ADAPTERS[request.param]


def _clip(seed=1, n=4, fps=2.0) -> Video:
    frames = tiny_images(n, seed=seed)
    return Video(tuple(frames), tuple(i / fps for i in range(n)), fps)


def _batch(ad, kind: str, prompts=("what moves?",)):
    if kind == "video":
        return ad.prepare([[] for _ in prompts], list(prompts), videos=[[_clip()] for _ in prompts])
    img = tiny_images(1, seed=5)[0]
    return ad.prepare([[img] for _ in prompts], list(prompts), videos=[[_clip()] for _ in prompts])


def _hooks(model) -> dict:
    return {name: (tuple(m._forward_pre_hooks), tuple(m._forward_hooks)) for name, m in model.named_modules()}


def _suppress(ad):
    return sorted(set(ad.processor.tokenizer.all_special_ids))


@pytest.mark.parametrize("kind", ["video", "mixed"])
@torch.no_grad()
def test_video_tokens_are_visual_and_pruned_per_modality(vad, kind):
    ad = vad
    batch = _batch(ad, kind, ("what moves?", "which shape appears first?"))
    mod = ad.modality_mask(batch["input_ids"])
    assert torch.equal(mod, batch["mm_token_type_ids"].long())  # what the model itself uses for positions
    n_img, n_vid = int((mod[0] == 1).sum()), int((mod[0] == 2).sum())
    assert n_vid > 0 and (n_img > 0) == (kind == "mixed")
    ref = ad.model(**batch).logits
    state = {k: v.clone() for k, v in ad.model.state_dict().items()}
    hooks = _hooks(ad.model)
    n = ad.num_layers
    half = [1.0] + [0.5] * (n - 1)
    # one ratio for all visual tokens: the total follows the rounding rule on image + video tokens
    with apply_schedule(ad.model, schedule_for(ad, half, scorer="uniform", params={}), adapter=ad) as h:
        one = ad.model(**batch).logits
        assert h.kept_indices[1].shape[1] == batch["input_ids"].shape[1] - (n_img + n_vid) + \
            kept_counts(half, n_img + n_vid)[1]
    assert not torch.allclose(one[:, -1], ref[:, -1])  # video tokens were pruned (before issue 17 they were not)
    # per modality (schema 1.4): video at 0.5 from layer 1, images at 0.75 from layer 2
    img_r = [1.0, 1.0] + [0.75] * (n - 2)
    sched = schedule_for(ad, [1.0] * n, scorer="random", params={"seed": 3}).replace(
        modality_keep_ratios={"video": half, "image": img_r})
    with apply_schedule(ad.model, sched, adapter=ad) as h:
        pruned = ad.model(**batch).logits
        for layer in range(n):
            if layer not in h.kept_indices:
                continue
            alive = mod.gather(1, h.kept_indices[layer])
            for code, ratios, count in ((1, img_r, n_img), (2, half, n_vid)):
                assert (alive == code).sum(1).tolist() == [kept_counts(ratios, count)[layer]] * 2, (layer, code)
    assert not torch.allclose(pruned[:, -1], ref[:, -1])
    assert _hooks(ad.model) == hooks
    assert torch.equal(ad.model(**batch).logits, ref)
    for k, v in ad.model.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("kind", ["video", "mixed"])
@torch.no_grad()
def test_cached_generate_equals_recompute_on_video(vad, kind):
    ad = vad
    n = ad.num_layers
    sched = schedule_for(ad, [1.0] + [0.5] * (n - 1), scorer="uniform", params={}).replace(
        modality_keep_ratios={"video": [0.5] * (n - 1) + [0.25]})
    batch = _batch(ad, kind)
    steps = 3
    with apply_schedule(ad.model, sched, adapter=ad):
        out = ad.model.generate(**batch, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                suppress_tokens=_suppress(ad), output_logits=True, return_dict_in_generate=True)
        plen = batch["input_ids"].shape[1]
        for s in range(steps):
            seq = out.sequences[:, : plen + s]
            full = dict(batch)
            full["input_ids"] = seq
            full["attention_mask"] = torch.ones_like(seq)
            grown = torch.zeros_like(seq[:, plen:]).to(batch["mm_token_type_ids"].dtype)
            full["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], grown], dim=1)
            logits = ad.model(**full, use_cache=False).logits[:, -1]
            torch.testing.assert_close(logits, out.logits[s], atol=1e-4, rtol=1e-4)


def test_video_patches_follow_the_stock_layout(vad):
    """The stand-in's pixel_values_videos equal the stock Qwen2VLVideoProcessor.patchify formula (transformers
    video_processing_qwen2_vl.py) applied to the frames the image processor resizes and normalises."""
    ad = vad
    clip = _clip(n=3)  # odd: padded with the last frame
    batch = ad.prepare([[]], ["x"], videos=[[clip]])
    proc = ad.processor.image_processor
    ps, m, tps = proc.patch_size, proc.merge_size, proc.temporal_patch_size
    frames = list(clip.frames) + [clip.frames[-1]]
    per = np.asarray(proc(images=frames, return_tensors="np")["pixel_values"], np.float32)
    gt, gh, gw = batch["video_grid_thw"][0].tolist()
    c = per.shape[1] // (tps * ps * ps)
    # undo the image patchify to get normalised frames (T, C, H, W), then the stock video patchify
    img = per.reshape(len(frames), gh // m, gw // m, m, m, c, tps, ps, ps)[:, :, :, :, :, :, 0]
    img = img.transpose(0, 5, 1, 3, 6, 2, 4, 7).reshape(len(frames), c, gh * ps, gw * ps)
    v = torch.from_numpy(np.ascontiguousarray(img))[None]
    v = v.view(1, gt, tps, c, gh // m, m, ps, gw // m, m, ps).permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    stock = v.reshape(gt * gh * gw, c * tps * ps * ps)
    assert gt == 2
    torch.testing.assert_close(batch["pixel_values_videos"].float(), stock)
    if ad.family == "qwen2_5_vl":
        assert batch["second_per_grid_ts"].tolist() == [pytest.approx(tps / clip.fps)]


def test_visual_coords_and_time_cover_video(vad):
    ad = vad
    batch = _batch(ad, "mixed")
    coords, time = ad.visual_coords(batch), ad.visual_time(batch)
    mod = ad.modality_mask(batch["input_ids"])[0]
    kinds = mod[mod > 0]
    assert coords.shape[:2] == time.shape[:2] == (1, len(kinds))
    assert (time[0, kinds == 1, 0] == -1).all() and (time[0, kinds == 2, 0] == 0).all()
    frames = time[0, kinds == 2, 1]
    assert frames.unique().tolist() == [0, 1]  # 4 frames, temporal patch 2
    # each temporal patch is its own item with the same cell grid
    vc = coords[0, kinds == 2]
    assert vc[frames == 0, 0].unique().numel() == 1 and vc[frames == 1, 0].unique().numel() == 1
    assert torch.equal(vc[frames == 0, 1:], vc[frames == 1, 1:])


# ------------------------------------------------------------------ refusals (one line, file named)
def test_family_without_video_refuses(tiny_dir):
    from schedsearch.models import load_model

    ad = load_model(tiny_dir("llava"))
    with pytest.raises(VideoError, match="llava family takes no video"):
        ad.prepare([[]], ["x"], videos=[[_clip()]])
    batch = ad.prepare([[tiny_images(1)[0]]], ["x"])
    batch["pixel_values_videos"] = torch.zeros(1)
    with apply_schedule(ad.model, schedule_for(ad, [0.5] * ad.num_layers, scorer="uniform", params={}),
                        adapter=ad), pytest.raises(RuntimeScheduleError, match="pixel_values_videos"):
        ad.model(**batch)


def _frames_dir(tmp_path, name, sizes):
    d = tmp_path / name
    d.mkdir()
    for i, s in enumerate(sizes):
        tiny_images(1, size=s, seed=i)[0].save(d / f"{i:03d}.png")
    return d


def _mp4(path, n=6, size=(32, 32)):
    import av

    with av.open(str(path), "w") as out:
        st = out.add_stream("mpeg4", rate=4)
        st.width, st.height = size
        st.pix_fmt = "yuv420p"
        for i in range(n):
            arr = np.full((size[1], size[0], 3), 20 * i, np.uint8)
            for pkt in st.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                out.mux(pkt)
        for pkt in st.encode():
            out.mux(pkt)
    return path


def test_load_video_folder_and_file(tmp_path):
    d = _frames_dir(tmp_path, "clip", [(24, 24)] * 10)
    v = load_video(d, frames=4)
    assert len(v) == 4 and v.size == (24, 24) and v.timestamps == (1.0, 3.0, 6.0, 8.0)
    v2 = load_video(d, frames=3, fps=0.5, folder_fps=1.0)
    assert v2.timestamps == (0.0, 2.0, 4.0)
    pytest.importorskip("av")
    f = _mp4(tmp_path / "c.mp4", n=8)
    v3 = load_video(f, frames=4)
    assert len(v3) == 4 and v3.size == (32, 32)
    grey = [np.asarray(fr).mean() for fr in v3.frames]
    assert grey == sorted(grey) and grey[-1] > grey[0] + 40  # later frames are brighter: sampled in order


@pytest.mark.parametrize("case", ["missing", "empty_dir", "empty_file", "corrupt", "sizes", "not_frames"])
def test_bad_videos_are_one_line_naming_the_file(tmp_path, case):
    if case == "missing":
        path = tmp_path / "nope.mp4"
    elif case == "empty_dir":
        path = tmp_path / "clip"
        path.mkdir()
    elif case == "empty_file":
        path = tmp_path / "e.mp4"
        path.write_bytes(b"")
    elif case == "corrupt":
        pytest.importorskip("av")
        path = tmp_path / "c.mp4"
        path.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    elif case == "sizes":
        path = _frames_dir(tmp_path, "clip", [(24, 24), (24, 24), (32, 24)])
    else:
        path = tmp_path / "clip"
        path.mkdir()
        (path / "0.png").write_bytes(b"not a png")
    with pytest.raises(VideoError) as ei:
        load_video(path, frames=8)
    msg = str(ei.value)
    assert "\n" not in msg and str(path) in msg


def test_manifest_with_videos(tmp_path):
    _frames_dir(tmp_path, "clip", [(24, 24)] * 6)
    tiny_images(1)[0].save(tmp_path / "a.png")
    lines = [{"video": "clip", "prompt": "what moves?", "frames": 4},
             {"image": "a.png", "video": "clip", "prompt": "and now?"}]
    (tmp_path / "manifest.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    from schedsearch.calibration import calibration_hash, load_manifest

    s = load_manifest(tmp_path, video_frames=2)
    assert [len(x.videos[0]) for x in s] == [4, 2] and s[1].images
    h = calibration_hash(s)
    (tmp_path / "clip" / "000.png").unlink()
    assert calibration_hash(load_manifest(tmp_path)) != h
    _frames_dir(tmp_path, "bad", [(24, 24), (30, 24)])
    (tmp_path / "manifest.jsonl").write_text(json.dumps({"video": "bad", "prompt": "x"}) + "\n")
    with pytest.raises(CalibrationError, match=r"manifest.jsonl:1: video .*bad: frames have different sizes"):
        load_manifest(tmp_path)


@torch.no_grad()
def test_flops_and_budget_count_each_modality(vad):
    """The FLOPs/KV model counts what the runtime keeps: image and video tokens on their own ratios."""
    from schedsearch.evaluation import token_counts
    from schedsearch.flops import DecoderShape, budget_report, visual_layer_counts

    ad = vad
    n = ad.num_layers
    batch = _batch(ad, "mixed")
    mods = {"video": [1.0] + [0.25] * (n - 1), "image": [1.0, 1.0] + [0.5] * (n - 2)}
    sched = schedule_for(ad, [1.0] * n, scorer="uniform", params={}).replace(modality_keep_ratios=mods)
    (n_text, n_vis, n_vid), = token_counts(ad, [batch], video=True)
    assert n_vid == int((batch["mm_token_type_ids"] == 2).sum())
    expect = visual_layer_counts(sched.keep_ratios, n_vis, n_vid, sched.modality_keep_ratios)
    vis = ad.visual_mask(batch["input_ids"])
    with apply_schedule(ad.model, sched, adapter=ad) as h:
        ad.model(**batch)
        alive = [int(vis.gather(1, h.kept_indices[l]).sum()) if l in h.kept_indices else n_vis for l in range(n)]
    assert alive == expect
    shape = DecoderShape.from_config(ad.text_config)
    rep = budget_report(shape, [(n_text, n_vis, n_vid)], sched.keep_ratios, modality_ratios=mods)
    only_img = budget_report(shape, [(n_text, n_vis, n_vid)], sched.keep_ratios,
                             modality_ratios={"image": mods["image"]})
    assert rep.flops_ratio < only_img.flops_ratio < 1.0
    assert rep.token_ratio == pytest.approx(sum(expect) / (n * n_vis))


# ------------------------------------------------------------------ video rankings (evs, holitom, vidcom2)
def _vctx(states: torch.Tensor, frames: int, side: int, n_keep: int, n_keep_modality=None):
    """A ScoreContext over one clip of ``frames`` x ``side``^2 video tokens (B, V, D) and nothing else."""
    from schedsearch.runtime.scorers.base import ScoreContext

    bsz, v, _ = states.shape
    assert v == frames * side * side
    t = torch.arange(frames).repeat_interleave(side * side)
    cell = torch.arange(side * side).repeat(frames)
    coords = torch.stack([t.float(), (cell // side + 0.5).float() / side, (cell % side + 0.5).float() / side], -1)
    time = torch.stack([torch.zeros_like(t), t], -1)
    idx = torch.arange(v).expand(bsz, v)
    return ScoreContext(layer=None, layer_idx=0, hidden_states=states, cos=None, sin=None,
                        key_valid=torch.ones(bsz, v, dtype=torch.bool), visual_local=idx, visual_orig=idx,
                        text_mask=torch.zeros(bsz, v, dtype=torch.bool), n_keep=n_keep, head_dim=4, num_heads=1,
                        num_kv_heads=1, coords=coords.expand(bsz, v, 3), time=time.expand(bsz, v, 2),
                        modality=torch.full((bsz, v), 2), n_keep_modality=n_keep_modality)


def test_evs_is_the_reference_dissimilarity():
    from schedsearch.runtime.scorers import build_scorer

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3 * 4, 8, generator=g)
    x[0, 4:8] = x[0, 0:4] + 0.01 * torch.randn(4, 8, generator=g)  # frame 1 ~ frame 0 ...
    x[0, 5] = torch.randn(8, generator=g)  # ... except cell 1, which changed
    s = build_scorer("evs")(_vctx(x, 3, 2, 6))
    assert (s[0, :4] == 255).all()  # the first frame is kept first, as the reference does
    ref = 1 - torch.nn.functional.cosine_similarity(x[0, 4:], x[0, :-4], dim=-1)  # vs the same cell a frame earlier
    torch.testing.assert_close(s[0, 4:], ref.clamp(min=0))
    assert int(s[0, 4:8].argmax()) == 1  # the changed cell outranks the static ones of its frame


def test_holitom_segments_and_merges_static_cells_over_time():
    from schedsearch.runtime.scorers import build_scorer
    from schedsearch.runtime.scorers.holitom import segment

    # 4 frames, 2 positions: position 0 static across frames 0-2, frame 3 different everywhere
    static = torch.tensor([[True, False], [True, False], [False, False]])
    assert segment(static, 8) == [(0, 2), (3, 3)]
    assert segment(static, 2) == [(0, 1), (2, 2), (3, 3)]  # windows capped at 2 frames
    g = torch.Generator().manual_seed(1)
    base = torch.randn(4, 8, generator=g)
    x = torch.randn(1, 4 * 4, 8, generator=g)
    for f in range(3):  # cell 0 nearly constant over frames 0..2
        x[0, f * 4] = base[0] + 0.01 * f
    sc = build_scorer("holitom", {"tau": 0.9})
    ctx = _vctx(x, 4, 2, 10)
    s = sc(ctx)
    assert s[0, 0] >= 1 and s[0, 4] < 0.2 and s[0, 8] < 0.2  # head of the static window first, members last
    order = torch.argsort(s, descending=True, stable=True)[:, :10]
    keep = torch.zeros(1, 16, dtype=torch.bool).scatter_(1, order, True)
    assert not keep[0, 4] and not keep[0, 8] and keep[0, 0]
    merged = sc.merge(ctx, keep, s)
    torch.testing.assert_close(merged[0, 0], x[0, [0, 4, 8]].mean(0))  # the static position's window mean


def test_vidcom2_gives_distinct_frames_more_tokens():
    from schedsearch.runtime.scorers import build_scorer

    g = torch.Generator().manual_seed(2)
    same = torch.randn(9, 16, generator=g)
    x = torch.cat([same, same + 0.01 * torch.randn(9, 16, generator=g), 3 * torch.randn(9, 16, generator=g),
                   same])[None]  # frames 0, 1, 3 alike; frame 2 different
    s = build_scorer("vidcom2")(_vctx(x, 4, 3, 12, {2: 12}))
    top = torch.argsort(s[0], descending=True, stable=True)[:12]
    per_frame = torch.bincount(top // 9, minlength=4).tolist()
    assert sum(per_frame) == 12 and per_frame[2] == max(per_frame) and per_frame[2] > 3, per_frame
    assert (s[0, top] >= 2).all() and (s[0][s[0] < 2] <= 1).all()  # the quotas are exactly the top 12


@pytest.mark.parametrize("scorer", ["evs", "holitom", "vidcom2"])
@torch.no_grad()
def test_video_rankings_keep_the_count_and_generate_consistently(vad, scorer):
    ad = vad
    n = ad.num_layers
    sched = schedule_for(ad, [1.0] * n, scorer=scorer, params={}).replace(
        modality_keep_ratios={"video": [0.5] * (n - 1) + [0.25], "image": [0.75] * n})
    batch = _batch(ad, "mixed", ("what moves?", "which shape appears first?"))
    mod = ad.modality_mask(batch["input_ids"])
    n_img, n_vid = int((mod[0] == 1).sum()), int((mod[0] == 2).sum())
    ref = ad.model(**batch).logits[:, -1]
    with apply_schedule(ad.model, sched, adapter=ad) as h:
        out = ad.model(**batch).logits[:, -1]
        for layer, idx in h.kept_indices.items():
            alive = mod.gather(1, idx)
            assert (alive == 2).sum(1).tolist() == [kept_counts(sched.modality_keep_ratios["video"], n_vid)[layer]] * 2
            assert (alive == 1).sum(1).tolist() == [kept_counts(sched.modality_keep_ratios["image"], n_img)[layer]] * 2
        gen = ad.model.generate(**_batch(ad, "video"), max_new_tokens=3, min_new_tokens=3, do_sample=False,
                                suppress_tokens=_suppress(ad), output_logits=True, return_dict_in_generate=True)
        one = _batch(ad, "video")
        plen = one["input_ids"].shape[1]
        full = dict(one)
        seq = gen.sequences[:, : plen + 2]
        full.update(input_ids=seq, attention_mask=torch.ones_like(seq),
                    mm_token_type_ids=torch.cat([one["mm_token_type_ids"], torch.zeros_like(seq[:, plen:])], 1))
        torch.testing.assert_close(ad.model(**full, use_cache=False).logits[:, -1], gen.logits[2], atol=1e-4, rtol=1e-4)
    assert torch.isfinite(out).all() and not torch.allclose(out, ref)
    assert torch.equal(ad.model(**batch).logits[:, -1], ref)


# ------------------------------------------------------------------ command line
def _video_manifest(tmp_path, n=4, name="manifest.jsonl", **extra):
    lines = []
    for i in range(n):
        _frames_dir(tmp_path, f"clip{i}", [(24, 24)] * 4)
        lines.append(json.dumps({"video": f"clip{i}", "prompt": f"what moves in clip {i}?", **extra}))
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.slow
def test_optimize_and_evaluate_on_the_toy_video_set(tmp_path, monkeypatch, capsys):
    """`schedsearch optimize --scorer evs` and `evaluate` on the shipped toy model and toy video calibration set."""
    from pathlib import Path

    from schedsearch.cli import main

    calib = Path(__file__).resolve().parents[1] / "calibration_data" / "toy_video"
    monkeypatch.chdir(tmp_path)
    rc = main(["optimize", "--model", "toy", "--calibration", str(calib), "--budget", "0.3", "--trials", "3",
               "--scorer", "evs", "--out", "evs.json", "--study", "v"])
    assert rc == 0, capsys.readouterr().err
    sched = json.loads((tmp_path / "evs.json").read_text())
    assert sched["scorer"]["name"] == "evs" and sched["budget"]["achieved"] <= 0.3 + 1e-9
    capsys.readouterr()
    rc = main(["evaluate", "evs.json", "--model", "toy", "--calibration", str(calib), "--json", "--no-timing"])
    assert rc == 0
    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rep["n_samples"] == 16 and rep["n_visual_mean"] == 512 and rep["flops_ratio"] <= 0.3 + 1e-9
    assert rep["discrepancy"] > 0.0


@pytest.mark.parametrize("case", ["corrupt", "empty", "zero_frames", "sizes", "no_video_family"])
def test_bad_video_on_the_command_line_is_one_line(tiny_dir, tmp_path, case):
    import subprocess
    import sys

    from schedsearch.models import load_model

    family = "llava" if case == "no_video_family" else "qwen2_5_vl"
    d = tiny_dir(family)
    ad = load_model(str(d))
    sched = tmp_path / "s.json"
    schedule_for(ad, [0.5] * ad.num_layers, scorer="uniform", params={}).save(sched)
    manifest = _video_manifest(tmp_path, 2)
    bad = {"corrupt": tmp_path / "bad.mp4", "empty": tmp_path / "empty.mp4", "zero_frames": tmp_path / "clip0",
           "sizes": tmp_path / "clip1", "no_video_family": tmp_path / "clip0"}[case]
    if case == "corrupt":
        bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    elif case == "empty":
        bad.write_bytes(b"")
    elif case == "zero_frames":
        for f in bad.iterdir():
            f.unlink()
    elif case == "sizes":
        tiny_images(1, size=(30, 24))[0].save(bad / "009.png")
    if case in ("corrupt", "empty"):
        manifest.write_text(json.dumps({"video": bad.name, "prompt": "x"}) + "\n")
    proc = subprocess.run([sys.executable, "-m", "schedsearch", "evaluate", str(sched), "--model", str(d),
                           "--calibration", str(manifest), "--no-timing"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(err) == 1, proc.stderr
    assert err[0].startswith("error:") and str(bad) in err[0] and "Traceback" not in proc.stderr


# ------------------------------------------------------------------ the toy video task
def test_toy_video_questions_need_the_frame_they_say(tmp_path):
    """appear: the asked object is only in the last frame (yes) or in none (no); vanish: only in the first; count
    and spatial clips are static. Writing a dataset is byte-identical for a seed."""
    import hashlib

    from schedsearch.toy.video import FRAMES, VIDEO_QTYPES, sample_clip, write_video_dataset

    seen = set()
    for i in range(40):
        frames, q, (before, after) = sample_clip(2, i)
        seen.add(q["qtype"])
        assert len(frames) == FRAMES and frames[0].size == frames[-1].size
        names = lambda s: {f"{o.colour} {o.shape}" for o in s.objects}  # noqa: E731
        asked = q["prompt"].removeprefix("is there a ").removesuffix(" ?")
        if q["qtype"] in ("appear", "vanish"):
            first, last = asked in names(before), asked in names(after)
            if q["answer"] == "yes":
                assert (first, last) == ((False, True) if q["qtype"] == "appear" else (True, False)), q
            else:
                assert not first and not last, q
            assert np.asarray(frames[0]).tobytes() != np.asarray(frames[-1]).tobytes()
        else:
            assert before is after and np.asarray(frames[0]).tobytes() == np.asarray(frames[-1]).tobytes()
    assert seen == set(VIDEO_QTYPES)

    def digest(d):
        return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file())).hexdigest()

    write_video_dataset(tmp_path / "a", 6, seed=3)
    write_video_dataset(tmp_path / "b", 6, seed=3)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")


@pytest.mark.slow
@torch.no_grad()
def test_every_scorer_on_a_video_batch_prunes_or_refuses_in_one_line(vad):
    """As tests/test_scorer_matrix.py, on an image + video batch: each registered ranking keeps the contract's
    count of visual tokens at every layer or refuses with one line (e.g. vision-map rankings, whose maps are
    recorded per encoder run, on a batch that runs the encoder twice)."""
    from schedsearch.errors import SchedsearchError
    from schedsearch.scorer_specs import SCORERS

    ad = vad
    batch = _batch(ad, "mixed", ("what moves?", "which shape appears first?"))
    n_vis = int(ad.visual_mask(batch["input_ids"])[0].sum())
    n = ad.num_layers
    ratios = [1.0] + [0.5] * (n - 2) + [0.25]
    ran, refused = [], {}
    for name in [s for s in SCORERS if s != "external"]:
        sched = {"keep_ratios": ratios, "scorer": {"name": name, "params": {}}, "recycling": None}
        try:
            with apply_schedule(ad.model, sched, adapter=ad) as h:
                out = ad.model(**batch).logits[:, -1]
                kept = {layer: idx for layer, idx in h.kept_indices.items()}
        except SchedsearchError as err:
            assert "\n" not in str(err), (name, str(err))
            refused[name] = str(err)
            continue
        assert torch.isfinite(out).all(), name
        vis = ad.visual_mask(batch["input_ids"])
        for layer, idx in kept.items():
            assert vis.gather(1, idx).sum(1).tolist() == [kept_counts(ratios, n_vis)[layer]] * 2, (name, layer)
        ran.append(name)
    assert {"uniform", "random", "last_token_attention", "diverse", "evs", "holitom", "vidcom2"} <= set(ran), refused


# ------------------------------------------------------------------ schema 1.4: modality_keep_ratios
def test_modality_keep_ratios_round_trip_and_refusals(tmp_path):
    from schedsearch.errors import ScheduleError
    from schedsearch.schedule import Schedule, load_schedule, modality_kept_counts

    class _Ad:
        family, name_or_path, num_layers = "qwen2_5_vl", "x", 4

        def fingerprint(self):
            return "f"

    base = schedule_for(_Ad(), [1.0, 0.5, 0.5, 0.25], scorer="uniform", params={})
    assert "modality_keep_ratios" not in base.to_dict()  # older files are written back unchanged
    s = base.replace(modality_keep_ratios={"video": [0.5, 0.5, 0.25, 0.1]})
    s.save(tmp_path / "s.json")
    back = load_schedule(tmp_path / "s.json")
    assert back == s and back.to_json() == (tmp_path / "s.json").read_text()
    assert back.modality_kept_counts(n_image=10, n_video=20) == {"image": [10, 5, 5, 3], "video": [10, 10, 5, 2]}
    assert base.modality_kept_counts(n_image=10, n_video=20) == [30, 15, 15, 8]  # one ratio for all
    assert modality_kept_counts([1.0] * 2, {}, {"image": 3, "video": 4}) == [7, 7]
    for bad, why in [({"audio": [1.0] * 4}, "key='audio' is not known"),
                     ({"video": [1.0] * 3}, "has 3 entries but keep_ratios has 4"),
                     ({"video": [0.5, 0.6, 0.5, 0.5]}, "non-increasing"),
                     ({"video": [1.0, 1.0, 1.0, 1.5]}, "outside [0, 1]"),
                     ([0.5], "must be a JSON object")]:
        data = base.to_dict()
        data["modality_keep_ratios"] = bad
        (tmp_path / "b.json").write_text(json.dumps(data))
        with pytest.raises(ScheduleError, match=why.replace("[", r"\[").replace("]", r"\]")) as ei:
            load_schedule(tmp_path / "b.json")
        assert "\n" not in str(ei.value)
    assert isinstance(Schedule.from_dict(base.to_dict()), Schedule)


@torch.no_grad()
def test_qwen2_vl_video_is_pruned_per_modality(tiny_dir):
    """Qwen2-VL (no second_per_grid_ts): a video batch runs, and a keep-0.5 video schedule keeps the rule's count."""
    from schedsearch.models import load_model

    ad = load_model(tiny_dir("qwen2_vl"))
    batch = _batch(ad, "mixed")
    assert "second_per_grid_ts" not in batch
    mod = ad.modality_mask(batch["input_ids"])
    n_vid = int((mod[0] == 2).sum())
    n = ad.num_layers
    sched = schedule_for(ad, [1.0] * n, scorer="uniform", params={}).replace(
        modality_keep_ratios={"video": [0.5] * n})
    ref = ad.model(**batch).logits[:, -1]
    with apply_schedule(ad.model, sched, adapter=ad) as h:
        out = ad.model(**batch).logits[:, -1]
        assert int((mod.gather(1, h.kept_indices[0]) == 2).sum()) == kept_counts([0.5], n_vid)[0]
        assert int((mod.gather(1, h.kept_indices[0]) == 1).sum()) == int((mod[0] == 1).sum())
    assert not torch.allclose(out, ref)


# ------------------------------------------------------------------ ragged batches with video (issue 17 part 5)
@pytest.mark.parametrize("scorer", ["uniform", "last_token_attention", "diverse", "evs", "holitom", "vidcom2"])
@pytest.mark.parametrize("per_modality", [False, True])
@torch.no_grad()
def test_ragged_image_and_video_batch_equals_each_sample_alone(vad, scorer, per_modality):
    """One batch of an image-only, a video-only and an image+video sample (different visual-token counts and
    modality splits): each sample keeps the tokens it keeps alone, by the schedule's rounding rule per modality,
    and its last-token logits equal those of the sample run alone."""
    ad = vad
    img = tiny_images(1, seed=5)[0]
    imgs, vids = [[img], [], [img]], [[], [_clip()], [_clip(seed=2)]]
    prompts = ["what is it ?", "what moves ?", "which shape appears first ?"]
    n = ad.num_layers
    ratios = [1.0] + [0.5] * (n - 2) + [0.25]
    sched = {"keep_ratios": ratios, "scorer": {"name": scorer, "params": {}}, "recycling": None}
    if per_modality:
        sched["modality_keep_ratios"] = {"image": [1.0] * (n - 1) + [0.5], "video": [1.0] + [0.25] * (n - 1)}
    batch = ad.prepare(imgs, prompts, videos=vids)
    mod = ad.modality_mask(batch["input_ids"])
    assert len(set((mod > 0).sum(1).tolist())) == 3  # really ragged
    with apply_schedule(ad.model, sched, adapter=ad) as h:
        out = ad.model.generate(**batch, max_new_tokens=1, do_sample=False, output_logits=True,
                                return_dict_in_generate=True).logits[0]
        kept = {layer: idx.clone() for layer, idx in h.kept_indices.items()}
        for i in range(3):
            one = ad.prepare([imgs[i]], [prompts[i]], videos=[vids[i]])
            alone = ad.model(**one).logits[0, -1]
            m1 = ad.modality_mask(one["input_ids"])[0]
            for layer, idx in h.kept_indices.items():
                row = kept[layer][i]
                row = row[row >= 0]
                got = mod[i][row]
                exp = m1[idx[0]]
                for code, name in ((1, "image"), (2, "video")):
                    assert int((got == code).sum()) == int((exp == code).sum()), (scorer, i, layer, name)
                    total = int((m1 == code).sum())
                    rule = sched.get("modality_keep_ratios", {}).get(name, ratios) if per_modality else None
                    if rule is not None and total:
                        assert int((got == code).sum()) == kept_counts(rule, total)[layer], (scorer, i, layer)
            assert float((alone - out[i]).abs().max()) <= 1e-4, (scorer, i)


def _holitom_merge_loop(h, keep, heads, frames, beta):
    """HoliTom's merge written as the plain per-token / per-target loop (one sample)."""
    x = torch.nn.functional.normalize(h, dim=-1)
    out = h.clone()
    target = torch.full((h.shape[0],), -1, dtype=torch.long)
    static = (heads >= 0) & ~keep & keep[heads.clamp(min=0)]
    target[static] = heads[static]
    for i in (~keep & ~static).nonzero().squeeze(1).tolist():
        cand = (keep & (frames == frames[i])).nonzero().squeeze(1)
        if cand.numel():
            target[i] = cand[(x[cand] @ x[i]).argmax()]
    for t in target[target >= 0].unique().tolist():
        temporal, spatial = (target == t) & static, (target == t) & ~static
        acc = h[t]
        if bool(temporal.any()):
            acc = torch.cat([acc[None], h[temporal]]).mean(0)
        if bool(spatial.any()):
            acc = beta * acc + (1 - beta) * h[spatial].mean(0)
        out[t] = acc
    return out


@pytest.mark.parametrize("keep_n", [10, 40, 90])
def test_holitom_merge_equals_the_plain_loop(keep_n):
    """The vectorised merge (one index_add per sum) gives what the per-token loop gives."""
    from schedsearch.runtime.scorers.holitom import HoliTom, frame_ids

    g = torch.Generator().manual_seed(keep_n)
    frames, side = 4, 6
    base = torch.randn(2, side * side, 16, generator=g)
    states = torch.cat([base + 0.3 * (f % 2) * torch.randn(2, side * side, 16, generator=g) for f in range(frames)], 1)
    ctx = _vctx(states, frames, side, keep_n)
    scorer = HoliTom(tau=0.5)
    scores = scorer(ctx)
    order = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :keep_n]
    keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, order, True)
    merged = scorer.merge(ctx, keep, scores)
    heads = ctx.scratch["holitom_heads"]
    assert bool((heads >= 0).any())  # some static windows, so both merge kinds run
    for b in range(2):
        want = _holitom_merge_loop(states[b], keep[b], heads[b], frame_ids(ctx, b), scorer.beta)
        assert torch.allclose(merged[b], want, atol=1e-6)
