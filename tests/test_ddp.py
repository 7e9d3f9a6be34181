"""Many processes (torchrun + DistributedDataParallel, gloo on the CPU): two processes train exactly as one process with
the same global batch, process 0 alone writes, and a run started under torchrun resumes under torchrun."""

import json
import os
import subprocess
import sys

import torch

import train
from helpers import assert_scaled_close, tiny_args


def common(tmp_path, corpus):
    # grad_accum 4 over 2 processes: each takes 2 micro-batches of 2 rows; --lr-decay-iters pins the schedule's
    # horizon so the 4-step first half and its 8-step continuation follow the same one. --no-bias: the key bias's
    # gradient is float noise (softmax ignores a constant on every key's score), which Adam turns into random steps
    return tiny_args("gpt", tmp_path, corpus, "--no-bias", "--batch-size", "2", "--grad-accum", "4", "--dropout", "0",
                     "--log-interval", "1", "--eval-interval", "4", "--lr", "1e-2", "--warmup-iters", "2",
                     "--lr-decay-iters", "8")


def torchrun(args, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(train.ROOT, "train.py"), *args], capture_output=True, text=True, cwd=tmp_path,
                       env=env, timeout=300)
    assert r.returncode == 0, f"torchrun failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def test_two_gloo_processes_train_like_one_with_the_same_global_batch_and_resume(tmp_path, corpus):
    one = train.train([*common(tmp_path, corpus), "--out-dir", str(tmp_path / "one"), "--max-iters", "8"])
    out_dir = str(tmp_path / "two")
    first = torchrun([*common(tmp_path, corpus), "--out-dir", out_dir, "--max-iters", "4"], tmp_path)
    assert "x 2 processes" in first and first.count("eval step 0:") == 1, "process 0 alone must log"
    second = torchrun([*common(tmp_path, corpus), "--out-dir", out_dir, "--max-iters", "8", "--resume"], tmp_path)
    assert "resuming at step 4" in second
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        two = [json.loads(line) for line in f]
    pick = lambda rows, key: [(r["step"], r[key]) for r in rows if key in r]
    assert [s for s, _ in pick(two, "loss")] == list(range(1, 9))
    # The same micro-batches (same shapes, same kernels) in both runs; only the order of summing the gradients
    # differs (DDP's all-reduce): rounding, which Adam's normalised steps carry into the weights (~1.5e-5 of a
    # tensor's largest value after 8 steps at lr 1e-2). Compared relative to each tensor's magnitude.
    for key in ("loss", "val_loss"):
        assert [s for s, _ in pick(one, key)] == [s for s, _ in pick(two, key)]
        assert_scaled_close([a for _, a in pick(two, key)], [a for _, a in pick(one, key)], f"{key}: two and one "
                            f"process", rel=1e-6)
    w1 = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=True)["model"]
    w2 = torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)["model"]
    for k in w1:
        assert_scaled_close(w2[k], w1[k], f"{k} after 8 steps, two processes and one", rel=1e-4)
    assert sorted(os.listdir(out_dir)) == ["best.pt", "ckpt.pt", "loss.png", "metrics.jsonl"], \
        "only process 0 writes, once, and removes its lock at the end"


def test_grad_accum_must_split_over_the_processes(tmp_path, corpus):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [*common(tmp_path, corpus), "--out-dir", str(tmp_path / "x"), "--grad-accum", "3", "--max-iters", "1"]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(train.ROOT, "train.py"), *args], capture_output=True, text=True, cwd=tmp_path,
                       env=env, timeout=300)
    assert r.returncode != 0 and r.stderr.count("grad_accum 3 does not split over 2 processes") == 1, r.stderr[-2000:]
    assert not (tmp_path / "x").exists()
