//! The wasmtime host for placement plugins, wrapped narrowly.
//!
//! - One `Engine` per process, configured here only: component model, synchronous calls
//!   (on the calling thread: no fiber to switch to), epoch interruption, and a 1 ms epoch ticker
//!   thread that enforces per-call deadlines inside Wasm code (it runs while guest code
//!   may run and for a second after, then parks until the next call). The deadline is CPU time:
//!   a call that lasts a tick is charged that tick, and from then on the calling thread's
//!   CPU clock says whether it has used its deadline up, so a call that waited for a core
//!   on a busy machine is not cut (and a call shorter than a tick reads no clock). No WASI
//!   function can make a call wait: the ones that would trap instead (`nonblocking.rs`), so
//!   the epoch deadline bounds the whole call.
//! - A plugin is compiled and pre-linked once (`PlacementPre`), as the newest version of the
//!   world it implements (`bindings::v2`, else `bindings::v1`). Its instances are kept in
//!   a small pool and reused call after call, so a call never pays for an instantiation;
//!   an instance that trapped or timed out is dropped, and the next call makes a new one.
//! - Every instance runs in its own `Store` with `StoreLimits` (a memory cap that traps on
//!   growth) and a WASI context that grants nothing: no files, no environment, no args,
//!   no sockets, no name lookup, no stdio.
//!
//! No pingora here; the only domain type that leaves is `placement::Choice`.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Engine, Store, StoreLimits, StoreLimitsBuilder, Trap, UpdateDeadline};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings::{self, v1, v2};
use crate::placement::{check_choice, Candidates, Choice, PlacementRequest};

/// The epoch tick: deadlines are whole ticks, so a call is cut between `deadline - TICK`
/// and `deadline` after it starts.
pub const TICK: Duration = Duration::from_millis(1);

/// The deadline for making an instance and running `configure` (at load, and when a
/// trapped instance is replaced): instantiation is not the plugin's per-call work, and a
/// loaded machine must not refuse a good plugin.
const SETUP_DEADLINE: Duration = Duration::from_secs(1);

/// Idle instances kept per plugin; more concurrent calls make more, then drop the excess.
const MAX_IDLE: usize = 32;

/// The process's engine, with its epoch ticker running.
pub fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let mut config = wasmtime::Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        // Backtraces cost time on every trap and only name anonymous functions.
        config.wasm_backtrace_max_frames(None);
        let engine = Engine::new(&config).expect("a fixed, valid engine config");
        let weak = engine.weak();
        let ticker = std::thread::Builder::new()
            .name("hagate-wasm-epoch".into())
            .spawn(move || tick(&weak))
            .expect("spawn the epoch ticker");
        let _ = TICKER.set(ticker.thread().clone());
        engine
    })
}

/// Guest code under way (calls and instantiations): the ticker runs while there is some,
/// and for `LINGER` ticks after, then parks until the next, so an idle gateway does not
/// wake 1000 times a second.
static ACTIVE: AtomicUsize = AtomicUsize::new(0);
/// Set by the ticker just before it parks.
static PARKED: AtomicBool = AtomicBool::new(false);
/// The ticker's thread, to unpark.
static TICKER: OnceLock<std::thread::Thread> = OnceLock::new();
/// Idle ticks before the ticker parks: a steady stream of placements never parks it.
const LINGER: u32 = 1000;

/// The epoch ticker: one tick every `TICK` while guest code may run.
fn tick(weak: &wasmtime::EngineWeak) {
    let mut idle = 0;
    loop {
        // Sleep first: a call that woke the ticker gets its whole first tick.
        std::thread::sleep(TICK);
        let Some(engine) = weak.upgrade() else { return };
        engine.increment_epoch();
        drop(engine);
        if ACTIVE.load(SeqCst) > 0 {
            idle = 0;
            continue;
        }
        idle += 1;
        if idle < LINGER {
            continue;
        }
        // With `Running::start`: either it sees PARKED and unparks, or this sees ACTIVE.
        PARKED.store(true, SeqCst);
        while ACTIVE.load(SeqCst) == 0 {
            std::thread::park();
        }
        PARKED.store(false, SeqCst);
        idle = 0;
    }
}

/// Guest code may run while this lives: the epoch ticker runs.
struct Running;

impl Running {
    fn start() -> Self {
        ACTIVE.fetch_add(1, SeqCst);
        if PARKED.load(SeqCst) {
            if let Some(ticker) = TICKER.get() {
                ticker.unpark();
            }
        }
        Running
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        ACTIVE.fetch_sub(1, SeqCst);
    }
}

/// The WASI imports every Rust guest links against, granting nothing.
fn linker() -> &'static Linker<HostState> {
    static LINKER: OnceLock<Linker<HostState>> = OnceLock::new();
    LINKER.get_or_init(|| {
        let mut linker = Linker::new(engine());
        super::nonblocking::add_to_linker(&mut linker).expect("WASI links once");
        linker
    })
}

/// What one store holds.
pub struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: StoreLimits,
    /// The CPU budget of the call under way; `None` outside a call (instantiation and
    /// `configure` have the wall-clock `SETUP_DEADLINE`).
    cpu: Option<CpuBudget>,
}

/// The CPU time a call may still take. A call starts `Unclocked`, with its epoch deadline
/// one tick away, so that the calls that end within a tick (nearly all) never read the
/// CPU clock, a system call. At the first tick the call is charged that tick and the clock
/// is read; from then on the clock decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CpuBudget {
    /// Not yet a tick old: the thread it runs on, and its whole deadline.
    Unclocked(std::thread::ThreadId, Duration),
    /// Clocked: the thread, its CPU time when clocked, and the budget left then.
    Clocked(std::thread::ThreadId, Duration, Duration),
}

/// The CPU time the calling thread has used (a Wasm call runs on this thread).
fn thread_cpu() -> Duration {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map_or(Duration::ZERO, Duration::from)
}

/// At each epoch deadline (wall-clock ticks): the deadline is CPU time, so a call that has
/// used less CPU than its deadline (it was waiting for a core on a busy machine) gets the
/// rest, and one that has used it all is cut. A call that moved to another thread, or
/// one outside a call, is cut, as by a wall-clock deadline.
fn on_epoch_deadline(cpu: &mut Option<CpuBudget>) -> UpdateDeadline {
    let me = std::thread::current().id();
    let (clocked_at, left) = match *cpu {
        // the first tick: charged in full (the call may have run all of it)
        Some(CpuBudget::Unclocked(thread, budget)) if thread == me => {
            (thread_cpu(), budget.saturating_sub(TICK))
        }
        Some(CpuBudget::Clocked(thread, at, left)) if thread == me => {
            let now = thread_cpu();
            (now, left.saturating_sub(now.saturating_sub(at)))
        }
        _ => return UpdateDeadline::Interrupt,
    };
    if left.is_zero() {
        return UpdateDeadline::Interrupt;
    }
    *cpu = Some(CpuBudget::Clocked(me, clocked_at, left));
    UpdateDeadline::Continue(ticks(left))
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// Why a plugin call did not give a usable placement.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// The guest trapped (a panic, an out-of-bounds access, or the memory cap).
    #[error("trapped: {0}")]
    Trap(String),
    /// The call ran past its deadline.
    #[error("ran past its deadline")]
    Timeout,
    /// The answer broke the rules (`placement::check_choice`).
    #[error("invalid answer: {0}")]
    Invalid(String),
    /// The plugin returned an error.
    #[error("declined: {0}")]
    Declined(String),
}

impl CallError {
    /// The `outcome` label of `hagate_plugin_calls_total`.
    pub fn outcome(&self) -> &'static str {
        match self {
            CallError::Trap(_) => "trap",
            CallError::Timeout => "timeout",
            CallError::Invalid(_) => "invalid",
            CallError::Declined(_) => "declined",
        }
    }

    fn from_wasm(e: wasmtime::Error) -> Self {
        match e.downcast_ref::<Trap>() {
            Some(Trap::Interrupt) => CallError::Timeout,
            Some(trap) => CallError::Trap(trap.to_string()),
            None => CallError::Trap(e.root_cause().to_string()),
        }
    }
}

/// Why a plugin could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadError {
    /// Not a component implementing the `placement` world of `hagate:policy@0.2.0` or
    /// `@0.1.0`.
    #[error("not a hagate:policy placement component (0.2.0 or 0.1.0): {0}")]
    Component(String),
    /// Making the first instance failed (a trap or the limits).
    #[error("could not be instantiated: {0}")]
    Instantiate(String),
    /// `configure` returned an error.
    #[error("configure refused the config: {0}")]
    Configure(String),
}

/// The limits one plugin runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// CPU time per call.
    pub deadline: Duration,
    /// Linear-memory cap per instance, in bytes.
    pub memory: usize,
}

impl Limits {
    /// Limits from a deadline and a memory cap as config gives it.
    pub fn new(deadline: Duration, memory: bytesize::ByteSize) -> Self {
        Limits {
            deadline,
            memory: usize::try_from(memory.as_u64()).unwrap_or(usize::MAX),
        }
    }
}

/// A deadline in epoch ticks.
fn ticks(deadline: Duration) -> u64 {
    (deadline.as_nanos().div_ceil(TICK.as_nanos()) as u64).max(1)
}

/// One instance, the alias-table version it was last told about, and buffers reused
/// from call to call.
struct Slot {
    store: Store<HostState>,
    guest: Guest,
    seen: Option<u64>,
}

/// An instance of one of the versions of the world, with that version's per-call buffers.
enum Guest {
    V1 {
        guest: v1::Placement,
        loads: Vec<v1::Load>,
        exclude: Vec<u32>,
    },
    V2 {
        guest: v2::Placement,
        /// What `configure` asked for.
        wants: v2::Wants,
        words: Vec<u32>,
    },
}

/// A pre-linked plugin, in the version of the world it implements.
enum Pre {
    V1(v1::PlacementPre<HostState>),
    V2(v2::PlacementPre<HostState>),
}

/// A plugin's code, compiled and pre-linked: what depends on its file alone. Plugin entries
/// that name the same file (by hash) share one, with a config, limits and instances each.
pub struct Code {
    pre: Pre,
}

impl std::fmt::Debug for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Code")
            .field("version", &self.version())
            .finish()
    }
}

impl Code {
    /// Compiles `bytes` and pre-links them as the newest version of the world they
    /// implement.
    pub fn compile(bytes: &[u8]) -> Result<Code, LoadError> {
        let component =
            Component::new(engine(), bytes).map_err(|e| LoadError::Component(format!("{e:#}")))?;
        let pre = linker()
            .instantiate_pre(&component)
            .map_err(|e| LoadError::Component(format!("{e:#}")))?;
        // The newest version first; the error names what each version found wrong.
        let pre = match v2::PlacementPre::new(pre.clone()) {
            Ok(v2) => Pre::V2(v2),
            Err(e2) => match v1::PlacementPre::new(pre) {
                Ok(v1) => Pre::V1(v1),
                Err(e1) => {
                    return Err(LoadError::Component(format!(
                        "as 0.2.0: {e2:#}; as 0.1.0: {e1:#}"
                    )))
                }
            },
        };
        Ok(Code { pre })
    }

    /// The version of `hagate:policy` the plugin implements: `"0.2.0"` or `"0.1.0"`.
    pub fn version(&self) -> &'static str {
        match self.pre {
            Pre::V1(_) => "0.1.0",
            Pre::V2(_) => "0.2.0",
        }
    }
}

/// A compiled, configured plugin with its pool of instances.
pub struct Plugin {
    code: Arc<Code>,
    config: String,
    limits: Limits,
    idle: Mutex<Vec<Slot>>,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("version", &self.version())
            .field("limits", &self.limits)
            .finish()
    }
}

impl Plugin {
    /// Compiles `bytes`, makes a first instance and runs `configure(config)` on it.
    pub async fn load(bytes: &[u8], config: &str, limits: Limits) -> Result<Plugin, LoadError> {
        Plugin::new(Arc::new(Code::compile(bytes)?), config, limits).await
    }

    /// A plugin on compiled `code`: makes a first instance and runs `configure(config)`
    /// on it.
    pub async fn new(code: Arc<Code>, config: &str, limits: Limits) -> Result<Plugin, LoadError> {
        let plugin = Plugin {
            code,
            config: config.to_string(),
            limits,
            idle: Mutex::new(Vec::new()),
        };
        let slot = plugin.instantiate().map_err(|e| match e {
            SlotError::Instantiate(m) => LoadError::Instantiate(m),
            SlotError::Configure(m) => LoadError::Configure(m),
        })?;
        plugin.put(slot);
        Ok(plugin)
    }

    /// Its compiled code, which other plugins on the same file may share.
    pub fn code(&self) -> &Arc<Code> {
        &self.code
    }

    /// A new instance, configured: what replacing a trapped instance costs.
    fn instantiate(&self) -> Result<Slot, SlotError> {
        let wasi = WasiCtx::builder()
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        let limits = StoreLimitsBuilder::new()
            .memory_size(self.limits.memory)
            .trap_on_grow_failure(true)
            .build();
        let _running = Running::start();
        let mut store = Store::new(
            engine(),
            HostState {
                wasi,
                table: ResourceTable::new(),
                limits,
                cpu: None,
            },
        );
        store.limiter(|s| &mut s.limits);
        store.epoch_deadline_callback(|mut ctx| Ok(on_epoch_deadline(&mut ctx.data_mut().cpu)));
        store.set_epoch_deadline(ticks(SETUP_DEADLINE));
        let instantiate = |e: wasmtime::Error| SlotError::Instantiate(format!("{e:#}"));
        let configure = |e| SlotError::Instantiate(CallError::from_wasm(e).to_string());
        let guest = match &self.code.pre {
            Pre::V1(pre) => {
                let guest = pre.instantiate(&mut store).map_err(instantiate)?;
                guest
                    .call_configure(&mut store, &self.config)
                    .map_err(configure)?
                    .map_err(SlotError::Configure)?;
                Guest::V1 {
                    guest,
                    loads: Vec::new(),
                    exclude: Vec::new(),
                }
            }
            Pre::V2(pre) => {
                let guest = pre.instantiate(&mut store).map_err(instantiate)?;
                let wants = guest
                    .call_configure(&mut store, &self.config)
                    .map_err(configure)?
                    .map_err(SlotError::Configure)?;
                Guest::V2 {
                    guest,
                    wants,
                    words: Vec::new(),
                }
            }
        };
        Ok(Slot {
            store,
            guest,
            seen: None,
        })
    }

    /// The version of `hagate:policy` the plugin implements: `"0.2.0"` or `"0.1.0"`.
    pub fn version(&self) -> &'static str {
        self.code.version()
    }

    /// Makes and drops one fresh instance (for benchmarks of the replacement cost).
    pub async fn replace_once(&self) -> Result<(), String> {
        self.instantiate().map(drop).map_err(|e| e.to_string())
    }

    fn take(&self) -> Option<Slot> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop()
    }

    fn put(&self, slot: Slot) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(slot);
        }
    }

    /// Asks the plugin for a placement and checks the answer. An instance that traps or
    /// times out is dropped; the others go back to the pool. The call runs on the calling
    /// thread within the first poll: nothing in it waits, and the plugin's CPU deadline
    /// bounds it. It must be polled inside a tokio runtime (see `nonblocking.rs`).
    pub async fn place(
        &self,
        request: &PlacementRequest<'_>,
        candidates: &Candidates<'_>,
    ) -> Result<Choice, CallError> {
        let (main, backup) = self.call(request, candidates)?;
        check_choice(main, backup, &candidates.list, request.exclude).map_err(CallError::Invalid)
    }

    /// One call on a pooled (or new) instance; the raw answer as indices.
    fn call(
        &self,
        request: &PlacementRequest<'_>,
        candidates: &Candidates<'_>,
    ) -> Result<bindings::Answer, CallError> {
        let _running = Running::start();
        let mut slot = match self.take() {
            Some(slot) => slot,
            None => self
                .instantiate()
                .map_err(|e| CallError::Trap(e.to_string()))?,
        };
        slot.store.set_epoch_deadline(1);
        slot.store.data_mut().cpu = Some(CpuBudget::Unclocked(
            std::thread::current().id(),
            self.limits.deadline,
        ));
        let fresh = slot.seen != Some(candidates.version);
        let answer = slot.guest.call(&mut slot.store, fresh, request, candidates);
        // The epoch deadline and traps: the instance is dropped, not pooled.
        let answer = answer.map_err(CallError::from_wasm)?;
        slot.seen = Some(candidates.version);
        slot.store.data_mut().cpu = None;
        self.put(slot);
        answer
    }
}

impl Guest {
    /// `set-instances` when `fresh`, then `place`: a `wasmtime::Error` is the instance's
    /// end (a trap or the deadline); the inner result is the plugin's answer.
    fn call(
        &mut self,
        store: &mut Store<HostState>,
        fresh: bool,
        request: &PlacementRequest<'_>,
        candidates: &Candidates<'_>,
    ) -> wasmtime::Result<Result<bindings::Answer, CallError>> {
        let list = &candidates.list;
        match self {
            Guest::V1 {
                guest,
                loads,
                exclude,
            } => {
                if fresh {
                    let labels: Vec<Vec<v1::Label<'_>>> = list
                        .iter()
                        .map(|c| bindings::labels(c.labels, |key, value| v1::Label { key, value }))
                        .collect();
                    let instances =
                        bindings::instances(list, &labels, |alias, weight, labels| v1::Instance {
                            alias,
                            weight,
                            labels,
                        });
                    guest.call_set_instances(&mut *store, &instances)?;
                }
                loads.clear();
                loads.extend(list.iter().map(bindings::load_v1));
                exclude.clear();
                exclude.extend(request.exclude.iter().map(|&i| i as u32));
                let answer =
                    guest.call_place(&mut *store, bindings::request_v1(request), loads, exclude)?;
                Ok(answer
                    .map(|c| (c.main, c.backup))
                    .map_err(CallError::Declined))
            }
            Guest::V2 {
                guest,
                wants,
                words,
            } => {
                if fresh {
                    let labels: Vec<Vec<v2::Label<'_>>> = list
                        .iter()
                        .map(|c| bindings::labels(c.labels, |key, value| v2::Label { key, value }))
                        .collect();
                    let instances =
                        bindings::instances(list, &labels, |alias, weight, labels| v2::Instance {
                            alias,
                            weight,
                            labels,
                        });
                    guest.call_set_instances(&mut *store, &instances)?;
                }
                words.clear();
                bindings::loads_v2(list, request.exclude, words);
                let request = bindings::request_v2(request, *wants);
                match guest.call_place(&mut *store, request, words)? {
                    Some(c) => Ok(Ok((c.main, c.backup))),
                    None => Ok(Err(CallError::Declined(guest.call_why(&mut *store)?))),
                }
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum SlotError {
    #[error("{0}")]
    Instantiate(String),
    #[error("configure failed: {0}")]
    Configure(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spend_cpu(at_least: Duration) {
        let start = thread_cpu();
        let mut x = 0u64;
        while thread_cpu().saturating_sub(start) < at_least {
            x = std::hint::black_box(x.wrapping_add(1));
        }
    }

    #[test]
    fn the_epoch_deadline_charges_cpu_time_not_waiting() {
        let me = std::thread::current().id();
        let ms = Duration::from_millis;
        // the first tick is charged in full, and the clock is read then
        let mut cpu = Some(CpuBudget::Unclocked(me, ms(20)));
        assert!(matches!(
            on_epoch_deadline(&mut cpu),
            UpdateDeadline::Continue(19)
        ));
        assert!(matches!(cpu, Some(CpuBudget::Clocked(t, _, left)) if t == me && left == ms(19)));
        // waiting costs no CPU: a call that has been waiting keeps (about) all it had left
        std::thread::sleep(ms(30));
        match on_epoch_deadline(&mut cpu) {
            UpdateDeadline::Continue(ticks) => assert!(ticks >= 10, "{ticks}"),
            _ => panic!("a call that used no CPU was cut"),
        }
        // a call that has used its budget in CPU time is cut
        let mut cpu = Some(CpuBudget::Clocked(me, thread_cpu(), ms(5)));
        spend_cpu(ms(5));
        assert!(matches!(
            on_epoch_deadline(&mut cpu),
            UpdateDeadline::Interrupt
        ));
        // a deadline of one tick is cut at the first tick, as before
        let mut cpu = Some(CpuBudget::Unclocked(me, ms(1)));
        assert!(matches!(
            on_epoch_deadline(&mut cpu),
            UpdateDeadline::Interrupt
        ));
        // outside a call, or on another thread, the deadline is wall-clock: cut
        assert!(matches!(
            on_epoch_deadline(&mut None),
            UpdateDeadline::Interrupt
        ));
        let other = std::thread::spawn(|| std::thread::current().id())
            .join()
            .unwrap();
        let mut cpu = Some(CpuBudget::Unclocked(other, ms(1000)));
        assert!(matches!(
            on_epoch_deadline(&mut cpu),
            UpdateDeadline::Interrupt
        ));
    }
}
