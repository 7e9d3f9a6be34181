"""tables.py: each row is pretrained at the same compute (--flops: within half a step of the budget), fine-tuned the
same way, and printed beside the slide's figure; bad budgets are refused in one line."""

import pytest

import tables
from helpers import exit_code


def test_every_row_gets_the_same_flops_and_the_table_names_the_slides_rows(plays_corpus, tmp_path, capsys,
                                                                          monkeypatch):
    budget = 3e9
    argv = ["mae-lm", "--quick", "--flops", str(budget), "--iters", "3", "--evals", "1",
            "--examples", "48", "--out-dir", str(tmp_path / "runs"), "--png", str(tmp_path / "t.png"),
            "--train-args", f"--preset tiny --data {plays_corpus} --cache-dir {tmp_path / 'cache'} "
                            "--dtype fp32 --val-docs lear --eval-tokens 2000"]
    results = tables.main(argv)
    baseline = "no pretraining (maelm, random init)"
    assert list(results) == ["MAE-LM", "enc. w. [MASK] (i.e., MLM)", baseline]
    assert results[baseline][0][1:3] == (0, 0.0), "the baseline row is not pretrained"
    steps = {name: runs[0][1] for name, runs in results.items()}
    assert steps["MAE-LM"] != steps["enc. w. [MASK] (i.e., MLM)"], "rows of different cost must get different steps"
    for name, [(acc, n, flops, seconds)] in results.items():
        assert seconds > 0
        assert 0 <= acc <= 1
        if name == baseline:
            continue
        assert n >= 2
        assert abs(flops - budget) <= flops / n / 2, f"{name}: {flops:.3g} FLOPs, more than half a step off {budget:g}"
    out = capsys.readouterr().out
    assert "MAE-LM, Table 2" in out and "86.1" in out and "85.2" in out and (tmp_path / "t.png").exists()

    # a curve over budgets: the budget already run is read back, the new one trains; more FLOPs, more steps
    curve = tables.main([*argv, "--curve", f"{budget / 2:g},{budget:g}", "--png", str(tmp_path / "curve.png")])
    assert curve[budget] == results, "the curve's point at a budget already run must be that run's result"
    assert curve[budget / 2][baseline] == results[baseline], "no budget decides the baseline: it runs once"
    for name in list(results)[:2]:
        (_, few, f_few, _), = curve[budget / 2][name]
        assert few < steps[name] and abs(f_few - budget / 2) <= f_few / few / 2, f"{name}: half the budget, fewer steps"
    assert (tmp_path / "curve.png").exists()

    # run again: every run is read back, nothing trains, the table is the same
    def must_not_train(*a, **k):
        raise AssertionError("a run whose result is kept was trained again")
    monkeypatch.setattr(tables.train, "train", must_not_train)
    monkeypatch.setattr(tables.downstream, "run_one", must_not_train)
    assert tables.main(argv) == results, "a table read back from its kept runs must equal the table that ran them"
    with pytest.raises(AssertionError, match="trained again"):  # a setting that decides the result: a new run
        tables.main([*argv, "--lr", "1e-3"])


def test_a_stopped_run_keeps_no_result_and_the_same_command_resumes_there(plays_corpus, tmp_path, monkeypatch):
    argv = ["roberta", "--quick", "--flops", "3e9", "--iters", "2", "--evals", "1", "--examples", "48",
            "--out-dir", str(tmp_path / "runs"), "--png", str(tmp_path / "t.png"),
            "--train-args", f"--preset tiny --data {plays_corpus} --cache-dir {tmp_path / 'cache'} "
                            "--dtype fp32 --val-docs lear --eval-tokens 2000"]
    real = tables.train.train
    monkeypatch.setattr(tables.train, "train", lambda a: real([*a, "--max-iters", "1"]))  # as if Ctrl-C at step 1
    assert exit_code(tables.main, argv) == 130
    assert not list((tmp_path / "runs").rglob("result.json")), "a stopped run's result must not be kept"
    monkeypatch.setattr(tables.train, "train", real)
    results = tables.main(argv)
    assert all(n > 1 for name, [(_, n, _, _)] in results.items() if "random init" not in name)


def jobs_argv(plays_corpus, out, jobs, more_train_args=""):
    return ["mae-lm", "--quick", "--flops", "3e9", "--iters", "3", "--evals", "1", "--examples", "48",
            "--jobs", str(jobs), "--out-dir", str(out), "--png", str(out / "t.png"),
            "--train-args", f"--preset tiny --data {plays_corpus} --cache-dir {out / 'cache'} "
                            f"--dtype fp32 --val-docs lear --eval-tokens 2000 {more_train_args}"]


def test_runs_in_worker_processes_give_the_table_run_one_after_another(plays_corpus, tmp_path):
    # --jobs 2 on a fresh cache: two runs start at once and both tokenise the corpus into the same cache
    tables_of = {}
    for jobs in (1, 2):
        out = tmp_path / f"jobs{jobs}"
        tables_of[jobs] = {name: [r[:3] for r in runs]
                           for name, runs in tables.main(jobs_argv(plays_corpus, out, jobs)).items()}
        assert not [p.name for p in (out / "cache").iterdir() if ".tmp" in p.name], "a half-built cache left behind"
    assert tables_of[2] == tables_of[1], "runs in worker processes must give what the same runs give in turn"
    assert len(list((tmp_path / "jobs2" / "logs").glob("*.log"))) == 3, "each worker's run keeps its own log"


def test_a_run_stopped_in_a_worker_stops_the_table_and_keeps_no_result(plays_corpus, tmp_path):
    # as by Ctrl-C: each fine-tuning ends at step 1 of 3 (train-args come last, so theirs is the fine-tuning's budget)
    assert exit_code(tables.main, jobs_argv(plays_corpus, tmp_path, 2, "--max-iters 1")) == 130
    assert not list(tmp_path.rglob("result.json")), "a stopped run's result must not be kept"


@pytest.mark.parametrize("budget,says", [(["--max-time", "0"], "--max-time 0: give a positive duration"),
                                         (["--flops", "0"], "give a positive --flops or --max-time"),
                                         (["--curve", "1e12,x"], "--curve: positive FLOPs budgets separated by commas"),
                                         (["--curve", "1e12", "--max-time", "1m"], "(not with --max-time)")])
def test_a_budget_of_nothing_is_refused_in_one_line(capsys, budget, says):
    assert exit_code(tables.main, ["mae-lm", *budget]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err, err


def test_every_row_of_every_table_builds_its_model_and_counts_its_flops(corpus, tmp_path):
    import train
    from helpers import tiny_args

    for table, (_, _, rows) in tables.TABLES.items():
        for k, (name, slide, model, flags) in enumerate(rows):
            run = train.setup(tiny_args(model, tmp_path / f"{table}{k}", corpus, *flags, *tables.NO_DEMO[model]))
            train.release_lock(run.lock)
            assert run.model.flops_per_token() > 0, f"{table}: {name}"
            assert slide is None or 0 < slide < 100, f"{table}: {name}: the slide's figure is a score in (0, 100)"


def test_a_row_two_tables_share_is_one_run():
    # the run's directory is named by its flags: the same experiment spelt two ways would be run twice
    def flags(table, row):
        return next(f for name, _, _, f in tables.TABLES[table][2] if name == row)
    assert flags("roberta", "SEGMENT-PAIR (+ NSP), dynamic masking") == flags("spanbert", "Our BERT (pairs + NSP)")
    assert flags("t5-rates", "15%") == flags("t5-objectives", "Replace corrupted spans") == \
        flags("t5-architectures", "Encoder-decoder, denoising")
    assert flags("albert", "BERT-base") == flags("electra", "BERT-Small (masked LM)")


def test_the_albert_row_at_berts_parameters_has_berts_parameters_and_costs_more_per_token(corpus, tmp_path):
    import train
    from helpers import tiny_args

    _, _, rows = tables.TABLES["albert"]
    built = {}
    for name, _, model, flags in (rows[0], rows[-1]):
        run = train.setup(tiny_args(model, tmp_path / str(len(built)), corpus, "--preset", "char-cpu", *flags))
        train.release_lock(run.lock)
        built[name] = run.model.num_params(), run.model.flops_per_token()
    (bert_params, bert_flops), (albert_params, albert_flops) = built.values()
    assert abs(albert_params / bert_params - 1) < 0.1, f"{built}: the equal-parameter row must be within 10% of BERT's"
    assert albert_flops > 2 * bert_flops, f"{built}: one wide shared layer costs more per token than BERT's four"


def test_rows_runs_the_rows_named_so_and_the_tables_own_baseline(tmp_path, monkeypatch, capsys):
    ran = []
    monkeypatch.setattr(tables, "run_row", lambda args, model, flags, seed, random_init=False:
                        ran.append((model, flags, random_init)) or (0.4, 1, 1.0, 1.0))
    monkeypatch.setattr(tables, "baselines", lambda task, examples: {"majority": 1 / 3, "bow": 0.5})
    results = tables.main(["t5-architectures", "--rows", "Language model", "DENOISING", "--seeds", "1",
                           "--png", str(tmp_path / "t.png")])
    assert list(results) == ["Encoder-decoder, denoising", "Enc-dec, shared, denoising",
                             "Enc-dec, half the layers, denoising", "Language model, denoising",
                             "Prefix LM, denoising", "Language model, LM", "no pretraining (t5, random init)"]
    first = tables.TABLES["t5-architectures"][2][0]
    assert ran[-1] == ("t5", first[3], True), "the baseline is the whole table's: its first row, re-initialised"
    assert exit_code(tables.main, ["t5-architectures", "--rows", "decoder-only"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--rows 'decoder-only': no row of t5-architectures" in err, err
