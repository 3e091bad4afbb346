"""
The in-process guard of nanochat.execution and the runner of the program, loaded by sandbox_child.py.

The guard is the SECOND layer: it turns common misbehaviour (deleting files, opening sockets, forking) into
clear Python errors, but code running in the same interpreter can get around it (a fresh `posix` module from
importlib has the original functions; os.open with dir_fd through one of those escapes the path check). The
OS layers in sandbox_child.py are the boundary.

- Dangerous functions are replaced by None on os/posix/shutil/signal (fail fast, with a clear message).
- An audit hook (sys.addaudithook; it cannot be removed) refuses process creation, signals, deletion,
  renames, permission changes, sockets, ctypes, raising rlimits, importing modules that create processes,
  sockets, foreign calls or sub-interpreters (which have no audit hooks), and writing files, creating
  directories or opening sqlite databases outside the sandbox directory.

Why the hook is written the way it is: a tester found the old hook through gc and switched it off by
changing its closure. This one has nothing to change. It has no closure cells (cell_contents is writable),
looks up no globals or builtins (the program can rebind builtins.isinstance or __main__'s globals), and its
only state is immutable (frozensets, str, builtin functions) bound as positional defaults (a tuple;
replacing its own __defaults__ or __code__ raises an audit event it refuses). Paths are copied to exact str before
any test (a str subclass could override startswith). It also refuses the events through which it could be
found or steered: gc.get_objects/get_referrers/get_referents, and sys.settrace/setprofile (a tracer may
rewrite a running frame's locals). tests/test_execution.py checks its bytecode for global and closure loads.

The runner executes the program in a fresh __main__ and always leaves through os._exit: the interpreter's
normal shutdown clears audit hooks before it tears down modules, so __del__ methods run at shutdown would
run unguarded.
"""

import atexit
import os
import sys
import traceback

DISABLED = ("system", "popen", "fork", "forkpty", "kill", "killpg", "setsid", "setpgid", "setpgrp", "setuid",
            "setgid", "setreuid", "setregid", "setresuid", "setresgid", "setgroups", "remove", "unlink", "rmdir",
            "removedirs", "rename", "renames", "replace", "truncate", "ftruncate", "chmod", "fchmod", "lchmod",
            "chown", "fchown", "lchown", "link", "symlink", "chroot", "mkfifo", "mknod", "pidfd_open", "setns",
            "unshare", "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe", "spawnv",
            "spawnve", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnvp", "spawnvpe", "posix_spawn",
            "posix_spawnp")
DENIED = frozenset({
    "os.system", "os.fork", "os.forkpty", "os.kill", "os.killpg", "os.remove", "os.rmdir", "os.rename",
    "os.truncate", "os.chmod", "os.chown", "os.chflags", "os.lchflags", "os.link", "os.symlink", "os.setxattr",
    "os.removexattr", "os.startfile", "os.unshare", "os.setns", "shutil.rmtree", "shutil.chown", "shutil.move",
    "pty.spawn", "subprocess.Popen", "resource.setrlimit", "resource.prlimit", "webbrowser.open", "sys.remote_exec",
    "signal.pthread_kill", "gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys.settrace",
    "sys.setprofile", "sys._current_frames", "sys._current_exceptions"})
DENIED_PREFIXES = ("socket.", "ctypes.", "os.exec", "os.spawn", "os.posix_spawn", "_posixsubprocess.")
BLOCKED_MODULES = frozenset({
    "subprocess", "_posixsubprocess", "multiprocessing", "_multiprocessing", "socket", "_socket", "ssl", "_ssl",
    "ctypes", "_ctypes", "pty", "asyncio", "_asyncio", "_testcapi", "_testinternalcapi", "_testmultiphase",
    "_xxsubinterpreters", "_xxinterpchannels", "_interpreters", "_interpchannels", "_interpqueues"})
FROZEN_ATTRS = frozenset({"__code__", "__defaults__", "__kwdefaults__"})
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


def _hook(event, args, denied, prefixes, blocked, frozen_attrs, root, write_flags, getcwd, join, decode, type_,
          int_, Refused, ImportRefused, TypeError_, self_):
    """The audit hook's code. Installed as a copy whose defaults bind every parameter after `args`;
    keep it free of globals, builtins and closures (see the module docstring)."""
    if event in denied or event.startswith(prefixes):
        raise Refused(f"{event} is blocked by the execution sandbox")
    if event == "import":
        name = join((args[0],))
        if name.partition(".")[0] in blocked:
            raise ImportRefused(f"import of {name} is blocked by the execution sandbox")
        return
    if event == "object.__setattr__":  # namedtuple & co. set __defaults__ legitimately: only this hook is frozen
        if args[0] is self_ and args[1] in frozen_attrs:
            raise Refused(f"setting {args[1]} is blocked by the execution sandbox")
        return
    if event == "open":
        if type_(args[0]) is int_ or not (args[2] or 0) & write_flags:
            return  # an already open descriptor, or reading
    elif event == "os.mkdir":
        if args[2] != -1:
            raise Refused("os.mkdir with dir_fd is blocked by the execution sandbox")
    elif event != "sqlite3.connect":
        return
    try:
        path = join((args[0],))  # an exact str copy: a subclass's methods must not run the checks below
    except TypeError_:
        path = decode(args[0], "utf-8", "surrogateescape")  # bytes; anything else raises: refused
    if event == "sqlite3.connect":
        if path == ":memory:" or path == "":
            return
        if path.startswith("file:"):
            raise Refused("sqlite3 URIs are blocked by the execution sandbox")
    if not path.startswith("/"):
        path = getcwd() + "/" + path
    parts = []
    for part in path.split("/"):  # lexical: the program cannot make symlinks (os.symlink is refused)
        if part == "..":
            if parts:
                parts.pop()
        elif part and part != ".":
            parts.append(part)
    path = "/" + "/".join(parts)
    if path != root and not path.startswith(root + "/") and path != "/dev/null":
        raise Refused(f"{event} of {path!r} outside the sandbox directory is blocked")


def make_hook(sandbox):
    """A copy of _hook with its state, itself included, bound as defaults and an empty globals dict."""
    # bound locally, not as module globals: the hook must look up no globals (see the module docstring)
    import posix
    import types
    state = (DENIED, DENIED_PREFIXES, BLOCKED_MODULES, FROZEN_ATTRS, os.path.realpath(sandbox), WRITE_FLAGS,
             posix.getcwd, "".join, bytes.decode, type, int, PermissionError, ImportError, TypeError)
    hook = types.FunctionType(_hook.__code__, {}, "sandbox_audit_hook", state + (None,))
    hook.__defaults__ = state + (hook,)  # not audited yet: the hook is installed after this
    return hook


def install_guard(sandbox):
    # imported only when the guard is installed, inside the child, right before the program runs
    import posix
    import shutil
    import signal
    for mod in (os, posix):
        for name in DISABLED:
            if hasattr(mod, name):
                setattr(mod, name, None)
    for name in ("pidfd_send_signal", "pthread_kill"):
        for mod in (signal, sys.modules.get("_signal")):
            if mod is not None and hasattr(mod, name):
                setattr(mod, name, None)
    for name in ("rmtree", "move", "chown"):
        setattr(shutil, name, None)

    def no_dir_fd(real):  # the "open" audit event does not carry dir_fd, so the path check would be fooled
        def wrapper(*args, dir_fd=None, **kwargs):
            if dir_fd is not None:
                raise PermissionError("dir_fd is blocked by the execution sandbox")
            return real(*args, **kwargs)
        return wrapper
    for mod in (os, posix):
        mod.open, mod.mkdir = no_dir_fd(posix.open), no_dir_fd(posix.mkdir)
    for name in list(sys.modules):
        if name.split(".")[0] in BLOCKED_MODULES:
            del sys.modules[name]
    sys.addaudithook(make_hook(sandbox))


def run_program(source, memory_exit):
    """Run `source` as __main__ of a fresh module; never returns."""
    # imported only when the program is about to run, inside the child
    import types
    main = types.ModuleType("__main__")
    sys.modules["__main__"] = main
    sys.argv = ["program.py"]
    _run(source, main.__dict__, memory_exit)


def _run(source, globals_, memory_exit, exit_=os._exit, exc_info=sys.exc_info,
         print_exception=traceback.print_exception, run_exitfuncs=atexit._run_exitfuncs, write_err=sys.stderr.write,
         flush_out=sys.stdout.flush, flush_err=sys.stderr.flush):
    # What runs after the program is bound here as defaults, and the cleanup uses bare `except:`: the program
    # may rebind os._exit, sys.stdout or builtins.BaseException, and must not keep this from reaching exit_.
    code = 1
    try:
        exec(compile(source, "program.py", "exec"), globals_)
        code = 0
    except SystemExit as e:
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code & 0xFF
        else:
            write_err(f"{e.code}\n")
    except MemoryError:
        code = memory_exit
        write_err("MemoryError: the program exceeded its memory limit\n")
    except BaseException:
        kind, value, tb = exc_info()
        print_exception(kind, value, tb.tb_next)  # skip this runner's own frame
    finally:
        for step in (run_exitfuncs, flush_out, flush_err):
            try:
                step()
            except:  # noqa: E722
                pass
        exit_(code)
