"""What `make demo` runs until the end-to-end speedrun exists: the tiny Apertus model, exported and reloaded.

Builds the tiny preset, writes it as a Hugging Face checkpoint, loads it back with apertus and with transformers'
ApertusForCausalLM, and shows that both give the same logits.
"""

import argparse
from pathlib import Path

import torch
import transformers

from apertus import build_model, load_model, preset

ap = argparse.ArgumentParser()
ap.add_argument("--out", default="runs/demo")
args = ap.parse_args()

out = Path(args.out) / "tiny-init"
model = build_model(preset("tiny"), seed=0)
model.save_pretrained(out)
print(f"wrote {out} ({sum(f.stat().st_size for f in out.iterdir()) / 1e6:.1f} MB)")
ours = load_model(out)
ref = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
ids = torch.randint(0, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    diff = (ours(ids) - ref(ids).logits).abs().max().item()
print(f"logits of apertus vs transformers ApertusForCausalLM on 64 tokens: max |diff| = {diff:.2e}")
print("Not built yet: data pipeline, tokenizer training, pretraining, SFT, QRPO, eval, engine, server (see README).")
