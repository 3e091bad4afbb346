"""
The child side of nanochat.execution: `python -I -B sandbox_child.py CONFIG_JSON`, started by execute_code.

It reads the program, builds the OS layers, lowers the limits, installs the in-process guard and runs the
program; see nanochat/execution.py for the whole picture. Every OS layer is reported to the parent on the
pipe `report_fd` ("ok NAME" or "refused NAME WHY"), so a layer the kernel refuses is never missing silently.
The order matters: namespaces and mounts need root (or a user namespace) and must come before the uid drop;
the seccomp filter needs no-new-privs; the guard comes last so that this setup code is not subject to it.
"""

# Every module is imported here, before isolation: the waiter outside the pid namespace runs after the
# mounts change, when the stdlib may no longer be importable (a lazy `import signal` failed once in CI).
import json
import os
import resource
import signal
import sys

# <linux/sched.h>, <sys/mount.h>, <linux/prctl.h>, <linux/seccomp.h>, <linux/filter.h>, <linux/audit.h>
CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x20000, 0x8000000, 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_NOSYMFOLLOW = 1, 2, 4, 8, 32, 256
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE = 1024, 2048, 4096, 16384, 1 << 18
MS_RELATIME, MS_STRICTATIME = 1 << 21, 1 << 24
MOUNT_OPTION_FLAGS = {"ro": MS_RDONLY, "nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC,
                      "noatime": MS_NOATIME, "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME,
                      "strictatime": MS_STRICTATIME, "nosymfollow": MS_NOSYMFOLLOW}
PR_SET_PDEATHSIG, PR_SET_SECCOMP, PR_SET_NO_NEW_PRIVS, SECCOMP_MODE_FILTER = 1, 22, 38, 2
# device nodes the program may still open; every other mount gets nodev (no raw disks, terminals, ...)
KEEP_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
# syscalls refused by seccomp (EPERM): sockets of any family (AF_UNIX reaches host daemons even without a
# network), io_uring (can open sockets/files behind seccomp's back), namespace/mount changes, tracing other
# processes and kernel attack surface nobody's generated code needs. Numbers: x86_64 table, then the generic
# table that aarch64 uses.
SECCOMP_DENY = {
    "x86_64": (0xC000003E, dict(socket=41, ptrace=101, process_vm_readv=310, process_vm_writev=311, pidfd_getfd=438,
               mount=165, umount2=166, pivot_root=155, chroot=161, open_tree=428, move_mount=429, fsopen=430,
               fsconfig=431, fsmount=432, fspick=433, mount_setattr=442, unshare=272, setns=308, bpf=321,
               perf_event_open=298, userfaultfd=323, keyctl=250, add_key=248, request_key=249, io_uring_setup=425,
               io_uring_enter=426, io_uring_register=427, open_by_handle_at=304, kexec_load=246,
               kexec_file_load=320, init_module=175, finit_module=313, delete_module=176, reboot=169,
               swapon=167, swapoff=168)),
    "aarch64": (0xC00000B7, dict(socket=198, ptrace=117, process_vm_readv=270, process_vm_writev=271, pidfd_getfd=438,
                mount=40, umount2=39, pivot_root=41, chroot=51, open_tree=428, move_mount=429, fsopen=430,
                fsconfig=431, fsmount=432, fspick=433, mount_setattr=442, unshare=97, setns=268, bpf=280,
                perf_event_open=241, userfaultfd=282, keyctl=219, add_key=217, request_key=218, io_uring_setup=425,
                io_uring_enter=426, io_uring_register=427, open_by_handle_at=265, kexec_load=104,
                kexec_file_load=294, init_module=105, finit_module=273, delete_module=106, reboot=142,
                swapon=224, swapoff=225)),
}


class Report:
    """One line per layer on the pipe to the parent; closed before the program runs, so it cannot forge lines."""

    def __init__(self, fd):
        self.fd = fd

    def send(self, *words):
        if self.fd is not None:
            os.write(self.fd, (" ".join(str(w) for w in words).replace("\n", " ") + "\n").encode())

    def ok(self, name):
        self.send("ok", name)

    def refused(self, name, why):
        self.send("refused", name, why)

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class Libc:
    """The few libc calls Python 3.11's os module lacks (unshare, mount, prctl, capset), raising OSError."""

    def __init__(self):
        # ctypes only where these kernel calls are made (Linux); the child otherwise never loads it
        import ctypes
        self.ct = ctypes
        self.lib = ctypes.CDLL(None, use_errno=True)

    def call(self, name, *args):
        if getattr(self.lib, name)(*args) != 0:
            err = self.ct.get_errno()
            raise OSError(err, f"{name}: {os.strerror(err)}")

    def mount(self, source, target, fstype, flags, data=None):
        enc = lambda s: None if s is None else os.fsencode(s)  # noqa: E731
        self.call("mount", enc(source), enc(target), enc(fstype), self.ct.c_ulong(flags), enc(data))

    def prctl(self, option, arg):
        self.call("prctl", option, self.ct.c_ulong(arg), self.ct.c_ulong(0), self.ct.c_ulong(0), self.ct.c_ulong(0))

    def drop_capabilities(self):
        """capset(2) with empty effective/permitted/inheritable sets (version 3 ABI: two 32-bit words)."""
        header = (self.ct.c_uint32 * 2)(0x20080522, 0)
        data = (self.ct.c_uint32 * 6)()
        self.call("capset", header, data)

    def seccomp(self, arch_id, numbers, errno_=1):
        """Install a filter: wrong architecture -> EPERM, x32 calls -> EPERM, `numbers` -> EPERM, rest allowed."""
        ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06
        allow, deny = 0x7FFF0000, 0x00050000 | errno_
        prog = [(ld, 0, 0, 4), (jeq, 1, 0, arch_id), (ret, 0, 0, deny), (ld, 0, 0, 0)]
        checks = [(jge, 0x40000000)] + [(jeq, n) for n in sorted(set(numbers))]
        n_checks = len(checks)
        for i, (op, k) in enumerate(checks):  # jump to the deny below the final allow on a match
            prog.append((op, n_checks - i, 0, k))
        prog += [(ret, 0, 0, allow), (ret, 0, 0, deny)]

        class Filter(self.ct.Structure):
            _fields_ = [("code", self.ct.c_uint16), ("jt", self.ct.c_uint8), ("jf", self.ct.c_uint8),
                        ("k", self.ct.c_uint32)]

        class Prog(self.ct.Structure):
            _fields_ = [("len", self.ct.c_ushort), ("filter", self.ct.POINTER(Filter))]

        filters = (Filter * len(prog))(*[Filter(*ins) for ins in prog])
        fprog = Prog(len(prog), filters)
        self.call("prctl", PR_SET_SECCOMP, self.ct.c_ulong(SECCOMP_MODE_FILTER), self.ct.byref(fprog),
                  self.ct.c_ulong(0), self.ct.c_ulong(0))


def _unescape(field):
    """Mount points in /proc/self/mountinfo escape space, tab, newline and backslash as octal."""
    # the child imports as little as it can before the sandbox is set up
    import re
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _may(st, uid, gid, bit):
    """Whether uid/gid (no supplementary groups) has permission `bit` (4 read, 1 search) on a stat result."""
    shift = 6 if st.st_uid == uid else 3 if st.st_gid == gid else 0
    return bool((st.st_mode >> shift) & bit)


def _blocker(path, uid, gid):
    """(directory, next component) where uid first cannot pass on the way to listing `path`, else None."""
    parts = [p for p in path.split("/") if p]
    for i in range(len(parts) + 1):
        here = "/" + "/".join(parts[:i])
        st = os.stat(here)
        if i == len(parts):
            return None if _may(st, uid, gid, 4) and _may(st, uid, gid, 1) else (here, None)
        if not _may(st, uid, gid, 1):
            return here, parts[i]
    return None


def expose_interpreter(libc, paths, uid, gid):
    """Make the interpreter's own files (sys.path) reachable for uid inside our mount namespace: a directory
    on the way that uid may not search (e.g. /root, mode 0700, holding a pyenv Python) is covered with an
    empty tmpfs holding only binds of the entries needed. Hides the rest of that directory too.
    Returns the paths that stay unreachable."""
    for _ in range(8):  # one level of blocking directories per round
        blocked = {}
        for path in paths:
            b = _blocker(path, uid, gid)
            if b is not None:
                blocked.setdefault(b[0], set()).add(b[1])
        fixable = {d: kids for d, kids in blocked.items() if None not in kids}
        if not fixable:
            return [p for p in paths if _blocker(p, uid, gid) is not None]
        top = min(fixable, key=lambda d: d.count("/"))
        kids = sorted(fixable[top])
        fds = [os.open(os.path.join(top, k), os.O_PATH) for k in kids]  # the originals, before covering them
        try:
            libc.mount("tmpfs", top, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=64k")
            for kid, fd in zip(kids, fds):
                target = os.path.join(top, kid)
                if os.path.isdir(f"/proc/self/fd/{fd}"):
                    os.mkdir(target)
                else:
                    open(target, "wb").close()
                libc.mount(f"/proc/self/fd/{fd}", target, None, MS_BIND | MS_REC)
        finally:
            for fd in fds:
                os.close(fd)
    return [p for p in paths if _blocker(p, uid, gid) is not None]


def remount_readonly(libc, sandbox):
    """Every mount read-only and nodev in this namespace, except the sandbox (writable, nodev) and the
    KEEP_DEVICES binds. Flags already set on a mount are kept (a user namespace may not clear them).
    Returns 'mount point: error' for each mount that stayed writable."""
    with open("/proc/self/mountinfo") as f:
        mounts = [(_unescape(line.split()[4]), line.split()[5].split(",")) for line in f]
    failures, done = [], set()
    for point, options in reversed(mounts):  # newest first: a path names its topmost mount
        if point in done:
            continue
        done.add(point)
        flags = MS_REMOUNT | MS_BIND
        for option in options:
            flags |= MOUNT_OPTION_FLAGS.get(option, 0)
        if point != sandbox:
            flags |= MS_RDONLY
        if point not in KEEP_DEVICES:
            flags |= MS_NODEV
        try:
            libc.mount(None, point, None, flags)
        except OSError as e:
            if not os.path.exists(point):
                continue  # hidden under another mount (e.g. by expose_interpreter): unreachable anyway
            if "ro" not in options and point != sandbox:  # the sandbox only missed nodev
                failures.append(f"{point}: {e.strerror}")
    return failures


def _wait_and_exit(pid):
    """The process outside the pid namespace: wait for the program (pid 1 inside) and leave the same way."""
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            signal.signal(sig, signal.SIG_DFL)
        except (OSError, ValueError):
            pass  # SIGKILL/SIGSTOP cannot be caught anyway
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)
    os._exit(os.waitstatus_to_exitcode(status))


def load_libc(cfg, report):
    """libc through ctypes (Linux only), and PR_SET_PDEATHSIG right away: if execute_code's process dies,
    this one is killed instead of running on."""
    if not sys.platform.startswith("linux"):
        report.refused("namespaces", f"not Linux ({sys.platform})")
        return None
    try:
        libc = Libc()
        libc.prctl(PR_SET_PDEATHSIG, 9)
    except (OSError, ImportError) as e:
        report.refused("namespaces", f"no libc via ctypes: {e}")
        return None
    if os.getppid() != cfg["parent"]:  # it died before the prctl
        os._exit(1)
    return libc


def isolate(cfg, report, libc):
    """Namespaces, mounts and the uid drop. Returns in the process that is to run the program; with a pid
    namespace that is a forked child (pid 1 inside), and the calling process only waits for it."""
    root, have = os.geteuid() == 0, set()
    if libc is not None and not root:  # an unprivileged user namespace gives the capabilities the others need
        uid, gid = os.getuid(), os.getgid()
        try:
            libc.call("unshare", CLONE_NEWUSER)
            for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
            have.add("userns")
            report.ok("userns")
        except OSError as e:
            report.refused("userns", f"{e.strerror} (not root, and no user namespace for the others)")
    for name, flag in (("mountns", CLONE_NEWNS), ("netns", CLONE_NEWNET), ("ipcns", CLONE_NEWIPC),
                       ("pidns", CLONE_NEWPID)):
        if libc is None or not (root or "userns" in have):
            report.refused(name, "needs Linux, and root or a user namespace")
            continue
        try:
            libc.call("unshare", flag)
            have.add(name)
            report.ok(name)
        except OSError as e:
            report.refused(name, e.strerror)
    if "pidns" in have:
        report.send("waiter")  # before the fork: from now on the parent allows for this extra process
        pid = os.fork()
        if pid:
            report.send("inner", pid)
            report.close()
            _wait_and_exit(pid)
        libc.prctl(PR_SET_PDEATHSIG, 9)  # the waiter killed -> pid 1 killed -> the whole namespace killed
    drop = root and cfg["uid"] != 0
    if "mountns" in have:
        sandbox = cfg["sandbox"]
        try:
            libc.mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount propagates to the host
            libc.mount(sandbox, sandbox, None, MS_BIND)  # the one writable place
            os.chdir(sandbox)  # the cwd named the directory under the bind, on a mount about to turn read-only
            for dev in KEEP_DEVICES:
                if os.path.exists(dev):
                    libc.mount(dev, dev, None, MS_BIND)
            if drop:
                unreachable = expose_interpreter(libc, [p for p in sys.path if os.path.isdir(p)], cfg["uid"], cfg["uid"])
                if unreachable:
                    report.refused("uid", f"{unreachable[0]} would not be readable by uid {cfg['uid']}")
                    drop = False
            if "pidns" in have:
                try:  # a /proc of our own pid namespace: outside processes are not even visible
                    libc.mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
                    report.ok("proc")
                except OSError as e:
                    report.refused("proc", e.strerror)
            failures = remount_readonly(libc, sandbox)
            if failures:
                report.refused("readonly-fs", "; ".join(failures[:4]))
            else:
                report.ok("readonly-fs")
        except OSError as e:
            report.refused("readonly-fs", e.strerror)
    else:
        report.refused("readonly-fs", "needs a mount namespace")
    if drop:  # whatever the mounts managed: the interpreter must stay usable after the drop
        unreachable = [p for p in sys.path if os.path.isdir(p) and _blocker(p, cfg["uid"], cfg["uid"]) is not None]
        if unreachable:
            report.refused("uid", f"{unreachable[0]} would not be readable by uid {cfg['uid']}")
            drop = False
    return have, drop


def lower_limits(cfg):
    """rlimits for the program: CPU, memory, file size, open files, processes (and threads), no core dumps."""
    mem, cpu = cfg["memory_bytes"], cfg["cpu_seconds"]
    limits = [("RLIMIT_CPU", cpu, cpu + 1), ("RLIMIT_FSIZE", cfg["fsize"], cfg["fsize"]), ("RLIMIT_NPROC", 1, 1),
              ("RLIMIT_CORE", 0, 0), ("RLIMIT_NOFILE", 256, 256)]
    if sys.platform != "darwin":  # macOS refuses to lower the address-space limit
        limits += [("RLIMIT_AS", mem, mem), ("RLIMIT_DATA", mem, mem)]
    for name, soft, hard in limits:
        if hasattr(resource, name):
            resource.setrlimit(getattr(resource, name), (soft, hard))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past RLIMIT_FSIZE fail with OSError instead


def drop_privileges(cfg, report, libc, have, drop):
    """uid/gid drop (root) or capability drop (user namespace, or root that could not drop), then
    no-new-privs and the seccomp filter. RLIMIT_NPROC is set before: the kernel enforces it for non-root."""
    if drop:
        uid = cfg["uid"]
        try:
            os.chown(cfg["sandbox"], uid, uid)
            os.setgroups([])
            if hasattr(os, "setresuid"):
                os.setresgid(uid, uid, uid)
                os.setresuid(uid, uid, uid)  # from root to non-root: the kernel clears every capability too
            else:  # macOS
                os.setgid(uid)
                os.setuid(uid)
            report.ok(f"uid={uid}")
        except OSError as e:
            report.refused("uid", f"setting uid/gid {uid}: {e.strerror} (not mapped in this user namespace?)")
    elif os.getuid() != 0:
        report.ok(f"uid={os.getuid()}")  # not root to begin with: RLIMIT_NPROC applies as it is
    if libc is None:
        for name in ("no-capabilities", "no-new-privs", "seccomp"):
            report.refused(name, "needs Linux and libc through ctypes")
        return
    libc.prctl(PR_SET_PDEATHSIG, 9)  # a uid change clears it: set again (parent: the waiter, or execute_code)
    for name, action in (("no-capabilities", libc.drop_capabilities),
                         ("no-new-privs", lambda: libc.prctl(PR_SET_NO_NEW_PRIVS, 1))):
        try:
            action()
            report.ok(name)
        except OSError as e:
            report.refused(name, e.strerror)
    arch = os.uname().machine
    if arch not in SECCOMP_DENY:
        report.refused("seccomp", f"no syscall table for {arch}")
        return
    arch_id, table = SECCOMP_DENY[arch]
    try:
        libc.seccomp(arch_id, table.values())
        report.ok("seccomp")
    except OSError as e:
        report.refused("seccomp", e.strerror)


def _load_guard():
    """nanochat/sandbox_guard.py, loaded by path (`python -I` puts no project directory on sys.path), now,
    while the files are still readable."""
    # the child imports as little as it can before the sandbox is set up
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_guard.py")
    spec = importlib.util.spec_from_file_location("sandbox_guard", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    cfg = json.loads(sys.argv[1])
    report = Report(cfg["report_fd"])
    with open(cfg["program"], encoding="utf-8") as f:
        source = f.read()
    guard = _load_guard()
    libc = load_libc(cfg, report) if cfg["isolate"] else None
    have, drop = isolate(cfg, report, libc) if cfg["isolate"] else (set(), False)
    if not cfg["isolate"]:
        report.refused("os-layers", "turned off by the caller (isolate=False)")
    lower_limits(cfg)
    if cfg["isolate"]:
        drop_privileges(cfg, report, libc, have, drop)
    report.close()
    del libc  # the guard blocks ctypes from here on; no reason to keep a handle around
    if cfg["guard"]:
        guard.install_guard(cfg["sandbox"])
    guard.run_program(source, cfg["memory_exit"])


if __name__ == "__main__":
    main()
