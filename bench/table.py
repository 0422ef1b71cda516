"""The README's performance table, generated from the benchmark logs in bench/results/*.json.

To regenerate: run the benchmarks (`make bench`, or one of them, e.g. `python bench/engine.py --dtype bf16`), each of
which writes its log (bench/_log.py), then `make bench-table` (= `python bench/table.py`). The table between the
README's `<!-- bench-table:start -->` and `<!-- bench-table:end -->` markers is replaced by one row per `rows` entry
of every log, followed by one line per log naming its machine, date and load average.
`python bench/table.py --check` changes nothing and exits 1 when the README's table differs from the logs'.

Only the standard library is used, so the check is cheap (no torch import).
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"
# the order of the old hand-written table: the model, then training, inference, evaluation, data, serving extras
ORDER = ["model", "train", "engine", "decode", "eval", "tokenizer", "data", "server", "output_filter", "prefix",
         "structured"]


def load_logs(results: Path) -> list[tuple[str, dict]]:
    """(log name, log) of every results/*.json, in ORDER of the benchmark, then by name."""
    logs = []
    for path in sorted(results.glob("*.json")):
        try:
            log = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise SystemExit(f"{path}: not valid JSON ({e})") from e
        if not isinstance(log, dict) or not isinstance(log.get("rows"), list):
            raise SystemExit(f"{path}: no `rows` list; logs are written by bench/_log.py (rerun the benchmark)")
        bad = [r for r in log["rows"] if not isinstance(r, dict) or not {"benchmark", "apertus"} <= set(r)]
        if bad:  # e.g. a log from before bench/_log.py, whose `rows` held raw measurements
            raise SystemExit(f"{path}: `rows` entries need `benchmark` and `apertus` (and `peer`, `ratio`): {bad[0]}")
        if log.get("smoke"):  # a run that checks a benchmark still works (bench/gpu.py --size tiny), not a result
            continue
        logs.append((path.stem, log))

    def key(item):
        bench = Path(item[1].get("benchmark", item[0])).stem
        return (ORDER.index(bench) if bench in ORDER else len(ORDER), bench, item[0])

    return sorted(logs, key=key)


def cell(text) -> str:
    return str(text if text is not None else "").replace("|", "\\|").replace("\n", " ")


def machine_line(name: str, log: dict, link: str) -> str:
    """`name`: CPU, ISA, bf16 units, cores, GPU; date; load average (1 minute) before → after; command."""
    m = log.get("machine") or {}
    parts = [m.get("cpu"), m.get("isa")]
    if m.get("bf16_matrix_units") is not None:
        parts.append("bf16 matrix units" if m["bf16_matrix_units"] else "no bf16 matrix units")
    if m.get("cores"):
        parts.append(f"{m['cores']} cores")
    if m.get("gpu"):
        parts.append(m["gpu"])
    loads = [f"{x[0]:.1f}" if x else "not recorded"
             for x in (log.get("load_average_before"), log.get("load_average_after"))]
    parts += [str(log.get("date", "?"))[:10], f"load {loads[0]} → {loads[1]} (1 min, before → after)"]
    command = f"; `{log['command']}`" if log.get("command") else ""
    note = " (see the log's note)" if log.get("note") else ""
    return f"- [{name}]({link}): {', '.join(p for p in parts if p)}{command}{note}"


def render(logs: list[tuple[str, dict]], link_base: str = "bench/results") -> str:
    """The text between the markers: the table, then the machine of each log."""
    lines = ["| benchmark | apertus | peer | ratio | log |", "|---|---|---|---|---|"]
    for name, log in logs:
        for row in log["rows"]:
            lines.append("| " + " | ".join(cell(row.get(k)) for k in ("benchmark", "apertus", "peer", "ratio"))
                         + f" | {name} |")
    lines += ["", "Logs (machine, date, load average, command):", ""]
    lines += [machine_line(name, log, f"{link_base}/{name}.json") for name, log in logs]
    return "\n".join(lines)


def replace_table(readme: str, table: str) -> str:
    if readme.count(START) != 1 or readme.count(END) != 1 or readme.index(START) > readme.index(END):
        raise SystemExit(f"the README needs exactly one {START} ... {END} pair, in that order")
    head, rest = readme.split(START)
    _, tail = rest.split(END)
    return f"{head}{START}\n{table}\n{END}{tail}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the README's table is out of date; write nothing")
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md")
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args(argv)
    readme = args.readme.read_text(encoding="utf-8")
    try:  # links relative to the README, so they work wherever the README is
        link_base = args.results.resolve().relative_to(args.readme.resolve().parent).as_posix()
    except ValueError:
        link_base = args.results.resolve().as_posix()
    new = replace_table(readme, render(load_logs(args.results), link_base))
    if args.check:
        if new != readme:
            print(f"{args.readme}: the performance table is out of date with {args.results}; run `make bench-table`",
                  file=sys.stderr)
            return 1
        return 0
    if new != readme:
        tmp = args.readme.with_name(args.readme.name + ".tmp")
        tmp.write_text(new, encoding="utf-8")
        tmp.replace(args.readme)  # atomic: the README is never half written
    print(f"{args.readme}: {sum(len(log['rows']) for _, log in load_logs(args.results))} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
