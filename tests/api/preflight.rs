//! `hongbao preflight` (issue 16) against a real server: ready when the node is as planned,
//! not ready (exit 1, the item named) when one thing is not.

use super::{spawn_app_with, ADMIN, GATEWAY, ISSUER, SECRET};
use std::process::Command;

fn preflight(config: &std::path::Path) -> (i32, serde_json::Value) {
    let output = Command::new(env!("CARGO_BIN_EXE_hongbao"))
        .args(["preflight", "--json", "--config"])
        .arg(config)
        .env("HONGBAO_ADMIN_KEY", ADMIN)
        .env("HONGBAO_ISSUER_KEY", ISSUER)
        .env("HONGBAO_GATEWAY_KEY", GATEWAY)
        .env("HONGBAO_TOKEN_SECRET", SECRET)
        .output()
        .unwrap();
    let report = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {} {}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    });
    (output.status.code().unwrap_or(-1), report)
}

fn failed(report: &serde_json::Value) -> Vec<String> {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["ok"] == false)
        .map(|c| format!("{}: {}", c["name"], c["detail"]))
        .collect()
}

#[tokio::test]
async fn preflight_passes_a_node_as_planned_and_names_what_is_not() {
    // Goal: the checklist reads the real node: exit 0 when budgets, channels, policy,
    // switches, disk and clock are as planned; exit 1 naming the item when a switch is not.
    let app = spawn_app_with(|c| {
        c.withdrawals.bank_per_s = 400;
        c.withdrawals.alipay_per_s = 600;
    });
    assert_eq!(app.set_budget("cny", 1_000_000, 50_000).await.0, 200);
    let policy = r#"{"min_amount":100,"closed_windows":[{"from":"2027-02-16T19:00:00+08:00","to":"2027-02-17T01:00:00+08:00"}]}"#;
    let (status, body) = app
        .put("/v1/admin/withdrawal-policy", Some(ADMIN), policy)
        .await;
    assert_eq!(status, 200, "{body}");
    for (channel, rate) in [("bank", 400), ("alipay", 600)] {
        let settings =
            format!(r#"{{"rate_per_s":{rate},"latency_ms":5,"fail_rate":0,"timeout_rate":0}}"#);
        let (status, body) = app
            .put(
                &format!("/v1/admin/channels/{channel}"),
                Some(ADMIN),
                &settings,
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }
    let (_, switches) = app.get("/v1/admin/switches", Some(ADMIN)).await;
    let planned: Vec<String> = switches
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, on)| on.is_boolean())
        .map(|(name, on)| format!("{name} = {on}"))
        .collect();
    assert!(!planned.is_empty(), "{switches}");
    let first_switch = planned[0].split(' ').next().unwrap().to_owned();

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("night.toml");
    std::fs::write(
        &config,
        format!(
            r#"data_dir = "{data}"
[withdrawals]
bank_per_s = 400
alipay_per_s = 600
[preflight]
url = "{url}"
activities = ["cny"]
expected_requests = 1000
[preflight.switches]
{switches}
[preflight.channel_limits]
bank = 500
alipay = 800
[preflight.withdrawal_policy]
min_amount = 100
closed_windows = [{{ from = "2027-02-16T11:00:00Z", to = "2027-02-16T17:00:00Z" }}]
"#,
            data = app._dir.path().display(),
            url = app.base,
            switches = planned.join("\n"),
        ),
    )
    .unwrap();
    let (code, report) = preflight(&config);
    assert_eq!(failed(&report), Vec::<String>::new(), "{report}");
    assert_eq!((code, &report["ready"]), (0, &serde_json::json!(true)));

    // One switch out of its planned state: not ready, that item named.
    let (status, _) = app
        .put(
            &format!("/v1/admin/switches/{first_switch}"),
            Some(ADMIN),
            &format!(r#"{{"on":{}}}"#, switches[first_switch.as_str()] == false),
        )
        .await;
    assert_eq!(status, 200);
    let (code, report) = preflight(&config);
    assert_eq!(code, 1, "{report}");
    let failed = failed(&report);
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert!(
        failed[0].contains("switches as planned") && failed[0].contains(&first_switch),
        "{failed:?}"
    );

    // A key the node accepts sits in the data directory's generated keys.toml: the node runs
    // on a generated key (tried against it), not ready.
    let keys_file = app._dir.path().join("keys.toml");
    std::fs::write(&keys_file, format!("gateway_key = \"{GATEWAY}\"\n")).unwrap();
    let (code, report) = preflight(&config);
    assert_eq!(code, 1, "{report}");
    let failed = failed_names(&report);
    assert!(failed.contains(&"keys provisioned".to_owned()), "{report}");
    // One the node does not know (a stale file) is no finding.
    std::fs::write(&keys_file, "gateway_key = \"stale-gateway-key-000001\"\n").unwrap();
    let (_, report) = preflight(&config);
    assert!(
        !failed_names(&report).contains(&"keys provisioned".to_owned()),
        "{report}"
    );

    // The server gone: not ready, the server named.
    app.server.stop().unwrap();
    let (code, report) = preflight(&config);
    assert_eq!(code, 1);
    assert!(
        failed_names(&report).contains(&"server ready".to_owned()),
        "{report}"
    );
}

fn failed_names(report: &serde_json::Value) -> Vec<String> {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["ok"] == false)
        .map(|c| c["name"].as_str().unwrap().to_owned())
        .collect()
}
