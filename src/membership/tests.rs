//! The protocol under random schedules: the embedded store and three `AgentCore`s, with
//! crashes, restarts, lost messages and clock advances.
//!
//! - SingleLeader (hpcpack): at no instant do two live agents act as holder.
//! - Election: once the schedule calms down (no loss, no crash) and some agent keeps
//!   heartbeating every I, a holder is elected within 2T.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::store::embedded::{Clock, EmbeddedStore};

const I: u64 = 100;
const T: u64 = 350;
const AGENTS: usize = 3;

#[derive(Default)]
struct Manual(AtomicU64);
impl Clock for Manual {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// Which message of one interval is lost.
#[derive(Debug, Clone, Copy)]
enum Loss {
    None,
    /// The `GetPrimary` request or its answer.
    Primary,
    /// The heartbeat request (never reaches the store).
    Request,
    /// The heartbeat's answer (the store applied it).
    Answer,
}

#[derive(Debug, Clone)]
enum Op {
    /// Agent `n` runs one interval.
    Tick(usize, Loss),
    /// The clock moves on.
    Advance(u64),
    /// Agent `n`'s process dies (`kill -9`).
    Crash(usize),
    /// Agent `n` starts again with a fresh uuid.
    Restart(usize),
}

fn op() -> impl Strategy<Value = Op> {
    let loss = prop_oneof![
        6 => Just(Loss::None),
        1 => Just(Loss::Primary),
        1 => Just(Loss::Request),
        1 => Just(Loss::Answer),
    ];
    prop_oneof![
        8 => (0..AGENTS, loss).prop_map(|(n, l)| Op::Tick(n, l)),
        6 => (1..=T).prop_map(Op::Advance),
        1 => (0..AGENTS).prop_map(Op::Crash),
        1 => (0..AGENTS).prop_map(Op::Restart),
    ]
}

struct World {
    clock: Arc<Manual>,
    store: EmbeddedStore,
    agents: Vec<Option<AgentCore>>,
    uuids: u64,
}

impl World {
    fn new() -> Self {
        let clock = Arc::new(Manual::default());
        let store = EmbeddedStore::with_clock(Duration::from_millis(T), clock.clone(), 1);
        let mut w = World {
            clock,
            store,
            agents: vec![None; AGENTS],
            uuids: 0,
        };
        for n in 0..AGENTS {
            w.start(n);
        }
        w
    }

    fn now(&self) -> u64 {
        self.clock.now_ms()
    }

    fn start(&mut self, n: usize) {
        self.uuids += 1;
        let params = Params::new(Duration::from_millis(I), Duration::from_millis(T)).unwrap();
        self.agents[n] = Some(AgentCore::new(
            format!("uuid-{}", self.uuids),
            Alias::try_from("cs_1".to_string()).unwrap(),
            format!("127.0.0.1:{}", 9000 + n),
            params,
            self.now(),
        ));
    }

    /// One interval of agent `n`; a step-down ends its process.
    fn tick(&mut self, n: usize, loss: Loss) {
        let now = self.now();
        let Some(agent) = self.agents[n].as_mut() else {
            return;
        };
        let primary = self.store.primary("cs_1");
        let answer = (!matches!(loss, Loss::Primary)).then_some(&primary);
        let stop = match agent.on_primary(now, true, answer) {
            Decision::StepDown(_) => true,
            Decision::Wait => false,
            Decision::Heartbeat(hb) => {
                let outcome = match loss {
                    Loss::Request => None,
                    _ => Some(self.store.update(&hb)),
                };
                let seen = if matches!(loss, Loss::Answer) {
                    None
                } else {
                    outcome.as_ref()
                };
                agent.on_heartbeat(now, now, seen).is_some()
            }
        };
        if stop {
            self.agents[n] = None;
        }
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Tick(n, loss) => self.tick(n, loss),
            Op::Advance(ms) => {
                self.clock.0.fetch_add(ms, Ordering::SeqCst);
            }
            Op::Crash(n) => self.agents[n] = None,
            Op::Restart(n) => {
                if self.agents[n].is_none() {
                    self.start(n);
                }
            }
        }
    }

    fn holders(&self) -> Vec<String> {
        let now = self.now();
        self.agents
            .iter()
            .flatten()
            .filter(|a| a.acting_holder(now))
            .map(|a| a.uuid().to_string())
            .collect()
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn never_two_holders_and_a_holder_within_2t(ops in proptest::collection::vec(op(), 1..250)) {
        let mut w = World::new();
        for op in &ops {
            w.apply(op);
            let holders = w.holders();
            prop_assert!(holders.len() <= 1, "two holders {holders:?} after {op:?} at {}", w.now());
        }
        // Calm: no loss, no crash; every live agent heartbeats every I, and at least one lives.
        if w.agents.iter().all(Option::is_none) {
            w.start(0);
        }
        let calm = w.now();
        loop {
            for n in 0..AGENTS {
                w.tick(n, Loss::None);
                prop_assert!(w.holders().len() <= 1);
            }
            if w.holders().len() == 1 {
                break;
            }
            if w.agents.iter().all(Option::is_none) {
                w.start(0); // a step-down ended the last agent: its supervisor restarts it
            }
            w.apply(&Op::Advance(I));
            prop_assert!(w.now() - calm <= 2 * T, "no holder elected within 2T of {calm}");
        }
    }
}

#[test]
fn params_need_t_above_2i() {
    let ms = Duration::from_millis;
    assert!(Params::new(ms(100), ms(201)).is_ok());
    assert!(matches!(
        Params::new(ms(100), ms(200)),
        Err(ParamsError::TooShort { .. })
    ));
    assert_eq!(Params::new(ms(0), ms(200)), Err(ParamsError::ZeroInterval));
}

/// A standby agent `a` for `cs_1`, and a `GetPrimary` answer with no holder.
fn fresh_agent() -> (AgentCore, Primary) {
    let params = Params::new(Duration::from_millis(I), Duration::from_millis(T)).unwrap();
    let alias = Alias::try_from("cs_1".to_string()).unwrap();
    let agent = AgentCore::new("a".into(), alias, "127.0.0.1:1".into(), params, 0);
    let empty = Primary {
        holder: None,
        token: 0,
    };
    (agent, empty)
}

/// The entry a store writes for `hb` at revision `rev` (a claim: the epoch is `rev`).
fn entry_of(hb: &crate::store::Heartbeat, rev: u64) -> crate::store::Entry {
    crate::store::Entry {
        uuid: hb.uuid.clone(),
        alias: hb.alias.clone(),
        address: hb.address.clone(),
        timestamp_ms: 0,
        revision: rev,
        epoch: rev,
    }
}

#[test]
fn a_holder_steps_down_when_another_is_named_or_health_fails() {
    let (mut a, empty) = fresh_agent();
    let Decision::Heartbeat(hb) = a.on_primary(0, true, Some(&empty)) else {
        panic!()
    };
    let entry = entry_of(&hb, 5);
    a.on_heartbeat(
        0,
        0,
        Some(&HeartbeatOutcome::Accepted {
            entry: entry.clone(),
            took_over: None,
        }),
    );
    assert_eq!(
        a.role(),
        Role::Claiming,
        "holder only once GetPrimary names it"
    );
    let mine = Primary {
        holder: Some(entry.clone()),
        token: 5,
    };
    assert!(
        matches!(a.on_primary(I, true, Some(&mine)), Decision::Heartbeat(h) if h.last_seen == 5)
    );
    assert_eq!(a.role(), Role::Holder);
    a.on_heartbeat(
        I,
        I,
        Some(&HeartbeatOutcome::Accepted {
            entry: entry.clone(),
            took_over: None,
        }),
    );
    assert!(a.acting_holder(I));
    let other = Primary {
        holder: Some(crate::store::Entry {
            uuid: "b".into(),
            ..entry
        }),
        token: 6,
    };
    assert_eq!(
        a.clone().on_primary(2 * I, true, Some(&other)),
        Decision::StepDown(StepDown::OtherHolder("b".into()))
    );
    assert_eq!(
        a.clone().on_primary(2 * I, false, Some(&mine)),
        Decision::StepDown(StepDown::Unhealthy)
    );
    // no answer for T - I since the last accepted heartbeat
    assert_eq!(
        a.on_primary(I + (T - I), true, None),
        Decision::StepDown(StepDown::NoAnswer)
    );
}

#[test]
fn a_standby_with_an_unhealthy_server_waits_without_claiming() {
    let (mut a, empty) = fresh_agent();
    // A context server that takes a while to start: the standby neither claims nor exits.
    for k in 0..20 {
        assert_eq!(a.on_primary(k * I, false, Some(&empty)), Decision::Wait);
        assert_eq!(a.role(), Role::Standby);
    }
    // Once its server is healthy, it claims the empty role.
    assert!(matches!(
        a.on_primary(20 * I, true, Some(&empty)),
        Decision::Heartbeat(h) if h.last_seen == 0
    ));
    assert_eq!(a.role(), Role::Claiming);
    // A claimant whose claim is not accepted yet and whose server fails goes back to waiting.
    assert_eq!(a.on_primary(21 * I, false, Some(&empty)), Decision::Wait);
    assert_eq!(a.role(), Role::Standby);
    // One whose claim was accepted holds the entry: it steps down like a holder.
    let Decision::Heartbeat(hb) = a.on_primary(22 * I, true, Some(&empty)) else {
        panic!()
    };
    let entry = entry_of(&hb, 9);
    a.on_heartbeat(
        22 * I,
        22 * I,
        Some(&HeartbeatOutcome::Accepted {
            entry,
            took_over: None,
        }),
    );
    assert_eq!(a.role(), Role::Claiming);
    assert_eq!(
        a.on_primary(23 * I, false, Some(&empty)),
        Decision::StepDown(StepDown::Unhealthy)
    );
}

#[test]
fn the_step_down_timer_runs_from_the_last_accepted_send_for_a_holder() {
    let (mut core, empty) = fresh_agent();
    // a standby holds nothing: no answer for any time is no reason to leave
    assert_eq!(core.step_down_at(), u64::MAX);
    assert_eq!(core.timed_out(100 * T), None);
    let Decision::Heartbeat(claim) = core.on_primary(40, true, Some(&empty)) else {
        panic!("an empty role is claimed");
    };
    // a claimant whose claim has not been accepted holds nothing either
    assert_eq!(core.step_down_at(), u64::MAX);
    let entry = entry_of(&claim, 1);
    let accepted = HeartbeatOutcome::Accepted {
        entry: entry.clone(),
        took_over: None,
    };
    assert_eq!(core.on_heartbeat(90, 50, Some(&accepted)), None);
    // an accepted claimant holds the entry: its timer runs from the send
    assert_eq!(core.step_down_at(), 50 + T - I);
    let me = Primary {
        holder: Some(entry),
        token: 1,
    };
    assert!(matches!(
        core.on_primary(200, true, Some(&me)),
        Decision::Heartbeat(_)
    ));
    // a holder: T − I after it *sent* its last accepted heartbeat, not after later answers
    assert_eq!(core.role(), Role::Holder);
    assert_eq!(core.step_down_at(), 50 + T - I);
    assert_eq!(core.timed_out(50 + T - I - 1), None);
    assert_eq!(core.timed_out(50 + T - I), Some(StepDown::NoAnswer));
}
