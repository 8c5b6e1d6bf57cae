"""Seconds per notebook from a pytest JUnit XML report (nbval: one test case per cell).

Usage: ``python .ci/junit_times.py report.xml``. With ``--dist loadscope`` each notebook runs on one
worker, so a notebook's summed cell times are its wall time.
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from collections import defaultdict


def notebook_seconds(path: str) -> dict[str, float]:
    """``{notebook: summed seconds of its cells}``, in the report's order."""
    out: dict[str, float] = defaultdict(float)
    for case in ET.parse(path).getroot().iter("testcase"):
        name = case.get("classname") or case.get("file") or "?"
        out[name.replace(".", "/").removesuffix("/ipynb") + ".ipynb"] += float(case.get("time", 0))
    return dict(out)


if __name__ == "__main__":
    times = notebook_seconds(sys.argv[1])
    width = max(map(len, times), default=0)
    for name, s in sorted(times.items(), key=lambda kv: -kv[1]):
        print(f"{name:<{width}}  {s:7.1f} s")
    print(f"{'all notebooks (summed)':<{width}}  {sum(times.values()):7.1f} s")
