"""Makes the plain `lm_eval --model apertus ...` command find our model (lm-eval 0.4 has no plugin entry points).

`apertus eval lm-eval-hook` copies this file into site-packages as `apertus_lm_eval_hook.py` together with a
one-line `apertus-lm-eval.pth` that imports it at interpreter start-up. It uses the standard library only and costs
next to nothing: it waits for `lm_eval.models` (lm-eval's model table) to be imported and then registers `apertus`
as a lazy placeholder for `apertus.eval.harness:ApertusLM`, so neither apertus nor torch is imported unless that
model is asked for. `python -m apertus.eval.harness ARGS` does the same without installing anything.
"""

import importlib.abc
import importlib.util
import sys

NAME, TARGET, WATCH = "apertus", "apertus.eval.harness:ApertusLM", "lm_eval.models"


def register() -> None:
    from lm_eval.api.registry import model_registry

    if NAME not in model_registry:
        model_registry.register(NAME, target=TARGET)


class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != WATCH:
            return None
        sys.meta_path.remove(self)  # find the real module, once
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            register()

        spec.loader.exec_module = exec_then_register
        return spec


def install() -> None:
    if WATCH in sys.modules:
        register()
    elif not any(isinstance(f, _Hook) for f in sys.meta_path):
        sys.meta_path.insert(0, _Hook())


if __name__ == "apertus_lm_eval_hook":  # imported by the .pth line
    install()
