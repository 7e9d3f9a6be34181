"""Tests for grading untrusted submissions (assignment.py grade): a submission cannot raise its own score or change the
key, and the report meant for students shows nothing of the hidden tests. Every grade here goes the way
`python assignment.py grade` goes (a process per submission, confined where the machine allows it), on the smallest
assignment: bpe.py:merge with two fast tests, one of them hidden."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

import assignment
import sandbox
from assignment import ROOT

VISIBLE = "tests/test_bpe.py::test_ties_go_to_the_smallest_pair"
HIDDEN = "tests/test_bpe.py::test_cli_train_and_show"

# Appends forged "passed" records wherever a results channel could be: .jsonl files under the grading directory's parent
# and the temp dirs (where results used to be written), and every pipe this process holds, in both record formats.
# merge stays unwritten, so the honest score is 0.
FORGER = '''
import atexit, glob, json, os, stat, tempfile


def _forge():
    ids = [n for t in json.load(open("assignment.json"))["targets"] for n in t["tests"]]
    lines = "".join(json.dumps([n, ["passed", "", False]]) + "\\n" + json.dumps([0, n, ["passed", "", False]]) + "\\n"
                    for n in ids)
    roots = {os.path.dirname(os.path.dirname(os.getcwd())), tempfile.gettempdir(), "/tmp"}
    for root in roots:
        for path in glob.glob(os.path.join(root, "**", "*.jsonl"), recursive=True):
            try:
                with open(path, "a") as f:
                    f.write(lines)
            except OSError:
                pass
    for fd in range(3, 256):
        try:
            if stat.S_ISFIFO(os.fstat(fd).st_mode):
                os.write(fd, lines.encode())
        except OSError:
            pass


_forge()
atexit.register(_forge)
'''

# Finds the key the way a student who read assignment.py would (the grader's command line, its --key) and writes into
# it: a new file, and a hidden test that always passes.
KEY_WRITER = '''
import os


def _find_keys():
    keys = set()
    for pid in [str(os.getppid())] + os.listdir("/proc"):
        try:
            argv = open(f"/proc/{pid}/cmdline", "rb").read().decode().split("\\0")
        except (OSError, ValueError):
            continue
        keys |= {argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--key"}
    return keys


for _key in _find_keys():
    try:
        with open(os.path.join(_key, "tests", "test_bpe.py"), "a") as f:
            f.write("\\n\\ndef test_cli_train_and_show():\\n    pass\\n")
        with open(os.path.join(_key, "planted.py"), "w") as f:
            f.write("print('planted')\\n")
    except OSError:
        pass
'''


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    d = tmp_path_factory.mktemp("merge")
    manifest = assignment.make(["bpe.py:merge"], out=str(d / "student"), hidden=[HIDDEN], tests=[VISIBLE, HIDDEN],
                               log=lambda msg: None)
    assert sorted(manifest["targets"][0]["tests"]) == sorted([VISIBLE, HIDDEN]), manifest["targets"]
    return d / "student", d / "student-key"


def digests(d):
    return {os.path.relpath(os.path.join(p, f), d): hashlib.sha256(open(os.path.join(p, f), "rb").read()).hexdigest()
            for p, _, files in os.walk(d) for f in files}


def submission(d, student, merge_body=None, module_code=""):
    """bpe.py of the student copy with merge's body (unwritten if None) and code run when bpe.py is imported."""
    source = assignment.read(str(student / "bpe.py"))
    if merge_body is not None:
        source = assignment.put_body(source, "merge", merge_body)
    d.mkdir()
    assignment.write(str(d / "bpe.py"), source + module_code)
    return d


def graded(sub, key, *flags):
    """(exit code, the --json report or None, stderr) of `python assignment.py grade SUB --key KEY --json FILE`, run as
    a command: the grader's command line is what a submission can look for."""
    out = sub.parent / (sub.name + ".json")
    out.unlink(missing_ok=True)
    argv = [sys.executable, os.path.join(ROOT, "assignment.py"), "grade", str(sub), "--key", str(key), *flags]
    proc = subprocess.run([*argv, "--json", str(out)], capture_output=True, text=True, timeout=300)
    return proc.returncode, (json.loads(out.read_text()) if out.exists() else None), proc.stderr


def test_forged_results_never_raise_the_score(made, tmp_path):
    student, key = made
    code, g, err = graded(submission(tmp_path / "forger", student, module_code=FORGER), key)
    assert code == 0, f"grading failed: {err}"
    assert g["tampered"] or g["passed"] == 0, f"forged records counted: {g['passed']}/{g['total']} passed"
    if g["tampered"]:
        assert g["passed"] is None and all(t["passed"] is None for t in g["targets"]), "tampered, yet a score shown"
        assert "score withheld" in assignment.format_grade(g), "the text report does not say the score is withheld"


def test_a_submission_cannot_change_the_key_unnoticed(made, tmp_path):
    student, made_key = made
    key = tmp_path / "key"
    shutil.copytree(made_key, key)
    before = digests(key)
    sub = submission(tmp_path / "writer", student, module_code=KEY_WRITER)

    # the way `python assignment.py grade` runs it: where namespaces work, the key is out of reach
    code, g, err = graded(sub, key)
    if sandbox.available():
        assert digests(key) == before, "the confined submission changed the key"
        assert code == 0 and g["passed"] == 0 and not g["tampered"], f"graded wrongly: {code} {err}"
    else:
        assert digests(key) == before or (code != 0 and "planted.py" in err), "the key changed, and nothing said so"

    # without namespaces the submission reaches the key (the attack is real); the hash check refuses to report
    code, g, err = graded(sub, key, "--unconfined")
    assert digests(key) != before, "the unconfined submission did not reach the key: the test no longer tests"
    assert code == 2 and g is None, "grades reported although the key changed while grading"
    assert "changed while grading" in err and "tests/test_bpe.py" in err and "planted.py" in err, \
        f"the refusal does not name the changed files: {err!r}"
    code, _, err = graded(submission(tmp_path / "honest", student), key)
    assert code == 2 and "changed since it was made" in err and "planted.py" in err, \
        f"a key that differs from make's hashes was used: {err!r}"


def test_honest_submissions_grade_as_before_and_the_student_report_hides_the_hidden_tests(made, tmp_path):
    student, key = made
    reference = assignment.body_of(assignment.read(os.path.join(ROOT, "bpe.py")), "merge")
    # a merge that gives overlapping pairs to the rightmost occurrence and prints a marker (which also breaks the hidden
    # CLI test's output): both tests fail, and neither the marker nor the hidden test may reach the students' report
    wrong = """
        print("PRINTED-BY-THE-SUBMISSION")
        out, i = [], len(ids) - 1
        while i >= 0:
            if i > 0 and (ids[i - 1], ids[i]) == pair:
                out.append(new_id)
                i -= 2
            else:
                out.append(ids[i])
                i -= 1
        return out[::-1]
        """
    right = submission(tmp_path / "right", student, reference)
    leaky = submission(tmp_path / "leaky", student, wrong)
    g_right, g_wrong = assignment.grade_all([right, leaky], str(key))
    assert (g_right["passed"], g_right["total"], g_right["tampered"]) == (2, 2, []), g_right["tests"]
    assert {v["outcome"] for v in g_wrong["tests"].values()} == {"failed"}, g_wrong["tests"]
    text = assignment.format_grade(g_wrong)
    assert "1 hidden test function fail" in text, f"the hidden failure is not counted:\n{text}"
    for secret in ("test_cli_train_and_show", "PRINTED-BY-THE-SUBMISSION", g_wrong["tests"][HIDDEN]["message"]):
        assert secret not in text, f"the students' report shows {secret!r}:\n{text}"
    assert g_wrong["log_tail"], "the instructor's report lost the log"
