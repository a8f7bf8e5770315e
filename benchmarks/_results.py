"""Shared by the benchmark scripts: one way to stamp and write a results file."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
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
