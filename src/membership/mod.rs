//! The client side of the hpcpack HA algorithm, as a pure state machine (`AgentCore`), and
//! the `hagate agent` process around it (`agent`).
//!
//! Each alias is a role. One live instance holds it at a time by renewing a heartbeat
//! entry in the gateway's membership store every I; a standby takes the role over, by
//! compare-and-set, once the holder's heartbeat is older than T. Because HAIDs name
//! aliases, a context whose main host died keeps working once a standby holds its alias.
//!
//! Safety (never two holders at once) comes from two timers with a gap of I: the store
//! lets a standby replace a holder only after `now − ts > T`, and a holder steps down
//! once it has had no accepted heartbeat for `T − I`, measured from when it *sent* that
//! heartbeat (never later than the store stamped it). That is why `T > 2I` is required:
//! it also leaves a holder room for one lost heartbeat.

pub mod agent;

use std::time::Duration;

use crate::model::Alias;
use crate::store::{Heartbeat, HeartbeatOutcome, Primary};

/// Why `I` and `T` do not work together.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParamsError {
    /// `I` is zero.
    #[error("the heartbeat interval must be greater than zero")]
    ZeroInterval,
    /// `T ≤ 2I`.
    #[error("the timeout ({timeout:?}) must be more than twice the interval ({interval:?})")]
    TooShort {
        /// I.
        interval: Duration,
        /// T.
        timeout: Duration,
    },
}

/// The protocol's two parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    /// I: how often an agent asks `GetPrimary` and heartbeats.
    pub interval: Duration,
    /// T: how old a heartbeat may get before a standby may take over.
    pub timeout: Duration,
}

impl Params {
    /// Validates `T > 2I`.
    pub fn new(interval: Duration, timeout: Duration) -> Result<Self, ParamsError> {
        if interval.is_zero() {
            return Err(ParamsError::ZeroInterval);
        }
        if timeout <= interval * 2 {
            return Err(ParamsError::TooShort { interval, timeout });
        }
        Ok(Params { interval, timeout })
    }

    fn step_down_ms(&self) -> u64 {
        (self.timeout - self.interval).as_millis() as u64
    }
}

/// Where an agent stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Waiting: another instance holds the alias, or none was seen yet.
    Standby,
    /// Sent a claim for an empty role; holder once `GetPrimary` names it.
    Claiming,
    /// `GetPrimary` named this agent; it renews every I.
    Holder,
}

/// Why an agent stops claiming and exits (to be restarted by its supervisor).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StepDown {
    /// Its local server failed its health URL while it held the alias.
    #[error("the local server failed its health check")]
    Unhealthy,
    /// `GetPrimary` named another instance while this one held the role.
    #[error("the gateway names another holder ({0})")]
    OtherHolder(String),
    /// No accepted heartbeat for `T − I` while holding the alias.
    #[error("no answer from the gateway for T - I")]
    NoAnswer,
    /// A renewal was discarded: someone else wrote the entry.
    #[error("a renewal was refused ({0}); the role was lost")]
    Lost(&'static str),
}

/// What the agent does after reading `GetPrimary`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Send this heartbeat (a renewal, or a claim of an empty role).
    Heartbeat(Heartbeat),
    /// Nothing until the next interval.
    Wait,
    /// Stop.
    StepDown(StepDown),
}

/// The agent's state machine. Pure: the caller supplies the time (its own clock, in ms),
/// the local health verdict, and the gateway's answers (`None` when there was none).
#[derive(Debug, Clone)]
pub struct AgentCore {
    uuid: String,
    alias: Alias,
    address: String,
    params: Params,
    role: Role,
    /// When the last accepted heartbeat was sent.
    last_accepted: Option<u64>,
    /// When the gateway last answered anything.
    last_answer: u64,
}

impl AgentCore {
    /// A standby with a fresh identity, starting at `now_ms`.
    pub fn new(uuid: String, alias: Alias, address: String, params: Params, now_ms: u64) -> Self {
        AgentCore {
            uuid,
            alias,
            address,
            params,
            role: Role::Standby,
            last_accepted: None,
            last_answer: now_ms,
        }
    }

    /// Its uuid.
    pub fn uuid(&self) -> &str {
        &self.uuid
    }

    /// Its role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Whether it acts as the holder at `now_ms`: named by `GetPrimary`, and its last
    /// accepted heartbeat is younger than `T − I`.
    pub fn acting_holder(&self, now_ms: u64) -> bool {
        self.role == Role::Holder
            && self
                .last_accepted
                .is_some_and(|t| now_ms.saturating_sub(t) < self.params.step_down_ms())
    }

    /// The timer rule: too long without an answer.
    pub fn timed_out(&self, now_ms: u64) -> Option<StepDown> {
        (now_ms >= self.step_down_at()).then_some(StepDown::NoAnswer)
    }

    /// When the timer rule fires (in the caller's ms), unless an answer comes first: `T − I`
    /// after the last accepted heartbeat was sent, for an agent that holds the alias (named
    /// by `GetPrimary`, or a claimant whose claim was accepted). Never (`u64::MAX`) for a
    /// standby: it holds nothing, so a gateway that does not answer is no reason to leave;
    /// it keeps waiting, and claims once it hears from a gateway again.
    pub fn step_down_at(&self) -> u64 {
        let holds = self.role == Role::Holder
            || (self.role == Role::Claiming && self.last_accepted.is_some());
        if !holds {
            return u64::MAX;
        }
        self.last_accepted
            .unwrap_or(self.last_answer)
            .saturating_add(self.params.step_down_ms())
    }

    fn heartbeat(&self, last_seen: u64) -> Decision {
        Decision::Heartbeat(Heartbeat {
            uuid: self.uuid.clone(),
            alias: self.alias.clone(),
            address: self.address.clone(),
            last_seen,
        })
    }

    /// One interval: the local health, and what `GetPrimary` answered.
    pub fn on_primary(
        &mut self,
        now_ms: u64,
        healthy: bool,
        primary: Option<&Primary>,
    ) -> Decision {
        if primary.is_some() {
            self.last_answer = now_ms;
        }
        if !healthy {
            // Only a holder steps down on failed health: it must stop attracting traffic.
            // A claimant whose claim was accepted holds the entry, so it counts as one. A
            // standby (or a claimant not yet accepted) waits, without claiming, until its
            // server is healthy: a context server can take tens of seconds to start.
            if self.role == Role::Holder
                || (self.role == Role::Claiming && self.last_accepted.is_some())
            {
                return Decision::StepDown(StepDown::Unhealthy);
            }
            self.role = Role::Standby;
            return Decision::Wait;
        }
        if let Some(why) = self.timed_out(now_ms) {
            return Decision::StepDown(why);
        }
        let Some(primary) = primary else {
            return Decision::Wait;
        };
        match &primary.holder {
            Some(e) if e.uuid == self.uuid => {
                self.role = Role::Holder;
                self.heartbeat(e.revision)
            }
            Some(e) => {
                if self.role == Role::Holder {
                    return Decision::StepDown(StepDown::OtherHolder(e.uuid.clone()));
                }
                self.role = Role::Standby;
                Decision::Wait
            }
            // Our own entry expired under us: the timer should have fired first; stop.
            None if self.role == Role::Holder => Decision::StepDown(StepDown::NoAnswer),
            None => {
                self.role = Role::Claiming;
                self.heartbeat(primary.token)
            }
        }
    }

    /// The answer to a heartbeat sent at `sent_ms` (`None` if there was none).
    pub fn on_heartbeat(
        &mut self,
        now_ms: u64,
        sent_ms: u64,
        outcome: Option<&HeartbeatOutcome>,
    ) -> Option<StepDown> {
        let outcome = outcome?;
        self.last_answer = now_ms;
        match outcome {
            HeartbeatOutcome::Accepted { .. } => {
                self.last_accepted = Some(sent_ms);
                None
            }
            lost if self.role == Role::Holder => Some(StepDown::Lost(lost.label())),
            _ => {
                self.role = Role::Standby;
                None
            }
        }
    }
}

#[cfg(test)]
mod tests;
