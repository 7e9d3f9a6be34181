"""
assignment.py - homework from the reference code: blank chosen functions, keep their tests, grade.

What it is
    The project's third use, after reading it beside the slides and running it: homework. Given
    targets such as `bpe.py:merge gpt.py:CausalSelfAttention.forward`, `make` writes a copy of the
    project where each target's body is `raise NotImplementedError(...)`, naming its slide. Its
    docstring (with the worked example), its signature and every other line stay. The body is
    found on the syntax tree (`ast`): the reference files carry no markers. The copy keeps the
    targets' tests (with their fixtures and helpers) and gets a task list, ASSIGNMENT.md.
    `python -m pytest` in the copy is the autograder. `grade` prints the score per target (tests
    passed / total) from the instructor's copy of the tests ("the key"), which may hold hidden ones.

Which tests exercise a target: the definition, and how it is computed
    A test exercises target X if it passes on the reference code and fails when X alone raises
    NotImplementedError. That is measured, not guessed, in a throw-away copy of the project:
      1. a probe line goes at the top of every target's body, and the suite runs once. Each probe
         records which test module reached it (while importing the module, in a fixture or a test);
      2. for each target X, the modules that reached X run again with X's probe raising
         NotImplementedError. The tests that passed in 1 and fail now are X's tests.
    Step 2 re-runs whole modules, not only the tests that called X: a test can depend on X through
    a tokenizer that an earlier test of its module trained with X and cached. A module that never
    reached X cannot change. Tests that exercise no target are left out; one that exercises several
    targets counts for each. A target a module calls at import is refused: blanked, every test of
    that module would error.

Run
    python assignment.py list               # the ready-made assignments, their targets and slides
    python assignment.py make tokenization  # -> out/assignments/tokenization and ...-key
    python assignment.py make bpe.py:merge positions.py:apply_rope --out out/assignments/mine
    python assignment.py make positions --hidden "tests/test_positions.py::test_t5_*" \
        --points apply_rope=40
    python assignment.py make training --skip "tests/test_loop.py::test_a_*budget*"  # self-timed
    python assignment.py grade SUBMISSION --key out/assignments/positions-key [--json FILE or -]
    A student copy: `python -m pytest` runs the tests, `python assignment.py grade .` scores them.

Legend
    target    "file.py:qualname": a function or method of a project file, e.g. "bpe.py:merge",
              "gpt.py:KVCache.update"
    node id   pytest's name of a test: "tests/test_bpe.py::test_gpt2_parity_on_adversarial_text[a]"
    student copy   what students get: blanked targets, visible tests, ASSIGNMENT.md, assignment.json
    key       the instructor's copy: the student copy plus the hidden tests. Grading runs the key's
              tests on the submission's target files, never tests a student may have edited

Trap: this file's helper processes run pytest on a copy of the project, and a reference module
already in sys.modules would silently replace the copy's. So the only project module imported
here is common (the error type and the CLI wrapper), and the helper processes drop it
(`_forget_project_modules`) before pytest imports the copy's.
"""

import argparse
import ast
import contextlib
import fnmatch
import glob
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import tokenize
from dataclasses import dataclass

import sandbox
from common import UsageError, command

ROOT = os.path.dirname(os.path.abspath(__file__))


@dataclass(frozen=True)
class Target:
    spec: str  # "file.py:qualname", a function or method of a top-level project file
    slide: str  # the slide it implements, by title ("" if none: then the docstring is the spec)
    note: str = ""  # one line for ASSIGNMENT.md: what the docstring does not say, or where to look

    @property
    def file(self):
        return self.spec.split(":", 1)[0]

    @property
    def qualname(self):
        return qualname_of(self.spec)


def qualname_of(spec):
    """The function's part of a target: qualname_of("gpt.py:KVCache.update") -> 'KVCache.update'"""
    return spec.split(":", 1)[1]


def function_of(nodeid):
    """A test's node id without its parameters: the test function's node id.
    function_of("tests/test_bpe.py::test_x[a-1]") -> 'tests/test_bpe.py::test_x'"""
    return nodeid.split("[")[0]


def module_of(nodeid):
    """The test module of a node id.
    module_of("tests/test_bpe.py::test_x[a-1]") -> 'tests/test_bpe.py'"""
    return nodeid.split("::")[0]


# ----------------------------------------------------------------------------------------------------------------------
# Ready-made assignments: one named list each, in the order students should implement the targets
# (later ones may use earlier ones). A new model file's assignment is one more entry (e.g.
# "bert-masking": [Target("bert.py:...", ...)]). tests/test_assignment.py checks that every target
# here exists and has tests.

ASSIGNMENTS = {
    # Lecture "Byte Pair Encoding algorithm": the slide's training loop, then encoding text.
    # train_fast stays as given: the tests compare the students' train_plain with it.
    "tokenization": [
        Target("bpe.py:count_pairs", "Byte Pair Encoding algorithm",
               "the counting step: called once per chunk, accumulating into one dict"),
        Target("bpe.py:best_pair", "Byte Pair Encoding algorithm",
               "ties must go to the smallest pair (a, b), so the result depends on the counts only"),
        Target("bpe.py:merge", "Byte Pair Encoding algorithm",
               "mind overlapping occurrences: merge([9, 9, 9], (9, 9), 256) is [256, 9]"),
        Target("bpe.py:train_plain", "Byte Pair Encoding algorithm",
               "the slide's loop over count_pairs, best_pair and merge; chunks come from split_chunks"),
        Target("bpe.py:Tokenizer._encode_chunk", "Byte Pair Encoding algorithm",
               "encoding replays the learned merges, earliest first; keep the per-chunk cache (self._cache)"),
        Target("bpe.py:Tokenizer.encode_ordinary", "Word structure and subword models",
               "pre-split with self._regex, then encode each chunk's UTF-8 bytes"),
    ],
    # Lecture "Positional embeddings": one scheme per slide. The shared helpers _angles /
    # _inverse_frequencies and the matrix form rope_matrix stay as given (the RoPE tests use the
    # matrix form as the oracle for the element-wise one).
    "positions": [
        Target("positions.py:_sinusoid_at", "Positional encoding",
               "the sinusoid at the given positions, (T, d): sin in even, cos in odd columns; sinusoidal() and "
               "SinusoidalAbsolute call it (formula in sinusoidal's docstring; _angles gives pos * frequency)"),
        Target("positions.py:t5_relative_bucket", "Relative encoding",
               "T5's buckets: half exact, half log-spaced up to max_distance; see the docstring for both directions"),
        Target("positions.py:alibi_slopes", "Attention with Linear Biases (ALiBi)",
               "powers of two: the geometric sequence; other head counts: the paper's interleaving rule"),
        Target("positions.py:_linear_bias", "Attention with Linear Biases (ALiBi)",
               "ALiBi's bias (H, Tq, Tk) = -slope_h * |q_pos[i] - k_pos[j]|, used by alibi_bias and ALiBi.forward"),
        Target("positions.py:apply_rope", "Rotary encoding",
               "the element-wise form ('More efficient form' slide) on interleaved pairs; must equal rope_matrix"),
    ],
    # Lectures "Transformers for pretraining" (decoder: no future words), "GPT1", "GPT-2" (pre-LN).
    "gpt": [
        Target("positions.py:causal_mask", "Transformers for pretraining",
               "decoder-only: a query sees keys at its own position and before; compare positions, not tril"),
        Target("gpt.py:KVCache.update", "",
               "not on the slides: generation keeps the keys and values of earlier tokens instead of recomputing them"),
        Target("gpt.py:CausalSelfAttention.forward", "Transformers for pretraining",
               "both paths (the naive equation and F.scaled_dot_product_attention) must agree; rope rotates q and k "
               "before the cache, shaw goes through positions.shaw_attention, t5 and alibi arrive as `bias`"),
        Target("gpt.py:MLP.forward", "GPT1", "C -> 4C -> C with GPT-2's tanh-approximated GELU (self.gelu)"),
        Target("gpt.py:Block.forward", "GPT-2", "pre-LN: x + attn(ln_1(x)), then x + mlp(ln_2(x))"),
    ],
    # Lectures "Pretraining language models" (implementation, training), "GPT-2" (larger batches).
    "training": [
        Target("train.py:lr_at", "Pretraining language models",
               "linear warm-up, then cosine (or linear, rsqrt, constant) decay to min_lr at the horizon"),
        Target("train.py:make_optimizer", "Pretraining language models",
               "AdamW, weight decay on weight matrices only (not biases, norm gains, model.no_weight_decay()); it "
               "returns the optimizer and the one line the log prints about the two groups"),
        Target("train.py:chunk", "GPT-2", "split one step's batch into grad_accum micro-batches"),
        Target("train.py:optimizer_step", "GPT-2",
               "accumulation that equals one big batch: every micro-batch's loss over the step's denominators; then "
               "draw_next(), NonFiniteLoss before a NaN reaches the weights, clipping, the scaler's step"),
    ],
    # Lecture "Masked language models (MLMs)", "BERT" (NSP) and "SpanBERT": how the inputs of BERT and its variants are
    # built. Pairs, rows and span drawing stay as given.
    "bert-masking": [
        Target("bert.py:PretrainingObjective.mask_count", "Masked language models (MLMs)",
               "how many positions a row gets: BERT's round(0.15 x its tokens), RoBERTa's random rounding"),
        Target("bert.py:PretrainingObjective.mask_tokens", "Masked language models (MLMs)",
               "choose the positions, then 80% [MASK], 10% a random token (self.replacements), 10% unchanged"),
        Target("bert.py:merge_spans", "SpanBERT",
               "spans that overlap or touch become one, so every span's boundary tokens stay visible"),
        Target("bert.py:truncate_pair", "BERT",
               "the longer side loses a token (B on a tie), from its front or back at random"),
    ],
    # Lecture "Discriminative training" (ELECTRA): the generator's sample, the replaced labels, the combined loss.
    # The two networks, their shared embeddings and bert.py's masking stay as given.
    "electra-rtd": [
        Target("electra.py:sample_categorical", "Discriminative training",
               "an exact sample from softmax(logits), decided by one uniform number per row: invert the CDF"),
        Target("electra.py:ELECTRA.forward", "Discriminative training",
               "the sample fills the masked positions, without gradient; replaced = masked AND different"),
        Target("electra.py:ReplacedTokenDetection.loss", "Discriminative training",
               "mean MLM loss over the masked positions + disc_weight x mean BCE over real tokens (never padding); "
               "return the metrics summarize() reads, under its names"),
    ],
    # Lecture "T5: Text to Text Transfer Transformer", the "Span corruption works best" slide: T5's
    # preprocessors (t5/data/preprocessors.py), names and test vectors T5's own. noise_counts stays as given.
    "t5-span-corruption": [
        Target("t5.py:_random_segmentation", "T5: Text to Text Transfer Transformer",
               "'Span corruption works best': cut num_items into num_segments non-empty runs, every cut equally "
               "likely: choose num_segments - 1 of the num_items - 1 gaps with torch.randperm(generator=...)"),
        Target("t5.py:random_spans_noise_mask", "T5: Text to Text Transfer Transformer",
               "counts from noise_counts; noise and non-noise span lengths from _random_segmentation (noise first, "
               "as T5), interleaved non-noise first; no noise at all at density 0"),
        Target("t5.py:noise_span_to_unique_sentinel", "T5: Text to Text Transfer Transformer",
               "the slide's <X>, <Y>: the k-th noise run (from 0) becomes vocab_size - 1 - k, its other tokens go"),
        Target("t5.py:nonnoise_span_to_unique_sentinel", "T5: Text to Text Transfer Transformer",
               "the targets: the same with the roles of noise and non-noise swapped"),
    ],
    # Lecture "XLNet": permute the factorization order, not the sequence; two-stream attention. sample_targets (which
    # positions are predicted) and the model stay as given.
    "xlnet-permutation": [
        Target("xlnet.py:sample_order", "XLNet",
               "a random factorization order as ranks, shuffled within blocks of perm_size (one shuffle for all)"),
        Target("xlnet.py:permutation_mask", "XLNet",
               "i may not see j iff j is a target not before i in the order; non-targets come first"),
        Target("xlnet.py:attention_masks", "XLNet",
               "two streams: g obeys perm_mask and the padding, h also sees itself; memory is visible to all"),
    ],
}
ABOUT = {  # optional one-line summary per ready-made assignment, for ASSIGNMENT.md and `list`
    "tokenization": "byte-level BPE: the slide's training loop, then encoding text with the learned merges",
    "positions": "positional encodings: the sinusoid, T5's relative buckets, ALiBi and RoPE",
    "gpt": "the GPT block: causal self-attention with its KV cache, the MLP, the pre-LN block",
    "training": "the training loop's pieces: warm-up + cosine schedule, AdamW's weight-decay groups, accumulation",
    "bert-masking": "BERT's inputs: how many positions, the 80/10/10 rule, SpanBERT's merged spans, NSP's truncation",
    "electra-rtd": "ELECTRA's replaced-token detection: the generator's sample, what counts as replaced, the loss",
    "t5-span-corruption": "T5's span corruption: the random span mask, then each span -> a unique sentinel, both sides",
    "xlnet-permutation": "XLNet's permutation LM: a factorization order, who may see whom, the two streams' masks",
}

# What a copy of the project holds: top-level files, tests/ and data/ (minus caches). Never the git
# history, compiled files (a reference .pyc is the reference body), run outputs or this project's
# own tests of assignment.py.
TOP_LEVEL = ("*.py", "pytest.ini", "requirements.txt", ".gitignore")
SKIP_DIRS = {"__pycache__", ".pytest_cache", ".hypothesis", "cache", "out", ".git"}
SELF_TEST = "tests/test_assignment.py"  # this file's tests: never run by `make`, never copied
MANIFEST = "assignment.json"


# ----------------------------------------------------------------------------------------------------------------------
# Source surgery: find a function on the syntax tree; replace its body's lines (below the docstring)


def find_function(tree, qualname):
    """The FunctionDef of `qualname` ("merge", "KVCache.update"), found from the module's top level.

    find_function(ast.parse("class A:\\n  def f(self): pass"), "A.f").name -> 'f'
    """
    scope, node = tree.body, None
    for part in qualname.split("."):
        found = [n for n in scope if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                 and n.name == part]
        if len(found) != 1:
            raise LookupError(f"{'no' if not found else 'more than one'} definition of {part!r}")
        node = found[0]
        scope = node.body
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        raise LookupError(f"{qualname} is a class, not a function")
    return node


def _docstring(fn):
    first = fn.body[0]
    const = first.value if isinstance(first, ast.Expr) else None
    return first if isinstance(const, ast.Constant) and isinstance(const.value, str) else None


def _header_end(lines, fn):
    """1-based line of the colon ending `def ...(...) -> ...:`; the signature may span lines."""
    source = "".join(lines[fn.lineno - 1:])
    depth = 0
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.OP and tok.string in "([{":
            depth += 1
        elif tok.type == tokenize.OP and tok.string in ")]}":
            depth -= 1
        elif tok.type == tokenize.OP and tok.string == ":" and depth == 0:
            return fn.lineno + tok.start[0] - 1
    raise LookupError("no ':' after the signature")


def body_span(lines, fn):
    """(first, last, indent) of `fn`'s body below its docstring: 1-based lines, comments included.

    For
        def merge(ids, pair, new_id):
            \"\"\"doc\"\"\"
            a, b = pair          <- first
            ...
            return out           <- last (or the last comment indented inside the body after it)
    Trap: comments are not in the syntax tree. Those between the docstring and the first
    statement, and after the last one (indented deeper than the def), belong to the body and go
    with it: they often say how it works.
    """
    doc = _docstring(fn)
    if doc is not None and len(fn.body) == 1:
        raise LookupError("has a docstring and nothing else: there is no body to blank")
    start = (doc.end_lineno if doc is not None else _header_end(lines, fn)) + 1
    first_stmt = fn.body[1] if doc is not None else fn.body[0]
    if first_stmt.lineno < start:
        raise LookupError("its body starts on the line of its signature or docstring; "
                          "put it on lines of its own")
    end = fn.end_lineno
    def_indent = fn.col_offset
    i = end  # 0-based index of the line after `end`
    while i < len(lines):
        stripped = lines[i].strip()
        indent = len(lines[i]) - len(lines[i].lstrip())
        if stripped.startswith("#") and indent > def_indent:
            end = i + 1
        elif stripped:
            break
        i += 1
    return start, end, " " * first_stmt.col_offset


def stub_line(spec, slide, indent):
    """The line a blanked body becomes (two past 120 characters), naming the function's slide.

    stub_line("bpe.py:merge", "Byte Pair Encoding algorithm", "    ")
        -> '    raise NotImplementedError(\\'merge: yours to implement (slide "Byte Pair Encoding algorithm")\\')\\n'
    """
    message = f"{qualname_of(spec)}: yours to implement"
    message = repr(f'{message} (slide "{slide}")' if slide else message)
    line = f"{indent}raise NotImplementedError({message})\n"
    return (line if len(line) <= 121
            else f"{indent}raise NotImplementedError(\n{indent}    {message})\n")


def rewrite_bodies(source, replacements):
    """Replace the bodies (below the docstring) of functions of one file; the rest stays byte for
    byte. `replacements`: qualname -> a function (old body's lines, indent) -> new body's lines."""
    lines = source.splitlines(keepends=True)
    tree = ast.parse(source)
    spans = []
    for qualname, new_body in replacements.items():
        start, end, indent = body_span(lines, find_function(tree, qualname))
        spans.append((start, end, indent, new_body))
    spans.sort()
    for (s1, e1, *_), (s2, *_) in zip(spans, spans[1:]):
        if s2 <= e1:
            raise LookupError("two targets are nested in one another: blank the outer one only")
    for start, end, indent, new_body in reversed(spans):  # bottom-up: earlier line numbers hold
        lines[start - 1:end] = new_body(lines[start - 1:end], indent)
    return "".join(lines)


def blank(source, targets):
    """`source` with each target's body replaced by its stub_line. targets: this file's."""
    stub = lambda t: lambda old, indent: [stub_line(t.spec, t.slide, indent)]
    return rewrite_bodies(source, {t.qualname: stub(t) for t in targets})


def body_of(source, qualname):
    """The lines of `qualname`'s body below its docstring (what `blank` removes), as one string."""
    lines = source.splitlines(keepends=True)
    start, end, _ = body_span(lines, find_function(ast.parse(source), qualname))
    return "".join(lines[start - 1:end])


def put_body(source, qualname, body):
    """`source` with `qualname`'s body (below its docstring) replaced by `body`: what a student
    does. The tests use it to copy reference bodies back and to plant wrong ones. A body indented
    otherwise is re-indented to the function's.

    put_body("def f(x):\\n    return x\\n", "f", "return 2 * x") -> "def f(x):\\n    return 2 * x\\n"
    """
    def new_body(old, indent):
        margins = {len(line) - len(line.lstrip()) for line in body.splitlines() if line.strip()}
        if min(margins, default=0) == len(indent) and not body.startswith("\n"):
            return [body if body.endswith("\n") else body + "\n"]
        lines = textwrap.dedent(body).strip("\n").splitlines()
        return [textwrap.indent("\n".join(lines), indent) + "\n"]

    return rewrite_bodies(source, {qualname: new_body})


def _probe_line(spec, indent):
    return f"{indent}__import__('_assignment_probe').enter({spec!r})\n"


def instrument(source, targets):
    """`source` with a probe call first in each target's body (the body kept): see PROBE."""
    probe = lambda t: lambda old, indent: [_probe_line(t.spec, indent)] + old
    return rewrite_bodies(source, {t.qualname: probe(t) for t in targets})


# The probe module, written into the throw-away copy that `find_tests` runs. The copy's targets
# call enter() first thing; in the run that blanks target X, X's call raises. Test subprocesses
# (`python gpt.py ...`) read the same settings from the environment and append to the same file.
PROBE = '''"""Written by assignment.py into a throw-away copy of the project; never part of an assignment."""
import os

blank = os.environ.get("ASSIGNMENT_BLANK", "")  # the target that raises in this run ("" in the reference run)
context = os.environ.get("ASSIGNMENT_CONTEXT", "")  # the test module running now, "import:<module>" while importing one
_seen = set()


def enter(target):
    if target == blank:
        raise NotImplementedError(target + ": blanked by assignment.py to find the tests that need it")
    if (context, target) not in _seen:
        _seen.add((context, target))
        path = os.environ.get("ASSIGNMENT_HITS")
        if path:
            with open(path, "a") as f:
                f.write(context + "\\t" + target + "\\n")
'''


# ----------------------------------------------------------------------------------------------------------------------
# Targets and copies of the project


def resolve(items):
    """Ready-made names and "file.py:qualname" specs -> (name, [Target]) in order, no repeats,
    checked against the reference files. A spec a ready-made list names gets its slide and note."""
    known = {t.spec: t for targets in ASSIGNMENTS.values() for t in targets}
    targets, names = [], []
    for item in items:
        if item in ASSIGNMENTS:
            names.append(item)
            new = ASSIGNMENTS[item]
        elif ":" in item:
            names.append(qualname_of(item).split(".")[-1])
            new = [known.get(item, Target(item, ""))]
        else:
            ready = ", ".join(ASSIGNMENTS)
            raise UsageError(f"{item!r} is neither a ready-made assignment ({ready}) "
                             f"nor a target like bpe.py:merge")
        targets += [t for t in new if t.spec not in {u.spec for u in targets}]
    if not targets:
        raise UsageError("give a ready-made assignment or at least one target")
    for t in targets:
        full = os.path.join(ROOT, t.file)
        if os.path.dirname(t.file) or not t.file.endswith(".py") or not os.path.isfile(full):
            raise UsageError(f"{t.spec}: {t.file} is not a .py file at the top of the project")
        if t.file == "assignment.py":
            raise UsageError(f"{t.spec}: assignment.py cannot blank itself")
        try:
            source = read(full)
            body_span(source.splitlines(keepends=True), find_function(ast.parse(source), t.qualname))
        except LookupError as e:
            raise UsageError(f"{t.spec}: {e}") from None
    return "+".join(names), targets


def read(path):
    with open(path, encoding="utf-8", newline="") as f:  # newline="": keep line endings exactly
        return f.read()


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)


def by_file(targets):
    files = {}
    for t in targets:
        files.setdefault(t.file, []).append(t)
    return files


def copy_project(dst, with_tests):
    """Copy top-level files, data/, tests/ (with_tests) into dst: a few MB, no caches or outputs."""
    os.makedirs(dst, exist_ok=True)
    for name in sorted(os.listdir(ROOT)):
        src = os.path.join(ROOT, name)
        if os.path.isfile(src) and any(fnmatch.fnmatch(name, p) for p in TOP_LEVEL):
            shutil.copy2(src, os.path.join(dst, name))
    if os.path.isdir(os.path.join(ROOT, "data")):
        shutil.copytree(os.path.join(ROOT, "data"), os.path.join(dst, "data"), ignore=_caches)
    if with_tests:
        for name in sorted(os.listdir(os.path.join(ROOT, "tests"))):
            rel = f"tests/{name}"
            if name.endswith(".py") and rel != SELF_TEST:
                write(os.path.join(dst, rel), read(os.path.join(ROOT, rel)))


def _caches(d, names):
    """What copies leave out of a folder (shutil.copytree's `ignore`): caches, compiled files."""
    return [n for n in names if n in SKIP_DIRS or n.endswith(".pyc")]


def _selected(nodeid, patterns):
    """Does a --tests/--hidden pattern match the node id, or its test function's (no [params])?"""
    match = fnmatch.fnmatchcase
    return any(match(nodeid, p) or match(function_of(nodeid), p) for p in patterns)


# ----------------------------------------------------------------------------------------------------------------------
# Finding each target's tests (the header's two steps) in a helper process, pytest run in-process


def _results_plugin(outcomes, probe=None, select=None, send=None):
    """A pytest plugin recording each test's outcome into `outcomes` (node id -> [outcome, first
    line of the failure, whether a NotImplementedError caused it]) and through `send(node id,
    outcome)` once it is final. It tells `probe` which test module runs. select: keep only these
    node ids."""
    import pytest

    def tell_probe(context):  # the environment too: test subprocesses (`python gpt.py ...`) read it
        probe.context = os.environ["ASSIGNMENT_CONTEXT"] = context

    def emit(nodeid, entry):
        if send is not None:
            send(nodeid, entry)

    class Results:
        def pytest_collection_modifyitems(self, config, items):
            if select is not None:
                keep = [it for it in items if select(it.nodeid)]
                config.hook.pytest_deselected(items=[it for it in items if not select(it.nodeid)])
                items[:] = keep

        @pytest.hookimpl(hookwrapper=True)
        def pytest_make_collect_report(self, collector):
            is_module = isinstance(collector, pytest.Module)
            if probe is not None and is_module:  # the module (and what it imports) is imported here
                tell_probe("import:" + module_of(collector.nodeid))
            yield
            if probe is not None and is_module:
                tell_probe("")

        @pytest.hookimpl(hookwrapper=True)
        def pytest_runtest_protocol(self, item, nextitem):
            if probe is not None:
                tell_probe(module_of(item.nodeid))
            yield

        @pytest.hookimpl(hookwrapper=True)
        def pytest_fixture_setup(self, fixturedef, request):
            # a session-wide fixture may be created by one module's test and used by all others
            wide = probe is not None and fixturedef.scope in ("session", "package")
            if wide:
                saved = probe.context
                tell_probe("*")
            yield
            if wide:
                tell_probe(saved)

        def pytest_runtest_logreport(self, report):
            entry = outcomes.setdefault(report.nodeid, ["passed", "", False])
            if report.failed and entry[0] == "passed":
                outcome = "failed" if report.when == "call" else "error"
                entry[:] = [outcome, _first_line(report), _unimplemented(report)]
            elif report.skipped and entry[0] == "passed":
                entry[:] = ["skipped", "", False]
            if report.when == "teardown":
                emit(report.nodeid, entry)

        def pytest_collectreport(self, report):
            if report.failed:
                nodeid = report.nodeid or "<collection>"
                outcomes[nodeid] = ["collection error", _first_line(report), False]
                emit(nodeid, outcomes[nodeid])

    return Results()


def _unimplemented(report):
    """Did the failure come from a NotImplementedError? Also when the test only reports it in its
    output (a doctest run, a subprocess), not as the exception that failed it."""
    texts = [str(report.longrepr)] + [content for _, content in report.sections]
    return any("NotImplementedError" in text for text in texts)


def _first_line(report):
    crash = getattr(report.longrepr, "reprcrash", None)
    text = crash.message if crash is not None else str(report.longrepr)
    lines = [line for line in text.splitlines() if line.strip()]
    line = (lines[0] if crash is not None else lines[-1]) if lines else ""
    return line[:300]


def _no_shrinking():
    """Hypothesis shrinks a failing example by re-running the test many times: wasted when only
    pass/fail counts. Tests created after this call run without it (other settings still apply)."""
    try:
        from hypothesis import Phase, settings
    except ImportError:
        return
    settings.register_profile("assignment", phases=[Phase.explicit, Phase.reuse, Phase.generate])
    settings.load_profile("assignment")


def _forget_project_modules(tmp_root):
    """Drop from sys.modules the copies' modules under `tmp_root` and the reference's top-level ones
    (common.py): the next session imports the copy's files afresh, with fresh module state."""
    for name, mod in list(sys.modules.items()):
        path = getattr(mod, "__file__", None)  # None for built-in modules (sys, ...)
        if not path or name in ("__main__", __name__, "_assignment_probe"):
            continue
        path = os.path.abspath(path)
        if path.startswith(tmp_root + os.sep) or os.path.dirname(path) == ROOT:
            del sys.modules[name]


def _pytest_session(args, plugin, workdir):
    """One pytest session in this process, on the copy in `workdir`; output to stdout (the log)."""
    import pytest

    _forget_project_modules(os.path.dirname(workdir))
    # Two settings that only change speed (measured on the 2-core CPU). Native tracebacks: pytest's
    # own formatting parses the source of every frame, ~0.6 s per failing test through torch. No
    # unraisable-exception plugin: it runs the garbage collector five times per session, ~0.5 s
    # with torch loaded. And -n 0: pytest.ini's -n hands tests to pytest-xdist's worker processes,
    # out of reach of the probes and of this process's plugin.
    return pytest.main(["-q", "-p", "no:cacheprovider", "-p", "no:unraisableexception", "-n", "0",
                        "--tb=native", "--rootdir", workdir,
                        "-W", "ignore::pytest.PytestAssertRewriteWarning", *args], plugins=[plugin])


def _find_tests_child(workdir, spec_path):
    """Helper process: step 1 (reference run, probes on), step 2 (a run per target), JSON report."""
    spec = json.load(open(spec_path))
    os.chdir(workdir)
    sys.path[:] = [workdir] + [p for p in sys.path if os.path.abspath(p or ".") != ROOT]
    os.environ["PYTHONPATH"] = workdir + os.pathsep + os.environ.get("PYTHONPATH", "")
    hits_path = os.environ["ASSIGNMENT_HITS"] = spec["hits"]
    import _assignment_probe as probe

    _no_shrinking()
    patterns, skip = spec["tests"], spec["skip"]

    def chosen(nodeid):
        return (not patterns or _selected(nodeid, patterns)) and not _selected(nodeid, skip)

    select = chosen if patterns or skip else None
    log = lambda msg: print(msg, file=sys.stderr, flush=True)

    # collect only modules the patterns can match: every session imports each module it collects
    files = {f for p in patterns for f in glob.glob(module_of(p)) if f.endswith(".py")}
    files = sorted(files) or ["tests"]
    t0 = time.time()
    reference = {}
    _pytest_session(files, _results_plugin(reference, probe, select), workdir)
    passed = {n for n, o in reference.items() if o[0] == "passed"}
    log(f"  reference run: {len(reference)} tests, {len(passed)} pass ({time.time() - t0:.0f} s)")
    hits = {}
    if os.path.exists(hits_path):
        for line in open(hits_path).read().splitlines():
            context, target = line.split("\t")
            hits.setdefault(target, set()).add(context)
    hits_sorted = {t: sorted(c) for t, c in hits.items()}
    report = {"reference": reference, "hits": hits_sorted, "exercised": {}, "runs": {}}
    os.environ["ASSIGNMENT_HITS"] = ""  # step 1 said who reaches what; blanked runs record nothing
    for target in spec["targets"]:
        contexts = hits.get(target, set())
        if any(c.startswith("import:") for c in contexts) or not contexts:
            continue  # refused or unreached: the parent explains
        t1 = time.time()
        # "*": reached by a session-wide fixture; "": outside any test module (conftest, pytest's
        # start). Both mean every module.
        modules = {module_of(n) for n in reference} if contexts & {"*", ""} else contexts

        def keep(nodeid, modules=modules):
            return module_of(nodeid) in modules and (select is None or select(nodeid))

        probe.blank = os.environ["ASSIGNMENT_BLANK"] = target
        blanked = {}
        _pytest_session(sorted(modules), _results_plugin(blanked, probe, keep), workdir)
        probe.blank = os.environ["ASSIGNMENT_BLANK"] = ""
        failing = sorted(n for n in passed if n in blanked and blanked[n][0] != "passed")
        report["exercised"][target] = failing
        report["runs"][target] = {"modules": sorted(modules), "tests": len(blanked),
                                  "seconds": time.time() - t1}
        log(f"  {target} blanked: re-ran {len(blanked)} tests of {len(modules)} module(s), "
            f"{len(failing)} fail ({time.time() - t1:.0f} s)")
    with open(spec["report"], "w") as f:
        json.dump(report, f)


def find_tests(targets, tests=(), skip=(), log=print):
    """The two steps of the header, in a helper process. Returns
        {"exercised": {target spec: node ids of its tests}, "reference": {node id: outcome},
         "hits": {target: test modules that reach it}, "runs": what step 2 re-ran}.
    tests: patterns of reference tests to consider (default all); skip: tests never considered."""
    with tempfile.TemporaryDirectory(prefix="assignment-find-") as tmp:
        workdir = os.path.join(os.path.realpath(tmp), "project")
        copy_project(workdir, with_tests=True)
        for path, ts in by_file(targets).items():
            write(os.path.join(workdir, path), instrument(read(os.path.join(ROOT, path)), ts))
        write(os.path.join(workdir, "_assignment_probe.py"), PROBE)
        spec_path, report_path = os.path.join(tmp, "spec.json"), os.path.join(tmp, "report.json")
        with open(spec_path, "w") as f:
            json.dump({"targets": [t.spec for t in targets], "tests": list(tests), "skip": list(skip),
                       "report": report_path, "hits": os.path.join(tmp, "hits.tsv")}, f)
        log_path = os.path.join(tmp, "pytest.log")
        with open(log_path, "w") as out:  # pytest's output goes to the log; progress lines to `log`
            child = [sys.executable, os.path.abspath(__file__), "_find_tests", workdir, spec_path]
            proc = subprocess.Popen(child, stdout=out, stderr=subprocess.PIPE, text=True, cwd=workdir)
            said = []  # the progress lines, and a traceback if the helper process fails
            for line in proc.stderr:
                said.append(line.rstrip("\n"))
                log(said[-1])
            proc.wait()
        if proc.returncode != 0 or not os.path.exists(report_path):
            tail = read(log_path).splitlines()[-20:] + said[-20:]
            raise RuntimeError("finding the tests failed; the last lines of its output:\n"
                               + "\n".join(tail))
        report = json.load(open(report_path))
    for t in targets:
        contexts = report["hits"].get(t.spec, [])
        imported = sorted(c[len("import:"):] for c in contexts if c.startswith("import:"))
        if imported:
            raise UsageError(f"{t.spec} runs while {imported[0]} is imported: blanked, it would "
                             f"make every test of that module an import error")
    return report


# ----------------------------------------------------------------------------------------------------------------------
# make: the student copy, the key, ASSIGNMENT.md


def prune_tests(source, keep):
    """A test module with only the test functions in `keep`, and all that is not a test (imports,
    fixtures, helpers). Other `def test_*`s go, with decorators and the blank lines after."""
    lines = source.splitlines(keepends=True)
    drop = []
    for node in ast.parse(source).body:
        is_function = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        if is_function and node.name.startswith("test") and node.name not in keep:
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            end = node.end_lineno
            while end < len(lines) and not lines[end].strip():
                end += 1
            drop.append((start, end))
    for start, end in reversed(drop):
        del lines[start - 1:end]
    return "".join(lines)


def _check_out_dir(path, flag):
    path = os.path.abspath(path)
    inside = lambda d: path == d or path.startswith(d + os.sep)
    if inside(os.path.join(ROOT, "tests")) or inside(os.path.join(ROOT, "data")) or path == ROOT:
        raise UsageError(f"{flag} {path}: not inside the project's tests/ or data/, "
                         f"or the project itself")
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise UsageError(f"{flag} {path} exists and is not empty; "
                         f"remove it or choose another directory")
    return path


def _parse_points(specs, targets):
    points = {}
    for item in specs or ():
        name, _, value = item.rpartition("=")
        matches = [t.spec for t in targets if name in (t.spec, t.qualname, t.qualname.split(".")[-1])]
        try:
            value = float(value)
        except ValueError:
            raise UsageError(f"--points {item}: expected TARGET=NUMBER, e.g. merge=10") from None
        if len(matches) != 1:
            what = "several targets" if matches else "no target"
            raise UsageError(f"--points {item}: {name!r} names {what} of this assignment")
        points[matches[0]] = value
    return points


def make(items, out=None, key=None, hidden=(), points=None, tests=(), skip=(), log=print):
    """Write the student copy (`out`) and the key (`key`, default out + "-key") for the targets
    `items` names. hidden: node-id patterns of tests kept out of the student copy; points:
    ["merge=10", ...]; tests: patterns restricting the reference tests considered; skip: patterns
    of tests never used. Returns the key's manifest. Reads the project; writes `out` and `key`
    only."""
    name, targets = resolve(items)
    out = _check_out_dir(out or os.path.join(ROOT, "out", "assignments", name), "--out")
    key = _check_out_dir(key or out + "-key", "--key")
    if key == out:
        raise UsageError("--key must differ from --out: the key holds the hidden tests")
    points = _parse_points(points, targets)
    log(f"finding the tests of {len(targets)} target(s): "
        f"the suite once, then the modules each target reaches")
    t0 = time.time()
    report = find_tests(targets, tests, skip, log=log)

    reference = report["reference"]
    broken = sorted(n for n, o in reference.items() if o[0] not in ("passed", "skipped"))
    for n in broken:
        log(f"  left out, fails on the reference code: {n} ({reference[n][1]})")
    tests_of = {t.spec: report["exercised"].get(t.spec, []) for t in targets}
    for t in targets:
        if not tests_of[t.spec]:
            why = ("no test reaches it" if t.spec not in report["hits"]
                   else "no test fails without it")
            log(f"  warning: {t.spec} has no tests ({why}); it will not be graded")
    graded = sorted({n for ns in tests_of.values() for n in ns})
    for p in hidden or ():
        if not any(_selected(n, [p]) for n in graded):
            raise UsageError(f"--hidden {p!r} matches none of "
                             f"this assignment's {len(graded)} tests")
    # a test function is kept whole (all its parametrized cases); hiding one case hides the function
    hidden_functions = {function_of(n) for n in graded if _selected(n, hidden)}
    hidden_ids = [n for n in graded if function_of(n) in hidden_functions]

    manifest = {
        "assignment": name,
        "about": ABOUT.get(name, ""),
        "targets": [{"target": t.spec, "slide": t.slide, "note": t.note,
                     "points": points.get(t.spec), "tests": tests_of[t.spec]} for t in targets],
        "files": sorted(by_file(targets)),
        "hidden": hidden_ids,
        "made_from": {"tests_considered": list(tests) or "all", "skipped": list(skip),
                      "reference_failures": broken, "seconds": round(time.time() - t0, 1)},
    }
    functions = {function_of(n) for n in graded}
    for d, m, kept in ((out, _for_students(manifest), functions - hidden_functions),
                       (key, manifest, functions)):
        _write_copy(d, targets, kept)
        write(os.path.join(d, "ASSIGNMENT.md"), handout(m, d))
        if d == key:  # grading checks the key against these before and after it runs a submission
            m["key_sha256"] = key_digests(key)
        write(os.path.join(d, MANIFEST), json.dumps(m, indent=1) + "\n")
    log(f"wrote {out} (for students: {len(graded) - len(hidden_ids)} tests) and {key} "
        f"(for grading, with {len(hidden_ids)} hidden) in {time.time() - t0:.0f} s")
    return manifest


def _for_students(manifest):
    """The student copy's manifest: it names no hidden test, it only says how many there are."""
    hidden = set(manifest["hidden"])
    m = {k: v for k, v in manifest.items() if k not in ("made_from", "key_sha256")}
    m["targets"] = [dict(t, tests=[n for n in t["tests"] if n not in hidden],
                         hidden_tests=sum(n in hidden for n in t["tests"]))
                    for t in manifest["targets"]]
    m["hidden"] = len(hidden)
    return m


def _write_copy(d, targets, functions):
    """A copy of the project with the targets blanked. Of the test modules, only the test functions
    in `functions` (node ids without parameters) stay; conftest.py and helper modules stay whole;
    modules left without tests are dropped."""
    with tempfile.TemporaryDirectory() as staging:  # build aside, then move: no half-written copy
        tmp = os.path.join(staging, "copy")
        copy_project(tmp, with_tests=False)
        for path, ts in by_file(targets).items():
            write(os.path.join(tmp, path), blank(read(os.path.join(ROOT, path)), ts))
        for name in sorted(os.listdir(os.path.join(ROOT, "tests"))):
            rel = f"tests/{name}"
            if not name.endswith(".py") or rel == SELF_TEST:
                continue
            source = read(os.path.join(ROOT, rel))
            if name.startswith("test_"):
                keep = {f.split("::", 1)[1] for f in functions if f.startswith(rel + "::")}
                if not keep:
                    continue
                source = prune_tests(source, keep)
            write(os.path.join(tmp, rel), source)
        os.makedirs(os.path.dirname(d), exist_ok=True)
        if os.path.isdir(d):
            os.rmdir(d)  # empty (checked)
        shutil.move(tmp, d)


def _handout_section(i, t, d):
    """ASSIGNMENT.md's section on the i-th target `t` (a manifest entry) of the copy in `d`."""
    path, qualname = t["target"].split(":", 1)
    source = read(os.path.join(d, path))
    fn = find_function(ast.parse(source), qualname)
    doc = (ast.get_docstring(fn) or "").split("\n\n")[0].strip()
    lines = source.splitlines(keepends=True)
    signature = "".join(lines[fn.lineno - 1:_header_end(lines, fn)])
    lines = [f"## {i}. `{qualname}` ({path})", "", "```python", signature.rstrip(), "```", ""]
    if doc:
        lines += ["> " + doc.replace("\n", "\n> "), ""]
    if t["slide"]:
        lines.append(f"Slide: \"{t['slide']}\".")
    if t["note"]:
        lines.append(f"Note: {t['note']}.")
    functions = sorted({function_of(n) for n in t["tests"]})
    hidden = t.get("hidden_tests")
    if functions:
        cases = len(t["tests"])
        lines += ["", f"Its tests ({cases} case{'s' * (cases != 1)}"
                  + (f", and {hidden} hidden" if hidden else "") + "):",
                  "", "```bash", "python -m pytest " + " \\\n    ".join(functions), "```"]
    elif hidden:
        lines.append(f"Its {hidden} tests are hidden: they run when your work is graded.")
    else:
        lines.append("No test checks it: it is not graded.")
    return lines + [""]


def handout(manifest, d):
    """ASSIGNMENT.md: what to implement, in which order; slides, tests, how to run and grade."""
    title = manifest["assignment"]
    lines = [f"# Assignment: {title}", ""]
    if manifest["about"]:
        lines += [manifest["about"][0].upper() + manifest["about"][1:] + ".", ""]
    n_hidden = manifest["hidden"] if isinstance(manifest["hidden"], int) else len(manifest["hidden"])
    files = ", ".join(f"`{f}`" for f in manifest["files"])
    has_points = any(t["points"] is not None for t in manifest["targets"])
    lines += [
        f"Implement the functions below, in this order (later ones may use earlier ones). "
        f"Each one now raises `NotImplementedError`. What it must do is in its docstring "
        f"(most have a worked example) and in the note below; the slide is the one it implements. "
        f"Change only their bodies, in {files}, and keep the signatures; you may add helper "
        f"functions to these files. The rest of the project is the reference code: read it, "
        f"call it.", "",
        "| # | function | file | slide | tests |" + (" points |" if has_points else ""),
        "| --- | --- | --- | --- | --- |" + (" --- |" if has_points else ""),
    ]
    for i, t in enumerate(manifest["targets"], 1):
        path, qualname = t["target"].split(":", 1)
        line = find_function(ast.parse(read(os.path.join(d, path))), qualname).lineno
        n = len(t["tests"]) + t.get("hidden_tests", 0)
        slide = t["slide"] or "(not on the slides)"
        pts = "" if not has_points else " - |" if t["points"] is None else f" {t['points']:g} |"
        lines.append(f"| {i} | `{qualname}` | `{path}:{line}` | {slide} | {n} |{pts}")
    lines.append("")
    for i, t in enumerate(manifest["targets"], 1):
        lines += _handout_section(i, t, d)
    lines += [
        "## Running the tests, and grading", "",
        "```bash",
        "python -m pytest                 # every test of this assignment: all fail until you fill the functions in",
        "python -m pytest -x              # stop at the first failure",
        "python assignment.py grade .     # your score per function: tests passed / total",
        "```", "",
        f"Grading copies your {files} into a fresh copy of this assignment and runs "
        f"the instructor's copy of the tests"
        + (f", which also holds {n_hidden} hidden test{'s' * (n_hidden != 1)}" if n_hidden else "")
        + ". A test that exercises several functions counts for each of them."
        + (" A function's points are its share of passing tests times its points."
           if has_points else ""),
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# grade: run the key's tests on a submission's target files
#
# This process decides the score, from what it collected itself. The graded code (the key's tests on the submission's
# files) runs in a child process whose results plugin sends one record per test through a pipe made here: no file
# holds the results, so there is nothing to find and append to. A record the key does not explain (a test id it does
# not define, one reported twice, a malformed line) marks the submission as tampered and withholds its score. The key
# is hashed against what `make` recorded before grading and again after: a change refuses the report. The child runs
# through sandbox.py: limits, a minimal environment and, where Linux allows it, namespaces that hide the key and the
# other submissions. docs/instructors.md says what this protects against and what it does not.

LOG_LINES = 200  # of the graded process's output, kept for the instructor's report
OUTCOMES = ("passed", "failed", "error", "skipped", "collection error")


class KeyChanged(UsageError):
    """The key differs from the hashes `make` recorded, or changed while grading: no grades are reported."""


def key_digests(d):
    """{path relative to d: sha256} of what grading copies from a key: no caches, not the manifest (it holds them)."""
    out = {}
    for parent, dirs, files in os.walk(d):
        skip = set(_caches(parent, dirs + files))
        dirs[:] = sorted(x for x in dirs if x not in skip)
        for f in files:
            rel = os.path.relpath(os.path.join(parent, f), d)
            if f not in skip and rel != MANIFEST:
                with open(os.path.join(parent, f), "rb") as fh:
                    out[rel] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _changes(before, after):
    """What differs between two key_digests: "changed a; added b; removed c"."""
    parts = []
    for word, names in (("changed", [p for p in before if p in after and before[p] != after[p]]),
                        ("added", [p for p in after if p not in before]),
                        ("removed", [p for p in before if p not in after])):
        if names:
            parts.append(f"{word} {', '.join(sorted(names))}")
    return "; ".join(parts)


def _check_key(key, expected, when):
    """The key's digests, refused (KeyChanged, naming the files) when they differ from `expected`."""
    digests = key_digests(key)
    if expected is not None and digests != expected:
        raise KeyChanged(f"the key {key} changed {when}: {_changes(expected, digests)}; no grades reported")
    return digests


def _grade_runs(fd, *run_dirs):
    """The grading process (started through sandbox.run): per run directory, what `python -m pytest` does there.
    Each outcome goes to the parent through the pipe `fd` as [run, node id, outcome] when it is final, so a run
    stopped at the time limit keeps its outcomes. Several directories run one after another, each importing the
    project's modules afresh."""
    _no_shrinking()
    path = [p for p in sys.path if os.path.abspath(p or ".") != ROOT]
    with os.fdopen(int(fd), "w") as channel:
        for i, run_dir in enumerate(run_dirs):
            def send(nodeid, entry, i=i):
                channel.write(json.dumps([i, nodeid, entry]) + "\n")
                channel.flush()

            os.chdir(run_dir)
            sys.path[:] = [run_dir] + path  # as `python -m pytest` does; never this file's project
            with contextlib.redirect_stdout(sys.stderr):
                _pytest_session([], _results_plugin({}, send=send), run_dir)


def grade(submission, key=None, timeout=3600, memory_gib=16, confine=True):
    """Score `submission` (a student copy, as returned): its target files are copied into a fresh copy of `key`
    (without a key, of the submission itself: a student's self-check), whose tests then run. Returns the scores as a
    dict (what --json writes); format_grade() makes it text."""
    return grade_all([submission], key, timeout, memory_gib=memory_gib, confine=confine)[0]


def grade_all(submissions, key=None, timeout=3600, isolate=True, memory_gib=16, confine=True):
    """grade() for several submissions. isolate=True runs each in its own process, confined and limited (see above):
    students' code cannot reach the key or another submission, and the time limit is per submission. isolate=False
    runs them one after another in one process, which imports torch once: for code you trust, such as this project's
    tests. memory_gib: the isolated process's address space (0: no limit). confine=False: no Linux namespaces even
    where they work (sandbox.py). Raises KeyChanged if the key changed."""
    jobs = []
    for submission in submissions:
        submission = os.path.abspath(submission)
        base = os.path.abspath(key or submission)
        manifest_path = os.path.join(base, MANIFEST)
        if not os.path.isfile(manifest_path):
            raise UsageError(f"{base} has no {MANIFEST}: not an assignment made by assignment.py")
        if not os.path.isdir(submission):
            raise UsageError(f"no submission directory {submission}")
        manifest = json.load(open(manifest_path))
        missing = [f for f in manifest["files"] if not os.path.isfile(os.path.join(submission, f))]
        jobs.append((submission, base, manifest, missing))
    key = os.path.abspath(key) if key else None
    digests = _check_key(key, jobs[0][2].get("key_sha256"), "since it was made") if key and jobs else None
    results = [None] * len(jobs)
    with tempfile.TemporaryDirectory(prefix="assignment-grade-") as tmp:
        tmp = os.path.realpath(tmp)
        for batch in ([[i] for i in range(len(jobs))] if isolate else [list(range(len(jobs)))]):
            # each isolated run's directory exists only while it runs: no submission sees another's
            run_dirs = [_prepare_run(os.path.join(tmp, f"run{i}"), *jobs[i]) for i in batch]
            t0 = time.time()
            hide = [key] + [j[0] for j in jobs] if isolate else []
            records, stopped, log = _run_grading(run_dirs, timeout, isolate, hide, memory_gib, confine)
            outcomes, problems = _collect(records, [jobs[i][2] for i in batch])
            for k, i in enumerate(batch):
                submission, base, manifest, missing = jobs[i]
                results[i] = score(manifest, outcomes[k], submission, key, missing, stopped,
                                   (time.time() - t0) / len(batch), log, _unwritten(submission, manifest, missing),
                                   problems[k])
            if isolate:
                shutil.rmtree(run_dirs[0])
    if digests is not None:
        _check_key(key, digests, "while grading")
    return results


def _prepare_run(run_dir, submission, base, manifest, missing):
    """A fresh copy of the key (or of the submission, for a self-check) with the submission's target files in it."""
    shutil.copytree(base, run_dir, ignore=_caches)
    for f in manifest["files"]:
        if f not in missing:
            shutil.copy2(os.path.join(submission, f), os.path.join(run_dir, f))
    return run_dir


def _run_grading(run_dirs, timeout, isolate, hide, memory_gib, confine):
    """Run the grading process on `run_dirs` through sandbox.run (untrusted when isolate), its whole process tree
    killed after `timeout` s. Returns (the lines it sent through the pipe, whether it was stopped, the last LOG_LINES
    lines of its output)."""
    read_end, write_end = os.pipe()
    records = []
    reader = threading.Thread(target=lambda: records.extend(os.fdopen(read_end, errors="replace")), daemon=True)
    reader.start()
    argv = [sys.executable, os.path.abspath(__file__), "_grade_runs", str(write_end), *run_dirs]
    stopped, log = sandbox.run(argv, run_dirs[0], timeout, confine=confine, hide=hide, memory_gib=memory_gib,
                               pass_fds=(write_end,), trusted=not isolate, log_lines=LOG_LINES)
    reader.join(5)  # a process the graded code left behind may hold the pipe open: stop listening
    return list(records), stopped, log


def _collect(records, manifests):
    """({node id: outcome} per run, [problem] per run) from the pipe's lines. A run's valid record names a test of
    its key (a case of a test function the key grades, or a collection error of a module or class of the key) with a
    well-formed outcome, once. Anything else is a problem: the graded code wrote into the pipe."""
    outcomes = [{} for _ in manifests]
    problems = [[] for _ in manifests]
    functions = [{function_of(n) for t in m["targets"] for n in t["tests"]} for m in manifests]
    for line in records:
        try:
            run, nodeid, entry = json.loads(line)
            ok = (isinstance(run, int) and 0 <= run < len(manifests) and isinstance(nodeid, str)
                  and isinstance(entry, list) and len(entry) == 3 and entry[0] in OUTCOMES
                  and isinstance(entry[1], str) and isinstance(entry[2], bool))
        except (ValueError, TypeError):
            ok = False
        if not ok:
            for p in problems:
                p.append(f"malformed record: {line.strip()[:200]}")
            continue
        if entry[0] == "collection error":
            known = nodeid == "<collection>" or any(f.startswith(nodeid) for f in functions[run])
        else:
            known = function_of(nodeid) in functions[run]
        if not known:
            problems[run].append(f"a test the key does not define: {nodeid}")
        elif nodeid in outcomes[run]:
            problems[run].append(f"reported twice: {nodeid}")
        else:
            outcomes[run][nodeid] = entry
    return outcomes, problems


def _unwritten(submission, manifest, missing):
    """{target: why} for the targets a submission has not written: its body is still the handed-out
    `raise NotImplementedError(...)` alone, or the file is missing or does not parse."""
    out = {}
    for t in manifest["targets"]:
        path, qualname = t["target"].split(":", 1)
        if path in missing:
            out[t["target"]] = "file missing"
            continue
        try:
            fn = find_function(ast.parse(read(os.path.join(submission, path))), qualname)
        except SyntaxError:
            out[t["target"]] = f"{path} does not parse"
            continue
        except LookupError:
            out[t["target"]] = "function missing"
            continue
        body = fn.body[1:] if _docstring(fn) is not None else fn.body
        call = body[0].exc if len(body) == 1 and isinstance(body[0], ast.Raise) else None
        name = call.func if isinstance(call, ast.Call) else call
        if isinstance(name, ast.Name) and name.id == "NotImplementedError":
            out[t["target"]] = "not implemented"
    return out


def _blank_target(message, by_name):
    """The target whose blank body raised in failure `message`, if any; by_name: {qualname: target}.

    _blank_target("NotImplementedError: merge: yours to implement", {"merge": "bpe.py:merge"})
        -> 'bpe.py:merge'
    """
    if ": yours to implement" not in message:
        return None
    return by_name.get(message.split(": yours to implement")[0].split("NotImplementedError: ")[-1])


def score(manifest, outcomes, submission, key, missing, timed_out, seconds, log_tail, unwritten,
          tampered=()):
    """The scores from the outcomes: per target, its tests passed / total (and points, if given),
    and its state. Either not implemented (still the blank body), or waiting for others (written,
    but each of its failing tests stops at another target's blank body). unwritten: {target: why},
    from _unwritten. tampered: what was wrong with the results the graded process sent; if anything,
    the outcomes stay in the dict for the instructor but every count and score is None (withheld)."""
    hidden = set(manifest["hidden"]) if isinstance(manifest["hidden"], list) else set()
    result = lambda n: outcomes.get(n, ["not run" + (" (time limit)" if timed_out else ""), "", False])
    graded = sorted({n for t in manifest["targets"] for n in t["tests"]})
    by_name = {qualname_of(t["target"]): t["target"] for t in manifest["targets"]}
    tests = {}
    for n in graded:
        outcome, message, not_implemented = result(n)
        tests[n] = {"outcome": outcome, "message": message, "not_implemented": not_implemented,
                    "blank": _blank_target(message, by_name), "hidden": n in hidden}
    targets = []
    for t in manifest["targets"]:
        ids = t["tests"]
        passed = [n for n in ids if tests[n]["outcome"] == "passed"]
        blanks = {tests[n]["blank"] for n in ids if tests[n]["outcome"] != "passed"}
        # what a grader wants at a glance: not started, or only waiting for another function
        if t["target"] in unwritten:
            state = unwritten[t["target"]]
        elif ids and len(passed) < len(ids) and None not in blanks and t["target"] not in blanks:
            state = "waits for " + ", ".join(sorted(qualname_of(b) for b in blanks))
        else:
            state = ""
        entry = {"target": t["target"], "slide": t["slide"], "passed": len(passed),
                 "total": len(ids), "hidden_passed": sum(n in hidden for n in passed),
                 "hidden_total": sum(n in hidden for n in ids), "state": state}
        if t["points"] is not None:
            entry["points"] = t["points"]
            entry["score"] = round(t["points"] * len(passed) / len(ids), 2) if ids else 0.0
        targets.append(entry)
    other = {n: o for n, o in outcomes.items() if n not in tests}
    out = {
        "assignment": manifest["assignment"], "submission": submission,
        "key": os.path.abspath(key) if key else None, "targets": targets,
        "passed": sum(v["outcome"] == "passed" for v in tests.values()), "total": len(tests),
        "tests": tests,
        "other_tests": {"passed": sum(o[0] == "passed" for o in other.values()), "total": len(other),
                        "problems": {n: o[:2] for n, o in other.items() if o[0] != "passed"}},
        "missing_files": missing, "timed_out": timed_out, "seconds": round(seconds, 1),
    }
    if any("points" in t for t in targets):
        out["score"] = round(sum(t.get("score", 0.0) for t in targets), 2)
        out["max_score"] = sum(t.get("points", 0.0) for t in targets)
    out["log_tail"] = log_tail  # for the instructor; format_grade shows it only when it cannot leak hidden tests
    out["tampered"] = list(tampered)
    if tampered:  # a forged record may hide among the real ones: no count from this run can be trusted
        out["passed"] = None
        for t in targets:
            t["passed"] = t["hidden_passed"] = None
            if "score" in t:
                t["score"] = None
        if "score" in out:
            out["score"] = None
    return out


def format_grade(g, max_failures=8):
    """The scores as text, the report meant for students: a line per target, the total, then the failing test
    functions and why. Nothing of a hidden test (name, message) and nothing the graded code printed appears when the
    key has hidden tests: those stay in the dict (--json, the instructor's report)."""
    hidden = any(t["hidden_total"] for t in g["targets"])
    points = "score" in g
    width = max(len("all tests"), *(len(t["target"]) for t in g["targets"]))
    short = lambda path: path if os.path.relpath(path).startswith("..") else os.path.relpath(path)
    graded_with = f"the tests of {short(g['key'])}" if g["key"] else "its own tests"
    lines = [f"assignment {g['assignment']}: {short(g['submission'])} (graded with {graded_with})",
             f"{'target':<{width}}  {'tests':>7}" + (f"  {'hidden':>7}" if hidden else "")
             + (f"  {'points':>11}" if points else "")]
    shown = lambda n: "-" if n is None else n  # withheld

    def row(name, passed, total, hp, ht, score, pts, note=""):
        text = f"{name:<{width}}  {shown(passed):>3}/{total:<3}"
        if hidden:
            text += f"  {shown(hp):>3}/{ht:<3}"
        if points:
            text += (f"  {'-':>5}/{pts:<5g}" if score is None and pts is not None
                     else f"  {score:>5g}/{pts:<5g}" if pts is not None else f"  {'-':>11}")
        return (text + (f"  {note}" if note else "")).rstrip()

    for t in g["targets"]:
        lines.append(row(t["target"], t["passed"], t["total"], t["hidden_passed"],
                         t["hidden_total"], t.get("score"), t.get("points"), t["state"]))
    hidden_tests = [v for v in g["tests"].values() if v["hidden"]]  # once per test, not per target
    hidden_passed = None if g["tampered"] else sum(v["outcome"] == "passed" for v in hidden_tests)
    lines.append(row("all tests", g["passed"], g["total"], hidden_passed, len(hidden_tests),
                     g.get("score"), g.get("max_score")))
    if g["tampered"]:
        return "\n".join(lines + [
            f"score withheld: the graded code tampered with the results it reports "
            f"({len(g['tampered'])} record(s) no test sent; the instructor's --json report lists them)"])
    lines += _failing_lines(g, max_failures)
    secret = {function_of(n) for n, v in g["tests"].items() if v["hidden"]}
    kept_back = 0
    for n, o in g["other_tests"]["problems"].items():
        if any(f.startswith(n) for f in secret) or function_of(n) in secret:
            kept_back += 1
            continue
        lines.append(f"  not graded, {o[0]}: {n}" + (f": {o[1][:150]}" if o[1] else ""))
    if kept_back:
        lines.append(f"  not graded: {kept_back} problem(s) in modules with hidden tests (in --json)")
    if g["missing_files"]:
        lines.append(f"missing from the submission (graded as handed out): "
                     f"{', '.join(g['missing_files'])}")
    if g["timed_out"]:
        lines.append("stopped at the time limit: the tests that did not run count as failed")
    ran = any(not v["outcome"].startswith("not run") for v in g["tests"].values()) or g["other_tests"]["total"]
    if not ran and hidden:
        lines.append("no test ran; pytest's last lines are in the instructor's --json report (log_tail)")
    elif not ran:
        lines += ["no test ran; pytest's last lines:"] + ["  " + x for x in g["log_tail"][-20:]]
    return "\n".join(lines)


def _failing_lines(g, max_failures):
    """Failing test functions: real failures (with why) first, then those stopped at a blank one. Hidden ones are
    counted, never named: their names and messages (which may quote the test, or what the graded code printed) are
    for the instructor."""
    lines = []
    failing = {}  # function -> [failed, cases, first message, blank target that stopped it]
    waiting = {}  # blank target -> test functions it stopped
    for n, v in g["tests"].items():
        f = function_of(n) + (" (hidden)" if v["hidden"] else "")
        entry = failing.setdefault(f, [0, 0, "", None])
        entry[1] += 1
        if v["outcome"] != "passed":
            entry[0] += 1
            if not entry[2] or entry[3]:  # a real failure's message beats a NotImplementedError's
                # a NotImplementedError only in the output (doctest, subprocess): whose, unknown
                blank = v["blank"] or ("?:a function" if v["not_implemented"] else None)
                entry[2], entry[3] = v["message"] or v["outcome"], blank
    wrong = [(f, e) for f, e in failing.items() if e[0] and not e[3] and not f.endswith(" (hidden)")]
    wrong_hidden = sum(1 for f, e in failing.items() if e[0] and not e[3] and f.endswith(" (hidden)"))
    for f, e in failing.items():
        if e[0] and e[3]:
            waiting.setdefault(qualname_of(e[3]), []).append(f)
    if wrong or wrong_hidden or waiting:
        lines.append("failing:")
    for f, (bad, cases, message, _) in wrong[:max_failures]:
        lines.append(f"  {f}" + (f" ({bad} of {cases} cases)" if cases > 1 else "")
                     + f": {message[:120]}")
    if len(wrong) > max_failures:
        lines.append(f"  ... and {len(wrong) - max_failures} more test functions "
                     f"(every test is in --json)")
    if wrong_hidden:
        s = "s" * (wrong_hidden != 1)
        lines.append(f"  {wrong_hidden} hidden test function{s} fail")
    for name, functions in waiting.items():
        s = "s" * (len(functions) != 1)
        lines.append(f"  {len(functions)} test function{s} stopped at {name}, not implemented yet")
    return lines


# ----------------------------------------------------------------------------------------------------------------------
# command line


def _parser():
    p = argparse.ArgumentParser(
        description="Course assignments from the reference code: blank chosen functions, keep the "
                    "tests that need them, write ASSIGNMENT.md, grade submissions.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the ready-made assignments and their targets")
    m = sub.add_parser("make", help="write a student copy and the instructor's key")
    m.add_argument("items", nargs="+", metavar="ASSIGNMENT_OR_TARGET",
                   help=f"ready-made ({', '.join(ASSIGNMENTS)}) and/or targets like "
                        f"bpe.py:merge gpt.py:KVCache.update")
    m.add_argument("--out", help="the student copy (default out/assignments/NAME)")
    m.add_argument("--key", help="the instructor's copy with the hidden tests, used by grade "
                                 "(default OUT-key)")
    m.add_argument("--hidden", action="append", default=[], metavar="PATTERN",
                   help="tests kept out of the student copy and run when grading: a node id or "
                        "glob, e.g. 'tests/test_bpe.py::test_gpt2_*' (repeatable)")
    m.add_argument("--points", action="append", default=[], metavar="TARGET=N",
                   help="points for a target, shared by its tests, e.g. merge=10 (repeatable)")
    m.add_argument("--tests", action="append", default=[], metavar="PATTERN",
                   help="consider only these reference tests (node ids or globs; repeatable): "
                        "quicker, fewer tests")
    m.add_argument("--skip", action="append", default=[], metavar="PATTERN",
                   help="never use these reference tests, e.g. ones that time themselves and fail "
                        "on a busy machine: 'tests/test_loop.py::test_a_*budget*' (repeatable)")
    g = sub.add_parser("grade",
                       help="score a submission per target: tests passed / total, as text and JSON")
    g.add_argument("submission", help="a student copy with the functions filled in")
    g.add_argument("--key", help="the instructor's copy (its tests, hidden ones included, are what "
                                 "runs); default: the submission's own tests")
    g.add_argument("--json", metavar="FILE",
                   help="also write the scores as JSON to FILE ('-': print only the JSON)")
    g.add_argument("--timeout", type=float, default=3600,
                   help="seconds before the run is stopped (default 3600)")
    g.add_argument("--memory", type=float, default=16, metavar="GIB",
                   help="address space of the graded process in GiB (default 16; 0: no limit)")
    g.add_argument("--unconfined", action="store_true",
                   help="no Linux namespaces even where they work (the key is still verified, the limits "
                        "still set): for a machine where confinement breaks the tests")
    return p


@command
def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_find_tests"]:  # the helper processes (internal)
        return _find_tests_child(*argv[1:])
    if argv[:1] == ["_grade_runs"]:
        return _grade_runs(*argv[1:])
    args = _parser().parse_args(argv)
    if args.command == "list":
        for name, targets in ASSIGNMENTS.items():
            print(f"{name}: {ABOUT.get(name, '')}")
            for t in targets:
                print(f"  {t.spec:<40} {t.slide or '(not on the slides)'}")
    elif args.command == "make":
        make(args.items, args.out, args.key, args.hidden, args.points, args.tests, args.skip,
             log=lambda msg: print(msg, flush=True))
    else:
        if args.json not in (None, "-") and os.path.isdir(args.json):
            raise UsageError(f"--json {args.json} is a directory")
        if args.memory < 0 or args.timeout <= 0:
            raise UsageError("--memory must be >= 0 and --timeout > 0")
        result = grade(args.submission, args.key, args.timeout, args.memory, confine=not args.unconfined)
        if args.json == "-":
            print(json.dumps(result, indent=1))
        else:
            print(format_grade(result))
            if args.json:
                write(os.path.abspath(args.json), json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
