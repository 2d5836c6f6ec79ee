//! hagate: a high-availability gateway for Linkis-style context servers, on Pingora.
//!
//! The request path, top to bottom (arrows only point down):
//!
//! 1. `forward` (hagate's own HTTP/1.1 loop, for the common request) or `proxy` (the only
//!    module that knows pingora's request phases, for the rest) gets a request, and
//!    `proxy`'s plan asks `context_id` for the context id: the `contextID` query
//!    parameter, else the header, bare or Gson-wrapped.
//! 2. `haid` decodes it exactly as Linkis does, into borrowed `main`/`backup`/`id` parts.
//! 3. `route::decide` resolves both aliases in the current `aliases::AliasTable` (an
//!    `ArcSwap`, replaced whole by `gateway` on reload) and reads `health` atomics: main if
//!    live, else backup, else 503 (or, opt-in, a replacement from `ring`). A request
//!    without a HAID is placed by `plugin::PluginSet`: the matching Wasm plugin, or the
//!    native policy in `placement`.
//! 4. `forward` or pingora's proxy forwards, with `proxy` deciding each attempt: once more
//!    on the other instance if the first cannot be reached. `proxy` feeds failures to
//!    passive health, and records `metrics`.
//!
//! Around it: `config` (one validated TOML file), `health::active` (parallel HTTP checks),
//! `store` (the membership heartbeat table) and `membership` (the protocol's client side and
//! `hagate agent`), `gateway` (merges static aliases with live holders and swaps tables),
//! `reload` (file watch and SIGHUP), `background` (the nice +10 threads that read configs
//! and big tables), `admin` (`/metrics`, `/v1/aliases`, `/v1/placements`,
//! `/v1/membership`), `server` (wires pingora), and `demo` (a demo context server).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod aliases;
pub mod background;
pub mod config;
pub mod conn;
pub mod context_id;
pub mod demo;
pub mod dns;
pub mod forward;
pub mod gateway;
pub mod haid;
pub mod health;
pub mod http1;
pub mod http_server;
pub mod lag;
pub mod logging;
pub mod membership;
pub mod merge;
pub mod metrics;
pub mod model;
pub mod notify;
pub mod placement;
pub mod plugin;
pub mod pool;
pub mod proxy;
pub mod reload;
pub mod retire;
pub mod ring;
pub mod route;
pub mod server;
pub mod store;
