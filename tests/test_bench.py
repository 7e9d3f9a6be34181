"""bench.py runs end to end and prints its tables (figures are for people, not asserted: benchmarks are commands)."""

import bench


def test_models_table_has_a_row_per_attention_path(tmp_path, corpus, capsys):
    rows = bench.main(["models", "--models", "gpt", "--presets", "tiny", "--iters", "2", "--device", "cpu", "--data",
                       str(corpus), "--cache-dir", str(tmp_path / "cache"), "--dtype", "fp32"])
    assert [(r[0], r[1], r[2]) for r in rows] == [("gpt", "tiny", "naive"), ("gpt", "tiny", "sdpa")]
    assert all(r[4]["tok_s"] > 0 for r in rows)
    out = capsys.readouterr().out
    assert "ms/step" in out and out.count("gpt     tiny") == 2


def test_attention_micro_benchmark_compares_both_paths_per_length(capsys):
    rows = bench.main(["attention", "--lengths", "16,32", "--batch", "1", "--n-head", "2", "--n-embd", "8",
                       "--iters", "1", "--device", "cpu", "--dtype", "fp32"])
    assert [r[0] for r in rows] == [16, 32] and all(r[1] > 0 and r[2] > 0 for r in rows)
    assert "speed-up" in capsys.readouterr().out
