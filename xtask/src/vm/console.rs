//! Booting a guest under qemu and reading its verdict from the serial console.

use std::{
    collections::HashMap,
    fs,
    io::{BufRead as _, BufReader, Write as _},
    path::Path,
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use super::guest::{marker, MARK};

/// Software emulation: the CI machines' KVM is paravirtual and cannot run stock kernels. The
/// first serial port carries the init's and tests' output, the second the kernel's messages.
const QEMU_ARGS: [&str; 14] = [
    "-accel",
    "tcg,thread=multi",
    "-cpu",
    "max",
    "-m",
    "2G",
    "-smp",
    "2",
    "-nodefaults",
    "-display",
    "none",
    "-no-reboot",
    "-serial",
    "stdio",
];
/// Kernel messages on ttyS1, so they never split a test's output line. A panic (a soft lockup
/// is made one) powers the guest off at once (with -no-reboot) instead of hanging until the
/// timeout. Every guest's kernel command line starts with these.
pub const KERNEL_ARGS: &str = "console=ttyS1 panic=-1 softlockup_panic=1";
/// How long qemu may take to exit after the guest's completion marker.
const POWEROFF_WAIT: Duration = Duration::from_secs(30);
/// Kernel log lines that mean the guest kernel itself broke.
const KERNEL_TROUBLE: [&str; 3] = ["Kernel panic", "BUG:", "Oops:"];
/// Kernel log lines shown when a guest fails.
const KERNEL_TAIL: usize = 40;

/// What a guest printed on its console, and what its kernel said.
pub struct Console {
    pub lines: Vec<String>,
    /// From qemu's start to the init's first marker (`{MARK} kernel ...`).
    pub boot_time: Option<Duration>,
    /// A guest still running at the timeout, and kernel bugs (panic, oops).
    pub problems: Vec<String>,
    /// The end of the kernel's log, shown when the guest had a problem.
    pub kernel_tail: Vec<String>,
}

/// Boots `kernel` with `initramfs` and the test suite's init, and parses its console.
pub fn boot(
    kernel: &Path,
    initramfs: &Path,
    console_log: &Path,
    kernel_log: &Path,
    timeout: Duration,
) -> anyhow::Result<Report> {
    let console = run(
        kernel,
        initramfs,
        KERNEL_ARGS,
        console_log,
        kernel_log,
        timeout,
    )?;
    let mut report = Report::parse(&console.lines);
    report.boot_time = console.boot_time;
    report.problems.extend(console.problems);
    report.kernel_tail = console.kernel_tail;
    Ok(report)
}

/// Boots `kernel` with `initramfs` and the kernel command line `cmdline` (which must keep the
/// kernel's messages on ttyS1), saves the console (ttyS0) to `console_log` and the kernel's
/// messages to `kernel_log`. The guest is killed when it runs past `timeout`, or when it has
/// not powered off shortly after printing `{MARK} done`.
pub fn run(
    kernel: &Path,
    initramfs: &Path,
    cmdline: &str,
    console_log: &Path,
    kernel_log: &Path,
    timeout: Duration,
) -> anyhow::Result<Console> {
    let logs = console_log.parent().expect("log has a folder");
    fs::create_dir_all(logs)?;
    let mut file = fs::File::create(console_log)?;
    let started = Instant::now();
    let mut qemu = Command::new("qemu-system-x86_64")
        .args(QEMU_ARGS)
        .arg("-serial")
        .arg(format!("file:{}", kernel_log.display()))
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initramfs)
        .args(["-append", cmdline])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let (tx, rx) = mpsc::channel();
    let stdout = qemu.stdout.take().expect("piped");
    let stderr = qemu.stderr.take().expect("piped");
    let err_tx = tx.clone();
    thread::spawn(move || forward(stdout, tx));
    thread::spawn(move || forward(stderr, err_tx));

    let deadline = started + timeout;
    let mut lines = Vec::new();
    let mut timed_out = false;
    let mut boot_time = None;
    let mut done_at: Option<Instant> = None;
    loop {
        let limit = done_at.map_or(deadline, |d| d + POWEROFF_WAIT);
        let now = Instant::now();
        if now >= limit {
            timed_out = done_at.is_none();
            break;
        }
        match rx.recv_timeout(limit - now) {
            Ok(line) => {
                writeln!(file, "{line}")?;
                if line.starts_with(&format!("{MARK} kernel")) {
                    boot_time = Some(started.elapsed());
                } else if line == format!("{MARK} done") {
                    done_at = Some(Instant::now());
                }
                lines.push(line);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            // Both pipes closed: qemu has exited.
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let _ = qemu.kill();
    qemu.wait().context("waiting for qemu")?;
    let mut problems = Vec::new();
    if timed_out {
        problems.push(format!(
            "the guest was still running after {} s and was killed",
            timeout.as_secs()
        ));
    }
    let klog = fs::read(kernel_log).unwrap_or_default();
    let klog: Vec<String> = String::from_utf8_lossy(&klog)
        .lines()
        .map(|l| l.trim_end_matches('\r').to_owned())
        .collect();
    for line in klog
        .iter()
        .filter(|l| KERNEL_TROUBLE.iter().any(|t| l.contains(t)))
    {
        problems.push(format!("kernel: {}", line.trim()));
    }
    Ok(Console {
        lines,
        boot_time,
        problems,
        kernel_tail: klog[klog.len().saturating_sub(KERNEL_TAIL)..].to_vec(),
    })
}

/// Sends each line of a pipe (the last one even without its newline), without carriage returns.
fn forward(pipe: impl std::io::Read, tx: mpsc::Sender<String>) {
    let mut reader = BufReader::new(pipe);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let line = String::from_utf8_lossy(&buf);
                if tx
                    .send(line.trim_end_matches(['\n', '\r']).to_owned())
                    .is_err()
                {
                    return;
                }
            }
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Passed,
    Failed,
    /// Passed without running, with the reason the test gave (`SKIPPED <test>: <why>`).
    Skipped(String),
}

#[derive(Debug)]
pub struct TestResult {
    /// `<test binary>::<test>`.
    pub name: String,
    pub outcome: Outcome,
    /// What the test printed (libtest's captured output).
    pub output: Vec<String>,
}

/// What one guest reported.
#[derive(Debug, Default)]
pub struct Report {
    /// `uname -r` of the guest, once it reached its init.
    pub uname: Option<String>,
    pub tests: Vec<TestResult>,
    /// Anything wrong besides failed tests: a setup step, a binary that crashed, no completion,
    /// a kernel bug.
    pub problems: Vec<String>,
    /// From qemu's start to the init's first marker.
    pub boot_time: Option<Duration>,
    /// The end of the kernel's log, shown when the guest had a problem.
    pub kernel_tail: Vec<String>,
}

/// One test binary's run, while its output is being read.
struct BinaryRun {
    name: String,
    announced: Option<usize>,
    results: Vec<(String, String)>,
    sections: HashMap<String, Vec<String>>,
    section: Option<String>,
}

impl Report {
    /// Parses a guest's console: the init's markers and libtest's output (run with
    /// `--test-threads=1 --show-output`) between them.
    pub fn parse(lines: &[String]) -> Self {
        let mut report = Self::default();
        let mut current: Option<BinaryRun> = None;
        let mut done = false;
        for line in lines {
            if let Some((word, rest)) = marker(line) {
                match word {
                    "kernel" => report.uname = Some(rest.to_owned()),
                    "error" => report.problems.push(format!("guest setup: {rest}")),
                    "begin" => {
                        if let Some(run) = current.take() {
                            report.finish(run, None);
                        }
                        current = Some(BinaryRun {
                            name: rest.to_owned(),
                            announced: None,
                            results: Vec::new(),
                            sections: HashMap::new(),
                            section: None,
                        });
                    }
                    "end" => {
                        let exit = rest
                            .rsplit_once("exit=")
                            .and_then(|(_, code)| code.parse().ok());
                        if let Some(run) = current.take() {
                            report.finish(run, exit);
                        }
                    }
                    "done" => done = true,
                    _ => {}
                }
                continue;
            }
            let Some(run) = current.as_mut() else {
                continue;
            };
            if let Some(header) = line
                .strip_prefix("---- ")
                .and_then(|l| l.strip_suffix(" stdout ----"))
            {
                run.section = Some(header.to_owned());
            } else if line == "successes:" || line == "failures:" {
                run.section = None;
            } else if let Some(name) = &run.section {
                run.sections
                    .entry(name.clone())
                    .or_default()
                    .push(line.clone());
            } else if let Some(n) = line
                .strip_prefix("running ")
                .and_then(|l| l.split(' ').next())
                .and_then(|n| n.parse().ok())
            {
                run.announced = Some(n);
            } else if let Some((name, status)) = line
                .strip_prefix("test ")
                .and_then(|l| l.split_once(" ..."))
            {
                run.results
                    .push((name.to_owned(), status.trim().to_owned()));
            }
        }
        if let Some(run) = current.take() {
            report.finish(run, None);
        }
        if !done {
            report
                .problems
                .push("the guest never printed its completion marker".to_owned());
        }
        if report.tests.is_empty() {
            report.problems.push("no test ran".to_owned());
        }
        report
    }

    fn finish(&mut self, mut run: BinaryRun, exit: Option<i32>) {
        let mut failed = false;
        for (name, status) in &run.results {
            let output = run.sections.remove(name).unwrap_or_default();
            let skip = output
                .iter()
                .find_map(|l| l.strip_prefix("SKIPPED "))
                .map(|l| l.split_once(": ").map_or(l, |(_, why)| why).to_owned());
            let outcome = match (status.as_str(), skip) {
                ("ok", Some(why)) => Outcome::Skipped(why),
                ("ok", None) => Outcome::Passed,
                (s, _) if s.starts_with("ignored") => Outcome::Skipped(s.to_owned()),
                _ => Outcome::Failed,
            };
            failed |= outcome == Outcome::Failed;
            self.tests.push(TestResult {
                name: format!("{}::{name}", run.name),
                outcome,
                output,
            });
        }
        let bin = &run.name;
        match run.announced {
            None => self
                .problems
                .push(format!("{bin}: no test started (crashed at start?)")),
            Some(n) if n > run.results.len() => self.problems.push(format!(
                "{bin}: {} of {n} tests reported no result",
                n - run.results.len()
            )),
            Some(_) => {}
        }
        match exit {
            None => self.problems.push(format!("{bin}: did not finish")),
            Some(0) => {}
            Some(code) if !failed => self
                .problems
                .push(format!("{bin}: exited with {code} although no test failed")),
            Some(_) => {}
        }
    }

    /// (passed, failed, skipped).
    pub fn counts(&self) -> (usize, usize, usize) {
        let n = |f: fn(&Outcome) -> bool| self.tests.iter().filter(|t| f(&t.outcome)).count();
        (
            n(|o| *o == Outcome::Passed),
            n(|o| *o == Outcome::Failed),
            n(|o| matches!(o, Outcome::Skipped(_))),
        )
    }

    pub fn ok(&self) -> bool {
        self.problems.is_empty() && self.counts().1 == 0
    }

    /// One line per test, then the output of failed tests and the guest's problems.
    pub fn print(&self, series: &str) {
        for t in &self.tests {
            match &t.outcome {
                Outcome::Passed => println!("  [{series}] {} ... ok", t.name),
                Outcome::Skipped(why) => println!("  [{series}] {} ... skipped: {why}", t.name),
                Outcome::Failed => println!("  [{series}] {} ... FAILED", t.name),
            }
        }
        for t in self.tests.iter().filter(|t| t.outcome == Outcome::Failed) {
            println!("\n  [{series}] output of {}:", t.name);
            let from = t.output.len().saturating_sub(40);
            for line in &t.output[from..] {
                println!("    | {line}");
            }
        }
        for p in &self.problems {
            println!("  [{series}] PROBLEM: {p}");
        }
        // Failed tests speak for themselves; a guest that broke needs the kernel's side.
        if !self.problems.is_empty() && !self.kernel_tail.is_empty() {
            println!("\n  [{series}] end of the kernel log:");
            for line in &self.kernel_tail {
                println!("    | {line}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> Vec<String> {
        text.lines().map(str::to_owned).collect()
    }

    const PASSING: &str = "guardian-vm: kernel 6.1.0-56-cloud-amd64
guardian-vm: begin trace

running 3 tests
test a ... ok
test b ... ok
test c ... ok

successes:

---- a stdout ----
[guardian] attached

---- b stdout ----
SKIPPED python_b: python3 is not installed

successes:
    a
    b
    c

test result: ok. 3 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.00s

guardian-vm: end trace exit=0
guardian-vm: done
";

    #[test]
    fn passes_and_skips_are_told_apart() {
        let r = Report::parse(&lines(PASSING));
        assert_eq!(r.uname.as_deref(), Some("6.1.0-56-cloud-amd64"));
        assert_eq!(r.counts(), (2, 0, 1));
        assert_eq!(
            r.tests[1].outcome,
            Outcome::Skipped("python3 is not installed".into())
        );
        assert_eq!(r.tests[0].name, "trace::a");
        assert!(r.ok(), "{:?}", r.problems);
    }

    #[test]
    fn failures_and_their_output_are_reported() {
        let text = "guardian-vm: begin orphans
running 2 tests
test x ... FAILED
test y ... ok

failures:

---- x stdout ----
thread 'x' panicked at tests/orphans.rs:1:1:
boom

failures:
    x

test result: FAILED. 1 passed; 1 failed
guardian-vm: end orphans exit=101
guardian-vm: done
";
        let r = Report::parse(&lines(text));
        assert_eq!(r.counts(), (1, 1, 0));
        assert_eq!(r.tests[0].output[1], "boom");
        assert!(r.problems.is_empty(), "{:?}", r.problems);
        assert!(!r.ok());
    }

    #[test]
    fn an_unfinished_guest_fails() {
        let text = "guardian-vm: begin trace\nrunning 2 tests\ntest a ... ok\ntest b ...";
        let r = Report::parse(&lines(text));
        assert_eq!(r.counts(), (1, 1, 0), "the test that never ended failed");
        assert!(!r.ok());
        assert!(r.problems.iter().any(|p| p.contains("did not finish")));
        assert!(r.problems.iter().any(|p| p.contains("completion marker")));
    }

    #[test]
    fn a_crashed_binary_or_setup_error_fails() {
        let text = "guardian-vm: error mounting tracefs
guardian-vm: begin trace
guardian-vm: end trace exit=139
guardian-vm: done
";
        let r = Report::parse(&lines(text));
        assert!(!r.ok());
        assert!(r.problems.iter().any(|p| p.contains("mounting tracefs")));
        assert!(r.problems.iter().any(|p| p.contains("no test started")));
    }
}
