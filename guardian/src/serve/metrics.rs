//! Prometheus metrics: the registry the daemon updates, and the HTTP server that serves it.
//!
//! The daemon's loop only touches atomics (counters, gauges, the histogram); encoding and HTTP
//! run on the serving thread (see [`crate::serve`]), so a scrape never delays a decision.
//! Labels are bounded: service, action, reason, result; never a pid or a command name.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use http_body_util::Full;
use hyper::{body::Bytes, Request, Response, StatusCode};
use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
        info::Info,
    },
    registry::Registry,
};
use tracing::{debug, warn};

use crate::{output::Record, procs};

/// The OpenMetrics text format, which Prometheus reads.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// `/healthz` fails when the event loop has not ticked for this long (ns): a stuck loop.
const STALE_NS: u64 = 5_000_000_000;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    service: String,
    action: String,
    reason: String,
    performed: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

/// One service's figures, as the daemon last saw them.
#[derive(Clone, Debug, Default)]
pub struct ServiceGauges {
    pub name: String,
    pub members: u64,
    pub roots: u64,
    pub orphans: u64,
    pub tasks: u64,
    /// Where guardian measures it (a memory budget, or a cgroup of its own).
    pub memory: Option<u64>,
    pub tasks_max: Option<u64>,
    pub memory_max: Option<u64>,
    pub memory_high: Option<u64>,
}

pub struct Metrics {
    registry: Registry,
    members: Family<ServiceLabels, Gauge>,
    roots: Family<ServiceLabels, Gauge>,
    orphans: Family<ServiceLabels, Gauge>,
    tasks: Family<ServiceLabels, Gauge>,
    memory: Family<ServiceLabels, Gauge>,
    tasks_max: Family<ServiceLabels, Gauge>,
    memory_max: Family<ServiceLabels, Gauge>,
    memory_high: Family<ServiceLabels, Gauge>,
    decisions: Family<DecisionLabels, Counter>,
    orphan_latency: Histogram,
    lost: Counter,
    reloads: Family<ResultLabels, Counter>,
    /// The services whose gauges are published (a reload may remove some).
    published: Mutex<BTreeSet<String>>,
    /// When the event loop last ticked (boot ns), for `/healthz`.
    heartbeat_ns: AtomicU64,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        registry.register(
            "guardian_build",
            "guardian's version",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        let m = Self {
            members: Family::default(),
            roots: Family::default(),
            orphans: Family::default(),
            tasks: Family::default(),
            memory: Family::default(),
            tasks_max: Family::default(),
            memory_max: Family::default(),
            memory_high: Family::default(),
            decisions: Family::default(),
            // 100 µs to about 6.5 s.
            orphan_latency: Histogram::new(exponential_buckets(0.000_1, 2.0, 17)),
            lost: Counter::default(),
            reloads: Family::default(),
            published: Mutex::new(BTreeSet::new()),
            heartbeat_ns: AtomicU64::new(procs::boottime_ns()),
            registry: Registry::default(),
        };
        let gauges: [(&str, &str, &Family<ServiceLabels, Gauge>); 8] = [
            ("guardian_service_members", "Live members of the service (processes)", &m.members),
            ("guardian_service_roots", "Live roots of the service", &m.roots),
            (
                "guardian_service_orphans",
                "Orphans of the service alive now (in audit mode or with orphans = \"report\" they stay)",
                &m.orphans,
            ),
            (
                "guardian_service_tasks",
                "Tasks of the service: processes, plus threads where guardian counts them (tasks_max)",
                &m.tasks,
            ),
            (
                "guardian_service_memory_bytes",
                "Memory of the service as guardian last measured it (services with a memory budget)",
                &m.memory,
            ),
            ("guardian_service_tasks_max", "The service's tasks_max", &m.tasks_max),
            (
                "guardian_service_memory_max_bytes",
                "The service's memory_max",
                &m.memory_max,
            ),
            (
                "guardian_service_memory_high_bytes",
                "The service's memory_high",
                &m.memory_high,
            ),
        ];
        for (name, help, family) in gauges {
            registry.register(name, help, family.clone());
        }
        registry.register(
            "guardian_decisions",
            "Decisions taken (performed=false: audit mode, reports, refusals, failures)",
            m.decisions.clone(),
        );
        registry.register(
            "guardian_orphan_kill_latency_seconds",
            "From a parent's death (kernel time) to the signal sent to its orphan",
            m.orphan_latency.clone(),
        );
        registry.register(
            "guardian_events_lost",
            "Kernel events lost or not decodable, and members the kernel could not follow",
            m.lost.clone(),
        );
        registry.register(
            "guardian_policy_reloads",
            "Policy reloads by result (ok, error)",
            m.reloads.clone(),
        );
        Self { registry, ..m }
    }

    /// Counts a decision record (other records are ignored).
    pub fn record(&self, r: &Record) {
        if let Record::Decision {
            action,
            performed,
            reason,
            service,
            latency_us,
            ..
        } = r
        {
            self.decisions
                .get_or_create(&DecisionLabels {
                    service: service.clone(),
                    action: (*action).to_owned(),
                    reason: (*reason).to_owned(),
                    performed: performed.to_string(),
                })
                .inc();
            if *performed && *reason == "orphan" {
                if let Some(us) = latency_us {
                    self.orphan_latency.observe(*us as f64 / 1e6);
                }
            }
        }
    }

    pub fn lost(&self, count: u64) {
        self.lost.inc_by(count);
    }

    pub fn reload(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.reloads
            .get_or_create(&ResultLabels {
                result: result.to_owned(),
            })
            .inc();
    }

    /// Publishes every service's figures; services no longer in the policy are withdrawn.
    pub fn services(&self, services: &[ServiceGauges]) {
        let mut published = self.published.lock().unwrap_or_else(|e| e.into_inner());
        let now: BTreeSet<String> = services.iter().map(|s| s.name.clone()).collect();
        for gone in published.difference(&now) {
            let l = ServiceLabels {
                service: gone.clone(),
            };
            for family in self.service_families() {
                family.remove(&l);
            }
        }
        *published = now;
        drop(published);
        for s in services {
            let l = ServiceLabels {
                service: s.name.clone(),
            };
            let set = |f: &Family<ServiceLabels, Gauge>, v: Option<u64>| match v {
                Some(v) => {
                    f.get_or_create(&l)
                        .set(i64::try_from(v).unwrap_or(i64::MAX));
                }
                None => {
                    f.remove(&l);
                }
            };
            set(&self.members, Some(s.members));
            set(&self.roots, Some(s.roots));
            set(&self.orphans, Some(s.orphans));
            set(&self.tasks, Some(s.tasks));
            set(&self.memory, s.memory);
            set(&self.tasks_max, s.tasks_max);
            set(&self.memory_max, s.memory_max);
            set(&self.memory_high, s.memory_high);
        }
    }

    fn service_families(&self) -> [&Family<ServiceLabels, Gauge>; 8] {
        [
            &self.members,
            &self.roots,
            &self.orphans,
            &self.tasks,
            &self.memory,
            &self.tasks_max,
            &self.memory_max,
            &self.memory_high,
        ]
    }

    /// The event loop is alive.
    pub fn heartbeat(&self) {
        self.heartbeat_ns
            .store(procs::boottime_ns(), Ordering::Relaxed);
    }

    fn healthy(&self) -> bool {
        procs::boottime_ns().saturating_sub(self.heartbeat_ns.load(Ordering::Relaxed)) < STALE_NS
    }

    pub fn encode(&self) -> String {
        let mut s = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut s, &self.registry);
        s
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Serves `/metrics` and `/healthz` on an already bound listener until the process ends.
pub async fn serve(listener: std::net::TcpListener, metrics: Arc<Metrics>) {
    let listener = match listener
        .set_nonblocking(true)
        .and_then(|()| tokio::net::TcpListener::from_std(listener))
    {
        Ok(l) => l,
        Err(e) => {
            warn!("metrics listener unusable, no metrics served: {e}");
            return;
        }
    };
    // Bounded: a client that opens connections and sends nothing cannot exhaust guardian's
    // file descriptors (signals need them).
    let slots = Arc::new(tokio::sync::Semaphore::new(CONNECTIONS));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                debug!("metrics accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue; // dropped: too many open connections
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let metrics = metrics.clone();
                async move { Ok::<_, std::convert::Infallible>(respond(&req, &metrics)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .header_read_timeout(std::time::Duration::from_secs(5))
                .timer(hyper_util::rt::TokioTimer::new())
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                debug!(%peer, "metrics connection: {e}");
            }
            drop(slot);
        });
    }
}

/// At most this many metrics connections at once.
const CONNECTIONS: usize = 16;

fn respond(req: &Request<hyper::body::Incoming>, metrics: &Metrics) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, content_type: &str, body: String| {
        Response::builder()
            .status(status)
            .header(hyper::header::CONTENT_TYPE, content_type)
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
    };
    if req.method() != hyper::Method::GET && req.method() != hyper::Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        );
    }
    match req.uri().path() {
        "/metrics" => reply(StatusCode::OK, CONTENT_TYPE, metrics.encode()),
        "/healthz" if metrics.healthy() => reply(StatusCode::OK, "text/plain", "ok\n".into()),
        "/healthz" => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "the event loop is stuck\n".into(),
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "try /metrics or /healthz\n".into(),
        ),
    }
}

/// Binds the metrics address now, so that a taken port is an error at start-up.
pub fn bind(addr: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    std::net::TcpListener::bind(addr)
        .map_err(|e| anyhow::anyhow!("--metrics-address {addr}: cannot listen: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions_and_services_are_encoded_with_bounded_labels() {
        let m = Metrics::new();
        m.services(&[ServiceGauges {
            name: "api".into(),
            members: 5,
            roots: 1,
            orphans: 2,
            tasks: 7,
            memory: Some(1 << 20),
            tasks_max: Some(64),
            ..Default::default()
        }]);
        m.lost(3);
        m.reload(false);
        let text = m.encode();
        assert!(text.contains("guardian_build_info{version=\""), "{text}");
        assert!(
            text.contains("guardian_service_members{service=\"api\"} 5"),
            "{text}"
        );
        assert!(
            text.contains("guardian_service_orphans{service=\"api\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("guardian_service_tasks_max{service=\"api\"} 64"),
            "{text}"
        );
        assert!(
            !text.contains("guardian_service_memory_max_bytes{"),
            "{text}"
        );
        assert!(text.contains("guardian_events_lost_total 3"), "{text}");
        assert!(
            text.contains("guardian_policy_reloads_total{result=\"error\"} 1"),
            "{text}"
        );
        // A service a reload removed is withdrawn.
        m.services(&[]);
        assert!(!m.encode().contains("service=\"api\""));
    }
}
