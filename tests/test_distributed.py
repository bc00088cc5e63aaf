"""Several processes on this CPU (gloo): the same loss curve and weights as one process with the
same global batch, through `dsk pretrain --nproc 2` (DDP) and through FSDP2 checkpoints resumed
on another number of ranks (torch.distributed.checkpoint resharding)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain_helpers import make_tokens_artifact

HERE = Path(__file__).resolve().parent
WORKER = HERE / "dist_worker.py"
# dense: the test is about DDP's gradient averaging; with MoE a token at a near-tie of two experts
# may route differently after float rounding and the curves then drift apart for that reason alone
TINY = ["--preset", "tiny-dense", "--max-steps", "6", "--batch-size", "4", "--context", "32", "--eval-every", "3", "--log-every", "1",
        "--warmup-steps", "2", "--eval-tokens", "2048", "--threads", "1"]


def curve(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def assert_same_curve(one: list[dict], two: list[dict]) -> None:
    assert [(r["step"], r["split"]) for r in one] == [(r["step"], r["split"]) for r in two]
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6), (a, b)
        if a["split"] == "train":
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4, abs=1e-6)
            # the routers see the global load on every rank: the same counts as one process (a
            # token at a near-tie of two experts may flip with float rounding, so allow 2 tokens)
            for layer, load in a.get("expert_load", {}).items():
                assert sum(b["expert_load"][layer]) == sum(load)
                assert max(abs(x - y) for x, y in zip(b["expert_load"][layer], load)) <= 2


def test_two_gloo_ranks_match_one_process(cli, workspace):
    """`dsk pretrain --nproc 2` (torchrun, gloo, DDP) == one process with the same global batch."""
    make_tokens_artifact()
    code, out, err = cli("pretrain", *TINY, "--json")
    assert code == 0, err
    one = json.loads(out)
    one_path = Path(one["path"])
    one_curve, one_weights = curve(one_path), weights(one_path / "model.safetensors")

    # same params, so the same artifact id: --force rebuilds it with two processes
    code, out, err = cli("pretrain", *TINY, "--nproc", "2", "--force", "--json")
    assert code == 0, err
    two = json.loads(out)
    assert two["id"] == one["id"] and two["metrics"]["nproc"] == 2 and two["metrics"]["strategy"] == "ddp"
    assert sorted(p.name for p in Path(two["path"]).iterdir()) == sorted(p.name for p in one_path.iterdir())
    assert_same_curve(one_curve, curve(Path(two["path"])))
    two_weights = weights(Path(two["path"]) / "model.safetensors")
    for name, w in one_weights.items():
        torch.testing.assert_close(two_weights[name], w, rtol=1e-4, atol=1e-5, msg=name)


def test_batch_that_does_not_split_over_ranks_is_an_error(cli, workspace):
    make_tokens_artifact()
    code, _, err = cli("pretrain", "--batch-size", "3", "--nproc", "2")
    assert code == 2 and "does not split over 2" in err and "\n" not in err.strip()
    assert not (workspace / "artifacts" / "pretrain").exists()


@pytest.mark.parametrize("args, words", [
    (["--strategy", "zero3"], "use ddp|fsdp"),
    (["--comm-hook", "int8"], "none|bf16|fp16|powersgd"),
    (["--strategy", "fsdp", "--comm-hook", "bf16"], "is a DDP option"),
])
def test_bad_distributed_options_are_one_line_errors(cli, workspace, args, words):
    make_tokens_artifact()
    code, _, err = cli("pretrain", "--nproc", "2", *args)
    assert code == 2 and words in err and "\n" not in err.strip()


def run_worker(nproc: int, *args: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 \
        else [sys.executable]
    proc = subprocess.run([*launcher, str(WORKER), *args], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow  # three more torch processes: ~40 s on a quiet 2-core machine
def test_fsdp_checkpoint_resumes_on_one_process(workspace, tmp_path):
    """FSDP2 on 2 ranks checkpoints step 3 (sharded, DCP); one process resumes it and ends where the 2 ranks did."""
    tokens = str(make_tokens_artifact().path)
    two_dir, resumed_dir = tmp_path / "two", tmp_path / "resumed"
    run_worker(2, "--tokens", tokens, "--run-dir", str(two_dir), "--out", str(tmp_path / "two.safetensors"),
               "--strategy", "fsdp", "--checkpoint-every", "3")
    ckpt = two_dir / "checkpoints" / "step-00000003"
    assert (ckpt / "dcp").is_dir() and json.loads((ckpt / "meta.json").read_text())["world"] == 2

    run_worker(1, "--tokens", tokens, "--run-dir", str(resumed_dir), "--out", str(tmp_path / "resumed.safetensors"),
               "--resume-from", str(ckpt))
    two_curve = [r for r in curve(two_dir) if r["step"] > 3]
    resumed_curve = [r for r in curve(resumed_dir) if r["step"] > 3]
    assert [r["step"] for r in resumed_curve] == [4, 5, 6, 6]  # three train records, then the final eval
    assert_same_curve(two_curve, resumed_curve)
    two_w, resumed_w = weights(tmp_path / "two.safetensors"), weights(tmp_path / "resumed.safetensors")
    for name, w in two_w.items():
        torch.testing.assert_close(resumed_w[name], w, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow  # two more torch processes
def test_fsdp_through_the_cli_writes_the_same_model(cli, workspace):
    """`--nproc 2 --strategy fsdp`: rank 0 gathers the sharded weights into the usual artifact."""
    from dsk.models import load_model

    make_tokens_artifact()
    code, out, err = cli("pretrain", *TINY, "--json")
    assert code == 0, err
    one = json.loads(out)
    one_weights = weights(Path(one["path"]) / "model.safetensors")
    code, out, err = cli("pretrain", *TINY, "--nproc", "2", "--strategy", "fsdp", "--force", "--json")
    assert code == 0, err
    two = json.loads(out)
    assert two["metrics"]["strategy"] == "fsdp"
    assert two["metrics"]["val_loss"] == pytest.approx(one["metrics"]["val_loss"], rel=1e-5)
    load_model(two["path"])
    two_weights = weights(Path(two["path"]) / "model.safetensors")
    for name, w in one_weights.items():
        torch.testing.assert_close(two_weights[name], w, rtol=1e-4, atol=1e-5, msg=name)
