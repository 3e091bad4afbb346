"""Tests for nanochat/execution.py: normal runs, errors, and containment of fork bombs, memory hogs,
file deletion, network access and infinite loops. Every dangerous program here is bounded by itself
too (e.g. the fork bomb forks at most 6 levels deep), so a broken guard cannot hurt the machine."""

import os
import signal
import socket
import subprocess
import time

import psutil
import pytest

from nanochat.execution import execute_code, group_processes


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
