//! What the daemon tells about itself: the metrics' gauges, systemd's status line, and the
//! answer to `guardian status`.

use serde_json::json;

use super::{mode_of, Daemon};
use crate::{monitor::State, serve::metrics::ServiceGauges};

impl Daemon {
    /// Each service's figures now.
    fn gauges(&self, state: &State) -> Vec<ServiceGauges> {
        let mut all: Vec<ServiceGauges> = self
            .policy
            .services
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let count = state.table.service_count(i);
                ServiceGauges {
                    name: s.name.clone(),
                    members: count.processes,
                    tasks: count.tasks,
                    memory: self.budgets.memory_used(i),
                    tasks_max: s.budgets.tasks_max,
                    memory_max: s.budgets.memory_max,
                    memory_high: s.budgets.memory_high,
                    ..ServiceGauges::default()
                }
            })
            .collect();
        for p in state.table.members() {
            if let Some(g) = p.service.and_then(|svc| all.get_mut(svc)) {
                g.roots += u64::from(p.root);
                g.orphans += u64::from(p.orphan);
            }
        }
        all
    }

    /// Brings the metrics' gauges and systemd's status line up to date.
    pub(super) fn refresh(&mut self, state: &State) {
        let gauges = self.gauges(state);
        self.metrics.services(&gauges);
        let sum = |f: fn(&ServiceGauges) -> u64| gauges.iter().map(f).sum::<u64>();
        let decisions: u64 = self.stats.decisions.values().flat_map(|a| a.values()).sum();
        let line = format!(
            "{}: {} service(s), {} member(s), {} orphan(s) alive, {} decision(s), {} event(s) lost",
            mode_of(&self.policy, self.dry_run).as_str(),
            gauges.len(),
            sum(|g| g.members),
            sum(|g| g.orphans),
            decisions,
            self.stats.lost,
        );
        if line != self.last_status {
            self.notifier.status(&line);
            self.last_status = line;
        }
    }

    /// `guardian status`.
    pub(super) fn status(&self, state: &State) -> serde_json::Value {
        let services: Vec<serde_json::Value> = self
            .gauges(state)
            .into_iter()
            .zip(&self.policy.services)
            .map(|(g, s)| {
                json!({
                    "name": g.name,
                    "orphans": s.orphans.as_str(),
                    "cgroup": s.cgroup.as_str(),
                    "roots": g.roots,
                    "members": g.members,
                    "orphans_alive": g.orphans,
                    "tasks": g.tasks,
                    "tasks_max": g.tasks_max,
                    "memory_bytes": g.memory,
                    "memory_high": g.memory_high,
                    "memory_max": g.memory_max,
                    // Percent of one CPU, as the policy says it.
                    "cpu_max_percent": s.budgets.cpu_max.map(|us| us as f64 / 1000.0),
                    "decisions": self.stats.decisions.get(&s.name).cloned().unwrap_or_default(),
                })
            })
            .collect();
        json!({
            "pid": self.self_pid,
            "version": env!("CARGO_PKG_VERSION"),
            "mode": mode_of(&self.policy, self.dry_run).as_str(),
            "uptime_s": self.stats.started.elapsed().as_secs(),
            "policy": self.policy.path,
            "policy_loaded": self.stats.loaded,
            "reloads": { "ok": self.stats.reloads_ok, "error": self.stats.reloads_failed },
            "events_lost": self.stats.lost,
            "exec_filter": if state.probes.exec_filter_on() { "on" } else { "off" },
            "exec_records": state.table.stats.execs,
            "execs_filtered": state.probes.kernel_stats().exec_filtered,
            "processes_followed": state.table.len_alive(),
            "services": services,
        })
    }
}

/// `guardian status` for a terminal: the daemon's line, then one line per service.
pub fn render_status(v: &serde_json::Value) -> String {
    let num = |v: &serde_json::Value| v.as_u64().map_or("-".to_owned(), |n| n.to_string());
    let mib = |v: &serde_json::Value| {
        v.as_u64()
            .map_or("-".to_owned(), |b| format!("{}M", b >> 20))
    };
    let mut s = format!(
        "guardian {} pid {}, {} mode, up {}s; policy {} (loaded {}); reloads {} ok, {} refused; \
         {} event(s) lost; {} process(es) followed; exec filter {} ({} exec(s) reported, {} \
         kept in the kernel)\n",
        v["version"].as_str().unwrap_or("?"),
        num(&v["pid"]),
        v["mode"].as_str().unwrap_or("?"),
        num(&v["uptime_s"]),
        v["policy"].as_str().unwrap_or("?"),
        v["policy_loaded"].as_str().unwrap_or("?"),
        num(&v["reloads"]["ok"]),
        num(&v["reloads"]["error"]),
        num(&v["events_lost"]),
        num(&v["processes_followed"]),
        v["exec_filter"].as_str().unwrap_or("?"),
        num(&v["exec_records"]),
        num(&v["execs_filtered"]),
    );
    s.push_str(&format!(
        "{:<24} {:<9} {:>5} {:>7} {:>7} {:>11} {:>17}  {}\n",
        "SERVICE",
        "ORPHANS",
        "ROOTS",
        "MEMBERS",
        "ORPHANS",
        "TASKS/MAX",
        "MEMORY/HIGH/MAX",
        "DECISIONS"
    ));
    for svc in v["services"].as_array().into_iter().flatten() {
        let decisions: Vec<String> = svc["decisions"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(action, n)| format!("{action} {}", num(n)))
            .collect();
        s.push_str(&format!(
            "{:<24} {:<9} {:>5} {:>7} {:>7} {:>11} {:>17}  {}\n",
            svc["name"].as_str().unwrap_or("?"),
            svc["orphans"].as_str().unwrap_or("?"),
            num(&svc["roots"]),
            num(&svc["members"]),
            num(&svc["orphans_alive"]),
            format!("{}/{}", num(&svc["tasks"]), num(&svc["tasks_max"])),
            format!(
                "{}/{}/{}",
                mib(&svc["memory_bytes"]),
                mib(&svc["memory_high"]),
                mib(&svc["memory_max"])
            ),
            if decisions.is_empty() {
                "-".to_owned()
            } else {
                decisions.join(", ")
            },
        ));
    }
    s
}
