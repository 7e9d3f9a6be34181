"""What a run leaves in its out-dir, whatever happens to it: the latest checkpoint (ckpt.pt, what --resume reads) and
the best one (best.pt) side by side; a diverged run stopped with its best weights kept; a run killed outright (SIGKILL,
a torn metrics line) resumed to exactly the uninterrupted run; a full disk during a checkpoint answered in one line with
the previous checkpoint intact; an out-dir locked while a run writes there."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import gpt
import train
from helpers import exit_code, interrupt_at, strip, tiny_args


def args(tmp_path, corpus, *extra):
    # one token cache for every run of a test: the later runs read what the first one wrote
    return [*tiny_args("gpt", tmp_path, corpus, *extra), "--cache-dir", str(tmp_path.parent / "cache")]


def no_tmp_files(out):
    return not [f for f in os.listdir(out) if ".tmp" in f]


# ----------------------------------------------------------------------------------------------------------------------
# best.pt and the divergence guard

# A tiny GPT at lr 2 after an 80-step warm-up: it learns (val 4.19 -> 3.25 nats/token at step 15 on a Zen 4), then
# diverges without a NaN (from step 45 on). How high the loss climbs depends on the CPU's kernels (5.7 with AVX-512, 8.2
# with AVX2 only): the tests read the steps and losses from the run itself, never from a constant.
DIVERGES = ("--lr", "2", "--warmup-iters", "80", "--schedule", "constant", "--eval-interval", "5",
            "--eval-tokens", "512", "--max-iters", "100")


def evals_of(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "eval"]


def is_bad(r, evals):
    """The guard's rule (train.Guard): above the first eval's loss, or above 2x the best up to that eval."""
    best = min(e["val_loss"] for e in evals if e["step"] <= r["step"])
    return r["val_loss"] > evals[0]["val_loss"] or r["val_loss"] > train.Guard.FACTOR * best


def test_a_diverging_run_stops_and_best_pt_holds_the_weights_of_its_best_evaluation(tmp_path, corpus, capsys):
    with pytest.raises(train.UsageError, match=r"diverged.*best\.pt holds the weights of step") as stop:
        train.train(args(tmp_path / "a", corpus, *DIVERGES))
    out = tmp_path / "a" / "out"
    evals = evals_of(out)
    best = min(evals, key=lambda r: r["val_loss"])
    assert best["step"] > 0 and best["val_loss"] < evals[0]["val_loss"] - 0.5, "the recipe no longer learns first"
    assert evals[-1]["step"] < 100, "the guard did not stop the diverging run"
    assert [is_bad(r, evals) for r in evals[-4:]] == [False, True, True, True], \
        "the guard must stop at the third bad evaluation in a row, not earlier or later"
    assert f"holds the weights of step {best['step']};" in str(stop.value), str(stop.value)
    saved = torch.load(out / "best.pt", weights_only=True)
    assert saved["step"] == best["step"] and saved["guard"]["best"] == best["val_loss"], "best.pt is not the best eval"
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == evals[-1]["step"], "ckpt.pt must be the latest"
    assert no_tmp_files(out) and not (out / train.LOCK).exists(), "temporary files or the lock left behind"

    # the same run stopped at the best step wrote exactly best.pt's weights
    train.train(args(tmp_path / "b", corpus, *DIVERGES[:-1], str(best["step"])))
    at_best = torch.load(tmp_path / "b" / "out" / "ckpt.pt", weights_only=True)["model"]
    for k, v in at_best.items():
        assert torch.equal(saved["model"][k], v), f"best.pt's {k} differs from the weights the run had at its best step"

    # with the guard off the run goes on to the end, and still keeps its best
    capsys.readouterr()
    end = evals[-1]["step"] + 5
    train.train(args(tmp_path / "c", corpus, *DIVERGES[:-1], str(end), "--divergence-evals", "0"))
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith(f"done: {end} steps") and f"ckpt.pt (step {end}" in last \
        and f"best.pt (step {best['step']}" in last, f"the last line must name both checkpoints: {last}"
    assert torch.load(tmp_path / "c" / "out" / "best.pt", weights_only=True)["step"] == best["step"]

    # best.pt is a checkpoint like ckpt.pt: samplers and --init-from take it
    assert exit_code(gpt.main, ["--ckpt", str(out / "best.pt"), "--max-new-tokens", "5"]) == 0
    rows = train.train(args(tmp_path / "d", corpus, "--init-from", str(out / "best.pt"), "--max-iters", "1",
                            "--eval-tokens", "512"))
    assert rows[0]["val_loss"] == pytest.approx(best["val_loss"]), "--init-from best.pt did not start from its weights"


def test_the_guard_state_survives_resume(tmp_path, corpus):
    """Stopped between two bad evaluations and resumed, the run stops where the uninterrupted one did."""
    with pytest.raises(train.UsageError) as straight:
        train.train(args(tmp_path / "a", corpus, *DIVERGES))
    evals = evals_of(tmp_path / "a" / "out")
    first_bad = evals[-3]["step"]  # the guard stopped at the third bad evaluation in a row (the test above)
    train.train(args(tmp_path / "b", corpus, *DIVERGES), on_step=interrupt_at(first_bad + 2))
    saved = torch.load(tmp_path / "b" / "out" / "ckpt.pt", weights_only=True)
    assert saved["step"] == first_bad + 2 and saved["guard"]["bad"] == 1, "one bad evaluation before the stop"
    with pytest.raises(train.UsageError) as resumed:
        train.train([*args(tmp_path / "b", corpus, *DIVERGES), "--resume"])
    same = lambda e: str(e.value).replace(str(tmp_path / "a"), "").replace(str(tmp_path / "b"), "")
    assert same(resumed) == same(straight), "the resumed run did not stop where the uninterrupted one did"


# ----------------------------------------------------------------------------------------------------------------------
# A hard kill, and the lock

KILLABLE = ("--max-iters", "40", "--eval-interval", "10", "--log-interval", "1", "--dropout", "0.1")

# The run waits at step 25 to be killed: its last checkpoint is at step 20, its metrics hold steps 21-25 too.
SUBPROCESS = """
import sys, time
sys.path.insert(0, {root!r})
import train
def wait_for_the_kill(step, loss):
    if step == 25:
        open({marker!r}, "w").close()
        time.sleep(120)
train.train({argv!r}, on_step=wait_for_the_kill)
"""


def test_a_run_killed_with_sigkill_and_a_torn_metrics_line_resumes_to_the_uninterrupted_run(tmp_path, corpus, capsys):
    straight = train.train(args(tmp_path / "a", corpus, *KILLABLE))
    argv, marker = args(tmp_path / "b", corpus, *KILLABLE), str(tmp_path / "at-25")
    script = SUBPROCESS.format(root=train.ROOT, marker=marker, argv=argv)
    # the same thread count as this process: its logged losses must match the in-process run's bit for bit
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    try:
        deadline = time.time() + 120
        while not os.path.exists(marker):
            assert p.poll() is None and time.time() < deadline, f"the run ended early:\n{p.stderr.read()[-2000:]}"
            time.sleep(0.05)
        # while it runs, its out-dir is locked: a second run is refused in one line naming it
        capsys.readouterr()
        assert exit_code(train.main, [*argv, "--resume"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"in use by process {p.pid}" in err[0], err
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    out = tmp_path / "b" / "out"
    assert (out / train.LOCK).exists(), "a killed run cannot remove its lock: the test expects one left behind"
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 20
    # tear the last line, as a kill in the middle of the write would
    text = (out / "metrics.jsonl").read_text()
    last = text.rstrip("\n").rsplit("\n", 1)[-1]
    assert json.loads(last)["step"] == 25
    (out / "metrics.jsonl").write_text(text[:len(text) - len(last) // 2 - 1])

    resumed = train.train([*argv, "--resume"])
    said = capsys.readouterr().out
    assert "dropped its torn last line" in said and "dropped 4 rows logged after the checkpoint's step 20" in said, \
        "the resumed run must say what it dropped (the torn line; steps 21-24)"
    assert "taking over the lock of process" in said, "the killed run's lock must be taken over"
    assert strip(resumed) == strip(straight), "killed at step 25 and resumed: not the uninterrupted run"
    on_disk = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [(r["kind"], r["step"]) for r in on_disk]
    assert len(steps) == len(set(steps)) and on_disk == resumed, "the resumed log must hold each step once"
    assert not (out / train.LOCK).exists(), "the lock must be removed when the run ends"


def test_a_torn_line_anywhere_but_last_is_refused(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2\n{"step": 3}\n')
    with pytest.raises(train.UsageError, match="line 2 is not JSON"):
        train._metrics_to_resume(str(tmp_path), 3)


def test_a_stale_or_torn_lock_is_taken_over(tmp_path, corpus, capsys):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer runs
    out = tmp_path / "out"
    out.mkdir()
    for content in (json.dumps({"pid": gone.pid, "host": train.socket.gethostname()}), ""):
        (out / train.LOCK).write_text(content)
        train.train(args(tmp_path, corpus, "--max-iters", "1", "--overwrite"))
        assert "taking over the lock" in capsys.readouterr().out
        assert not (out / train.LOCK).exists(), "the lock must be removed when the run ends"


# ----------------------------------------------------------------------------------------------------------------------
# A full disk


def test_a_full_disk_during_a_checkpoint_is_one_line_and_the_previous_checkpoint_loads(tmp_path, corpus, capsys,
                                                                                        monkeypatch):
    real_save = torch.save

    class FullDisk:
        """A file on a disk that fills after 1000 bytes: write() fails as the kernel's ENOSPC does."""
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            self.n += len(b)
            if self.n > 1000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(b)

        def flush(self):
            self.f.flush()

    def save(state, f, *a, **k):
        return real_save(state, FullDisk(f) if state.get("step") == 10 else f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    argv = args(tmp_path, corpus, "--max-iters", "20", "--eval-interval", "5")
    assert exit_code(train.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0], err
    assert "ckpt.pt (step 5) is intact: --resume continues from it" in err[0], err[0]
    assert "best.pt holds step 5" in err[0], err[0]
    out = tmp_path / "out"
    assert no_tmp_files(out), f"a .tmp file left behind: {os.listdir(out)}"
    assert not (out / train.LOCK).exists(), "the lock must be removed when the run stops"
    monkeypatch.setattr(torch, "save", real_save)
    for name in ("ckpt.pt", "best.pt"):
        assert train.load_checkpoint(str(out / name))["step"] == 5, f"{name} is not the previous checkpoint"
    rows = train.train([*argv, "--resume"])
    assert rows[-1]["step"] == 20, "the run did not resume from the previous checkpoint"
