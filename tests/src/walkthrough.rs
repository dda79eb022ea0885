//! Runs the README's shell blocks as a reader would: in order, in one shell (so the variables
//! one block sets serve the next), from an empty directory, with the binaries cargo built on
//! the `PATH`.
//!
//! An HTML comment right before a block (invisible on the rendered page) says how a reader
//! runs it when it is not a command that finishes:
//! - `<!-- walkthrough: background "TEXT" -->`: it runs until stopped, in a shell of its own;
//!   the next block waits until its output shows TEXT.
//! - `<!-- walkthrough: background "TEXT" stops "CMD" -->`: the same, after stopping (Ctrl-C)
//!   the background block whose text contains CMD.
//! - `<!-- walkthrough: skip -->`: not run by the test (said why next to it).
//!
//! Every other `sh` block must finish with status 0.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

/// How a block is run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    Run,
    Skip,
    Background {
        ready: String,
        stops: Option<String>,
    },
}

/// One fenced `sh` block of the README.
#[derive(Debug, Clone)]
pub struct Block {
    /// The `##` heading it is under.
    pub section: String,
    /// Its first line in the README (1-based).
    pub line: usize,
    pub code: String,
    pub mode: Mode,
}

/// The `sh` blocks of `markdown` under the `##` headings named in `sections`, in order.
pub fn blocks(markdown: &str, sections: &[&str]) -> Vec<Block> {
    let mut out = Vec::new();
    let mut section = String::new();
    let mut mode = Mode::Run;
    let mut lines = markdown.lines().enumerate();
    while let Some((i, line)) = lines.next() {
        if let Some(h) = line.strip_prefix("## ") {
            section = h.trim().to_string();
            continue;
        }
        if let Some(d) = line
            .trim()
            .strip_prefix("<!-- walkthrough:")
            .and_then(|d| d.strip_suffix("-->"))
        {
            mode = parse_directive(d.trim())
                .unwrap_or_else(|| panic!("README line {}: bad directive {line:?}", i + 1));
            continue;
        }
        let fence = line.trim_start();
        if fence.starts_with("```") {
            let lang = fence.trim_start_matches('`').trim();
            let mut code = String::new();
            for (_, l) in lines.by_ref() {
                if l.trim_start().starts_with("```") {
                    break;
                }
                code.push_str(l);
                code.push('\n');
            }
            if lang == "sh" && sections.contains(&section.as_str()) {
                out.push(Block {
                    section: section.clone(),
                    line: i + 2,
                    code,
                    mode: std::mem::replace(&mut mode, Mode::Run),
                });
            } else {
                mode = Mode::Run;
            }
        }
    }
    out
}

fn parse_directive(d: &str) -> Option<Mode> {
    if d == "skip" || d.starts_with("skip ") {
        return Some(Mode::Skip);
    }
    let rest = d.strip_prefix("background")?.trim();
    let (ready, rest) = quoted(rest)?;
    let rest = rest.trim();
    let stops = match rest.strip_prefix("stops") {
        Some(r) => Some(quoted(r.trim())?.0),
        None if rest.is_empty() => None,
        None => return None,
    };
    Some(Mode::Background { ready, stops })
}

fn quoted(s: &str) -> Option<(String, &str)> {
    let s = s.strip_prefix('"')?;
    let end = s.find('"')?;
    Some((s[..end].to_string(), &s[end + 1..]))
}

/// A background block while it runs.
struct Job {
    code: String,
    pid: u32,
    log: PathBuf,
}

/// One shell running the blocks in a directory of its own.
pub struct Walkthrough {
    dir: PathBuf,
    shell: Child,
    stdin: ChildStdin,
    out: Receiver<String>,
    jobs: Vec<Job>,
    /// Every block's output so far, with a header per block.
    pub transcript: String,
}

const DONE: &str = "__walkthrough_block_done__";

impl Walkthrough {
    /// A shell in `dir` whose `PATH` starts with `bin_dir`. `cargo` is a function that says
    /// what it would build: the test runs the binaries cargo built for it.
    pub fn start(dir: &Path, bin_dir: &Path) -> Walkthrough {
        let path = format!(
            "{}:{}",
            bin_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut shell = Command::new("bash")
            .arg("--noprofile")
            .arg("--norc")
            .current_dir(dir)
            .env("PATH", path)
            .env("RUST_LOG", "info")
            .env_remove("FLEET_DATABASE_URL")
            .env_remove("FLEET_CONFIG")
            .env_remove("FLEET_ADMIN_TOKEN")
            .env_remove("FLEET_DATA_DIR")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("bash");
        let mut stdin = shell.stdin.take().unwrap();
        let stdout = shell.stdout.take().unwrap();
        let (tx, out) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        // Job control: each background block is a process group of its own, stopped as a
        // whole like Ctrl-C stops a shell's foreground job.
        writeln!(
            stdin,
            "set -m; cargo() {{ echo \"(built by the test: cargo $*)\"; }}"
        )
        .unwrap();
        Walkthrough {
            dir: dir.to_path_buf(),
            shell,
            stdin,
            out,
            jobs: Vec::new(),
            transcript: String::new(),
        }
    }

    /// Runs `block` as its mode says; panics (with the transcript) when a block fails.
    pub fn run(&mut self, block: &Block, timeout: Duration) -> String {
        self.transcript.push_str(&format!(
            "\n--- README line {} ({}) {:?}\n{}",
            block.line, block.section, block.mode, block.code
        ));
        match &block.mode {
            Mode::Skip => String::new(),
            Mode::Run => {
                let out = self.foreground(&block.code, timeout);
                self.transcript.push_str(&out);
                out
            }
            Mode::Background { ready, stops } => {
                if let Some(stops) = stops {
                    self.stop(stops);
                }
                self.background(block, ready, timeout);
                String::new()
            }
        }
    }

    fn foreground(&mut self, code: &str, timeout: Duration) -> String {
        writeln!(self.stdin, "{{\n{code}\n}} 2>&1; echo \"{DONE} $?\"").unwrap();
        let deadline = Instant::now() + timeout;
        let mut out = String::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.out.recv_timeout(left) {
                Ok(line) => {
                    if let Some(status) = line.strip_prefix(DONE) {
                        let status = status.trim();
                        if status != "0" {
                            self.fail(&format!("the block exited with {status}:\n{out}"));
                        }
                        return out;
                    }
                    out.push_str(&line);
                    out.push('\n');
                }
                Err(_) => self.fail(&format!("the block ran past {timeout:?}:\n{out}")),
            }
        }
    }

    fn background(&mut self, block: &Block, ready: &str, timeout: Duration) {
        let log = self.dir.join(format!("background-{}.log", block.line));
        let script = format!(
            "{{\n{}\n}} > {} 2>&1 &\necho $!",
            block.code.trim_end(),
            log.display()
        );
        let out = self.foreground(&script, Duration::from_secs(10));
        let pid: u32 = out
            .trim()
            .lines()
            .last()
            .and_then(|l| l.parse().ok())
            .unwrap_or_else(|| self.fail(&format!("no pid from a background block: {out}")));
        self.jobs.push(Job {
            code: block.code.clone(),
            pid,
            log: log.clone(),
        });
        let deadline = Instant::now() + timeout;
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains(ready) {
                self.transcript
                    .push_str(&format!("(background, ready: {ready:?})\n"));
                return;
            }
            if Instant::now() > deadline {
                self.fail(&format!(
                    "the background block never showed {ready:?}:\n{text}"
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops (SIGINT to its process group, as Ctrl-C) the background block whose code
    /// contains `what`, and waits until it is gone.
    pub fn stop(&mut self, what: &str) {
        let Some(i) = self.jobs.iter().position(|j| j.code.contains(what)) else {
            self.fail(&format!("no background block runs {what:?}"));
        };
        let job = self.jobs.remove(i);
        signal_group(job.pid, "INT");
        let deadline = Instant::now() + Duration::from_secs(15);
        while !gone(job.pid) {
            if Instant::now() > deadline {
                self.fail(&format!("{what:?} still runs 15 s after Ctrl-C"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.transcript.push_str(&format!(
            "(stopped the background block running {what:?})\n"
        ));
    }

    /// The output so far of the background block whose code contains `what`.
    pub fn background_log(&self, what: &str) -> String {
        let job = self
            .jobs
            .iter()
            .find(|j| j.code.contains(what))
            .unwrap_or_else(|| panic!("no background block runs {what:?}"));
        std::fs::read_to_string(&job.log).unwrap_or_default()
    }

    fn fail(&self, why: &str) -> ! {
        let mut logs = String::new();
        for job in &self.jobs {
            let text = std::fs::read_to_string(&job.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(40)..].join("\n");
            logs.push_str(&format!(
                "\n=== background {:?} (last 40 lines) ===\n{tail}\n",
                job.code.lines().next().unwrap_or_default()
            ));
        }
        panic!(
            "README walk-through failed: {why}\n\n=== transcript ===\n{}{logs}",
            self.transcript
        )
    }
}

fn signal_group(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .args([format!("-{signal}"), "--".into(), format!("-{pid}")])
        .stderr(Stdio::null())
        .status();
}

/// Exited (a zombie until the shell reaps it) or reaped.
fn gone(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.split_whitespace().nth(2) == Some("Z"))
        .unwrap_or(true)
}

impl Drop for Walkthrough {
    fn drop(&mut self) {
        for job in &self.jobs {
            signal_group(job.pid, "TERM");
        }
        // Whatever the blocks left running in the shell's own group (a `cmd &` inside a block).
        let _ = writeln!(self.stdin, "kill $(jobs -p) 2> /dev/null; exit");
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.shell.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.shell.kill();
        let _ = self.shell.wait();
        for job in &self.jobs {
            signal_group(job.pid, "KILL");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_and_directives_are_read() {
        let md = "## A\n```sh\necho a\n```\n<!-- walkthrough: background \"up\" -->\n```sh\nserve\n```\n\
                  ## B\n<!-- walkthrough: background \"ok\" stops \"serve\" -->\n```sh\nrun\n```\n\
                  <!-- walkthrough: skip (slow) -->\n```sh\nslow\n```\n```text\nnot sh\n```\n## C\n```sh\nno\n```\n";
        let b = blocks(md, &["A", "B"]);
        assert_eq!(b.len(), 4);
        assert_eq!((b[0].code.as_str(), &b[0].mode), ("echo a\n", &Mode::Run));
        assert_eq!(
            b[1].mode,
            Mode::Background {
                ready: "up".into(),
                stops: None
            }
        );
        assert_eq!(
            b[2].mode,
            Mode::Background {
                ready: "ok".into(),
                stops: Some("serve".into())
            }
        );
        assert_eq!((b[3].code.as_str(), &b[3].mode), ("slow\n", &Mode::Skip));
        assert_eq!(b[0].line, 3);
    }
}
