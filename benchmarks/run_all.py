"""`make bench`: run every benchmark script in this folder; each writes results/<name>.{json,md}.

    $ python benchmarks/run_all.py            # all
    $ python benchmarks/run_all.py clean_dedup
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    # *_sweep.py are tuning tools that need a --workspace and run for long, not benchmarks
    scripts = sorted(p for p in HERE.glob("*.py") if p.name not in {"run_all.py", "common.py"}
                     and not p.name.startswith("_") and not p.stem.endswith("_sweep"))
    if argv:
        scripts = [p for p in scripts if p.stem in argv]
    failed = []
    for script in scripts:
        print(f"== {script.stem}", flush=True)
        started = time.perf_counter()
        rc = subprocess.call([sys.executable, str(script)])
        print(f"== {script.stem}: rc={rc} in {time.perf_counter() - started:.0f}s", flush=True)
        if rc != 0:
            failed.append(script.stem)
    for md in sorted((HERE / "results").glob("*.md")):
        print(md.read_text())
    if failed:
        print("failed: " + ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
