"""Fine-tuning (tasks.py, finetune.py, train.py --task): the tasks split by play and balanced; LoRA, adapters and the
trained prompt change what they promise and nothing else; every family fine-tunes through the loop; a fine-tuned run
resumes and reloads exactly; a pretrained and a random-init run differ only in their initial weights."""
import os

import pytest
import torch
import torch.nn as nn

import finetune
import gpt
import tasks
import train
from helpers import exit_code, interrupt_at, strip, tiny_args

FAMILIES = ("gpt", "bert", "electra", "t5", "xlnet")


@pytest.fixture(scope="module")
def genre():
    return tasks.load_task("genre")


@pytest.fixture(scope="module")
def next_line():
    return tasks.load_task("next-line")


# ----------------------------------------------------------------------------------------------------------------------
# The tasks


@pytest.mark.parametrize("name", ["genre", "next-line"])
def test_the_splits_are_by_play_and_share_no_passage(name, genre, next_line):
    task = genre if name == "genre" else next_line
    works = {part: {ex.work for ex in getattr(task, part)} for part in ("train", "dev", "test")}
    assert works["test"] == set(tasks.TEST_WORKS), "the test set is not the three held-out plays"
    assert works["dev"] == set(tasks.DEV_WORKS), "the dev set is not the three dev plays"
    assert not works["train"] & (works["dev"] | works["test"]), "a dev or test play trains"
    texts = {part: {t for ex in getattr(task, part) for t in (ex.a, ex.b) if t} for part in ("train", "dev", "test")}
    assert not texts["train"] & texts["test"], "a test passage also appears in training"
    assert not texts["dev"] & texts["test"], "a test passage also appears in dev"
    for part in ("dev", "test"):  # the held-out sets are exactly balanced
        counts = torch.bincount(torch.tensor([ex.label for ex in getattr(task, part)]), minlength=len(task.labels))
        assert len(set(counts.tolist())) == 1, f"{name} {part}: labels are not balanced: {counts.tolist()}"
    for n in (10, 100, 1000):  # every training-set size is balanced to within one, and nested
        counts = torch.bincount(torch.tensor([ex.label for ex in task.train_set(n)]), minlength=len(task.labels))
        assert counts.max() - counts.min() <= 1, f"{name}: the first {n} training examples are unbalanced"
    assert task.train_set(100) == task.train_set(1000)[:100], "a smaller training set is not inside the larger"


def test_genre_follows_the_folio_and_next_line_pairs_are_what_their_label_says(genre, next_line):
    assert {ex.work for ex in genre.train if ex.label == 1} == \
        set(tasks.FOLIO["history"]) - set(tasks.TEST_WORKS) - set(tasks.DEV_WORKS)
    assert all(len(ex.a.split("\n")) == tasks.PASSAGE_LINES for ex in genre.test)
    lines = {w: tasks.spoken_lines(open(os.path.join(tasks.SHAKESPEARE, w + ".txt")).read()) for w in tasks.TEST_WORKS}
    for ex in next_line.test:
        ls = lines[ex.work]
        follows = any(ls[i] == ex.a and ls[i + 1] == ex.b for i in range(len(ls) - 1))
        assert follows == (ex.label == 1), f"a next-line pair labelled {ex.label} is wrong: {ex.a!r} / {ex.b!r}"
    assert tasks.spoken_lines("ACT I.\nVIOLA.\nWhat country, friends, is this?\n[Exit.]") == \
        ["What country, friends, is this?"], "speaker names or stage directions leak into the passages"


def test_baselines_are_chance_for_the_majority_and_better_for_bag_of_words(genre):
    b = tasks.baselines(genre, 1000)
    assert b["majority"] == pytest.approx(1 / 3), "a balanced test set: the majority class scores 1/3"
    assert b["bow"] > 0.45, f"bag-of-words logistic regression on 1,000 passages: {b['bow']:.3f}"


# ----------------------------------------------------------------------------------------------------------------------
# The parameter-efficient methods, on their own


def test_lora_starts_as_the_base_trains_only_a_and_b_and_merges_to_the_same_function(float64):
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    lora = finetune.LoRALinear(base, r=4, alpha=8.0)
    x = torch.randn(5, 3, 12)
    assert torch.equal(lora(x), base(x)), "LoRA must start as the pretrained layer (B = 0)"
    assert (lora.lora_A.shape, lora.lora_B.shape) == ((4, 12), (10, 4))
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(5):
        opt.zero_grad()
        lora(x).pow(2).mean().backward()
        opt.step()
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k]), f"training LoRA changed the frozen base weight {k}"
    assert lora.lora_B.abs().max() > 0, "B did not train"
    expected = base(x) + 2.0 * x @ lora.lora_A.T @ lora.lora_B.T  # alpha / r = 2
    torch.testing.assert_close(lora(x), expected, msg="forward is not base(x) + (alpha/r) x A^T B^T")
    merged = lora.merged()
    assert type(merged) is nn.Linear
    torch.testing.assert_close(merged(x), lora(x), msg="the merged layer computes another function")


def test_an_adapter_is_the_identity_at_init_and_a_prompt_changes_no_model_weight():
    torch.manual_seed(0)
    base = nn.Linear(8, 6)
    adapter = finetune.Adapter(base, 3)
    x = torch.randn(4, 8)
    assert torch.equal(adapter(x), base(x)), "an adapter must start as the identity on the sublayer's output"
    emb = nn.Embedding(20, 5)
    table = emb.weight.detach().clone()
    prompt = finetune.PromptEmbedding(emb, 3)
    ids = torch.tensor([[20, 21, 22, 4, 7]])  # three prompt ids (past the table), then two tokens
    out = prompt(ids)
    assert torch.equal(out[0, 3:], table[[4, 7]]) and torch.equal(out[0, :3], prompt.prompt), \
        "prompt ids must read the trained vectors and other ids the table"
    out.sum().backward()
    assert emb.weight.grad is None and prompt.prompt.grad is not None, "the table must be frozen, the prompt trained"


# ----------------------------------------------------------------------------------------------------------------------
# Through the loop


@pytest.fixture(scope="module")
def pretrained(plays_corpus, tmp_path_factory):
    """pretrained(family) -> the ckpt.pt of a tiny 4-step pretraining run (made once per family)."""
    made = {}

    def make(family):
        if family not in made:
            out = tmp_path_factory.mktemp(f"pre-{family}")
            train.train(tiny_args(family, out, plays_corpus, "--max-iters", "4", "--eval-interval", "4",
                                  "--val-docs", "lear"))
            made[family] = str(out / "out" / "ckpt.pt")
        return made[family]

    return make


def ft_args(family, tmp_path, corpus, ckpt, *extra):
    return tiny_args(family, tmp_path, corpus, "--task", "genre", "--init-from", ckpt, "--train-examples", "48",
                     "--max-iters", "4", "--eval-interval", "2", "--val-docs", "lear", "--eval-tokens", "3000",
                     "--warmup-iters", "1", *extra)


@pytest.mark.parametrize("family,peft", [("gpt", "lora"), ("bert", "adapter"), ("electra", "prefix"),
                                         ("t5", "lora"), ("xlnet", "none")])
def test_every_family_fine_tunes_through_the_loop_and_prints_its_test_accuracy(
        family, peft, pretrained, plays_corpus, tmp_path, capsys):
    ckpt = pretrained(family)
    base = torch.load(ckpt, weights_only=True)["model"]
    rows = train.train(ft_args(family, tmp_path, plays_corpus, ckpt, "--peft", peft))
    out = capsys.readouterr().out
    last_eval = [line for line in out.splitlines() if line.startswith("eval step")][-1]
    assert "| test " in last_eval and " acc" in last_eval.split("| test ")[1], \
        f"the last evaluation line has no test accuracy: {last_eval}"
    assert 0 <= rows[-1]["test_acc"] <= 1 and rows[-1]["step"] == 4
    assert f"--peft {peft}:" in out and "parameters trained" in out
    tuned = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["model"]
    prefix = "pretrained."
    if peft != "none":  # the pretrained weights are frozen: bit-identical after training
        for k, v in base.items():
            key = next((c for c in (prefix + k, prefix + k.replace(".weight", ".base.weight"),
                                    prefix + k.replace(".bias", ".base.bias")) if c in tuned), None)
            assert key is not None, f"{k} is missing from the fine-tuned checkpoint"
            assert torch.equal(tuned[key], v), f"--peft {peft} changed the pretrained weight {k}"


def test_lora_on_gpt_merges_into_a_plain_gpt_with_the_same_outputs(pretrained, plays_corpus, tmp_path):
    ckpt = pretrained("gpt")
    train.train(ft_args("gpt", tmp_path, plays_corpus, ckpt, "--peft", "lora", "--lora-r", "2"))
    classifier, tokenizer, _ = train.load_for_inference(str(tmp_path / "out" / "ckpt.pt"))
    ids = torch.tensor([tokenizer.encode("To be, or not to be")])
    logits, _ = classifier.pretrained(ids)
    assert any(isinstance(m, finetune.LoRALinear) for m in classifier.modules())
    plain = finetune.merge_lora(classifier.pretrained)
    assert not any(isinstance(m, finetune.LoRALinear) for m in plain.modules())
    assert set(plain.state_dict()) == set(gpt.GPT(plain.config).state_dict()), "merged names differ from GPT's"
    torch.testing.assert_close(plain(ids)[0], logits, rtol=1e-5, atol=1e-5 * logits.abs().max().item(),
                               msg="the merged model computes another function")
    import transformers  # the merged model exports as GPT-2 does, and transformers reads the same function

    plain.export_hf(str(tmp_path / "hf"))
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf")).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, logits, rtol=1e-5, atol=1e-5 * logits.abs().max().item(),
                                   msg="the exported merged model computes another function in transformers")


def test_a_fine_tuned_run_resumes_to_the_same_losses_and_reloads_to_the_same_predictions(
        pretrained, plays_corpus, tmp_path):
    ckpt = pretrained("bert")
    keys = ("step", "kind", "loss", "val_loss", "val_acc", "test_loss", "test_acc")
    args = lambda sub: ft_args("bert", tmp_path / sub, plays_corpus, ckpt, "--peft", "lora", "--log-interval", "1")
    straight = train.train(args("a"))
    assert train.train(args("b"), on_step=interrupt_at(2))[-1]["step"] == 2
    resumed = train.train(tiny_args("bert", tmp_path / "b", plays_corpus, "--resume"))  # settings from ckpt.pt
    assert strip(resumed, keys) == strip(straight, keys), "a resumed fine-tuning run differs from the uninterrupted one"
    run = train.open_run(str(tmp_path / "a" / "out" / "ckpt.pt"))
    model = run.model
    objective = finetune.TaskObjective(model, model.max_len, 0)
    batch = objective.batch(run.splits["test"], list(range(12)))
    _, pred = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"], batch["labels"])
    again, _, _ = train.load_for_inference(str(tmp_path / "a" / "out" / "ckpt.pt"))
    _, pred2 = again(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"], batch["labels"])
    assert torch.equal(pred, pred2), "a reloaded fine-tuned checkpoint predicts differently"
    last = [r for r in run_rows(tmp_path / "a") if r["kind"] == "eval"][-1]
    assert last["test_acc"] == pytest.approx(float(run.evaluate(objective, part="test")["acc"])), \
        "the reloaded model's test accuracy differs from the run's last evaluation"


def run_rows(d):
    import json
    return [json.loads(line) for line in open(d / "out" / "metrics.jsonl")]


def test_pretrained_and_random_init_runs_differ_only_in_their_initial_weights(pretrained, plays_corpus, tmp_path):
    ckpt = pretrained("gpt")
    runs = {}
    for name, extra in (("pre", ()), ("rand", ("--random-init",))):
        run = train.setup(ft_args("gpt", tmp_path / name, plays_corpus, ckpt, *extra))
        runs[name] = run
    pre, rand = runs["pre"], runs["rand"]
    assert pre.model_cfg == rand.model_cfg, "the random-init run has another architecture"
    for part in ("train", "val", "test"):
        assert pre.splits[part].labels.tolist() == rand.splits[part].labels.tolist(), f"{part} examples differ"
    g = lambda: torch.Generator().manual_seed(0)
    b1 = pre.objective.train_batch(pre.splits["train"], 4, g())
    b2 = rand.objective.train_batch(rand.splits["train"], 4, g())
    assert all(torch.equal(b1[k], b2[k]) for k in b1), "the two runs draw different batches"
    base = torch.load(ckpt, weights_only=True)["model"]
    s_pre, s_rand = pre.model.state_dict(), rand.model.state_dict()
    assert all(torch.equal(s_pre["pretrained." + k], v) for k, v in base.items()), "pretrained weights not loaded"
    assert not torch.equal(s_rand["pretrained.transformer.h.0.attn.c_attn.weight"],
                           base["transformer.h.0.attn.c_attn.weight"]), "--random-init kept the pretrained weights"
    torch.manual_seed(pre.cfg.seed)
    fresh = gpt.GPT(rand.model_cfg).state_dict()
    assert all(torch.equal(s_rand["pretrained." + k], v) for k, v in fresh.items()), \
        "--random-init's weights are not the seeded initialisation of the same architecture"
    assert torch.equal(s_pre["head.weight"], s_rand["head.weight"]), "the new heads start differently"


def test_init_from_with_a_shorter_block_size_keeps_the_first_rows_of_the_position_table(
        pretrained, plays_corpus, tmp_path, capsys):
    ckpt = pretrained("gpt")
    wpe = torch.load(ckpt, weights_only=True)["model"]["transformer.wpe.weight"]
    assert len(wpe) == 32
    train.train(ft_args("gpt", tmp_path, plays_corpus, ckpt, "--block-size", "16", "--max-iters", "1"))
    tuned = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["model"]["pretrained.transformer.wpe.weight"]
    assert tuned.shape == (16, wpe.size(1)), "the position table was not cropped to --block-size"
    capsys.readouterr()
    argv = ft_args("gpt", tmp_path / "long", plays_corpus, ckpt, "--block-size", "64")
    assert exit_code(train.main, argv) == 2
    err = capsys.readouterr().err
    assert "--block-size 64 is longer than its position table (32 rows)" in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "long" / "out" / "ckpt.pt")


def test_completion_picks_the_label_whose_word_the_lm_finds_most_likely_after_the_row(pretrained, float64):
    _, tokenizer, _ = train.load_for_inference(pretrained("gpt"))  # its char tokenizer; a longer context
    torch.manual_seed(0)
    model = gpt.GPT(gpt.GPTConfig(block_size=96, vocab_size=tokenizer.n_vocab, n_layer=2, n_head=2, n_embd=16))
    shots = [(tokenizer.encode("Good morrow."), None, 0)]
    c = finetune.Completion(model, "genre", ("comedy", "history", "tragedy"), tokenizer, gpt.Classifier, shots)
    objective = finetune.TaskObjective(c, c.max_len, tokenizer.specials[c.PAD])
    texts = ["To be, or not", "Once more unto the breach", "If music be"]
    split = finetune.Examples("test", [tokenizer.encode(t) for t in texts], None, [2, 1, 0], ["x"])
    batch = objective.batch(split, [0, 1, 2])
    loss, pred = c(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"], batch["labels"])
    for i, text in enumerate(texts):  # one example, one label at a time, straight through the LM
        row = [*c.prompt_ids, *c.encode(tokenizer.encode(text))[0]]
        assert row == batch["input_ids"][i, :len(row)].tolist(), "the demonstration is not read before the row"
        nll = []
        for word in c.words:
            logp = model(torch.tensor([row + word]))[0][0].log_softmax(-1)  # (T, V)
            nll.append(-sum(logp[len(row) - 1 + j, w] for j, w in enumerate(word)) / len(word))
        assert pred[i] == min(range(3), key=lambda j: nll[j]), f"{text!r}: not the most likely label word"
        # rel 1e-6: the loss is taken in fp32, as every objective of the suite takes it
        assert loss[i].item() == pytest.approx(nll[split.labels[i]].item(), rel=1e-6), \
            "the loss is not the mean negative log-probability of the true label's word"
    assert c.max_len + max(map(len, c.words)) == model.config.block_size, "the longest word must fit after a row"


def test_completion_fine_tunes_gpt_through_the_loop_and_is_refused_for_an_encoder(
        pretrained, plays_corpus, tmp_path, capsys):
    rows = train.train(ft_args("gpt", tmp_path, plays_corpus, pretrained("gpt"), "--task-format", "completion"))
    assert "finetune.Completion" in capsys.readouterr().out and 0 <= rows[-1]["test_acc"] <= 1
    classifier, _, _ = train.load_for_inference(str(tmp_path / "out" / "ckpt.pt"))
    assert isinstance(classifier, finetune.Completion), "the checkpoint does not reload as a completion run"
    argv = ft_args("bert", tmp_path / "b", plays_corpus, pretrained("bert"), "--task-format", "completion")
    assert exit_code(train.main, argv) == 2
    err = capsys.readouterr().err
    assert "no left-to-right LM" in err and len(err.strip().splitlines()) == 1, err


def test_fine_tuning_flags_without_a_task_or_out_of_range_are_one_line_errors(tmp_path, plays_corpus, capsys):
    for extra, says in ((("--peft", "lora"), "give --task too"), (("--task", "sentiment"), "--task 'sentiment'"),
                        (("--task", "genre", "--peft", "bitfit"), "--peft 'bitfit'"),
                        (("--task", "genre", "--random-init"), "give --init-from too"),
                        (("--task", "genre", "--lora-r", "0"), "--lora-r 0"),
                        (("--task-format", "completion"), "give --task too")):
        assert exit_code(train.main, tiny_args("gpt", tmp_path, plays_corpus, *extra)) == 2, extra
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1, err
    assert not os.path.exists(tmp_path / "out")


def test_the_two_comparisons_run_their_grids_and_write_their_tables_and_figures(
        pretrained, plays_corpus, tmp_path, capsys):
    import downstream

    ckpt = pretrained("gpt")
    common = ["--model", "gpt", "--init-from", ckpt, "--iters", "2", "--evals", "1", "--batch-size", "4",
              "--train-args", f"--data {plays_corpus} --cache-dir {tmp_path / 'cache'} --dtype fp32 --val-docs lear "
                              "--eval-tokens 3000"]
    results, base, shots = downstream.main(["helps", *common, "--sizes", "12", "24", "--seeds", "2",
                                            "--shots", "0", "9", "--out-dir", str(tmp_path / "helps"),
                                            "--png", str(tmp_path / "helps.png")])
    assert set(results) == {(n, i) for n in (12, 24) for i in ("pretrained", "random")}
    assert all(len(accs) == 2 and all(0 <= a <= 1 for a in accs) for accs in results.values())
    out = capsys.readouterr().out
    assert "labelled" in out and "bag of words" in out and (tmp_path / "helps.png").exists()
    assert len(shots[0][0]) == 2 and all(0 <= a <= 1 for a in shots[0][0]), "zero-shot: an accuracy per seed"
    assert shots[9][0] == [] and shots[9][1].endswith("of the model's 32 positions: no room"), \
        f"9 demonstrations cannot fit in 32 characters: {shots[9]}"
    results = downstream.main(["peft", *common, "--size", "12", "--seeds", "1", "--ranks", "2",
                               "--out-dir", str(tmp_path / "peft"), "--png", str(tmp_path / "peft.png")])
    counts = {label: n for label, (_, _, n, _) in results.items()}
    assert list(counts) == ["full", "LoRA r=2", "adapter m=16", "prompt P=8"]
    assert counts["full"] > counts["adapter m=16"] > counts["LoRA r=2"] > counts["prompt P=8"] > 0, counts
    assert (tmp_path / "peft.png").exists()
