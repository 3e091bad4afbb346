"""
Try every known way out of nanochat.execution's sandbox; print one line per attempt, "held" or "ESCAPED".

    python -m scripts.sandbox_escapes        # exit 0 = everything held, 1 = something escaped

Each attempt runs twice: "guard on", after the program first tried to switch the in-process guard off from
inside (gc object walks, the audit hook's frame from a traceback, a posixpath.realpath whose code is
swapped), and "guard off" (execute_code(guard=False)), where the OS layers alone must hold. An attempt is
judged by its side effect outside the sandbox, never by what the program says: a file that must not exist,
a sleeper process (running as the sandbox's own uid, so only the pid namespace protects it) that must still
be alive, listeners that must get no connection, a SIGUSR1 this process must not receive, no process of
the run left alive after the call. tests/test_execution.py runs the same attempts.

Every attempt aims only at targets this script made, so a sandbox that fails harms nothing else: no
kill(-1) or killpg, no writes outside a fresh folder, forks capped at 64 processes. (A kill(-1) run under the
old guard, as root, killed every process on the machine.)
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

from nanochat.execution import SANDBOX_UID, execute_code

PRELUDE = r'''
import os, sys
print("cwd", os.getcwd(), flush=True)
def attempt(name, fn):
    try:
        print(name, "DONE", repr(fn())[:60], flush=True)
    except BaseException as e:
        print(name, "refused", type(e).__name__, str(e)[:70], flush=True)
def fresh(name):  # a new instance of a builtin module: it has the functions the guard replaced by None
    import importlib.util, importlib.machinery
    return importlib.util.module_from_spec(importlib.machinery.BuiltinImporter.find_spec(name))
'''

# Tries to switch the in-process guard off (what defeated the old guard), then lets the attempt run.
TAMPER = r'''
def _disarm(value):
    if isinstance(value, (set, dict, list)):
        value.clear()
    for cell in getattr(value, "__closure__", None) or ():
        inner = cell.cell_contents
        if isinstance(inner, (set, dict, list)):
            inner.clear()
        elif isinstance(inner, str):
            cell.cell_contents = "/"  # a sandbox root of "/" lets every path through
    if type(value).__name__ == "function":  # a no-op in its place (refused for the new hook)
        value.__code__ = (lambda *a, **k: None).__code__
def _tamper_gc():
    import gc
    n = 0
    for obj in gc.get_objects():
        if type(obj).__name__ == "function" and obj.__code__.co_name in ("hook", "_hook", "inside"):
            _disarm(obj)
            n += 1
    return n
def _tamper_frames():
    try:
        import socket  # refused by the guard: its traceback holds the audit hook's frame
    except Exception as e:
        tb, n = e.__traceback__, 0
        while tb is not None:
            if "hook" in tb.tb_frame.f_code.co_name:
                for value in list(tb.tb_frame.f_locals.values()):
                    try:
                        _disarm(value)
                        n += 1
                    except Exception:
                        pass
            tb = tb.tb_next
        return n
def _tamper_realpath():
    import posixpath
    posixpath.realpath.__code__ = (lambda filename, *, strict=False: os.getcwd() + "/inside").__code__
attempt("tamper-gc", _tamper_gc)
attempt("tamper-frames", _tamper_frames)
attempt("tamper-realpath", _tamper_realpath)
'''


@dataclass
class Targets:
    """What the attempts aim at, outside the sandbox; start() before, close() after."""
    out: str = field(default_factory=lambda: os.path.join(tempfile.gettempdir(), f"nanochat_escape_{uuid.uuid4().hex}"))
    usr1: int = 0

    def start(self):
        # a world-writable folder (like /tmp itself), so only the sandbox stops writes, not permissions
        os.mkdir(self.out, 0o777)
        os.chmod(self.out, 0o1777)
        self.sleeper = None
        self.tcp = socket.socket()
        self.tcp.bind(("127.0.0.1", 0))
        self.tcp.listen(8)
        self.tcp.setblocking(False)
        self.unix_path = os.path.join(self.out, "listener.sock")
        self.unix = socket.socket(socket.AF_UNIX)
        self.unix.bind(self.unix_path)
        os.chmod(self.unix_path, 0o777)
        self.unix.listen(8)
        self.unix.setblocking(False)
        self.old_usr1 = signal.signal(signal.SIGUSR1, self._on_usr1)
        self.reset()
        return self

    def _on_usr1(self, signum, frame):
        self.usr1 += 1

    def reset(self):
        """Before each attempt: an empty folder, a live sleeper, no signal counted, no pending connection."""
        for name in self.created():
            path = os.path.join(self.out, name)
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.unlink(path)
        if self.sleeper is None or self.sleeper.poll() is not None:
            try:  # as the program's uid, so that only the pid namespace protects it
                user = SANDBOX_UID if os.geteuid() == 0 else None
                self.sleeper = subprocess.Popen(["sleep", "600"], user=user, start_new_session=True)
            except OSError:  # e.g. root of a user namespace that does not map SANDBOX_UID
                self.sleeper = subprocess.Popen(["sleep", "600"], start_new_session=True)
        self.usr1 = 0
        self.connections()

    def close(self):
        signal.signal(signal.SIGUSR1, self.old_usr1)
        self.sleeper.kill()
        self.sleeper.wait()
        self.tcp.close()
        self.unix.close()
        shutil.rmtree(self.out, ignore_errors=True)

    def fill(self, program: str) -> str:
        return (program.replace("__OUT__", repr(self.out)).replace("__SLEEPER__", str(self.sleeper.pid))
                .replace("__RUNNER__", str(os.getpid())).replace("__PORT__", str(self.tcp.getsockname()[1]))
                .replace("__UNIX__", repr(self.unix_path)))

    def created(self) -> list:
        return sorted(set(os.listdir(self.out)) - {"listener.sock"})

    def connections(self) -> int:
        n = 0
        for listener in (self.tcp, self.unix):
            try:
                listener.accept()[0].close()
                n += 1
            except BlockingIOError:
                pass
        return n


@dataclass
class Attempt:
    name: str
    program: str  # tokens __OUT__, __SLEEPER__, __RUNNER__, __PORT__, __UNIX__ are filled in
    check: Callable  # (result, targets) -> problem text or None
    needs: tuple = ()  # OS layers the guard-off run relies on (tests skip it where the kernel refused one)
    timeout: float = 5.0


def _no_files(result, t):
    return f"created {t.created()}" if t.created() else None


def _timed_out(result):
    if "sleeping" not in result.stdout:
        return "never got to the attempt (the machine too slow for the timeout?)"
    return None if result.timed_out else "not timed out"


def _sleeper_alive(result, t):
    return "the sleeper was killed" if t.sleeper.poll() is not None else None


ATTEMPTS = [
    Attempt("write-outside", r'''
attempt("open", lambda: open(__OUT__ + "/file", "w").write("x"))
attempt("os.open", lambda: os.open(__OUT__ + "/osopen", os.O_CREAT | os.O_WRONLY))
attempt("fresh posix.open", lambda: fresh("posix").open(__OUT__ + "/fresh", os.O_CREAT | os.O_WRONLY))
attempt("dir_fd", lambda: fresh("posix").open("dirfd", os.O_CREAT | os.O_WRONLY, dir_fd=os.open(__OUT__, os.O_RDONLY)))
attempt("mkdir", lambda: fresh("posix").mkdir(__OUT__ + "/dir"))
''', _no_files, needs=("readonly-fs",)),
    Attempt("mkfifo-outside", r'''
attempt("os.mkfifo", lambda: os.mkfifo(__OUT__ + "/fifo"))
attempt("fresh posix.mkfifo", lambda: fresh("posix").mkfifo(__OUT__ + "/fifo2"))
''', _no_files, needs=("readonly-fs",)),
    Attempt("sqlite-outside", r'''
def write_db():
    import sqlite3
    db = sqlite3.connect(__OUT__ + "/x.db")
    db.execute("create table t (x)")
    db.commit()
attempt("sqlite3", write_db)
''', _no_files, needs=("readonly-fs",)),
    Attempt("kill-sleeper", r'''
import signal
attempt("os.kill", lambda: os.kill(__SLEEPER__, signal.SIGKILL))
attempt("fresh posix.kill", lambda: fresh("posix").kill(__SLEEPER__, signal.SIGKILL))
''', _sleeper_alive, needs=("pidns",)),
    Attempt("pidfd-sleeper", r'''
import signal
attempt("pidfd_send_signal", lambda: signal.pidfd_send_signal(os.pidfd_open(__SLEEPER__), signal.SIGKILL))
attempt("fresh pidfd", lambda: fresh("_signal").pidfd_send_signal(fresh("posix").pidfd_open(__SLEEPER__), 9))
attempt("/proc pidfd", lambda: fresh("_signal").pidfd_send_signal(os.open("/proc/%d" % __SLEEPER__, os.O_RDONLY), 9))
''', _sleeper_alive, needs=("pidns",)),
    Attempt("signal-runner", r'''
import signal
ppid = os.getppid()
print("ppid", ppid)
if ppid > 0:
    attempt("kill(getppid)", lambda: fresh("posix").kill(ppid, signal.SIGUSR1))
attempt("kill(runner)", lambda: fresh("posix").kill(__RUNNER__, signal.SIGUSR1))
attempt("pidfd(runner)", lambda: fresh("_signal").pidfd_send_signal(fresh("posix").pidfd_open(__RUNNER__), signal.SIGUSR1))
''', lambda r, t: f"{t.usr1} SIGUSR1 arrived" if t.usr1 else None, needs=("pidns",)),
    Attempt("ctypes", r'''
def cdll():
    try:
        import ctypes
        return ctypes.CDLL(None)
    except ImportError:  # the guard blocks the import: find the class ctypes left behind instead
        todo, seen = [object], set()
        while todo:
            cls = todo.pop()
            if cls.__name__ == "CDLL":
                return cls(None)
            for sub in type.__subclasses__(cls):
                if sub not in seen:
                    seen.add(sub)
                    todo.append(sub)
        raise LookupError("no CDLL class")
attempt("kill", lambda: cdll().kill(__SLEEPER__, 9))
attempt("setuid(0)", lambda: cdll().setuid(0))
attempt("open", lambda: cdll().open((__OUT__ + "/ctypes").encode(), 0o101, 0o644))
attempt("mkfifo", lambda: cdll().mkfifo((__OUT__ + "/ctypes_fifo").encode(), 0o644))
''', lambda r, t: _no_files(r, t) or _sleeper_alive(r, t), needs=("readonly-fs", "pidns")),
    Attempt("regain-root", r'''
attempt("setuid(0)", lambda: fresh("posix").setuid(0))
attempt("setresuid(0)", lambda: fresh("posix").setresuid(0, 0, 0))
attempt("write after", lambda: open(__OUT__ + "/as_root", "w").write("x"))
''', _no_files, needs=("readonly-fs",)),
    Attempt("network", r'''
def tcp():
    import socket
    return socket.create_connection(("127.0.0.1", __PORT__), timeout=2)
def unix():
    import socket
    s = socket.socket(socket.AF_UNIX)
    s.connect(__UNIX__)
    return s
attempt("tcp 127.0.0.1", tcp)
attempt("unix socket", unix)
''', lambda r, t: f"{t.connections()} connection(s)" if t.connections() else None, needs=("seccomp",)),
    Attempt("fork-bomb", r'''
fork = os.fork if os.fork else fresh("posix").fork
for level in range(6):  # at most 64 processes even if every layer failed
    try:
        if fork() == 0:
            print("FORKED", flush=True)
    except OSError as e:
        print("fork refused", e, flush=True)
        break
''', lambda r, t: "a fork succeeded" if "FORKED" in r.stdout else None, needs=("uid=",)),
    Attempt("daemon", r'''
import time
fork = os.fork if os.fork else fresh("posix").fork
setsid = os.setsid if os.setsid else fresh("posix").setsid
try:
    if fork() == 0:
        setsid()
        if fork() == 0:
            print("DAEMON", flush=True)
            time.sleep(30)
        os._exit(0)
except OSError as e:
    print("fork refused", e)
''', lambda r, t: "a fork succeeded" if "DAEMON" in r.stdout else None, needs=("uid=",)),
    Attempt("setsid-sleep", r'''
import time
attempt("setsid", lambda: (os.setsid or fresh("posix").setsid)())  # out of the process group the parent kills
print("sleeping", flush=True)
time.sleep(60)
''', lambda r, t: _timed_out(r), timeout=1.0),
    Attempt("memory-bomb", r'''
x = bytearray(4 * 1024 ** 3)
print("ALLOCATED")
''', lambda r, t: None if r.memory_exceeded and "ALLOCATED" not in r.stdout else f"not stopped: {r.error}"),
    Attempt("long-sleep", r'''
import time
print("sleeping", flush=True)
time.sleep(60)
''', lambda r, t: _timed_out(r), timeout=1.0),
]


def leftovers(marker: str) -> list:
    """pids of live processes whose command line holds `marker` (the run's temp directory)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        if marker.encode() in cmdline and stat[stat.rfind(b")") + 2:].split()[0] != b"Z":
            found.append(int(entry))
    return found


def run_attempt(attempt: Attempt, targets: Targets, guard: bool):
    """Run one attempt; returns (held, detail, result)."""
    targets.reset()
    program = PRELUDE + (TAMPER if guard else "") + targets.fill(attempt.program)
    t0 = time.monotonic()
    result = execute_code(program, timeout=attempt.timeout, memory_mb=256, guard=guard)
    elapsed = time.monotonic() - t0
    problem = attempt.check(result, targets)
    lines = result.stdout.splitlines()
    if lines and lines[0].startswith("cwd ") and os.path.isdir("/proc"):
        left = leftovers(os.path.dirname(lines[0][4:]))
        if left:
            problem = (problem + "; " if problem else "") + f"processes left alive: {left}"
            for pid in left:  # do not leave them behind
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
    if elapsed > attempt.timeout + 4:
        problem = (problem + "; " if problem else "") + f"took {elapsed:.1f} s"
    said = [line for line in lines[1:] if (" refused " in line or " DONE " in line or "fork" in line)
            and not line.startswith("tamper-")]
    tamper = [line.split()[0][7:] + ":" + line.split()[1] for line in lines if line.startswith("tamper-")]
    detail = problem or ("; ".join(said) or result.error or "ok")[:140]
    if tamper and not problem:
        detail = f"[tamper {' '.join(tamper)}] {detail}"
    return problem is None, detail, result


def main() -> int:
    probe = execute_code("print('ok')")
    print("OS layers in force:", ", ".join(probe.isolation) or "none")
    for why in probe.refused:
        print("  refused:", why)
    escaped = 0
    targets = Targets().start()
    try:
        for attempt in ATTEMPTS:
            for guard in (True, False):
                held, detail, _ = run_attempt(attempt, targets, guard)
                escaped += not held
                print(f"{'held' if held else 'ESCAPED':8} {attempt.name:15} guard {'on ' if guard else 'off'}  {detail}",
                      flush=True)
    finally:
        targets.close()
    print(f"{escaped} escaped" if escaped else "all held")
    return 1 if escaped else 0


if __name__ == "__main__":
    sys.exit(main())
