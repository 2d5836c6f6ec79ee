//! `hagate agent`: runs beside one context server and holds (or stands by for) its alias
//! through the gateway's heartbeat API. The IO shell around `AgentCore`: every I it checks
//! the server's health URL, asks `GetPrimary`, and sends the heartbeat the core decides on.
//! It returns only when the core steps down; the caller exits non-zero so that a
//! supervisor restarts it (with a fresh uuid) as a standby.
//!
//! Several gateways (sharing one etcd) can be given. The agent talks to one at a time and
//! moves on to the next when a request to it fails (no answer, or a 5xx), so the loss of
//! one gateway costs at most one request's timeout (I). The step-down timer runs beside the
//! requests, so a slow answer never delays a step-down, and is used if it comes in time.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::{AgentCore, Decision, Params, Role, StepDown};
use crate::model::Alias;
use crate::store::{Entry, Heartbeat, HeartbeatOutcome, Primary};

/// What `hagate agent` was told.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// The alias to hold.
    pub alias: Alias,
    /// Where the local context server serves, `ip:port` (what the gateway will route to).
    pub address: String,
    /// The gateways' admin URLs, e.g. `http://127.0.0.1:9090`, tried in turn.
    pub gateways: Vec<String>,
    /// The `membership.token`.
    pub token: String,
    /// The local server's health URL; a non-2xx answer or none is a failure.
    pub health_url: String,
    /// I and T.
    pub params: Params,
}

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The protocol said to step down.
    #[error("stepping down: {0}")]
    StepDown(#[from] StepDown),
    /// The gateway refused the token (401/403): a configuration error, not a failover.
    #[error("the gateway refused the heartbeat: {0}")]
    Unauthorized(String),
    /// The HTTP client could not be built.
    #[error("http client: {0}")]
    Client(String),
}

#[derive(Deserialize)]
struct PrimaryAnswer {
    holder: Option<Entry>,
    token: u64,
}

#[derive(Deserialize)]
struct HeartbeatAnswer {
    result: String,
    entry: Option<Entry>,
    current: Option<Entry>,
    took_over: Option<String>,
}

struct Shell {
    http: reqwest::Client,
    opts: AgentOptions,
    started: Instant,
    /// The gateway in use: an index into `opts.gateways`.
    current: AtomicUsize,
}

impl Shell {
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    async fn healthy(&self) -> bool {
        self.http
            .get(&self.opts.health_url)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    }

    /// Sends the request `build` makes for a gateway's base URL to the gateway in use;
    /// when it gets no answer or a 5xx, moves on to the next gateway and tries that one,
    /// each gateway at most once.
    async fn send(
        &self,
        build: impl Fn(&str) -> reqwest::RequestBuilder,
    ) -> Option<reqwest::Response> {
        let n = self.opts.gateways.len();
        for _ in 0..n {
            let i = self.current.load(Ordering::Relaxed) % n;
            let base = self.opts.gateways[i].trim_end_matches('/');
            let failure = match build(base).send().await {
                Ok(r) if !r.status().is_server_error() => return Some(r),
                Ok(r) => format!("answered {}", r.status()),
                Err(e) => e.to_string(),
            };
            let next = (i + 1) % n;
            self.current.store(next, Ordering::Relaxed);
            if n > 1 {
                tracing::warn!(gateway = base, %failure, next = %self.opts.gateways[next], "gateway failed; moving on to the next");
            }
        }
        None
    }

    async fn primary(&self) -> Option<Primary> {
        let alias = &self.opts.alias;
        let r = self
            .send(|base| {
                self.http
                    .get(format!("{base}/v1/membership/primary/{alias}"))
            })
            .await?;
        if !r.status().is_success() {
            return None;
        }
        let a: PrimaryAnswer = r.json().await.ok()?;
        Some(Primary {
            holder: a.holder,
            token: a.token,
        })
    }

    async fn heartbeat(&self, hb: &Heartbeat) -> Result<Option<HeartbeatOutcome>, AgentError> {
        let Some(r) = self
            .send(|base| {
                self.http
                    .post(format!("{base}/v1/membership/heartbeat"))
                    .bearer_auth(&self.opts.token)
                    .json(hb)
            })
            .await
        else {
            return Ok(None);
        };
        let status = r.status();
        if status == 401 || status == 403 {
            return Err(AgentError::Unauthorized(r.text().await.unwrap_or_default()));
        }
        let Ok(a) = r.json::<HeartbeatAnswer>().await else {
            return Ok(None);
        };
        Ok(match (a.result.as_str(), a.entry, a.current) {
            ("accepted", Some(entry), _) => Some(HeartbeatOutcome::Accepted {
                entry,
                took_over: a.took_over,
            }),
            ("stale", _, current) => Some(HeartbeatOutcome::Stale { current }),
            ("rejected", _, Some(current)) => Some(HeartbeatOutcome::Rejected { current }),
            _ => None,
        })
    }
}

/// Runs the agent until it steps down.
pub async fn run(opts: AgentOptions, uuid: String) -> AgentError {
    let interval = opts.params.interval;
    let http = match reqwest::Client::builder()
        .no_proxy()
        .timeout(interval.max(Duration::from_millis(50)))
        .build()
    {
        Ok(c) => c,
        Err(e) => return AgentError::Client(e.to_string()),
    };
    if opts.gateways.is_empty() {
        return AgentError::Client("no gateway URL was given (--gateway)".into());
    }
    let shell = Shell {
        http,
        opts: opts.clone(),
        started: Instant::now(),
        current: AtomicUsize::new(0),
    };
    let mut core = AgentCore::new(
        uuid,
        opts.alias.clone(),
        opts.address.clone(),
        opts.params,
        0,
    );
    tracing::info!(uuid = core.uuid(), alias = %opts.alias, address = %opts.address, "agent started as a standby");
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut role = core.role();
    loop {
        tick.tick().await;
        // The step-down timer runs beside the interval's requests: a holder stops on
        // time however slowly the gateway answers, and an answer that is merely slow
        // (each request may take up to I) is still used when it comes in time. Each
        // answer moves the deadline (`one_interval` stores it), so the timer re-reads it.
        let deadline = AtomicU64::new(core.step_down_at());
        let timer = async {
            loop {
                let (at, now) = (deadline.load(Ordering::Relaxed), shell.now_ms());
                if now >= at {
                    return;
                }
                // re-read at least hourly (a standby's deadline is "never")
                tokio::time::sleep(Duration::from_millis((at - now).min(3_600_000))).await;
            }
        };
        let interval_done = tokio::select! {
            done = one_interval(&shell, &mut core, &deadline) => done,
            () = timer => Err(StepDown::NoAnswer.into()),
        };
        if let Err(why) = interval_done {
            return why;
        }
        if core.role() != role {
            role = core.role();
            let name = match role {
                Role::Standby => "standby",
                Role::Claiming => "claiming",
                Role::Holder => "holder",
            };
            tracing::info!(alias = %opts.alias, role = name, "agent role changed");
        }
    }
}

/// One interval: the local health, `GetPrimary`, and the heartbeat the core decides on.
/// After each answer it stores the core's step-down deadline in `deadline`.
async fn one_interval(
    shell: &Shell,
    core: &mut AgentCore,
    deadline: &AtomicU64,
) -> Result<(), AgentError> {
    let healthy = shell.healthy().await;
    let primary = shell.primary().await;
    let decision = core.on_primary(shell.now_ms(), healthy, primary.as_ref());
    deadline.store(core.step_down_at(), Ordering::Relaxed);
    match decision {
        Decision::Wait => Ok(()),
        Decision::StepDown(why) => Err(why.into()),
        Decision::Heartbeat(hb) => {
            let sent = shell.now_ms();
            let outcome = shell.heartbeat(&hb).await?;
            let stepped = core.on_heartbeat(shell.now_ms(), sent, outcome.as_ref());
            deadline.store(core.step_down_at(), Ordering::Relaxed);
            match stepped {
                Some(why) => Err(why.into()),
                None => Ok(()),
            }
        }
    }
}
