"""Shared pytest setup: make the project's single-file modules (gpt.py, train.py, bpe.py, ...) importable from tests/,
and a small corpus fixture for tests that run the training loop."""
import os
import sys
import tempfile

import pytest

# Tests write nothing in the working directory: hypothesis keeps its caches (unicode tables) in the system temp dir
# instead of ./.hypothesis. Must be set before hypothesis is first imported.
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(tempfile.gettempdir(), "pretraining-hypothesis"))
# Under pytest-xdist (-n 2: two worker processes share the cores), one torch thread per worker: two workers of two
# threads each on 2 cores oversubscribe them and run several times slower. Set before torch is first imported; the
# processes tests start inherit it.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def write_corpus(d):
    """Five small 'works' cut from the bundled plays (so the text is real), one file each, in directory d."""
    d.mkdir()
    for name in ("hamlet", "macbeth", "othello", "lear", "tempest"):
        with open(os.path.join(ROOT, "data", "shakespeare", name + ".txt")) as f:
            (d / f"{name}.txt").write_text(f.read()[5000:9000])
    return d


@pytest.fixture
def corpus(tmp_path):
    """The five-work test corpus in tmp_path/corpus."""
    return write_corpus(tmp_path / "corpus")


@pytest.fixture(scope="module")
def module_corpus(tmp_path_factory):
    """The same corpus, once per test module (for fixtures that train once and serve every test of a module)."""
    return write_corpus(tmp_path_factory.mktemp("shared") / "corpus")


@pytest.fixture(scope="module")
def plays_corpus(tmp_path_factory):
    """A small pretraining corpus whose characters cover the bundled plays (a char tokenizer must encode the tasks
    tasks.py cuts from them: genre, next line): the alphabet in one file, four works cut as write_corpus does."""
    d = tmp_path_factory.mktemp("plays") / "corpus"
    d.mkdir()
    plays = os.path.join(ROOT, "data", "shakespeare")
    chars = set()
    for name in sorted(os.listdir(plays)):
        chars |= set(open(os.path.join(plays, name), encoding="utf-8").read())
    (d / "alphabet.txt").write_text("".join(sorted(chars)))
    for name in ("hamlet", "macbeth", "lear", "tempest"):
        (d / f"{name}.txt").write_text(open(os.path.join(plays, name + ".txt")).read()[5000:9000])
    return d


@pytest.fixture
def float64():
    """Models built in float64 while a test compares two numerical paths (accumulation and one big batch, fused and
    per-tensor AdamW): the check is then about the maths, not about how this CPU's fp32 kernels round, which differs
    between AMX, AVX-512 and AVX2 machines."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
