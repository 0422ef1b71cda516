"""What weight-only quantization costs in quality: a trained checkpoint in bf16 against its int8 and int4 weights.

    python bench/quant.py runs/demo/export/hf [--split test] [--limit 100]

On the FLORES sentences of the speedrun's ten languages (eval/tasks.py LANGID_LANGS; the speedrun pretrains on
them), each sentence after `<s>`, teacher-forced: bits per byte (eval/suite.py's bpb_metrics), and per predicted
token, against bf16, the agreement of the most likely next token and the KL divergence KL(bf16 ‖ quantized) in nats.
The quantized models are the engine's (`--quantize int8|int4`, infer/quant.py): int8 with activations quantized per
row where the CPU has int8 dot products, and then also weight-only (activations in bf16) beside it; int4 weight-only.
The log (bench/_log.py) goes to bench/results/quant-<checkpoint folder name, or its parent's for .../hf>.json
"""

import argparse
import copy
from pathlib import Path

import torch
from _log import BenchLog

from apertus import load_model
from apertus.eval import tasks as T
from apertus.eval.loglik import load_tokenizer
from apertus.eval.suite import bpb_metrics
from apertus.infer.quant import MODES, Int8Linear, quantize_weights


@torch.inference_mode()
def log_probs(model, ids: list[int]) -> torch.Tensor:
    """Log-probabilities (fp32) of every next token after each prefix of `ids`, (len(ids) - 1, vocab)."""
    return torch.log_softmax(model(torch.tensor([ids[:-1]])).float()[0], -1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--split", default="test", help="FLORES split (the speedrun's evaluation uses test)")
    ap.add_argument("--limit", type=int, default=100, help="sentences per language")
    args = ap.parse_args()
    path = args.checkpoint.resolve()
    name = path.name if path.name != "hf" else path.parent.name  # runs/demo/pretrain/hf: "pretrain"
    log = BenchLog("quant", [name])
    tok = load_tokenizer(args.checkpoint, None)
    ref = load_model(args.checkpoint, dtype=torch.bfloat16).eval()
    quantized = {m: quantize_weights(copy.deepcopy(ref), m) for m in MODES}
    if quantized["int8"].lm_head.int8_activations:  # W8A8 here: its weight-only form too, for comparison
        quantized["int8 weight-only"] = copy.deepcopy(quantized["int8"])
        for layer in quantized["int8 weight-only"].modules():
            if isinstance(layer, Int8Linear):
                layer.int8_activations = False
    models = {"bf16": ref} | quantized
    texts = [t for lang in T.LANGID_LANGS for t in T.flores_texts(lang, args.split)[:args.limit]]
    nll = {m: [] for m in models}
    agree = {m: 0 for m in quantized}
    kl = {m: 0.0 for m in quantized}
    tokens = 0
    for ids in tok.encode_batch(texts, bos=False):
        ids = [tok.bos_id] + ids
        target = torch.tensor(ids[1:])
        lp = {m: log_probs(model, ids) for m, model in models.items()}
        for m, x in lp.items():
            nll[m].append((-x.gather(1, target[:, None]).sum().item(), len(target)))
        for m in quantized:
            agree[m] += (lp[m].argmax(-1) == lp["bf16"].argmax(-1)).sum().item()
            kl[m] += (lp["bf16"].exp() * (lp["bf16"] - lp[m])).sum().item()
        tokens += len(target)
    bpb = {m: bpb_metrics(texts, nll[m], ref.config.vocab_size) for m in models}
    print(f"{args.checkpoint}: {len(texts)} FLORES sentences ({args.split}), {tokens:,} predicted tokens")
    print(f"{'weights':16} {'bits/byte':>10} {'vs bf16':>8} {'top-1 agreement':>16} {'KL to bf16 (nats)':>18}")
    print(f"{'bf16':16} {bpb['bf16']['bpb']:10.4f}")
    results = {"bf16": {"bpb": bpb["bf16"]["bpb"], "bpb_stderr": bpb["bf16"]["bpb_stderr"]}}
    for m in quantized:
        delta = bpb[m]["bpb"] - bpb["bf16"]["bpb"]
        print(f"{m:16} {bpb[m]['bpb']:10.4f} {delta:+8.4f} {agree[m] / tokens:16.2%} {kl[m] / tokens:18.2e}")
        results[m] = {"bpb": bpb[m]["bpb"], "bpb_delta": delta, "top1_agreement": agree[m] / tokens,
                      "kl_nats_per_token": kl[m] / tokens}
        log.row(f"FLORES bits per byte with {m} weights, {name}, {len(texts)} sentences of "
                f"10 languages (next token as bf16's: {agree[m] / tokens:.1%}, KL {kl[m] / tokens:.1e} nats)",
                f"{bpb[m]['bpb']:.4f}", f"bf16 weights {bpb['bf16']['bpb']:.4f}", f"{delta:+.4f} bpb")
    log.write({"checkpoint": str(args.checkpoint), "split": args.split, "sentences": len(texts), "tokens": tokens,
               "results": results})


if __name__ == "__main__":
    main()
