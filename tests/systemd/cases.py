"""guardian under systemd and supervisord, beside the production guide's own services: the cases
of `cargo xtask integration-test systemd`, run in the Debian guest by guardian-cases.service.

Prints `guardian-vm: ...` markers and one `CASE NAME PASS|FAIL (SECONDS s) DETAIL` line per case
on the serial console, then powers the guest off. The cases run in order and share the guest:
the policy in force, the units' kill modes and the processes one case leaves are the next one's
starting point (the order is the plan at the bottom).
"""

import collections
import ctypes
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback

MARK = "guardian-vm:"
HERE = "/usr/local/lib/guardian-it"
USER = "abcdeveloper"
APP = f"/home/{USER}/projects/analyticbot"
POLICY = "/etc/guardian/policy.toml"
UNITS = ["analyticbot-api", "analyticbot-bot", "analyticbot-mtproto"]
# What each service runs beside its main process: uvicorn's 4 workers (spawned) and the
# resource tracker multiprocessing starts for them; the bot's pool of 3; the collector's 3.
WORKERS = {"analyticbot-api": 5, "analyticbot-bot": 3, "analyticbot-mtproto": 3}
# "At once": guardian acts within a millisecond; the rest is room for an emulated CPU.
GONE_WITHIN_S = 2.0
# How long the restarted service's new workers must then stay alive.
SURVIVE_S = 3.0
# `--kill-who`, as systemd 252 documents it (newer ones call it --kill-whom, and keep this name).
KILL_MAIN = ["systemctl", "kill", "--signal=KILL", "--kill-who=main"]
# A service (re)started under emulation: Python and uvicorn's imports take seconds.
START_WITHIN_S = 60.0
WATCHDOG_S = 5
# A service with `cgroup = "own"`, which the changed policy adds (the shipped one has none).
OWN_SERVICE = "guardian-it-own"
OWN_POLICY = f"""
[[service]]
name = "{OWN_SERVICE}"
match = {{ cmdline = "{OWN_SERVICE}", user = "{USER}" }}
orphans = "kill"
tasks_max = 16
cgroup = "own"
"""


class Fail(Exception):
    """A case's verdict, with what was wrong."""


def out(line):
    print(line, flush=True)


def sh(*args, check=True, **kwargs):
    r = subprocess.run(args, capture_output=True, text=True, **kwargs)
    if check and r.returncode != 0:
        raise Fail(f"`{' '.join(args)}` failed ({r.returncode}): {(r.stderr or r.stdout).strip()}")
    return r.stdout


def as_user(*args):
    return sh(*args, user=USER, group=USER, extra_groups=[], cwd=APP)


def wait(probe, timeout, what, every=0.05, start=None):
    """Polls `probe` until it returns something true; returns it and the seconds it took since
    `start` (default: now)."""
    start = time.monotonic() if start is None else start
    while True:
        value = probe()
        if value:
            return value, time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise Fail(f"{what}: not within {timeout:g} s")
        time.sleep(every)


# Processes, named by (pid, start time) so that a reused pid is another process.


def stat(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    # After the name: state, ppid, ... start time is the 20th field from there.
    return data[data.rindex(")") + 2 :].split()


def proc(pid):
    s = stat(pid)
    return (pid, int(s[19])) if s else None


def alive(p):
    s = stat(p[0])
    return s is not None and int(s[19]) == p[1] and s[0] not in "ZX"


def cmdline(p):
    try:
        with open(f"/proc/{p[0]}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def describe(procs):
    return "; ".join(f"{p[0]} {cmdline(p)[:70]}" for p in procs)


def descendants(pid):
    children = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            s = stat(int(entry))
            if s:
                children[int(s[1])].append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return [p for p in map(proc, found) if p and alive(p)]


def all_gone(procs, timeout, what, start):
    def gone():
        return not any(alive(p) for p in procs)

    try:
        return wait(gone, timeout, what, start=start)[1]
    except Fail as e:
        raise Fail(f"{e}; still alive: {describe([p for p in procs if alive(p)])}") from None


def still_alive(procs, seconds, what):
    time.sleep(seconds)
    dead = [p for p in procs if not alive(p)]
    if dead:
        raise Fail(f"{what}: {len(dead)} of {len(procs)} died: {[p[0] for p in dead]}")


# systemd and supervisord.


def main_pid(unit):
    return int(sh("systemctl", "show", "--property=MainPID", "--value", unit).strip() or 0)


def drop_in(unit, name, text):
    path = f"/etc/systemd/system/{unit}.service.d"
    os.makedirs(path, exist_ok=True)
    with open(f"{path}/{name}.conf", "w") as f:
        f.write(text)
    sh("systemctl", "daemon-reload")


def unit_log_tail(unit, n):
    """The unit's last journal lines that are not JSON (systemd's own messages, mostly)."""
    text = sh("journalctl", f"--unit={unit}", "--output=cat", "--no-pager", check=False)
    return " | ".join([line for line in text.splitlines() if not line.startswith("{")][-n:])


def supervised_pid(program):
    return int(sh("supervisorctl", "pid", f"analyticbot:{program}", check=False).strip() or 0)


# guardian: its status over the control socket and its records in the journal.


def guardian_service(name):
    r = subprocess.run(["guardian", "status", "--output", "json"], capture_output=True, text=True)
    if r.returncode != 0:
        return None
    return next((s for s in json.loads(r.stdout)["services"] if s["name"] == name), None)


def journal():
    """guardian's JSON lines in the journal: records (stdout) and diagnostics (stderr)."""
    text = sh("journalctl", "--unit=guardian", "--output=cat", "--no-pager")
    lines = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                lines.append(json.loads(line))
            except ValueError:
                pass
    return lines


def records_since(mark, want, timeout, what):
    """Waits for journal lines after the first `mark` for which `want` holds."""
    found, _ = wait(lambda: [r for r in journal()[mark:] if want(r)], timeout, what, every=0.25)
    return found


def troubles(lines):
    """Errors guardian logged or met: ERROR diagnostics, decisions that failed."""
    return [
        r
        for r in lines
        if r.get("level") == "ERROR"
        or (r.get("event") == "decision" and str(r.get("result", "")).startswith("error"))
    ]


def settled(name, find_main, after=None):
    """Waits until the service runs a main process other than `after` with its workers, all of
    them followed by guardian; returns (main, workers)."""
    seen = "nothing"

    def ready():
        nonlocal seen
        pid = find_main()
        main = proc(pid) if pid else None
        if main is None or main == after:
            seen = f"main process {pid or 'none'}"
            return None
        workers = descendants(main[0])
        svc = guardian_service(name)
        seen = f"main {main[0]} with {len(workers)} workers ({describe(workers)}); guardian: {svc}"
        if len(workers) != WORKERS[name] or svc is None:
            return None
        if svc["roots"] != 1 or svc["members"] != 1 + len(workers):
            return None
        return main, workers

    what = f"{name} running its {WORKERS[name]} workers, all followed by guardian"
    try:
        return wait(ready, START_WITHIN_S, what, every=0.25)[0]
    except Fail as e:
        raise Fail(f"{e}; last seen: {seen}") from None


def kill_main(main, workers, command=None):
    """SIGKILLs the main process, through `command` if given; returns the seconds from its death
    until its old workers were gone. The death is watched while the command runs: its own
    latency (systemctl's round trip) is not counted."""
    if command:
        running = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    else:
        os.kill(main[0], signal.SIGKILL)
    wait(lambda: not alive(main), 10, f"main process {main[0]} dead", every=0.02)
    died = time.monotonic()
    if command and running.wait() != 0:
        raise Fail(f"`{' '.join(command)}` failed: {running.stderr.read().strip()}")
    return all_gone(workers, GONE_WITHIN_S, f"the {len(workers)} old workers gone", died)


# The cases.

STATE = {}


def install():
    sh("useradd", "--user-group", "--shell", "/bin/bash", USER)
    sh("chown", "-R", f"{USER}:{USER}", f"/home/{USER}")
    # The project's virtualenv, as the units expect it, with Debian's uvicorn and the console
    # script pip would write (spawned workers import it again: hence the __main__ guard).
    as_user("python3", "-m", "venv", "--without-pip", "--system-site-packages", f"{APP}/.venv")
    script = f"{APP}/.venv/bin/uvicorn"
    with open(script, "w") as f:
        f.write(
            f"#!{APP}/.venv/bin/python3\nimport sys\nfrom uvicorn.main import main\n"
            'if __name__ == "__main__":\n    sys.exit(main())\n'
        )
    os.chmod(script, 0o755)
    shutil.chown(script, USER, USER)
    os.makedirs("/var/log/analyticbot", exist_ok=True)
    shutil.chown("/var/log/analyticbot", USER, USER)

    sh("dpkg", "-i", f"{HERE}/guardian.deb")
    write_policy(shipped_policy())
    sh("systemctl", "enable", "--now", "guardian")
    for unit in UNITS:
        drop_in(unit, "killmode", "[Service]\nKillMode=process\n")
    sh("systemctl", "start", *UNITS)
    for unit in UNITS:
        settled(unit, lambda u=unit: main_pid(u))
    version = sh("dpkg-query", "--showformat=${Version}", "--show", "guardian")
    return (
        f"guardian {version} from its package, enabled in enforce mode with the shipped policy "
        f"(pid {main_pid('guardian')}); the 3 units run as {USER} with KillMode=process"
    )


def shipped_policy():
    with open(f"{HERE}/analyticbot.toml") as f:
        text = f.read()
    enforce, n = re.subn(r'(?m)^mode = "\w+"', 'mode = "enforce"', text)
    if n != 1:
        raise Fail("the shipped policy has no top-level `mode = ...` line to switch")
    return enforce


def write_policy(text):
    with open(POLICY, "w") as f:
        f.write(text)
    os.chmod(POLICY, 0o644)


def leaking_unit(unit):
    """KillMode=process: systemd restarts the main process and leaves its workers."""
    main, workers = settled(unit, lambda: main_pid(unit))
    took = kill_main(main, workers, KILL_MAIN + [unit])
    new_main, new_workers = settled(unit, lambda: main_pid(unit), after=main)
    still_alive(new_workers, SURVIVE_S, "the restarted service's new workers")
    STATE.setdefault("leaked", {})[unit] = (main, workers)
    return (
        f"old workers {[p[0] for p in workers]} gone {took:.2f} s after the main's death; "
        f"new main {new_main[0]}'s workers {[p[0] for p in new_workers]} alive "
        f"{SURVIVE_S:g} s later"
    )


def no_fight(unit):
    """KillMode=mixed: systemd kills the rest itself. guardian must neither fail nor act twice."""
    drop_in(unit, "killmode", "[Service]\nKillMode=mixed\n")
    sh("systemctl", "restart", unit)
    main, workers = settled(unit, lambda: main_pid(unit))
    mark = len(journal())
    took = kill_main(main, workers, KILL_MAIN + [unit])
    new_main, new_workers = settled(unit, lambda: main_pid(unit), after=main)
    still_alive(new_workers, SURVIVE_S, "the restarted service's new workers")
    lines = journal()[mark:]
    bad = troubles(lines)
    if bad:
        raise Fail(f"guardian reported errors: {bad}")
    pids = {p[0] for p in workers} | {p[0] for p in new_workers}
    decisions = collections.Counter(
        r["pid"] for r in lines if r.get("event") == "decision" and r.get("pid") in pids
    )
    twice = {pid: n for pid, n in decisions.items() if n > 1}
    if twice:
        raise Fail(f"workers decided on more than once: {twice}")
    hit_new = [p[0] for p in new_workers if p[0] in decisions]
    if hit_new:
        raise Fail(f"decisions on the new workers {hit_new}")
    results = collections.Counter(
        r["result"] for r in lines if r.get("event") == "decision" and r.get("pid") in pids
    )
    return (
        f"old workers gone {took:.2f} s after the main's death; guardian decided on "
        f"{sum(decisions.values())} of {len(workers)} once each ({dict(results)}), no error; "
        f"new workers alive {SURVIVE_S:g} s later"
    )


def supervised(program):
    """supervisord's autorestart: its stopasgroup/killasgroup act on stop only."""
    if not STATE.get("supervisord"):
        # The systemd units would compete for the port and the policy's services.
        sh("systemctl", "stop", *UNITS)
        shutil.copy(f"{HERE}/supervisor/analyticbot.conf", "/etc/supervisor/conf.d/")
        sh("supervisorctl", "reread")
        sh("supervisorctl", "update")
        STATE["supervisord"] = True
    main, workers = settled(program, lambda: supervised_pid(program))
    took = kill_main(main, workers)
    new_main, new_workers = settled(program, lambda: supervised_pid(program), after=main)
    still_alive(new_workers, SURVIVE_S, "the restarted program's new workers")
    return (
        f"old workers {[p[0] for p in workers]} gone {took:.2f} s after the main's death "
        f"(kill -9); "
        f"supervisord's new {new_main[0]} keeps {[p[0] for p in new_workers]} "
        f"{SURVIVE_S:g} s later"
    )


def reload(text, valid=True):
    """Writes the policy and runs `systemctl reload guardian` (the unit's `guardian reload`,
    which waits for the outcome: it fails when the policy is refused); returns the `reload`
    record of that request."""
    mark = len(journal())
    write_policy(text)
    try:
        sh("systemctl", "reload", "guardian")
        refused = None
    except Fail as e:
        refused = e
    if valid and refused:
        raise Fail(f"{refused}; systemd: {unit_log_tail('guardian', 4)}") from None
    if not valid and not refused:
        raise Fail("`systemctl reload` succeeded with an invalid policy")
    # guardian also watches the file and may reload once for the write (trigger "file").
    found = records_since(
        mark,
        lambda r: r.get("event") == "reload" and r.get("trigger") == "request",
        10,
        "a `reload` record of the request in the journal",
    )
    return found[-1]


def services_in_force():
    r = sh("guardian", "status", "--output", "json")
    return [s["name"] for s in json.loads(r)["services"]]


def reload_changed():
    record = reload(shipped_policy() + OWN_POLICY)
    if record.get("result") != "ok":
        raise Fail(f"the reload failed: {record}")
    names = services_in_force()
    if OWN_SERVICE not in names:
        raise Fail(f"`{OWN_SERVICE}` not in force after the reload: {names}")
    return f"{json.dumps(record)}; services in force: {names}"


def reload_invalid():
    before = services_in_force()
    broken = (shipped_policy() + OWN_POLICY).replace('orphans = "kill"', 'orphans = "kil"', 1)
    record = reload(broken, valid=False)
    if record.get("result") != "error":
        raise Fail(f"the invalid policy was not refused: {record}")
    after = services_in_force()
    if after != before:
        raise Fail(f"the services in force changed from {before} to {after}")
    return f"{json.dumps(record)}; services in force unchanged: {after}"


def reload_old_policy_enforced():
    """After the refused reload, the policy in force still kills orphans."""
    unit = "analyticbot-mtproto"
    try:
        detail = leaking_unit(unit)
    finally:
        record = reload(shipped_policy() + OWN_POLICY)
        if record.get("result") != "ok":
            raise Fail(f"restoring the valid policy failed: {record}")
    return f"{unit}: {detail}; valid policy restored"


def journal_decisions():
    """The decisions the kill cases caused, as guardian's JSON records in the journal."""
    leaked = STATE.get("leaked")
    if not leaked:
        raise Fail("no KillMode=process case recorded its old workers")
    records = [r for r in journal() if "event" in r]
    checked = 0
    for unit, (main, workers) in leaked.items():
        for pid, _ in workers:
            mine = [
                r
                for r in records
                if r["event"] == "decision" and r.get("pid") == pid and r.get("service") == unit
            ]
            if not mine:
                raise Fail(f"no decision record for {unit}'s old worker {pid}")
            first = mine[0]
            if (first.get("reason"), first.get("old_parent"), first.get("performed")) != (
                "orphan",
                main[0],
                True,
            ):
                raise Fail(f"unexpected decision for {unit}'s old worker {pid}: {first}")
            checked += 1
    kinds = collections.Counter(r["event"] for r in records)
    return (
        f"{checked} old workers each with an orphan decision naming its dead main; "
        f"records: {dict(kinds)}"
    )


def watchdog():
    drop_in("guardian", "watchdog", f"[Service]\nWatchdogSec={WATCHDOG_S}s\n")
    try:
        sh("systemctl", "restart", "guardian")
        frozen = main_pid("guardian")
        os.kill(frozen, signal.SIGSTOP)

        def restarted():
            pid = main_pid("guardian")
            active = sh("systemctl", "is-active", "guardian", check=False).strip() == "active"
            return pid if pid not in (0, frozen) and active else None

        what = "a new guardian after the watchdog"
        new, took = wait(restarted, WATCHDOG_S + 30, what, every=0.25)
    finally:
        os.remove("/etc/systemd/system/guardian.service.d/watchdog.conf")
        sh("systemctl", "daemon-reload")
    text = sh("journalctl", "--unit=guardian", "--output=cat", "--no-pager")
    said = [line for line in text.splitlines() if "atchdog" in line]
    if not said:
        raise Fail(f"guardian {frozen} replaced by {new}, but systemd logged no watchdog timeout")
    return (
        f"guardian {frozen} frozen; systemd's watchdog ({WATCHDOG_S} s) replaced it with {new} "
        f"after {took:.1f} s: {said[-1]}"
    )


# The kernel's BPF objects by id, without bpftool: bpf(BPF_*_GET_FD_BY_ID) fails with ENOENT
# once an object is freed.
SYS_BPF = 321
BPF_PROG_GET_FD_BY_ID = 13
BPF_MAP_GET_FD_BY_ID = 14
libc = ctypes.CDLL(None, use_errno=True)


def bpf_exists(command, object_id):
    # union bpf_attr for these commands: the id, then next_id and open_flags (zero).
    attr = ctypes.create_string_buffer(object_id.to_bytes(4, "little"), 16)
    fd = libc.syscall(
        ctypes.c_long(SYS_BPF), ctypes.c_long(command), attr, ctypes.c_long(ctypes.sizeof(attr))
    )
    if fd >= 0:
        os.close(fd)
        return True
    err = ctypes.get_errno()
    if err == 2:
        return False
    raise Fail(f"bpf(GET_FD_BY_ID, {object_id}): {os.strerror(err)}")


def bpf_ids(pid):
    """The BPF programs and maps a process holds, from its descriptors' fdinfo."""
    progs, maps = set(), set()
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                for line in f:
                    key, _, value = line.partition(":")
                    if key == "prog_id":
                        progs.add(int(value))
                    elif key == "map_id":
                        maps.add(int(value))
        except OSError:
            pass
    return progs, maps


def guardian_processes():
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/exe") == "/usr/sbin/guardian":
                    found.append(int(entry))
            except OSError:
                pass
    return found


def stop():
    """Stopped, guardian leaves nothing: no process, no BPF program or map, no cgroup."""
    problems = []
    pid = main_pid("guardian")
    progs, maps = bpf_ids(pid)
    if not progs or not all(bpf_exists(BPF_PROG_GET_FD_BY_ID, i) for i in progs):
        raise Fail(f"guardian {pid} holds no BPF program the kernel knows (fdinfo: {progs})")
    own = f"/sys/fs/cgroup/guardian/{OWN_SERVICE}"
    probe = subprocess.Popen(
        ["python3", "-c", "import time; time.sleep(600)", OWN_SERVICE],
        user=USER,
        group=USER,
        extra_groups=[],
    )

    def moved():
        try:
            with open(f"{own}/cgroup.procs") as f:
                return str(probe.pid) in f.read().split()
        except OSError:
            return False

    try:
        wait(moved, 10, f"guardian moving its `cgroup = \"own\"` service's root into {own}")
    except Fail as e:
        errors = [r.get("result") or r.get("message") for r in troubles(journal())]
        problems.append(f"{e} (guardian: {errors[-2:]})")
    finally:
        probe.kill()
        probe.wait()
    # Emptied, the service's cgroup may go at once; what is left must go with guardian.
    before = [d for d, _, _ in os.walk("/sys/fs/cgroup/guardian")]
    sh("systemctl", "stop", "guardian")
    if guardian_processes():
        problems.append(f"guardian processes left: {guardian_processes()}")
    try:
        wait(
            lambda: not any(bpf_exists(BPF_PROG_GET_FD_BY_ID, i) for i in progs)
            and not any(bpf_exists(BPF_MAP_GET_FD_BY_ID, i) for i in maps),
            5,
            f"guardian's BPF programs {sorted(progs)} and maps {sorted(maps)} freed",
        )
    except Fail as e:
        problems.append(str(e))
    if os.path.exists("/sys/fs/cgroup/guardian"):
        left = [d for d, _, _ in os.walk("/sys/fs/cgroup/guardian")]
        problems.append(f"guardian's cgroups left: {left}")
    if problems:
        raise Fail("; ".join(problems))
    return (
        f"no guardian process; its programs {sorted(progs)} and maps {sorted(maps)} freed; "
        f"its cgroups removed (left when {OWN_SERVICE}'s root ended, before the stop: {before})"
    )


PLAN = (
    [("install", install)]
    + [(f"killmode-process/{u}", lambda u=u: leaking_unit(u)) for u in UNITS]
    + [
        ("reload/changed-policy", reload_changed),
        ("reload/invalid-policy", reload_invalid),
        ("reload/old-policy-enforced", reload_old_policy_enforced),
    ]
    + [(f"killmode-mixed/{u}", lambda u=u: no_fight(u)) for u in UNITS]
    + [(f"supervisord/{u}", lambda u=u: supervised(u)) for u in UNITS]
    + [
        ("journal/decisions", journal_decisions),
        ("watchdog", watchdog),
        ("stop", stop),
    ]
)


def main():
    out(f"{MARK} kernel {os.uname().release}")
    out(f"{MARK} plan {' '.join(name for name, _ in PLAN)}")
    installed = None
    for name, case in PLAN:
        start = time.monotonic()
        try:
            if installed is False:
                raise Fail("not run: the install case failed")
            verdict, detail = "PASS", case()
        except Fail as e:
            verdict, detail = "FAIL", str(e)
        except Exception:
            verdict, detail = "FAIL", traceback.format_exc()
        if name == "install":
            installed = verdict == "PASS"
        # One line per verdict: the host reads nothing past it.
        detail = " | ".join(line.strip() for line in detail.splitlines())
        out(f"CASE {name} {verdict} ({time.monotonic() - start:.1f} s) {detail}")
    # For the console log: what guardian and the services said, and what went wrong anywhere.
    logs = [(f"journal of {u}", ["journalctl", f"--unit={u}"]) for u in ["guardian", *UNITS]]
    logs.append(("warnings and errors of this boot", ["journalctl", "--priority=warning"]))
    logs.append(("supervisord's programs", ["sh", "-c", "tail -n 40 /var/log/analyticbot/*.log"]))
    for title, args in logs:
        out(f"{MARK} {title}:")
        text = subprocess.run(
            [*args, "--no-pager", "--output=short-monotonic"] if args[0] == "journalctl" else args,
            capture_output=True,
            text=True,
        ).stdout
        for line in text.splitlines():
            out(f"  | {line}")
    out(f"{MARK} done")
    subprocess.run(["systemctl", "poweroff", "--force", "--force"])


if __name__ == "__main__":
    sys.exit(main())
