"""WordPiece (bpe.py) encodes exactly as transformers' BertTokenizer does, cased and uncased. The vocab.txt is generated
from the bundled corpus; the text is the corpus itself and text chosen to hit every rule (accents, CJK, control
characters, Unicode punctuation and spaces, over-long words, special tokens). Nothing is downloaded."""

import collections
import os

import pytest
import transformers

import bpe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRICKY = ("Héllo, WORLD!  naïve café — “quoted” ‘single’ … ½ ¿Qué? 東京は日本の首都です。 tab\there\r\nnew\x00line "
          "ctrl\x07char zero\u200bwidth non\u00a0breaking em\u2003space $5^2`~ x" + "a" * 120 + " [MASK] [mask] "
          "[CLS]x[SEP] İstanbul ǅ ß Straße ﬁne ﬂow résumé Ångström ÆSIR 2024-01-01 e-mail@example.com \ufffd ok "
          "private\ue000use unassigned\u0378char")  # categories Co and Cn: control to transformers, not to Google


def corpus_text():
    """About 600 KB of the bundled plays: a third of every work's opening (fast enough to encode twice in a test)."""
    d = os.path.join(ROOT, "data", "shakespeare")
    return "\n".join(open(os.path.join(d, f), encoding="utf-8").read()[:15000] for f in sorted(os.listdir(d)))


def make_vocab(text, lowercase, path):
    """A vocab.txt in BERT's layout: specials, every character seen (whole and as "##" continuation), the 3000 most
    frequent words and 400 frequent word endings as "##" pieces. Some characters are left out on purpose, so that
    unknown words ([UNK] as a whole) occur in the corpus too."""
    words = collections.Counter(bpe.basic_tokenize(text, lowercase))
    chars = sorted({c for w in words for c in w} - set("qzQZ"))
    endings = collections.Counter(w[-k:] for w in words for k in (2, 3, 4) if len(w) > k)
    tokens = list(bpe.WORDPIECE_SPECIALS) + chars + ["##" + c for c in chars]
    tokens += [w for w, _ in words.most_common(3000) if w not in tokens and not set(w) & set("qzQZ")]
    tokens += ["##" + e for e, _ in endings.most_common(400) if "##" + e not in tokens and not set(e) & set("qzQZ")]
    path.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return tokens


@pytest.mark.parametrize("lowercase", [True, False], ids=["uncased", "cased"])
def test_wordpiece_encodes_like_transformers_bert_tokenizer(tmp_path, lowercase):
    text = corpus_text()
    make_vocab(text, lowercase, tmp_path / "vocab.txt")
    ours = bpe.WordPiece.from_vocab_file(str(tmp_path / "vocab.txt"), lowercase=lowercase)
    theirs = transformers.BertTokenizer(vocab=str(tmp_path / "vocab.txt"), do_lower_case=lowercase)
    for name, sample in (("corpus", text), ("tricky text", TRICKY)):
        got = ours.encode(sample)
        want = theirs(sample, add_special_tokens=False)["input_ids"]
        if got != want:
            first = next(i for i, (a, b) in enumerate(zip(got + [-1], want + [-1])) if a != b)
            raise AssertionError(f"{name}: first difference at piece {first}")
    n_unk = ours.encode(text).count(ours.specials["[UNK]"])
    assert n_unk > 10, "the generated vocabulary should leave some words unknown, so [UNK] is exercised"
    assert ours.tokenize("[MASK] x" + "a" * 120)[0] == "[MASK]" and ours.tokenize("x" + "a" * 120) == ["[UNK]"]


def test_wordpiece_reads_casing_from_the_directory_and_decodes_pieces_back_to_words(tmp_path):
    (tmp_path / "vocab.txt").write_text("\n".join([*bpe.WORDPIECE_SPECIALS, "my", "dog", "is", "play", "##ing", "."]))
    uncased = bpe.WordPiece.from_vocab_file(str(tmp_path / "vocab.txt"))
    assert uncased.lowercase, "a vocabulary without upper-case letters is uncased"
    assert uncased.tokenize("My dog is Playing [MASK].") == ["my", "dog", "is", "play", "##ing", "[MASK]", "."]
    assert uncased.decode(uncased.encode("My dog is playing.")) == "my dog is playing ."
    (tmp_path / "tokenizer_config.json").write_text('{"do_lower_case": false}')
    assert not bpe.WordPiece.from_vocab_file(str(tmp_path / "vocab.txt")).lowercase, \
        "tokenizer_config.json's do_lower_case must win over the guess"
