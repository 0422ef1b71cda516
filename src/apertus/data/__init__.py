"""The open-data pipeline: readers, filters, dedup, PII, robots.txt opt-out, toxicity, tokenized shards, loader.

datatrove logs every input file at INFO on the console; in our builds the console shows WARNING and above and each
task's full log stays in its phase's `logs/` folder (set $APERTUS_DATA_LOG=INFO to see everything)."""

import os
import sys


def _console_level() -> str:
    return os.environ.get("APERTUS_DATA_LOG", "WARNING")


def _quiet_datatrove_console():
    import datatrove.executor.base as base
    import datatrove.utils.logging as dt_logging
    from loguru import logger

    if getattr(base.add_task_logger, "_apertus", False):
        return

    def add_task_logger(logging_dir, rank, local_rank=0, node_rank=-1):
        logger.remove()
        logfile = logging_dir.open(f"logs/task_{rank:05d}.log", "w")
        logger.add(sys.stderr, level=_console_level() if local_rank == 0 else "ERROR", colorize=False)
        logger.add(logfile, level="DEBUG", colorize=False)
        logger.info(f"Launching pipeline for {rank=}")
        return logfile

    def setup_default_logger():
        logger.remove()
        logger.add(sys.stderr, level=_console_level(), colorize=False)

    add_task_logger._apertus = True
    base.add_task_logger = add_task_logger
    dt_logging.setup_default_logger = setup_default_logger


_quiet_datatrove_console()
