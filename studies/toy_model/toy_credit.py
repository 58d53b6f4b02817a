"""Why the toy model never learns yes/no questions: a credit-assignment probe on fresh models.

Each arm trains a fresh model of the shipped architecture (``train_toy.build_model``: decoder 8 layers,
hidden 96, RoPE base 20 unless ``--rope-theta``) from scratch on ONE kind of yes/no question, with the
shipped vision-probe auxiliary loss, and reports answer accuracy over windows of training steps:

* ``text-noimage``     "is there a red shape ?" -> "yes" iff the named colour is one of the first half of
  ``COLOURS``: a function of the question's word alone, the prompt without the image;
* ``text-image``       the same function, the image in the prompt as in training (256 visual tokens that
  carry nothing about the answer);
* ``image-word``       train_toy's single-attribute question ("is there a red shape ?" / "is there a
  circle ?", yes iff the scene has it): the answer is balanced given the word alone and given the image
  alone, so only their combination predicts it;
* ``image-word-probe`` the same, plus a linear probe on the answer position's state at decoder layer
  ``--probe-layer`` that must name the colour / shape the question names (how fast the answer position
  learns to hold the word);
* ``image-word-summary`` the same question with train_toy's ``QuestionProbes`` (``--word-aux 1 --summary-aux 1``):
  the word probe at layer ``--probe-layer`` and, one layer deeper, a question-independent table of the scene
  (count, size, row, column of every colour-shape pair), which the image alone predicts.

    python studies/toy_model/toy_credit.py [--steps 300] [--out studies/toy_model/results/toy_credit.md]

Seeds are fixed (torch seed 0, training stream ``TRAIN_SEED``, scenes of at most 3 objects), batch 16,
AdamW lr 2e-3 with 50 warm-up steps, bf16 autocast, like ``train_toy.py``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

ARMS = ("text-noimage", "text-image", "image-word", "image-word-probe", "image-word-summary")


def text_question(scene, rng: np.random.Generator) -> dict:
    """A yes/no question whose answer depends only on the colour word it names."""
    from schedsearch.toy.scenes import COLOURS

    colours = list(COLOURS)
    v = colours[int(rng.integers(0, len(colours)))]
    return {"prompt": f"is there a {v} shape ?", "answer": "yes" if v in colours[: len(colours) // 2] else "no"}


def named_value(prompt: str) -> int:
    """Index in COLOURS + SHAPES of the one colour or shape word a single-attribute question names."""
    import train_toy as T

    colour, shape = (int(x) for x in T.named_words(prompt)[:2])
    return colour - 1 if colour else len(T.COLOURS) + shape - 1


def run_arm(arm: str, steps: int, batch: int, rope_theta: float, probe_layer: int, log=print) -> dict:
    import train_toy as T

    from schedsearch.models.qwen_vl import QwenImageProcessor
    from schedsearch.toy import TRAIN_SEED, sample
    from schedsearch.toy.scenes import COLOURS, SHAPES

    torch.manual_seed(0)
    tok = T.build_tokenizer()
    proc = QwenImageProcessor(tok, T.build_image_processor(), chat_template=T.QWEN_TEMPLATE)
    batcher = T.Batcher(proc)
    model = T.build_model(tok, 96, 8, 64, rope_theta).train()
    hidden = model.config.text_config.hidden_size
    heads = T.AuxHeads(hidden, -1)
    probe = torch.nn.Linear(hidden, len(COLOURS) + len(SHAPES)) if arm == "image-word-probe" else None
    qprobes = T.QuestionProbes(hidden, probe_layer, probe_layer + 1) if arm == "image-word-summary" else None
    params = list(model.parameters()) + list(heads.parameters())
    params += list(probe.parameters()) if probe else []
    params += list(qprobes.parameters()) if qprobes else []
    opt = torch.optim.AdamW(params, lr=2e-3, betas=(0.9, 0.98), weight_decay=0.01)
    assistant = tok.convert_tokens_to_ids("assistant")
    captured: dict[str, torch.Tensor] = {}
    hooks = qprobes.attach(model) if qprobes else []
    if probe is not None:
        hooks.append(model.model.language_model.layers[probe_layer].register_forward_hook(
            lambda m, a, o: captured.__setitem__("h", o[0] if isinstance(o, tuple) else o)))
    correct, probe_ok = [], []
    t0 = time.time()
    try:
        for step in range(steps):
            for g in opt.param_groups:
                g["lr"] = 2e-3 * min(1.0, (step + 1) / 50)
            items = []
            for i in range(step * batch, (step + 1) * batch):
                img, _, scene = sample(TRAIN_SEED, i, max_objects=3)
                rng = np.random.default_rng([TRAIN_SEED, i, 99])
                q = text_question(scene, rng) if arm.startswith("text") else T.single_attribute_yesno(scene, rng)
                items.append((img, q, scene))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                if arm == "text-noimage":
                    texts = [proc.apply_chat_template(
                        [{"role": "user", "content": [{"type": "text", "text": q["prompt"]}]},
                         {"role": "assistant", "content": q["answer"]}], tokenize=False) for _, q, _ in items]
                    enc = tok(texts, return_tensors="pt", padding=True)
                    ids = enc["input_ids"]
                    labels = torch.full_like(ids, -100)
                    labels[:, -2:] = ids[:, -2:]  # the answer word and <|im_end|> (left padding: all end there)
                    logits = model(input_ids=ids, attention_mask=enc["attention_mask"], use_cache=False).logits
                    logits = logits.float()
                    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                             labels[:, 1:].reshape(-1), ignore_index=-100)
                    ok = T.answer_logits_correct(logits, labels)
                else:
                    b, labels, aux, _ = batcher(items)
                    lm, aux_loss, _, ok = T.forward(model, heads, b, labels, aux, 1.0)
                    loss = lm + aux_loss
                    if probe is not None:
                        pred = probe(captured["h"][b["input_ids"] == assistant].float())
                        tgt = torch.tensor([named_value(q["prompt"]) for _, q, _ in items])
                        loss = loss + torch.nn.functional.cross_entropy(pred, tgt)
                        probe_ok.append((pred.argmax(-1) == tgt).float().mean().item())
                    if qprobes is not None:
                        word_loss, summary_loss = qprobes.losses(b["input_ids"], assistant, items)
                        loss = loss + word_loss + summary_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            correct.append(ok.float().mean().item())
            if (step + 1) % 50 == 0:
                log(f"  {arm}: step {step + 1} acc(last 50) {np.mean(correct[-50:]):.3f}"
                    + (f" probe {np.mean(probe_ok[-50:]):.2f}" if probe_ok else "")
                    + f" {time.time() - t0:.0f}s")
    finally:
        for h in hooks:
            h.remove()
    return {"acc": correct, "probe": probe_ok, "seconds": time.time() - t0}


def table(results: dict[str, dict], steps: int, window: int = 50) -> str:
    edges = list(range(0, steps, window))
    head = "| arm | " + " | ".join(f"steps {a + 1}-{min(steps, a + window)}" for a in edges) + " | seconds |"
    rows = [head, "|" + "---|" * (len(edges) + 2)]
    for arm, r in results.items():
        cells = []
        for a in edges:
            cell = f"{np.mean(r['acc'][a:a + window]):.3f}"
            if r["probe"]:
                cell += f" (probe {np.mean(r['probe'][a:a + window]):.2f})"
            cells.append(cell)
        rows.append(f"| {arm} | " + " | ".join(cells) + f" | {r['seconds']:.0f} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rope-theta", type=float, default=20.0)
    ap.add_argument("--probe-layer", type=int, default=2)
    ap.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of: " + ", ".join(ARMS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="studies/toy_model/results/toy_credit.md")
    args = ap.parse_args(argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        print(f"error: unknown arm(s) {unknown}; known: {list(ARMS)}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    results = {a: run_arm(a, args.steps, args.batch, args.rope_theta, args.probe_layer) for a in arms}
    text = (f"# Credit-assignment probe (`python studies/toy_model/toy_credit.py --steps {args.steps} "
            f"--batch {args.batch} "
            f"--rope-theta {args.rope_theta:g} --probe-layer {args.probe_layer}`)\n\n"
            "Training exact match of fresh models, mean over windows of steps (chance 0.5 for every arm; "
            "'probe' = accuracy of the word probe at the answer position).\n\n" + table(results, args.steps) + "\n")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
