"""Does the toy model's yes/no answer depend on the image, and does it read the question's words?

For held-out questions whose answer is "yes" or "no" (all presence questions, the spatial
"is X left of / above Y ?" ones, and train_toy's single-attribute training aid asked about
held-out scenes) this reads the model's next-token logits at the answer position (teacher-forced,
the prompt exactly as in training and evaluation) and reports, per question kind, how much
``logit(yes) - logit(no)`` varies across images and whether it separates the two answers. A model
that looks at the image for these questions has a spread of several nats and a positive gap between
"yes" and "no" items; one that answers from the question alone has neither. It also prints the
cosine between the embedding rows of word pairs, and counting accuracy split by what the question
names (every shape, one colour, one shape).

    python studies/toy_model/toy_yesno.py [--model DIR] [--n 400] [--out studies/toy_model/results/toy_yesno.md]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def load(model_dir: str):
    """(model, batcher) through the training script's processor, loaded once for every table."""
    import train_toy as T
    from transformers import Qwen2_5_VLForConditionalGeneration

    from schedsearch.models.qwen_vl import QwenImageProcessor

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir).eval()
    proc = QwenImageProcessor(T.build_tokenizer(), T.build_image_processor(), chat_template=T.QWEN_TEMPLATE)
    return model, T.Batcher(proc)


def yes_no_logits(model, batcher, qtype: str, n: int, bs: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """(logit(yes) - logit(no), answer == yes) for the first ``n`` yes/no questions of type ``qtype`` in the
    held-out stream (questions drawn with that type forced, so the set is deterministic)."""
    import train_toy as T

    from schedsearch.toy import HELDOUT_SEED, sample

    tok = batcher.proc.tokenizer
    yes, no = tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")
    items, i = [], 0
    while len(items) < n:
        if qtype == "single":  # train_toy's single-attribute training aid, asked about held-out scenes
            img, _, scene = sample(HELDOUT_SEED, i)
            it = (img, T.single_attribute_yesno(scene, np.random.default_rng([HELDOUT_SEED, i, 99])), scene)
        else:
            it = sample(HELDOUT_SEED, i, qtype=qtype)
        i += 1
        if it[1]["answer"] in ("yes", "no"):
            items.append(it)
    diff, ans = [], []
    for s in range(0, n, bs):
        chunk = items[s:s + bs]
        batch, labels, _, _ = batcher(chunk)
        with torch.no_grad():
            logits = model(**batch, use_cache=False).logits.float()
        pos = (labels != -100).float().argmax(1) - 1  # the position that predicts the first answer token
        for k, (_, q, _) in enumerate(chunk):
            diff.append((logits[k, pos[k], yes] - logits[k, pos[k], no]).item())
            ans.append(q["answer"] == "yes")
    return np.array(diff), np.array(ans)


PAIRS = (("yes", "no"), ("red", "blue"), ("green", "yellow"), ("circle", "square"), ("top", "bottom"),
         ("left", "right"), ("1", "2"))


def word_rows(model, tok) -> list[str]:
    """Cosine between the rows of word pairs in the input embedding and in the output head (the same matrix when
    the model ties them): rows near cos 1 are words the model can hardly tell apart, as input or as answer."""
    emb, head_w = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    mats = {"input embedding": emb.detach().float()}
    if head_w is not emb:
        mats["output head"] = head_w.detach().float()
    head = "| matrix | " + " | ".join(f"{a} / {b}" for a, b in PAIRS) + " |"
    out = [head, "|---" * (len(PAIRS) + 1) + "|"]
    for name, w in mats.items():
        cos = [torch.nn.functional.cosine_similarity(w[tok.convert_tokens_to_ids(a)], w[tok.convert_tokens_to_ids(b)],
                                                     dim=0).item() for a, b in PAIRS]
        tied = " (tied: also the output head)" if len(mats) == 1 else ""
        out.append(f"| {name}{tied} | " + " | ".join(f"{c:.3f}" for c in cos) + " |")
    return out


def row(name: str, d: np.ndarray, a: np.ndarray) -> str:
    acc = float(((d > 0) == a).mean())
    gap = float(d[a].mean() - d[~a].mean())
    return (f"| {name} | {len(d)} | {a.mean():.3f} | {d.std():.3f} | {gap:+.3f} | "
            f"{np.corrcoef(d, a)[0, 1]:+.3f} | {acc:.3f} |")


def counting_by_kind(model, batcher, n: int, bs: int = 50) -> list[str]:
    """Teacher-forced exact match on held-out counting questions, split by what they count: every shape (the
    question names nothing), one colour, or one shape -- next to the share of the most common answer."""
    from collections import Counter, defaultdict

    import train_toy as T

    from schedsearch.toy import HELDOUT_SEED, sample
    from schedsearch.toy.scenes import COLOURS

    items = [sample(HELDOUT_SEED, i, qtype="counting") for i in range(n)]
    ok, answers = defaultdict(list), defaultdict(Counter)
    for s in range(0, n, bs):
        chunk = items[s:s + bs]
        batch, labels, _, _ = batcher(chunk)
        with torch.no_grad():
            right = T.answer_logits_correct(model(**batch, use_cache=False).logits.float(), labels).tolist()
        for (_, q, _), r in zip(chunk, right, strict=True):
            words = q["prompt"].split()
            kind = ("every shape" if q["prompt"] == "how many shapes are there ?"
                    else "one colour" if any(c in words for c in COLOURS) else "one shape")
            ok[kind].append(r)
            answers[kind][q["answer"]] += 1
    out = ["| counting questions about | n | exact match | share of the most common answer |", "|---|---|---|---|"]
    for kind in ("every shape", "one colour", "one shape"):
        m = len(ok[kind])
        out.append(f"| {kind} | {m} | {sum(ok[kind]) / m:.3f} | {answers[kind].most_common(1)[0][1] / m:.3f} |")
    return out


def main(argv: list[str] | None = None) -> int:
    from schedsearch.toy import MODEL_DIR

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(MODEL_DIR))
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model, batcher = load(args.model)
    shown = args.model if args.model != str(MODEL_DIR) else 'toy'
    lines = [f"# `python studies/toy_model/toy_yesno.py --model {shown} "
             f"--n {args.n}`", "",
             "logit(yes) - logit(no) at the answer position, held-out stream, teacher-forced.", "",
             "| questions | n | share answered yes | std of the logit difference (nats) | mean gap yes - no items | "
             "correlation with the answer | accuracy of its sign |",
             "|---|---|---|---|---|---|---|"]
    for qtype, name in (("presence", "presence (is there a red triangle ?)"),
                        ("spatial", "spatial yes/no (is X left of / above Y ?)"),
                        ("single", "single attribute (is there a red shape ? / is there a circle ?)")):
        d, a = yes_no_logits(model, batcher, qtype, args.n)
        lines.append(row(name, d, a))
    lines += ["", "Cosine between the rows of word pairs (1.0 = the model cannot tell the two words apart):", "",
              *word_rows(model, batcher.proc.tokenizer),
              "", "Counting, split by what the question names (the model reads the colour / shape word or not):", "",
              *counting_by_kind(model, batcher, args.n + args.n // 2)]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
