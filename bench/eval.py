"""Multiple-choice scoring throughput: apertus.eval (tree-batched shared contexts) vs lm-eval's HFLM on transformers'
ApertusForCausalLM, same weights, same requests (the harness's own model class is the peer).

    python bench/eval.py [--hidden 256 --layers 4] [--docs 40] [--rounds 3] [--device cpu]

Requests: SIB-200 (a long prompt shared by 7 choices) and XCOPA (2 short choices), tokenized with the real Apertus
tokenizer. Both sides give the same log-likelihoods (checked) and run in fp32 on the same device.
The log (bench/_log.py) goes to bench/results/eval-h<hidden>-l<layers>[-<device>].json
"""

import argparse
import os
import shutil
import tempfile

import torch
import transformers
from _log import BenchLog, ratio
from _timing import interleaved
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from apertus.eval import tasks as T
from apertus.eval.loglik import Scorer
from apertus.tokenizer import apertus_tokenizer_path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--docs", type=int, default=40, help="documents per task")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16, help="HFLM batch size")
    ap.add_argument("--batch-tokens", type=int, default=8192, help="our tokens per forward")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    log = BenchLog("eval", [f"h{args.hidden}", f"l{args.layers}", args.device if args.device != "cpu" else ""])

    heads = max(1, args.hidden // 64)
    cfg = transformers.ApertusConfig(vocab_size=131072, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                                     num_hidden_layers=args.layers, num_attention_heads=heads,
                                     num_key_value_heads=max(1, heads // 2), max_position_embeddings=4096)
    torch.manual_seed(0)
    hf = transformers.ApertusForCausalLM(cfg).eval().to(args.device)
    tmp = tempfile.mkdtemp()
    try:
        hf.save_pretrained(tmp)
        shutil.copy(apertus_tokenizer_path(), os.path.join(tmp, "tokenizer.json"))
        ours = Scorer.from_pretrained(tmp, device=args.device, batch_tokens=args.batch_tokens, progress=False)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(apertus_tokenizer_path()), bos_token="<s>",
                                               eos_token="</s>", pad_token="<pad>")
    peer = HFLM(pretrained=hf, tokenizer=tok, batch_size=args.batch_size, add_bos_token=True, device=args.device)

    measured = {}
    for name, docs in (("sib200_eng_Latn", T.sib200_docs("eng_Latn")[:args.docs]),
                       ("xcopa_it", T.xcopa_docs("it")[:args.docs])):
        pairs = [p for d in docs for p in d.pairs]
        reqs = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
        a = [ll for ll, _ in ours.loglikelihood(pairs)]
        b = [ll for ll, _ in peer.loglikelihood(reqs, disable_tqdm=True)]
        err = max(abs(x - y) for x, y in zip(a, b, strict=True))
        assert err < 1e-3, f"{name}: log-likelihoods differ by {err}"
        tokens = sum(len(c) + len(x) for c, x in ours.pair_ids(pairs))
        t = interleaved({"ours": lambda pairs=pairs: ours.loglikelihood(pairs),
                         "peer": lambda reqs=reqs: peer.loglikelihood(reqs, disable_tqdm=True)}, rounds=args.rounds)
        print(f"{name}: {len(docs)} docs, {len(pairs)} requests, {tokens:,} request tokens, max |dll| {err:.1e}; "
              f"apertus {len(docs) / t['ours']:.1f} docs/s, lm-eval HFLM {len(docs) / t['peer']:.1f} docs/s, "
              f"ratio {t['peer'] / t['ours']:.2f}x")
        measured[name] = {"docs": len(docs), "requests": len(pairs), "request_tokens": tokens, "max_abs_dll": err,
                          "seconds": {"apertus": t["ours"], "lm_eval_hflm": t["peer"]}}
        log.row(f"{name} multiple-choice scoring, {len(docs)} docs, {args.layers}-layer {args.hidden}-wide "
                f"model, vocab 131,072, fp32", f"{len(docs) / t['ours']:.1f} docs/s",
                f"lm-eval HFLM {len(docs) / t['peer']:.1f} docs/s", ratio(t["peer"] / t["ours"]))
    log.write({"hidden": args.hidden, "layers": args.layers, "device": args.device, "rounds": args.rounds,
               "hflm_batch_size": args.batch_size, "batch_tokens": args.batch_tokens, "tasks": measured})


if __name__ == "__main__":
    main()
