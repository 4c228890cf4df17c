//! The exec filter: what the kernel checks before it reports an exec of a process guardian does
//! not follow.
//!
//! A service's roots appear at exec, and most execs on a host can make none; sending each one
//! to the daemon to be matched costs a record and a wakeup. So each service gets one key of
//! conditions its `match` requires and the kernel sees at exec: the effective uid (`user`) and
//! the new process name (`comm`, when its glob is a plain name). The kernel reports an exec that
//! matches any service's key, plus every exec of a process it tracks (a member that execs may
//! become a root of another service): what it keeps back no selector could match. A service
//! with neither condition (only `cmdline`, `exe` or `cgroup`, which the kernel side does not
//! read) turns the filter off: every exec is reported.

use std::collections::BTreeSet;

use guardian_common::{exec_key, ExecKey, COMM_LEN};

use super::{selector::Selector, Policy};

/// What the kernel checks for one service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Condition {
    /// Execs with this effective uid and/or this new `comm`.
    Key {
        uid: Option<u32>,
        comm: Option<String>,
    },
    /// The service matches no process now (a user name that does not resolve yet, a `comm`
    /// longer than any process name): none of its execs needs reporting.
    Never,
    /// Nothing the kernel can check: every exec must be reported.
    Unchecked,
}

impl Condition {
    /// The condition of a service's `match`.
    pub fn of(selector: &Selector) -> Self {
        let uid = match &selector.user {
            Some(user) => match user.uid() {
                Some(uid) => Some(uid),
                None => return Self::Never,
            },
            None => None,
        };
        let comm = match &selector.comm {
            Some((glob, _)) if is_plain_name(glob) => {
                // A process name is at most 15 bytes: no process has a longer one.
                if glob.len() >= COMM_LEN {
                    return Self::Never;
                }
                Some(glob.clone())
            }
            _ => None,
        };
        if uid.is_none() && comm.is_none() {
            return Self::Unchecked;
        }
        Self::Key { uid, comm }
    }

    fn key(&self) -> Option<ExecKey> {
        let Self::Key { uid, comm } = self else {
            return None;
        };
        let mut key = ExecKey {
            fields: 0,
            uid: 0,
            comm: [0; COMM_LEN],
        };
        if let Some(uid) = uid {
            key.fields |= exec_key::UID;
            key.uid = *uid;
        }
        if let Some(comm) = comm {
            key.fields |= exec_key::COMM;
            key.comm[..comm.len()].copy_from_slice(comm.as_bytes());
        }
        Some(key)
    }

    /// For `guardian check`.
    pub fn describe(&self) -> String {
        match self {
            Self::Key { uid, comm } => {
                let mut parts = Vec::new();
                if let Some(uid) = uid {
                    parts.push(format!("uid {uid}"));
                }
                if let Some(comm) = comm {
                    parts.push(format!("comm `{comm}`"));
                }
                format!("execs with {}", parts.join(" and "))
            }
            Self::Never => "none (it matches no process now)".to_owned(),
            Self::Unchecked => "every exec (no `user`, and no `comm` without wildcards)".to_owned(),
        }
    }
}

/// A `comm` glob the kernel can compare byte for byte: no wildcard, class, alternation or
/// escape. The daemon decodes a process name lossily, so a name holding U+FFFD could stand for
/// other bytes: not plain either.
fn is_plain_name(glob: &str) -> bool {
    !glob.contains([
        '*',
        '?',
        '[',
        ']',
        '{',
        '}',
        '\\',
        char::REPLACEMENT_CHARACTER,
    ])
}

/// The filter of a whole policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecFilter {
    /// Each service's name and condition, in policy order.
    pub services: Vec<(String, Condition)>,
}

impl ExecFilter {
    pub fn new(policy: &Policy) -> Self {
        Self {
            services: policy
                .services
                .iter()
                .map(|s| (s.name.clone(), Condition::of(&s.selector)))
                .collect(),
        }
    }

    /// The keys for the kernel; `None` when the filter is off.
    pub fn keys(&self) -> Option<BTreeSet<ExecKey>> {
        if self
            .services
            .iter()
            .any(|(_, c)| *c == Condition::Unchecked)
        {
            return None;
        }
        Some(self.services.iter().filter_map(|(_, c)| c.key()).collect())
    }

    /// One line, for the daemon's log and `guardian check`.
    pub fn describe(&self) -> String {
        let unchecked: Vec<String> = self
            .services
            .iter()
            .filter(|(_, c)| *c == Condition::Unchecked)
            .map(|(name, _)| format!("`{name}`"))
            .collect();
        if !unchecked.is_empty() {
            return format!(
                "off: every exec on the host is reported and matched by guardian, because the \
                 `match` of service {} requires neither a `user` nor a `comm` without wildcards",
                unchecked.join(", ")
            );
        }
        let keys: Vec<String> = self
            .services
            .iter()
            .filter(|(_, c)| matches!(c, Condition::Key { .. }))
            .map(|(name, c)| format!("{} (`{name}`)", c.describe()))
            .collect();
        if keys.is_empty() {
            return "on: the kernel reports only execs of processes guardian follows (no \
                    service matches any process now)"
                .to_owned();
        }
        format!(
            "on: the kernel reports only execs of processes guardian follows and {}",
            keys.join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::selector::User;
    use globset::Glob;
    use regex::Regex;

    fn sel(f: impl FnOnce(&mut Selector)) -> Selector {
        let mut s = Selector::default();
        f(&mut s);
        s
    }

    fn comm(g: &str) -> Option<(String, globset::GlobMatcher)> {
        Some((g.to_owned(), Glob::new(g).unwrap().compile_matcher()))
    }

    fn key(uid: Option<u32>, comm: Option<&str>) -> Condition {
        Condition::Key {
            uid,
            comm: comm.map(str::to_owned),
        }
    }

    #[test]
    fn each_selector_key_gives_its_condition() {
        let cmdline = || Some(Regex::new("app").unwrap());
        let cases = [
            (sel(|s| s.user = Some(User::Id(998))), key(Some(998), None)),
            (
                sel(|s| s.comm = comm("python3")),
                key(None, Some("python3")),
            ),
            (
                sel(|s| s.exe = comm("/usr/bin/python3")),
                Condition::Unchecked,
            ),
            (
                sel(|s| s.cgroup = Some("/system.slice/app.service".into())),
                Condition::Unchecked,
            ),
            (sel(|s| s.cmdline = cmdline()), Condition::Unchecked),
            // Combinations: every condition the kernel can check is in the key.
            (
                sel(|s| {
                    s.user = Some(User::Id(0));
                    s.comm = comm("app");
                }),
                key(Some(0), Some("app")),
            ),
            (
                sel(|s| {
                    s.user = Some(User::Id(998));
                    s.cmdline = cmdline();
                    s.exe = comm("/usr/bin/*");
                    s.cgroup = Some("/a".into());
                }),
                key(Some(998), None),
            ),
            (
                sel(|s| {
                    s.comm = comm("app");
                    s.cmdline = cmdline();
                }),
                key(None, Some("app")),
            ),
            // A resolved name is its uid; one that does not resolve matches nothing yet.
            (
                sel(|s| {
                    s.user = Some(User::Name {
                        name: "app".into(),
                        uid: Some(4242),
                    })
                }),
                key(Some(4242), None),
            ),
            (
                sel(|s| {
                    s.user = Some(User::Name {
                        name: "app".into(),
                        uid: None,
                    });
                    s.comm = comm("app");
                }),
                Condition::Never,
            ),
        ];
        for (selector, want) in cases {
            assert_eq!(Condition::of(&selector), want, "{}", selector.describe());
        }
    }

    /// Only a plain name is compared in the kernel; a glob leaves the uid (or nothing).
    #[test]
    fn comm_globs_are_not_plain_names() {
        for glob in [
            "python*",
            "py?hon",
            "[pP]ython",
            "{a,b}",
            "a\\*",
            "a]",
            "x\u{fffd}",
        ] {
            assert_eq!(
                Condition::of(&sel(|s| s.comm = comm(glob))),
                Condition::Unchecked,
                "{glob}"
            );
            assert_eq!(
                Condition::of(&sel(|s| {
                    s.comm = comm(glob);
                    s.user = Some(User::Id(7));
                })),
                key(Some(7), None),
                "{glob}"
            );
        }
        // 15 bytes is the longest name; 16 cannot be any process's.
        let c15 = "a".repeat(15);
        assert_eq!(
            Condition::of(&sel(|s| s.comm = comm(&c15))),
            key(None, Some(&c15))
        );
        assert_eq!(
            Condition::of(&sel(|s| s.comm = comm(&"a".repeat(16)))),
            Condition::Never
        );
    }

    fn policy(text: &str) -> Policy {
        Policy::parse(std::path::Path::new("p.toml"), text).unwrap()
    }

    #[test]
    fn one_unchecked_service_turns_the_filter_off() {
        let on = policy(
            "[[service]]\nname = \"a\"\nmatch = { user = 998, cmdline = \"x\" }\n\n\
             [[service]]\nname = \"b\"\nmatch = { comm = \"python3\", user = 0 }\n\n\
             [[service]]\nname = \"c\"\nmatch = { comm = \"worker\", exe = \"/opt/*\" }\n",
        );
        let f = ExecFilter::new(&on);
        let keys = f.keys().expect("the filter is on");
        let padded = |s: &str| {
            let mut c = [0; COMM_LEN];
            c[..s.len()].copy_from_slice(s.as_bytes());
            c
        };
        let want: BTreeSet<ExecKey> = [
            ExecKey {
                fields: exec_key::UID,
                uid: 998,
                comm: [0; COMM_LEN],
            },
            ExecKey {
                fields: exec_key::UID | exec_key::COMM,
                uid: 0,
                comm: padded("python3"),
            },
            ExecKey {
                fields: exec_key::COMM,
                uid: 0,
                comm: padded("worker"),
            },
        ]
        .into();
        assert_eq!(keys, want);
        assert!(f.describe().starts_with("on: "), "{}", f.describe());
        assert!(f.describe().contains("uid 0 and comm `python3` (`b`)"));

        let off = policy(
            "[[service]]\nname = \"a\"\nmatch = { user = 998 }\n\n\
             [[service]]\nname = \"loose\"\nmatch = { cmdline = \"x\", exe = \"/opt/*\" }\n",
        );
        let f = ExecFilter::new(&off);
        assert_eq!(f.keys(), None);
        assert!(
            f.describe().starts_with("off: ") && f.describe().contains("`loose`"),
            "{}",
            f.describe()
        );
    }

    #[test]
    fn services_that_match_nothing_need_no_key() {
        let p = policy(
            "[[service]]\nname = \"a\"\nmatch = { user = \"no-such-user-guardian-test\" }\n",
        );
        let f = ExecFilter::new(&p);
        assert_eq!(f.keys(), Some(BTreeSet::new()));
        assert!(
            f.describe().contains("no service matches"),
            "{}",
            f.describe()
        );
    }
}
