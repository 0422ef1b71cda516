"""lm-evaluation-harness model `apertus`: any task of the harness on our checkpoints, scored by our code.

    lm_eval --model apertus --model_args pretrained=DIR[,dtype=bf16,max_length=4096,batch_tokens=16384] --tasks ...

needs the start-up hook once per environment (`apertus eval lm-eval-hook`, see lm_eval_hook.py); without it,
`python -m apertus.eval.harness` takes the same arguments as `lm_eval`. In Python, importing this module registers
the model: `lm_eval.simple_evaluate(model="apertus", model_args="pretrained=DIR", tasks=[...])`.

loglikelihood and loglikelihood_rolling run loglik.Scorer (shared contexts computed once, the harness's tokenization
split, `<s>` first); generate_until runs the inference engine (apertus.infer.engine) with its shared sampler.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from pathlib import Path

import lm_eval.models  # noqa: F401  (fill lm-eval's model table first: an early entry would stop it loading)
import torch
from lm_eval.api.model import LM

from . import lm_eval_hook
from .generative import CHAT_DATE
from .loglik import Scorer


class ApertusLM(LM):
    def __init__(self, pretrained: str, tokenizer: str | None = None, dtype: str = "fp32", device: str | None = None,
                 max_length: int = 4096, batch_tokens: int = 8192, batch_size=None, max_batch_size=None,
                 chat_date: str = CHAT_DATE, **kwargs):
        super().__init__()
        if kwargs:
            raise ValueError(f"apertus: unknown model_args {sorted(kwargs)}")
        if device and device.startswith("cuda") and not torch.cuda.is_available():
            device = None  # lm_eval's default is cuda; like its HF model, run where we can
        self.scorer = Scorer.from_pretrained(pretrained, dtype=dtype, device=device, tokenizer=tokenizer,
                                             max_len=int(max_length), batch_tokens=int(batch_tokens))
        self.pretrained, self.chat_date = str(pretrained), chat_date
        self._device = self.scorer.device
        self._engine = None

    # --- scoring -----------------------------------------------------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        self.scorer.progress = not disable_tqdm
        return self.scorer.loglikelihood([tuple(r.args) for r in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The harness's disjoint windows of max_length tokens, each with as much context as fits."""
        self.scorer.progress = not disable_tqdm
        return [-nll for nll, _ in self.scorer.rolling_nll([r.args[0] for r in requests])]

    # --- generation --------------------------------------------------------------------------------------------------

    @property
    def engine(self):
        if self._engine is None:
            from ..infer.engine import Engine

            self._engine = Engine(self.scorer.model, tokenizer=self.scorer.tokenizer)
        return self._engine

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from ..infer.engine import SamplingParams

        prompts, params = [], []
        for r in requests:
            context, kw = r.args
            kw = dict(kw or {})
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_tokens = int(kw.pop("max_gen_toks", 256))
            greedy = not kw.pop("do_sample", False) or float(kw.get("temperature", 0) or 0) == 0
            params.append(SamplingParams(
                temperature=0.0 if greedy else float(kw["temperature"]),
                top_p=None if greedy else float(kw.get("top_p", 1.0)), max_tokens=max_tokens,
                stop=[s for s in until if s], stop_token_ids=[self.scorer.eos_id], skip_special_tokens=True,
                seed=int(kw["seed"]) if "seed" in kw else None))
            ids = self.scorer.encode([context])[0]
            ids = ids if ids[:1] == [self.scorer.bos_id] else [self.scorer.bos_id] + ids
            prompts.append(ids[-max(1, self.scorer.max_len - max_tokens):])  # keep the end of a long prompt
        return [req.result().text for req in self.engine.generate(prompts, params)]

    # --- chat --------------------------------------------------------------------------------------------------------

    @property
    def tokenizer_name(self) -> str:
        return f"apertus:{self.pretrained}"

    def chat_template(self, chat_template: bool | str = False) -> str:
        return "apertus"  # the Apertus chat format of apertus.chat (identifies the request cache)

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        from ..chat import render

        return render(chat_history, add_generation_prompt=add_generation_prompt, date=self.chat_date)

    def get_model_info(self) -> dict:
        return {"model_name": self.pretrained, "model_num_parameters": self.scorer.model.num_params()}


# By name, not by class: running this file as __main__ must not register a second, differently named class.
lm_eval_hook.register()


def install_hook(site_dir: str | os.PathLike | None = None, uninstall: bool = False) -> list[Path]:
    """Install (or remove) the start-up hook that lets the plain `lm_eval` command find `--model apertus`:
    `apertus_lm_eval_hook.py` and `apertus-lm-eval.pth` in `site_dir` (default: this interpreter's site-packages)."""
    site = Path(site_dir or sysconfig.get_paths()["purelib"])
    module, pth = site / "apertus_lm_eval_hook.py", site / "apertus-lm-eval.pth"
    if uninstall:
        for f in (module, pth):
            f.unlink(missing_ok=True)
        return [module, pth]
    site.mkdir(parents=True, exist_ok=True)
    for src, dst in ((Path(__file__).with_name("lm_eval_hook.py"), module), (None, pth)):
        tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
        if src is None:
            tmp.write_text("import apertus_lm_eval_hook\n")
        else:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    return [module, pth]


def hook_text(files: list[Path], uninstall: bool = False) -> str:
    """What `install_hook` did, in one line."""
    return ("removed " if uninstall else "installed ") + ", ".join(map(str, files))


def main(argv: list[str] | None = None) -> None:
    """`python -m apertus.eval.harness ARGS`: lm-eval's own command line with `apertus` registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval"] + list(sys.argv[1:] if argv is None else argv)
    cli_evaluate()


if __name__ == "__main__":
    main()
