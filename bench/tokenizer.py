"""Encode throughput (MB/s): apertus.tokenizer vs transformers.AutoTokenizer, same tokenizer.json, same text.

    python bench/tokenizer.py [--file FILE] [--tokenizer DIR_OR_JSON] [--rounds 3]

Default text: the FLORES-200 sentences of all 205 languages (embedded data, ~12 MB). Two ways of encoding:
batched (all lines at once, the data pipeline's path) and one line at a time. Both produce the same ids (checked).
The log (bench/_log.py) goes to bench/results/tokenizer[-<file stem>][-<tokenizer stem>].json
"""

import argparse
import os
from pathlib import Path

import transformers
from _log import BenchLog, ratio
from _timing import interleaved

from apertus.tokenizer import Tokenizer, apertus_tokenizer_path
from apertus.tokenizer_eval import read_flores


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--file", help="UTF-8 text file (default: FLORES, all languages)")
    ap.add_argument("--tokenizer", help="tokenizer.json or directory (default: the released Apertus tokenizer)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--single-lines", type=int, default=20000, help="lines for the one-at-a-time measurement")
    args = ap.parse_args()
    log = BenchLog("tokenizer", [Path(args.file).stem if args.file else "",
                                 Path(args.tokenizer).stem if args.tokenizer else ""])
    text = open(args.file, encoding="utf-8").read() if args.file else "\n".join(read_flores().values())
    lines = [line for line in text.splitlines() if line]
    mb = sum(len(line.encode("utf-8")) for line in lines) / 1e6
    path = args.tokenizer or apertus_tokenizer_path()
    ours = Tokenizer.from_file(path)
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path if str(path).endswith(".json")
                                                                  else os.path.join(path, "tokenizer.json")))
    assert ours.encode_batch(lines[:2000], bos=False) == ref(lines[:2000], add_special_tokens=False)["input_ids"]
    few = lines[:args.single_lines]
    mb_few = sum(len(line.encode("utf-8")) for line in few) / 1e6
    print(f"{mb:.1f} MB, {len(lines):,} lines; {os.cpu_count()} CPUs; tokenizers threads: "
          f"{os.environ.get('RAYON_NUM_THREADS', 'all')}")
    print(f"{'mode':12} {'apertus MB/s':>13} {'transformers MB/s':>18} {'ratio':>6}")
    t = interleaved({"ours": lambda: ours.encode_batch(lines, bos=False),
                     "ref": lambda: ref(lines, add_special_tokens=False)["input_ids"]}, rounds=args.rounds)
    print(f"{'batched':12} {mb / t['ours']:13.2f} {mb / t['ref']:18.2f} {t['ref'] / t['ours']:5.2f}x")
    source = Path(args.file).name if args.file else "FLORES, 205 languages"
    log.row(f"encode {source} ({mb:.1f} MB), batched", f"{mb / t['ours']:.2f} MB/s",
            f"transformers `PreTrainedTokenizerFast` {mb / t['ref']:.2f} MB/s", ratio(t["ref"] / t["ours"]))
    seconds = {"batched": t}
    t = interleaved({"ours": lambda: [ours.encode(s, bos=False) for s in few],
                     "ref": lambda: [ref.encode(s, add_special_tokens=False) for s in few]}, rounds=args.rounds)
    print(f"{'one by one':12} {mb_few / t['ours']:13.2f} {mb_few / t['ref']:18.2f} {t['ref'] / t['ours']:5.2f}x")
    log.row(f"encode {source}, one line at a time ({len(few):,} lines)", f"{mb_few / t['ours']:.2f} MB/s",
            f"transformers `PreTrainedTokenizerFast` {mb_few / t['ref']:.2f} MB/s", ratio(t["ref"] / t["ours"]))
    seconds["one_by_one"] = t
    log.write({"text": args.file or "flores", "tokenizer": str(path), "megabytes": mb, "lines": len(lines),
               "single_lines": len(few), "single_megabytes": mb_few, "rayon_threads":
               os.environ.get("RAYON_NUM_THREADS"), "rounds": args.rounds, "seconds": seconds})


if __name__ == "__main__":
    main()
