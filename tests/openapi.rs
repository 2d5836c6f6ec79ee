//! The admin API against its OpenAPI document (`docs/admin-openapi.yaml`): schemathesis
//! fuzzes a live gateway from the document, and checks that no input gets a 5xx and that
//! every answer matches its schema (status, content type, headers, body).
//!
//! Two runs, each on a fresh gateway: the read-only operations, and the two that change
//! state (`PUT /v1/aliases`, heartbeats). Mixed in one run, a fuzzed table or heartbeat
//! can leave no live instance, and a placement is then rightly answered 503.

mod common;

use std::process::Command;

use common::*;

const TOKEN: &str = "s3cret";
const WRITES: [&str; 2] = ["PUT /v1/aliases", "POST /v1/membership/heartbeat"];

/// The schemathesis command: on PATH, else in Python's scripts directory (pip's target).
fn schemathesis() -> Command {
    let on_path = Command::new("schemathesis")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if on_path {
        return Command::new("schemathesis");
    }
    let scripts = Command::new("python3")
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_path('scripts'))",
        ])
        .output()
        .expect("python3 (scripts/setup.sh installs schemathesis with it)");
    let path =
        std::path::Path::new(String::from_utf8_lossy(&scripts.stdout).trim()).join("schemathesis");
    assert!(
        path.exists(),
        "schemathesis is missing: scripts/setup.sh installs it (pip install schemathesis)"
    );
    Command::new(path)
}

async fn gateway(ups: &[Upstream; 2]) -> Gateway {
    Gateway::start_full(
        &format!(
            "{FAST_HEALTH}[membership]\nenabled = true\ntoken = \"{TOKEN}\"\n\n{}",
            instances(&[("cs_1", &ups[0]), ("cs_2", &ups[1])])
        ),
        "",
        &format!("token = \"{TOKEN}\""),
        None,
    )
    .await
}

/// Runs schemathesis on `gw`'s admin API, selecting operations with `select`.
async fn fuzz(gw: &Gateway, select: &[&str]) {
    let mut cmd = schemathesis();
    cmd.arg("run")
        .arg(repo_path("docs/admin-openapi.yaml"))
        .arg("--url")
        .arg(format!("http://{}", gw.admin))
        .args(["-H", &format!("Authorization: Bearer {TOKEN}")])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,\
             response_headers_conformance,response_schema_conformance",
        ])
        .args([
            "--max-examples",
            "50",
            "--seed",
            "1",
            "--request-timeout",
            "30",
        ])
        .args(select)
        .env("NO_COLOR", "1");
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "schemathesis failed:\n{text}");
    assert!(text.contains("generated"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_read_operations_match_the_document_and_never_answer_5xx() {
    let ups = [Upstream::start("A"), Upstream::start("B")];
    let gw = gateway(&ups).await;
    gw.wait_metric("hagate_instance_up", &[("alias", "cs_2")], 1.0)
        .await;
    let mut select = Vec::new();
    for name in WRITES {
        select.extend(["--exclude-name", name]);
    }
    fuzz(&gw, &select).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_write_operations_match_the_document_and_never_answer_5xx() {
    let ups = [Upstream::start("A"), Upstream::start("B")];
    let gw = gateway(&ups).await;
    let mut select = Vec::new();
    for name in WRITES {
        select.extend(["--include-name", name]);
    }
    fuzz(&gw, &select).await;
}
