"""
Downstream tasks built from the bundled plays: what a pretrained model is fine-tuned on (finetune.py,
`train.py --task`), with the two baselines every result is printed beside.

    genre       which of comedy / history / tragedy a passage of four spoken lines comes from:
                the First Folio's (1623) own grouping of the plays. Balanced classes.
    next-line   does line B follow line A in the play? B is the next spoken line, or a random
                spoken line of the same play: 50/50 (BERT's fine-tuning input [CLS] A [SEP] B [SEP]).

Split by work, never by passage: the test works are the bundled held-out three (julius_caesar, a
tragedy; twelfth_night, a comedy; henry_v, a history), which pretraining on the default split
never saw either; the dev works (one of each genre) choose best.pt; every other Folio play trains.
The poems, the sonnets and Pericles (not in the Folio) take no part.
Training sets of several sizes (--train-examples 100 / 1000 / 10000) are nested: the first 100
examples of the 1,000 are the 100. The test set is fixed.

    python tasks.py                       # sizes of every split, and the two baselines' accuracy

Slides (lecture 001): "Pretraining and fine-tuning" (fine-tuning uses annotated data specific to a
task, usually small); the handbook's "does pretraining indeed help?".
"""

import argparse
import collections
import os
import re
from dataclasses import dataclass

import torch

from common import command, require
from data import BUNDLED_VAL_DOCS, ROOT

SHAKESPEARE = os.path.join(ROOT, "data", "shakespeare")

# The First Folio's catalogue: 14 comedies, 10 histories, 12 tragedies (Troilus and Cressida,
# printed between the histories and the tragedies and titled a tragedy there, counts as one).
FOLIO = {
    "comedy": ("tempest", "two_gentlemen_of_verona", "merry_wives_of_windsor", "measure_for_measure",
               "comedy_of_errors", "much_ado_about_nothing", "loves_labours_lost", "midsummer_nights_dream",
               "merchant_of_venice", "as_you_like_it", "taming_of_the_shrew", "alls_well_that_ends_well",
               "twelfth_night", "winters_tale"),
    "history": ("john", "richard_ii", "henry_iv_part_1", "henry_iv_part_2", "henry_v", "henry_vi_part_1",
                "henry_vi_part_2", "henry_vi_part_3", "richard_iii", "henry_viii"),
    "tragedy": ("troilus_and_cressida", "coriolanus", "tragedy_of_titus_andronicus", "romeo_and_juliet",
                "timon_of_athens", "julius_caesar", "macbeth", "hamlet", "lear", "othello",
                "antony_and_cleopatra", "cymbeline"),
}
TEST_WORKS = BUNDLED_VAL_DOCS  # ("julius_caesar", "twelfth_night", "henry_v"): one of each genre
DEV_WORKS = ("much_ado_about_nothing", "richard_ii", "othello")  # one of each genre: chooses best.pt
PASSAGE_LINES = 4  # genre: a passage is this many consecutive spoken lines
TEST_PER_CLASS, DEV_PER_CLASS = 300, 100  # fixed sizes of the held-out sets, per class
SEED = 1234  # which passages each set draws: fixed, so every run sees the same examples


@dataclass
class Example:
    a: str  # the text (genre) or line A (next-line)
    b: str  # line B, or None for a single-text task
    label: int  # index into Task.labels
    work: str  # the play it comes from


@dataclass
class Task:
    name: str
    labels: tuple  # class names, in label order; T5 and GPT-2-style completion generate these words
    pair: bool  # two texts per example (A, B)
    train: list  # every training example available, in the order the sizes take them
    dev: list
    test: list

    def train_set(self, n=None):
        """The first n training examples (all with n=None): balanced, nested in larger sets."""
        require(n is None or 0 < n <= len(self.train),
                f"--train-examples {n}: {self.name} has {len(self.train):,} training examples")
        return self.train[:n]


def spoken_lines(text):
    """The lines actors speak: after the first ACT/SCENE/PROLOGUE/INDUCTION heading (the title and
    the list of characters come before it), without speaker names ("VIOLA."), headings and stage
    directions ("[Exeunt.]"): they would name the play, not show its language.
    spoken_lines("ACT I.\\nVIOLA.\\nWhat country, friends, is this?\\n[Exit.]") -> ["What country, friends, is this?"]
    """
    lines, started = [], False
    for line in text.splitlines():
        s = line.strip()
        if re.match(r"(ACT|SCENE|PROLOGUE|INDUCTION)\b", s):
            started = True
            continue
        if started and s and not s.startswith("[") and re.search("[a-z]", s):
            lines.append(s)
    return lines


def genre_of(work):
    return next(g for g, works in FOLIO.items() if work in works)


def _balanced(pools, per_class, g):
    """Interleave per-class pools (each shuffled) class by class: any prefix is balanced to within
    one example. _balanced([[a1, a2], [b1, b2]], 2, g) -> [a?, b?, a?, b?]"""
    drawn = [[pool[i] for i in torch.randperm(len(pool), generator=g)[:per_class].tolist()] for pool in pools]
    return [ex for group in zip(*drawn) for ex in group]


def genre_examples(works, lines_of, per_class, g, exclude=frozenset()):
    pools = []
    for label, genre in enumerate(FOLIO):
        pool = []
        for w in (w for w in works if genre_of(w) == genre):
            lines = lines_of[w]
            pool += [Example("\n".join(lines[i:i + PASSAGE_LINES]), None, label, w)
                     for i in range(0, len(lines) - PASSAGE_LINES + 1, PASSAGE_LINES)]
        pools.append([ex for ex in pool if ex.a not in exclude])
    return _balanced(pools, per_class or min(map(len, pools)), g)


def next_line_examples(works, lines_of, per_class, g, exclude=frozenset()):
    """Label 1: B is the line after A. Label 0: B is another line of the same play, never A's next
    (nor A itself). Each line is an A once at most. Short lines recur in other plays ("My lord?"):
    a pair with a line in `exclude` (the held-out sets' lines) is left out."""
    follows, other = [], []
    for w in works:
        lines = lines_of[w]
        n = len(lines) - 1
        for i in torch.randperm(n, generator=g).tolist():
            if len(follows) <= len(other):
                ex = Example(lines[i], lines[i + 1], 1, w)
            else:
                j = int(torch.randint(len(lines) - 2, (), generator=g))
                j += 2 if j >= i else 0  # any line but i and i + 1
                ex = Example(lines[i], lines[j], 0, w)
            if ex.a not in exclude and ex.b not in exclude:
                (follows if ex.label else other).append(ex)
    return _balanced([other, follows], per_class or min(len(other), len(follows)), g)


TASKS = {"genre": (("comedy", "history", "tragedy"), False, genre_examples),
         "next-line": (("no", "yes"), True, next_line_examples)}


def load_task(name, data=SHAKESPEARE):
    """The task `name` from the plays in `data` (the bundled Shakespeare)."""
    require(name in TASKS, f"--task {name!r}: choose one of {', '.join(TASKS)}")
    labels, pair, build = TASKS[name]
    plays = [w for works in FOLIO.values() for w in works]
    missing = [w for w in plays if not os.path.exists(os.path.join(data, w + ".txt"))]
    require(not missing, f"--task {name} reads the bundled plays; {data} lacks {', '.join(missing[:3])}")
    lines_of = {w: spoken_lines(open(os.path.join(data, w + ".txt"), encoding="utf-8").read()) for w in plays}
    g = torch.Generator().manual_seed(SEED)
    test = build(sorted(TEST_WORKS), lines_of, TEST_PER_CLASS, g)
    dev = build(sorted(DEV_WORKS), lines_of, DEV_PER_CLASS, g, held := {t for ex in test for t in (ex.a, ex.b)})
    held |= {t for ex in dev for t in (ex.a, ex.b)}
    train_works = sorted(w for w in plays if w not in TEST_WORKS + DEV_WORKS)
    # no text of a held-out set trains, even where a short line recurs in another play
    return Task(name, labels, pair, train=build(train_works, lines_of, None, g, held), dev=dev, test=test)


# ----------------------------------------------------------------------------------------------------------------------
# Baselines: what a number must beat to mean anything


def majority_accuracy(train, test):
    """Accuracy of always answering the training set's most frequent label (ties: the lowest)."""
    counts = collections.Counter(ex.label for ex in train)
    top = min(counts, key=lambda k: (-counts[k], k))
    return sum(ex.label == top for ex in test) / len(test)


def words(text):
    return re.findall(r"[a-z']+", text.lower())


def bag_of_words(examples, vocab):
    """(N, F) word counts; a pair gets A's counts, B's, and the words they share, side by side."""
    index = {w: i for i, w in enumerate(vocab)}
    V = len(vocab)
    parts = 3 if examples and examples[0].b is not None else 1
    x = torch.zeros(len(examples), parts * V)
    for n, ex in enumerate(examples):
        a = collections.Counter(w for w in words(ex.a) if w in index)
        for w, c in a.items():
            x[n, index[w]] = c
        if parts == 3:
            b = collections.Counter(w for w in words(ex.b) if w in index)
            for w, c in b.items():
                x[n, V + index[w]] = c
                if w in a:
                    x[n, 2 * V + index[w]] = 1.0
    return torch.log1p(x)


def bow_logistic_accuracy(train, test, n_labels, max_words=5000, l2=1e-3, steps=100):
    """Multinomial logistic regression on bags of words (the training set's most frequent words),
    fitted with L-BFGS: the classic linear baseline. Returns test accuracy."""
    counts = collections.Counter(w for ex in train for text in (ex.a, ex.b) if text for w in words(text))
    vocab = [w for w, _ in counts.most_common(max_words)]
    x, y = bag_of_words(train, vocab), torch.tensor([ex.label for ex in train])
    w = torch.zeros(x.size(1), n_labels, requires_grad=True)
    b = torch.zeros(n_labels, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w + b, y) + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = (bag_of_words(test, vocab) @ w + b).argmax(-1)
    return (pred == torch.tensor([ex.label for ex in test])).float().mean().item()


def baselines(task, n=None):
    """{"majority": acc, "bow": acc} on the test set, for the first n training examples."""
    train = task.train_set(n)
    return {"majority": majority_accuracy(train, task.test),
            "bow": bow_logistic_accuracy(train, task.test, len(task.labels))}


# ----------------------------------------------------------------------------------------------------------------------


@command
def main(argv=None):
    p = argparse.ArgumentParser(description="The downstream tasks: split sizes and baselines.")
    p.add_argument("--task", choices=list(TASKS), nargs="*", default=list(TASKS))
    p.add_argument("--train-examples", type=int, nargs="*", default=[100, 1000, 10000])
    args = p.parse_args(argv)
    for name in args.task:
        task = load_task(name)
        sizes = " | ".join(f"{part} {len(exs):,} from {len({ex.work for ex in exs})} plays"
                           for part, exs in (("train", task.train), ("dev", task.dev), ("test", task.test)))
        print(f"{name} ({' / '.join(task.labels)}): {sizes}")
        for n in args.train_examples:
            if n <= len(task.train):
                b = baselines(task, n)
                print(f"  {n:>6,} labelled: majority {b['majority']:.1%}, bag-of-words logistic "
                      f"regression {b['bow']:.1%} (test, {len(task.test)} examples)")


if __name__ == "__main__":
    main()
