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

use crate::util::{self, cargo, is_root, step, workspace_root};

#[derive(Debug, Subcommand)]
pub enum Bench {
    /// Fork+exit rate without and with `guardian trace` attached, alternating, at the machine's
    /// full fork rate (one forking loop per CPU); prints both rates, their ratio and any loss.
    Fork {
        /// Forks per loop per round.
        #[arg(long, default_value_t = 10_000)]
        forks: u64,
        /// Rounds of each kind.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
}

pub fn run(which: Bench) -> anyhow::Result<()> {
    if !is_root() {
        bail!("benchmarks load eBPF programs: run them as root");
    }
    match which {
        Bench::Fork { forks, rounds } => fork(forks, rounds),
    }
}

/// Builds the release daemon and workload helper; returns (guardian, workload).
fn build() -> anyhow::Result<(PathBuf, PathBuf)> {
    let guardian = crate::build_release()?;
    util::run(cargo().args([
        "build",
        "--release",
        "-p",
        "guardian-tests",
        "--bin",
        "guardian-workload",
    ]))?;
    Ok((
        guardian,
        workspace_root().join("target/release/guardian-workload"),
    ))
}

/// A guardian process writing JSON records to a file.
pub struct Daemon {
    child: Child,
    pub out: PathBuf,
}

impl Daemon {
    pub fn start(bin: &Path, args: &[&str], out: PathBuf) -> anyhow::Result<Self> {
        let file = fs::File::create(&out)?;
        let child = Command::new(bin)
            .args(args)
            .args(["--output", "json"])
            .env("GUARDIAN_LOG", "warn")
            .stdout(file)
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting guardian")?;
        let d = Self { child, out };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !fs::read_to_string(&d.out)?.contains("\"event\":\"ready\"") {
            if Instant::now() > deadline {
                bail!("guardian did not become ready");
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(d)
    }

    /// Stops it (SIGTERM) and returns its records.
    pub fn stop(mut self) -> anyhow::Result<Vec<serde_json::Value>> {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
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

struct Round {
    rate: f64,
    parents: Vec<u32>,
}

/// Runs one fork-loop per CPU at once; returns the combined fork rate.
fn fork_round(workload: &Path, forks: u64, loops: usize) -> anyhow::Result<Round> {
    let start = Instant::now();
    let children: Vec<Child> = (0..loops)
        .map(|_| {
            Command::new(workload)
                .args(["fork-loop", &forks.to_string()])
                .stdout(Stdio::piped())
                .spawn()
        })
        .collect::<Result<_, _>>()?;
    let mut parents = Vec::new();
    for c in children {
        parents.push(c.id());
        let out = c.wait_with_output()?;
        if !out.status.success() {
            bail!("fork loop failed");
        }
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(Round {
        rate: (forks * loops as u64) as f64 / secs,
        parents,
    })
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn fork(forks: u64, rounds: usize) -> anyhow::Result<()> {
    let (guardian, workload) = build()?;
    let loops = thread::available_parallelism().map_or(2, |n| n.get());
    step(&format!(
        "bench fork: {rounds} rounds each of {loops} loops x {forks} fork+exit+wait, alternating"
    ));
    let out = std::env::temp_dir().join("guardian-bench-fork.jsonl");
    let (mut base, mut traced) = (Vec::new(), Vec::new());
    let (mut lost, mut seen, mut expected) = (0u64, 0u64, 0u64);
    // Warm-up (page cache, CPU frequency) not counted.
    fork_round(&workload, forks / 10, loops)?;
    for r in 0..rounds {
        let b = fork_round(&workload, forks, loops)?;
        println!("round {r}: baseline {:>8.0} forks/s", b.rate);
        base.push(b.rate);

        let d = Daemon::start(&guardian, &["trace"], out.clone())?;
        let t = fork_round(&workload, forks, loops)?;
        let records = d.stop()?;
        let forks_seen = records
            .iter()
            .filter(|v| v["event"] == "fork" && t.parents.iter().any(|&p| v["ppid"] == p))
            .count() as u64;
        let round_lost: u64 = records
            .iter()
            .filter(|v| v["event"] == "lost")
            .map(|v| v["count"].as_u64().unwrap_or(0))
            .sum();
        println!(
            "round {r}: traced   {:>8.0} forks/s  (fork records {forks_seen}/{}, lost {round_lost})",
            t.rate,
            forks * loops as u64
        );
        traced.push(t.rate);
        lost += round_lost;
        seen += forks_seen;
        expected += forks * loops as u64;
    }
    let _ = fs::remove_file(&out);
    let (b, t) = (median(&mut base), median(&mut traced));
    println!("\nfork+exit rate, median of {rounds} rounds ({loops} loops in parallel):");
    println!("  baseline            {b:>8.0} forks/s");
    println!("  with guardian trace {t:>8.0} forks/s");
    println!("  ratio               {:>8.3}  (goal >= 0.98)", t / b);
    println!("  fork records        {seen}/{expected}  lost {lost}");
    Ok(())
}
