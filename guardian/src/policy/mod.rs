//! Policy files: parsing and validation.
//!
//! Policies are strict: an unknown key is an error (a typo must not silently disable a rule), and
//! every error names the file, line, column and key. A policy that fails validation changes
//! nothing: guardian refuses to start with it.

pub mod exec_filter;
pub mod protect;
pub mod selector;
pub mod watch;

use std::{
    collections::HashSet,
    fmt,
    fs::{self, File, Metadata},
    io::{self, Read as _},
    ops::Range,
    os::{
        fd::AsRawFd as _,
        unix::fs::{MetadataExt as _, PermissionsExt as _},
    },
    path::{Path, PathBuf},
    time::Duration,
};

use globset::GlobBuilder;
use regex::Regex;
use serde::{de, Deserialize, Deserializer};
use toml::Spanned;

use crate::{
    policy::protect::Protect,
    policy::selector::{Selector, User},
};

/// How long `terminate` waits between SIGTERM and SIGKILL unless the policy says otherwise.
pub const DEFAULT_KILL_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest `kill_timeout` accepted: longer is surely a typo, and every duration stays far
/// from overflowing when counted in nanoseconds.
pub const MAX_KILL_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// Service names become cgroup directory names: at most this many characters.
pub const MAX_SERVICE_NAME: usize = 64;

/// Whether guardian acts or only records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Enforce,
    Audit,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Enforce => "enforce",
            Self::Audit => "audit",
        }
    }
}

/// What to do with a service's orphans.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OrphanAction {
    /// SIGKILL at once.
    Kill,
    /// SIGTERM, then SIGKILL after `kill_timeout` if still alive.
    Terminate,
    /// Record only.
    Report,
}

impl OrphanAction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kill => "kill",
            Self::Terminate => "terminate",
            Self::Report => "report",
        }
    }
}

/// What to do with processes found already orphaned when guardian starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AtStart {
    /// Record them only.
    Report,
    /// Apply the service's `orphans` action to them.
    Enforce,
}

/// Which member dies first when a service is over `memory_high`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Victim {
    /// Orphans first (largest first), then the largest member.
    OrphansThenLargest,
    /// The largest member by resident memory.
    Largest,
    /// The most recently started member.
    Newest,
}

impl Victim {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OrphansThenLargest => "orphans-then-largest",
            Self::Largest => "largest",
            Self::Newest => "newest",
        }
    }
}

/// Where a service's budgets are enforced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupMode {
    /// guardian puts the service in a cgroup of its own and writes the limits there.
    Own,
    /// Processes stay where they are (for example in a systemd unit); guardian enforces the
    /// budgets by its own actions.
    Inherit,
}

impl CgroupMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Own => "own",
            Self::Inherit => "inherit",
        }
    }
}

/// One of a service's budgets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Budget {
    TasksMax,
    MemoryMax,
    MemoryHigh,
    CpuMax,
}

/// A service's resource budgets.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Budgets {
    /// Processes plus threads, like systemd's TasksMax.
    pub tasks_max: Option<u64>,
    /// Hard memory limit in bytes (the kernel's, in `own` mode).
    pub memory_max: Option<u64>,
    /// Above this many bytes guardian kills one victim, then re-checks.
    pub memory_high: Option<u64>,
    /// CPU time in µs per [`CPU_PERIOD_US`]: percent of one CPU × 1000 (`"160%"` is 160000).
    /// Only the kernel can hold it (`own` mode).
    pub cpu_max: Option<u64>,
}

impl Budgets {
    pub fn any(&self) -> bool {
        self.tasks_max.is_some()
            || self.memory_max.is_some()
            || self.memory_high.is_some()
            || self.cpu_max.is_some()
    }
}

/// The period `cpu_max` is counted over (µs), as systemd's CPUQuota uses by default.
pub const CPU_PERIOD_US: u64 = 100_000;
/// The smallest `cpu_max` (percent): the kernel refuses a quota under 1 ms per period.
pub const MIN_CPU_PERCENT: u64 = 1;
/// The largest `cpu_max` (percent): a thousand CPUs; more is surely a typo.
pub const MAX_CPU_PERCENT: u64 = 100_000;

/// A `cpu_max` as the policy writes it: `160000` is `"160%"`, `12500` is `"12.5%"`.
pub fn cpu_percent(quota_us: u64) -> String {
    let (whole, thousandths) = (quota_us / 1000, quota_us % 1000);
    if thousandths == 0 {
        return format!("{whole}%");
    }
    let frac = format!("{thousandths:03}");
    format!("{whole}.{}%", frac.trim_end_matches('0'))
}

/// The smallest memory budget accepted: below this a Python interpreter cannot even start.
pub const MIN_MEMORY: u64 = 8 << 20;
/// The default `cgroup_parent`: a `guardian` group at the hierarchy root.
pub const DEFAULT_CGROUP_PARENT: &str = "/guardian";

/// A validated policy.
#[derive(Debug)]
pub struct Policy {
    pub path: PathBuf,
    pub mode: Mode,
    /// Processes never signalled, on top of the built-in protections.
    pub protect: Protect,
    /// Where `own` services' cgroups are created: absolute (from each hierarchy's root) or
    /// relative (below guardian's own cgroup).
    pub cgroup_parent: String,
    pub services: Vec<Service>,
    /// How others than root could change the policy file ([`Policy::load`] finds them).
    pub exposures: Vec<Exposure>,
}

#[derive(Debug)]
pub struct Service {
    pub name: String,
    /// Which processes are roots of the service.
    pub selector: Selector,
    pub orphans: OrphanAction,
    /// Which orphans the action applies to (all when absent).
    pub orphan_match: Option<Selector>,
    pub kill_timeout: Duration,
    pub orphans_at_start: AtStart,
    pub budgets: Budgets,
    pub memory_victim: Victim,
    pub cgroup: CgroupMode,
}

/// A policy error, pointing into the file.
#[derive(Debug, PartialEq, Eq)]
pub struct PolicyError {
    pub path: PathBuf,
    pub line: usize,
    pub column: usize,
    /// Dotted key path, e.g. `service[1].match.cmdline`.
    pub key: String,
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:", self.path.display())?;
        // Line 0: the error is about the file, not a place in it.
        if self.line > 0 {
            write!(f, "{}:{}:", self.line, self.column)?;
        }
        write!(f, " ")?;
        if !self.key.is_empty() {
            write!(f, "key `{}`: ", self.key)?;
        }
        write!(f, "{}", self.message)
    }
}

impl std::error::Error for PolicyError {}

// The file as written. Every table rejects unknown keys.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    mode: Option<Mode>,
    #[serde(default)]
    protect: Vec<Spanned<RawProtect>>,
    orphans_at_start: Option<AtStart>,
    cgroup_parent: Option<Spanned<String>>,
    #[serde(default, rename = "service")]
    services: Vec<RawService>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: Spanned<String>,
    #[serde(rename = "match")]
    selector: Spanned<RawSelector>,
    orphans: Option<OrphanAction>,
    orphan_match: Option<Spanned<RawSelector>>,
    kill_timeout: Option<Spanned<String>>,
    orphans_at_start: Option<AtStart>,
    tasks_max: Option<Spanned<i64>>,
    memory_max: Option<Spanned<RawSize>>,
    memory_high: Option<Spanned<RawSize>>,
    memory_victim: Option<Victim>,
    cgroup: Option<CgroupMode>,
    cpu_max: Option<Spanned<String>>,
}

/// A size: a number of bytes, or text such as "512M", "4G", "3500M" (binary units, as systemd).
#[derive(Deserialize)]
#[serde(untagged)]
enum RawSize {
    Bytes(i64),
    Text(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSelector {
    cmdline: Option<Spanned<String>>,
    exe: Option<Spanned<String>>,
    comm: Option<Spanned<String>>,
    cgroup: Option<Spanned<String>>,
    user: Option<Spanned<RawUser>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawUser {
    Id(u32),
    Name(String),
}

/// An entry of `protect`: a process name, or a selector table.
enum RawProtect {
    Name(String),
    Selector(RawSelector),
}

// By hand rather than `#[serde(untagged)]`: a table keeps the errors (and their keys and spans)
// of a `match` table, where untagged would only say that nothing matched.
impl<'de> Deserialize<'de> for RawProtect {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Entry;
        impl<'de> de::Visitor<'de> for Entry {
            type Value = RawProtect;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a process name or a selector table such as { user = \"postgres\" }")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawProtect, E> {
                Ok(RawProtect::Name(v.to_owned()))
            }

            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<RawProtect, A::Error> {
                RawSelector::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(RawProtect::Selector)
            }
        }
        d.deserialize_any(Entry)
    }
}

/// Turns byte offsets into line and column numbers (1-based).
struct Locator<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Locator<'_> {
    fn error(
        &self,
        span: Option<Range<usize>>,
        key: &str,
        message: impl Into<String>,
    ) -> PolicyError {
        let (line, column) = match span {
            Some(span) => {
                let mut start = span.start.min(self.text.len());
                while !self.text.is_char_boundary(start) {
                    start -= 1;
                }
                let before = &self.text[..start];
                let line = before.matches('\n').count() + 1;
                let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
                (line, column)
            }
            None => (1, 1),
        };
        PolicyError {
            path: self.path.to_path_buf(),
            line,
            column,
            key: key.to_owned(),
            message: message.into(),
        }
    }
}

impl Policy {
    /// Reads and validates a policy file, and finds how others than root could change it. The
    /// file is opened once: its owner and mode are read from that open file, and the text parsed
    /// is read from it too, so a file swapped in between is never what is checked or parsed.
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let unreadable = |e: io::Error| PolicyError {
            path: path.to_path_buf(),
            line: 0,
            column: 0,
            key: String::new(),
            message: format!("cannot read the policy: {e}"),
        };
        let mut file = File::open(path).map_err(unreadable)?;
        let meta = file.metadata().map_err(unreadable)?;
        let exposures = exposures(&file, &meta, path).map_err(unreadable)?;
        let mut text = String::new();
        file.read_to_string(&mut text).map_err(unreadable)?;
        let mut policy = Self::parse(path, &text)?;
        policy.exposures = exposures;
        Ok(policy)
    }

    /// Validates policy text; `path` is used in error messages.
    pub fn parse(path: &Path, text: &str) -> Result<Self, PolicyError> {
        let loc = Locator { path, text };
        let de = toml::Deserializer::new(text);
        let raw: RawPolicy = serde_path_to_error::deserialize(de).map_err(|e| {
            // A `Spanned` value is a struct to serde: its field is not part of the key.
            let key = e
                .path()
                .to_string()
                .replace(".$__serde_spanned_private_value", "");
            let inner = e.into_inner();
            let key = if key == "." { String::new() } else { key };
            loc.error(inner.span(), &key, inner.message().to_owned())
        })?;

        let mut names = HashSet::new();
        let mut services = Vec::new();
        for (i, s) in raw.services.into_iter().enumerate() {
            let key = |k: &str| format!("service[{i}].{k}");
            let name = s.name.get_ref().clone();
            if !valid_service_name(&name) {
                return Err(loc.error(
                    Some(s.name.span()),
                    &key("name"),
                    format!(
                        "{name:?} is not a service name: use 1 to {MAX_SERVICE_NAME} of the characters A-Z a-z 0-9 _ . @ -, starting with a letter or a digit (it names a cgroup directory)"
                    ),
                ));
            }
            if !names.insert(name.clone()) {
                return Err(loc.error(
                    Some(s.name.span()),
                    &key("name"),
                    format!("duplicate service name `{name}`"),
                ));
            }
            let selector = selector_from(&loc, &key("match"), s.selector)?;
            let orphan_match = s
                .orphan_match
                .map(|m| selector_from(&loc, &key("orphan_match"), m))
                .transpose()?;
            let kill_timeout = match s.kill_timeout {
                Some(t) => {
                    let err = |m: String| loc.error(Some(t.span()), &key("kill_timeout"), m);
                    let d = humantime::parse_duration(t.get_ref()).map_err(|e| {
                        err(format!(
                            "`{}` is not a duration (e.g. \"30s\", \"250ms\"): {e}",
                            t.get_ref()
                        ))
                    })?;
                    if d.is_zero() {
                        return Err(err("must be greater than zero (use `orphans = \"kill\"` for an immediate SIGKILL)".into()));
                    }
                    if d > MAX_KILL_TIMEOUT {
                        return Err(err(format!(
                            "must be at most {}",
                            humantime::format_duration(MAX_KILL_TIMEOUT)
                        )));
                    }
                    d
                }
                None => DEFAULT_KILL_TIMEOUT,
            };
            let tasks_max = s
                .tasks_max
                .map(|t| {
                    u64::try_from(*t.get_ref())
                        .ok()
                        .filter(|&n| n >= 1)
                        .ok_or_else(|| {
                            loc.error(Some(t.span()), &key("tasks_max"), "must be at least 1")
                        })
                })
                .transpose()?;
            let memory_max = s
                .memory_max
                .map(|m| size(&loc, &key("memory_max"), m))
                .transpose()?;
            let memory_high = match s.memory_high {
                Some(m) => {
                    let span = m.span();
                    let high = size(&loc, &key("memory_high"), m)?;
                    if memory_max.is_some_and(|max| high > max) {
                        return Err(loc.error(
                            Some(span),
                            &key("memory_high"),
                            "is above memory_max: the kernel would act before guardian",
                        ));
                    }
                    Some(high)
                }
                None => None,
            };
            let cgroup = s.cgroup.unwrap_or(CgroupMode::Inherit);
            let cpu_max = match s.cpu_max {
                Some(c) => {
                    let span = c.span();
                    let quota = cpu_quota(&loc, &key("cpu_max"), c)?;
                    if cgroup != CgroupMode::Own {
                        return Err(loc.error(
                            Some(span),
                            &key("cpu_max"),
                            "needs `cgroup = \"own\"`: guardian can count a service's tasks and memory itself, but cannot throttle CPU by counting (only the kernel's cpu controller can, on a cgroup of guardian's)",
                        ));
                    }
                    Some(quota)
                }
                None => None,
            };
            services.push(Service {
                name,
                selector,
                orphans: s.orphans.unwrap_or(OrphanAction::Terminate),
                orphan_match,
                kill_timeout,
                orphans_at_start: s
                    .orphans_at_start
                    .or(raw.orphans_at_start)
                    .unwrap_or(AtStart::Report),
                budgets: Budgets {
                    tasks_max,
                    memory_max,
                    memory_high,
                    cpu_max,
                },
                memory_victim: s.memory_victim.unwrap_or(Victim::OrphansThenLargest),
                cgroup,
            });
        }
        if services.is_empty() {
            return Err(loc.error(
                None,
                "service",
                "the policy names no service (add a [[service]] table)",
            ));
        }
        let mut protect = Protect::default();
        for (i, p) in raw.protect.into_iter().enumerate() {
            let key = format!("protect[{i}]");
            let span = p.span();
            match p.into_inner() {
                RawProtect::Name(name) => {
                    if name.is_empty() || name.len() > 15 {
                        return Err(loc.error(
                            Some(span),
                            &key,
                            "must be a process name (comm) of 1 to 15 characters, or a selector table",
                        ));
                    }
                    protect.names.push(name);
                }
                RawProtect::Selector(raw) => {
                    protect
                        .selectors
                        .push(selector_from(&loc, &key, Spanned::new(span, raw))?)
                }
            }
        }
        let cgroup_parent = match raw.cgroup_parent {
            Some(c) => {
                let v = c.get_ref().trim_end_matches('/');
                if v.is_empty() || v.split('/').any(|part| part == ".." || part == ".") {
                    return Err(loc.error(
                        Some(c.span()),
                        "cgroup_parent",
                        "must be a cgroup path without `.` or `..`, e.g. \"/guardian\" (from the hierarchy root) or \"guardian\" (below guardian's own cgroup)",
                    ));
                }
                v.to_owned()
            }
            None => DEFAULT_CGROUP_PARENT.to_owned(),
        };
        Ok(Self {
            path: path.to_path_buf(),
            mode: raw.mode.unwrap_or(Mode::Enforce),
            protect,
            cgroup_parent,
            services,
            exposures: Vec::new(),
        })
    }

    /// What is valid but probably not what was meant, one line each: services any local user
    /// can join, user names that do not exist (yet), a policy file others than root can change.
    pub fn warnings(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .exposures
            .iter()
            .map(|e| format!("{e} (until then guardian refuses to enforce this policy as root)"))
            .collect();
        for s in &self.services {
            if !s.selector.is_pinned() {
                out.push(format!(
                    "service `{}`: its `match` pins none of `user`, `cgroup`, `exe`, so any local user can start a process that joins it (its budgets and orphan kills then reach that process's tree): add `user = \"<service account>\"` or `cgroup = \"/system.slice/<unit>.service\"`",
                    s.name
                ));
            } else if s.selector.exe.is_none()
                && s.selector.cgroup.is_none()
                && s.selector.user.as_ref().and_then(User::uid) == Some(0)
            {
                out.push(format!(
                    "service `{}`: its `match` pins only `user` to root, and any local user can run a set-user-ID root program (passwd, su, ...) with a command line of their choosing: pin `exe` or `cgroup` as well",
                    s.name
                ));
            }
            if let Some(u) = s.selector.unresolved_user() {
                out.push(format!(
                    "service `{}`: there is no user `{u}` on this host: `match` selects no process (no roots) until it exists",
                    s.name
                ));
            }
            if let Some(u) = s.orphan_match.as_ref().and_then(Selector::unresolved_user) {
                out.push(format!(
                    "service `{}`: there is no user `{u}` on this host: `orphan_match` selects no orphan (none is acted on) until it exists",
                    s.name
                ));
            }
        }
        for p in &self.protect.selectors {
            if let Some(u) = p.unresolved_user() {
                out.push(format!(
                    "protect: there is no user `{u}` on this host: `{}` protects nothing until it exists",
                    p.describe()
                ));
            }
        }
        out
    }

    /// Looks user names of the services' selectors that did not resolve up again (accounts
    /// created since the policy was read); returns the indices of the services whose `match` or
    /// `orphan_match` changed. (The `protect` selectors in force are the enforcer's copies,
    /// which look theirs up right before each signal.)
    pub fn resolve_users(&mut self) -> Vec<usize> {
        let mut changed = Vec::new();
        for (i, s) in self.services.iter_mut().enumerate() {
            let in_match = s.selector.resolve_user();
            let in_orphan_match = s.orphan_match.as_mut().is_some_and(Selector::resolve_user);
            if in_match || in_orphan_match {
                changed.push(i);
            }
        }
        changed
    }

    /// Whether guardian may enforce this policy as root: only if no one else can change the
    /// file (see [`Exposure`]).
    pub fn enforceable_as_root(&self) -> Result<(), Untrusted> {
        if self.exposures.is_empty() {
            return Ok(());
        }
        Err(Untrusted {
            path: self.path.clone(),
            exposures: self.exposures.clone(),
        })
    }
}

/// `[A-Za-z0-9][A-Za-z0-9_.@-]*`, at most [`MAX_SERVICE_NAME`] characters: safe as a cgroup
/// directory name (no `/`, no `..`, not hidden).
fn valid_service_name(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= MAX_SERVICE_NAME
        && chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '@' | '-'))
}

/// Parses a size and checks it against [`MIN_MEMORY`].
fn size(loc: &Locator<'_>, key: &str, raw: Spanned<RawSize>) -> Result<u64, PolicyError> {
    let span = raw.span();
    let bytes = match raw.into_inner() {
        RawSize::Bytes(n) => u64::try_from(n)
            .map_err(|_| loc.error(Some(span.clone()), key, "must not be negative"))?,
        RawSize::Text(t) => parse_size::Config::new()
            .with_binary()
            .parse_size(t.trim())
            .map_err(|e| {
                loc.error(
                    Some(span.clone()),
                    key,
                    format!("`{t}` is not a size (e.g. \"512M\", \"4G\"): {e}"),
                )
            })?,
    };
    if bytes < MIN_MEMORY {
        return Err(loc.error(
            Some(span),
            key,
            format!(
                "{bytes} bytes is below the minimum of {}M",
                MIN_MEMORY >> 20
            ),
        ));
    }
    Ok(bytes)
}

/// Parses a `cpu_max` (systemd's CPUQuota words: a percent of one CPU, `"50%"`, `"160%"`,
/// `"12.5%"`) into µs per [`CPU_PERIOD_US`].
fn cpu_quota(loc: &Locator<'_>, key: &str, raw: Spanned<String>) -> Result<u64, PolicyError> {
    let span = raw.span();
    let text = raw.into_inner();
    let err = |m: String| loc.error(Some(span.clone()), key, m);
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let number = text.strip_suffix('%').unwrap_or("");
    let (whole, frac) = number.split_once('.').unwrap_or((number, "0"));
    if !digits(whole) || !digits(frac) {
        return Err(err(format!(
            "`{text}` is not a CPU quota: give a percent of one CPU, e.g. \"50%\", \"160%\" (1.6 CPUs), \"12.5%\""
        )));
    }
    // A thousandth of a percent is one µs per period: the finest the kernel takes.
    if frac.len() > 3 {
        return Err(err(format!(
            "`{text}` has more than three decimals (0.001% is 1 µs per 100 ms period)"
        )));
    }
    let too_large = || {
        err(format!(
            "`{text}` is above the maximum of {MAX_CPU_PERCENT}%"
        ))
    };
    let whole: u64 = whole.parse().map_err(|_| too_large())?;
    let frac: u64 = format!("{frac:0<3}").parse().unwrap_or(0);
    let quota = whole.saturating_mul(1000).saturating_add(frac);
    if quota > MAX_CPU_PERCENT * 1000 {
        return Err(too_large());
    }
    if quota < MIN_CPU_PERCENT * 1000 {
        return Err(err(format!(
            "`{text}` is below the minimum of {MIN_CPU_PERCENT}% (the kernel's smallest quota is 1 ms per 100 ms period)"
        )));
    }
    Ok(quota)
}

fn selector_from(
    loc: &Locator<'_>,
    key: &str,
    raw: Spanned<RawSelector>,
) -> Result<Selector, PolicyError> {
    let span = raw.span();
    let raw = raw.into_inner();
    let sub = |k: &str| format!("{key}.{k}");
    let cmdline = raw
        .cmdline
        .map(|c| {
            Regex::new(c.get_ref()).map_err(|e| {
                loc.error(
                    Some(c.span()),
                    &sub("cmdline"),
                    format!("invalid regular expression: {e}"),
                )
            })
        })
        .transpose()?;
    let glob = |g: Spanned<String>, k: &str, literal_separator: bool| {
        GlobBuilder::new(g.get_ref())
            .literal_separator(literal_separator)
            .build()
            .map(|m| (g.get_ref().clone(), m.compile_matcher()))
            .map_err(|e| loc.error(Some(g.span()), &sub(k), format!("invalid glob: {e}")))
    };
    let exe = raw
        .exe
        .map(|g| {
            if !(g.get_ref().starts_with('/') || g.get_ref().starts_with("**")) {
                return Err(loc.error(
                    Some(g.span()),
                    &sub("exe"),
                    "must be a glob on an absolute path (the executable as /proc/PID/exe shows it), e.g. \"/usr/bin/python3*\"",
                ));
            }
            // `*` must not cross `/`: `/opt/app/bin/*` is not `/opt/app/bin/../../home/eve/x`.
            glob(g, "exe", true)
        })
        .transpose()?;
    let comm = raw.comm.map(|g| glob(g, "comm", false)).transpose()?;
    let cgroup = raw
        .cgroup
        .map(|c| {
            if !c.get_ref().starts_with('/') {
                return Err(loc.error(
                    Some(c.span()),
                    &sub("cgroup"),
                    "must be an absolute cgroup path (as in /proc/PID/cgroup), e.g. \"/system.slice/app.service\"",
                ));
            }
            // The selector compares whole components: `/a/b/` is `/a/b`.
            let path = c.get_ref().trim_end_matches('/');
            Ok(if path.is_empty() { "/" } else { path }.to_owned())
        })
        .transpose()?;
    let user = raw
        .user
        .map(|u| {
            let span = u.span();
            match u.into_inner() {
                RawUser::Id(id) => Ok(User::Id(id)),
                RawUser::Name(name) => match name.parse::<u32>() {
                    Ok(id) => Ok(User::Id(id)),
                    Err(_) if name.is_empty() => {
                        Err(loc.error(Some(span), &sub("user"), "must be a user name or a uid"))
                    }
                    // A name that does not resolve is valid: it matches nothing until the
                    // account exists (see `Policy::warnings`, `Policy::resolve_users`).
                    Err(_) => Ok(User::named(name)),
                },
            }
        })
        .transpose()?;
    let selector = Selector {
        cmdline,
        exe,
        comm,
        cgroup,
        user,
    };
    if selector.is_empty() {
        return Err(loc.error(
            Some(span),
            key,
            "needs at least one of cmdline, exe, comm, cgroup, user (an empty selector would match every process)",
        ));
    }
    Ok(selector)
}

/// A way someone other than root could change a policy file: through the file itself, or a
/// directory above it (whose owner, or anyone who may write there, can replace the file). The
/// same rules as sshd's `StrictModes`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exposure {
    /// The policy file (as resolved), or one of the directories above it.
    pub path: PathBuf,
    pub dir: bool,
    pub uid: u32,
    /// Permission bits, sticky bit included.
    pub mode: u32,
    pub problem: Problem,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Problem {
    /// Owned by a user other than root.
    Owner,
    /// Writable by group or others (for a directory: without the sticky bit, which would keep
    /// others from replacing root's file).
    Writable,
}

impl fmt::Display for Exposure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = self.path.display();
        let what = if self.dir { "directory" } else { "policy file" };
        let facts = format!("owner uid {}, mode 0{:03o}", self.uid, self.mode);
        match (self.problem, self.dir) {
            (Problem::Owner, false) => write!(
                f,
                "{what} `{p}` is not owned by root ({facts}): its owner can change what guardian kills; fix: `chown root {p}`"
            ),
            (Problem::Owner, true) => write!(
                f,
                "{what} `{p}` above the policy file is not owned by root ({facts}): its owner can replace the policy; fix: `chown root {p}`, or keep the policy in a root-owned directory such as /etc/guardian"
            ),
            (Problem::Writable, false) => write!(
                f,
                "{what} `{p}` is writable by group or others ({facts}): fix: `chmod go-w {p}`"
            ),
            (Problem::Writable, true) => write!(
                f,
                "{what} `{p}` above the policy file is writable by group or others without the sticky bit ({facts}): anyone who may write there can replace the policy; fix: `chmod go-w {p}`"
            ),
        }
    }
}

/// The open policy file and every directory above it, checked as [`Exposure`] says.
fn exposures(file: &File, meta: &Metadata, path: &Path) -> io::Result<Vec<Exposure>> {
    // Where the open file really is (symlinks resolved); a file deleted since it was opened
    // has no such path, and the one given is resolved instead.
    let real = fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .ok()
        .filter(|p| p.is_absolute() && !p.to_string_lossy().ends_with(" (deleted)"))
        .map_or_else(|| fs::canonicalize(path), Ok)?;
    let configmap = configmap_volume(path);
    let kubelet_only = |p: &Path| configmap.as_ref().is_some_and(|c| p.starts_with(c));
    let mut found = Vec::new();
    exposure(&mut found, &real, meta, false, kubelet_only(&real));
    for dir in real.ancestors().skip(1) {
        exposure(
            &mut found,
            dir,
            &fs::symlink_metadata(dir)?,
            true,
            kubelet_only(dir),
        );
    }
    Ok(found)
}

/// The directory of a Kubernetes ConfigMap (or Secret) volume the policy file is in, if it is
/// one: a read-only mount where the policy is reached through the kubelet's `..data` symlink.
/// The kubelet makes that directory 0777, but nobody writes through a read-only mount, and
/// only the kubelet (root, on the node) writes its source.
fn configmap_volume(path: &Path) -> Option<PathBuf> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty())?;
    let data = fs::symlink_metadata(dir.join("..data")).ok()?;
    let read_only = rustix::fs::statvfs(dir)
        .is_ok_and(|v| v.f_flag.contains(rustix::fs::StatVfsMountFlags::RDONLY));
    (data.file_type().is_symlink() && read_only).then(|| fs::canonicalize(dir).ok())?
}

/// Adds what makes `path` changeable by others than root; `read_only` (in a ConfigMap volume)
/// leaves its mode out of it.
fn exposure(found: &mut Vec<Exposure>, path: &Path, meta: &Metadata, dir: bool, read_only: bool) {
    let mode = meta.permissions().mode() & 0o7777;
    let sticky = dir && mode & 0o1000 != 0;
    let mut add = |problem| {
        found.push(Exposure {
            path: path.to_path_buf(),
            dir,
            uid: meta.uid(),
            mode,
            problem,
        })
    };
    if meta.uid() != 0 {
        add(Problem::Owner);
    }
    if mode & 0o022 != 0 && !sticky && !read_only {
        add(Problem::Writable);
    }
}

/// A policy guardian will not enforce as root: others than root can change it.
#[derive(Debug)]
pub struct Untrusted {
    pub path: PathBuf,
    pub exposures: Vec<Exposure>,
}

impl fmt::Display for Untrusted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "refusing to enforce `{}` as root: users other than root can change it",
            self.path.display()
        )?;
        for e in &self.exposures {
            write!(f, "\n  - {e}")?;
        }
        write!(
            f,
            "\n(`--dry-run` runs it in audit mode, which signals nothing and only warns)"
        )
    }
}

impl std::error::Error for Untrusted {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::selector::User;

    fn parse(text: &str) -> Result<Policy, PolicyError> {
        Policy::parse(Path::new("p.toml"), text)
    }

    const BASE: &str = "[[service]]\nname = \"a\"\nmatch = { comm = \"x\" }\n";

    const GOOD: &str = r#"
mode = "audit"
protect = ["sshd"]

[[service]]
name = "analyticbot-mtproto"
match = { cmdline = "apps\\.mtproto\\.worker" }
orphans = "kill"
orphan_match = { cmdline = "multiprocessing" }

[[service]]
name = "bot"
match = { exe = "/usr/bin/python3*", user = 0 }
kill_timeout = "250ms"
"#;

    #[test]
    fn parses_a_good_policy() {
        let p = parse(GOOD).unwrap();
        assert_eq!(p.mode, Mode::Audit);
        assert_eq!(p.protect.names, vec!["sshd"]);
        assert_eq!(p.services.len(), 2);
        let s = &p.services[0];
        assert_eq!(s.orphans, OrphanAction::Kill);
        assert!(s.orphan_match.is_some());
        assert_eq!(s.kill_timeout, DEFAULT_KILL_TIMEOUT);
        assert_eq!(s.orphans_at_start, AtStart::Report);
        let b = &p.services[1];
        assert_eq!(b.orphans, OrphanAction::Terminate, "the default action");
        assert_eq!(b.kill_timeout, Duration::from_millis(250));
        assert_eq!(b.selector.user, Some(User::Id(0)));
    }

    #[test]
    fn unknown_key_names_file_line_column_and_key() {
        let text = "[[service]]\nname = \"a\"\nmatch = { cmdline = \"x\" }\norphanz = \"kill\"\n";
        let e = parse(text).unwrap_err();
        assert_eq!((e.line, e.column), (4, 1), "{e}");
        assert!(e.message.contains("unknown field `orphanz`"), "{e}");
        assert!(e.key.starts_with("service[0]"), "{e}");
        assert!(e.to_string().starts_with("p.toml:4:1: "), "{e}");
    }

    #[test]
    fn unknown_selector_key_is_an_error() {
        let text = "[[service]]\nname = \"a\"\nmatch = { cmdlin = \"x\" }\n";
        let e = parse(text).unwrap_err();
        assert_eq!(e.line, 3, "{e}");
        assert!(e.message.contains("unknown field `cmdlin`"), "{e}");
        assert!(e.key.contains("service[0].match"), "{e}");
    }

    #[test]
    fn bad_regex_glob_duration_and_value() {
        let e = parse("[[service]]\nname = \"a\"\nmatch = { cmdline = \"(\" }\n").unwrap_err();
        assert_eq!(
            (e.line, e.key.as_str()),
            (3, "service[0].match.cmdline"),
            "{e}"
        );
        assert!(e.message.contains("invalid regular expression"), "{e}");

        let e = parse("[[service]]\nname = \"a\"\nmatch = { exe = \"[\" }\n").unwrap_err();
        assert_eq!(e.key, "service[0].match.exe", "{e}");

        let e = parse(
            "[[service]]\nname = \"a\"\nmatch = { comm = \"x\" }\nkill_timeout = \"10 parsecs\"\n",
        )
        .unwrap_err();
        assert_eq!((e.line, e.column), (4, 16), "{e}");
        assert_eq!(e.key, "service[0].kill_timeout");

        let e = parse("[[service]]\nname = \"a\"\nmatch = { comm = \"x\" }\norphans = \"nuke\"\n")
            .unwrap_err();
        assert_eq!(e.line, 4, "{e}");
        assert!(e.message.contains("unknown variant `nuke`"), "{e}");
    }

    #[test]
    fn duplicate_and_empty_services() {
        let text = "[[service]]\nname = \"a\"\nmatch = { comm = \"x\" }\n\n[[service]]\nname = \"a\"\nmatch = { comm = \"y\" }\n";
        let e = parse(text).unwrap_err();
        assert_eq!((e.line, e.key.as_str()), (6, "service[1].name"), "{e}");
        assert!(e.message.contains("duplicate service name `a`"), "{e}");

        let e = parse("[[service]]\nname = \"a\"\nmatch = {}\n").unwrap_err();
        assert!(e.message.contains("at least one of"), "{e}");
        let e = parse("mode = \"audit\"\n").unwrap_err();
        assert!(e.message.contains("no service"), "{e}");
    }

    #[test]
    fn users_by_name_and_by_uid() {
        let p = parse("[[service]]\nname = \"a\"\nmatch = { user = \"root\" }\n").unwrap();
        assert_eq!(
            p.services[0].selector.user,
            Some(User::Name {
                name: "root".into(),
                uid: Some(0)
            })
        );
        let p = parse("[[service]]\nname = \"a\"\nmatch = { user = \"4242\" }\n").unwrap();
        assert_eq!(p.services[0].selector.user, Some(User::Id(4242)));
        let e = parse("[[service]]\nname = \"a\"\nmatch = { user = \"\" }\n").unwrap_err();
        assert_eq!(e.key, "service[0].match.user", "{e}");
    }

    /// An account that does not exist yet is no error: the service has no roots until it
    /// does, and says so.
    #[test]
    fn unknown_users_are_warnings_until_they_exist() {
        let text = "[[service]]\nname = \"a\"\nmatch = { cmdline = \"x\", user = \"no-such-user-here\" }\norphan_match = { user = \"no-such-user-here\" }\n\n[[service]]\nname = \"b\"\nmatch = { user = 0 }\n";
        let mut p = parse(text).unwrap();
        let a = &p.services[0];
        assert_eq!(a.selector.unresolved_user(), Some("no-such-user-here"));
        let me = std::process::id();
        let c = crate::policy::selector::Candidate::new(me, None, "x", "x");
        assert!(!a.selector.matches(&c), "matches nothing until it exists");
        let w = p.warnings();
        assert!(
            w.iter().any(|l| l.contains("service `a`")
                && l.contains("no user `no-such-user-here`")
                && l.contains("no roots")),
            "{w:?}"
        );
        assert!(
            w.iter()
                .any(|l| l.contains("`orphan_match` selects no orphan")),
            "{w:?}"
        );
        assert!(p.resolve_users().is_empty(), "still missing");
        // The account appears (simulated: a name this host has).
        let a = &mut p.services[0];
        for sel in [&mut a.selector, a.orphan_match.as_mut().unwrap()] {
            sel.user = Some(User::Name {
                name: "root".into(),
                uid: None,
            });
        }
        assert_eq!(p.resolve_users(), vec![0]);
        assert_eq!(p.services[0].selector.user.as_ref().unwrap().uid(), Some(0));
        assert!(p.resolve_users().is_empty(), "nothing left to resolve");
        assert!(
            p.warnings().iter().all(|l| !l.contains("no user")),
            "{:?}",
            p.warnings()
        );
    }

    #[test]
    fn unpinned_services_warn() {
        let p = parse(
            "[[service]]\nname = \"loose\"\nmatch = { cmdline = \"x\", comm = \"y\" }\n\n[[service]]\nname = \"by-user\"\nmatch = { cmdline = \"x\", user = 4242 }\n\n[[service]]\nname = \"by-cgroup\"\nmatch = { cgroup = \"/system.slice/x.service\" }\n\n[[service]]\nname = \"by-exe\"\nmatch = { exe = \"/usr/bin/x\" }\n",
        )
        .unwrap();
        let w = p.warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].starts_with("service `loose`: "), "{w:?}");
        assert!(w[0].contains("any local user"), "{w:?}");
        assert!(w[0].contains("user = \"<service account>\""), "{w:?}");
        assert!(
            w[0].contains("cgroup = \"/system.slice/<unit>.service\""),
            "{w:?}"
        );
    }

    /// A set-user-ID root program runs as root with the caller's command line: root alone pins
    /// nothing.
    #[test]
    fn root_alone_is_a_weak_pin() {
        let p = parse(
            "[[service]]\nname = \"root-only\"\nmatch = { cmdline = \"x\", user = \"root\" }\n\n[[service]]\nname = \"root-exe\"\nmatch = { cmdline = \"x\", user = 0, exe = \"/usr/sbin/x\" }\n\n[[service]]\nname = \"root-cgroup\"\nmatch = { user = 0, cgroup = \"/system.slice/x.service\" }\n",
        )
        .unwrap();
        let w = p.warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].starts_with("service `root-only`: "), "{w:?}");
        assert!(w[0].contains("set-user-ID root program"), "{w:?}");
    }

    #[test]
    fn exe_globs_do_not_cross_slashes() {
        let exe = |g: &str| {
            parse(&format!(
                "[[service]]\nname = \"a\"\nmatch = {{ exe = \"{g}\" }}\n"
            ))
            .map(|p| p.services[0].selector.exe.clone().unwrap().1)
        };
        let bin = exe("/opt/app/bin/*").unwrap();
        assert!(bin.is_match("/opt/app/bin/x"));
        assert!(!bin.is_match("/opt/app/bin/../../../home/eve/x"));
        assert!(!bin.is_match("/opt/app/bin/sub/x"));
        let tree = exe("/usr/sbin/**").unwrap();
        assert!(tree.is_match("/usr/sbin/a/b"));
        assert!(exe("**/bin/python3*")
            .unwrap()
            .is_match("/usr/bin/python3.11"));
        let e = exe("python3").unwrap_err();
        assert_eq!(
            (e.line, e.column, e.key.as_str()),
            (3, 17, "service[0].match.exe"),
            "{e}"
        );
        assert!(e.message.contains("absolute path"), "{e}");
    }

    #[test]
    fn cgroup_paths_lose_trailing_slashes() {
        let cgroup = |c: &str| {
            parse(&format!(
                "[[service]]\nname = \"a\"\nmatch = {{ cgroup = \"{c}\" }}\n"
            ))
            .unwrap()
            .services[0]
                .selector
                .cgroup
                .clone()
                .unwrap()
        };
        assert_eq!(cgroup("/a/b/"), "/a/b");
        assert_eq!(cgroup("/a/b"), "/a/b");
        assert_eq!(cgroup("/"), "/");
        assert_eq!(cgroup("//"), "/");
        let e = parse("[[service]]\nname = \"a\"\nmatch = { cgroup = \"a/b\" }\n").unwrap_err();
        assert_eq!(e.key, "service[0].match.cgroup", "{e}");
    }

    /// Service names become cgroup directories: nothing that could leave `cgroup_parent`.
    #[test]
    fn service_names_are_safe_directory_names() {
        let long = "a".repeat(MAX_SERVICE_NAME + 1);
        for bad in [
            "../x",
            "a/b",
            "",
            long.as_str(),
            ".hidden",
            "../system.slice/sshd.service",
            " a",
            "a b",
            "-a",
            "é",
        ] {
            let text = format!("[[service]]\nname = {bad:?}\nmatch = {{ comm = \"x\" }}\n");
            let e = parse(&text).unwrap_err();
            assert_eq!(
                (e.line, e.column, e.key.as_str()),
                (2, 8, "service[0].name"),
                "{bad:?}: {e}"
            );
            assert!(e.message.contains("is not a service name"), "{e}");
            assert!(e.to_string().starts_with("p.toml:2:8: "), "{e}");
        }
        let longest = "a".repeat(MAX_SERVICE_NAME);
        for good in [
            "a",
            "9",
            "analyticbot-api",
            "x@1.service",
            "a_b.c-d",
            &longest,
        ] {
            let text = format!("[[service]]\nname = {good:?}\nmatch = {{ comm = \"x\" }}\n");
            assert_eq!(parse(&text).unwrap().services[0].name, good);
        }
    }

    #[test]
    fn kill_timeout_is_bounded() {
        let with = |t: &str| {
            parse(&format!(
                "[[service]]\nname = \"a\"\nmatch = {{ comm = \"x\" }}\nkill_timeout = \"{t}\"\n"
            ))
        };
        assert_eq!(
            with("24h").unwrap().services[0].kill_timeout,
            MAX_KILL_TIMEOUT
        );
        for bad in [
            "24h 1s",
            "25h",
            "18446744073709551615s",
            "99999999999999999999999h",
        ] {
            let e = with(bad).unwrap_err();
            assert_eq!(
                (e.line, e.key.as_str()),
                (4, "service[0].kill_timeout"),
                "{bad}: {e}"
            );
        }
        assert!(with("25h").unwrap_err().message.contains("at most 1day"));
    }

    #[test]
    fn protect_takes_names_and_selectors() {
        let p = parse(&format!(
            "protect = [\"sshd\", {{ user = \"root\" }}, {{ exe = \"/usr/sbin/**\" }}]\n{BASE}"
        ))
        .unwrap();
        assert_eq!(p.protect.names, vec!["sshd"]);
        assert_eq!(p.protect.selectors.len(), 2);
        assert_eq!(
            p.protect.selectors[0].user,
            Some(User::named("root".into()))
        );
        assert!(p.protect.selectors[1]
            .exe
            .as_ref()
            .unwrap()
            .1
            .is_match("/usr/sbin/a/b"));
        let err = |protect: &str| {
            parse(&format!("protect = [\"sshd\",\n  {protect}]\n{BASE}")).unwrap_err()
        };
        let e = err("{ usr = \"postgres\" }");
        assert_eq!(
            (e.line, e.column, e.key.as_str()),
            (2, 5, "protect[1].usr"),
            "{e}"
        );
        assert!(e.message.contains("unknown field `usr`"), "{e}");
        let e = err("{ exe = \"[\" }");
        assert_eq!(
            (e.line, e.column, e.key.as_str()),
            (2, 11, "protect[1].exe"),
            "{e}"
        );
        let e = err("{ user = \"\" }");
        assert_eq!(e.key, "protect[1].user", "{e}");
        let e = err("{}");
        assert_eq!(
            (e.line, e.column, e.key.as_str()),
            (2, 3, "protect[1]"),
            "{e}"
        );
        assert!(e.message.contains("at least one of"), "{e}");
        let e = err("\"a-name-of-16-chr\"");
        assert_eq!((e.line, e.key.as_str()), (2, "protect[1]"), "{e}");
        let e = err("7");
        assert_eq!((e.line, e.key.as_str()), (2, "protect[1]"), "{e}");
        assert!(
            e.message.contains("a process name or a selector table"),
            "{e}"
        );
        // Unknown users in protect are warnings too.
        let p = parse(&format!(
            "protect = [{{ user = \"no-such-user-here\" }}]\n{BASE}"
        ))
        .unwrap();
        assert!(
            p.warnings()
                .iter()
                .any(|w| w.contains("protects nothing until it exists")),
            "{:?}",
            p.warnings()
        );
    }

    /// Error positions are counted in characters, and never slice inside one.
    #[test]
    fn error_positions_survive_multibyte_text() {
        let loc = Locator {
            path: Path::new("p.toml"),
            text: "é\nxé",
        };
        assert_eq!(
            (
                loc.error(Some(1..2), "", "m").line,
                loc.error(Some(1..2), "", "m").column
            ),
            (1, 1),
            "inside the é"
        );
        let e = loc.error(Some(6..7), "k", "m");
        assert_eq!((e.line, e.column), (2, 3));
        let e =
            parse("[[service]]\nname = \"é\"\nmatch = { comm = \"ä\", bad = 1 }\n").unwrap_err();
        assert_eq!((e.line, e.column), (3, 23), "{e}");
    }

    #[test]
    fn budgets_parse_with_binary_units() {
        let p = parse(
            "cgroup_parent = \"guardian-test\"\n[[service]]\nname = \"a\"\nmatch = { comm = \"x\" }\ntasks_max = 10\nmemory_max = \"4G\"\nmemory_high = \"3500M\"\nmemory_victim = \"newest\"\ncgroup = \"own\"\n",
        )
        .unwrap();
        assert_eq!(p.cgroup_parent, "guardian-test");
        let s = &p.services[0];
        assert_eq!(
            s.budgets,
            Budgets {
                tasks_max: Some(10),
                memory_max: Some(4 << 30),
                memory_high: Some(3500 << 20),
                cpu_max: None,
            }
        );
        assert_eq!(s.memory_victim, Victim::Newest);
        assert_eq!(s.cgroup, CgroupMode::Own);
        let d = parse("[[service]]\nname = \"a\"\nmatch = { comm = \"x\" }\n").unwrap();
        assert_eq!(d.cgroup_parent, DEFAULT_CGROUP_PARENT);
        assert_eq!(d.services[0].cgroup, CgroupMode::Inherit);
        assert_eq!(d.services[0].memory_victim, Victim::OrphansThenLargest);
        assert!(!d.services[0].budgets.any());
    }

    #[test]
    fn bad_budgets_are_errors() {
        let base = "[[service]]\nname = \"a\"\nmatch = { comm = \"x\" }\n";
        let e = parse(&format!("{base}memory_max = \"4 gigs\"\n")).unwrap_err();
        assert_eq!(
            (e.line, e.key.as_str()),
            (4, "service[0].memory_max"),
            "{e}"
        );
        assert!(e.message.contains("not a size"), "{e}");
        let e = parse(&format!("{base}memory_max = \"1M\"\n")).unwrap_err();
        assert!(e.message.contains("below the minimum"), "{e}");
        let e = parse(&format!(
            "{base}memory_max = \"100M\"\nmemory_high = \"200M\"\n"
        ))
        .unwrap_err();
        assert_eq!(
            (e.line, e.key.as_str()),
            (5, "service[0].memory_high"),
            "{e}"
        );
        assert!(e.message.contains("above memory_max"), "{e}");
        let e = parse(&format!("{base}tasks_max = 0\n")).unwrap_err();
        assert_eq!(e.key, "service[0].tasks_max", "{e}");
        let e = parse(&format!("{base}memory_victim = \"oldest\"\n")).unwrap_err();
        assert!(e.message.contains("unknown variant `oldest`"), "{e}");
        let e = parse(&format!("cgroup_parent = \"../x\"\n{base}")).unwrap_err();
        assert_eq!((e.line, e.key.as_str()), (1, "cgroup_parent"), "{e}");
    }

    /// `cpu_max` takes systemd's CPUQuota words, and is µs per 100 ms period.
    #[test]
    fn cpu_max_parses_percent_of_one_cpu() {
        let with = |v: &str| {
            parse(&format!(
                "[[service]]\nname = \"a\"\nmatch = {{ comm = \"x\" }}\ncgroup = \"own\"\ncpu_max = {v}\n"
            ))
        };
        for (text, quota) in [
            ("160%", 160_000),
            ("50%", 50_000),
            ("250%", 250_000),
            ("100%", CPU_PERIOD_US),
            ("1%", 1000),
            ("12.5%", 12_500),
            ("1.001%", 1001),
            ("33.333%", 33_333),
            ("050%", 50_000),
            ("100000%", 100_000_000),
        ] {
            let p = with(&format!("{text:?}")).unwrap_or_else(|e| panic!("{text}: {e}"));
            let b = &p.services[0].budgets;
            assert_eq!(b.cpu_max, Some(quota), "{text}");
            assert!(b.any(), "{text}");
            assert_eq!(cpu_percent(quota), text.trim_start_matches('0'), "{text}");
        }
        assert_eq!(
            with("\"50%\"").unwrap().services[0].budgets,
            Budgets {
                cpu_max: Some(50_000),
                ..Budgets::default()
            },
            "no other budget implied"
        );
        // `guardian check` says it in both words.
        let shown = crate::daemon::check(&with("\"160%\"").unwrap());
        assert!(
            shown.contains("    budgets        cpu_max 160% (1.6 CPUs); cgroup own"),
            "{shown}"
        );
        let shown = crate::daemon::check(&with("\"100%\"").unwrap());
        assert!(shown.contains("cpu_max 100% (1 CPU);"), "{shown}");
    }

    #[test]
    fn bad_cpu_max_is_an_error_naming_the_place() {
        let base = "[[service]]\nname = \"a\"\nmatch = { comm = \"x\" }\ncgroup = \"own\"\n";
        for (value, says) in [
            ("\"50\"", "is not a CPU quota"),
            ("\"%\"", "is not a CPU quota"),
            ("\"-5%\"", "is not a CPU quota"),
            ("\"+5%\"", "is not a CPU quota"),
            ("\" 50%\"", "is not a CPU quota"),
            ("\"50 %\"", "is not a CPU quota"),
            ("\"50%%\"", "is not a CPU quota"),
            ("\".5%\"", "is not a CPU quota"),
            ("\"5.%\"", "is not a CPU quota"),
            ("\"1e2%\"", "is not a CPU quota"),
            ("\"1.6\"", "is not a CPU quota"),
            ("\"٥٠%\"", "is not a CPU quota"),
            ("\"\"", "is not a CPU quota"),
            ("\"12.3456%\"", "more than three decimals"),
            ("\"0%\"", "below the minimum of 1%"),
            ("\"0.999%\"", "below the minimum of 1%"),
            ("\"100000.001%\"", "above the maximum of 100000%"),
            ("\"99999999999999999999999%\"", "above the maximum"),
            ("50", "invalid type: integer"),
            ("1.6", "invalid type: floating point"),
        ] {
            let e = parse(&format!("{base}cpu_max = {value}\n")).unwrap_err();
            assert_eq!(
                (e.line, e.column, e.key.as_str()),
                (5, 11, "service[0].cpu_max"),
                "{value}: {e}"
            );
            assert!(e.message.contains(says), "{value}: {e}");
            assert!(
                e.to_string()
                    .starts_with("p.toml:5:11: key `service[0].cpu_max`: "),
                "{e}"
            );
        }
    }

    /// Counting cannot throttle: `cpu_max` without a cgroup of guardian's is refused, and the
    /// error says why and what to write instead.
    #[test]
    fn cpu_max_needs_its_own_cgroup() {
        for mode in ["cgroup = \"inherit\"\n", ""] {
            let text = format!(
                "[[service]]\nname = \"a\"\nmatch = {{ comm = \"x\" }}\n\n[[service]]\nname = \"b\"\nmatch = {{ comm = \"y\" }}\n{mode}cpu_max = \"160%\"\n"
            );
            let e = parse(&text).unwrap_err();
            let line = if mode.is_empty() { 8 } else { 9 };
            assert_eq!(
                (e.line, e.column, e.key.as_str()),
                (line, 11, "service[1].cpu_max"),
                "{mode:?}: {e}"
            );
            let shown = e.to_string();
            for part in [
                &format!("p.toml:{line}:11: key `service[1].cpu_max`: ") as &str,
                "cgroup = \"own\"",
                "cannot throttle CPU by counting",
            ] {
                assert!(shown.contains(part), "{part}: {shown}");
            }
        }
    }

    fn is_root() -> bool {
        rustix::process::geteuid().is_root()
    }

    fn chmod(path: &Path, mode: u32) {
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    /// A policy file, and every directory above it, that others than root could change.
    #[test]
    fn exposed_policy_files_are_found() {
        let tmp = tempfile::tempdir().unwrap();
        let top = fs::canonicalize(tmp.path()).unwrap();
        let dir = top.join("etc");
        fs::create_dir(&dir).unwrap();
        chmod(&dir, 0o755);
        let file = dir.join("p.toml");
        fs::write(&file, BASE).unwrap();
        chmod(&file, 0o644);
        // Only what this test controls: the directories above the temporary one are the host's.
        let found = |path: &Path| -> Vec<(PathBuf, Problem)> {
            Policy::load(path)
                .unwrap()
                .exposures
                .into_iter()
                .filter(|e| e.path.starts_with(&top))
                .map(|e| (e.path, e.problem))
                .collect()
        };
        let not_root = |e: &[(PathBuf, Problem)]| -> Vec<(PathBuf, Problem)> {
            e.iter()
                .filter(|x| x.1 != Problem::Owner)
                .cloned()
                .collect()
        };
        assert_eq!(not_root(&found(&file)), vec![], "0644 in a 0755 directory");
        for mode in [0o666, 0o646, 0o664] {
            chmod(&file, mode);
            assert_eq!(
                not_root(&found(&file)),
                vec![(file.clone(), Problem::Writable)],
                "{mode:o}"
            );
        }
        chmod(&file, 0o644);
        chmod(&dir, 0o777);
        assert_eq!(
            not_root(&found(&file)),
            vec![(dir.clone(), Problem::Writable)]
        );
        chmod(&dir, 0o1777);
        assert_eq!(not_root(&found(&file)), vec![], "sticky, like /tmp");
        chmod(&dir, 0o755);
        // A symlink is followed to the file it names: that file's directories count.
        let link = top.join("link.toml");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        chmod(&file, 0o666);
        assert_eq!(
            not_root(&found(&link)),
            vec![(file.clone(), Problem::Writable)]
        );
        chmod(&file, 0o644);

        if !is_root() {
            eprintln!("SKIPPED the ownership half of exposed_policy_files_are_found: needs root to give files away");
            return;
        }
        assert_eq!(
            found(&file),
            vec![],
            "root's 0644 file in root's 0755 directory"
        );
        std::os::unix::fs::chown(&file, Some(4242), None).unwrap();
        assert_eq!(found(&file), vec![(file.clone(), Problem::Owner)]);
        std::os::unix::fs::chown(&file, Some(0), None).unwrap();
        std::os::unix::fs::chown(&dir, Some(4242), None).unwrap();
        assert_eq!(found(&file), vec![(dir.clone(), Problem::Owner)]);
        std::os::unix::fs::chown(&top, Some(4242), None).unwrap();
        assert_eq!(
            found(&file),
            vec![(dir.clone(), Problem::Owner), (top.clone(), Problem::Owner)],
            "every directory above it"
        );
        std::os::unix::fs::chown(&dir, Some(0), None).unwrap();
        std::os::unix::fs::chown(&top, Some(0), None).unwrap();
    }

    /// What the refusal says: the path, its owner, its mode in octal, and the fix.
    #[test]
    fn exposures_say_what_to_fix() {
        let e = Exposure {
            path: "/srv/p.toml".into(),
            dir: false,
            uid: 1000,
            mode: 0o664,
            problem: Problem::Writable,
        };
        let text = e.to_string();
        for part in [
            "`/srv/p.toml`",
            "owner uid 1000",
            "mode 0664",
            "chmod go-w /srv/p.toml",
        ] {
            assert!(text.contains(part), "{part}: {text}");
        }
        let d = Exposure {
            path: "/srv".into(),
            dir: true,
            uid: 1000,
            mode: 0o1755,
            problem: Problem::Owner,
        };
        let text = d.to_string();
        for part in [
            "directory `/srv`",
            "owner uid 1000",
            "mode 01755",
            "chown root /srv",
        ] {
            assert!(text.contains(part), "{part}: {text}");
        }
        let mut p = parse(BASE).unwrap();
        assert!(p.enforceable_as_root().is_ok());
        p.exposures = vec![e, d];
        let refusal = p.enforceable_as_root().unwrap_err().to_string();
        assert!(
            refusal.starts_with("refusing to enforce `p.toml` as root"),
            "{refusal}"
        );
        assert!(
            refusal.contains("mode 0664") && refusal.contains("mode 01755"),
            "{refusal}"
        );
        assert!(refusal.contains("--dry-run"), "{refusal}");
        assert!(
            p.warnings()
                .iter()
                .filter(|w| w.contains("refuses to enforce"))
                .count()
                == 2,
            "{:?}",
            p.warnings()
        );
    }

    #[test]
    fn unreadable_files_name_no_line() {
        let e = Policy::load(Path::new("/no/such/policy.toml")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("/no/such/policy.toml: cannot read the policy: "),
            "{e}"
        );
    }

    /// Every policy shipped in `policies/` is valid.
    #[test]
    fn shipped_policies_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
        let mut n = 0;
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let p = Policy::load(&path).unwrap_or_else(|e| panic!("{e}"));
                for s in &p.services {
                    assert!(
                        s.selector.is_pinned(),
                        "{}: service `{}` can be joined by any local user",
                        path.display(),
                        s.name
                    );
                }
                n += 1;
            }
        }
        assert!(n > 0, "no policies in {}", dir.display());
    }

    /// The production guide's units run as `abcdeveloper`; the policy pins that account and still
    /// loads where it does not exist.
    #[test]
    fn analyticbot_pins_the_service_account() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/analyticbot.toml");
        let p = Policy::load(&path).unwrap();
        assert_eq!(p.services.len(), 3);
        for s in &p.services {
            let Some(User::Name { name, .. }) = &s.selector.user else {
                panic!("{} is not pinned to a user name", s.name);
            };
            assert_eq!(name, "abcdeveloper", "{}", s.name);
        }
        let missing = p.services[0].selector.unresolved_user().is_some();
        let warned = p
            .warnings()
            .iter()
            .filter(|w| w.contains("no user `abcdeveloper`"))
            .count();
        assert_eq!(warned, if missing { 3 } else { 0 }, "{:?}", p.warnings());
    }

    /// Fuzzing: whatever the text, parsing never panics, and every error names the file and a
    /// place inside the text.
    mod fuzz {
        use super::*;
        use proptest::{prelude::*, sample::Index};

        /// A valid policy using every key, one line each (inline tables keep keys on one line).
        const VALID: &str = r#"mode = "enforce"
protect = ["sshd", { user = "root" }, { exe = "/usr/sbin/**" }]
orphans_at_start = "report"
cgroup_parent = "/guardian"
[[service]]
name = "api"
match = { cmdline = "uvicorn .*app", user = "root", cgroup = "/system.slice/a.service/", exe = "/usr/bin/*" }
orphans = "terminate"
orphan_match = { cmdline = "multiprocessing", comm = "python*" }
kill_timeout = "30s"
orphans_at_start = "enforce"
tasks_max = 64
memory_high = "3500M"
memory_max = "4G"
memory_victim = "largest"
cgroup = "inherit"
[[service]]
name = "bot"
match = { user = 0 }
cgroup = "own"
cpu_max = "160%"
"#;

        const KEYS: &[&str] = &[
            "mode",
            "protect",
            "orphans_at_start",
            "cgroup_parent",
            "name",
            "match",
            "orphans",
            "orphan_match",
            "kill_timeout",
            "tasks_max",
            "memory_high",
            "memory_max",
            "memory_victim",
            "cgroup",
            "cpu_max",
            "cmdline",
            "exe",
            "comm",
            "user",
            "service",
        ];

        const VALUES: &[&str] = &[
            r#""""#,
            r#""x""#,
            r#""é🦀""#,
            r#""../x""#,
            r#""a/b""#,
            r#"".hidden""#,
            r#""no-such-user-x""#,
            r#""(""#,
            r#""[""#,
            r#""**""#,
            r#""/""#,
            r#""25h""#,
            r#""0s""#,
            r#""18446744073709551615s""#,
            r#""99999999999999999999999h""#,
            r#""16E""#,
            r#""1M""#,
            r#""-1G""#,
            r#""kill""#,
            r#""own""#,
            r#""50%""#,
            r#""12.5%""#,
            "0",
            "-1",
            "9223372036854775807",
            "99999999999999999999",
            "4294967296",
            "1e400",
            "nan",
            "true",
            "1979-05-27T07:32:00Z",
            "[]",
            r#"[1, "a", {}]"#,
            "{}",
            r#"{ user = "root" }"#,
            "{ usr = 1 }",
            r#"{ cmdline = "x", exe = "rel" }"#,
            r#"[{ exe = "[" }]"#,
            r#""\u00e9""#,
            "'''a\nb'''",
        ];

        fn value() -> impl Strategy<Value = String> {
            prop_oneof![
                3 => proptest::sample::select(VALUES).prop_map(str::to_owned),
                1 => any::<i64>().prop_map(|n| n.to_string()),
                2 => "[^\"\\\\\\p{C}]{0,24}".prop_map(|s| format!("\"{s}\"")),
                1 => "\\PC{0,12}",
            ]
        }

        fn key() -> impl Strategy<Value = String> {
            prop_oneof![
                4 => proptest::sample::select(KEYS).prop_map(str::to_owned),
                1 => "[a-z_.]{1,10}",
                1 => "\\PC{1,6}",
            ]
        }

        const HEADERS: &[&str] = &[
            "[[service]]",
            "[service]",
            "[service.match]",
            "[[protect]]",
            "[",
        ];

        /// One change to the lines of [`VALID`].
        #[derive(Debug, Clone)]
        enum Edit {
            Delete(Index),
            Duplicate(Index),
            Replace(Index, String, String),
            /// A line's value replaced, its key kept.
            Value(Index, String),
            Insert(Index, String, String),
            Header(Index, &'static str),
            /// A line cut short, anywhere (inside a multi-byte character too).
            Cut(Index, Index),
        }

        fn edit() -> impl Strategy<Value = Edit> {
            prop_oneof![
                1 => any::<Index>().prop_map(Edit::Delete),
                1 => any::<Index>().prop_map(Edit::Duplicate),
                1 => (any::<Index>(), key(), value()).prop_map(|(i, k, v)| Edit::Replace(i, k, v)),
                6 => (any::<Index>(), value()).prop_map(|(i, v)| Edit::Value(i, v)),
                1 => (any::<Index>(), key(), value()).prop_map(|(i, k, v)| Edit::Insert(i, k, v)),
                1 => (any::<Index>(), proptest::sample::select(HEADERS))
                    .prop_map(|(i, h)| Edit::Header(i, h)),
                1 => (any::<Index>(), any::<Index>()).prop_map(|(i, at)| Edit::Cut(i, at)),
            ]
        }

        fn apply(edits: &[Edit]) -> String {
            let mut lines: Vec<String> = VALID.lines().map(str::to_owned).collect();
            for e in edits {
                let n = lines.len();
                match e {
                    Edit::Delete(i) if n > 0 => {
                        lines.remove(i.index(n));
                    }
                    Edit::Duplicate(i) if n > 0 => {
                        let l = lines[i.index(n)].clone();
                        lines.insert(i.index(n), l);
                    }
                    Edit::Replace(i, k, v) if n > 0 => lines[i.index(n)] = format!("{k} = {v}"),
                    Edit::Value(i, v) if n > 0 => {
                        let l = &mut lines[i.index(n)];
                        if let Some((k, _)) = l.split_once(" = ") {
                            *l = format!("{k} = {v}");
                        }
                    }
                    Edit::Insert(i, k, v) => lines.insert(i.index(n + 1), format!("{k} = {v}")),
                    Edit::Header(i, h) => lines.insert(i.index(n + 1), (*h).to_owned()),
                    Edit::Cut(i, at) if n > 0 => {
                        let l = &mut lines[i.index(n)];
                        let bytes = l.as_bytes()[..at.index(l.len() + 1)].to_vec();
                        *l = String::from_utf8_lossy(&bytes).into_owned();
                    }
                    _ => {}
                }
            }
            lines.join("\n")
        }

        fn check(text: &str) -> Result<(), TestCaseError> {
            let e = match Policy::parse(Path::new("fuzz.toml"), text) {
                Ok(p) => {
                    // What `guardian check` and the start-up print must not panic either.
                    let _ = (crate::daemon::check(&p), p.warnings());
                    return Ok(());
                }
                Err(e) => e,
            };
            let shown = e.to_string();
            prop_assert!(shown.starts_with("fuzz.toml:"), "{}", shown);
            prop_assert!(e.line >= 1 && e.column >= 1, "{}", shown);
            let line = text.split('\n').nth(e.line - 1);
            prop_assert!(line.is_some(), "line {} of {:?}: {}", e.line, text, shown);
            let width = line.unwrap_or_default().chars().count();
            prop_assert!(
                e.column <= width + 1,
                "column {} of {:?}: {}",
                e.column,
                text,
                shown
            );
            Ok(())
        }

        #[test]
        fn the_template_is_valid() {
            Policy::parse(Path::new("fuzz.toml"), VALID).unwrap();
        }

        proptest! {
            #![proptest_config(crate::fuzz_config())]

            #[test]
            fn arbitrary_text(text in "\\PC{0,200}") {
                check(&text)?;
            }

            #[test]
            fn toml_shaped_text(text in "([a-z_]{1,8}( = |=)[\"'\\[\\]{},.=0-9a-z/ é-]{0,16}\n?|\\[\\[service\\]\\]\n){0,12}") {
                check(&text)?;
            }

            #[test]
            fn edited_valid_policies(edits in proptest::collection::vec(edit(), 1..4)) {
                check(&apply(&edits))?;
            }
        }
    }
}
