"""`dsk pretrain --nproc N`: start N ranks with torchrun; each rank runs this module.

The parent writes the run's spec (input, params, seed, flags) to a JSON file and starts
``python -m torch.distributed.run --standalone --nproc-per-node N -m dsk.pretrain.launch SPEC``.
Every rank trains; rank 0 alone commits the artifact, so the parent then finds it in the store.
Starting ``torchrun ... -m dsk pretrain ...`` by hand works too (see docs/distributed.md).

    $ dsk pretrain --preset gpt2 --context 1024 --batch-size 64 --precision bf16 --compile --nproc 2
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from dsk.errors import DskError

# NVLink multicast (NVLS) can take a shared host's GPUs out of service: off in every rank
# (the same list as dsk.train.distributed.SAFE_NCCL_ENV; kept here so the parent stays torch-free)
SAFE_NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def world_size() -> int:
    """How many processes torchrun started (1 when not under torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launch(*, nproc: int, spec: dict, store_root: Path) -> None:
    """Run ``spec`` on ``nproc`` local ranks; raise a one-line DskError if any rank fails."""
    with tempfile.TemporaryDirectory(prefix="dsk-launch-") as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "dsk.pretrain.launch", str(spec_path)]
        env = {**os.environ, "DSK_HOME": str(store_root), **SAFE_NCCL_ENV}
        code = subprocess.run(cmd, env=env).returncode
    if code != 0:
        raise DskError(f"training on {nproc} processes failed (torchrun exit {code}); the ranks' messages are above")


def main(argv: list[str] | None = None) -> int:
    from dsk import console

    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(argv[0]).read_text())
    rank = int(os.environ.get("RANK", "0"))
    console.set_mode(quiet=bool(spec.pop("quiet")) or rank != 0)
    from dsk.pretrain import Params, run

    try:
        run(source=spec["source"], params=Params(**spec["params"]), seed=spec["seed"], force=spec["force"],
            resume=spec["resume"], strategy=spec["strategy"], comm_hook=spec["comm_hook"])
    except DskError as exc:
        sys.stderr.write(f"error (rank {rank}): {exc}\n")
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
