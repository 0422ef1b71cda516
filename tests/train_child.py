"""A pretraining run in its own process (optionally under torchrun), for the resume / kill / FSDP tests.

    python tests/train_child.py '{"out": DIR, "recipe": {"train": {"steps": 8}, ...}, "slow": 0.2, "hang_at": 4}'

`recipe`: tables merged into train_data.tiny_recipe(); `slow`: seconds of sleep per micro-batch (so a test can kill
the run between steps); `hang_at`: step whose checkpoint write hangs after the sharded state is on disk but before the
checkpoint is complete (a test kills it there); `val`: validate on held-out batches.
"""

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import train_data  # noqa: E402

from apertus.train import checkpointing  # noqa: E402
from apertus.train.distributed import init_distributed, shutdown  # noqa: E402
from apertus.train.pretrain import pretrain  # noqa: E402
from apertus.train.recipe import parse_recipe  # noqa: E402


def main():
    args = json.loads(sys.argv[1])
    d = init_distributed("cpu")
    table = train_data.tiny_recipe()
    for section, values in args.get("recipe", {}).items():
        table.setdefault(section, {}).update(values)
    recipe = parse_recipe(table, d.world_size)
    make = train_data.make_loader(d.rank, d.world_size, delay=args.get("slow", 0.0))
    if args.get("hang_at"):
        write = checkpointing.atomic_write_json

        def hanging_write(file, obj, **kw):
            if file.parent.name == f".step_{args['hang_at']:08d}.tmp" and file.name.startswith("rank"):
                (Path(args["out"]) / "HANGING").write_text(str(os.getpid()))
                time.sleep(600)
            return write(file, obj, **kw)

        checkpointing.atomic_write_json = hanging_write
    val = train_data.val_batches(64, 4, 2, d.rank, d.world_size) if args.get("val") else None
    pretrain(recipe, args["out"], d, make_loader=make, val_batches=val, token_bytes=train_data.corpus().token_bytes)
    shutdown()


if __name__ == "__main__":
    main()
