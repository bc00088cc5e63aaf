"""Encoding throughput of `dsk featurize` (text): MB of UTF-8 text per second into token shards.

The sample corpus (data/sample/tinyshakespeare.txt, split into paragraphs) is repeated to
>= 20 MB and encoded with a byte-level BPE tokenizer (vocab 1024) by the stage's own
``encode_split`` (batched ``tokenizers`` encoding + memmap shard writing). Each variant runs
in a fresh subprocess so that thread settings cannot leak between them:

* ``dsk-2``: the stage's path as shipped: ASCII documents take the tokenizer's cached-regex
  fast path in one worker process per core (pool start-up timed too), others `tokenizers`'
  parallel ``encode_batch``; run under ``taskset -c 0,1`` on a bigger box to get 2 cores;
* ``dsk-1``: the fast path in this one process (no worker pool);
* ``library-2``: the fast path switched off: every batch through ``encode_batch`` on 2 threads;
* ``library-1``: the same with TOKENIZERS_PARALLELISM=false (one core);
* ``library-loop``: the naive baseline, one library ``encode()`` call per document.

    $ python benchmarks/featurize_encode.py            # ~20 MB
    $ python benchmarks/featurize_encode.py --quick    # ~4 MB
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SAMPLE = REPO / "data" / "sample" / "tinyshakespeare.txt"
TWO = {"RAYON_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "true"}
ONE = {"RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
VARIANTS = {"dsk-2": TWO, "dsk-1": ONE, "library-2": TWO, "library-1": ONE, "library-loop": ONE}
TARGET_MB_S = 5.0


def corpus(target_mb: float) -> list[str]:
    paragraphs = [p for p in SAMPLE.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    size = sum(len(p.encode("utf-8")) for p in paragraphs)
    repeats = max(1, int(-(-target_mb * 1e6 // size)))
    return paragraphs * repeats


def measure(variant: str, target_mb: float, repeats: int) -> dict:
    """Runs inside the subprocess: train once, then time the encoding ``repeats`` times."""
    sys.path.insert(0, str(REPO / "src"))
    from dsk.data.tokenizer import Tokenizer, train_bpe
    from dsk.data.shards import ShardWriter
    from dsk.data.tokenizer import encode_pool, load_tokenizer
    from dsk.featurize.text import encode_split, encode_workers

    paragraphs = [p for p in SAMPLE.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    tokenizer_dir = tempfile.mkdtemp()
    tokenizer_path = Path(tokenizer_dir) / "tokenizer.json"
    Tokenizer(train_bpe(paragraphs, vocab_size=1024)).save(tokenizer_path)
    tok = load_tokenizer(tokenizer_path)
    texts = corpus(target_mb)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    times = []
    with tempfile.TemporaryDirectory() as out:
        for _ in range(repeats):
            started = time.perf_counter()
            tok._word_cache.clear()  # every repeat starts cold
            tok._fast_ascii = variant.startswith("dsk")
            if variant == "library-loop":
                with ShardWriter(out, "train", "uint16", tok.eot_id) as writer:
                    writer.add_many([tok.hf.encode(t, add_special_tokens=False).ids for t in texts])
                n_tokens = writer.n_tokens
            elif variant == "dsk-2":  # exactly what the stage does, pool start-up included
                workers = encode_workers(tok, sum(len(t) for t in texts))
                pool = encode_pool(tokenizer_path, workers) if workers > 1 else None
                try:
                    n_tokens = encode_split(Path(out), tok, "train", texts, "uint16", pool=pool)["tokens"]
                finally:
                    if pool is not None:
                        pool.shutdown()
            else:
                n_tokens = encode_split(Path(out), tok, "train", texts, "uint16")["tokens"]
            times.append(time.perf_counter() - started)
    best = min(times)
    return {"variant": variant, "mb": round(n_bytes / 1e6, 2), "docs": len(texts), "tokens": n_tokens,
            "seconds_best": round(best, 3), "seconds_all": [round(t, 3) for t in times],
            "mb_per_s": round(n_bytes / 1e6 / best, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="~4 MB, one repeat")
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--mb", type=float, default=None, help="corpus size in MB (default 20, quick 4)")
    args = ap.parse_args()
    target_mb = args.mb or (4.0 if args.quick else 20.0)
    repeats = 1 if args.quick else 3
    if args.variant:  # child process
        print(json.dumps(measure(args.variant, target_mb, repeats)))
        return 0

    rows = []
    for variant, env in VARIANTS.items():
        child_env = {**os.environ, **env, "PYTHONPATH": str(REPO / "src")}
        cmd = [sys.executable, __file__, "--variant", variant, "--mb", str(target_mb)] + (["--quick"] if args.quick else [])
        out = subprocess.run(cmd, env=child_env, capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{variant:13s} {row['mb_per_s']:6.2f} MB/s  ({row['mb']} MB, best of {len(row['seconds_all'])})", flush=True)

    by = {r["variant"]: r for r in rows}
    result = {
        "benchmark": "featurize_encode",
        "target_mb_per_s": TARGET_MB_S,
        "meets_target": by["dsk-2"]["mb_per_s"] >= TARGET_MB_S,
        "speedup_vs_library_2": round(by["dsk-2"]["mb_per_s"] / by["library-2"]["mb_per_s"], 2),
        "speedup_vs_library_1": round(by["dsk-2"]["mb_per_s"] / by["library-1"]["mb_per_s"], 2),
        "speedup_vs_library_loop": round(by["dsk-2"]["mb_per_s"] / by["library-loop"]["mb_per_s"], 2),
        "rows": rows,
        "cpu_count": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    (results / "featurize_encode.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["## featurize_encode: text → token shards (byte-level BPE, vocab 1024)", "",
             "| variant | MB | MB/s (best) |", "| --- | ---: | ---: |"]
    lines += [f"| {r['variant']} | {r['mb']} | {r['mb_per_s']} |" for r in rows]
    lines += ["", f"target ≥ {TARGET_MB_S} MB/s on 2 cores: {'met' if result['meets_target'] else 'NOT met'}; "
              f"dsk vs library 2 threads ×{result['speedup_vs_library_2']}, vs library 1 thread "
              f"×{result['speedup_vs_library_1']}, vs per-document loop ×{result['speedup_vs_library_loop']} "
              f"(load average at the end {result['load_avg_1m']} on {result['cpu_count']} cores)", ""]
    (results / "featurize_encode.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
