//! The `hagate` command line: `check` on every shipped config and on the Linkis guide's, `haid encode|decode`,
//! `plugin test`, and `agent`'s argument checks.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::{repo_path, BIN};
use serde_json::Value;

fn check(path: &std::path::Path) -> std::process::Output {
    Command::new(BIN)
        .arg("check")
        .arg("--config")
        .arg(path)
        .output()
        .unwrap()
}

#[test]
fn every_shipped_config_passes_check() {
    let mut checked = 0;
    for entry in std::fs::read_dir(repo_path("config")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let out = check(&path);
        assert!(
            out.status.success(),
            "{}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        // one summary line: instances, plugins, store, membership, listeners
        let summary = String::from_utf8_lossy(&out.stdout);
        assert!(
            summary.contains(": ok (")
                && summary.contains(" store")
                && summary.contains("membership o")
                && summary.contains("proxy on ")
                && summary.contains("admin on "),
            "{summary}"
        );
        if path.ends_with("etcd.toml") {
            assert!(summary.contains("etcd store at http://"), "{summary}");
        }
        checked += 1;
    }
    assert!(checked >= 3, "only {checked} configs found");
}

#[test]
fn the_linkis_guide_config_is_valid() {
    let guide = std::fs::read_to_string(repo_path("docs/linkis.md")).unwrap();
    let (_, rest) = guide
        .split_once("## A complete config")
        .expect("docs/linkis.md has a complete config");
    let toml = rest
        .split("```toml\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("a toml block after the heading");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("linkis.toml");
    std::fs::write(&path, toml).unwrap();
    let out = check(&path);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(
        summary.contains("2 instances") && summary.contains("etcd store at http://10.0.0.21:2379"),
        "{summary}"
    );
}

#[test]
fn check_names_the_bad_field_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    for (text, field) in [
        (
            "[instances.cs_1]\naddress = \"10.0.0:80\"\n",
            "instances.cs_1.address: invalid socket address \"10.0.0:80\"",
        ),
        (
            "[health.active]\nfall = 0\n[instances.cs_1]\naddress = \"127.0.0.1:1\"\n",
            "health.active.fall",
        ),
        (
            "[routing]\nhaid_path = [\"/\"]\n[instances.cs_1]\naddress = \"127.0.0.1:1\"\n",
            "unknown field `haid_path`",
        ),
        (
            "[store]\nkind = \"etcd\"\nendpoints = [\"http://127.0.0.1:2379\"]\n\
             [membership]\nenabled = true\ntoken = \"t\"\ninterval = \"200ms\"\ntimeout = \"700ms\"\n",
            "membership.timeout: 700ms cannot be an etcd lease TTL",
        ),
        // the gaps an attacker and a new user found: each refused, with its field
        (
            "[instances.cs_1]\naddress = \"127.0.0.1:0\"\n",
            "instances.cs_1.address: 127.0.0.1:0: port 0",
        ),
        (
            "[instances.cs_1]\naddress = \"no-such-host.invalid:80\"\n",
            "instances.cs_1.address: cannot resolve the host name of \"no-such-host.invalid:80\"",
        ),
        (
            "[upstream]\ndns_refresh = \"1ms\"\n[instances.cs_1]\naddress = \"127.0.0.1:1\"\n",
            "upstream.dns_refresh",
        ),
        (
            "[instances.cs_1]\naddress = \"0.0.0.0:80\"\n",
            "instances.cs_1.address: 0.0.0.0:80: an unspecified address",
        ),
        (
            "[instances.cs_1]\naddress = \"224.0.0.1:80\"\n",
            "instances.cs_1.address: 224.0.0.1:80: a multicast address",
        ),
        (
            "[server]\nlisten = \"127.0.0.1:9090\"\n[instances.cs_1]\naddress = \"127.0.0.1:1\"\n",
            "admin.listen: 127.0.0.1:9090 overlaps server.listen",
        ),
        (
            "[server]\nthreads = 100000\n[instances.cs_1]\naddress = \"127.0.0.1:1\"\n",
            "server.threads: must be between 1 and 256",
        ),
        (
            "[routing]\nretry_after = \"1000000000y\"\n[instances.cs_1]\naddress = \"127.0.0.1:1\"\n",
            "routing.retry_after:",
        ),
        (
            "[server]\ngrace_period = \"100y\"\n[instances.cs_1]\naddress = \"127.0.0.1:1\"\n",
            "server.grace_period:",
        ),
        (
            "[health.active]\ninterval = \"1s\"\ntimeout = \"5s\"\n[instances.cs_1]\naddress = \"127.0.0.1:1\"\n",
            "health.active.timeout: must not be longer than health.active.interval",
        ),
        (
            "[routing]\nretry_after = \"2500ms\"\n[instances.cs_1]\naddress = \"127.0.0.1:1\"\n",
            "routing.retry_after: must be whole seconds",
        ),
        (
            "[instances.\"cs\u{200B}1\"]\naddress = \"127.0.0.1:1\"\n",
            "an invisible character",
        ),
        (
            "[admin]\nlisten = \"0.0.0.0:9090\"\n[instances.cs_1]\naddress = \"127.0.0.1:1\"\n",
            "admin.token: required when admin.listen (0.0.0.0:9090) is not a loopback address",
        ),
    ] {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, text).unwrap();
        let out = check(&path);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(stderr.contains(field), "expected {field:?} in {stderr}");
    }
    let out = Command::new(BIN)
        .args(["check", "--config", "/nonexistent/hagate.toml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/hagate.toml"));
}

#[test]
fn haid_encode_and_decode() {
    let out = Command::new(BIN)
        .args([
            "haid", "encode", "--main", "cs_1_dev", "--backup", "cs_2_dev", "--id", "1024",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "8-8--cs_1_devcs_2_dev1024"
    );

    let out = Command::new(BIN)
        .args([
            "haid", "encode", "--main", "a", "--backup", "b", "--id", "x1",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not numeric"));

    let out = Command::new(BIN)
        .args(["haid", "decode", "8-8--cs_1_devcs_2_dev1024"])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"valid": true, "main": "cs_1_dev", "backup": "cs_2_dev", "id": "1024"})
    );
    let out = Command::new(BIN)
        .args(["haid", "decode", "nope"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[test]
fn haid_decode_stdin_agrees_with_every_conformance_vector() {
    let vectors =
        std::fs::read_to_string(repo_path("tests/data/linkis-haid-vectors.jsonl")).unwrap();
    let parsed: Vec<Value> = vectors
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // A value holding a line break cannot go one per line.
    let usable: Vec<&Value> = parsed
        .iter()
        .filter(|v| !v["haid"].as_str().unwrap().contains(['\n', '\r']))
        .collect();
    let input: String = usable
        .iter()
        .map(|v| format!("{}\n", v["haid"].as_str().unwrap()))
        .collect();
    let mut child = Command::new(BIN)
        .args(["haid", "decode", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()).unwrap());
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert!(out.status.success());
    let answers: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(answers.len(), usable.len());
    for (v, a) in usable.iter().zip(&answers) {
        assert_eq!(a["valid"], v["valid"], "{v}");
        if v["valid"] == true {
            assert_eq!(
                (&a["main"], &a["backup"], &a["id"]),
                (&v["main"], &v["backup"], &v["id"])
            );
        } else {
            assert!(a["error"].as_str().is_some_and(|e| !e.is_empty()));
        }
    }
}

#[test]
fn plugin_test_runs_a_real_plugin_offline() {
    let wasm = common::plugin_wasm("lowest_load");
    let dir = tempfile::tempdir().unwrap();
    let cands = dir.path().join("candidates.json");
    std::fs::write(
        &cands,
        r#"[{"alias": "cs_1", "inflight": 3, "labels": {"zone": "a"}},
            {"alias": "cs_2", "inflight": 1, "labels": {"zone": "a"}},
            {"alias": "cs_3", "inflight": 2, "labels": {"zone": "b"}},
            {"alias": "cs_4", "live": false}]"#,
    )
    .unwrap();
    // This checks the plugin's choice, not its speed. With the default 5 ms (wall-clock
    // epoch) deadline, the first call of a debug build's wasmtime failed twice in suite
    // runs with both cores busy: exit 1, stderr empty, which is how a plugin error (such
    // as a timeout) ends `plugin test`. Deadlines are tested in tests/plugins.rs.
    let run = |extra: &[&str]| {
        Command::new(BIN)
            .args(["plugin", "test", "--deadline", "10s"])
            .arg(&wasm)
            .arg("--candidates")
            .arg(&cands)
            .args(extra)
            .output()
            .unwrap()
    };
    let out = run(&[]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (v["main"].as_str(), v["backup"].as_str()),
        (Some("cs_2"), Some("cs_3"))
    );
    // the version of the world the host found the component to implement
    assert_eq!(v["wit"], "0.2.0");
    let out = run(&["--exclude", "cs_2"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (v["main"].as_str(), v["backup"].as_str()),
        (Some("cs_3"), Some("cs_1"))
    );
    // a bad plugin config is refused by the plugin itself
    let bad = dir.path().join("config.json");
    std::fs::write(&bad, r#"{"metric": "vibes"}"#).unwrap();
    let out = run(&["--config", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("vibes"));
}

#[test]
fn agent_refuses_t_not_above_2i_and_bad_addresses() {
    let agent = |extra: &[&str]| {
        let out = Command::new(BIN)
            .args([
                "agent",
                "--alias",
                "cs_1",
                "--token",
                "t",
                "--health-url",
                "http://127.0.0.1:1/health",
            ])
            .args(extra)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let err = agent(&["--address", "127.0.0.1:1", "-I", "1s", "-T", "2s"]);
    assert!(
        err.contains("-I/-T") && err.contains("more than twice"),
        "{err}"
    );
    let err = agent(&["--address", "localhost", "-I", "1s", "-T", "3s"]);
    assert!(err.contains("--address"), "{err}");
}
