"""What ``parablock --help`` costs on top of importing Lightning: CPU seconds of whole processes.

    python benchmarks/startup.py [--repeats 5]

Runs ``python -c "import lightning"`` and ``parablock --help`` alternately, ``--repeats`` times each, and prints
the median CPU time (user + system, of the process and its children) of each and their difference. The target
(issue 27): the difference at most 0.5 s. CPU time, not wall time: it is what the command costs whatever else
the machine is doing. Also lists which heavy packages each start-up loads.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys

TARGET_EXTRA_CPU_S = 0.5
HEAVY = ("lightning", "transformers", "peft", "datasets", "matplotlib")


def cpu_seconds(command: list[str]) -> float:
    """CPU seconds ``command`` used (children's rusage before and after)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def loaded(statement: str) -> list[str]:
    probe = f"import sys\n{statement}\nprint(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    options = parser.parse_args()
    parablock = shutil.which("parablock", path=os.path.dirname(sys.executable)) or "parablock"
    lightning, help_ = [], []
    for _ in range(options.repeats):
        lightning.append(cpu_seconds([sys.executable, "-c", "import lightning"]))
        help_.append(cpu_seconds([parablock, "--help"]))
    base, ours = statistics.median(lightning), statistics.median(help_)
    print(f"python -c 'import lightning': {base:.2f} s CPU (median of {options.repeats}: {lightning})")
    print(f"parablock --help:             {ours:.2f} s CPU (median of {options.repeats}: {help_})")
    print(f"extra: {ours - base:+.2f} s CPU (target <= {TARGET_EXTRA_CPU_S} s): {'met' if ours - base <= TARGET_EXTRA_CPU_S else 'NOT met'}")
    print(f"import lightning_parablock.core loads: {loaded('import lightning_parablock.core') or 'none of ' + ', '.join(HEAVY)}")
    print(f"import lightning loads: {loaded('import lightning')}")


if __name__ == "__main__":
    main()
