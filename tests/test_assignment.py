"""Tests for assignment.py: blanking touches nothing but the bodies, and for every ready-made assignment the three facts
an instructor relies on: the generated tests all fail with NotImplementedError before anything is filled in, they all
pass once the reference bodies are copied back, and a deliberately wrong implementation of a target fails its tests.
The reference files are byte-identical before and after. Each assignment is generated from a few fast reference tests
(`tests=`): finding the tests of the whole suite takes minutes, and the mechanism is the same."""

import ast
import hashlib
import json
import os

import pytest

import assignment
from assignment import ASSIGNMENTS, ROOT

# Per ready-made assignment: the few reference tests it is built from (together they reach every target), and one
# deliberately wrong implementation (target, body) that the tests must catch.
CASES = {
    "tokenization": dict(
        tests=["tests/test_bpe.py::test_ties_go_to_the_smallest_pair", "tests/test_bpe.py::test_cli_train_and_show"],
        hidden=["tests/test_bpe.py::test_cli_train_and_show"], points=["merge=10", "bpe.py:train_plain=20"],
        # overlapping occurrences go to the rightmost one: merge([9, 9, 9], (9, 9), 256) -> [9, 256]
        wrong=("bpe.py:merge", """
            out, i = [], len(ids) - 1
            while i >= 0:
                if i > 0 and (ids[i - 1], ids[i]) == pair:
                    out.append(new_id)
                    i -= 2
                else:
                    out.append(ids[i])
                    i -= 1
            return out[::-1]
            """)),
    "positions": dict(
        tests=["tests/test_positions.py::test_docstring_worked_examples_are_true",
               "tests/test_positions.py::test_rope_elementwise_form_equals_matrix_form",
               "tests/test_positions.py::test_alibi_slopes_for_8_heads_are_halves_to_1_over_256",
               "tests/test_positions.py::test_t5_bias_looks_up_bucket_per_head_and_is_translation_invariant"],
        # RoPE with the wrong sign: rotates by -m*theta (still a rotation, so only the oracles notice)
        wrong=("positions.py:apply_rope", """
            ang = _angles(pos, x.shape[-1], base)
            cos = torch.cos(ang).repeat_interleave(2, dim=-1).to(x.dtype)
            sin = torch.sin(ang).repeat_interleave(2, dim=-1).to(x.dtype)
            x1, x2 = x[..., 0::2], x[..., 1::2]
            rotated = torch.stack((x2, -x1), dim=-1).flatten(-2)
            return x * cos + rotated * sin
            """)),
    "gpt": dict(
        tests=["tests/test_gpt.py::test_naive_and_sdpa_agree_with_a_kv_cache_offset",
               "tests/test_gpt.py::test_causal_future_tokens_never_change_earlier_logits",
               "tests/test_positions.py::test_causal_mask_uses_positions"],
        # a KV cache that forgets the past: only the new keys and values come back
        wrong=("gpt.py:KVCache.update", """
            return k, v
            """)),
    "training": dict(
        tests=["tests/test_train.py::test_lr_schedule_warms_up_then_decays_to_the_floor",
               "tests/test_loop.py::test_position_tables_norm_gains_and_biases_are_not_decayed",
               "tests/test_loop.py::test_accumulation_over_unequal_target_counts_equals_one_big_batch"],
        # accumulation as the mean of the micro-batch means: wrong when the micro-batches hold unequal target counts
        wrong=("train.py:optimizer_step", """
            loss_sum = 0.0
            for micro in chunk(batch, run.cfg.grad_accum):
                with run.autocast:
                    loss, _ = run.objective.loss(run.train_model, to_device(micro, run.device))
                loss = loss / run.cfg.grad_accum
                run.scaler.scale(loss).backward()
                loss_sum = loss_sum + loss.detach()
            if draw_next is not None:
                draw_next()
            step_loss = float(loss_sum)
            if run.cfg.grad_clip > 0:
                run.scaler.unscale_(run.optimizer)
                torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.grad_clip)
            run.scaler.step(run.optimizer)
            run.scaler.update()
            run.optimizer.zero_grad(set_to_none=True)
            return step_loss
            """)),
    "xlnet-permutation": dict(
        tests=["tests/test_xlnet.py::test_perm_mask_follows_the_rank_rule",
               "tests/test_xlnet.py::test_the_content_stream_sees_itself_and_the_query_stream_does_not",
               "tests/test_xlnet.py::test_about_one_in_k_tokens_are_targets_in_spans_and_orders_are_permutations"],
        # the query stream given the content stream's mask: every target sees its own token
        wrong=("xlnet.py:attention_masks", """
            data_mask = None
            if attention_mask is not None:
                data_mask = (attention_mask == 0)[:, None, :]
            if perm_mask is not None:
                pm = perm_mask > 0
                data_mask = pm if data_mask is None else data_mask | pm
            if data_mask is None:
                return None, None
            B, T = data_mask.size(0), data_mask.size(-1)
            mask_g = F.pad(data_mask.expand(B, T, T), (mlen, 0), value=False)
            self_key = torch.eye(T, dtype=torch.bool, device=mask_g.device)
            mask_h = mask_g & ~F.pad(self_key, (mlen, 0), value=False)
            return mask_h, mask_h
            """)),
}


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    """The processes these tests start (finding tests, grading) run torch: one thread each, as on a shared CPU."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def snapshot():
    """sha256 of every file of the project that an assignment reads (outputs, caches and git internals aside)."""
    digests = {}
    for d, dirs, files in os.walk(ROOT):
        dirs[:] = [x for x in dirs if x not in assignment.SKIP_DIRS]
        for f in files:
            path = os.path.join(d, f)
            digests[os.path.relpath(path, ROOT)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return digests


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """made(name) -> (student copy, key, manifest, reference snapshots before and after); each assignment made once."""
    cache = {}

    def make(name):
        if name not in cache:
            assert name in CASES, f"ready-made {name!r} needs an entry in CASES: a few fast tests and a wrong body"
            d = tmp_path_factory.mktemp(name)
            case = CASES[name]
            before = snapshot()
            manifest = assignment.make([name], out=str(d / "student"), hidden=case.get("hidden", ()),
                                       points=case.get("points"), tests=case["tests"], log=lambda msg: None)
            cache[name] = (d / "student", d / "student-key", manifest, before, snapshot())
        return cache[name]

    return make


def submission(d, student, manifest, bodies=None):
    """A submission in `d`: the student copy's target files, each blank body filled with the reference body, or with
    `bodies[target]` where given. Only the target files: grading takes nothing else from a submission."""
    for path in manifest["files"]:
        reference, source = assignment.read(os.path.join(ROOT, path)), assignment.read(str(student / path))
        for t in manifest["targets"]:
            t_path, qualname = t["target"].split(":", 1)
            if t_path == path:
                body = (bodies or {}).get(t["target"]) or assignment.body_of(reference, qualname)
                source = assignment.put_body(source, qualname, body)
        assignment.write(str(d / path), source)
    return d


# ----------------------------------------------------------------------------------------------------------------------
# Source surgery


TRICKY = '''import math


def plain(x):
    """Doc.

    plain(2) -> 4
    """
    # a comment that explains the answer
    y = x * 2
    return y
    # a trailing comment inside the body


def no_doc(a,
           b) -> int:
    # first line is a comment
    return a + b


class Box:
    """A class: its docstring and other methods stay."""

    def method(self, v: dict = {"k": (1, 2)}):
        """Method doc."""
        def helper(z):  # nested: goes with the body
            return z
        return helper(v)

    def other(self):
        return 1
'''


def test_blanking_replaces_only_the_bodies_and_filling_them_back_restores_the_file():
    targets = [assignment.Target(f"x.py:{q}", "Some slide") for q in ("plain", "no_doc", "Box.method")]
    blanked = assignment.blank(TRICKY, targets)
    tree, ref = ast.parse(blanked), ast.parse(TRICKY)
    for t in targets:
        q = t.spec.split(":")[1]
        fn, fn_ref = assignment.find_function(tree, q), assignment.find_function(ref, q)
        assert ast.dump(fn.args) == ast.dump(fn_ref.args) and ast.get_docstring(fn) == ast.get_docstring(fn_ref), \
            f"{q}: the signature or docstring changed"
        stmts = fn.body[1:] if ast.get_docstring(fn) else fn.body
        assert len(stmts) == 1 and isinstance(stmts[0], ast.Raise) and "Some slide" in ast.unparse(stmts[0]), \
            f"{q}: the body is not one raise NotImplementedError naming the slide"
        assert "comment" not in assignment.body_of(blanked, q), f"{q}: a comment of the body survived"
    assert "a trailing comment" not in blanked and "explains the answer" not in blanked, "body comments leak the answer"
    assert "def other(self):\n        return 1" in blanked and blanked.startswith("import math"), "other code changed"
    restored = blanked
    for t in targets:
        q = t.spec.split(":")[1]
        restored = assignment.put_body(restored, q, assignment.body_of(TRICKY, q))
    assert restored == TRICKY, "filling the original bodies back does not give the original file byte for byte"
    with pytest.raises(LookupError, match="more than one|no definition"):
        assignment.find_function(ref, "missing")
    with pytest.raises(LookupError, match="class"):
        assignment.find_function(ref, "Box")


def test_every_ready_made_target_blanks_and_refills_to_the_reference_file_byte_for_byte():
    _, targets = assignment.resolve(list(ASSIGNMENTS))
    assert len(targets) == sum(len(ts) for ts in ASSIGNMENTS.values()), "a target is listed in two assignments"
    for path, ts in assignment.by_file(targets).items():
        reference = assignment.read(os.path.join(ROOT, path))
        blanked = assignment.blank(reference, ts)
        compile(blanked, path, "exec")
        restored = blanked
        for t in ts:
            qualname = t.spec.split(":", 1)[1]
            assert "NotImplementedError" in assignment.body_of(blanked, qualname), f"{t.spec} was not blanked"
            restored = assignment.put_body(restored, qualname, assignment.body_of(reference, qualname))
        assert restored == reference, f"{path}: blanking changed more than the targets' bodies"


def test_prune_tests_keeps_helpers_and_the_chosen_tests_only():
    source = "import pytest\n\n\ndef helper():\n    return 1\n\n\n@pytest.mark.parametrize('x', [1])\n" \
             "def test_a(x):\n    assert x\n\n\ndef test_b():\n    assert helper()\n"
    pruned = assignment.prune_tests(source, {"test_b"})
    assert "test_a" not in pruned and "parametrize" not in pruned, "the dropped test or its decorator is still there"
    assert "def helper" in pruned and "def test_b" in pruned, "a helper or the kept test was removed"
    compile(pruned, "t.py", "exec")


def test_a_test_that_needs_a_target_only_through_shared_state_is_found():
    # The decode test never calls merge: it decodes with the tokenizer that the round-trip test before it trained (with
    # merge) and cached in test_bpe's module-level _cache. Only re-running the whole module finds that it needs merge.
    decode = "tests/test_bpe.py::test_decode_never_crashes_and_replaces_invalid_utf8"
    _, targets = assignment.resolve(["bpe.py:merge"])
    tests = ["tests/test_bpe.py::test_round_trip_random_bytes", decode, "tests/test_bpe.py::test_ties*"]
    report = assignment.find_tests(targets, tests, skip=["*::test_ties_*"], log=lambda msg: None)
    assert sorted(report["reference"]) == sorted(tests[:2]), "--tests / --skip did not select the tests"
    assert report["hits"]["bpe.py:merge"] == ["tests/test_bpe.py"], "the probe did not record the module reaching merge"
    assert decode in report["exercised"]["bpe.py:merge"], "a dependence through cached module state was missed"


# ----------------------------------------------------------------------------------------------------------------------
# The three facts, for every ready-made assignment


@pytest.mark.parametrize("name", list(ASSIGNMENTS))
def test_ready_made_assignment_fails_until_filled_passes_with_the_reference_and_catches_a_wrong_body(
        name, made, tmp_path):
    student, key, manifest, before, after = made(name)
    assert after == before, "making the assignment changed a reference file"
    assert [t["target"] for t in manifest["targets"]] == [t.spec for t in ASSIGNMENTS[name]]
    for t in manifest["targets"]:
        assert t["tests"], f"{t['target']}: no test exercises it"

    # graded in one process (torch imported once): as handed out, with the reference bodies, with one wrong body
    wrong_target, body = CASES[name]["wrong"]
    reference_sub = submission(tmp_path / "reference", student, manifest)
    wrong_sub = submission(tmp_path / "wrong", student, manifest, {wrong_target: body})
    fresh, filled, wrong = assignment.grade_all([student, reference_sub, wrong_sub], key, isolate=False)

    # 1. as handed out: every test fails, because of a NotImplementedError (not an import or collection error)
    assert fresh["total"] == len({n for t in manifest["targets"] for n in t["tests"]}) and fresh["passed"] == 0, \
        f"{name}: some test passes before anything is implemented"
    for n, v in fresh["tests"].items():
        assert v["outcome"] == "failed" and v["not_implemented"], \
            f"{name}: {n} does not fail with NotImplementedError: {v}"
    assert not fresh["other_tests"]["problems"], f"{name}: collection errors or failures outside the graded tests"
    assert {t["state"] for t in fresh["targets"]} == {"not implemented"}, "grading does not see the blank bodies"

    # 2. the reference bodies copied back: the target files are the reference files, and every test passes
    for path in manifest["files"]:
        assert (reference_sub / path).read_bytes() == open(os.path.join(ROOT, path), "rb").read(), \
            f"{path}: the student copy differs from the reference in more than the bodies"
    failing = [n for n, v in filled["tests"].items() if v["outcome"] != "passed"]
    assert filled["passed"] == filled["total"] == fresh["total"], f"{name}: fail with the reference bodies: {failing}"
    assert {t["state"] for t in filled["targets"]} == {""}, "a written target is reported as not implemented"

    # 3. one deliberately wrong body: its target loses tests, every other test still passes
    for t in wrong["targets"]:
        if t["target"] == wrong_target:
            assert t["passed"] < t["total"], f"{name}: the wrong {wrong_target} passes all of its tests"
    bad = {n for n, v in wrong["tests"].items() if v["outcome"] != "passed"}
    exercised = {n for t in manifest["targets"] if t["target"] == wrong_target for n in t["tests"]}
    assert bad <= exercised, f"{name}: tests that do not exercise {wrong_target} failed: {bad - exercised}"


def test_hidden_tests_and_points_count_only_when_grading_with_the_key(made, tmp_path):
    student, key, manifest, *_ = made("tokenization")
    hidden = "tests/test_bpe.py::test_cli_train_and_show"
    assert manifest["hidden"] == [hidden]
    assert "test_cli_train_and_show" not in (student / "tests" / "test_bpe.py").read_text(), "hidden test handed out"
    assert "test_cli_train_and_show" in (key / "tests" / "test_bpe.py").read_text(), "the key lost the hidden test"
    handed_out = json.loads((student / "assignment.json").read_text())
    assert handed_out["hidden"] == 1 and "test_cli" not in json.dumps(handed_out), "student copy names a hidden test"
    text = (student / "ASSIGNMENT.md").read_text()
    assert "## 3. `merge` (bpe.py)" in text and 'Slide: "Byte Pair Encoding algorithm"' in text and "1 hidden" in text

    # a submission whose merge is wrong and whose tests were edited to pass: the key's tests grade it
    sub = submission(tmp_path, student, manifest, {"bpe.py:merge": CASES["tokenization"]["wrong"][1]})
    (sub / "tests").mkdir()
    (sub / "tests" / "test_bpe.py").write_text("def test_ties_go_to_the_smallest_pair():\n    pass\n")
    g = assignment.grade(str(sub), str(key))  # in a process of its own, as the command line does
    merge = next(t for t in g["targets"] if t["target"] == "bpe.py:merge")
    assert (merge["passed"], merge["total"], merge["hidden_total"]) == (1, 2, 1), f"merge graded wrongly: {merge}"
    assert merge["points"] == 10 and merge["score"] == 5.0 and g["max_score"] == 30, "points are not shared by tests"
    assert g["tests"][hidden]["hidden"] and g["tests"][hidden]["outcome"] == "passed", "the hidden test did not run"
    text = assignment.format_grade(g)
    assert "bpe.py:merge" in text and "1/2" in text and "5/10" in text, f"text scores missing:\n{text}"


def test_a_run_past_the_time_limit_is_stopped_and_its_unfinished_tests_count_as_failed(made, tmp_path):
    student, key, manifest, *_ = made("tokenization")
    # a merge that never returns: the run cannot finish before the limit, however fast the machine (the unfilled
    # student copy itself fails its few tests in well under a second on a warm machine, which raced the limit)
    never_returns = "\n            while True:\n                pass\n            "
    hangs = submission(tmp_path, student, manifest, {"bpe.py:merge": never_returns})  # test_ties... reaches it first
    g = assignment.grade(str(hangs), str(key), timeout=2)
    assert g["timed_out"] and g["passed"] == 0, "the time limit did not stop the run"
    assert all(v["outcome"] in ("not run (time limit)", "failed") for v in g["tests"].values()), g["tests"]
    assert "time limit" in assignment.format_grade(g)


def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys):
    existing = tmp_path / "taken"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    for argv, message in [
        (["make", "nope"], "neither a ready-made assignment"),
        (["make", "bpe.py:no_such_function"], "no definition of 'no_such_function'"),
        (["make", "missing.py:f"], "not a .py file"),
        (["make", "gpt.py:KVCache"], "is a class"),
        (["make", "tokenization", "--out", str(existing)], "exists and is not empty"),
        (["make", "tokenization", "--out", os.path.join(ROOT, "tests", "x")], "not inside"),
        (["make", "tokenization", "--out", str(tmp_path / "o"), "--points", "merge=many"], "TARGET=NUMBER"),
        (["make", "tokenization", "--out", str(tmp_path / "o"), "--points", "apply_rope=5"], "names no target"),
        (["grade", str(tmp_path)], "no assignment.json"),
    ]:
        with pytest.raises(SystemExit) as e:
            assignment.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, f"{argv}: {err!r}"
    assert sorted(os.listdir(tmp_path)) == ["taken"] and (existing / "keep.txt").read_text() == "mine", \
        "a refused command wrote or changed something"
