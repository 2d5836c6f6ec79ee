//! The deploy kit (`deploy/`): the alert rules pass `promtool check rules`, a live gateway's
//! `/metrics` passes `promtool check metrics`, and every metric that the rules and the
//! Grafana dashboard name exists in a live gateway's `/metrics`. The systemd units pass
//! `systemd-analyze verify` without a warning, and the agent's unit passes only flags that
//! `hagate agent` takes.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::*;

const RULES: &str = "deploy/prometheus/hagate-alerts.yml";
const RULE_TESTS: &str = "deploy/prometheus/hagate-alerts.test.yml";
const DASHBOARD: &str = "deploy/grafana/hagate-dashboard.json";

/// `promtool`, which `scripts/setup.sh` installs (Debian's prometheus package).
fn promtool() -> Command {
    let found = Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "promtool is missing: scripts/setup.sh installs it (apt-get install prometheus)"
    );
    Command::new("promtool")
}

/// Every metric name (hagate_* and process_*) in `text`.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    for prefix in ["hagate_", "process_"] {
        for (i, _) in text.match_indices(prefix) {
            let before = text[..i].chars().next_back();
            if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
                continue;
            }
            let name: String = text[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            names.insert(name);
        }
    }
    names
}

/// A gateway that has served a HAID request and a placement by a plugin, so that the
/// per-instance and plugin series exist; and its `/metrics` text.
async fn busy_gateway() -> (Gateway, String, [Upstream; 2]) {
    let ups = [Upstream::start("A"), Upstream::start("B")];
    let plugin = plugin_entry("policy", &plugin_wasm("lowest_load"), "");
    let gw = Gateway::start(&format!(
        "{FAST_HEALTH}{}{plugin}",
        instances(&[("cs_1", &ups[0]), ("cs_2", &ups[1])])
    ))
    .await;
    let c = client();
    let haid = hagate::haid::encode("cs_1", &["cs_2"], "5").unwrap();
    assert_eq!(get_haid(&c, &gw, &haid).await.0, 200);
    let r = c.post(gw.url("/createContextID")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    gw.wait_metric(
        "hagate_plugin_calls_total",
        &[("plugin", "policy"), ("outcome", "ok")],
        1.0,
    )
    .await;
    let text = gw.metrics_text().await;
    (gw, text, ups)
}

/// Runs `promtool ARGS FILE` on a file of the repository; it must succeed.
fn promtool_passes(args: &[&str], file: &str) {
    let out = promtool().args(args).arg(repo_path(file)).output().unwrap();
    assert!(
        out.status.success(),
        "promtool {args:?} {file}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_alert_rules_pass_promtool() {
    promtool_passes(&["check", "rules"], RULES);
}

#[test]
fn the_alert_rules_pass_their_promtool_unit_tests() {
    promtool_passes(&["test", "rules"], RULE_TESTS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_metrics_pass_promtool_and_name_everything_the_rules_and_dashboard_use() {
    let (_gw, text, _ups) = busy_gateway().await;
    let mut child = promtool()
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let exposed: std::collections::BTreeSet<String> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect();
    for file in [RULES, DASHBOARD] {
        let named = metric_names(&std::fs::read_to_string(repo_path(file)).unwrap());
        assert!(named.len() >= 8, "{file} names only {named:?}");
        let missing: Vec<&String> = named.difference(&exposed).collect();
        assert!(
            missing.is_empty(),
            "{file} names metrics that /metrics lacks: {missing:?}"
        );
    }
    // the dashboard is valid JSON with panels
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo_path(DASHBOARD)).unwrap()).unwrap();
    assert!(dash["panels"].as_array().is_some_and(|p| p.len() >= 8));
}

/// The systemd units, with the binary path pointed at the one under test (systemd checks
/// that it exists), in a temporary directory.
fn units_for_test() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for unit in ["hagate.service", "hagate-agent@.service"] {
        let text = std::fs::read_to_string(repo_path(&format!("deploy/systemd/{unit}"))).unwrap();
        std::fs::write(
            dir.path().join(unit),
            text.replace("/usr/local/bin/hagate", BIN),
        )
        .unwrap();
    }
    dir
}

#[test]
fn the_systemd_units_pass_systemd_analyze_verify_without_a_warning() {
    let dir = units_for_test();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(dir.path().join("hagate.service"))
        // a template is verified through an instance of it
        .arg(dir.path().join("hagate-agent@cs_1_dev.service"))
        .current_dir(dir.path())
        .output()
        .expect("systemd-analyze: scripts/setup.sh installs it (apt-get install systemd)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.trim().is_empty(), "{stderr}");
}

#[test]
fn the_agent_unit_passes_only_flags_that_hagate_agent_takes() {
    let unit = std::fs::read_to_string(repo_path("deploy/systemd/hagate-agent@.service")).unwrap();
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("an ExecStart line");
    let help = Command::new(BIN)
        .args(["agent", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    let flags: Vec<&str> = exec
        .split_whitespace()
        .filter(|w| w.starts_with('-'))
        .collect();
    assert!(flags.len() >= 6, "{exec}");
    for flag in flags {
        assert!(
            help.split([' ', ',', '\n']).any(|w| w == flag),
            "{flag} is not a flag of hagate agent:\n{help}"
        );
    }
}
