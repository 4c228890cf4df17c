//! Benchmarks that print figures. They need root (they load guardian's eBPF program).

use std::{
    fs,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use clap::Subcommand;

use guardian_tests::{alive, service_cgroup_dirs};

use crate::util::{self, cargo, is_root, step, workspace_root};

/// `cargo xtask bench [--guardian PATH] [BENCH]`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Measure this guardian binary rather than the one built from the tree (to compare two
    /// builds side by side).
    #[arg(long, global = true, value_name = "PATH")]
    guardian: Option<PathBuf>,
    /// One benchmark; without one, every benchmark runs with short trial counts and one
    /// summary table is printed at the end.
    #[command(subcommand)]
    which: Option<Bench>,
}

#[derive(Debug, Subcommand)]
pub enum Bench {
    /// Fork+exit and fork+exec rates without and with guardian attached (trace, policies that
    /// match nothing, the shipped policy), alternating, at the machine's full rate (one loop per
    /// CPU); prints the rates, their ratios with the spread over rounds, guardian's CPU time, and
    /// any loss.
    Fork {
        /// Forks per loop per round (several seconds' worth: shorter runs measure the
        /// machine's other tenants more than guardian).
        #[arg(long, default_value_t = 40_000)]
        forks: u64,
        /// Fork+exec iterations per loop per round.
        #[arg(long, default_value_t = 5_000)]
        execs: u64,
        /// Rounds of each kind.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
    /// Budgets: the time from a member crossing memory_high (the kernel's threshold
    /// notification) to the victim's exit (the kernel's trace), and the fork-path cost of task
    /// accounting in inherit mode (fork rate with and without it, alternating).
    Budgets {
        /// memory_high trials.
        #[arg(long, default_value_t = 50)]
        trials: usize,
        /// Forks per loop per round for the fork-path part.
        #[arg(long, default_value_t = 10_000)]
        forks: u64,
        /// Rounds of each kind for the fork-path part.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
    /// Orphan-kill latency: a parent with N workers is SIGKILLed, again and again; the time from
    /// the parent's exit to each worker's exit is read from the kernel's own trace (ftrace).
    ///
    /// Then a Python multiprocessing parent holding a large heap is SIGKILLed: the time from the
    /// SIGKILL to every worker gone (their pidfds), with guardian acting at the SIGKILL and, in
    /// rotating rounds, only at the parent's exit (its benchmarking switch), and without
    /// guardian, the workers SIGKILLed with their parent (the floor), side by side.
    Orphans {
        /// Trials.
        #[arg(long, default_value_t = 200)]
        trials: usize,
        /// Workers per parent.
        #[arg(long, default_value_t = 4)]
        workers: usize,
        /// Trials of the heavy parent, each way (in rounds of 5).
        #[arg(long, default_value_t = 30)]
        heavy_trials: usize,
        /// The heavy parent's heap, MiB.
        #[arg(long, default_value_t = 300)]
        heap_mib: usize,
    },
    /// Footprint: guardian's resident memory (by kind, and the ring buffer's share) and its CPU
    /// while idle, with the shipped policy in audit mode and no member running, then with one
    /// service of MEMBERS sleeping members.
    Footprint {
        /// Members of the large service.
        #[arg(long, default_value_t = 10_000)]
        members: usize,
        /// Seconds each idle CPU measurement lasts.
        #[arg(long, default_value_t = 10)]
        secs: u64,
        /// Idle CPU measurements in a row, for their spread.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
}

/// One line of the summary `cargo xtask bench` prints after running every benchmark.
struct Figure {
    what: String,
    value: String,
    goal: &'static str,
}

impl Figure {
    fn new(what: impl Into<String>, value: impl Into<String>, goal: &'static str) -> Self {
        Self {
            what: what.into(),
            value: value.into(),
            goal,
        }
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if !is_root() {
        bail!("benchmarks load eBPF programs: run them as root");
    }
    let bins = build(args.guardian)?;
    let Some(which) = args.which else {
        return all(&bins);
    };
    match which {
        Bench::Fork {
            forks,
            execs,
            rounds,
        } => fork(&bins, forks, execs, rounds),
        Bench::Orphans {
            trials,
            workers,
            heavy_trials,
            heap_mib,
        } => {
            let mut figures = orphans(&bins, trials, workers)?;
            figures.extend(heavy_parent(&bins, heavy_trials, workers, heap_mib)?);
            Ok(figures)
        }
        Bench::Budgets {
            trials,
            forks,
            rounds,
        } => budgets(&bins, trials, forks, rounds),
        Bench::Footprint {
            members,
            secs,
            rounds,
        } => footprint(&bins, members, secs, rounds),
    }
    .map(|_| ())
}

/// Every benchmark with short trial counts (a few minutes in all), then one summary table.
fn all(bins: &Bins) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut figures = fork(bins, 10_000, 1_500, 3)?;
    figures.extend(orphans(bins, 60, 4)?);
    figures.extend(heavy_parent(bins, 10, 4, 300)?);
    figures.extend(budgets(bins, 20, 5_000, 3)?);
    figures.extend(footprint(bins, 10_000, 10, 1)?);
    println!(
        "\nsummary ({:.0} s; load average at the end: {})",
        started.elapsed().as_secs_f64(),
        loadavg()
    );
    let w = figures.iter().map(|f| f.what.len()).max().unwrap_or(0);
    let v = figures.iter().map(|f| f.value.len()).max().unwrap_or(0);
    println!("  {:<w$}  {:<v$}  goal", "figure", "value");
    for f in &figures {
        println!("  {:<w$}  {:<v$}  {}", f.what, f.value, f.goal);
    }
    Ok(())
}

/// The binaries a benchmark runs.
struct Bins {
    guardian: PathBuf,
    workload: PathBuf,
}

/// Builds the release daemon (unless another one is given) and the workload helper.
fn build(guardian: Option<PathBuf>) -> anyhow::Result<Bins> {
    let guardian = match guardian {
        Some(g) => fs::canonicalize(&g).with_context(|| format!("{}", g.display()))?,
        None => crate::build_release()?,
    };
    util::run(cargo().args([
        "build",
        "--release",
        "-p",
        "guardian-tests",
        "--bin",
        "guardian-workload",
    ]))?;
    Ok(Bins {
        guardian,
        workload: workspace_root().join("target/release/guardian-workload"),
    })
}

/// Files and directories a benchmark writes (policies, records, links), removed when it ends,
/// however it ends (a `?` on the way included).
struct Scratch(Vec<PathBuf>);

impl Drop for Scratch {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = fs::remove_file(p).or_else(|_| fs::remove_dir_all(p));
        }
    }
}

/// A guardian process writing JSON records to a file.
pub struct Daemon {
    child: Child,
    pub out: PathBuf,
    /// Its control socket, when it runs a policy.
    socket: Option<PathBuf>,
}

impl Daemon {
    pub fn start(bin: &Path, args: &[&str], out: PathBuf) -> anyhow::Result<Self> {
        Self::start_env(bin, args, &[], out)
    }

    /// [`Daemon::start`] with environment variables set.
    pub fn start_env(
        bin: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        out: PathBuf,
    ) -> anyhow::Result<Self> {
        let file = fs::File::create(&out)?;
        let mut cmd = Command::new(bin);
        cmd.args(args).args(["--output", "json"]);
        let mut socket = None;
        cmd.envs(env.iter().copied());
        if args.contains(&"--policy") {
            // A control socket of its own, beside nobody else's.
            use std::os::unix::fs::DirBuilderExt as _;
            let dir = std::env::temp_dir().join(format!("guardian-bench-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::DirBuilder::new().mode(0o700).create(&dir)?;
            cmd.arg("--socket").arg(dir.join("control.sock"));
            socket = Some(dir.join("control.sock"));
        }
        let child = cmd
            .env("GUARDIAN_LOG", "warn")
            .stdout(file)
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting guardian")?;
        let d = Self { child, out, socket };
        if !wait_record(
            &d.out,
            "\"event\":\"ready\"",
            d.pid(),
            Duration::from_secs(30),
        )? {
            bail!("guardian did not become ready");
        }
        Ok(d)
    }

    /// CPU time its threads have used so far (schedstat), in ms.
    pub fn cpu_ms(&self) -> f64 {
        cpu_use(self.child.id()).map_or(0.0, |(ns, _, _)| ns as f64 / 1e6)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `guardian status --output json`, asked of this daemon.
    fn status(&self, bin: &Path) -> anyhow::Result<serde_json::Value> {
        let socket = self
            .socket
            .as_ref()
            .context("this guardian has no control socket")?;
        let out = Command::new(bin)
            .args(["status", "--output", "json", "--socket"])
            .arg(socket)
            .output()?;
        if !out.status.success() {
            bail!("guardian status: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// The members `guardian status` counts in the policy's first service.
    fn members(&self, bin: &Path) -> anyhow::Result<u64> {
        Ok(self.status(bin)?["services"][0]["members"]
            .as_u64()
            .unwrap_or(0))
    }

    /// Stops it (SIGTERM) and returns its records.
    pub fn stop(mut self) -> anyhow::Result<Vec<serde_json::Value>> {
        guardian_tests::kill(self.pid(), libc::SIGTERM);
        let status = self.child.wait()?;
        if !status.success() {
            bail!("guardian exited with {status}");
        }
        let f = fs::File::open(&self.out)?;
        BufReader::new(f)
            .lines()
            .map(|l| Ok(serde_json::from_str(&l?)?))
            .collect()
    }
}

impl Drop for Daemon {
    /// A benchmark that failed leaves no guardian attached (after `stop`, nothing to do), and no
    /// socket directory behind.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(dir) = self.socket.as_ref().and_then(|s| s.parent()) {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

/// The `sleepers` workload: ends when its stdin closes (when dropped).
struct Sleepers(Child);

impl Drop for Sleepers {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let _ = self.0.wait();
    }
}

/// Processes SIGKILLed and reaped when dropped.
struct KillOnDrop(Vec<Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

struct Round {
    rate: f64,
    parents: Vec<u32>,
}

/// Runs `workload ARGS` once per CPU at once, each doing `n` iterations; returns the combined
/// rate.
fn loop_round(workload: &Path, args: &[&str], n: u64, loops: usize) -> anyhow::Result<Round> {
    let start = Instant::now();
    let children: Vec<Child> = (0..loops)
        .map(|_| {
            Command::new(workload)
                .args(args)
                .stdout(Stdio::piped())
                .spawn()
        })
        .collect::<Result<_, _>>()?;
    let mut parents = Vec::new();
    for c in children {
        parents.push(c.id());
        let out = c.wait_with_output()?;
        if !out.status.success() {
            bail!("{} loop failed", args[0]);
        }
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(Round {
        rate: (n * loops as u64) as f64 / secs,
        parents,
    })
}

/// Runs one fork-loop per CPU at once; returns the combined fork rate.
/// `tag` marks the loops' command line (for a policy to match), or is empty.
fn fork_round(workload: &Path, forks: u64, loops: usize, tag: &str) -> anyhow::Result<Round> {
    loop_round(
        workload,
        &["fork-loop", &forks.to_string(), tag],
        forks,
        loops,
    )
}

fn median(v: &mut [f64]) -> f64 {
    sort(v);
    v[v.len() / 2]
}

/// `kernel.bpf_stats_enabled` on while it lives (the kernel then times every program run), and
/// back to what it was after.
struct BpfStats {
    was: String,
}

impl BpfStats {
    const SYSCTL: &'static str = "/proc/sys/kernel/bpf_stats_enabled";

    fn enable() -> anyhow::Result<Self> {
        let was = fs::read_to_string(Self::SYSCTL).context("kernel.bpf_stats_enabled")?;
        fs::write(Self::SYSCTL, "1").context("enabling kernel.bpf_stats_enabled")?;
        Ok(Self {
            was: was.trim().to_owned(),
        })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = fs::write(Self::SYSCTL, &self.was);
    }
}

/// The time (ns) the kernel spent in the eBPF programs process `pid` holds open, and their runs,
/// summed over its program fds (`run_time_ns` and `run_cnt` in their fdinfo).
fn bpf_run_time(pid: u32) -> (u64, u64) {
    let (mut ns, mut runs) = (0, 0);
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return (0, 0);
    };
    for fd in fds.flatten() {
        let Ok(info) = fs::read_to_string(fd.path()) else {
            continue;
        };
        let field = |k: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(k))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        if let (Some(t), Some(c)) = (field("run_time_ns:"), field("run_cnt:")) {
            ns += t;
            runs += c;
        }
    }
    (ns, runs)
}

/// The machine's load averages (1, 5, 15 min), as `uptime` prints them.
fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// What guardian runs while a loop is measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// `guardian trace`: every process followed.
    Trace,
    /// A policy whose one service is pinned to a uid no process runs as.
    Nothing,
    /// A policy whose one service is pinned to an executable nothing runs.
    ExePinned,
    /// `policies/analyticbot.toml`, in audit mode (as the package ships it).
    Shipped,
}

impl Mode {
    fn describe(self) -> &'static str {
        match self {
            Self::Trace => "guardian trace",
            Self::Nothing => "policy matching nothing, user-pinned",
            Self::ExePinned => "policy matching nothing, exe-pinned",
            Self::Shipped => "shipped policy (analyticbot, audit)",
        }
    }

    /// The daemon, and the policy file written for it (to remove once it is stopped).
    fn start(self, guardian: &Path, out: &Path) -> anyhow::Result<(Daemon, Scratch)> {
        let tag = format!("benchfork{}", std::process::id());
        let policy = std::env::temp_dir().join(format!("{tag}.toml"));
        let text = match self {
            Self::Trace => {
                let d = Daemon::start(guardian, &["trace"], out.to_path_buf())?;
                return Ok((d, Scratch(Vec::new())));
            }
            Self::Shipped => {
                let shipped = workspace_root().join("policies/analyticbot.toml");
                let path = shipped.to_str().context("policy path")?;
                let d = Daemon::start(
                    guardian,
                    &["--policy", path, "--dry-run"],
                    out.to_path_buf(),
                )?;
                return Ok((d, Scratch(Vec::new())));
            }
            Self::Nothing => format!(
                "[[service]]\nname = \"nothing\"\nmatch = {{ cmdline = \"{tag}\", user = 4242424 }}\n"
            ),
            Self::ExePinned => format!(
                "[[service]]\nname = \"nothing\"\nmatch = {{ cmdline = \"{tag}\", exe = \"/nonexistent/{tag}\" }}\n"
            ),
        };
        let scratch = Scratch(vec![policy.clone()]);
        fs::write(&policy, text)?;
        let d = Daemon::start(
            guardian,
            &["--policy", policy.to_str().context("policy path")?],
            out.to_path_buf(),
        )?;
        Ok((d, scratch))
    }
}

/// One loop measured with guardian in one mode, each round right after a baseline.
struct Case {
    what: &'static str,
    mode: Mode,
    ratios: Vec<f64>,
    rates: Vec<f64>,
    cpu_ms: Vec<f64>,
    /// Time in guardian's eBPF programs, ms.
    kernel_ms: Vec<f64>,
    /// Mean time of one program run, ns.
    run_ns: Vec<f64>,
    /// One minus guardian's whole CPU time (daemon and programs) over the loops' CPU time.
    costs: Vec<f64>,
}

fn fork(bins: &Bins, forks: u64, execs: u64, rounds: usize) -> anyhow::Result<Vec<Figure>> {
    let (guardian, workload) = (&bins.guardian, &bins.workload);
    let loops = thread::available_parallelism().map_or(2, |n| n.get());
    step(&format!(
        "bench fork: {rounds} rounds of {loops} loops x {forks} fork+exit+wait and x {execs} \
         fork+exec /bin/true+wait, each without and with guardian (in turn first)"
    ));
    let load_before = loadavg();
    let out = std::env::temp_dir().join("guardian-bench-fork.jsonl");
    let _scratch = Scratch(vec![out.clone()]);
    let (forks_arg, execs_arg) = (forks.to_string(), execs.to_string());
    let fork_args = ["fork-loop", forks_arg.as_str()];
    let exec_args = ["exec-loop", execs_arg.as_str(), "/bin/true"];
    let mut cases: Vec<Case> = [
        ("fork", Mode::Trace),
        ("fork", Mode::Nothing),
        ("exec", Mode::Nothing),
        ("exec", Mode::Shipped),
        ("exec", Mode::ExePinned),
    ]
    .into_iter()
    .map(|(what, mode)| Case {
        what,
        mode,
        ratios: Vec::new(),
        rates: Vec::new(),
        cpu_ms: Vec::new(),
        kernel_ms: Vec::new(),
        run_ns: Vec::new(),
        costs: Vec::new(),
    })
    .collect();
    let _stats = BpfStats::enable()?;
    let (mut base_fork, mut base_exec) = (Vec::new(), Vec::new());
    let (mut lost, mut seen, mut expected) = (0u64, 0u64, 0u64);
    // Warm-up (page cache, CPU frequency) not counted.
    loop_round(
        workload,
        &["fork-loop", &(forks / 10).to_string()],
        forks / 10,
        loops,
    )?;
    loop_round(
        workload,
        &["exec-loop", &(execs / 10).to_string()],
        execs / 10,
        loops,
    )?;
    for r in 0..rounds {
        for case in &mut cases {
            let (args, n): (&[&str], u64) = if case.what == "fork" {
                (&fork_args, forks)
            } else {
                (&exec_args, execs)
            };
            // Which of the two runs first alternates, so that a drift of the machine's speed
            // over a round favours neither.
            let baseline = || loop_round(workload, args, n, loops);
            let first = if r % 2 == 0 { Some(baseline()?) } else { None };
            let (d, _policy) = case.mode.start(guardian, &out)?;
            let cpu_before = d.cpu_ms();
            let (run_before, runs_before) = bpf_run_time(d.pid());
            let t = loop_round(workload, args, n, loops)?;
            let cpu_ms = d.cpu_ms() - cpu_before;
            let (run_after, runs_after) = bpf_run_time(d.pid());
            let kernel_ms = (run_after - run_before) as f64 / 1e6;
            let run_ns = (run_after - run_before) as f64 / (runs_after - runs_before).max(1) as f64;
            // The loops' CPU time: each of them ran on a CPU of its own for the whole round.
            let loops_ms = (n * loops as u64) as f64 / t.rate * 1e3 * loops as f64;
            let cost = 1.0 - (cpu_ms + kernel_ms) / loops_ms;
            let records = d.stop()?;
            let b = match first {
                Some(b) => b,
                None => baseline()?,
            };
            if case.what == "fork" {
                &mut base_fork
            } else {
                &mut base_exec
            }
            .push(b.rate);
            let round_lost = lost_count(&records);
            let mut note = format!("lost {round_lost}");
            if case.mode == Mode::Trace {
                let forks_seen = records
                    .iter()
                    .filter(|v| v["event"] == "fork" && t.parents.iter().any(|&p| v["ppid"] == p))
                    .count() as u64;
                note = format!("fork records {forks_seen}/{}, {note}", n * loops as u64);
                lost += round_lost;
                seen += forks_seen;
                expected += n * loops as u64;
            }
            println!(
                "round {r}: {} loop  baseline {:>7.0}/s  {:<38} {:>7.0}/s  ratio {:.3}  guardian CPU {:>5.0} ms + eBPF {kernel_ms:.1} ms ({run_ns:.0} ns/run), cost ratio {cost:.4}  {note}",
                case.what,
                b.rate,
                case.mode.describe(),
                t.rate,
                t.rate / b.rate,
                cpu_ms
            );
            case.ratios.push(t.rate / b.rate);
            case.rates.push(t.rate);
            case.cpu_ms.push(cpu_ms);
            case.kernel_ms.push(kernel_ms);
            case.run_ns.push(run_ns);
            case.costs.push(cost);
        }
    }
    println!(
        "\n{rounds} rounds, {loops} loops in parallel; load average {load_before} before, {} after",
        loadavg()
    );
    println!(
        "baseline: fork+exit+wait {:.0}/s, fork+exec /bin/true+wait {:.0}/s (medians)",
        median(&mut base_fork),
        median(&mut base_exec)
    );
    println!(
        "{:<5} {:<38} {:>9} {:>8} {:>16}  {:>12}  {:>9}  {:>8}  {:>10}",
        "loop",
        "with",
        "rate/s",
        "ratio",
        "(min-max)",
        "guardian CPU",
        "eBPF",
        "ns/run",
        "cost ratio"
    );
    let mut figures = Vec::new();
    for case in &mut cases {
        let (lo, hi) = case
            .ratios
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), &r| (lo.min(r), hi.max(r)));
        let ratio = median(&mut case.ratios);
        let cost = median(&mut case.costs);
        println!(
            "{:<5} {:<38} {:>9.0} {:>8.3} {:>16}  {:>9.0} ms  {:>6.1} ms  {:>8.0}  {cost:>10.4}",
            case.what,
            case.mode.describe(),
            median(&mut case.rates),
            ratio,
            format!("({lo:.3}-{hi:.3})"),
            median(&mut case.cpu_ms),
            median(&mut case.kernel_ms),
            median(&mut case.run_ns),
        );
        let what = if case.what == "fork" {
            "fork+exit rate"
        } else {
            "fork+exec rate"
        };
        figures.push(Figure::new(
            format!("{what}, {} / none", case.mode.describe()),
            format!("{ratio:.3} (cost ratio {cost:.4})"),
            ">= 0.98",
        ));
    }
    println!(
        "goal: every ratio >= 0.98; trace fork records {seen}/{expected}, lost {lost}\n\
         cost ratio: one minus guardian's CPU time (the daemon's, and its eBPF programs' from the \
         kernel's bpf_stats, which add two clock reads to each run) over the loops' CPU time: the \
         ratio guardian's own work allows, which the machine's other tenants do not move"
    );
    figures.push(Figure::new(
        "fork records lost by guardian trace",
        format!("{lost} of {expected}"),
        "0",
    ));
    Ok(figures)
}

/// An ftrace instance recording `sched_process_exit` and the SIGKILLs sent
/// (`signal_generate`) with boot-clock timestamps: the kernel's own account of when processes
/// were killed and died, independent of guardian.
struct ExitTrace {
    dir: PathBuf,
}

impl ExitTrace {
    fn start() -> anyhow::Result<Self> {
        let root = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.join("instances").is_dir())
            .context("tracefs is not mounted (guardian mounts it when it starts)")?;
        let dir = root.join("instances/guardian-bench");
        if !dir.exists() {
            fs::create_dir(&dir).context("creating an ftrace instance")?;
        }
        fs::write(dir.join("trace_clock"), "boot")?;
        fs::write(
            dir.join("events/sched/sched_process_exit/filter"),
            format!("comm != \"{STORM_COMM}\""),
        )?;
        fs::write(dir.join("events/sched/sched_process_exit/enable"), "1")?;
        fs::write(dir.join("events/signal/signal_generate/filter"), "sig == 9")?;
        fs::write(dir.join("events/signal/signal_generate/enable"), "1")?;
        fs::write(dir.join("tracing_on"), "1")?;
        Ok(Self { dir })
    }

    fn clear(&self) -> anyhow::Result<()> {
        Ok(fs::write(self.dir.join("trace"), "")?)
    }

    /// Exit times (boot seconds) of whole processes, by pid.
    fn exits(&self) -> anyhow::Result<std::collections::HashMap<u32, f64>> {
        self.events("sched_process_exit")
    }

    /// When each pid was first sent SIGKILL (boot seconds).
    fn kills(&self) -> anyhow::Result<std::collections::HashMap<u32, f64>> {
        self.events("signal_generate")
    }

    /// The first time (boot seconds) of the event `name` for each pid.
    fn events(&self, name: &str) -> anyhow::Result<std::collections::HashMap<u32, f64>> {
        let text = fs::read_to_string(self.dir.join("trace"))?;
        let mut out = std::collections::HashMap::new();
        let marker = format!(": {name}: ");
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((head, rest)) = line.split_once(&marker) else {
                continue;
            };
            let Some(ts) = head
                .split_whitespace()
                .last()
                .and_then(|t| t.parse::<f64>().ok())
            else {
                continue;
            };
            let field = |k: &str| {
                rest.split_whitespace()
                    .find_map(|kv| kv.strip_prefix(k))
                    .map(str::to_owned)
            };
            // Kernels without `group_dead` report every thread; these workloads are
            // single-threaded, so pid is the process.
            if field("group_dead=").is_some_and(|g| g == "0") {
                continue;
            }
            if let Some(pid) = field("pid=").and_then(|p| p.parse().ok()) {
                out.entry(pid).or_insert(ts);
            }
        }
        Ok(out)
    }
}

impl Drop for ExitTrace {
    fn drop(&mut self) {
        let _ = fs::write(self.dir.join("tracing_on"), "0");
        let _ = fs::write(self.dir.join("events/sched/sched_process_exit/enable"), "0");
        let _ = fs::write(self.dir.join("events/signal/signal_generate/enable"), "0");
        let _ = fs::remove_dir(&self.dir);
    }
}

/// Reads a workload's first line (`key=value ...`).
fn first_pairs(child: &mut Child) -> anyhow::Result<std::collections::HashMap<String, String>> {
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("the workload's stdout")?).read_line(&mut line)?;
    Ok(line
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect())
}

/// The comma-separated pids a workload printed under `key`.
fn pid_list(
    pairs: &std::collections::HashMap<String, String>,
    key: &str,
) -> anyhow::Result<Vec<u32>> {
    Ok(pairs
        .get(key)
        .with_context(|| format!("the workload printed no `{key}`: {pairs:?}"))?
        .split(',')
        .filter_map(|p| p.parse().ok())
        .collect())
}

/// SIGKILLs processes this benchmark started.
fn kill_all(pids: &[u32]) {
    for &p in pids {
        guardian_tests::kill(p, libc::SIGKILL);
    }
}

/// Waits (bounded) for a line of guardian's output file `out` holding `needle` and
/// `"pid":PID,`; reads only what was written since its last look.
fn wait_record(out: &Path, needle: &str, pid: u32, limit: Duration) -> anyhow::Result<bool> {
    use std::io::Read as _;
    let mut file = fs::File::open(out)?;
    let pid = format!("\"pid\":{pid},");
    let mut pending = Vec::new();
    let deadline = Instant::now() + limit;
    loop {
        file.read_to_end(&mut pending)?;
        // Whole lines only: the last one may still be being written.
        let whole = pending
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        if String::from_utf8_lossy(&pending[..whole])
            .lines()
            .any(|l| l.contains(needle) && l.contains(&pid))
        {
            return Ok(true);
        }
        pending.drain(..whole);
        if Instant::now() > deadline {
            return Ok(false);
        }
        thread::sleep(Duration::from_millis(2));
    }
}

/// Losses guardian reported in `records`.
fn lost_count(records: &[serde_json::Value]) -> u64 {
    records
        .iter()
        .filter(|v| v["event"] == "lost")
        .map(|v| v["count"].as_u64().unwrap_or(0))
        .sum()
}

/// guardian's own latency figure (ms) of each decision on `service` in `records`.
fn decision_ms(records: &[serde_json::Value], service: &str) -> Vec<f64> {
    records
        .iter()
        .filter(|v| v["event"] == "decision" && v["service"] == service)
        .filter_map(|v| v["latency_us"].as_f64())
        .map(|us| us / 1e3)
        .collect()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn sort(v: &mut [f64]) {
    v.sort_by(f64::total_cmp);
}

/// `p50 … ms   p99 … ms   max … ms` of sorted latencies.
fn spread(s: &[f64]) -> String {
    format!(
        "p50 {:.3} ms   p99 {:.3} ms   max {:.3} ms",
        percentile(s, 0.5),
        percentile(s, 0.99),
        s[s.len() - 1]
    )
}

/// The summary table's form.
fn p50_p99(s: &[f64]) -> String {
    format!(
        "p50 {:.2} ms, p99 {:.2} ms",
        percentile(s, 0.5),
        percentile(s, 0.99)
    )
}

/// Starts guardian with a policy written to a temporary file; returns the daemon, and the
/// policy and records files to remove once it is stopped (dropped after it).
fn start_with_policy(
    guardian: &Path,
    tag: &str,
    policy_text: &str,
) -> anyhow::Result<(Daemon, Scratch)> {
    let policy = std::env::temp_dir().join(format!("{tag}.toml"));
    let out = std::env::temp_dir().join(format!("{tag}.jsonl"));
    let scratch = Scratch(vec![policy.clone(), out.clone()]);
    fs::write(&policy, policy_text)?;
    let daemon = Daemon::start(guardian, &["--policy", policy.to_str().unwrap()], out)?;
    Ok((daemon, scratch))
}

/// One plain GET of `/metrics`; whether a reply came.
fn scrape(port: u16) -> bool {
    use std::io::{Read as _, Write as _};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut reply = Vec::new();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .is_ok()
        && s.read_to_end(&mut reply).is_ok()
        && reply.starts_with(b"HTTP/1.1 200")
}

/// What else the machine does during an orphan trial.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Load {
    Quiet,
    /// `/metrics` scraped 10 times a second.
    Scraped,
    /// One fork+exit loop per CPU, members of another service (their records reach guardian).
    Storm,
    /// The trials' service holds [`CROWD`] more sleeping members.
    Crowd,
}

impl Load {
    fn describe(self) -> String {
        match self {
            Self::Quiet => "quiet".into(),
            Self::Scraped => "/metrics scraped 10/s".into(),
            Self::Storm => "fork storm in another service".into(),
            Self::Crowd => format!("service of {CROWD} members"),
        }
    }
}

/// Members of the crowded service.
const CROWD: usize = 10_000;

/// The process name of the fork storm's loops (a link to the workload), which the exit trace
/// leaves out so that the storm's exits do not crowd the trials' out of its buffer.
const STORM_COMM: &str = "stormload";

fn orphans(bins: &Bins, trials: usize, workers: usize) -> anyhow::Result<Vec<Figure>> {
    let (guardian, workload) = (&bins.guardian, &bins.workload);
    let tag = format!("benchorphans{}", std::process::id());
    let storm_tag = format!("stormof{}", std::process::id());
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let policy = std::env::temp_dir().join(format!("{tag}.toml"));
    let link_dir = std::env::temp_dir().join(format!("{tag}.d"));
    let storm_link = link_dir.join(STORM_COMM);
    let out = std::env::temp_dir().join(format!("{tag}.jsonl"));
    let _scratch = Scratch(vec![policy.clone(), out.clone(), link_dir.clone()]);
    fs::create_dir_all(&link_dir)?;
    let _ = fs::remove_file(&storm_link);
    std::os::unix::fs::symlink(workload, &storm_link)?;
    // Pinned to the workload's executable, as a real service would be (to its account).
    fs::write(
        &policy,
        format!(
            "[[service]]\nname = \"bench\"\nmatch = {{ cmdline = \"{tag}\", exe = \"{exe}\" }}\norphans = \"kill\"\n\n\
             [[service]]\nname = \"storm\"\nmatch = {{ cmdline = \"{storm_tag}\", exe = \"{exe}\" }}\norphans = \"report\"\n",
            exe = workload.display()
        ),
    )?;
    let address = format!("127.0.0.1:{port}");
    let daemon = Daemon::start(
        guardian,
        &[
            "--policy",
            policy.to_str().unwrap(),
            "--metrics-address",
            &address,
        ],
        out.clone(),
    )?;
    let trace = ExitTrace::start()?;
    let loops = thread::available_parallelism().map_or(2, |n| n.get());
    let crowd_trials = (trials / 3).max(10);
    step(&format!(
        "bench orphans: {trials} trials of a parent with {workers} workers SIGKILLed, in turn \
         quiet, with /metrics scraped 10 times a second, and beside {loops} fork loops in \
         another service; then {crowd_trials} trials in a service of {CROWD} members"
    ));
    let scraping = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let scraper = {
        let (scraping, done) = (scraping.clone(), done.clone());
        thread::spawn(move || {
            let (mut ok, mut failed) = (0u64, 0u64);
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                if scraping.load(std::sync::atomic::Ordering::Relaxed) {
                    if scrape(port) {
                        ok += 1;
                    } else {
                        failed += 1;
                    }
                }
                thread::sleep(Duration::from_millis(100));
            }
            (ok, failed)
        })
    };
    let loads = [Load::Quiet, Load::Scraped, Load::Storm, Load::Crowd];
    let mut latencies: Vec<Vec<f64>> = vec![Vec::new(); loads.len()];
    let mut missing = 0usize;
    let mut crowd: Option<Sleepers> = None;
    let mut measure = || -> anyhow::Result<()> {
        // Trials alternate between the loads, so that each sees the same machine; the crowd
        // comes last (following it takes seconds).
        for t in 0..trials + crowd_trials {
            // Crowd is last in `loads`: the others take turns, then the crowd alone.
            let i = if t < trials {
                t % (loads.len() - 1)
            } else {
                loads.len() - 1
            };
            let load = loads[i];
            if load == Load::Crowd && crowd.is_none() {
                crowd = Some(start_sleepers(bins, &daemon, CROWD, &tag)?.0);
            }
            scraping.store(load == Load::Scraped, std::sync::atomic::Ordering::Relaxed);
            // Stopped right after the trial, or by a `?` on the way.
            let mut storm = KillOnDrop(Vec::new());
            if load == Load::Storm {
                for _ in 0..loops {
                    storm.0.push(
                        Command::new(&storm_link)
                            .args(["fork-loop", "1000000000", &storm_tag])
                            .stdout(Stdio::null())
                            .spawn()?,
                    );
                }
                // At full rate before the trial starts.
                thread::sleep(Duration::from_millis(50));
            }
            trace.clear()?;
            let trial = orphan_trial(workload, workers, &tag, &out, &trace);
            drop(storm);
            match trial? {
                Some(ms) => {
                    missing += workers - ms.len();
                    latencies[i].extend(ms);
                }
                None => missing += workers,
            }
            if (t + 1) % 50 == 0 {
                eprintln!("  {} trials done", t + 1);
            }
        }
        Ok(())
    };
    let measured = measure();
    drop(crowd);
    drop(trace);
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let (scrapes, failed_scrapes) = scraper.join().expect("the scraper thread");
    let records = daemon.stop()?;
    measured?;
    let mut own = decision_ms(&records, "bench");
    for l in &mut latencies {
        if l.is_empty() {
            bail!("no latency measured");
        }
        sort(l);
    }
    sort(&mut own);
    println!(
        "\norphan kill latency, parent exit -> worker exit (kernel trace clock), {} workers:",
        latencies.iter().map(Vec::len).sum::<usize>()
    );
    let quiet_p99 = percentile(&latencies[0], 0.99);
    let mut figures = Vec::new();
    for (load, l) in loads.iter().zip(&latencies) {
        println!(
            "  {:<30} {}   ({} workers; p99/quiet {:.2}; goal: p99 <= 2 ms)",
            load.describe(),
            spread(l),
            l.len(),
            percentile(l, 0.99) / quiet_p99
        );
        figures.push(Figure::new(
            format!("orphan kill, exit -> worker exit, {}", load.describe()),
            p50_p99(l),
            "p99 <= 2 ms",
        ));
    }
    println!("  {scrapes} scrapes answered, {failed_scrapes} failed");
    if !own.is_empty() {
        println!(
            "  guardian's own figure, the parent's SIGKILL (or exit) -> signal sent: p50 {:.3} ms   p99 {:.3} ms   ({} decisions)",
            percentile(&own, 0.5),
            percentile(&own, 0.99),
            own.len()
        );
    }
    if missing > 0 {
        println!("  {missing} worker exits missing from the kernel trace");
    }
    Ok(figures)
}

/// Starts `n` sleeping members of the policy's first service (a `sleepers` workload marked
/// `tag`) and waits until guardian follows them all; returns them and how long that took after
/// their parent said it had forked them.
fn start_sleepers(
    bins: &Bins,
    daemon: &Daemon,
    n: usize,
    tag: &str,
) -> anyhow::Result<(Sleepers, Duration)> {
    let before = daemon.members(&bins.guardian)?;
    let mut sleepers = Sleepers(
        Command::new(&bins.workload)
            .args(["sleepers", &n.to_string(), tag])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?,
    );
    let started = first_pairs(&mut sleepers.0);
    let t0 = Instant::now();
    // The root and its children.
    let want = before + n as u64 + 1;
    let followed = || -> anyhow::Result<()> {
        if !started?.contains_key("children") {
            bail!("the sleepers did not start");
        }
        loop {
            let have = daemon.members(&bins.guardian)?;
            if have >= want {
                return Ok(());
            }
            if t0.elapsed() > Duration::from_secs(60) {
                bail!("guardian follows {have} of {want} members after 60 s");
            }
            thread::sleep(Duration::from_millis(200));
        }
    };
    // On an error, `sleepers` dropped ends them.
    followed()?;
    Ok((sleepers, t0.elapsed()))
}

/// One trial: a parent with `workers` workers, SIGKILLed once guardian follows it; returns each
/// worker's exit after the parent's (ms, kernel trace clock), or `None` when the parent's exit
/// is not in the trace.
fn orphan_trial(
    workload: &Path,
    workers: usize,
    tag: &str,
    out: &Path,
    trace: &ExitTrace,
) -> anyhow::Result<Option<Vec<f64>>> {
    let mut child = Command::new(workload)
        .args(["tree", &workers.to_string(), "", tag])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let kids = pid_list(&first_pairs(&mut child)?, "children")?;
    let parent = child.id();
    // guardian must have seen the root before the parent dies.
    if !wait_record(out, "\"event\":\"root\"", parent, Duration::from_secs(10))? {
        kill_all(&[parent]);
        kill_all(&kids);
        let _ = child.wait();
        bail!("guardian never reported the root {parent}");
    }
    kill_all(&[parent]);
    let _ = child.wait();
    let deadline = Instant::now() + Duration::from_secs(5);
    while kids.iter().any(|&k| alive(k)) {
        if Instant::now() > deadline {
            kill_all(&kids);
            break;
        }
        thread::sleep(Duration::from_millis(1));
    }
    let exits = trace.exits()?;
    let Some(&died) = exits.get(&parent) else {
        return Ok(None);
    };
    Ok(Some(
        kids.iter()
            .filter_map(|k| exits.get(k).map(|&ts| (ts - died) * 1e3))
            .collect(),
    ))
}

/// Trials of the heavy parent per daemon start.
const HEAVY_ROUND: usize = 5;

/// A Python multiprocessing parent holding `heap_mib` MiB, with `workers` workers, SIGKILLed:
/// the time from the signal to every worker gone (each worker's pidfd readable), with guardian
/// acting at the SIGKILL (`early`), only at the parent's exit (`exit only`, the hidden
/// `GUARDIAN_BENCH_EXIT_PATH_ONLY`), and without guardian, the workers SIGKILLed with their
/// parent (the floor: what their own exits cost on this machine beside the parent's), and the
/// workers alone SIGKILLed, their parent left running (what their exits cost by themselves), in
/// rotating rounds.
fn heavy_parent(
    bins: &Bins,
    trials: usize,
    workers: usize,
    heap_mib: usize,
) -> anyhow::Result<Vec<Figure>> {
    let guardian = &bins.guardian;
    // The interpreter itself, not a launcher in PATH (a pyenv shim is a shell script): the
    // policy pins its resolved path, and the trial starts it directly.
    let launcher = guardian_tests::python().context("python3 is not installed")?;
    let found = Command::new(launcher)
        .args(["-c", "import sys; print(sys.executable)"])
        .output()?;
    let python = PathBuf::from(String::from_utf8(found.stdout)?.trim());
    let exe = fs::canonicalize(&python)?;
    let script = guardian_tests::script("mp_heavy_parent.py");
    let tag = format!("benchheavy{}", std::process::id());
    let policy = std::env::temp_dir().join(format!("{tag}.toml"));
    let out = std::env::temp_dir().join(format!("{tag}.jsonl"));
    let _scratch = Scratch(vec![policy.clone(), out.clone()]);
    fs::write(
        &policy,
        format!(
            "[[service]]\nname = \"bench\"\nmatch = {{ cmdline = \"{tag}\", exe = \"{}\" }}\norphans = \"kill\"\n",
            exe.display()
        ),
    )?;
    step(&format!(
        "bench orphans, heavy parent: {trials} trials each of four ways of a Python parent \
         holding {heap_mib} MiB with {workers} workers SIGKILLed; load {}",
        loadavg()
    ));
    // Each way's latencies: at the SIGKILL, at the exit only, the floor, the workers alone.
    let mut by_way: [Vec<f64>; 4] = Default::default();
    let mut parent_ms = Vec::new();
    // guardian's own figures (ways 0 and 1): from the SIGKILL or the parent's exit to the signal.
    let mut own: [Vec<f64>; 2] = Default::default();
    let mut missing = 0usize;
    let rounds = trials.div_ceil(HEAVY_ROUND);
    for round in 0..rounds {
        // Each round every way, the first one rotating, so that drift favours none.
        for i in 0..4 {
            let way = (round + i) % 4;
            let daemon = match way {
                0 => Some(&[][..]),
                1 => Some(&[("GUARDIAN_BENCH_EXIT_PATH_ONLY", "1")][..]),
                // The floors: no guardian, the workers SIGKILLed with their parent, or alone.
                _ => None,
            }
            .map(|env| {
                Daemon::start_env(
                    guardian,
                    &["--policy", policy.to_str().unwrap()],
                    env,
                    out.clone(),
                )
            })
            .transpose()?;
            for _ in 0..HEAVY_ROUND {
                let kill = match &daemon {
                    Some(_) => HeavyKill::ByGuardian(&out),
                    None if way == 2 => HeavyKill::WithParent,
                    None => HeavyKill::WorkersAlone,
                };
                let Some((all, parent)) =
                    heavy_trial(&python, &script, &tag, workers, heap_mib, kill)?
                else {
                    missing += 1;
                    continue;
                };
                by_way[way].push(all);
                parent_ms.extend(parent);
            }
            let Some(daemon) = daemon else { continue };
            // The policy's one service.
            own[way].extend(decision_ms(&daemon.stop()?, "bench"));
        }
        eprintln!("  {} trials done each way", (round + 1) * HEAVY_ROUND);
    }
    if by_way.iter().any(Vec::is_empty) {
        bail!("no latency measured");
    }
    for v in by_way.iter_mut().chain(&mut own).chain([&mut parent_ms]) {
        sort(v);
    }
    let [early, exit_only, direct, alone] = &by_way;
    let [own_early, own_exit_only] = &own;
    println!(
        "\nheavy parent ({heap_mib} MiB, {workers} workers) SIGKILLed -> every worker gone (pidfds), load {}:",
        loadavg()
    );
    for (what, l) in [
        ("acting at the SIGKILL", early),
        ("at the exit only", exit_only),
        ("floor, no guardian", direct),
        ("the workers alone", alone),
    ] {
        println!("  {what:<22} {}   ({} trials)", spread(l), l.len());
    }
    println!(
        "  (goal at the SIGKILL: p50 < 2 ms, p99 < 4 ms; the floor has the workers SIGKILLed by the benchmark with their parent; \
         the workers alone are SIGKILLed by the benchmark, their parent left running: what their own exits cost)"
    );
    println!(
        "  ratio at the SIGKILL / at the exit only: p50 {:.2}, p99 {:.2}; / the floor: p50 {:.2}, p99 {:.2}",
        percentile(early, 0.5) / percentile(exit_only, 0.5),
        percentile(early, 0.99) / percentile(exit_only, 0.99),
        percentile(early, 0.5) / percentile(direct, 0.5),
        percentile(early, 0.99) / percentile(direct, 0.99)
    );
    println!(
        "  the parent itself is gone p50 {:.3} ms after its SIGKILL (its memory freed)",
        percentile(&parent_ms, 0.5)
    );
    if !own_early.is_empty() && !own_exit_only.is_empty() {
        println!(
            "  guardian's own figure to the signal sent: from the SIGKILL p50 {:.3} ms p99 {:.3} ms; from the parent's exit (exit only) p50 {:.3} ms p99 {:.3} ms",
            percentile(own_early, 0.5),
            percentile(own_early, 0.99),
            percentile(own_exit_only, 0.5),
            percentile(own_exit_only, 0.99)
        );
    }
    if missing > 0 {
        println!("  {missing} trials where a worker outlived its parent by 5 s (not counted)");
    }
    let figure = |what: &str, l: &[f64], goal| {
        Figure::new(
            format!("heavy parent SIGKILLed -> workers gone, {what}"),
            p50_p99(l),
            goal,
        )
    };
    Ok(vec![
        figure("at the SIGKILL", early, "p50 < 2 ms, p99 < 4 ms"),
        figure("at the exit only", exit_only, ""),
        figure("floor, no guardian", direct, ""),
        figure("the workers alone, no guardian", alone, ""),
    ])
}

/// Who SIGKILLs whom in a heavy-parent trial.
#[derive(Clone, Copy)]
enum HeavyKill<'a> {
    /// The benchmark SIGKILLs the parent once guardian (writing to this file) reported it as a
    /// root; guardian kills the workers.
    ByGuardian(&'a Path),
    /// The benchmark SIGKILLs the parent and, at once, its workers.
    WithParent,
    /// The benchmark SIGKILLs the workers only; the parent lives on (until the trial ends).
    WorkersAlone,
}

/// One heavy-parent trial: (ms from the SIGKILL to every worker gone, ms to the parent gone when
/// it was killed), or `None` if a worker was still alive 5 s later.
fn heavy_trial(
    python: &Path,
    script: &Path,
    tag: &str,
    workers: usize,
    heap_mib: usize,
    kill: HeavyKill<'_>,
) -> anyhow::Result<Option<(f64, Option<f64>)>> {
    let mut child = Command::new(python)
        .arg(script)
        .args([&workers.to_string(), &heap_mib.to_string(), tag])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let kids = pid_list(&first_pairs(&mut child)?, "workers")?;
    let timed = time_sigkill(child.id(), &kids, kill);
    let _ = child.kill();
    let _ = child.wait();
    if !matches!(timed, Ok(Some(_))) {
        kill_all(&kids);
    }
    timed
}

/// SIGKILLs as `kill` says and times the workers' exits (pidfds), and the parent's when it was
/// killed: see [`heavy_trial`].
fn time_sigkill(
    parent: u32,
    kids: &[u32],
    kill: HeavyKill<'_>,
) -> anyhow::Result<Option<(f64, Option<f64>)>> {
    use std::os::fd::{FromRawFd, OwnedFd};
    let pidfd = |pid: u32| -> anyhow::Result<OwnedFd> {
        // SAFETY: pidfd_open returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) };
        if fd < 0 {
            bail!("pidfd_open({pid}): {}", std::io::Error::last_os_error());
        }
        // SAFETY: a descriptor we own from here on.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    };
    let fds: Vec<OwnedFd> = kids.iter().map(|&k| pidfd(k)).collect::<Result<_, _>>()?;
    let parent_fd = pidfd(parent)?;
    if let HeavyKill::ByGuardian(out) = kill {
        if !wait_record(out, "\"event\":\"root\"", parent, Duration::from_secs(10))? {
            bail!("guardian never reported the root {parent}");
        }
    }
    let sent = Instant::now();
    match kill {
        HeavyKill::ByGuardian(_) => kill_all(&[parent]),
        HeavyKill::WithParent => {
            kill_all(&[parent]);
            kill_all(kids);
        }
        HeavyKill::WorkersAlone => kill_all(kids),
    }
    let watch_parent = !matches!(kill, HeavyKill::WorkersAlone);
    let mut gone = Vec::new();
    let mut waiting: Vec<&OwnedFd> = fds.iter().collect();
    let mut parent_gone = None;
    while !waiting.is_empty() || (watch_parent && parent_gone.is_none()) {
        let left = Duration::from_secs(5).saturating_sub(sent.elapsed());
        if left.is_zero() {
            break;
        }
        let with_parent = watch_parent && parent_gone.is_none();
        let mut pfds: Vec<libc::pollfd> = waiting
            .iter()
            .copied()
            .chain(with_parent.then_some(&parent_fd))
            .map(|fd| libc::pollfd {
                fd: std::os::fd::AsRawFd::as_raw_fd(fd),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: polling valid descriptors.
        let n = unsafe {
            libc::poll(
                pfds.as_mut_ptr(),
                pfds.len() as libc::nfds_t,
                left.as_millis() as i32,
            )
        };
        let now = sent.elapsed().as_secs_f64() * 1e3;
        if n <= 0 {
            continue;
        }
        if with_parent && pfds[pfds.len() - 1].revents != 0 {
            parent_gone = Some(now);
        }
        let mut i = 0;
        waiting.retain(|_| {
            let ready = pfds[i].revents != 0;
            i += 1;
            if ready {
                gone.push(now);
            }
            !ready
        });
    }
    if !waiting.is_empty() || (watch_parent && parent_gone.is_none()) {
        return Ok(None);
    }
    let all = gone.iter().copied().fold(0.0, f64::max);
    Ok(Some((all, parent_gone)))
}

/// Blocks (bounded) until `fd` is readable.
fn wait_readable(fd: &std::os::fd::OwnedFd, limit: Duration) -> bool {
    use std::os::fd::AsRawFd;
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: polling one valid fd.
    unsafe { libc::poll(&mut pfd, 1, limit.as_millis() as i32) > 0 }
}

fn boot_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writing into a local timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Registers a v1 usage-threshold notification (`cgroup.event_control`) on a memory cgroup.
fn usage_threshold(dir: &Path, bytes: u64) -> anyhow::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd, FromRawFd};
    // SAFETY: eventfd returns a new fd or -1.
    let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if raw < 0 {
        bail!("eventfd: {}", std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh fd we own.
    let efd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
    let usage = fs::File::open(dir.join("memory.usage_in_bytes"))?;
    fs::write(
        dir.join("cgroup.event_control"),
        format!("{} {} {bytes}", efd.as_raw_fd(), usage.as_raw_fd()),
    )?;
    Ok(efd)
}

fn budgets(bins: &Bins, trials: usize, forks: u64, rounds: usize) -> anyhow::Result<Vec<Figure>> {
    let (guardian, workload) = (&bins.guardian, &bins.workload);
    let tag = format!("benchbudgets{}", std::process::id());
    let high_mb = 100u64;
    let (daemon, _scratch) = start_with_policy(
        guardian,
        &tag,
        &format!(
            "cgroup_parent = \"{tag}\"\n[[service]]\nname = \"mem\"\nmatch = {{ cmdline = \"{tag}mem\", exe = \"{exe}\" }}\norphans = \"report\"\nmemory_high = \"{high_mb}M\"\nmemory_max = \"400M\"\ncgroup = \"own\"\n\n[[service]]\nname = \"forks\"\nmatch = {{ cmdline = \"{tag}forks\", exe = \"{exe}\" }}\norphans = \"report\"\ntasks_max = 100000\ncgroup = \"inherit\"\n",
            exe = workload.display()
        ),
    )?;
    let trace = ExitTrace::start()?;
    // The service's cgroup as guardian creates it: one v2 directory, or v1 memory then pids.
    let dirs = service_cgroup_dirs(&tag, "mem");
    let (memcg, v2) = (dirs[0].clone(), dirs.len() == 1);
    step(&format!(
        "bench budgets: {trials} trials of a member crossing memory_high ({high_mb}M)"
    ));
    let (mut latencies_ms, mut signalled_ms) = (Vec::new(), Vec::new());
    let mem_tag = format!("{tag}mem");
    for _ in 0..trials {
        trace.clear()?;
        let mut child = Command::new(workload)
            .args(["hog-tree", "150", &mem_tag])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let hog = *pid_list(&first_pairs(&mut child)?, "hog")?
            .first()
            .context("the workload printed no hog")?;
        let parent = child.id();
        if !wait_record(
            &daemon.out,
            "\"action\":\"move\"",
            parent,
            Duration::from_secs(10),
        )? {
            bail!("guardian never moved the root {parent}");
        }
        // The kernel tells this process when usage goes over memory_high, as it tells guardian:
        // at the first page above it (thresholds are whole pages, signalled once reached).
        let crossed = if v2 {
            None
        } else {
            // SAFETY: sysconf has no preconditions.
            let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
            Some(usage_threshold(&memcg, (high_mb << 20) + page)?)
        };
        {
            use std::io::Write as _;
            let mut stdin = child.stdin.take().expect("stdin");
            stdin.write_all(b"go\n")?;
        }
        let t_cross = match &crossed {
            Some(fd) if wait_readable(fd, Duration::from_secs(10)) => boot_ns(),
            _ => boot_ns(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while alive(hog) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(1));
        }
        if let Some(&exit) = trace.exits()?.get(&hog) {
            latencies_ms.push(exit * 1e3 - t_cross as f64 / 1e6);
        }
        if let Some(&kill) = trace.kills()?.get(&hog) {
            signalled_ms.push(kill * 1e3 - t_cross as f64 / 1e6);
        }
        kill_all(&[parent]);
        let _ = child.wait();
        kill_all(&[hog]);
        // Let guardian notice the service is gone and remove its cgroup.
        let deadline = Instant::now() + Duration::from_secs(5);
        while memcg.exists() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
    }
    drop(trace);

    step(&format!(
        "bench budgets: fork path with inherit-mode task accounting, {rounds} rounds each"
    ));
    let loops = thread::available_parallelism().map_or(2, |n| n.get());
    let fork_tag = format!("{tag}forks");
    let (mut base, mut counted) = (Vec::new(), Vec::new());
    fork_round(workload, forks / 10, loops, "")?;
    for r in 0..rounds {
        let b = fork_round(workload, forks, loops, "")?;
        let c = fork_round(workload, forks, loops, &fork_tag)?;
        println!(
            "round {r}: not counted {:>8.0} forks/s   counted {:>8.0} forks/s",
            b.rate, c.rate
        );
        base.push(b.rate);
        counted.push(c.rate);
    }
    let records = daemon.stop()?;
    let kills = records
        .iter()
        .filter(|v| {
            v["event"] == "decision"
                && v["reason"] == "memory_high"
                && v["action"] == "kill"
                && v["performed"] == true
        })
        .count();
    let lost = lost_count(&records);
    if latencies_ms.is_empty() {
        bail!("no memory_high latency measured");
    }
    sort(&mut latencies_ms);
    println!(
        "\nmemory_high crossing -> victim exit ({}, {} trials, {kills} victims killed by guardian):",
        if v2 { "v2: from the go signal" } else { "v1 threshold notification" },
        latencies_ms.len()
    );
    println!("  {}", spread(&latencies_ms));
    if !signalled_ms.is_empty() {
        sort(&mut signalled_ms);
        println!(
            "  of which crossing -> SIGKILL sent: {}",
            spread(&signalled_ms)
        );
    }
    let (b, c) = (median(&mut base), median(&mut counted));
    println!("fork+exit rate, median of {rounds} rounds ({loops} loops in parallel):");
    println!("  not in any service          {b:>8.0} forks/s");
    println!("  counted by guardian (inherit) {c:>8.0} forks/s");
    println!(
        "  ratio                       {:>8.3}   lost events {lost}",
        c / b
    );
    Ok(vec![
        Figure::new(
            "memory_high crossing -> victim exit",
            p50_p99(&latencies_ms),
            "p99 <= 2 ms",
        ),
        Figure::new(
            "fork+exit rate, counted (inherit) / not",
            format!("{:.3}", c / b),
            ">= 0.98",
        ),
    ])
}

/// A process's resident memory (kB), from `/proc/PID/status` and `smaps`.
struct Resident {
    total: u64,
    anon: u64,
    file: u64,
    shmem: u64,
    /// Of `file`: BPF maps mapped into the process (the ring buffer, mapped twice over so that
    /// records can wrap).
    bpf_maps: u64,
}

impl Resident {
    fn of(pid: u32) -> anyhow::Result<Self> {
        let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
        let kb = |key: &str| -> anyhow::Result<u64> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .with_context(|| format!("no {key} in /proc/{pid}/status"))
        };
        let smaps = fs::read_to_string(format!("/proc/{pid}/smaps"))?;
        let (mut bpf_maps, mut in_map) = (0, false);
        for line in smaps.lines() {
            match line.split_once(':') {
                Some(("Rss", v)) if in_map => {
                    bpf_maps += v.trim().trim_end_matches("kB").trim().parse::<u64>()?
                }
                // A mapping's header line: an address range first.
                _ if line.split(' ').next().is_some_and(|r| r.contains('-')) => {
                    in_map = line.ends_with("anon_inode:bpf-map");
                }
                _ => {}
            }
        }
        Ok(Self {
            total: kb("VmRSS:")?,
            anon: kb("RssAnon:")?,
            file: kb("RssFile:")?,
            shmem: kb("RssShmem:")?,
            bpf_maps,
        })
    }

    fn mib(kb: u64) -> f64 {
        kb as f64 / 1024.0
    }

    fn describe(&self) -> String {
        format!(
            "{:.1} MiB (anon {:.1}, file {:.1} of which BPF maps {:.1}, shmem {:.1})",
            Self::mib(self.total),
            Self::mib(self.anon),
            Self::mib(self.file),
            Self::mib(self.bpf_maps),
            Self::mib(self.shmem)
        )
    }
}

/// CPU time (ns, from each thread's `schedstat`), CPU ticks (utime + stime from `stat`) and
/// sleeps (voluntary context switches) of a process so far.
fn cpu_use(pid: u32) -> anyhow::Result<(u64, u64, u64)> {
    let (mut ns, mut sleeps) = (0, 0);
    for task in fs::read_dir(format!("/proc/{pid}/task"))? {
        let dir = task?.path();
        // A thread that ended meanwhile counts no more.
        let Ok(schedstat) = fs::read_to_string(dir.join("schedstat")) else {
            continue;
        };
        ns += schedstat
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        sleeps += fs::read_to_string(dir.join("status"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which may hold spaces: utime and stime are the 14th
    // and 15th of the line, the 12th and 13th after `)`.
    let after = stat.rsplit_once(')').context("/proc/PID/stat")?.1;
    let f: Vec<u64> = after
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    Ok((ns, f[11] + f[12], sleeps))
}

/// Processes the host created since it booted (`/proc/stat`): what else ran meanwhile (every
/// exec on the host comes to guardian, and some wake it).
fn host_forks() -> u64 {
    fs::read_to_string("/proc/stat")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("processes "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Idle CPU of `pid` in `rounds` windows of `secs` each: percent of one core per window
/// (schedstat), with ticks and wakeups per second; returns the percents.
fn idle_cpu(pid: u32, secs: u64, rounds: usize) -> anyhow::Result<Vec<f64>> {
    let mut percents = Vec::new();
    for r in 0..rounds {
        let ((ns0, ticks0, sleeps0), forks0) = (cpu_use(pid)?, host_forks());
        let t0 = Instant::now();
        thread::sleep(Duration::from_secs(secs));
        let ((ns1, ticks1, sleeps1), forks1) = (cpu_use(pid)?, host_forks());
        let wall = t0.elapsed().as_secs_f64();
        let percent = (ns1 - ns0) as f64 / 1e9 / wall * 100.0;
        println!(
            "  idle round {r}: {percent:.4} % of a core over {wall:.1} s ({} CPU ticks), {:.1} wakeups/s; the host created {:.1} processes/s meanwhile",
            ticks1 - ticks0,
            (sleeps1 - sleeps0) as f64 / wall,
            (forks1 - forks0) as f64 / wall
        );
        percents.push(percent);
    }
    Ok(percents)
}

/// Resident memory and idle CPU with the shipped policy in audit mode and no member running,
/// then resident memory with one service of `members` sleeping members.
fn footprint(bins: &Bins, members: usize, secs: u64, rounds: usize) -> anyhow::Result<Vec<Figure>> {
    // Whatever start-up left to settle (the first checks, the first metrics) has run by then.
    const SETTLE: Duration = Duration::from_secs(3);
    let shipped = workspace_root().join("policies/analyticbot.toml");
    step(&format!(
        "bench footprint: {}, audit mode, no member running; {rounds} x {secs} s idle",
        shipped.display()
    ));
    let out = std::env::temp_dir().join(format!(
        "guardian-bench-footprint-{}.jsonl",
        std::process::id()
    ));
    let _scratch = Scratch(vec![out.clone()]);
    let daemon = Daemon::start(
        &bins.guardian,
        &[
            "--policy",
            shipped.to_str().context("policy path")?,
            "--dry-run",
        ],
        out.clone(),
    )?;
    thread::sleep(SETTLE);
    let idle = Resident::of(daemon.pid())?;
    println!("  resident {}", idle.describe());
    let mut percents = idle_cpu(daemon.pid(), secs, rounds)?;
    daemon.stop()?;
    let (lo, hi) = (
        percents.iter().copied().fold(f64::INFINITY, f64::min),
        percents.iter().copied().fold(0.0, f64::max),
    );
    let cpu = median(&mut percents);

    step(&format!(
        "bench footprint: one service of {members} sleeping members"
    ));
    let tag = format!("benchfootprint{}", std::process::id());
    let (daemon, _many_scratch) = start_with_policy(
        &bins.guardian,
        &tag,
        &format!(
            "[[service]]\nname = \"many\"\nmatch = {{ cmdline = \"{tag}\", exe = \"{}\" }}\norphans = \"report\"\n",
            bins.workload.display()
        ),
    )?;
    let measured = start_sleepers(bins, &daemon, members, &tag).and_then(|(sleepers, followed)| {
        thread::sleep(SETTLE);
        let resident = Resident::of(daemon.pid());
        drop(sleepers);
        Ok((resident?, followed))
    });
    daemon.stop()?;
    let (many, followed) = measured?;
    println!(
        "  resident {} ({members} members followed {:.1} s after their parent said it forked them)",
        many.describe(),
        followed.as_secs_f64()
    );
    println!(
        "\nfootprint: idle {:.1} MiB, {members} members {:.1} MiB; idle CPU {cpu:.4} % of a core (median of {rounds}, {lo:.4} to {hi:.4})",
        Resident::mib(idle.total),
        Resident::mib(many.total)
    );
    Ok(vec![
        Figure::new(
            "resident memory, shipped policy, idle",
            format!("{:.1} MiB", Resident::mib(idle.total)),
            "",
        ),
        Figure::new(
            format!("resident memory, {members} members"),
            format!("{:.1} MiB", Resident::mib(many.total)),
            "<= 16 MiB",
        ),
        Figure::new("CPU while idle", format!("{cpu:.3} % of a core"), "< 0.1 %"),
    ])
}
