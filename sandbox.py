"""
sandbox.py - run code you do not trust: Linux namespaces, resource limits, a minimal environment.

What it is
    `assignment.py grade` runs a student's code with the key's tests. This file is how: one call,
    `run(argv, workdir, timeout)`, starts a command so that it sees as little as the machine allows
    and can take no more than its limits. The score itself is decided elsewhere, by the process that
    calls run(): same-process Python is not a security boundary, so nothing the graded code can
    reach may hold the verdict (assignment.py's pipe; docs/instructors.md, the threat model).

What the command gets, in two stages
    Stage 1 is this file, started as `unshare ... python sandbox.py` where Linux allows it (probed
    once: `available()`). Its settings come on stdin, never on a command line another process could
    read in /proc. Before any untrusted code runs it
      - covers the `hide` directories (the key, the other submissions) with an empty tmpfs,
      - remounts every filesystem read-only except `workdir`, gives /dev/shm a fresh tmpfs,
      - brings up loopback in its new network namespace (nothing else is reachable),
      - sets rlimits: address space, file size, processes and threads,
    then becomes stage 2, the command, with no capabilities (setpriv) so it cannot undo any of it,
    and a handful of environment variables. In its pid namespace it sees none of the caller's
    processes. After `timeout` seconds the whole process tree is killed.
    Without unshare (macOS, a container that refuses it, `confine=False`) stage 1 only sets the
    limits and the environment: the command then reads and writes what your user can.

Run
    python -c "import sandbox; print(sandbox.available())"   # the unshare prefix, or None
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.abspath(__file__))

# The only variables the command inherits: what finds Python and sets its threads and CPU kernels.
CHILD_ENV = ("PATH", "LANG", "LC_ALL", "PYTHONPATH", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "ATEN_CPU_CAPABILITY",
             "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "CUDA_VISIBLE_DEVICES", "PYTHONHASHSEED")
FILE_LIMIT = 4 * 2 ** 30  # bytes one file of the command may reach
EXTRA_TASKS = 512  # processes and threads the command may start (above what its user runs already)

_PREFIX = []  # the probed unshare prefix, once per process


def available():
    """The unshare command that confines (new mount, pid and network namespaces), or None where this machine does not
    allow it. Probed once, by confining a command that prints a word."""
    if not _PREFIX:
        _PREFIX.append(_probe())
    return _PREFIX[0]


def _probe():
    tools = [shutil.which(x) for x in ("unshare", "setpriv", "mount")]
    if not sys.platform.startswith("linux") or None in tools:
        return None
    base = [tools[0], "--mount", "--pid", "--fork", "--kill-child", "--mount-proc", "--net", "--propagation", "private"]
    # as root the namespaces need nothing more; other users first get one of their own, where they are root
    for prefix in (base, base[:1] + ["--user", "--map-root-user"] + base[1:]):
        with tempfile.TemporaryDirectory(prefix="sandbox-probe-") as tmp:
            spec = {"argv": [sys.executable, "-c", "print('confined')"], "cwd": tmp,
                    "env": {"PATH": os.environ.get("PATH", "")}, "limits": {},
                    "confine": {"writable": os.path.realpath(tmp), "hide": []}}
            try:
                proc = subprocess.run([*prefix, sys.executable, os.path.abspath(__file__)],
                                      input=json.dumps(spec), capture_output=True, text=True, timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                continue
            if proc.returncode == 0 and proc.stdout.strip() == "confined":
                return prefix
    return None


def run(argv, workdir, timeout, confine=True, hide=(), memory_gib=16, pass_fds=(), trusted=False, log_lines=200):
    """Run argv in workdir, killing its whole process tree after `timeout` s. Returns (whether it was stopped, the last
    `log_lines` lines of its stderr; stdout is discarded). trusted=True: your environment, no limits, no namespaces (the
    project's own tests). Otherwise the limits and the minimal environment (HOME and TMPDIR inside workdir), and with
    confine=True, where available(), the namespaces: workdir the only place it writes, `hide` covered.
    pass_fds: handed to the command and closed here once it started, so that it holds the only copies.
    run(["python", "-c", "print(1)"], "/tmp/w", 60) -> (False, [])"""
    spec = {"argv": list(argv), "cwd": workdir, "env": dict(os.environ), "limits": {}, "confine": None}
    prefix = []
    if not trusted:
        os.makedirs(os.path.join(workdir, ".tmp"), exist_ok=True)
        spec["env"] = {k: os.environ[k] for k in CHILD_ENV if k in os.environ}
        spec["env"].update(HOME=workdir, TMPDIR=os.path.join(workdir, ".tmp"))
        spec["limits"] = {"RLIMIT_FSIZE": FILE_LIMIT}
        if memory_gib:
            spec["limits"]["RLIMIT_AS"] = int(memory_gib * 2 ** 30)
        if os.path.isdir("/proc"):
            spec["limits"]["RLIMIT_NPROC"] = _tasks_of_user() + EXTRA_TASKS
        prefix = (available() or []) if confine else []
        if prefix:
            keep = [workdir, ROOT, sys.prefix, sys.base_prefix, os.path.dirname(os.path.realpath(sys.executable)),
                    *(p for p in sys.path if p)]
            spec["confine"] = {"writable": os.path.realpath(workdir),
                               "hide": _hideable(hide, [os.path.realpath(k) for k in keep])}
    proc = subprocess.Popen([*prefix, sys.executable, os.path.abspath(__file__)], cwd=workdir, stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, pass_fds=pass_fds,
                            start_new_session=True)
    for fd in pass_fds:
        os.close(fd)
    try:
        _, err = proc.communicate(json.dumps(spec).encode(), timeout=timeout)
        stopped = False
    except subprocess.TimeoutExpired:
        stopped = True
        # the whole group; under unshare, killing it ends the namespace's first process and with it every other
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
    return stopped, err.decode(errors="replace").splitlines()[-log_lines:]


def _hideable(dirs, keep):
    """Of `dirs`, those an empty tmpfs can cover: not holding anything of `keep` (the workdir, this file, Python), not
    inside one already covered, existing. _hideable(["/k", "/k/a", "/p"], ["/p/x"]) -> ["/k"] (if /k exists)"""
    inside = lambda path, d: path == d or path.startswith(d.rstrip(os.sep) + os.sep)
    out = []
    for d in sorted({os.path.realpath(d) for d in dirs if d}, key=len):
        if os.path.isdir(d) and not any(inside(k, d) for k in keep) and not any(inside(d, o) for o in out):
            out.append(d)
    return out


def _tasks_of_user():
    """Processes and threads this user runs now: RLIMIT_NPROC counts them all, not only the command's."""
    n = 0
    for pid in os.listdir("/proc"):
        try:
            if pid.isdigit() and os.stat(f"/proc/{pid}").st_uid == os.getuid():
                n += len(os.listdir(f"/proc/{pid}/task"))
        except OSError:
            continue  # gone meanwhile
    return n


# ----------------------------------------------------------------------------------------------------------------------
# Stage 1: runs as `python sandbox.py`, under unshare when confined, before any untrusted code


def _mounts():
    """[(mount point, options)] of this process's mount namespace, from /proc/self/mountinfo."""
    unescape = lambda s: re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)
    return [(unescape(fields[4]), fields[5]) for fields in (line.split() for line in open("/proc/self/mountinfo"))]


def _confine(writable, hide):
    """As root of a fresh mount namespace: an empty tmpfs over each directory of `hide`, a fresh /dev/shm, and every
    mount read-only except `writable` (a bind mount of itself). A failure stops here (check=True): better no run than
    an unconfined one that looks confined."""
    def mount(*args):
        subprocess.run(["mount", *args], check=True, capture_output=True)

    _loopback_up()
    for d in hide:
        mount("-t", "tmpfs", "-o", "size=64k,mode=0", "tmpfs", d)
    mount("--bind", writable, writable)
    if os.path.isdir("/dev/shm"):
        mount("-t", "tmpfs", "tmpfs", "/dev/shm")
    for point, options in _mounts():
        if point in (writable, "/dev/shm", "/proc") or point.startswith("/proc/"):
            continue
        # trap: a remount must repeat these flags; in a user namespace dropping one is refused
        kept = [o for o in options.split(",") if o in ("nosuid", "nodev", "noexec")]
        mount("-o", ",".join(["remount", "bind", "ro", *kept]), point)


def _loopback_up():
    """A new network namespace has only `lo`, and it is down: bring it up so tests that talk to localhost (a gloo
    process group, a local server) work, while nothing outside the machine can be reached."""
    import fcntl
    import socket
    import struct

    get_flags, set_flags, up = 0x8913, 0x8914, 0x1  # SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP from <linux/sockios.h>
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        flags = struct.unpack("16sH14x", fcntl.ioctl(s, get_flags, struct.pack("16sH14x", b"lo", 0)))[1]
        fcntl.ioctl(s, set_flags, struct.pack("16sH14x", b"lo", flags | up))


def _set_limits(limits):
    """Hard and soft rlimits for this process and what it starts: the command cannot raise them again."""
    import resource

    for name, value in limits.items():
        which = getattr(resource, name)
        hard = resource.getrlimit(which)[1]
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(which, (value, value))


def _stage1():
    """Read the spec on stdin, confine (if asked), set the limits, then exec the command: without capabilities when
    confined, with the spec's environment, stdin at /dev/null."""
    spec = json.load(sys.stdin)
    argv = spec["argv"]
    if spec["confine"]:
        _confine(spec["confine"]["writable"], spec["confine"]["hide"])
        argv = [shutil.which("setpriv"), "--no-new-privs", "--bounding-set=-all", "--inh-caps=-all", "--", *argv]
    _set_limits(spec["limits"])
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.chdir(spec["cwd"])
    os.execve(argv[0], argv, spec["env"])


if __name__ == "__main__":
    _stage1()
