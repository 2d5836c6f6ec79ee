//! Test harness: real gateway and real demo context servers as child processes on
//! 127.0.0.1, killed by RAII guards; polling with deadlines instead of sleeps.
#![allow(dead_code)]

pub mod etcd;

use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_hagate");
/// A test gateway's log, under its directory but not in the config's own directory.
const LOG: &str = "logs/hagate.log";

/// A free loopback port for a gateway listener, below the kernel's ephemeral range
/// (32768-60999 by default): a port from `bind(":0")` is ephemeral, and the kernel can hand
/// it to an outgoing connection's source port between our check and the gateway's bind.
/// Ports are taken in turn from a per-process offset, so two tests never pick the same one.
pub fn gateway_port() -> u16 {
    static SEED: OnceLock<u32> = OnceLock::new();
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let seed = *SEED.get_or_init(|| {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        std::process::id().wrapping_mul(7919) ^ nanos
    });
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 20_000 + (seed.wrapping_add(n) % 12_000) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Polls `f` until it returns `Some`, or panics after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    loop {
        tick.tick().await;
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// A demo context server in its own process (so it can be `kill -9`ed).
pub struct Upstream {
    pub name: String,
    pub addr: SocketAddr,
    child: Option<Child>,
}

impl Upstream {
    pub fn start(name: &str) -> Self {
        Self::start_on(name, "127.0.0.1:0")
    }

    pub fn start_on(name: &str, listen: &str) -> Self {
        let mut child = Command::new(BIN)
            .args(["demo-server", "--name", name, "--listen", listen])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn demo-server");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .rsplit(' ')
            .next()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("demo-server {name} did not start: {line:?}"));
        Upstream {
            name: name.into(),
            addr,
            child: Some(child),
        }
    }

    /// SIGKILL, like `kill -9`.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// Starts again on the same address.
    pub fn restart(&mut self) {
        self.kill();
        let fresh = Self::start_on(&self.name, &self.addr.to_string());
        *self = fresh;
    }

    pub async fn stats(&self) -> Value {
        client()
            .get(format!("http://{}/demo/stats", self.addr))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// `PUT /demo/<what>` with `body` on the demo server's control API.
    async fn put_demo(&self, what: &str, body: String) {
        let r = client()
            .put(format!("http://{}/demo/{what}", self.addr))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "PUT /demo/{what}");
    }

    /// Makes echo answers use `status` (e.g. 500).
    pub async fn set_status(&self, status: u16) {
        self.put_demo("status", status.to_string()).await
    }

    /// Makes echo answers report `load` in `x-hagate-load` (empty: no header).
    pub async fn set_load(&self, load: &str) {
        self.put_demo("load", load.to_string()).await
    }

    pub async fn set_health(&self, up: bool) {
        self.put_demo("health", if up { "up" } else { "down" }.to_string())
            .await
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A running `hagate run` with its config in a temp dir.
pub struct Gateway {
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
    child: Child,
}

/// The log filter of the processes a test starts: `info`, or `HAGATE_TEST_LOG` when set
/// (for example `info,hagate::health=debug` to see why a health check failed).
pub fn log_filter() -> String {
    std::env::var("HAGATE_TEST_LOG").unwrap_or_else(|_| "info".into())
}

/// Fast health settings so tests converge quickly.
pub const FAST_HEALTH: &str = r#"
[health.active]
path = "/health"
interval = "200ms"
timeout = "200ms"
rise = 2
fall = 2

[health.passive]
consecutive_failures = 3
base_ejection = "1s"
max_ejection = "5s"

[upstream]
connect_timeout = "500ms"
read_timeout = "5s"
"#;

pub fn instances(ups: &[(&str, &Upstream)]) -> String {
    ups.iter()
        .map(|(alias, u)| format!("[instances.{alias}]\naddress = \"{}\"\n", u.addr))
        .collect()
}

impl Gateway {
    /// Starts the gateway with `body` (everything but `[server]` and `[admin]`).
    pub async fn start(body: &str) -> Self {
        Self::start_with_admin(body, "").await
    }

    pub async fn start_with_admin(body: &str, admin_extra: &str) -> Self {
        Self::start_full(body, "", admin_extra, None).await
    }

    /// Starts the gateway under `ulimit -n nofile` (soft and hard).
    pub async fn start_with_nofile(body: &str, nofile: u64) -> Self {
        Self::start_full(body, "", "", Some(nofile)).await
    }

    /// Starts the gateway with extra `[server]` and `[admin]` lines, optionally under
    /// `ulimit -n`.
    pub async fn start_full(
        body: &str,
        server_extra: &str,
        admin_extra: &str,
        nofile: Option<u64>,
    ) -> Self {
        Self::start_env(body, server_extra, admin_extra, nofile, &[]).await
    }

    /// `start_full`, with extra environment variables for the gateway process.
    pub async fn start_env(
        body: &str,
        server_extra: &str,
        admin_extra: &str,
        nofile: Option<u64>,
        env: &[(&str, &str)],
    ) -> Self {
        // Another process may still take a port first; then start again on new ones.
        for _ in 0..5 {
            if let Some(gw) = Self::try_start(body, server_extra, admin_extra, nofile, env).await {
                return gw;
            }
        }
        panic!("the gateway could not bind its ports in 5 tries");
    }

    /// Starts a gateway; `None` if it exited because a port was taken.
    async fn try_start(
        body: &str,
        server_extra: &str,
        admin_extra: &str,
        nofile: Option<u64>,
        env: &[(&str, &str)],
    ) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let proxy: SocketAddr = format!("127.0.0.1:{}", gateway_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", gateway_port()).parse().unwrap();
        // The pid file in the test's own directory, not the default /tmp/hagate-PORT.pid: a
        // gateway killed at the end of a test cannot remove it, and it would stay behind.
        let pid_file = if server_extra.contains("pid_file") {
            ""
        } else {
            std::fs::create_dir_all(dir.path().join("run")).unwrap();
            "pid_file = \"run/hagate.pid\"\n"
        };
        let config = format!(
            "[server]\nlisten = \"{proxy}\"\nthreads = 2\ngrace_period = \"1s\"\n{pid_file}{server_extra}\n[admin]\nlisten = \"{admin}\"\n{admin_extra}\n{body}"
        );
        let path = dir.path().join("hagate.toml");
        std::fs::write(&path, config).unwrap();
        // appended to, so that a process that replaces it (`upgrade`) can log there too;
        // not beside the config, whose directory the gateway watches
        std::fs::create_dir_all(dir.path().join("logs")).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.path().join(LOG))
            .unwrap();
        let mut cmd = match nofile {
            None => Command::new(BIN),
            Some(n) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(format!("ulimit -n {n} && exec \"$0\" \"$@\""))
                    .arg(BIN);
                c
            }
        };
        let child = cmd
            .args(["run", "--config"])
            .arg(&path)
            .env("RUST_LOG", log_filter())
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn hagate run");
        let mut gw = Gateway {
            proxy,
            admin,
            dir,
            child,
        };
        let c = client();
        let url = gw.admin_url("/healthz");
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        loop {
            tick.tick().await;
            if let Some(status) = gw.child.try_wait().unwrap() {
                let log = gw.log();
                if log.contains("cannot listen") {
                    return None;
                }
                panic!("the gateway exited with {status}:\n{log}");
            }
            let admin_up = c.get(&url).send().await.is_ok_and(|r| r.status() == 200);
            if admin_up && tokio::net::TcpStream::connect(proxy).await.is_ok() {
                return Some(gw);
            }
            assert!(
                Instant::now() < deadline,
                "the gateway did not start in 20s:\n{}",
                gw.log()
            );
        }
    }

    /// Replaces the running gateway with a new process on the same config
    /// (`hagate run --upgrade`), and returns once the old one has exited. The new process
    /// logs to the same file.
    pub async fn upgrade(&mut self) {
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(self.dir.path().join(LOG))
            .unwrap();
        let new = Command::new(BIN)
            .args(["run", "--upgrade", "--config"])
            .arg(self.config_path())
            .env("RUST_LOG", log_filter())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn hagate run --upgrade");
        let mut old = std::mem::replace(&mut self.child, new);
        let status = eventually(
            "the old gateway to exit after the upgrade",
            Duration::from_secs(60),
            || {
                let exited = old.try_wait().unwrap();
                async move { exited }
            },
        )
        .await;
        assert!(status.success(), "the old gateway exited with {status}");
    }

    /// Whether the gateway process is still running.
    pub fn still_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("hagate.toml")
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.proxy, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The text of `/metrics`.
    pub async fn metrics_text(&self) -> String {
        client()
            .get(self.admin_url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The value of the series `name` whose labels include all of `labels`, or 0.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_in(&self.metrics_text().await, name, labels)
    }

    /// Waits until the series reaches at least `min`.
    pub async fn wait_metric(&self, name: &str, labels: &[(&str, &str)], min: f64) {
        let what = format!("{name}{labels:?} >= {min}");
        eventually(&what, Duration::from_secs(10), || async move {
            (self.metric(name, labels).await >= min).then_some(())
        })
        .await
    }

    /// Waits until a reload of `plugin` has been counted with `result` (ok or error). A
    /// debug build's cranelift takes seconds to compile a plugin, over 10 s with both
    /// cores busy, so this waits as long as `the_admin_api_answers_while_a_slow_reload_compiles`.
    pub async fn wait_plugin_reload(&self, plugin: &str, result: &str) {
        let labels = [("plugin", plugin), ("result", result)];
        let what = format!("a reload of plugin {plugin} with result {result}");
        eventually(&what, Duration::from_secs(120), || async {
            (self.metric("hagate_plugin_reloads_total", &labels).await >= 1.0).then_some(())
        })
        .await
    }

    /// Waits until a request for `haid` is answered by the server named `server`.
    pub async fn wait_served_by(&self, haid: &str, server: &str) {
        let c = client();
        let what = format!("{haid} to be served by {server}");
        eventually(&what, Duration::from_secs(15), || {
            let c = &c;
            async move { (get_haid(c, self, haid).await.1["server"] == server).then_some(()) }
        })
        .await
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join(LOG)).unwrap_or_default()
    }

    /// Rewrites the config file in place.
    pub fn rewrite(&self, f: impl FnOnce(&str) -> String) {
        let path = self.config_path();
        let old = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, f(&old)).unwrap();
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("--- gateway log (last 40 lines) ---");
            for l in tail.into_iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// Sends a request with `contextID: haid` and returns the response.
pub async fn send_haid(c: &reqwest::Client, gw: &Gateway, haid: &str) -> reqwest::Response {
    c.get(gw.url("/api/rest_j/v1/contextservice/getContextValue"))
        .header("contextID", haid)
        .send()
        .await
        .unwrap()
}

/// Sends a request with `contextID: haid` and returns (status, JSON body).
pub async fn get_haid(c: &reqwest::Client, gw: &Gateway, haid: &str) -> (u16, Value) {
    let r = send_haid(c, gw, haid).await;
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Sends `req` and parses the JSON answer.
pub async fn json_of(req: reqwest::RequestBuilder) -> Value {
    req.send().await.unwrap().json().await.unwrap()
}

pub fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// The `.wasm` of plugin crate `name` (e.g. `lowest_load`), built from `plugins/` with the
/// same command as `scripts/build-plugins.sh` (once per test process; cargo makes it a
/// no-op when nothing changed).
pub fn plugin_wasm(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let status = Command::new(env!("CARGO"))
            .current_dir(repo_path("plugins"))
            .args([
                "build",
                "--release",
                "--target",
                "wasm32-wasip2",
                "--target-dir",
            ])
            .arg(repo_path("plugins/target"))
            .env_remove("CARGO_TARGET_DIR")
            .status()
            .expect("run cargo for the plugins");
        assert!(status.success(), "building plugins/ failed");
    });
    let path = repo_path(&format!("plugins/target/wasm32-wasip2/release/{name}.wasm"));
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// The sha256 of a file, in hex.
pub fn sha256_of(path: &Path) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(std::fs::read(path).unwrap()))
}

/// A `[[plugins]]` entry for `wasm` with its real hash; `extra` adds TOML lines.
pub fn plugin_entry(name: &str, wasm: &Path, extra: &str) -> String {
    format!(
        "[[plugins]]\nname = {name:?}\npath = {path:?}\nsha256 = {sha:?}\n{extra}\n",
        path = wasm.display().to_string(),
        sha = sha256_of(wasm),
    )
}

/// Concurrent request loops, until `finish`: loop `w` sends `request(&client, w, i)` for
/// i = 0, 1, ... and counts 200 answers; anything else is kept as an error.
pub struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ok: std::sync::Arc<std::sync::atomic::AtomicU64>,
    loops: Vec<tokio::task::JoinHandle<Vec<String>>>,
}

impl Load {
    pub fn start<F>(loops: usize, request: F) -> Load
    where
        F: Fn(&reqwest::Client, usize, usize) -> reqwest::RequestBuilder + Send + Sync + 'static,
    {
        use std::sync::atomic::{AtomicBool, AtomicU64};
        use std::sync::Arc;
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let request = Arc::new(request);
        let loops = (0..loops)
            .map(|w| {
                let (stop, ok, request) = (stop.clone(), ok.clone(), request.clone());
                tokio::spawn(async move {
                    let c = client();
                    let mut errors = Vec::new();
                    let mut i = 0;
                    while !stop.load(Ordering::Relaxed) {
                        match request(&c, w, i).send().await {
                            Ok(r) if r.status() == 200 => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(r) => errors.push(format!("{}: {}", r.url(), r.status())),
                            Err(e) => errors.push(e.to_string()),
                        }
                        i += 1;
                    }
                    errors
                })
            })
            .collect();
        Load { stop, ok, loops }
    }

    /// Requests answered 200 so far.
    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Waits (up to 20 s) until `more` further requests have been answered 200.
    pub async fn served(&self, more: u64, what: &str) {
        let target = self.ok() + more;
        eventually(what, Duration::from_secs(20), || async {
            (self.ok() >= target).then_some(())
        })
        .await
    }

    /// Stops the loops; (200 answers, errors).
    pub async fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let mut errors = Vec::new();
        for l in self.loops {
            errors.extend(l.await.unwrap());
        }
        (self.ok.load(Ordering::Relaxed), errors)
    }
}

/// A `hagate agent` process, killed on drop; its log is printed if the test fails.
pub struct Agent {
    pub child: Child,
    log: tempfile::NamedTempFile,
}

/// What an agent is started with, owned, so that a supervisor can start it again.
#[derive(Clone)]
pub struct AgentArgs {
    gateways: String,
    alias: String,
    address: String,
    interval: Duration,
    timeout: Duration,
    token: String,
}

impl AgentArgs {
    /// An agent holding (or standing by for) `alias` for `server`, heartbeating to the
    /// first of `gateways` and moving on to the others when it fails.
    pub fn new(
        gateways: &[&Gateway],
        alias: &str,
        server: &Upstream,
        interval: Duration,
        timeout: Duration,
        token: &str,
    ) -> AgentArgs {
        let urls: Vec<String> = gateways
            .iter()
            .map(|g| format!("http://{}", g.admin))
            .collect();
        AgentArgs {
            gateways: urls.join(","),
            alias: alias.to_string(),
            address: server.addr.to_string(),
            interval,
            timeout,
            token: token.to_string(),
        }
    }
}

impl Agent {
    /// An agent started with `args`.
    pub fn start(args: &AgentArgs) -> Agent {
        let log = tempfile::NamedTempFile::new().unwrap();
        let child = Command::new(BIN)
            .args(["agent", "--alias", &args.alias, "--address", &args.address])
            .args(["--gateway", &args.gateways, "--token", &args.token])
            .arg("--health-url")
            .arg(format!("http://{}/health", args.address))
            .args([
                "-I",
                &format!("{}ms", args.interval.as_millis()),
                "-T",
                &format!("{}ms", args.timeout.as_millis()),
            ])
            .env("RUST_LOG", log_filter())
            .stdout(Stdio::null())
            .stderr(log.reopen().unwrap())
            .spawn()
            .expect("spawn hagate agent");
        Agent { child, log }
    }

    /// What the agent logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// Waits for the agent to exit on its own; its exit code.
    pub async fn exit_code(&mut self, within: Duration) -> i32 {
        let child = &mut self.child;
        eventually("the agent to exit", within, || {
            let status = child.try_wait().unwrap();
            async move { status.map(|s| s.code().unwrap_or(-1)) }
        })
        .await
    }

    /// Whether the agent process is still running.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Sends a signal (`STOP`, `CONT`) with kill(1).
    pub fn signal(&self, sig: &str) {
        signal(self.child.id(), sig);
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- agent log ---\n{}", self.log());
        }
    }
}

/// An agent run as the README says to run one: under a supervisor that starts it again when
/// it steps down (exit status 3), as systemd's `Restart=always` does. A holder steps down by
/// design when the gateways do not answer it for T - I, which a loaded machine can cause;
/// it then comes back as a standby. Any other exit is a failure, which `stop` reports.
pub struct SupervisedAgent {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Supervision>>,
}

/// What a supervisor saw: restarts after a step-down, and exits that were not one.
#[derive(Debug, Default)]
pub struct Supervision {
    pub restarts: u32,
    pub failures: Vec<String>,
}

impl SupervisedAgent {
    pub fn spawn(args: AgentArgs) -> SupervisedAgent {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut seen = Supervision::default();
            let mut agent = Agent::start(&args);
            while !stopped.load(Ordering::Acquire) {
                match agent.child.try_wait().unwrap() {
                    // the supervisor's own poll of its child, as a service manager's
                    None => std::thread::park_timeout(Duration::from_millis(20)),
                    Some(status) => {
                        let log = agent.log();
                        if status.code() == Some(3) {
                            seen.restarts += 1;
                            eprintln!(
                                "the agent for {} stepped down; starting it again:\n{log}",
                                args.alias
                            );
                        } else {
                            seen.failures.push(format!(
                                "the agent for {} exited {status}:\n{log}",
                                args.alias
                            ));
                        }
                        agent = Agent::start(&args);
                    }
                }
            }
            agent.kill();
            seen
        });
        SupervisedAgent {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the supervisor, then `kill -9`s the agent; what the supervisor saw.
    pub fn kill(&mut self) -> Supervision {
        self.stop.store(true, Ordering::Release);
        match self.thread.take() {
            Some(thread) => {
                thread.thread().unpark();
                thread.join().expect("the agent's supervisor")
            }
            None => Supervision::default(),
        }
    }
}

impl Drop for SupervisedAgent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            thread.thread().unpark();
            let _ = thread.join();
        }
    }
}

/// Sends `sig` (e.g. `STOP`, `CONT`, `KILL`) to `pid` with kill(1).
pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -{sig} {pid}");
}

/// What a chaos run saw.
#[derive(Debug)]
pub struct ChaosReport {
    pub kills: u32,
    pub ok: u64,
    pub takeovers: f64,
    /// Holders that stepped down on their own (and were started again as standbys).
    pub step_downs: u32,
}

/// The holder of `alias` as `GET /v1/membership/primary/{alias}` on `gw` reports it.
pub async fn primary_holder(gw: &Gateway, alias: &str) -> Value {
    json_of(client().get(gw.admin_url(&format!("/v1/membership/primary/{alias}")))).await["holder"]
        .clone()
}

/// Waits until `gw` names `server` as the holder of `alias`; the holder entry.
pub async fn wait_primary_at(gw: &Gateway, alias: &str, server: &Upstream) -> Value {
    let what = format!("{alias} to be held at {}", server.addr);
    eventually(&what, Duration::from_secs(20), || async {
        let h = primary_holder(gw, alias).await;
        (h["address"] == server.addr.to_string()).then_some(h)
    })
    .await
}

/// Waits until `gw` names `server` as the holder of `alias` under another uuid than
/// `old`: a new holding, not the entry of a dead holder at the same address, which stays
/// fresh until its lease runs out.
pub async fn wait_new_holder_at(
    gw: &Gateway,
    alias: &str,
    server: &Upstream,
    old: &Value,
) -> Value {
    let what = format!("{alias} to be held anew at {}", server.addr);
    eventually(&what, Duration::from_secs(20), || async {
        let h = primary_holder(gw, alias).await;
        (h["address"] == server.addr.to_string() && h["uuid"] != *old).then_some(h)
    })
    .await
}

/// The chaos run: one agent per alias (heartbeating to every gateway in turn), load over
/// every HAID pair through every gateway, and `cycles` rounds of `kill -9` of a random
/// server and its agent, restarted once the gateways saw it down and some traffic went by
/// without it. Counted in cycles, not seconds, so a slow machine runs longer instead of
/// doing less. Asserts that no request failed and that traffic flowed; the report says
/// how much happened.
pub async fn chaos(
    gws: &[&Gateway],
    mut servers: Vec<Upstream>,
    aliases: &[&'static str],
    (interval, timeout, token): (Duration, Duration, &str),
    cycles: u32,
) -> ChaosReport {
    let n = aliases.len();
    // supervised as the README says, so that a holder that steps down while the machine is
    // slow comes back as a standby
    let spawn = |i: usize, server: &Upstream| {
        SupervisedAgent::spawn(AgentArgs::new(
            gws, aliases[i], server, interval, timeout, token,
        ))
    };
    let mut agents: Vec<SupervisedAgent> = (0..n).map(|i| spawn(i, &servers[i])).collect();
    let mut supervision = Supervision::default();
    let mut note = |seen: Supervision| {
        supervision.restarts += seen.restarts;
        supervision.failures.extend(seen.failures);
    };
    for i in 0..n {
        wait_primary_at(gws[0], aliases[i], &servers[i]).await;
    }
    // every (main, backup) pair: at most one server is down at a time, so each context
    // always has a live holder for its main or its backup
    let mut haids = Vec::new();
    for m in aliases {
        for b in aliases {
            if m != b {
                haids.push(hagate::haid::encode(m, &[b], "77").unwrap());
            }
        }
    }
    let urls: Vec<String> = gws
        .iter()
        .map(|g| g.url("/api/rest_j/v1/contextservice/getContextValue"))
        .collect();
    let load = {
        let haids = haids.clone();
        Load::start(4, move |c, w, i| {
            c.get(&urls[(w + i) % urls.len()])
                .header("contextID", &haids[(w + i) % haids.len()])
        })
    };
    let mut rng = fastrand::Rng::new();
    let mut kills = 0;
    // The schedule is driven by what happens, not by sleeping: a server stays dead until
    // every gateway has seen it go down and a random amount of traffic has been served
    // without it, and stays up for another random amount once it is live again.
    let seen = |i: usize, want: f64| async move {
        for gw in gws {
            eventually(
                "the gateway to see the server's state",
                Duration::from_secs(10),
                || async move {
                    let up = gw
                        .metric("hagate_instance_up", &[("alias", aliases[i])])
                        .await;
                    (up == want).then_some(())
                },
            )
            .await;
        }
    };
    let served = |more: u64| load.served(more, "traffic to be served");
    while kills < cycles {
        let i = rng.usize(0..n);
        let old = wait_primary_at(gws[0], aliases[i], &servers[i]).await["uuid"].clone();
        note(agents[i].kill());
        servers[i].kill();
        kills += 1;
        seen(i, 0.0).await;
        served(rng.u64(300..1500)).await;
        servers[i].restart();
        agents[i] = spawn(i, &servers[i]);
        // the restarted server's new agent holds the alias again (a takeover) before the
        // next kill
        for gw in gws {
            wait_new_holder_at(gw, aliases[i], &servers[i], &old).await;
        }
        seen(i, 1.0).await;
        served(rng.u64(200..800)).await;
    }
    let (ok, errors) = load.finish().await;
    for agent in &mut agents {
        note(agent.kill());
    }
    let mut takeovers = 0.0;
    for gw in gws {
        for a in aliases {
            takeovers += gw
                .metric("hagate_membership_takeovers_total", &[("alias", a)])
                .await;
        }
    }
    eprintln!(
        "chaos on {} gateway(s): {kills} kill -9 + restart cycles, {ok} requests, {} errors, {takeovers} takeovers, {} step-downs",
        gws.len(),
        errors.len(),
        supervision.restarts
    );
    assert!(ok > 100, "{ok} requests");
    assert!(errors.is_empty(), "{errors:?}");
    assert!(
        supervision.failures.is_empty(),
        "{:#?}",
        supervision.failures
    );
    ChaosReport {
        kills,
        ok,
        takeovers,
        step_downs: supervision.restarts,
    }
}

/// Sends a `PUT /v1/aliases` with a bad address and checks that it is refused with the
/// field named; the answer.
pub async fn put_bad_table(gw: &Gateway) -> Value {
    let r = client()
        .put(gw.admin_url("/v1/aliases"))
        .json(&serde_json::json!({"instances": {"cs_1": {"address": "10.0.0:80"}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["field"], "instances.cs_1.address", "{body}");
    body
}

/// The value of the first series `name` with `labels` in a `/metrics` text (0 if none):
/// several series read from one scrape are consistent with each other.
pub fn metric_in(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let wanted: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, "}"));
            let have: Vec<&str> = rest.trim_end_matches('}').split(',').collect();
            (n == name && wanted.iter().all(|w| have.contains(&w.as_str())))
                .then(|| value.parse().unwrap())
        })
        .unwrap_or(0.0)
}
