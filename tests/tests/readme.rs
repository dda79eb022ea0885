//! The README's walk-through, run as a newcomer runs it: its `sh` blocks in order, as written,
//! from an empty directory, with `fleet-service` and `device-client` on the PATH (the debug
//! binaries cargo built for the tests; the README builds them in release). Afterwards it checks
//! what the README says the reader sees: the devices provisioned with their tags, telemetry
//! stored and watched live, the command the agent received, and the update installed on the
//! device it names. If the README changes, this test follows it (see `e2e::walkthrough` for
//! the directives that mark blocks which run until stopped).
//!
//! It takes the README's fixed ports (8080, 8883, 8884, 8090), so it runs once, on SQLite, the
//! embedded default; it needs bash, curl, jq, python3 and mosquitto_pub/sub.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use e2e::walkthrough::{blocks, Mode, Walkthrough};
use serde_json::Value;

const SECTIONS: &[&str] = &["Five-minute walk-through", "Updating a cohort"];

fn readme() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    std::fs::read_to_string(path).expect("README.md")
}

/// target/debug (next to target/debug/deps/<this test>): where cargo put the binaries.
fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap().to_path_buf();
    for bin in ["fleet-service", "device-client"] {
        assert!(
            dir.join(bin).exists(),
            "{} is missing: `cargo build -p fleet-service -p device-client` first \
             (`cargo test --workspace` builds it)",
            dir.join(bin).display()
        );
    }
    dir
}

fn free(port: u16) -> bool {
    std::net::TcpListener::bind(("0.0.0.0", port)).is_ok()
}

/// GET on the walk-through's REST bridge.
fn get(token: &str, path: &str) -> Value {
    let out = std::process::Command::new("curl")
        .args(["-s", "-H"])
        .arg(format!("Authorization: Bearer {token}"))
        .arg(format!("http://127.0.0.1:8080/api/v1{path}"))
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

/// Waits up to `secs` for `ok`, returning the last value seen.
fn eventually(secs: u64, mut probe: impl FnMut() -> Value, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let v = probe();
        if ok(&v) || Instant::now() > deadline {
            return v;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn the_readme_walkthrough_does_what_it_says() {
    let text = readme();
    let steps = blocks(&text, SECTIONS);
    assert!(steps.len() >= 10, "the walk-through's blocks: {steps:#?}");
    for port in [8080, 8883, 8884, 8090] {
        assert!(
            free(port),
            "port {port} is taken: the README's walk-through uses it"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let mut w = Walkthrough::start(dir.path(), &bin_dir());
    let mut outputs = Vec::new();
    for step in &steps {
        outputs.push(w.run(step, Duration::from_secs(120)));
    }
    let transcript = w.transcript.clone();
    let token = std::fs::read_to_string(dir.path().join("data/admin-token"))
        .unwrap()
        .trim()
        .to_string();
    let say = |what: &str, v: &Value| format!("{what}: {v:#}\n=== transcript ===\n{transcript}");

    // Devices provisioned by their first connection, in the cohort and with the tag the CA's
    // JITP settings name, listed by the tag query.
    let listed: String = steps
        .iter()
        .zip(&outputs)
        .filter(|(s, _)| s.code.contains("devices?tag=site:berlin"))
        .map(|(_, o)| o.clone())
        .collect();
    for id in ["thermo-0001", "thermo-0002"] {
        assert!(
            listed.contains(id),
            "{id} not in the tag listing:\n{transcript}"
        );
    }
    // The batch registration: two devices created.
    let imported: String = steps
        .iter()
        .zip(&outputs)
        .filter(|(s, _)| s.code.contains("devices/import"))
        .map(|(_, o)| o.clone())
        .collect();
    // The block's first JSON document is the import's answer (the summary and audit follow).
    let imported: Value = serde_json::Deserializer::from_str(&imported)
        .into_iter::<Value>()
        .next()
        .and_then(Result::ok)
        .unwrap_or(Value::Null);
    assert_eq!(imported["created"], 2, "{}", say("import", &imported));

    // Telemetry stored, from the agent and from mosquitto_pub.
    for id in ["thermo-0001", "thermo-0002"] {
        let d = eventually(
            20,
            || get(&token, &format!("/devices/{id}")),
            |d| d["last_telemetry"].is_object(),
        );
        assert!(d["last_telemetry"].is_object(), "{}", say(id, &d));
    }
    // The backend service watched it live, presence included.
    let watched = w.background_log("mosquitto_sub");
    assert!(
        watched.contains("devices/thermo-0001/telemetry")
            && watched.contains("devices/thermo-0001/presence"),
        "mosquitto_sub saw:\n{watched}\n=== transcript ===\n{transcript}"
    );

    // The update reached the device the README names: it runs 2.0.0, installed from the
    // artifact, and the deployment finished.
    let device = get(&token, "/devices/thermo-0001");
    assert_eq!(
        device["firmware_version"],
        "2.0.0",
        "{}",
        say("thermo-0001", &device)
    );
    let dep_id = std::fs::read_to_string(dir.path().join("deployment.json"))
        .ok()
        .and_then(|s| serde_json::from_str::<Value>(&s).ok())
        .and_then(|d| d["id"].as_str().map(str::to_string))
        .expect("deployment.json holds the deployment");
    let dep = eventually(
        30,
        || get(&token, &format!("/deployments/{dep_id}")),
        |d| d["state"] == "completed",
    );
    assert_eq!(dep["state"], "completed", "{}", say("deployment", &dep));
    let agent = w.background_log("--update-key");
    assert!(
        agent.contains("installed") || agent.contains("2.0.0"),
        "the agent's log says nothing of the update:\n{agent}"
    );

    // The first agent received the command sent with mosquitto_pub (its log was kept).
    let first_agent = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("background-"))
        })
        .map(|p| std::fs::read_to_string(p).unwrap_or_default())
        .find(|log| log.contains("command received"));
    let first_agent = first_agent.unwrap_or_else(|| {
        panic!("no agent log shows the command received\n=== transcript ===\n{transcript}")
    });
    assert!(first_agent.contains("reboot"), "{first_agent}");
    assert!(
        steps
            .iter()
            .any(|s| matches!(s.mode, Mode::Background { .. })),
        "no background block"
    );
}
