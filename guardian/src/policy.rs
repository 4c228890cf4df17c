//! Policy files: parsing and validation.
//!
//! Policies are strict: an unknown key is an error (a typo must not silently disable a rule), and
//! every error names the file, line, column and key. A policy that fails validation changes
//! nothing: guardian refuses to start with it.

use std::{
    collections::HashSet,
    fmt, fs,
    ops::Range,
    path::{Path, PathBuf},
    time::Duration,
};

use globset::{Glob, GlobMatcher};
use regex::Regex;
use serde::Deserialize;
use toml::Spanned;

use crate::selector::Selector;

/// How long `terminate` waits between SIGTERM and SIGKILL unless the policy says otherwise.
pub const DEFAULT_KILL_TIMEOUT: Duration = Duration::from_secs(10);

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

/// A validated policy.
#[derive(Debug)]
pub struct Policy {
    pub path: PathBuf,
    pub mode: Mode,
    /// `comm` names never signalled, on top of the built-in protections.
    pub protect: Vec<String>,
    pub services: Vec<Service>,
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
        write!(f, "{}:{}:{}: ", self.path.display(), self.line, self.column)?;
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
    protect: Vec<Spanned<String>>,
    orphans_at_start: Option<AtStart>,
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
                let before = &self.text[..span.start.min(self.text.len())];
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
    /// Reads and validates a policy file.
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let text = fs::read_to_string(path).map_err(|e| PolicyError {
            path: path.to_path_buf(),
            line: 0,
            column: 0,
            key: String::new(),
            message: format!("cannot read the policy: {e}"),
        })?;
        Self::parse(path, &text)
    }

    /// Validates policy text; `path` is used in error messages.
    pub fn parse(path: &Path, text: &str) -> Result<Self, PolicyError> {
        let loc = Locator { path, text };
        let de = toml::Deserializer::new(text);
        let raw: RawPolicy = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            let key = if key == "." { String::new() } else { key };
            loc.error(inner.span(), &key, inner.message().to_owned())
        })?;

        let mut names = HashSet::new();
        let mut services = Vec::new();
        for (i, s) in raw.services.into_iter().enumerate() {
            let key = |k: &str| format!("service[{i}].{k}");
            let name = s.name.get_ref().trim().to_owned();
            if name.is_empty() {
                return Err(loc.error(Some(s.name.span()), &key("name"), "must not be empty"));
            }
            if !names.insert(name.clone()) {
                return Err(loc.error(
                    Some(s.name.span()),
                    &key("name"),
                    format!("duplicate service name `{name}`"),
                ));
            }
            let selector = selector(&loc, &key("match"), s.selector)?;
            let orphan_match = s
                .orphan_match
                .map(|m| selector_from(&loc, &key("orphan_match"), m))
                .transpose()?;
            let kill_timeout = match s.kill_timeout {
                Some(t) => {
                    let d = humantime::parse_duration(t.get_ref()).map_err(|e| {
                        loc.error(
                            Some(t.span()),
                            &key("kill_timeout"),
                            format!(
                                "`{}` is not a duration (e.g. \"30s\", \"250ms\"): {e}",
                                t.get_ref()
                            ),
                        )
                    })?;
                    if d.is_zero() {
                        return Err(loc.error(
                            Some(t.span()),
                            &key("kill_timeout"),
                            "must be greater than zero (use `orphans = \"kill\"` for an immediate SIGKILL)",
                        ));
                    }
                    d
                }
                None => DEFAULT_KILL_TIMEOUT,
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
            });
        }
        if services.is_empty() {
            return Err(loc.error(
                None,
                "service",
                "the policy names no service (add a [[service]] table)",
            ));
        }
        let mut protect = Vec::new();
        for (i, p) in raw.protect.into_iter().enumerate() {
            if p.get_ref().is_empty() || p.get_ref().len() > 15 {
                return Err(loc.error(
                    Some(p.span()),
                    &format!("protect[{i}]"),
                    "must be a process name (comm) of 1 to 15 characters",
                ));
            }
            protect.push(p.into_inner());
        }
        Ok(Self {
            path: path.to_path_buf(),
            mode: raw.mode.unwrap_or(Mode::Enforce),
            protect,
            services,
        })
    }
}

fn selector(
    loc: &Locator<'_>,
    key: &str,
    raw: Spanned<RawSelector>,
) -> Result<Selector, PolicyError> {
    selector_from(loc, key, raw)
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
    let glob = |g: Option<Spanned<String>>,
                k: &str|
     -> Result<Option<(String, GlobMatcher)>, PolicyError> {
        g.map(|g| {
            Glob::new(g.get_ref())
                .map(|m| (g.get_ref().clone(), m.compile_matcher()))
                .map_err(|e| loc.error(Some(g.span()), &sub(k), format!("invalid glob: {e}")))
        })
        .transpose()
    };
    let exe = glob(raw.exe, "exe")?;
    let comm = glob(raw.comm, "comm")?;
    let cgroup = raw
        .cgroup
        .map(|c| {
            if c.get_ref().starts_with('/') {
                Ok(c.into_inner())
            } else {
                Err(loc.error(
                    Some(c.span()),
                    &sub("cgroup"),
                    "must be an absolute cgroup path prefix (as in /proc/PID/cgroup), e.g. \"/system.slice/app.service\"",
                ))
            }
        })
        .transpose()?;
    let user = raw
        .user
        .map(|u| {
            let span = u.span();
            match u.into_inner() {
                RawUser::Id(id) => Ok(id),
                RawUser::Name(name) => match name.parse::<u32>() {
                    Ok(id) => Ok(id),
                    Err(_) => match nix::unistd::User::from_name(&name) {
                        Ok(Some(user)) => Ok(user.uid.as_raw()),
                        _ => Err(loc.error(
                            Some(span),
                            &sub("user"),
                            format!("no such user `{name}`"),
                        )),
                    },
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Policy, PolicyError> {
        Policy::parse(Path::new("p.toml"), text)
    }

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
        assert_eq!(p.protect, vec!["sshd"]);
        assert_eq!(p.services.len(), 2);
        let s = &p.services[0];
        assert_eq!(s.orphans, OrphanAction::Kill);
        assert!(s.orphan_match.is_some());
        assert_eq!(s.kill_timeout, DEFAULT_KILL_TIMEOUT);
        assert_eq!(s.orphans_at_start, AtStart::Report);
        let b = &p.services[1];
        assert_eq!(b.orphans, OrphanAction::Terminate, "the default action");
        assert_eq!(b.kill_timeout, Duration::from_millis(250));
        assert_eq!(b.selector.user, Some(0));
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
    fn users_by_name_and_unknown_users() {
        let p = parse("[[service]]\nname = \"a\"\nmatch = { user = \"root\" }\n").unwrap();
        assert_eq!(p.services[0].selector.user, Some(0));
        let e = parse("[[service]]\nname = \"a\"\nmatch = { user = \"no-such-user-here\" }\n")
            .unwrap_err();
        assert!(e.message.contains("no such user"), "{e}");
    }

    /// Every policy shipped in `policies/` is valid.
    #[test]
    fn shipped_policies_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
        let mut n = 0;
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                Policy::load(&path).unwrap_or_else(|e| panic!("{e}"));
                n += 1;
            }
        }
        assert!(n > 0, "no policies in {}", dir.display());
    }
}
