"""The demo behind ``python -m sk_softmerge``."""

import subprocess
import sys


def test_demo_prints_comparison():
    result = subprocess.run(
        [sys.executable, "-m", "sk_softmerge"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    lines = result.stdout.splitlines()
    table = {
        line.rsplit(None, 1)[0]: float(line.rsplit(None, 1)[1])
        for line in lines
        if line[:1].isalpha() and line.rstrip()[-1:].isdigit()
    }
    for name in [
        "member 0",
        "member 4",
        "best member (1 pass)",
        "uniform soup (1 pass)",
        "greedy soup (1 pass)",
        "output ensemble (5 passes)",
        "SoftMerge (1 pass)",
    ]:
        assert 0.5 < table[name] <= 1.0
