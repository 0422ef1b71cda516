"""Evaluation: bits-per-byte, multiple choice and generative tasks, the memorization audit, the lm-eval adapter.

    loglik.py        the network's scores: batched log-likelihoods with shared prefixes, rolling NLL
    tasks.py         the embedded datasets (data/) as multiple-choice documents and bits-per-byte corpora
    generative.py    GSM8K / MGSM exact match through the inference engine
    suite.py         `apertus eval MODEL --tasks ...`: runs tasks, aggregates, writes the report
    report.py        JSON + markdown table + PNG charts
    harness.py       lm-evaluation-harness model `apertus` (loglikelihood, rolling, generate_until)
    memorization.py  the Goldfish audit: extraction of inserted probes by exposure count
"""

from .suite import evaluate, run_eval  # the library entry points

__all__ = ["evaluate", "run_eval"]
