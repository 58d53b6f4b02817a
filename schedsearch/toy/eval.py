"""Exact-match accuracy of a VLM (optionally under a pruning schedule) on a manifest that has answers.

    from schedsearch.toy.eval import accuracy, random_drop_schedule
    report = accuracy(adapter, samples)                               # unpruned
    report = accuracy(adapter, samples, schedule=sched)              # pruned, same batches
    report["overall"], report["by_qtype"]["spatial"], report["by_region"]["top left"]

Answers are compared after lower-casing and collapsing whitespace; the prediction is the greedy
generation (``max_new_tokens``) decoded without special tokens. Samples are batched in order (batches may
mix visual-token counts: the runtime prunes ragged batches), left-padded by the adapter's processor.
Breakdowns use the manifest's optional ``qtype`` and ``region`` keys (``Sample.extra``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

__all__ = ["accuracy", "normalize", "prepare_groups", "random_drop_schedule", "region_halves"]


def normalize(text: str) -> str:
    return " ".join(str(text).lower().split())


def _groups(adapter: Any, samples: Sequence[Any], batch_size: int) -> list[list[int]]:
    """Indices of consecutive samples, ``batch_size`` at a time."""
    idx = list(range(len(samples)))
    return [idx[k:k + batch_size] for k in range(0, len(idx), max(1, batch_size))]


def prepare_groups(adapter: Any, samples: Sequence[Any], batch_size: int = 32, *, precompute: bool = False
                   ) -> list[tuple[list[int], dict]]:
    """The batches :func:`predict` runs, built once: ``(sample indices, batch)``. With ``precompute`` the image
    features are encoded now (``adapter.precompute_vision``, the path ``generate()`` takes): a caller that
    evaluates many schedules on one set pays for the vision encoder once (rankings that read the encoder's maps
    replay it, see ``VLMAdapter.replay_vision``). Same predictions as raw batches."""
    from schedsearch.evaluation import prepare_samples

    out = []
    for idx in _groups(adapter, samples, batch_size):
        batch = prepare_samples(adapter, [samples[i] for i in idx])
        out.append((idx, adapter.precompute_vision(batch) if precompute else batch))
    return out


def predict(adapter: Any, samples: Sequence[Any], *, schedule: Any = None, batch_size: int = 32,
            max_new_tokens: int = 4, prepared: Sequence[tuple[list[int], dict]] | None = None) -> list[str]:
    """Greedy answers, one per sample, in order. ``prepared``: the batches from :func:`prepare_groups`."""
    import torch

    from schedsearch.evaluation import prepare_samples
    from schedsearch.runtime import apply_schedule

    tok = getattr(adapter.processor, "tokenizer", adapter.processor)
    out: list[str] = [""] * len(samples)
    groups = prepared if prepared is not None else (
        (idx, prepare_samples(adapter, [samples[i] for i in idx])) for idx in _groups(adapter, samples, batch_size))
    for idx, batch in groups:
        kw = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        with torch.no_grad():
            if schedule is None:
                gen = adapter.model.generate(**batch, **kw)
            else:
                with apply_schedule(adapter.model, schedule, adapter=adapter):
                    gen = adapter.model.generate(**batch, **kw)
        texts = tok.batch_decode(gen[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        for i, t in zip(idx, texts, strict=True):
            out[i] = normalize(t)
    return out


def accuracy(adapter: Any, samples: Sequence[Any], *, schedule: Any = None, batch_size: int = 32,
             max_new_tokens: int = 4, prepared: Sequence[tuple[list[int], dict]] | None = None) -> dict:
    """{"n", "overall", "by_qtype": {qtype: acc}, "by_region": {region: acc}, "counts": {...}}."""
    missing = [s.source for s in samples if s.answer is None]
    if missing:
        from schedsearch.errors import CalibrationError

        raise CalibrationError(f"{missing[0]}: accuracy needs an \"answer\" on every line "
                               f"({len(missing)} samples have none)")
    preds = predict(adapter, samples, schedule=schedule, batch_size=batch_size, max_new_tokens=max_new_tokens,
                    prepared=prepared)
    hits = [p == normalize(s.answer) for p, s in zip(preds, samples, strict=True)]
    by_q: dict[str, list[bool]] = defaultdict(list)
    by_r: dict[str, list[bool]] = defaultdict(list)
    for h, s in zip(hits, samples, strict=True):
        by_q[str(s.extra.get("qtype", "all"))].append(h)
        if "region" in s.extra:
            by_r[str(s.extra["region"])].append(h)

    def mean(v: list[bool]) -> float:
        return sum(v) / len(v)

    return {"n": len(hits), "overall": mean(hits),
            "by_qtype": {k: mean(v) for k, v in sorted(by_q.items())},
            "by_region": {k: mean(v) for k, v in sorted(by_r.items())},
            "counts": {"qtype": {k: len(v) for k, v in sorted(by_q.items())},
                       "region": {k: len(v) for k, v in sorted(by_r.items())}},
            "predictions": preds}


def random_drop_schedule(adapter: Any, keep: float = 0.1, after_layer: int = 2, seed: int = 0) -> Any:
    """A schedule keeping a random ``keep`` fraction of visual tokens from decoder layer ``after_layer`` on
    (layers ``0 .. after_layer-1`` see every token)."""
    from schedsearch.schedule import SCHEMA_VERSION, Schedule, make_provenance

    n = adapter.num_layers
    return Schedule.from_dict({
        "schema_version": SCHEMA_VERSION, "keep_ratios": [1.0] * after_layer + [float(keep)] * (n - after_layer),
        "scorer": {"name": "random", "params": {"seed": seed}}, "recycling": None,
        "model": {"family": adapter.family, "name": str(adapter.name_or_path), "num_layers": n,
                  "fingerprint": adapter.fingerprint()},
        "budget": {"kind": "tokens", "requested": keep, "achieved": None},
        "objective": None, "method": {"name": "manual", "params": {"after_layer": after_layer}},
        "provenance": make_provenance().to_dict(),
    })


def region_halves(report: dict) -> dict[str, float | None]:
    """Accuracy on questions about objects in the top vs bottom half (quadrants "top left", ... weighted by count)."""
    counts = report.get("counts", {}).get("region", {})
    out: dict[str, float | None] = {}
    for half in ("top", "bottom"):
        keys = [k for k in report.get("by_region", {}) if k.split()[0] == half]
        n = sum(counts.get(k, 0) for k in keys)
        out[half] = sum(report["by_region"][k] * counts.get(k, 0) for k in keys) / n if n else None
        out[f"n_{half}"] = n
    return out
