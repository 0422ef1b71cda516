"""`python -m apertus.train RECIPE` (what `apertus train` and `torchrun ... -m apertus.train` run)."""

import sys

from .pretrain import main

sys.exit(main())
