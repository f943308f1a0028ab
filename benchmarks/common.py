"""Shared by the benchmark commands: machine description, medians, and the dated rows appended to BENCHMARKS.md."""

from __future__ import annotations

import os
import platform
import statistics
import sys
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS_MD = REPO / "BENCHMARKS.md"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal")).split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} CPU cores ({cpu}){mem}"


def summary(values: list[float]) -> tuple[float, float, float]:
    """(median, min, max)."""
    return statistics.median(values), min(values), max(values)


def command() -> str:
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(REPO).as_posix() if script.is_relative_to(REPO) else script.name
    return "python " + " ".join([shown, *sys.argv[1:]])


def table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def append(section: str, text: str, record: bool = True) -> None:
    """Append a dated block under ``## <section>`` in BENCHMARKS.md (the section is created when missing)."""
    if not record:
        return
    block = f"\n{date.today().isoformat()}, {machine()}, `{command()}`:\n\n{text}\n"
    md = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else "# Benchmarks\n"
    heading = f"## {section}"
    if heading not in md:
        md = md.rstrip("\n") + f"\n\n{heading}\n"
        md += block
    else:
        start = md.index(heading)
        nxt = md.find("\n## ", start + len(heading))
        end = len(md) if nxt == -1 else nxt
        md = md[:end].rstrip("\n") + "\n" + block + md[end:]
    BENCHMARKS_MD.write_text(md)


def gemm_peak_gflops(n: int = 2048, reps: int = 5, threads: int | None = None) -> float:
    """The machine's measured fp32 matmul peak: best of ``reps`` timed ``n x n @ n x n`` torch GEMMs, in GFLOP/s."""
    import time

    import torch

    if threads:
        torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    torch.mm(a, b, out=out)  # warm-up: thread pool, packing buffers
    best = float("inf")
    for _ in range(reps):
        started = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best / 1e9


def load_average() -> str:
    """The 1-, 5- and 15-minute load averages, as `uptime` prints them."""
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())
