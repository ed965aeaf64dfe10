"""What machine a benchmark ran on, for the results files of bench/report.py and
bench/preprocess_report.py."""

from __future__ import annotations

import platform


def cpu_model() -> str:
    """The processor's model name from /proc/cpuinfo, else platform.processor()."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
