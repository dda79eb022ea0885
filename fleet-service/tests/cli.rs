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

/// `config/fleet-service.service` is a unit systemd takes without a warning, and its command
/// line, run with the unit's environment, starts the platform, which then stops cleanly (exit
/// 0) on the SIGTERM systemd sends, within the unit's stop timeout.
#[test]
fn the_systemd_unit_runs_the_platform() {
    let unit = include_str!("../../config/fleet-service.service");
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart");
    let mut words = exec.split_whitespace();
    assert_eq!(words.next(), Some("/usr/local/bin/fleet-service"));
    let args: Vec<&str> = words.collect();
    let bin = env!("CARGO_BIN_EXE_fleet-service");
    let dir = tempfile::tempdir().unwrap();

    match Command::new("systemd-analyze").arg("--version").output() {
        Ok(_) => {
            // The unit as installed, with the binary at its installed path replaced by the
            // one just built.
            let path = dir.path().join("fleet-service.service");
            std::fs::write(&path, unit.replace("/usr/local/bin/fleet-service", bin)).unwrap();
            let out = Command::new("systemd-analyze")
                .arg("verify")
                .arg(&path)
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success() && stderr.trim().is_empty(),
                "systemd-analyze verify: {stderr}"
            );
        }
        Err(e) => eprintln!("systemd-analyze not run ({e}); the unit's command still is"),
    }

    let stop_timeout: u64 = unit
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .expect("TimeoutStopSec")
        .parse()
        .unwrap();
    let mut cmd = Command::new(bin);
    cmd.args(&args)
        .env_remove("FLEET_ADMIN_TOKEN")
        .env_remove("FLEET_CONFIG")
        .env_remove("FLEET_DATABASE_URL");
    for line in unit.lines() {
        if let Some((k, v)) = line
            .strip_prefix("Environment=")
            .and_then(|kv| kv.split_once('='))
        {
            cmd.env(k, v);
        }
    }
    // Here the state directory is a temporary one, and the listeners take free ports.
    let data = dir.path().join("state");
    cmd.env("FLEET_DATA_DIR", &data)
        .env("FLEET_MQTTS_LISTEN", "127.0.0.1:0")
        .env("FLEET_SERVICE_LISTEN", "127.0.0.1:0")
        .env("FLEET_HTTP_LISTEN", "127.0.0.1:0")
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = cmd.spawn().expect("start fleet-service");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let running = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_default();
    assert!(
        running.starts_with("fleet-service is running"),
        "no banner: {running:?}"
    );
    assert!(data.join("admin-token").exists());
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + Duration::from_secs(stop_timeout);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("still running {stop_timeout} s after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit after SIGTERM: {status}");
}
