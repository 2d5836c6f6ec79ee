//! The `hagate` command line: parses arguments and calls into the library.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use serde_json::json;

use hagate::config::Config;
use hagate::{context_id, haid};

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
    /// Start the gateway on the embedded demo config with three demo context servers,
    /// and print curl lines to try it.
    Demo,
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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match dispatch(Cli::parse().command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("hagate: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn dispatch(cmd: Cmd) -> Result<ExitCode> {
    match cmd {
        Cmd::Run { config } => {
            let cfg = Config::load(&config)?;
            match hagate::server::run(cfg, Some(config))? {}
        }
        Cmd::Check { config } => {
            let cfg = Config::load(&config)?;
            println!(
                "{}: ok ({} instances, proxy on {}, admin on {})",
                config.display(),
                cfg.instances.len(),
                cfg.server.listen,
                cfg.admin.listen
            );
            Ok(ExitCode::SUCCESS)
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
        Cmd::Demo => demo(),
    }
}

fn decode_json(value: &str) -> serde_json::Value {
    let text = match context_id::unwrap(value) {
        Ok(t) => t,
        Err(e) => return json!({"valid": false, "error": e.to_string()}),
    };
    match haid::decode(&text) {
        Ok(h) => json!({"valid": true, "main": h.main, "backup": h.backup, "id": h.id}),
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

fn demo() -> Result<ExitCode> {
    let config = Config::parse(DEMO_CONFIG).context("the embedded demo config")?;
    let exe = std::env::current_exe()?;
    let mut servers: Vec<(String, Child)> = Vec::new();
    for (alias, spec) in &config.instances {
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

# 1. create a context: no HAID, so placement picks a main and a backup and the server mints a HAID
curl -s -X POST http://{proxy}/api/rest_j/v1/contextservice/createContextID
# 2. a request for HAID {haid} lands on its main, {main_alias}
curl -s -H 'contextID: {haid}' http://{proxy}{path}
# 3. kill the main
kill -9 {main_pid}
# 4. the same request is now served by the backup, {backup_alias}, without an error
curl -s -H 'contextID: {haid}' http://{proxy}{path}
# 5. bad input gets a JSON answer
curl -s -H 'contextID: 9-9--nope' http://{proxy}{path}
# 6. health, failovers and the alias table
curl -s http://{admin}/metrics | grep -E 'hagate_(instance_up|failovers_total|requests_total)'
curl -s http://{admin}/v1/aliases
"#,
        servers = servers
            .iter()
            .map(|(a, c)| format!("{a} (pid {})", c.id()))
            .collect::<Vec<_>>()
            .join(", "),
        main_alias = main.0,
        main_pid = main.1.id(),
        backup_alias = backup.0,
    );
    match hagate::server::run(config, None)? {}
}
