"""Shared by the benchmark scripts: one way to time a call and to stamp and write a results file."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_results(out: str | Path, name: str, argv: list[str] | None, **fields: Any) -> dict[str, Any]:
    """Write ``{"benchmark", "command", **fields, "machine", "when"}`` as JSON to ``out`` and return it."""
    args = argv if argv is not None else sys.argv[1:]
    machine = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "device": "cpu"}
    machine.update(fields.pop("machine", {}))
    result = {"benchmark": name, "command": f"python benchmarks/{name}.py " + " ".join(args), **fields,
              "machine": machine, "when": time.strftime("%Y-%m-%dT%H:%M:%S")}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    return result


def median_ms(fn: Callable[[], object], repeats: int, inner: int = 1, sync: Callable[[], None] = lambda: None,
              warmup: int = 3) -> float:
    """Median over ``repeats`` rounds of the mean ms of ``inner`` calls (after ``warmup`` calls)."""
    for _ in range(warmup):
        fn()
    sync()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        sync()
        samples.append((time.perf_counter() - start) * 1000 / inner)
    return statistics.median(samples)
