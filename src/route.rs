//! The routing decision, as a pure function:
//! `decide(&Haid, &AliasTable, &impl HealthView) -> Decision`.
//!
//! No IO, no lock, no `.await` and no allocation. `proxy` calls it once per request in
//! `request_filter` and keeps the answer in the request context.

use crate::aliases::AliasTable;
use crate::haid::Haid;
use crate::health::HealthView;

/// The role of the instance a request is sent to, sent upstream as `x-hagate-role`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The HAID's main instance.
    Main,
    /// The HAID's backup instance.
    Backup,
    /// Neither was live: an instance chosen by the re-placement ring.
    Replacement,
}

impl Role {
    /// The header and metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Main => "main",
            Role::Backup => "backup",
            Role::Replacement => "replacement",
        }
    }
}

/// One place a request may go: an index into the table, and the role it plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    /// Index into the `AliasTable` the decision was made on.
    pub instance: usize,
    /// Main or backup.
    pub role: Role,
}

/// Where a request with a HAID goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision<'h> {
    /// Send to `primary`; if it cannot be reached, retry once on `fallback`.
    Forward {
        /// The first choice.
        primary: Target,
        /// The other alias of the HAID, if the table knows it.
        fallback: Option<Target>,
    },
    /// Neither alias is in the table. Carries the first unknown alias.
    UnknownAlias {
        /// The alias to name in the error.
        alias: &'h str,
    },
    /// At least one alias is known, but no known one is live.
    NoLiveInstance {
        /// The first alias the table does not know, if any.
        unknown: Option<&'h str>,
    },
}

/// Decides where a request for `haid` goes.
///
/// - the main if it is live, with the backup as the retry target;
/// - else the backup if it is live, with the main as the retry target (health may lag);
/// - else `NoLiveInstance`, or `UnknownAlias` when the table knows neither alias.
///
/// An alias the table does not know is treated like a dead instance, so a HAID whose
/// backup is known and live is still served.
#[inline]
pub fn decide<'h>(haid: &Haid<'h>, table: &AliasTable, health: &impl HealthView) -> Decision<'h> {
    // An alias holding a lone surrogate (see `haid::Broken`) matches no table alias.
    let main = table.resolve(haid.main).filter(|_| !haid.broken.main);
    let backup_idx = table.resolve(haid.backup).filter(|_| !haid.broken.backup);
    let backup = backup_idx.filter(|b| Some(*b) != main);
    let live = |i: Option<usize>| {
        i.filter(|&i| {
            let inst = table.get(i);
            health.is_live(inst.alias.as_str(), &inst.state)
        })
    };
    let target = |instance, role| Target { instance, role };

    if let Some(m) = live(main) {
        return Decision::Forward {
            primary: target(m, Role::Main),
            fallback: backup.map(|b| target(b, Role::Backup)),
        };
    }
    if let Some(b) = live(backup) {
        return Decision::Forward {
            primary: target(b, Role::Backup),
            fallback: main.map(|m| target(m, Role::Main)),
        };
    }
    match (main.is_some(), backup_idx.is_some()) {
        (false, false) => Decision::UnknownAlias { alias: haid.main },
        (false, true) => Decision::NoLiveInstance {
            unknown: Some(haid.main),
        },
        (true, false) => Decision::NoLiveInstance {
            unknown: Some(haid.backup),
        },
        (true, true) => Decision::NoLiveInstance { unknown: None },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aliases::{InstanceSpec, TableHolder};
    use crate::haid::decode;
    use crate::health::InstanceState;
    use std::collections::{BTreeMap, HashSet};

    struct Dead(HashSet<&'static str>);
    impl HealthView for Dead {
        fn is_live(&self, alias: &str, _state: &InstanceState) -> bool {
            !self.0.contains(alias)
        }
    }

    fn table() -> std::sync::Arc<AliasTable> {
        let specs: BTreeMap<String, InstanceSpec> = [("cs_1", 1), ("cs_2", 2), ("cs_3", 3)]
            .into_iter()
            .map(|(a, p)| (a.to_string(), InstanceSpec::at(format!("127.0.0.1:{p}"))))
            .collect();
        TableHolder::new(&specs).unwrap().load()
    }

    #[test]
    fn decision_table() {
        let t = table();
        let idx = |a: &str| t.resolve(a).unwrap();
        let fwd = |p: &str, pr: Role, f: Option<(&str, Role)>| Decision::Forward {
            primary: Target {
                instance: idx(p),
                role: pr,
            },
            fallback: f.map(|(a, r)| Target {
                instance: idx(a),
                role: r,
            }),
        };
        use Role::*;
        #[rustfmt::skip]
        let cases: Vec<(&str, Vec<&'static str>, Decision)> = vec![
            // haid, dead aliases, expected
            ("4-4--cs_1cs_21", vec![],               fwd("cs_1", Main, Some(("cs_2", Backup)))),
            ("4-4--cs_1cs_21", vec!["cs_2"],         fwd("cs_1", Main, Some(("cs_2", Backup)))),
            ("4-4--cs_1cs_21", vec!["cs_1"],         fwd("cs_2", Backup, Some(("cs_1", Main)))),
            ("4-4--cs_1cs_21", vec!["cs_1", "cs_2"], Decision::NoLiveInstance { unknown: None }),
            ("4-4--cs_1cs_91", vec![],               fwd("cs_1", Main, None)),
            ("4-4--cs_9cs_21", vec![],               fwd("cs_2", Backup, None)),
            ("4-4--cs_9cs_21", vec!["cs_2"],         Decision::NoLiveInstance { unknown: Some("cs_9") }),
            ("4-4--cs_1cs_91", vec!["cs_1"],         Decision::NoLiveInstance { unknown: Some("cs_9") }),
            ("4-4--cs_9cs_81", vec![],               Decision::UnknownAlias { alias: "cs_9" }),
            ("4-4--cs_1cs_11", vec![],               fwd("cs_1", Main, None)),
            ("4-4--cs_1cs_11", vec!["cs_1"],         Decision::NoLiveInstance { unknown: None }),
            ("4-4-4--cs_1cs_2cs_31", vec!["cs_1", "cs_2"], Decision::NoLiveInstance { unknown: None }),
        ];
        for (haid, dead, want) in cases {
            let h = decode(haid).unwrap();
            let got = decide(&h, &t, &Dead(dead.iter().copied().collect()));
            assert_eq!(got, want, "{haid} with {dead:?} dead");
        }
    }
}
