"""Tests for nanochat/execution.py: normal runs, errors, and containment of fork bombs, memory hogs,
file deletion, network access and infinite loops; then the escape attempts of scripts/sandbox_escapes.py,
with the in-process guard on (after the program tried to switch it off) and off (the OS layers alone).
Every dangerous program here is bounded by itself too (the fork bomb forks at most 6 levels deep, signals
go only to a sleeper and this process, writes only to a fresh folder), so a broken sandbox cannot hurt
the machine."""

import dis
import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from nanochat.execution import execute_code, group_processes
from scripts.sandbox_escapes import ATTEMPTS, PRELUDE, TAMPER, Targets, run_attempt


def _leftovers(marker: str) -> list:
    """Live processes whose command line mentions `marker` (the run's sandbox path)."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and any(marker in a for a in (p.info["cmdline"] or [])):
                found.append(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def test_normal_program_stdout_and_files_inside_sandbox():
    r = execute_code("import math\nprint('hello')\nprint(math.sqrt(16))\n"
                     "open('note.txt', 'w').write('kept')\nprint(open('note.txt').read())")
    assert r.success and r.error is None and not r.timed_out and not r.memory_exceeded
    assert r.stdout == "hello\n4.0\nkept\n"
    r = execute_code("import numpy as np\nprint(int(np.arange(5).sum()))")
    assert r.success and r.stdout == "10\n"


def test_errors_are_reported():
    r = execute_code("def f():\n    return 1 / 0\nf()")
    assert not r.success and r.error == "ZeroDivisionError: division by zero"
    assert 'File "program.py", line 2' in r.stderr and "<string>" not in r.stderr
    r = execute_code("import sys\nprint('partial')\nsys.exit(3)")
    assert not r.success and r.stdout == "partial\n" and r.error == "exited with code 3"
    assert execute_code("import sys; sys.exit(0)").success
    r = execute_code("def broken(:\n    pass")
    assert not r.success and "SyntaxError" in r.error


def test_fork_bomb_is_contained():
    # a real fork bomb shape, capped at 6 levels (64 processes) in case every guard failed
    bomb = "import os\nprint(os.getcwd(), flush=True)\nfor _ in range(6):\n    os.fork()\nprint('FORKED', flush=True)\n"
    t0 = time.monotonic()
    r = execute_code(bomb, timeout=3)
    assert time.monotonic() - t0 < 6
    assert not r.success and "FORKED" not in r.stdout
    sandbox = r.stdout.split()[0]
    assert "nanochat_exec_" in sandbox and not _leftovers(sandbox)
    # every other way to start a process is refused; a child that did start would exit at once
    probe = """
import os
attempts = {
    "posix.fork": lambda: __import__("posix").fork(),
    "os.posix_spawn": lambda: os.posix_spawn("/bin/true", ["true"], {}),
    "os.execv": lambda: os.execv("/bin/true", ["true"]),
    "os.system": lambda: os.system("true"),
    "subprocess": lambda: __import__("subprocess").run(["true"]),
    "multiprocessing": lambda: __import__("multiprocessing").Process(target=print).start(),
    "_posixsubprocess": lambda: __import__("_posixsubprocess"),
    "ctypes": lambda: __import__("ctypes").CDLL(None).fork(),
    "pty": lambda: __import__("pty").fork(),
}
for name, attempt in attempts.items():
    try:
        pid = attempt()
    except Exception as e:
        print("blocked", name, type(e).__name__)
        continue
    if pid == 0:
        os._exit(0)
    print("FORKED", name)
"""
    r = execute_code(probe, timeout=5)
    assert r.success, r.stderr
    assert "FORKED" not in r.stdout
    assert r.stdout.count("blocked") == 9


def test_process_count_watchdog_kills_the_group():
    # the parent-side guard (for root, where RLIMIT_NPROC is not enforced): more than max_processes
    # live processes in the group -> the group is killed. max_processes=0 trips it on the interpreter.
    t0 = time.monotonic()
    r = execute_code("import time\ntime.sleep(30)", timeout=20, max_processes=0)
    assert time.monotonic() - t0 < 5
    assert not r.success and "process limit" in r.error
    # group_processes counts a real process group
    proc = subprocess.Popen(["sh", "-c", "sleep 30 & sleep 30 & wait"], start_new_session=True)
    try:
        deadline = time.monotonic() + 5
        while group_processes(proc.pid) != 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert group_processes(proc.pid) == 3
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_huge_allocation_exceeds_memory():
    r = execute_code("x = bytearray(4 * 1024 ** 3)\nprint('allocated')", memory_mb=128)
    assert not r.success and r.memory_exceeded and not r.timed_out
    assert "allocated" not in r.stdout and "128 MB" in r.error
    r = execute_code("chunks = []\nwhile True:\n    chunks.append(' ' * 10 ** 6)", memory_mb=128, timeout=10)
    assert r.memory_exceeded and not r.timed_out


def test_file_deletion_outside_sandbox_is_blocked(tmp_path):
    sentinel = tmp_path / "sentinel.txt"
    sentinel.write_text("precious")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "inner.txt").write_text("also precious")
    program = f"""
import os, pathlib, shutil
s, d = {str(sentinel)!r}, {str(folder)!r}
attempts = {{
    "os.remove": lambda: os.remove(s),
    "os.unlink": lambda: os.unlink(s),
    "pathlib.unlink": lambda: pathlib.Path(s).unlink(),
    "shutil.rmtree": lambda: shutil.rmtree(d),
    "os.rmdir": lambda: os.rmdir(d),
    "os.rename": lambda: os.rename(s, s + ".moved"),
    "os.replace": lambda: os.replace(s, s + ".moved"),
    "truncate by open": lambda: open(s, "w"),
    "os.open truncate": lambda: os.open(s, os.O_WRONLY | os.O_TRUNC),
    "os.truncate": lambda: os.truncate(s, 0),
    "os.chmod": lambda: os.chmod(s, 0),
    "os.system rm": lambda: os.system("rm -f " + s),
    "os.open dir_fd": lambda: os.open(os.path.basename(s), os.O_WRONLY | os.O_TRUNC,
                                      dir_fd=os.open(os.path.dirname(s), os.O_RDONLY)),
    "pathlib write_text": lambda: pathlib.Path(s).write_text(""),
}}
for name, attempt in attempts.items():
    try:
        attempt()
        print("DONE", name)
    except Exception as e:
        print("blocked", name, type(e).__name__)
"""
    r = execute_code(program)
    assert r.success, r.stderr
    assert "DONE" not in r.stdout and r.stdout.count("blocked") == 14
    assert sentinel.read_text() == "precious"
    assert (folder / "inner.txt").read_text() == "also precious"
    assert not (tmp_path / "sentinel.txt.moved").exists()


def test_network_is_blocked():
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(5)
    port = listener.getsockname()[1]
    try:
        program = f"""
attempts = {{
    "socket": lambda: __import__("socket").create_connection(("127.0.0.1", {port}), timeout=2),
    "_socket": lambda: __import__("_socket").socket(),
    "urllib": lambda: __import__("urllib.request").request.urlopen("http://127.0.0.1:{port}/", timeout=2),
    "http.client": lambda: __import__("http.client").client.HTTPConnection("127.0.0.1", {port}).request("GET", "/"),
}}
for name, attempt in attempts.items():
    try:
        attempt()
        print("CONNECTED", name)
    except Exception as e:
        print("blocked", name, type(e).__name__)
"""
        r = execute_code(program, timeout=10)
        assert r.success, r.stderr
        assert "CONNECTED" not in r.stdout and r.stdout.count("blocked") == 4
        listener.settimeout(0.3)
        with pytest.raises(socket.timeout):  # no connection ever arrived
            listener.accept()
    finally:
        listener.close()


def test_infinite_loop_times_out():
    t0 = time.monotonic()
    r = execute_code("print('start', flush=True)\nwhile True:\n    pass", timeout=1.0)
    elapsed = time.monotonic() - t0
    assert r.timed_out and not r.success and not r.memory_exceeded
    assert r.stdout == "start\n" and "timed out" in r.error
    assert 1.0 <= elapsed < 4.0


def test_output_flood_is_capped():
    r = execute_code("while True:\n    print('x' * 1000)", timeout=5, max_output_bytes=20_000)
    assert not r.success and not r.timed_out
    assert len(r.stdout) <= 20_000 + 100 and "[output truncated]" in r.stdout


def test_bad_arguments():
    with pytest.raises(TypeError):
        execute_code(b"print(1)")
    with pytest.raises(ValueError, match="timeout"):
        execute_code("print(1)", timeout=0)
    with pytest.raises(ValueError, match="memory_mb"):
        execute_code("print(1)", memory_mb=8)


# --- escape attempts (scripts/sandbox_escapes.py): each must leave no trace outside the sandbox ---------------

@pytest.fixture(scope="module")
def targets():
    t = Targets().start()
    yield t
    t.close()


@pytest.fixture(scope="module")
def layers():
    r = execute_code("print('ok')")
    assert r.success, r.stderr
    return r.isolation, r.refused


@pytest.mark.parametrize("guard", [True, False], ids=["guard_on_after_tamper", "guard_off"])
@pytest.mark.parametrize("attempt", ATTEMPTS, ids=[a.name for a in ATTEMPTS])
def test_escape_attempt_is_contained(attempt, guard, targets, layers):
    isolation, refused = layers
    # both variants rely on the OS layers: the guard alone cannot stop e.g. a fresh posix module's mkfifo
    missing = [n for n in attempt.needs if not any(layer.startswith(n) for layer in isolation)]
    if missing:
        pytest.skip(f"this kernel/user refused the OS layer(s) {missing} the attempt relies on: {'; '.join(refused)}")
    held, detail, result = run_attempt(attempt, targets, guard)
    assert held, f"{attempt.name} escaped: {detail}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr[-2000:]}"


def test_guard_alone_resists_tampering(targets):
    # no OS layers (isolate=False): only the audit hook stands, after the program tried to switch it off
    # the way the old hook was switched off (gc walk, the hook's frame from a traceback, realpath swap)
    targets.reset()
    program = PRELUDE + TAMPER + targets.fill(r'''
import signal
def db():
    import sqlite3
    sqlite3.connect(__OUT__ + "/g.db").execute("create table t (x)")
def tcp():
    import socket
    return socket.create_connection(("127.0.0.1", __PORT__), timeout=2)
attempt("open", lambda: open(__OUT__ + "/g_file", "w").write("x"))
attempt("os.open", lambda: os.open(__OUT__ + "/g_osopen", os.O_CREAT | os.O_WRONLY))
attempt("relative ..", lambda: open("../../" + os.path.basename(__OUT__) + "/g_rel", "w"))
attempt("mkdir", lambda: fresh("posix").mkdir(__OUT__ + "/g_dir"))
attempt("sqlite3", db)
attempt("kill", lambda: fresh("posix").kill(__SLEEPER__, signal.SIGKILL))
attempt("socket", tcp)
attempt("fork", lambda: fresh("posix").fork())
attempt("inside", lambda: open("kept.txt", "w").write("fine"))
''')
    r = execute_code(program, isolate=False)
    assert r.success, r.stderr
    assert r.isolation == () and any(x.startswith("os-layers:") for x in r.refused)
    assert "tamper-gc refused PermissionError" in r.stdout
    assert targets.created() == [] and targets.sleeper.poll() is None and targets.connections() == 0, r.stdout
    # tamper-gc and all eight attempts refused by the hook itself, the write inside allowed
    assert r.stdout.count(" refused PermissionError ") + r.stdout.count(" refused ImportError ") == 1 + 8, r.stdout
    assert "inside DONE" in r.stdout


def test_audit_hook_has_no_mutable_state():
    from nanochat import sandbox_guard
    hook = sandbox_guard.make_hook("/tmp/box")
    assert hook.__closure__ is None and not hook.__code__.co_freevars and not hook.__code__.co_cellvars
    loads = {i.opname for i in dis.get_instructions(hook)}
    assert not loads & {"LOAD_GLOBAL", "LOAD_NAME", "LOAD_DEREF", "LOAD_CLASSDEREF", "LOAD_CLOSURE", "STORE_GLOBAL"}
    immutable = (frozenset, tuple, str, int, type, type(len), type(str.join), type("".join))
    assert all(isinstance(v, immutable) or v is hook for v in hook.__defaults__)
    cwd = os.getcwd()
    hook("open", ("/tmp/box/a.txt", "w", os.O_WRONLY | os.O_CREAT))  # inside: allowed
    hook("open", ("/etc/passwd", "r", os.O_RDONLY))  # reading: allowed
    hook("open", (3, "w", os.O_WRONLY))  # an open descriptor
    hook("open", ("/dev/null", "w", os.O_WRONLY))
    for bad in ("/tmp/box/../x", "/tmp/boxer/a", "/tmp", "relative.txt" if not cwd.startswith("/tmp/box") else "/"):
        with pytest.raises(PermissionError):
            hook("open", (bad, "w", os.O_WRONLY))
    with pytest.raises(PermissionError):
        hook("sqlite3.connect", ("/tmp/x.db",))
    hook("sqlite3.connect", (":memory:",))
    with pytest.raises(PermissionError):
        hook("gc.get_referrers", ((),))
    with pytest.raises(PermissionError):
        hook("object.__setattr__", (hook, "__defaults__", ()))
    hook("object.__setattr__", (test_audit_hook_has_no_mutable_state, "__defaults__", ()))  # namedtuple does this
    with pytest.raises(ImportError):
        hook("import", ("ctypes.util", None, [], [], []))


def test_humaneval_style_program_imports_the_stdlib():
    # as root the program runs as nobody: the interpreter's files must stay readable (e.g. a pyenv under /root)
    program = """
from typing import List
import bisect, collections, datetime, decimal, fractions, functools, hashlib, heapq, itertools, json, math
import random, re, statistics, string


def has_close_elements(numbers: List[float], threshold: float) -> bool:
    return any(abs(a - b) < threshold for a, b in itertools.combinations(numbers, 2))


assert has_close_elements([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3)
assert not has_close_elements([1.0, 2.0, 3.0], 0.5)
print(hashlib.sha256(b"x").hexdigest()[:8], statistics.mean([1, 2, 3]))
"""
    r = execute_code(program)
    assert r.success, r.stderr
    assert r.stdout == "2d711642 2\n"


def test_layers_are_reported():
    r = execute_code("print(1)")
    named = set(r.isolation) | {x.split(":")[0] for x in r.refused}
    if sys.platform.startswith("linux"):
        for layer in ("mountns", "netns", "ipcns", "pidns", "readonly-fs", "no-capabilities", "no-new-privs", "seccomp"):
            assert layer in named, (r.isolation, r.refused)
        assert "uid" in named or any(x.startswith("uid=") for x in r.isolation)
    r = execute_code("print(1)", isolate=False)
    assert r.success and r.isolation == () and r.refused[0].startswith("os-layers:")


@pytest.mark.skipif(os.geteuid() != 0, reason="the uid drop only happens when the caller is root")
def test_root_caller_runs_the_program_as_nobody():
    r = execute_code("import os\nprint(os.getuid(), os.getgid(), os.getgroups())\nprint(open('/proc/self/status').read())")
    assert r.success, r.stderr
    if "uid=65534" not in r.isolation:
        pytest.skip(f"the uid drop was refused here: {r.refused}")
    assert r.stdout.startswith("65534 65534 []\n")
    assert "CapEff:\t0000000000000000" in r.stdout and "NoNewPrivs:\t1" in r.stdout
    if "seccomp" in r.isolation:
        assert "Seccomp:\t2" in r.stdout
