//! `guardian trace`: the live stream of fork, exec, exit, reparent and loss records.

use crate::{
    kernel::loader::LoadOptions,
    monitor::{Handler, Monitor, Notice, State},
    output::{Output, OutputFormat, Proc, Record},
};

struct Printer {
    out: Output,
}

fn proc_of(state: &State, pid: u32) -> Proc {
    match state.table.get(pid) {
        Some(p) => Proc {
            pid,
            ppid: p.parent,
            comm: p.comm.clone(),
        },
        None => Proc {
            pid,
            ppid: 0,
            comm: "".into(),
        },
    }
}

impl Handler for Printer {
    fn notice(&mut self, state: &mut State, notice: &Notice) {
        let clock = state.clock;
        let record = match *notice {
            Notice::Fork { pid, ts_ns } => Record::Fork {
                ts: clock.ts(ts_ns),
                proc: proc_of(state, pid),
            },
            Notice::Exec { pid, ts_ns } => {
                let p = state.table.get(pid);
                Record::Exec {
                    ts: clock.ts(ts_ns),
                    proc: proc_of(state, pid),
                    exe: p
                        .and_then(|p| p.exe.as_deref())
                        .unwrap_or_default()
                        .to_owned(),
                    cmdline: p.map(|p| p.cmdline()).unwrap_or_default(),
                    argv: p.map(|p| p.argv.to_vec()).unwrap_or_default(),
                }
            }
            Notice::Exit { pid, ts_ns, status } => {
                Record::exit(clock.ts(ts_ns), proc_of(state, pid), status)
            }
            Notice::Orphaned { .. } | Notice::Thread { .. } | Notice::Doomed { .. } => return,
            Notice::Reparent {
                pid,
                old_parent,
                new_parent,
                ts_ns,
            } => Record::Reparent {
                ts: clock.ts(ts_ns),
                proc: proc_of(state, pid),
                old_parent,
                new_parent,
            },
            Notice::Lost {
                reason,
                count,
                total,
            } => Record::Lost {
                ts: clock.now(),
                reason,
                count,
                total,
            },
        };
        self.out.emit(&record);
    }
}

pub async fn run(format: OutputFormat) -> anyhow::Result<()> {
    let mut monitor = Monitor::start(LoadOptions {
        track_all: true,
        track_threads: false,
    })?;
    let mut printer = Printer {
        out: Output::new(format),
    };
    let state = &monitor.state;
    printer.out.emit(&Record::Ready {
        ts: state.clock.now(),
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION"),
        group_dead: state.probes.group_dead.as_str(),
        processes: state.table.len_alive(),
    });
    monitor.run(&mut printer).await;
    printer.out.close(std::time::Duration::from_secs(2));
    Ok(())
}
