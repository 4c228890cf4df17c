//! Process shapes for guardian's integration tests and benchmarks.
//!
//! Each command prints `key=value` lines (the pids the test needs) on stdout and, where the shape
//! must stay up while the test looks at it, waits for a line or EOF on stdin. Every wait is
//! bounded so that nothing outlives a failed test for long.

use std::{
    io::{self, BufRead, Write},
    thread,
    time::{Duration, Instant},
};

/// Longest time any workload process stays alive on its own.
const MAX_LIFETIME: Duration = Duration::from_secs(120);

fn say(line: &str) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn gettid() -> i32 {
    // SAFETY: no preconditions.
    unsafe { libc::gettid() }
}

/// fork(2); returns 0 in the child.
fn fork() -> i32 {
    // SAFETY: the child only calls async-signal-safe functions or exec/exit paths of this
    // program, which is single-threaded where it forks (except `leader-exit`, see there).
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed: {}", io::Error::last_os_error());
    pid
}

fn wait(pid: i32) -> i32 {
    let mut status = 0;
    // SAFETY: plain waitpid on our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    status
}

/// Sleeps until killed (bounded by MAX_LIFETIME), then exits.
fn linger() -> ! {
    let start = Instant::now();
    while start.elapsed() < MAX_LIFETIME {
        thread::sleep(Duration::from_millis(100));
    }
    // SAFETY: terminating the process.
    unsafe { libc::_exit(0) }
}

/// Allocates `mb` MiB and touches every page, so that it is resident.
fn allocate(mb: u64) -> Vec<u8> {
    let mut v = vec![0u8; (mb as usize) << 20];
    for i in (0..v.len()).step_by(4096) {
        v[i] = 1;
    }
    v
}

/// Reads one line from a pipe fd (blocking), bounded by the writer's lifetime.
fn wait_pipe(fd: i32) {
    let mut b = [0u8; 1];
    // SAFETY: reading one byte into a local from our own pipe.
    unsafe { libc::read(fd, b.as_mut_ptr().cast(), 1) };
}

fn poke_pipe(fd: i32) {
    // SAFETY: writing one byte from a local to our own pipe.
    unsafe { libc::write(fd, b"g".as_ptr().cast(), 1) };
}

fn pipe() -> [i32; 2] {
    let mut fds = [0; 2];
    // SAFETY: pipe into a local array.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    fds
}

/// Forks a middle process that forks a child running `body`, reports the child's pid and exits,
/// orphaning it. Returns (middle, orphan) once the middle is reaped.
fn orphan(body: impl FnOnce()) -> (i32, i32) {
    let report = pipe();
    let middle = fork();
    if middle == 0 {
        let child = fork();
        if child == 0 {
            body();
            // SAFETY: the orphan ends if its body ever returns.
            unsafe { libc::_exit(0) }
        }
        let msg = child.to_ne_bytes();
        // SAFETY: writing 4 bytes from a local to our pipe.
        unsafe { libc::write(report[1], msg.as_ptr().cast(), 4) };
        // SAFETY: the middle process ends here.
        unsafe { libc::_exit(0) }
    }
    let mut msg = [0u8; 4];
    // SAFETY: reading 4 bytes into a local from our pipe.
    unsafe { libc::read(report[0], msg.as_mut_ptr().cast(), 4) };
    wait(middle);
    (middle, i32::from_ne_bytes(msg))
}

/// The set holding only `sig`.
fn sigset(sig: i32) -> libc::sigset_t {
    // SAFETY: initialising a local signal set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, sig);
        set
    }
}

/// Blocks `sig` (inherited by children forked afterwards): sent early, it waits instead of
/// killing.
fn block_signal(sig: i32) {
    // SAFETY: changing this thread's signal mask.
    unsafe { libc::sigprocmask(libc::SIG_BLOCK, &sigset(sig), std::ptr::null_mut()) };
}

/// Waits for a blocked `sig`, bounded by MAX_LIFETIME.
fn wait_signal(sig: i32) {
    let limit = libc::timespec {
        tv_sec: MAX_LIFETIME.as_secs() as libc::time_t,
        tv_nsec: 0,
    };
    // SAFETY: waiting on a local signal set.
    unsafe { libc::sigtimedwait(&sigset(sig), std::ptr::null_mut(), &limit) };
}

/// Waits for a line (or EOF) on stdin, bounded by MAX_LIFETIME.
fn hold() {
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let mut line = String::new();
        let _ = io::stdin().lock().read_line(&mut line);
        let _ = tx.send(());
    });
    let _ = rx.recv_timeout(MAX_LIFETIME);
}

/// Becomes `uid` (real, effective and saved; group `uid`, no supplementary groups). Needs root.
fn become_user(uid: u32) {
    // SAFETY: plain credential syscalls on this process; groups first, while still root.
    let rc = unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0 {
            -1
        } else if libc::setresgid(uid, uid, uid) != 0 {
            -2
        } else {
            libc::setresuid(uid, uid, uid)
        }
    };
    assert_eq!(
        rc,
        0,
        "cannot become uid {uid}: {}",
        io::Error::last_os_error()
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cmd = args.first().map(String::as_str).unwrap_or("");
    let num = |i: usize, default: u64| -> u64 {
        args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default)
    };
    match cmd {
        // A child that exits with a code; the parent reaps it and exits.
        "fork-exit" => {
            let code = num(1, 7) as i32;
            let child = fork();
            if child == 0 {
                // SAFETY: exiting the child.
                unsafe { libc::_exit(code) }
            }
            wait(child);
            say(&format!("parent={} child={child}", std::process::id()));
        }
        // Threads that start and end; no process is created.
        "threads" => {
            let n = num(1, 4);
            let handles: Vec<_> = (0..n)
                .map(|_| {
                    thread::spawn(|| {
                        thread::sleep(Duration::from_millis(20));
                        gettid()
                    })
                })
                .collect();
            let tids: Vec<String> = handles
                .into_iter()
                .map(|h| h.join().expect("thread").to_string())
                .collect();
            say(&format!(
                "pid={} tids={}",
                std::process::id(),
                tids.join(",")
            ));
        }
        // parent -> middle -> grandchild; the middle exits, the grandchild is orphaned.
        "double-fork" | "subreaper" => {
            if cmd == "subreaper" {
                // SAFETY: prctl with integer arguments.
                let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
                assert_eq!(
                    rc,
                    0,
                    "PR_SET_CHILD_SUBREAPER: {}",
                    io::Error::last_os_error()
                );
            }
            let (middle, grandchild) = orphan(|| linger());
            say(&format!(
                "parent={} middle={middle} grandchild={grandchild}",
                std::process::id()
            ));
            hold();
            // The subreaper reaps what it inherited before leaving.
            if cmd == "subreaper" {
                // SAFETY: reaping any child without blocking.
                while unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) } > 0 {}
            }
        }
        // A process whose leader thread exits first: it has a child and a second thread that
        // keeps the group alive until told to end it.
        "leader-exit" => {
            let child = fork();
            if child == 0 {
                linger();
            }
            thread::spawn(move || {
                // Wait until the leader has really gone (its /proc state turns to zombie).
                let me = std::process::id();
                let start = Instant::now();
                while start.elapsed() < Duration::from_secs(10) {
                    let stat = std::fs::read_to_string(format!("/proc/{me}/task/{me}/stat"))
                        .unwrap_or_default();
                    if stat
                        .rsplit(')')
                        .next()
                        .is_some_and(|s| s.trim_start().starts_with('Z'))
                    {
                        break;
                    }
                    thread::sleep(Duration::from_millis(5));
                }
                say(&format!("pid={me} child={child} thread={}", gettid()));
                hold();
                // SAFETY: ending the whole process from its last thread.
                unsafe { libc::exit(0) }
            });
            // End only the leader thread with the raw exit syscall (pthread_exit would unwind
            // through Rust's main, which aborts); the process lives on in the other thread.
            // SAFETY: the thread ends here and touches nothing afterwards.
            unsafe { libc::syscall(libc::SYS_exit, 0) };
            unreachable!("SYS_exit returned");
        }
        // `tree N [MODE]`: N children that linger. MODE `split`: the second child ignores
        // SIGTERM; `ignore-term`: all do; `nested`: the last child forks two children of its own
        // when it gets SIGUSR1;
        // `as-uid=UID`: the second child runs as UID; `term-proof`: the parent ignores SIGTERM.
        // The parent holds until a line or EOF on stdin (then exits without reaping: the
        // children are orphaned); with MODE `keep` it ignores stdin and lingers (for parents
        // launched in the background by a shell); with MODE `late` it says `parent=P` and holds
        // first, then forks the children, says them, and exits at once (status 0).
        "tree" => {
            let n = num(1, 3);
            let mode = args.get(2).map(String::as_str).unwrap_or("");
            if mode == "nested" {
                block_signal(libc::SIGUSR1);
            }
            if mode == "late" {
                say(&format!("parent={}", std::process::id()));
                hold();
            }
            let kids: Vec<String> = (0..n)
                .map(|i| {
                    // Inherited at the fork, so that a SIGTERM coming before the child first
                    // runs finds it ignored already.
                    let ignores = mode == "ignore-term" || (mode == "split" && i == 1);
                    if ignores {
                        // SAFETY: setting a signal disposition.
                        unsafe { libc::signal(libc::SIGTERM, libc::SIG_IGN) };
                    }
                    let c = fork();
                    if c != 0 && ignores {
                        // SAFETY: as above; the parent keeps the default.
                        unsafe { libc::signal(libc::SIGTERM, libc::SIG_DFL) };
                    }
                    if c == 0 {
                        if let Some(uid) = mode.strip_prefix("as-uid=") {
                            if i == 1 {
                                become_user(uid.parse().expect("tree N as-uid=UID"));
                            }
                        }
                        if mode == "nested" && i == n - 1 {
                            wait_signal(libc::SIGUSR1);
                            for _ in 0..2 {
                                if fork() == 0 {
                                    linger();
                                }
                            }
                        }
                        linger();
                    }
                    c.to_string()
                })
                .collect();
            if mode == "term-proof" {
                // SAFETY: setting a signal disposition; the children keep the default.
                unsafe { libc::signal(libc::SIGTERM, libc::SIG_IGN) };
            }
            say(&format!(
                "parent={} children={}",
                std::process::id(),
                kids.join(",")
            ));
            match mode {
                "keep" => linger(),
                "late" => {}
                _ => hold(),
            }
        }
        // `storm MAX_FORKS CHILD_MS`: after a line on stdin, forks as fast as it can, each child
        // lingering CHILD_MS; counts refused forks and children killed by a signal, and the most
        // children alive at once.
        "storm" => {
            let max = num(1, 200);
            let child_ms = num(2, 1000);
            say(&format!("pid={}", std::process::id()));
            hold();
            let (mut alive, mut most, mut refused, mut killed, mut survived) =
                (0u64, 0u64, 0u64, 0u64, 0u64);
            let reap = |block: bool, alive: &mut u64, killed: &mut u64, survived: &mut u64| {
                let mut status = 0;
                let flags = if block { 0 } else { libc::WNOHANG };
                // SAFETY: reaping our own children.
                while unsafe { libc::waitpid(-1, &mut status, flags) } > 0 {
                    *alive -= 1;
                    if libc::WIFSIGNALED(status) {
                        *killed += 1;
                    } else {
                        *survived += 1;
                    }
                    if block && *alive == 0 {
                        break;
                    }
                }
            };
            let start = Instant::now();
            for _ in 0..max {
                // SAFETY: the child only sleeps and exits.
                let c = unsafe { libc::fork() };
                if c == 0 {
                    thread::sleep(Duration::from_millis(child_ms));
                    // SAFETY: exiting the child.
                    unsafe { libc::_exit(0) }
                } else if c < 0 {
                    refused += 1;
                    thread::sleep(Duration::from_millis(2));
                } else {
                    alive += 1;
                    most = most.max(alive);
                }
                reap(false, &mut alive, &mut killed, &mut survived);
                if start.elapsed() > Duration::from_secs(20) {
                    break;
                }
            }
            reap(true, &mut alive, &mut killed, &mut survived);
            say(&format!(
                "most_alive={most} refused={refused} killed={killed} survived={survived}"
            ));
        }
        // `hog MB`: allocates and touches MB MiB at once, then lingers.
        "hog" => {
            let _mem = allocate(num(1, 100));
            say(&format!("pid={}", std::process::id()));
            linger();
        }
        // `hog-tree MB`: a parent whose child allocates MB MiB after a line on stdin.
        "hog-tree" => {
            let mb = num(1, 100);
            let go = pipe();
            let child = fork();
            if child == 0 {
                wait_pipe(go[0]);
                let _mem = allocate(mb);
                linger();
            }
            say(&format!("parent={} hog={child}", std::process::id()));
            hold();
            poke_pipe(go[1]);
            linger();
        }
        // `victims ORPHAN_MB MEMBER_MB`: a parent that, after a first line on stdin, forks a
        // member child and an orphan (its middle process exits); after a second line the orphan
        // allocates ORPHAN_MB, then the member MEMBER_MB.
        "victims" => {
            let (orphan_mb, member_mb) = (num(1, 60), num(2, 80));
            say(&format!("parent={}", std::process::id()));
            let mut line = String::new();
            let _ = io::stdin().lock().read_line(&mut line);
            let (go_orphan, go_member) = (pipe(), pipe());
            let member = fork();
            if member == 0 {
                wait_pipe(go_member[0]);
                let _mem = allocate(member_mb);
                linger();
            }
            let (_, orphan) = orphan(|| {
                wait_pipe(go_orphan[0]);
                let _mem = allocate(orphan_mb);
                linger();
            });
            say(&format!("member={member} orphan={orphan}"));
            hold();
            poke_pipe(go_orphan[1]);
            thread::sleep(Duration::from_millis(500));
            poke_pipe(go_member[1]);
            linger();
        }
        // `shared-heap MB WORKERS GROW_MB`: a parent that allocates and touches MB MiB, then forks
        // WORKERS workers that keep it shared (they never write to it) and linger. After a line
        // on stdin the first worker allocates and touches GROW_MB MiB of its own.
        "shared-heap" => {
            let (mb, n, grow_mb) = (num(1, 300), num(2, 4), num(3, 600));
            let _heap = allocate(mb);
            let go = pipe();
            let workers: Vec<String> = (0..n)
                .map(|i| {
                    let c = fork();
                    if c == 0 {
                        // The heap is never written here: its pages stay shared with the parent
                        // and the other workers.
                        let _mine = (i == 0).then(|| {
                            wait_pipe(go[0]);
                            allocate(grow_mb)
                        });
                        linger();
                    }
                    c.to_string()
                })
                .collect();
            say(&format!(
                "parent={} workers={}",
                std::process::id(),
                workers.join(",")
            ));
            hold();
            poke_pipe(go[1]);
            linger();
        }
        // `spin SECONDS ...`: prints `pid=P`, keeps one CPU busy for SECONDS (at most
        // MAX_LIFETIME), then exits. (The rest of the command line only marks it for a policy.)
        "spin" => {
            let run = Duration::from_secs(num(1, 10)).min(MAX_LIFETIME);
            say(&format!("pid={}", std::process::id()));
            let start = Instant::now();
            let mut n = 0u64;
            while start.elapsed() < run {
                for _ in 0..100_000 {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
        }
        // The fork+exit loop the fork benchmark runs: `fork-loop ITERATIONS`.
        "fork-loop" => {
            let n = num(1, 10_000);
            let start = Instant::now();
            for _ in 0..n {
                let c = fork();
                if c == 0 {
                    // SAFETY: exiting the child.
                    unsafe { libc::_exit(0) }
                }
                wait(c);
            }
            say(&format!(
                "pid={} forks={n} ns={}",
                std::process::id(),
                start.elapsed().as_nanos()
            ));
        }
        // The fork+exec loop the exec benchmark runs: `exec-loop ITERATIONS [PROGRAM]`, each
        // child exec'ing PROGRAM (default /bin/true) with no arguments. (The rest of the command
        // line only marks it for a policy.)
        "exec-loop" => {
            let n = num(1, 1_000);
            let program = std::ffi::CString::new(args.get(2).map_or("/bin/true", String::as_str))
                .expect("a program path without NUL");
            // Built before forking: the child only calls execv and _exit.
            let argv = [program.as_ptr(), std::ptr::null()];
            let start = Instant::now();
            for _ in 0..n {
                let c = fork();
                if c == 0 {
                    // SAFETY: execv with a NUL-terminated argv of valid C strings; the child
                    // exits if it returns.
                    unsafe {
                        libc::execv(program.as_ptr(), argv.as_ptr());
                        libc::_exit(127)
                    }
                }
                let status = wait(c);
                assert!(
                    libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
                    "{program:?} failed: status {status:#x}"
                );
            }
            say(&format!(
                "pid={} execs={n} ns={}",
                std::process::id(),
                start.elapsed().as_nanos()
            ));
        }
        // `sleepers N ...`: forks N children that sleep without ever waking (blocked on a pipe),
        // prints `pid=P children=N`, and holds; then ends them, reaps them and exits. A child
        // also ends when the parent dies (EOF on the pipe) and after MAX_LIFETIME (SIGALRM).
        // (The rest of the command line only marks it for a policy.)
        "sleepers" => {
            let n = num(1, 100);
            let gate = pipe();
            for _ in 0..n {
                if fork() == 0 {
                    // SAFETY: closing our copy of the write end (the parent's is then the last)
                    // and arming this process's alarm.
                    unsafe {
                        libc::close(gate[1]);
                        libc::alarm(MAX_LIFETIME.as_secs() as u32);
                    }
                    wait_pipe(gate[0]);
                    // SAFETY: exiting the child.
                    unsafe { libc::_exit(0) }
                }
            }
            say(&format!("pid={} children={n}", std::process::id()));
            hold();
            // SAFETY: closing the last write end wakes every child with EOF; then reaping them.
            unsafe {
                libc::close(gate[1]);
                while libc::waitpid(-1, std::ptr::null_mut(), 0) > 0 {}
            }
        }
        // `linger N ...`: forks N children that linger, prints `pid=P children=...`, lingers.
        // (The rest of the command line only marks it for a policy.)
        "linger" => {
            let kids: Vec<String> = (0..num(1, 0))
                .map(|_| {
                    let c = fork();
                    if c == 0 {
                        linger();
                    }
                    c.to_string()
                })
                .collect();
            say(&format!(
                "pid={} children={}",
                std::process::id(),
                kids.join(",")
            ));
            linger();
        }
        // `roots-chain TAG`: R (this process) forks W, W forks C; C execs `linger 0 TAG`, then W
        // execs `linger 1 TAG` (a root with one child of its own). Prints `r= w= c=` once C has
        // exec'd, just before W does; R then holds.
        "roots-chain" => {
            let tag = args.get(1).cloned().unwrap_or_default();
            let me = std::env::current_exe().expect("current_exe");
            let exec = |n: &str| -> ! {
                let err = std::os::unix::process::CommandExt::exec(
                    std::process::Command::new(&me).args(["linger", n, &tag]),
                );
                panic!("exec {}: {err}", me.display());
            };
            let r = std::process::id();
            let w = fork();
            if w == 0 {
                // C's copy of this pipe closes when C execs: that is how W knows it has.
                let execd = pipe();
                let c = fork();
                if c == 0 {
                    // SAFETY: closing our copy of the read end, and marking the write end
                    // close-on-exec.
                    unsafe {
                        libc::close(execd[0]);
                        libc::fcntl(execd[1], libc::F_SETFD, libc::FD_CLOEXEC);
                    }
                    exec("0");
                }
                // SAFETY: closing our copy of the write end.
                unsafe { libc::close(execd[1]) };
                wait_pipe(execd[0]);
                say(&format!("r={r} w={} c={c}", std::process::id()));
                exec("1");
            }
            hold();
        }
        // `churn N KEEP`: prints `pid=P`; after a line on stdin forks N children that wait, then
        // KEEP that linger, then ends the N (all their exits come after all the forks) and
        // reaps them, and prints `workers=...`; after a second line forks one more lingering
        // child and prints `extra=P`; then lingers.
        "churn" => {
            let (n, keep) = (num(1, 300), num(2, 4));
            say(&format!("pid={}", std::process::id()));
            let mut stdin = io::stdin().lock();
            let mut line = String::new();
            let _ = stdin.read_line(&mut line);
            let release = pipe();
            let quick: Vec<i32> = (0..n)
                .map(|_| {
                    let c = fork();
                    if c == 0 {
                        // SAFETY: closing our copy of the write end, so that the parent's close
                        // ends the wait.
                        unsafe { libc::close(release[1]) };
                        wait_pipe(release[0]);
                        // SAFETY: exiting the child.
                        unsafe { libc::_exit(0) }
                    }
                    c
                })
                .collect();
            let workers: Vec<String> = (0..keep)
                .map(|_| {
                    let w = fork();
                    if w == 0 {
                        // SAFETY: closing the copies of the pipe that would keep the waiting
                        // children waiting.
                        unsafe {
                            libc::close(release[0]);
                            libc::close(release[1]);
                        }
                        linger();
                    }
                    w.to_string()
                })
                .collect();
            // SAFETY: closing our pipe ends.
            unsafe {
                libc::close(release[0]);
                libc::close(release[1]);
            }
            for c in quick {
                wait(c);
            }
            say(&format!("workers={}", workers.join(",")));
            line.clear();
            let _ = stdin.read_line(&mut line);
            let extra = fork();
            if extra == 0 {
                linger();
            }
            say(&format!("extra={extra}"));
            linger();
        }
        // `clone-parent`: prints `pid=P`; after a line on stdin clones a child with CLONE_PARENT
        // (it becomes this process's sibling, a child of this process's parent), prints
        // `sibling=S`, and lingers.
        "clone-parent" => {
            say(&format!("pid={}", std::process::id()));
            let mut line = String::new();
            let _ = io::stdin().lock().read_line(&mut line);
            // SAFETY: a raw clone without a new stack behaves like fork; the child only sleeps.
            let sibling = unsafe {
                libc::syscall(
                    libc::SYS_clone,
                    libc::CLONE_PARENT | libc::SIGCHLD,
                    0usize,
                    0usize,
                    0usize,
                    0usize,
                )
            };
            assert!(sibling >= 0, "clone: {}", io::Error::last_os_error());
            if sibling == 0 {
                linger();
            }
            say(&format!("sibling={sibling}"));
            linger();
        }
        // `as-uid UID PROGRAM [ARGS...]`: runs PROGRAM as UID (and group UID), like `setpriv
        // --reuid --regid --clear-groups`, which minimal guests lack.
        "as-uid" => {
            let uid = num(1, u64::MAX);
            let uid = u32::try_from(uid).expect("as-uid UID PROGRAM [ARGS...]");
            let program = args.get(2).expect("as-uid UID PROGRAM [ARGS...]");
            become_user(uid);
            let err = std::os::unix::process::CommandExt::exec(
                std::process::Command::new(program).args(&args[3..]),
            );
            panic!("cannot run {program}: {err}");
        }
        // `in-pidns [--host-proc] PROGRAM ARGS...`: runs PROGRAM as pid 1 of a new pid namespace
        // (with a /proc of its own unless --host-proc) and exits with its status.
        "in-pidns" => {
            let host_proc = args.get(1).is_some_and(|a| a == "--host-proc");
            let cmd = &args[if host_proc { 2 } else { 1 }..];
            // SAFETY: unshare with flags only; the new pid namespace applies to our children.
            let rc = unsafe { libc::unshare(libc::CLONE_NEWPID | libc::CLONE_NEWNS) };
            assert_eq!(rc, 0, "unshare: {}", io::Error::last_os_error());
            let child = fork();
            if child == 0 {
                if !host_proc {
                    let none = std::ptr::null::<libc::c_char>();
                    // SAFETY: mount(2) with static C strings; our mount namespace is our own.
                    unsafe {
                        libc::mount(
                            none,
                            c"/".as_ptr(),
                            none,
                            libc::MS_REC | libc::MS_PRIVATE,
                            std::ptr::null(),
                        );
                        let rc = libc::mount(
                            c"proc".as_ptr(),
                            c"/proc".as_ptr(),
                            c"proc".as_ptr(),
                            0,
                            std::ptr::null(),
                        );
                        assert_eq!(rc, 0, "mount proc: {}", io::Error::last_os_error());
                    }
                }
                let err = std::os::unix::process::CommandExt::exec(
                    std::process::Command::new(&cmd[0]).args(&cmd[1..]),
                );
                panic!("exec {}: {err}", cmd[0]);
            }
            let status = wait(child);
            std::process::exit(if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else {
                128 + libc::WTERMSIG(status)
            });
        }
        _ => {
            eprintln!(
                "usage: workload fork-exit [CODE] | threads [N] | double-fork | subreaper | \
                 leader-exit | tree [N] [MODE] | storm [MAX] [CHILD_MS] | hog [MB] | \
                 hog-tree [MB] | victims [ORPHAN_MB] [MEMBER_MB] | \
                 shared-heap [MB] [WORKERS] [GROW_MB] | spin [SECONDS] | fork-loop [N] | \
                 exec-loop [N] [PROGRAM] | linger [N] | \
                 roots-chain TAG | churn [N] [KEEP] | clone-parent | \
                 as-uid UID PROGRAM [ARGS...] | \
                 in-pidns [--host-proc] PROGRAM ARGS..."
            );
            std::process::exit(2);
        }
    }
}
