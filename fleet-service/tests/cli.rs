//! The `fleet-service` binary as an operator runs it.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `serve` on port 0 with its output piped (as under systemd or into a file): it starts,
/// prints where it listens, and its log lines carry no terminal colour codes.
#[test]
fn serve_logs_plain_text_when_not_on_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_fleet-service"))
        .args(["serve", "--data-dir"])
        .arg(dir.path())
        .args([
            "--mqtts-listen",
            "127.0.0.1:0",
            "--service-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .env_remove("FLEET_ADMIN_TOKEN")
        .env_remove("FLEET_CONFIG")
        .env_remove("FLEET_DATABASE_URL")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start fleet-service");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    let started = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                let done = line.contains("fleet platform started");
                seen.push(line);
                if done {
                    break true;
                }
            }
            Err(_) => break false,
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(started, "no start line in:\n{}", seen.join("\n"));
    assert!(
        seen.iter().all(|l| !l.contains('\u{1b}')),
        "colour codes in piped logs:\n{}",
        seen.join("\n")
    );
}
