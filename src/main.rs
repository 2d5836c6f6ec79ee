//! The `hagate` command line: parses arguments and calls into the library.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use serde_json::json;

use hagate::config::Config;
use hagate::{context_id, haid};

/// mimalloc instead of glibc's malloc: the proxy allocates and frees many small buffers
/// per request, and glibc's `_int_malloc`/`_int_free`/`malloc_consolidate` were about a
/// fifth of its CPU. Built with `no_thp`: with transparent huge pages, mimalloc's arenas
/// held 55 MiB more RSS after compiling three plugins (docs/performance.md has both
/// measurements). `--no-default-features` leaves it out, for heap profilers.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The demo config that `hagate demo` runs on, embedded in the binary.
const DEMO_CONFIG: &str = include_str!("../config/demo.toml");

#[derive(Parser)]
#[command(
    name = "hagate",
    version,
    about = "High-availability gateway for context servers"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the gateway.
    Run {
        /// The config file (hot-reloaded on change and on SIGHUP).
        #[arg(long, short, default_value = "config/hagate.toml")]
        config: PathBuf,
        /// Replace the gateway running with this config without dropping a connection:
        /// take over its listening sockets (it is found through `server.pid_file`), and let
        /// it finish its requests and exit.
        #[arg(long)]
        upgrade: bool,
    },
    /// Validate a config file: exit 0 if it is valid, else name the bad field.
    Check {
        /// The config file.
        #[arg(long, short, default_value = "config/hagate.toml")]
        config: PathBuf,
    },
    /// Encode or decode HAIDs.
    Haid {
        #[command(subcommand)]
        command: HaidCmd,
    },
    /// Hold an alias for the context server beside it (heartbeats to the gateway), or
    /// stand by to take it over. Exits with status 3 when it steps down.
    Agent {
        /// The alias to hold, e.g. `cs_1`.
        #[arg(long)]
        alias: String,
        /// Where the local context server serves (`ip:port`), what the gateway routes to.
        #[arg(long)]
        address: String,
        /// The admin URL of a gateway. Several gateways (all on one etcd) can be given,
        /// comma-separated or by repeating the flag; the agent moves on to the next when
        /// one fails.
        #[arg(long, value_delimiter = ',', default_value = "http://127.0.0.1:9090")]
        gateway: Vec<String>,
        /// The gateway's `membership.token` (or set HAGATE_TOKEN).
        #[arg(long, env = "HAGATE_TOKEN", hide_env_values = true)]
        token: String,
        /// The local server's health URL.
        #[arg(long)]
        health_url: String,
        /// I, the heartbeat interval.
        #[arg(short = 'I', long = "interval", default_value = "1s", value_parser = humantime::parse_duration)]
        interval: std::time::Duration,
        /// T, the heartbeat timeout (more than 2 × I).
        #[arg(short = 'T', long = "timeout", default_value = "3s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Work with Wasm placement plugins.
    Plugin {
        #[command(subcommand)]
        command: PluginCmd,
    },
    /// Start the gateway on the embedded demo config with three demo context servers
    /// and the example plugins, and print curl lines to try it.
    Demo {
        /// Where the example plugins were built (`lowest_load.wasm`, `tenant_affinity.wasm`);
        /// without them the demo places natively.
        #[arg(long, default_value = "plugins/target/wasm32-wasip2/release")]
        plugins: PathBuf,
    },
    /// Run one demo context server (echoes what hagate forwards; serves /health).
    DemoServer {
        /// Its name, reported in every answer.
        #[arg(long)]
        name: String,
        /// Where to listen; port 0 picks a free port (printed on stdout).
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
    },
}

#[derive(Subcommand)]
enum PluginCmd {
    /// Run a plugin offline on a candidates file and print its choice.
    Test(PluginTest),
}

/// The arguments of `hagate plugin test`.
#[derive(clap::Args)]
struct PluginTest {
    /// The plugin's `.wasm` component.
    #[arg(value_name = "PATH")]
    wasm: PathBuf,
    /// A file whose text is the plugin's config string (as `config = '...'` gives it).
    #[arg(long)]
    config: Option<PathBuf>,
    /// A JSON array of candidates: `[{"alias": "cs_1", "live": true, "inflight": 3,
    /// "latency_ewma_us": 900, "reported_load": 0.5, "weight": 1, "labels": {"zone": "a"}}]`.
    #[arg(long)]
    candidates: PathBuf,
    /// The request's tenant.
    #[arg(long)]
    tenant: Option<String>,
    /// The request's path.
    #[arg(long = "path", default_value = "/")]
    request_path: String,
    /// The request's context id.
    #[arg(long)]
    context_id: Option<String>,
    /// Aliases that must not be chosen (repeat for more).
    #[arg(long)]
    exclude: Vec<String>,
    /// Place this many times and print how often each (main, backup) pair came out.
    #[arg(long, default_value_t = 1)]
    repeat: u32,
    /// The call deadline.
    #[arg(long, default_value = "5ms", value_parser = humantime::parse_duration)]
    deadline: std::time::Duration,
    /// The memory cap.
    #[arg(long, default_value = "16MiB")]
    memory_limit: bytesize::ByteSize,
}

#[derive(Subcommand)]
enum HaidCmd {
    /// Print the HAID for a main alias, backup alias(es) and numeric id.
    Encode {
        /// The main alias.
        #[arg(long)]
        main: String,
        /// A backup alias (repeat for more; only the first is used for routing).
        #[arg(long, required = true)]
        backup: Vec<String>,
        /// The numeric context id.
        #[arg(long)]
        id: String,
    },
    /// Decode a HAID, bare or Gson-wrapped; `-` reads one per line from stdin.
    Decode {
        /// The value, or `-`.
        value: String,
    },
}

fn main() -> ExitCode {
    let cmd = Cli::parse().command;
    if matches!(cmd, Cmd::Run { .. } | Cmd::Demo { .. }) {
        allocator_options();
    }
    // `run` reads its log format from its config first
    if !matches!(cmd, Cmd::Run { .. }) {
        hagate::logging::init(hagate::config::LogFormat::Text);
    }
    match dispatch(cmd) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("hagate: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// The allocator's options for a long-lived gateway. mimalloc (v3) hands memory freed by a
/// thread back to the system only 1 s after the free, on a later free in the same heap, so
/// a gateway held 10-20 MiB more than it used, and more after reloads; 10 ms (mimalloc v2's
/// default) keeps RSS closer to what is live at no measured CPU cost per request
/// (docs/performance.md, P7). mimalloc reads its options from the environment as the
/// process starts, before `main`, and the crate has no `unsafe`, so the gateway sets the
/// variable and executes itself again, once, with the same arguments and process id. An
/// operator's own `MIMALLOC_PURGE_DELAY` is left alone; if the `exec` fails, the gateway
/// carries on with mimalloc's default.
fn allocator_options() {
    use std::os::unix::process::CommandExt;
    const VAR: &str = "MIMALLOC_PURGE_DELAY";
    if !cfg!(feature = "mimalloc") || std::env::var_os(VAR).is_some() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_default();
    let error = Command::new(exe)
        .arg0(arg0)
        .args(args)
        .env(VAR, "10")
        .exec();
    eprintln!("hagate: could not set {VAR} ({error}); keeping mimalloc's default");
}

fn dispatch(cmd: Cmd) -> Result<ExitCode> {
    match cmd {
        Cmd::Run { config, upgrade } => {
            let (cfg, read) = Config::load_reusing(&config, None)?;
            hagate::logging::init(cfg.log.format);
            match hagate::server::run(cfg, Some(config), Some(read), upgrade)? {}
        }
        Cmd::Check { config } => {
            let cfg = Config::load(&config)?;
            // Loads every plugin as a reload would: file, hash, compile, limits, configure.
            let plugins = hagate::plugin::PluginSet::load(&cfg.plugins, None)
                .with_context(|| config.display().to_string())?;
            let store = match cfg.store.kind {
                hagate::config::StoreKind::Embedded => "embedded store".to_string(),
                hagate::config::StoreKind::Etcd => format!(
                    "etcd store at {} under {}",
                    cfg.store.endpoints.join(","),
                    cfg.store.prefix
                ),
            };
            println!(
                "{}: ok ({} instances, {} plugins, {store}, membership {}, proxy on {}, admin on {})",
                config.display(),
                cfg.instances.len(),
                plugins.plugins().len(),
                if cfg.membership.enabled { "on" } else { "off" },
                cfg.server.listen,
                cfg.admin.listen
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Plugin {
            command: PluginCmd::Test(t),
        } => plugin_test(t),
        Cmd::Agent {
            alias,
            address,
            gateway,
            token,
            health_url,
            interval,
            timeout,
        } => {
            use hagate::membership::{agent, Params};
            let opts = agent::AgentOptions {
                alias: alias.try_into().context("--alias")?,
                address: {
                    address
                        .parse::<std::net::SocketAddr>()
                        .with_context(|| format!("--address {address:?}"))?;
                    address
                },
                gateways: gateway
                    .into_iter()
                    .map(|g| g.trim().to_string())
                    .filter(|g| !g.is_empty())
                    .collect(),
                token,
                health_url,
                params: Params::new(interval, timeout).context("-I/-T")?,
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let why = rt.block_on(agent::run(opts, uuid::Uuid::new_v4().to_string()));
            eprintln!("hagate agent: {why}");
            Ok(ExitCode::from(3))
        }
        Cmd::Haid {
            command: HaidCmd::Encode { main, backup, id },
        } => {
            let backups: Vec<&str> = backup.iter().map(String::as_str).collect();
            println!("{}", haid::encode(&main, &backups, &id)?);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Haid {
            command: HaidCmd::Decode { value },
        } => {
            if value == "-" {
                let stdin = std::io::stdin();
                let mut out = std::io::stdout().lock();
                for line in stdin.lock().lines() {
                    writeln!(out, "{}", decode_json(&line?))?;
                }
                Ok(ExitCode::SUCCESS)
            } else {
                let answer = decode_json(&value);
                println!("{answer}");
                Ok(if answer["valid"] == true {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                })
            }
        }
        Cmd::DemoServer { name, listen } => demo_server(&name, &listen),
        Cmd::Demo { plugins } => demo(&plugins),
    }
}

/// One candidate as `plugin test --candidates` reads it.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CandidateFile {
    alias: String,
    #[serde(default = "yes")]
    live: bool,
    #[serde(default)]
    inflight: u64,
    #[serde(default)]
    latency_ewma_us: u32,
    #[serde(default)]
    reported_load: Option<f32>,
    #[serde(default = "one")]
    weight: u32,
    #[serde(default)]
    labels: hagate::model::Labels,
}

fn yes() -> bool {
    true
}
fn one() -> u32 {
    1
}

fn plugin_test(t: PluginTest) -> Result<ExitCode> {
    use hagate::placement::{Candidate, Candidates, PlacementRequest};
    let bytes = std::fs::read(&t.wasm).with_context(|| t.wasm.display().to_string())?;
    let config = match &t.config {
        Some(p) => {
            std::fs::read_to_string(p).with_context(|| format!("--config {}", p.display()))?
        }
        None => String::new(),
    };
    let text = std::fs::read_to_string(&t.candidates)
        .with_context(|| format!("--candidates {}", t.candidates.display()))?;
    let file: Vec<CandidateFile> = serde_json::from_str(&text)
        .with_context(|| format!("--candidates {}", t.candidates.display()))?;
    let limits = hagate::plugin::Limits::new(t.deadline, t.memory_limit);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let plugin = rt
        .block_on(hagate::plugin::Plugin::load(&bytes, &config, limits))
        .with_context(|| format!("plugin {}", t.wasm.display()))?;
    let candidates = Candidates {
        version: 1,
        list: file
            .iter()
            .map(|c| Candidate {
                alias: &c.alias,
                live: c.live,
                inflight: c.inflight,
                latency_ewma_us: c.latency_ewma_us,
                reported_load: c.reported_load,
                weight: c.weight,
                labels: &c.labels,
            })
            .collect(),
    };
    let mut exclude = Vec::new();
    for alias in &t.exclude {
        match file.iter().position(|c| &c.alias == alias) {
            Some(i) => exclude.push(i),
            None => bail!("--exclude {alias}: not among the candidates"),
        }
    }
    let request = PlacementRequest {
        tenant: t.tenant.as_deref(),
        path: &t.request_path,
        context_id: t.context_id.as_deref(),
        exclude: &exclude,
    };
    let alias = |i: Option<usize>| i.map(|i| file[i].alias.as_str());
    let mut counts = std::collections::BTreeMap::<(String, Option<String>), u32>::new();
    for _ in 0..t.repeat.max(1) {
        match rt.block_on(plugin.place(&request, &candidates)) {
            Ok(choice) => {
                let key = (
                    file[choice.main].alias.clone(),
                    alias(choice.backup).map(String::from),
                );
                *counts.entry(key).or_default() += 1;
            }
            Err(e) => {
                println!(
                    "{}",
                    json!({"outcome": e.outcome(), "error": e.to_string(), "wit": plugin.version()})
                );
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    for ((main, backup), n) in counts {
        let mut line =
            json!({"outcome": "ok", "main": main, "backup": backup, "wit": plugin.version()});
        if t.repeat > 1 {
            line["count"] = n.into();
        }
        println!("{line}");
    }
    Ok(ExitCode::SUCCESS)
}

fn decode_json(value: &str) -> serde_json::Value {
    let text = match context_id::unwrap(value) {
        Ok(t) => t,
        Err(e) => return json!({"valid": false, "error": e.to_string()}),
    };
    match haid::decode(&text) {
        Ok(h) => {
            json!({"valid": true, "main": h.main_java(), "backup": h.backup_java(), "id": h.id})
        }
        Err(e) => json!({"valid": false, "error": e.to_string(), "reason": e.reason()}),
    }
}

fn demo_server(name: &str, listen: &str) -> Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("--listen: cannot listen on {listen}"))?;
        println!("demo-server {name} listening on {}", listener.local_addr()?);
        std::io::stdout().flush()?;
        hagate::demo::DemoServer::new(name).run(listener).await;
        Ok(ExitCode::SUCCESS)
    })
}

/// Adds the example plugins found in `dir` to the demo config: `tenant-affinity` for
/// requests with a tenant header, `lowest-load` for the rest. Their hashes are taken from
/// the files, which the demo trusts because it just built them.
fn demo_plugins(config: &mut Config, dir: &std::path::Path) -> Result<Vec<String>> {
    use sha2::Digest;
    let mut found = Vec::new();
    for (name, file, plugin_config, tenant_only) in [
        (
            "tenant-affinity",
            "tenant_affinity.wasm",
            r#"{"fallback": "shared"}"#,
            true,
        ),
        ("lowest-load", "lowest_load.wasm", "", false),
    ] {
        let path = dir.join(file);
        let Ok(bytes) = std::fs::read(&path) else {
            continue;
        };
        let mut spec: hagate::config::PluginConfig = toml::from_str(&format!(
            "name = {name:?}\npath = {path:?}\nsha256 = {sha:?}\nconfig = {plugin_config:?}\n",
            path = path.display().to_string(),
            sha = hex::encode(sha2::Sha256::digest(&bytes)),
        ))?;
        if tenant_only {
            for tenant in ["acme", "globex"] {
                spec.matches.push(hagate::config::PluginMatch {
                    path_prefix: None,
                    tenant: Some(tenant.into()),
                });
            }
        }
        found.push(format!("{name} ({})", path.display()));
        config.plugins.push(spec);
    }
    config.validate()?;
    Ok(found)
}

fn demo(plugins: &std::path::Path) -> Result<ExitCode> {
    let mut config = Config::parse(DEMO_CONFIG).context("the embedded demo config")?;
    let loaded = demo_plugins(&mut config, plugins)?;
    let exe = std::env::current_exe()?;
    let mut servers: Vec<(String, Child)> = Vec::new();
    for (alias, spec) in config.instances.iter() {
        let mut child = Command::new(&exe)
            .args(["demo-server", "--name", alias, "--listen", &spec.address])
            .stdout(Stdio::piped())
            .spawn()?;
        let mut line = String::new();
        let stdout = child.stdout.take().context("demo server stdout")?;
        std::io::BufReader::new(stdout).read_line(&mut line)?;
        if !line.contains("listening") {
            bail!("demo server {alias} did not start on {}", spec.address);
        }
        servers.push((alias.clone(), child));
    }
    let proxy = &config.server.listen;
    let admin = &config.admin.listen;
    let (main, backup) = (&servers[0], &servers[1]);
    let haid = haid::encode(&main.0, &[&backup.0], "1024")?;
    let path = "/api/rest_j/v1/contextservice/getContextValue";
    println!(
        r#"
hagate demo: gateway on http://{proxy}, admin on http://{admin}
demo context servers: {servers}
placement plugins: {plugins}

# 1. create a context: no HAID, so a placement plugin picks a main and a backup and the server mints a HAID
curl -s -X POST http://{proxy}/api/rest_j/v1/contextservice/createContextID
curl -s -X POST -H 'x-hagate-tenant: acme' http://{proxy}/api/rest_j/v1/contextservice/createContextID   # acme's own instance, cs_3_demo
# ... or let the gateway mint the HAID itself
curl -s -X POST -d '{{"tenant": "acme", "context_id": "1024"}}' http://{admin}/v1/placements
# 2. a request for HAID {haid} lands on its main, {main_alias}
curl -s -H 'contextID: {haid}' http://{proxy}{path}
# 3. kill the main
kill -9 {main_pid}
# 4. the same request is now served by the backup, {backup_alias}, without an error
curl -s -H 'contextID: {haid}' http://{proxy}{path}
# 5. bad input gets a JSON answer
curl -s -H 'contextID: 9-9--nope' http://{proxy}{path}
# 6. health, failovers and the alias table
curl -s http://{admin}/metrics | grep -E 'hagate_(instance_up|failovers_total|requests_total|plugin_calls_total)'
curl -s http://{admin}/v1/aliases
"#,
        servers = servers
            .iter()
            .map(|(a, c)| format!("{a} (pid {})", c.id()))
            .collect::<Vec<_>>()
            .join(", "),
        plugins = if loaded.is_empty() {
            "none found (run scripts/demo.sh, which builds them); placing natively".to_string()
        } else {
            loaded.join(", ")
        },
        main_alias = main.0,
        main_pid = main.1.id(),
        backup_alias = backup.0,
    );
    match hagate::server::run(config, None, None, false)? {}
}
