"""What `make demo` runs: the speedrun, the whole Apertus pipeline on the embedded corpus (`apertus speedrun`).

    python runs/demo.py --out runs/demo            # = apertus speedrun --out runs/demo; then read runs/demo/report.md
"""

import sys

from apertus.cli import main

if __name__ == "__main__":
    sys.exit(main(["speedrun", *sys.argv[1:]]))
