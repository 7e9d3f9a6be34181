"""Tests for sandbox.run, the process that runs untrusted code: its resource limits hold, the directories it is told
to hide are hidden, and it reads no secret from its environment. Each runs one small Python command (under a second)."""

import os
import sys

import pytest

import sandbox


def run(tmp_path, code, **kw):
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    stopped, log = sandbox.run([sys.executable, "-c", code], str(work), timeout=60, **kw)
    assert not stopped, "a command of well under a second was stopped by the 60 s limit"
    return "\n".join(log)


def test_the_memory_limit_stops_an_allocation_above_it(tmp_path):
    log = run(tmp_path, "bytearray(3 * 2 ** 30)", memory_gib=1)
    assert "MemoryError" in log, f"a 3 GiB allocation under a 1 GiB limit should fail; its stderr:\n{log}"
    log = run(tmp_path, "bytearray(2 ** 20); import sys; sys.stderr.write('fine')", memory_gib=1)
    assert log.endswith("fine"), f"1 MiB under a 1 GiB limit should work; its stderr:\n{log}"


def test_the_file_size_limit_stops_a_write_above_it(tmp_path, monkeypatch):
    monkeypatch.setattr(sandbox, "FILE_LIMIT", 2 ** 20)
    code = ("import signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "f = open('big', 'wb')\n"
            "try:\n    f.write(b'x' * 2 ** 21); f.flush()\n"
            "except OSError as e:\n    print('refused', e, file=__import__('sys').stderr)")
    log = run(tmp_path, code)
    assert "refused" in log, f"writing 2 MiB under a 1 MiB file-size limit should fail; its stderr:\n{log}"
    assert os.path.getsize(tmp_path / "work" / "big") <= 2 ** 20, "the file grew past the limit"


def test_the_environment_is_minimal_and_home_is_the_work_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADER_SECRET", "the key is here")
    log = run(tmp_path, "import os, sys; sys.stderr.write(repr(sorted(os.environ.items())))")
    assert "GRADER_SECRET" not in log, "a variable of the caller reached the untrusted command"
    assert repr(("HOME", str(tmp_path / "work"))) in log, f"HOME should be the work dir; the environment:\n{log}"


@pytest.mark.skipif(not sandbox.available(), reason="this machine does not allow unshare: nothing can be hidden")
def test_a_hidden_directory_cannot_be_read_and_nothing_outside_the_work_dir_is_writable(tmp_path):
    key = tmp_path / "key"
    key.mkdir()
    (key / "answers.txt").write_text("secret")
    code = ("import os, sys\n"
            "try:\n"
            f"    sys.stderr.write('listing=' + repr(os.listdir({str(key)!r})) + '\\n')\n"
            "except OSError as e:\n"
            "    sys.stderr.write('unreadable ' + str(e.errno) + '\\n')\n"
            "try:\n"
            f"    open({str(tmp_path / 'planted')!r}, 'w')\n"
            "    sys.stderr.write('wrote outside\\n')\n"
            "except OSError as e:\n"
            "    sys.stderr.write('read-only ' + str(e.errno) + '\\n')\n"
            "open('inside', 'w').write('ok')")
    log = run(tmp_path, code, hide=[str(key)])
    # an empty tmpfs with mode 0 covers it: a process without capabilities can neither list nor open it
    assert "answers.txt" not in log and ("listing=[]" in log or "unreadable" in log), \
        f"the hidden key's files were visible to the command:\n{log}"
    assert "wrote outside" not in log and not (tmp_path / "planted").exists(), "the command wrote outside its work dir"
    assert (tmp_path / "work" / "inside").read_text() == "ok", "the command could not write in its own work dir"
    assert (key / "answers.txt").read_text() == "secret", "the hidden key was changed"
