"""Measure a schedule on a model and a calibration set: budget, discrepancy and prefill time.

    report = evaluate_schedule(adapter, schedule, samples)

* budget: FLOPs / KV / layer-averaged token ratios from :mod:`schedsearch.flops` on the real
  token counts of the samples;
* discrepancy: mean over samples of ``1 - cos(h, h_pruned)`` where ``h`` is the last token's
  final-norm hidden state (VFlowOpt, arXiv 2508.05211, Sec. 3.4 maximises the cosine; we minimise
  its complement);
* prefill time: mean wall time of a full forward (vision encoder + decoder, ``use_cache=False``) with and
  without the schedule, timed by ``torch.utils.benchmark.Timer`` (warm-up, accelerator synchronization).

Samples are batched in order, whatever their image sizes and numbers of images (the runtime prunes ragged
batches, each sample as if alone), left-padded by the adapter's processor.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from schedsearch.flops import DecoderShape, budget_report
from schedsearch.runtime import apply_schedule


@dataclass(frozen=True)
class EvalReport:
    n_samples: int
    n_visual_mean: float
    n_text_mean: float
    flops_ratio: float
    kv_ratio: float
    token_ratio: float
    discrepancy: float  # mean 1 - cos of last-token final hidden state
    discrepancy_max: float
    prefill_ms_unpruned: float | None
    prefill_ms_pruned: float | None

    @property
    def prefill_speedup(self) -> float | None:
        if not self.prefill_ms_pruned or self.prefill_ms_unpruned is None:
            return None
        return self.prefill_ms_unpruned / self.prefill_ms_pruned

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["prefill_time_ratio"] = (self.prefill_ms_pruned / self.prefill_ms_unpruned
                                   if self.prefill_ms_pruned and self.prefill_ms_unpruned else None)
        d["prefill_speedup"] = self.prefill_speedup
        return d


def prepare_samples(adapter: Any, chunk: Sequence[Any]) -> Any:
    """``adapter.prepare`` for calibration samples: their images, and their videos when any has one."""
    with_video = [s for s in chunk if getattr(s, "video_paths", ())]
    if with_video and not getattr(adapter, "supports_video", False):
        from schedsearch.errors import VideoError

        s = with_video[0]
        raise VideoError(f"{s.source}: video {s.video_paths[0]}: the {adapter.family} family takes no video input "
                         "(video is supported on qwen2_vl, qwen2_5_vl, qwen3_vl, qwen3_vl_moe)")
    videos = [list(s.videos) for s in chunk] if with_video else None
    if videos is None:
        return adapter.prepare([list(s.images) for s in chunk], [s.prompt for s in chunk])
    return adapter.prepare([list(s.images) for s in chunk], [s.prompt for s in chunk], videos=videos)


def make_batches(adapter: Any, samples: Sequence[Any], batch_size: int = 8) -> list[Any]:
    """Left-padded batches of ``batch_size`` consecutive samples, in order. Samples of one batch may have different
    numbers of visual tokens (a ragged batch: the runtime gives each sample what it gives it alone)."""
    batch_size = max(1, int(batch_size))
    batches = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        batches.append(prepare_samples(adapter, chunk))
    return batches


def token_counts(adapter: Any, batches: Iterable[Any], video: bool = False) -> list[tuple[int, ...]]:
    """(n_text, n_visual) per sample, padding excluded; with ``video``: (n_text, n_visual, n_video)."""
    out = []
    for b in batches:
        mod = adapter.modality_mask(b["input_ids"])
        vis = mod > 0
        real = b["attention_mask"].bool() if "attention_mask" in b else torch.ones_like(vis)
        for i in range(vis.shape[0]):
            n_vis = int(vis[i].sum())
            row = (int(real[i].sum()) - n_vis, n_vis)
            out.append(row + (int((mod[i] == 2).sum()),) if video else row)
    return out


@torch.no_grad()
def last_token_states(adapter: Any, batches: Sequence[Any], schedule: Any = None, importance: Any = None
                      ) -> torch.Tensor:
    """(S, D) last-token final-norm hidden states, with ``schedule`` applied when given."""
    outs = []
    for b in batches:
        if schedule is None:
            outs.append(adapter.last_hidden_state(b).float())
        else:
            with apply_schedule(adapter.model, schedule, adapter=adapter, importance=importance):
                outs.append(adapter.last_hidden_state(b).float())
    return torch.cat(outs)


def cosine_discrepancy(ref: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """Per-sample 1 - cos(ref, pruned)."""
    return 1.0 - torch.nn.functional.cosine_similarity(ref.float(), pruned.float(), dim=-1)


def time_prefill(adapter: Any, batches: Sequence[Any], schedule: Any, repeats: int = 3) -> tuple[float, float]:
    """Mean ms of one pass over all batches, unpruned and pruned.

    Each is measured by ``torch.utils.benchmark.Timer``: two warm-up passes, then ``repeats`` timed passes,
    with the accelerator synchronized before each clock read (CUDA kernels run asynchronously, so a plain
    ``perf_counter`` around a GPU forward measures the launch, not the work) and the caller's thread count.
    """
    from torch.utils.benchmark import Timer

    model = adapter.model

    @torch.no_grad()
    def one_pass(sched: Any) -> None:
        for b in batches:
            if sched is None:
                model(**b, use_cache=False, logits_to_keep=1)
            else:
                with apply_schedule(model, sched, adapter=adapter):
                    model(**b, use_cache=False, logits_to_keep=1)

    def measure(sched: Any) -> float:
        timer = Timer(stmt="one_pass(sched)", globals={"one_pass": one_pass, "sched": sched},
                      num_threads=torch.get_num_threads())
        return timer.timeit(number=max(1, int(repeats))).mean * 1e3

    return measure(None), measure(schedule)


def evaluate_schedule(adapter: Any, schedule: Any, samples: Sequence[Any], *, batch_size: int = 8,
                      repeats: int = 3, timing: bool = True) -> EvalReport:
    batches = make_batches(adapter, samples, batch_size)
    counts = token_counts(adapter, batches)
    ratios = list(schedule.keep_ratios)
    shape = DecoderShape.from_config(adapter.text_config)
    budget = budget_report(shape, token_counts(adapter, batches, video=True), ratios,
                           modality_ratios=dict(getattr(schedule, "modality_keep_ratios", None) or {}))
    ref = last_token_states(adapter, batches)
    got = last_token_states(adapter, batches, schedule)
    disc = cosine_discrepancy(ref, got)
    t_full = t_pruned = None
    if timing:
        t_full, t_pruned = time_prefill(adapter, batches, schedule, repeats)
    return EvalReport(
        n_samples=len(counts),
        n_visual_mean=sum(v for _, v in counts) / len(counts),
        n_text_mean=sum(t for t, _ in counts) / len(counts),
        flops_ratio=budget.flops_ratio,
        kv_ratio=budget.kv_ratio,
        token_ratio=budget.token_ratio,
        discrepancy=float(disc.mean()),
        discrepancy_max=float(disc.max()),
        prefill_ms_unpruned=t_full,
        prefill_ms_pruned=t_pruned,
    )


@torch.no_grad()
def survival_grid(adapter: Any, schedule: Any, images: list, prompt: str) -> Any:
    """(H, W) float grid over the first image's visual tokens: the fraction of decoder layers each token
    survives under ``schedule`` (1 = never dropped). For the kept-token overlay plot. Returns None when
    the first image's tokens do not form a full row/col grid (e.g. LLaVA-NeXT's mixed-resolution layout)."""
    import numpy as np

    batch = adapter.prepare([list(images)], [prompt])
    vis_pos = adapter.visual_mask(batch["input_ids"])[0].nonzero().squeeze(1)
    n_layers = adapter.num_layers
    with apply_schedule(adapter.model, schedule, adapter=adapter) as handle:
        adapter.model(**batch, use_cache=False, logits_to_keep=1)
        kept = {l: idx[0] for l, idx in handle.kept_indices.items()}
    alive = torch.ones(n_layers, len(vis_pos))
    for l, idx in kept.items():
        alive[l] = torch.isin(vis_pos, idx).float().cpu()
    frac = alive.mean(0).numpy()
    coords = adapter.visual_coords(batch)[0].cpu().numpy()
    first = coords[:, 0] == 0
    rows, cols = np.unique(coords[first, 1]), np.unique(coords[first, 2])
    if len(rows) * len(cols) != int(first.sum()):
        return None
    grid = np.zeros((len(rows), len(cols)))
    grid[np.searchsorted(rows, coords[first, 1]), np.searchsorted(cols, coords[first, 2])] = frac[first]
    return grid
