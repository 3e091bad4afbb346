"""
Run a Python program (model-written code, e.g. HumanEval completions) in a separate, confined process.

execute_code(program, timeout=5.0, memory_mb=256) -> ExecutionResult(success, stdout, stderr, error, timed_out,
memory_exceeded, isolation, refused). The boundary is the operating system: whatever the program does inside
its interpreter, it cannot write outside its temp directory, signal or see other processes, reach the
network, start processes or outlive the call. An in-process guard sits on top as a second layer.
nanochat/sandbox_child.py builds the OS layers, nanochat/sandbox_guard.py the guard. Outermost first:

1. A fresh `python -I -B` (no PYTHON* variables, no user site, no .pyc writes), a minimal environment,
   stdin from /dev/null, stdout/stderr to files, its own empty temp directory as cwd/HOME/TMPDIR (removed
   afterwards), its own session and process group.
2. Linux namespaces, made as root, or as any user inside an unprivileged user namespace:
   - mount: every mount read-only and nodev except the temp directory (plus /dev/null, /dev/zero,
     /dev/full, /dev/random, /dev/urandom), so no file, FIFO, directory or sqlite database appears anywhere
     else, whatever the file permissions say, and no raw device or terminal can be opened;
   - network: only a loopback that is down: no TCP/UDP anywhere, 127.0.0.1 included;
   - pid: the program is pid 1 of its own namespace with its own /proc, so other processes cannot be
     named, signalled or opened as pidfds, and when it dies the kernel kills whatever is left inside. A
     waiter outside forwards its exit status; the program dies with the waiter (PR_SET_PDEATHSIG);
   - ipc.
3. Privileges. As root the program drops to uid/gid 65534 (nobody, no supplementary groups; the temp
   directory is given to it), which also clears every capability and makes RLIMIT_NPROC apply; directories
   on the interpreter's sys.path that nobody may not search (e.g. /root holding a pyenv Python) are covered
   in its mount namespace by a tmpfs holding only the binds it needs. Otherwise capabilities are dropped
   with capset. Then no-new-privs (setuid binaries grant nothing) and a seccomp filter refusing socket(2)
   of every family (AF_UNIX reaches host daemons without any network), io_uring, mount and namespace calls,
   ptrace and process_vm_*, bpf, perf, keyrings, kernel modules and kexec (x86_64 and aarch64).
4. rlimits: CPU (timeout rounded up + 1 s), address space and data (memory_mb), file size (which also caps
   stdout/stderr), 256 open files, RLIMIT_NPROC = 1 (no new processes or threads), no core dumps.
5. The parent polls the process group. On the wall-clock timeout, or when the group holds more than
   max_processes processes (plus the waiter), it SIGKILLs the whole group. After every run it kills the
   group, waits until neither the group nor the pid-1 program has a live process (killing again), and only
   then reaps the leader, so group and pid ids cannot be recycled meanwhile. Should the caller's process
   die instead, the sandbox dies with it (PR_SET_PDEATHSIG).
6. The in-process guard, second layer: dangerous functions replaced by None, and an audit hook that refuses
   process creation, signals, deletion, renames, sockets, ctypes, sub-interpreters, gc's object walks,
   tracers, and writes outside the temp directory. Its state is immutable and unreachable from the program
   (see sandbox_guard.py), but code in the same interpreter can still get around it; the layers above hold
   without it (`guard=False` runs without it, for the tests).

A layer the kernel refuses (no user namespaces for non-root, seccomp missing, not Linux, ...) is left out,
never silently: result.refused lists "layer: reason", result.isolation the layers in force, and the first
run missing a layer warns (RuntimeWarning). The escape attempts, with the guard on (after trying to switch
it off from inside) and off: `python -m scripts.sandbox_escapes` (one line each, held/ESCAPED; exit 1 on any
escape).

Outcome: success = exit code 0 within the limits. memory_exceeded = the program raised MemoryError
(the runner reports it with a distinct exit code). timed_out = wall clock or CPU limit.
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass

_MEMORY_EXIT = 97  # the runner's exit code for MemoryError
SANDBOX_UID = 65534  # nobody: the uid a root caller's program runs as
_CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_child.py")
_warned: set = set()


@dataclass
class ExecutionResult:
    success: bool
    stdout: str
    stderr: str
    error: str | None = None
    timed_out: bool = False
    memory_exceeded: bool = False
    isolation: tuple = ()  # the OS layers in force, e.g. ("mountns", "netns", "pidns", "uid=65534", "seccomp", ...)
    refused: tuple = ()  # "layer: reason" for each OS layer the kernel (or the caller) left out


def group_processes(pgid: int) -> int | None:
    """Number of live (non-zombie) processes in process group `pgid`, from /proc; None where /proc is absent."""
    if not os.path.isdir("/proc"):
        return None
    n = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # exited meanwhile
        # fields after the command name "(...)": state ppid pgrp ...; the name itself may hold spaces/parens
        fields = stat[stat.rfind(b")") + 2:].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != b"Z":
            n += 1
    return n


def _exited(proc) -> bool:
    """True once the child has exited, WITHOUT reaping it (it stays a zombie, so its pid/pgid stay reserved).
    Where os.waitid is missing (macOS) it falls back to poll(), which reaps."""
    if not hasattr(os, "waitid"):
        return proc.poll() is not None
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _live_with(pid: int, marker: str) -> bool:
    """Whether `pid` is a live (non-zombie) process whose command line holds `marker` (so a recycled pid
    never matches)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2:].split()[0] != b"Z" and marker.encode() in cmdline


def _drain(fd: int) -> bytes:
    out = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return out
        if not chunk:
            return out
        out += chunk


def _read_capped(path, limit) -> str:
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    text = data[:limit].decode("utf-8", errors="replace")
    return text + ("\n[output truncated]" if len(data) > limit else "")


def _private(path: str) -> int:
    """A new file only its owner may read or write."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)


def execute_code(program: str, timeout: float = 5.0, memory_mb: int = 256, max_output_bytes: int = 1_000_000,
                 max_processes: int = 1, guard: bool = True, isolate: bool = True) -> ExecutionResult:
    """Run `program` (Python source) in a fresh, confined interpreter; see the module docstring.
    guard=False / isolate=False leave out the in-process guard / the OS layers: only for testing the other."""
    if not isinstance(program, str):
        raise TypeError(f"program must be a str of Python source, got {type(program).__name__}")
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    if memory_mb < 64:
        raise ValueError(f"memory_mb must be >= 64 (the interpreter itself needs ~30 MB), got {memory_mb}")
    work = os.path.realpath(tempfile.mkdtemp(prefix="nanochat_exec_"))
    try:
        os.chmod(work, 0o711)  # a dropped uid may pass through to its sandbox, not list or read the rest
        sandbox = os.path.join(work, "sandbox")
        os.mkdir(sandbox, 0o700)  # the child gives it to the sandbox uid
        program_path = os.path.join(work, "program.py")
        with os.fdopen(_private(program_path), "w", encoding="utf-8") as f:
            f.write(program)
        out_path, err_path = os.path.join(work, "stdout"), os.path.join(work, "stderr")
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": sandbox, "TMPDIR": sandbox,
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        report_r, report_w = os.pipe()
        os.set_blocking(report_r, False)
        cfg = {"program": program_path, "sandbox": sandbox, "report_fd": report_w, "guard": guard, "isolate": isolate,
               "memory_bytes": memory_mb * 1024 * 1024, "cpu_seconds": math.ceil(timeout) + 1,
               "fsize": max_output_bytes + 4096, "memory_exit": _MEMORY_EXIT,
               "uid": SANDBOX_UID if os.geteuid() == 0 else os.getuid(), "parent": os.getpid()}
        argv = [sys.executable, "-I", "-B", _CHILD, json.dumps(cfg)]
        t0 = time.monotonic()
        timed_out = too_many = False
        report = b""
        fout, ferr = _private(out_path), _private(err_path)
        try:
            proc = subprocess.Popen(argv, cwd=sandbox, env=env, stdin=subprocess.DEVNULL, stdout=fout, stderr=ferr,
                                    start_new_session=True, close_fds=True, pass_fds=(report_w,))
        except BaseException:
            os.close(report_r)
            raise
        finally:
            for fd in (fout, ferr, report_w):
                os.close(fd)
        try:
            while not _exited(proc):
                if time.monotonic() - t0 > timeout:
                    timed_out = True
                    break
                count = group_processes(proc.pid)
                report += _drain(report_r)  # after counting: "waiter" is sent before the waiter forks
                allowed = max_processes + (1 if b"waiter" in report else 0)
                if count is not None and count > allowed:
                    too_many = True
                    break
                time.sleep(0.01)
        finally:
            report += _finish_group(proc, report_r, work)
            os.close(report_r)
        stdout, stderr = _read_capped(out_path, max_output_bytes), _read_capped(err_path, max_output_bytes)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    isolation, refused = _layers(report)
    result = _classify(proc.returncode, stdout, stderr, timed_out, too_many, timeout, memory_mb, max_processes)
    result.isolation, result.refused = isolation, refused
    if refused and isolate and refused not in _warned:
        _warned.add(refused)
        warnings.warn("execution sandbox running without: " + "; ".join(refused), RuntimeWarning, stacklevel=2)
    return result


def _finish_group(proc, report_r, marker) -> bytes:
    """Kill the run's process group and its pid-1 program; wait until none of it is alive; reap the leader."""
    report = b""
    inner = None
    deadline = time.monotonic() + 5.0
    while True:
        try:  # the leader is alive or a zombie here, so the group id is still ours
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        report += _drain(report_r)
        for line in report.decode(errors="replace").splitlines():
            if line.startswith("inner "):
                inner = int(line.split()[1])
        inner_alive = inner is not None and _live_with(inner, marker)
        if inner_alive:  # outside the group if it called setsid(); it also dies with the waiter (pdeathsig)
            try:
                os.kill(inner, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if not inner_alive and not group_processes(proc.pid):
            break
        if time.monotonic() > deadline:
            warnings.warn(f"execution sandbox: a process of run {marker} is still alive after SIGKILL", RuntimeWarning)
            break
        time.sleep(0.005)
    proc.wait()
    return report + _drain(report_r)


def _layers(report: bytes) -> tuple[tuple, tuple]:
    """(layers in force, "layer: reason" refused) from the child's report lines."""
    ok, refused = [], []
    for line in report.decode(errors="replace").splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "ok":
            ok.append(rest)
        elif kind == "refused":
            name, _, why = rest.partition(" ")
            refused.append(f"{name}: {why}")
    return tuple(ok), tuple(refused)


def _classify(rc, stdout, stderr, timed_out, too_many, timeout, memory_mb, max_processes) -> ExecutionResult:
    """Turn the exit status into an ExecutionResult with a one-line `error`."""
    cpu_killed = rc in (-signal.SIGXCPU,) or (rc == -signal.SIGKILL and not (timed_out or too_many))
    memory = rc == _MEMORY_EXIT or (rc is not None and rc < 0 and "MemoryError" in stderr)
    if timed_out or cpu_killed:
        error = f"timed out after {timeout} s" if timed_out else "CPU time limit exceeded"
        return ExecutionResult(False, stdout, stderr, error, timed_out=True)
    if too_many:
        return ExecutionResult(False, stdout, stderr, f"process limit exceeded (more than {max_processes} process)")
    if memory:
        return ExecutionResult(False, stdout, stderr, f"memory limit of {memory_mb} MB exceeded", memory_exceeded=True)
    if rc == 0:
        return ExecutionResult(True, stdout, stderr)
    if rc < 0:
        return ExecutionResult(False, stdout, stderr, f"killed by signal {signal.Signals(-rc).name}")
    last = [line for line in stderr.strip().splitlines() if line.strip()]
    return ExecutionResult(False, stdout, stderr, last[-1].strip() if last else f"exited with code {rc}")
