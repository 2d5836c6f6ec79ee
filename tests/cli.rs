//! The `hagate` command line: `check` on every shipped config, `haid encode|decode`.

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
        checked += 1;
    }
    assert!(checked >= 3, "only {checked} configs found");
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
