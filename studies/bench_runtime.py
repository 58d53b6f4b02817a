"""Prefill speed-up and KV-cache bytes of the runtime at keep ratios 1.0 / 0.5 / 0.2 / 0.1.

    python studies/bench_runtime.py            # tiny model + real-width Qwen2.5-VL-7B layers (~5 min on 2 cores)
    python studies/bench_runtime.py --quick    # tiny model + 2 real-width layers, 1 repeat
    python studies/bench_runtime.py --scorers  # only the scoring cost of every ranking at real width (~10 min)

(a) a tiny random-init Qwen2.5-VL (schedsearch.testing.tiny);
(b) real-width, reduced-depth Qwen2.5-VL-7B text layers (hidden 3584, 28 heads / 4 KV heads,
    head_dim 128, SwiGLU MLP 18944; random weights, small vocab and a 1-block vision tower so the
    decoder dominates) with 1,008 visual tokens (a 28x36 merged grid) and ~40 text tokens.

Each keep ratio r is applied from layer 0 (every layer of the reduced stack runs on r x visual
tokens: these layers stand for the deep part of a 28-layer model after the drop). Scorer:
``uniform`` (and one ``last_token_attention`` row at 0.2 to show the scoring overhead).
``--scorers``: the run-time cost of every ranking ``--scorer auto`` screens (every registered scorer with its
defaults, the screen's variants and one composite) at real width: the schedule keeps every token for layer 0 and
0.2 of the visual tokens from layer 1 on (one drop, so rankings that read the previous layer have one); the time
spent inside the scorer (its ``__call__`` and ``merge``, timed through a proxy on the schedule handle) against
the whole pruned prefill. Observer hooks some rankings put on the decoder layers (TransPrune's transition
variation, SparseVLM's and DART's previous-layer inputs) run outside the scorer call: they are O(tokens x hidden)
per layer, small against a layer's O(tokens x hidden^2), and not in "scoring ms". Written to
``studies/results/bench_scorers.md``.

Prints: FLOPs ratio from schedsearch.flops, ideal speed-up 1/FLOPs ratio, measured prefill
speed-up (mean wall time of a forward that fills the KV cache, timed by torch.utils.benchmark), their ratio,
and KV bytes measured from the cache tensors against the FLOPs model's prediction. ``--device cuda --dtype
bfloat16`` runs it on a GPU.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils.benchmark import Timer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from schedsearch.devices import add_arguments, load_kwargs  # noqa: E402
from schedsearch.flops import DecoderShape, budget_report, kv_cache_bytes  # noqa: E402
from schedsearch.models import load_model  # noqa: E402
from schedsearch.runtime import apply_schedule  # noqa: E402

KEEPS = (1.0, 0.5, 0.2, 0.1)


def real_width_adapter(n_layers: int, **where):
    """Qwen2.5-VL-7B text shapes, reduced depth, saved and reloaded through load_model (same path as a checkpoint)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from schedsearch.testing.tiny import make_tiny

    tmp = Path(tempfile.mkdtemp(prefix="bench7b-"))
    make_tiny("qwen2_5_vl", tmp)  # tokenizer + processor files; the model is replaced below
    small = Qwen2_5_VLConfig.from_pretrained(tmp)
    text = small.text_config.to_dict()
    text.update(hidden_size=3584, num_attention_heads=28, num_key_value_heads=4, intermediate_size=18944,
                num_hidden_layers=n_layers, max_position_embeddings=32768,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
    text.pop("head_dim", None)
    text.pop("layer_types", None)
    vision = small.vision_config.to_dict()
    vision.update(out_hidden_size=3584)
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision,
                           **{k: getattr(small, k) for k in ("image_token_id", "video_token_id",
                                                             "vision_start_token_id", "vision_end_token_id")})
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    model.save_pretrained(tmp)
    del model
    return load_model(str(tmp), **where)


def image_of_tokens(adapter, merged_h: int, merged_w: int):
    from PIL import Image

    ip = adapter.processor.image_processor
    ip.size = {"shortest_edge": 56 * 56, "longest_edge": 14 * 14 * 4 * 1280}  # the 7B default: up to 1280 tokens
    ps = ip.patch_size * ip.merge_size
    return Image.new("RGB", (merged_w * ps, merged_h * ps), (120, 60, 200))


@torch.no_grad()
def measure(adapter, batch, ratios, scorer: str, repeats: int):
    model = adapter.model
    sched = {"keep_ratios": ratios, "scorer": {"name": scorer, "params": {}}}

    def run():
        with apply_schedule(model, sched, adapter=adapter):
            return model(**batch, use_cache=True, logits_to_keep=1)

    # torch.utils.benchmark: two warm-up runs, the accelerator synchronized around the clock, mean of the repeats
    timer = Timer(stmt="run()", globals={"run": run}, num_threads=torch.get_num_threads())
    mean = timer.timeit(number=repeats).mean
    cache = run().past_key_values
    kv = sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
             for layer in cache.layers)
    return mean, kv


def bench(name: str, adapter, image, prompt: str, repeats: int) -> list[dict]:
    batch = adapter.prepare([[image]], [prompt])
    vis = adapter.visual_mask(batch["input_ids"])
    n_vis = int(vis.sum())
    n_text = batch["input_ids"].shape[1] - n_vis
    shape = DecoderShape.from_config(adapter.text_config)
    dtype_bytes = next(adapter.model.parameters()).element_size()
    rows = []
    base_t = None
    for keep, scorer in [(k, "uniform") for k in KEEPS] + [(0.2, "last_token_attention")]:
        ratios = [keep] * adapter.num_layers
        t, kv = measure(adapter, batch, ratios, scorer, repeats)
        if keep == 1.0:
            base_t = t
        rep = budget_report(shape, [(n_text, n_vis)], ratios, dtype_bytes=dtype_bytes)
        pred = kv_cache_bytes(shape, n_text, n_vis, ratios, dtype_bytes=dtype_bytes)
        ideal = 1.0 / rep.flops_ratio
        rows.append(dict(model=name, keep=keep, scorer=scorer, n_vis=n_vis, n_text=n_text, ms=t * 1e3,
                         flops_ratio=rep.flops_ratio, ideal=ideal, speedup=base_t / t,
                         eff=(base_t / t) / ideal, kv=kv, kv_pred=pred, kv_err=(kv - pred) / pred))
    return rows


class _TimedScorer:
    """Forwards every attribute to the scorer; accumulates the wall time of ``__call__`` and ``merge``."""

    def __init__(self, scorer, sync):
        self._scorer, self._sync, self.seconds = scorer, sync, 0.0

    def __getattr__(self, name):
        value = getattr(self._scorer, name)
        if name != "merge" or value is None:
            return value

        def merge(*args):
            return self._timed(value, *args)

        return merge

    def _timed(self, fn, *args):
        import time

        self._sync()
        t0 = time.perf_counter()
        out = fn(*args)
        self._sync()
        self.seconds += time.perf_counter() - t0
        return out

    def __call__(self, ctx):
        return self._timed(self._scorer, ctx)


def scorer_sections() -> dict:
    """label -> scorer section: what ``--scorer auto`` screens, plus one composite of three."""
    from schedsearch.search.screen import composite, label, screen_candidates

    out = dict(screen_candidates())
    mix = composite([out["diverse:spatial=4.0"], out["fastervlm"], out["last_token_attention:rope=false"]], "rank")
    out[label(mix)] = mix
    return out


@torch.no_grad()
def bench_scorers(adapter, image, prompt: str, keep: float, repeats: int, log=print) -> list[dict]:
    import statistics
    import time

    from schedsearch.errors import SchedsearchError

    batch = adapter.prepare([[image]], [prompt])
    model = adapter.model
    n = adapter.num_layers
    ratios = [1.0] + [keep] * (n - 1)
    dev = next(model.parameters()).device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    rows = []
    for lab, sc in scorer_sections().items():
        sched = {"keep_ratios": ratios, "scorer": sc}
        try:
            with apply_schedule(model, sched, adapter=adapter) as handle:
                timed = _TimedScorer(handle.scorer, sync)
                handle.scorer = timed  # our handle's attribute: the runtime calls the scorer through it
                prefill, scoring = [], []
                for i in range(repeats + 1):  # the first run warms up
                    timed.seconds = 0.0
                    sync()
                    t0 = time.perf_counter()
                    model(**batch, use_cache=True, logits_to_keep=1)
                    sync()
                    if i:
                        prefill.append(time.perf_counter() - t0)
                        scoring.append(timed.seconds)
        except SchedsearchError as err:
            rows.append({"scorer": lab, "error": " ".join(str(err).split())})
            log(f"{lab}: refused ({err})")
            continue
        row = {"scorer": lab, "prefill_ms": 1e3 * statistics.median(prefill),
               "scoring_ms": 1e3 * statistics.median(scoring)}
        row["share"] = row["scoring_ms"] / row["prefill_ms"]
        rows.append(row)
        log(f"{lab}: prefill {row['prefill_ms']:.0f} ms, scoring {row['scoring_ms']:.1f} ms "
            f"({100 * row['share']:.2f} %)")
    return rows


def scorer_table(rows: list[dict], header: str, limit: float = 0.05) -> str:
    out = [header, "",
           "| scorer | pruned prefill ms | scoring ms | scoring / prefill | <= 5 % |",
           "|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['scorer']} | refused: {r['error']} | – | – | – |")
            continue
        out.append(f"| {r['scorer']} | {r['prefill_ms']:.0f} | {r['scoring_ms']:.1f} | {100 * r['share']:.2f} % | "
                   f"{'yes' if r['share'] <= limit else 'NO'} |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--scorers", action="store_true", help="only the scoring cost of every ranking at real width")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "bench_scorers.md"),
                    help="where --scorers writes its table")
    add_arguments(ap)  # --device / --dtype, as on the CLI
    args = ap.parse_args()
    where = load_kwargs(args.device, args.dtype)
    repeats = args.repeats or (1 if args.quick else 3)
    layers = args.layers or (2 if args.quick else 4)
    torch.manual_seed(0)
    if args.scorers:
        import datetime
        import time

        t0 = time.time()
        big = real_width_adapter(layers, **where)
        img = image_of_tokens(big, 28, 36)
        prompt = "describe every object in this picture and where it is, in detail please"
        batch = big.prepare([[img]], [prompt])
        n_vis = int(big.visual_mask(batch["input_ids"]).sum())
        rows = bench_scorers(big, img, prompt, 0.2, repeats)
        dev = next(big.model.parameters())
        cmd = "python studies/bench_runtime.py --scorers" + (f" --layers {layers}" if args.layers else "")
        header = (f"# `{cmd}` ({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}, {time.time() - t0:.0f} s, "
                  f"torch {torch.__version__}, {torch.get_num_threads()} threads, {dev.dtype}, {dev.device.type})\n\n"
                  f"Qwen2.5-VL-7B-shaped decoder layers (hidden 3584, 28/4 heads, MLP 18944, random weights), "
                  f"{layers} of them, {n_vis} visual + {batch['input_ids'].shape[1] - n_vis} text tokens; every token "
                  f"at layer 0, keep 0.2 of the visual tokens from layer 1 on (one drop). Median of {repeats} "
                  "prefills after one warm-up. scoring ms: time inside the scorer (`__call__` + `merge`); the "
                  "vision tower here is one small block, so the vision-encoder maps some rankings record cost "
                  "almost nothing (on the real 32-block tower they add attention maps of one to a few blocks); "
                  "observer hooks on the decoder layers (transprune, sparsevlm, dart) are not in scoring ms. "
                  f"A 28-layer model's pruned prefill is longer than this {layers}-layer one, so the share there is "
                  "smaller.")
        text = scorer_table(rows, header)
        Path(args.out).write_text(text, encoding="utf-8")
        print(text)
        return

    from schedsearch.testing.tiny import make_tiny

    rows = []
    tiny_dir = Path(tempfile.mkdtemp(prefix="benchtiny-"))
    make_tiny("qwen2_5_vl", tiny_dir)
    tiny = load_model(str(tiny_dir), **where)
    rows += bench("tiny qwen2.5-vl", tiny, image_of_tokens(tiny, 16, 16), "what is in the image?", max(repeats, 5))
    big = real_width_adapter(layers, **where)
    rows += bench(f"qwen2.5-vl-7b shapes x{layers} layers", big, image_of_tokens(big, 28, 36),
                  "describe every object in this picture and where it is, in detail please", repeats)

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, fp32, CPU")
    hdr = ("model", "keep", "scorer", "vis/text", "prefill ms", "FLOPs ratio", "ideal x", "measured x",
           "meas/ideal", "KV MiB", "KV pred MiB", "KV err")
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    for r in rows:
        print(f"| {r['model']} | {r['keep']:.1f} | {r['scorer']} | {r['n_vis']}/{r['n_text']} | {r['ms']:.1f} | "
              f"{r['flops_ratio']:.3f} | {r['ideal']:.2f} | {r['speedup']:.2f} | {r['eff']:.2f} | "
              f"{r['kv'] / 2**20:.2f} | {r['kv_pred'] / 2**20:.2f} | {100 * r['kv_err']:+.2f}% |")


if __name__ == "__main__":
    main()
