"""The JSON log every benchmark writes to bench/results/<name>[-<variant>].json; bench/table.py turns the logs'
`rows` into the README's performance table.

A log holds the benchmark's own raw measurements (its keys) plus these keys, written by `BenchLog.write`:
    benchmark             "bench/<name>.py"
    variant               the options that change what is measured ("tiny-fp32"), also the file name's suffix
    command               the command line that produced it
    date                  UTC ISO time of the write
    load_average_before   os.getloadavg() when the benchmark started (1, 5, 15 minutes)
    load_average_after    os.getloadavg() when it finished
    machine               cpu, isa, bf16_matrix_units, cores, torch_threads, gpu, python, torch, transformers, platform
    rows                  [{"benchmark", "apertus", "peer", "ratio"}]: what the README table shows, figures formatted
APERTUS_BENCH_RESULTS=<dir> writes the logs elsewhere (for smoke runs that must not replace the committed logs).
"""

import datetime
import importlib.metadata
import os
import platform
import shlex
import sys
from pathlib import Path

from apertus.util import atomic_write_json

RESULTS = Path(__file__).resolve().parent / "results"
HEADER = ("benchmark", "variant", "command", "date", "load_average_before", "load_average_after", "machine", "rows")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpuinfo() -> tuple[str, set[str]]:
    """CPU model name and feature flags from /proc/cpuinfo (Linux); platform's processor string elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), set()
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    return fields.get("model name") or platform.processor() or platform.machine(), set(fields.get("flags", "").split())


def machine() -> dict:
    """Facts about the machine that decide the figures: CPU, its widest matrix instructions, cores, GPU, versions."""
    import torch

    cpu, flags = _cpuinfo()
    # the widest instruction set the CPU kernels can use: bf16 products are ~7x slower without AVX-512 BF16 / AMX
    isa = next((name for flag, name in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX-512 BF16"),
                                        ("avx512f", "AVX-512"), ("avx2", "AVX2"), ("neon", "NEON"),
                                        ("asimd", "NEON")) if flag in flags), platform.machine())
    try:
        bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        bf16 = None
    return {"cpu": cpu, "isa": isa, "bf16_matrix_units": bf16, "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": _version("transformers"), "platform": platform.platform()}


def command() -> str:
    """The command line, with the script's path relative to the repository when it lies inside it."""
    script = Path(sys.argv[0]).resolve()
    root = RESULTS.parents[1]
    shown = str(script.relative_to(root)) if script.is_relative_to(root) else sys.argv[0]
    return shlex.join(["python", shown, *sys.argv[1:]])


def ratio(x: float) -> str:
    return f"{x:.2f}x"


class BenchLog:
    """Started when the benchmark starts (load average before), written when it ends."""

    def __init__(self, name: str, variant=(), out: str | os.PathLike | None = None):
        self.name = name
        self.variant = "-".join(str(v) for v in variant if v not in (None, ""))
        self.out = Path(out or os.environ.get("APERTUS_BENCH_RESULTS") or RESULTS)
        self.load_before = list(os.getloadavg())
        self.rows: list[dict] = []

    @property
    def path(self) -> Path:
        return self.out / (f"{self.name}-{self.variant}.json" if self.variant else f"{self.name}.json")

    def row(self, benchmark: str, apertus: str, peer: str = "", ratio: str = "") -> None:
        """One README table row: what was measured (size, dtype), our figure, the peer's name and figure, the ratio."""
        self.rows.append({"benchmark": f"`bench/{self.name}.py` {benchmark}", "apertus": apertus, "peer": peer,
                          "ratio": ratio})

    def write(self, measurements: dict) -> Path:
        """The log: the header keys above, then the benchmark's raw measurements (which must not reuse them)."""
        clash = set(measurements) & set(HEADER)
        if clash:
            raise ValueError(f"bench/{self.name}.py: measurement keys {sorted(clash)} clash with the log's header")
        log = {"benchmark": f"bench/{self.name}.py", "variant": self.variant, "command": command(),
               "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
               "load_average_before": self.load_before, "load_average_after": list(os.getloadavg()),
               "machine": machine(), "rows": self.rows, **measurements}
        self.out.mkdir(parents=True, exist_ok=True)
        path = atomic_write_json(self.path, log)
        print(f"log: {path}", flush=True)
        return path
