"""
Run a Python program (model-written code, e.g. HumanEval completions) in a separate, limited process.

execute_code(program, timeout=5.0, memory_mb=256) -> ExecutionResult(success, stdout, stderr, error,
timed_out, memory_exceeded). Layers, outermost first:

1. A fresh interpreter: `python -I` (no PYTHON* variables, no user site), a minimal environment,
   stdin from /dev/null, its own empty temp directory as cwd/HOME/TMPDIR, removed afterwards.
2. Its own session / process group (start_new_session). The parent polls it: on the wall-clock
   timeout, or as soon as the group holds more than one process (a fork that slipped past the guards),
   it kills the WHOLE group with SIGKILL. The group is killed after every run, before the leader is
   reaped, so no descendant outlives the call and the group id cannot be recycled meanwhile.
3. Resource limits set in the child before the program runs: RLIMIT_AS/RLIMIT_DATA (memory_mb; not on
   macOS, which refuses to lower them),
   RLIMIT_CPU (timeout, rounded up, + 1 s), RLIMIT_FSIZE (caps files and the captured stdout/stderr,
   which go to files, not pipes), RLIMIT_NPROC = 1 (no new processes or threads for a non-root user;
   the kernel does not enforce it for root, hence layers 2 and 4), RLIMIT_CORE = 0.
4. A reliability guard installed in the child before the program runs:
   - dangerous functions replaced by None: os.system/fork/kill/remove/unlink/rmdir/rename/replace/
     chmod/chown/symlink/exec*/spawn*/..., the same on `posix`, shutil.rmtree/move/chown;
   - an audit hook (sys.addaudithook; it cannot be removed once added) that refuses process creation
     (os.fork/exec/spawn/posix_spawn/system, subprocess.Popen), signals, deletion, renames, permission
     changes, any socket (socket.*), ctypes (ctypes.*), raising rlimits, importing subprocess /
     multiprocessing / socket / ctypes / pty and their C halves, and opening a file for writing or
     creating a directory outside the temp directory (os.open/os.mkdir refuse dir_fd, which would
     dodge that path check).
   This is a guard against accidents and simple misbehaviour of generated code, not a security
   boundary against a determined attacker: run untrusted code at scale inside a container/VM too.

Outcome: success = exit code 0 within the limits. memory_exceeded = the program raised MemoryError
(the bootstrap reports it with a distinct exit code). timed_out = wall clock or CPU limit.
"""

import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

_MEMORY_EXIT = 97  # the bootstrap's exit code for MemoryError

# The child's bootstrap (runs as `python -I -c _BOOTSTRAP program.py sandbox mem cpu fsize`).
_BOOTSTRAP = r'''
import sys

def _bootstrap():
    import builtins, os, posix, resource, shutil, signal, traceback
    program_path, sandbox = sys.argv[1], sys.argv[2]
    mem, cpu, fsize = (int(a) for a in sys.argv[3:6])
    with open(program_path, encoding="utf-8") as f:
        source = f.read()
    sys.argv = ["program.py"]
    limits = [("RLIMIT_CPU", cpu, cpu + 1), ("RLIMIT_FSIZE", fsize, fsize), ("RLIMIT_NPROC", 1, 1),
              ("RLIMIT_CORE", 0, 0)]
    if sys.platform != "darwin":  # macOS refuses to lower the address-space limit
        limits += [("RLIMIT_AS", mem, mem), ("RLIMIT_DATA", mem, mem)]
    for name, soft, hard in limits:
        if hasattr(resource, name):
            resource.setrlimit(getattr(resource, name), (soft, hard))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past RLIMIT_FSIZE fail with OSError instead

    # --- reliability guard: disable dangerous functions ---
    for mod in (os, posix):
        for name in ("system", "popen", "fork", "forkpty", "kill", "killpg", "setsid", "setpgid", "setpgrp",
                     "setuid", "setgid", "remove", "unlink", "rmdir", "removedirs",
                     "rename", "renames", "replace", "truncate", "ftruncate", "chmod", "fchmod", "lchmod",
                     "chown", "fchown", "lchown", "link", "symlink", "chroot", "execv", "execve", "execl",
                     "execle", "execlp", "execlpe", "execvp", "execvpe", "spawnv", "spawnve", "spawnl",
                     "spawnle", "spawnlp", "spawnlpe", "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp"):
            if hasattr(mod, name):
                setattr(mod, name, None)
    for name in ("rmtree", "move", "chown"):
        setattr(shutil, name, None)
    # dir_fd would make a relative path escape the sandbox check below: refuse it
    def no_dir_fd(real):
        def wrapper(*args, dir_fd=None, **kwargs):
            if dir_fd is not None:
                raise PermissionError("dir_fd is blocked by the execution sandbox")
            return real(*args, **kwargs)
        return wrapper
    for mod in (os, posix):
        mod.open, mod.mkdir = no_dir_fd(posix.open), no_dir_fd(posix.mkdir)
    blocked_modules = {"subprocess", "_posixsubprocess", "multiprocessing", "_multiprocessing", "socket",
                       "_socket", "ssl", "_ssl", "ctypes", "_ctypes", "pty", "asyncio", "_asyncio"}
    for name in list(sys.modules):
        if name.split(".")[0] in blocked_modules:
            del sys.modules[name]
    denied = {"os.system", "os.fork", "os.forkpty", "os.exec", "os.spawn", "os.posix_spawn", "os.kill",
              "os.killpg", "os.remove", "os.rmdir", "os.rename", "os.truncate", "os.chmod", "os.chown",
              "os.chflags", "os.lchflags", "os.link", "os.symlink", "os.setxattr",
              "os.removexattr", "os.startfile", "shutil.rmtree", "shutil.chown", "shutil.move", "pty.spawn",
              "subprocess.Popen", "resource.setrlimit", "resource.prlimit", "webbrowser.open", "sys.remote_exec"}
    root = os.path.realpath(sandbox) + os.sep
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    realpath, fsdecode = os.path.realpath, os.fsdecode

    def inside(path):
        try:
            return (realpath(fsdecode(path)) + "/").startswith(root)
        except Exception:
            return False

    def hook(event, args):
        if event in denied or event.startswith(("socket.", "ctypes.", "os.exec", "os.spawn")):
            raise PermissionError(f"{event} is blocked by the execution sandbox")
        if event == "import" and args[0].split(".")[0] in blocked_modules:
            raise ImportError(f"import of {args[0]} is blocked by the execution sandbox")
        if event == "open" and not isinstance(args[0], int) and (args[2] or 0) & write_flags and not inside(args[0]):
            raise PermissionError(f"writing {args[0]!r} outside the sandbox directory is blocked")
        if event == "os.mkdir" and not inside(args[0]):
            raise PermissionError(f"creating {args[0]!r} outside the sandbox directory is blocked")

    sys.addaudithook(hook)
    code = compile(source, "program.py", "exec")
    return code, {"__name__": "__main__", "__builtins__": builtins}, traceback, os

_code, _globals, _traceback, _os = _bootstrap()
del _bootstrap
try:
    exec(_code, _globals)
except SystemExit:
    raise
except MemoryError:
    try:
        sys.stderr.write("MemoryError: the program exceeded its memory limit\n")
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        _os._exit(97)  # = _MEMORY_EXIT
except BaseException:
    _type, _value, _tb = sys.exc_info()
    _traceback.print_exception(_type, _value, _tb.tb_next)  # skip this bootstrap's own frame
    sys.stdout.flush()
    sys.exit(1)
'''


@dataclass
class ExecutionResult:
    success: bool
    stdout: str
    stderr: str
    error: str | None = None
    timed_out: bool = False
    memory_exceeded: bool = False


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


def _read_capped(path, limit) -> str:
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    text = data[:limit].decode("utf-8", errors="replace")
    return text + ("\n[output truncated]" if len(data) > limit else "")


def execute_code(program: str, timeout: float = 5.0, memory_mb: int = 256, max_output_bytes: int = 1_000_000,
                 max_processes: int = 1) -> ExecutionResult:
    """Run `program` (Python source) in a fresh, limited, guarded interpreter; see the module docstring."""
    if not isinstance(program, str):
        raise TypeError(f"program must be a str of Python source, got {type(program).__name__}")
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    if memory_mb < 64:
        raise ValueError(f"memory_mb must be >= 64 (the interpreter itself needs ~30 MB), got {memory_mb}")
    work = tempfile.mkdtemp(prefix="nanochat_exec_")
    try:
        sandbox = os.path.join(work, "sandbox")
        os.mkdir(sandbox)
        program_path = os.path.join(work, "program.py")
        with open(program_path, "w", encoding="utf-8") as f:
            f.write(program)
        out_path, err_path = os.path.join(work, "stdout"), os.path.join(work, "stderr")
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": sandbox, "TMPDIR": sandbox,
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        argv = [sys.executable, "-I", "-c", _BOOTSTRAP, program_path, sandbox, str(memory_mb * 1024 * 1024),
                str(math.ceil(timeout) + 1), str(max_output_bytes + 4096)]
        t0 = time.monotonic()
        timed_out = too_many = False
        with open(out_path, "wb") as fout, open(err_path, "wb") as ferr:
            proc = subprocess.Popen(argv, cwd=sandbox, env=env, stdin=subprocess.DEVNULL, stdout=fout, stderr=ferr,
                                    start_new_session=True, close_fds=True)
        try:
            while not _exited(proc):
                if time.monotonic() - t0 > timeout:
                    timed_out = True
                    break
                count = group_processes(proc.pid)
                if count is not None and count > max_processes:
                    too_many = True
                    break
                time.sleep(0.01)
        finally:
            try:  # the leader is alive or a zombie here, so the group id is still ours
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
        stdout, stderr = _read_capped(out_path, max_output_bytes), _read_capped(err_path, max_output_bytes)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return _classify(proc.returncode, stdout, stderr, timed_out, too_many, timeout, memory_mb, max_processes)


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
