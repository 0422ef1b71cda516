"""Model shapes the benchmarks share: the speedrun's model and shapes with the real Apertus vocabulary (131,072),
where the output layer weighs as it does in the released models (131,072 × 4,096 of the 8B's parameters)."""

import dataclasses

from apertus import preset

SHAPES = {
    "tiny": {},
    "74m": dict(vocab_size=131072, hidden_size=256, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                intermediate_size=1344),
    "150m": dict(vocab_size=131072, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=4, intermediate_size=4032),
    "1.4b": dict(vocab_size=131072, hidden_size=2048, num_hidden_layers=16, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, intermediate_size=10752),
}


def shape_config(name: str):
    """The ApertusConfig of a shape: the tiny preset with the shape's sizes ("8b": the Apertus-8B preset)."""
    if name == "8b":
        return preset("apertus-8b")
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; choose one of {', '.join([*SHAPES, '8b'])}")
    return dataclasses.replace(preset("tiny"), **SHAPES[name])
