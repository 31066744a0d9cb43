//! The README as a new operator follows it: every line of its `sh` blocks is run as written
//! (through bash, from the repository, or from a directory below it where the command reads
//! a file the README says to make), and the servers it starts are probed over HTTP and a
//! plugin socket, then stopped with SIGTERM. A line no handler below knows fails the test,
//! so a command added to the README gets a check with it.
//!
//! What the test changes around a command: the environment gives the server port 0, the
//! loopback address, a fresh data directory and JSON logs (so it never collides with
//! another server and its address can be read), and a Redis key prefix of its own.
//!
//! What cannot run here, and what is checked instead:
//! - `scripts/test.sh` runs this very test: its syntax is checked (`bash -n`).
//! - `docker build -t supersynk .` and `docker run -p 5001:5001 supersynk`: the machine has
//!   the Docker client but no engine. The Dockerfile is checked: what it copies exists and
//!   is not excluded by `.dockerignore`, it builds the server binary (which `cargo run
//!   --release` builds and runs here) and exposes its default port.
//! - `docker compose up --build`: `docker compose config` validates the file (its services
//!   and healthchecks are run by `tests/deploy.rs`).
//!
//! The settings table is checked against the server's flags and variables, and the
//! README's example file is the one `--check-config` reads.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use clap::CommandFactory;
use common::*;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// A first `cargo run --release` builds the release binary (minutes on a loaded machine).
const BUILD: Duration = Duration::from_secs(45 * 60);

fn readme() -> String {
    std::fs::read_to_string(format!("{ROOT}/README.md")).unwrap()
}

/// Every command line of the README's `sh` blocks (comments cut off).
fn commands() -> Vec<String> {
    fenced_blocks(&readme())
        .into_iter()
        .filter(|(info, _)| info == "sh")
        .flat_map(|(_, body)| {
            body.lines()
                .map(|l| l.split(" #").next().unwrap().trim().to_string())
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// `bash -c line` in `dir`, with the test's environment (see the module doc), in a
/// process group of its own; stderr goes to a file.
fn command(line: &str, dir: &Path, data: &Path) -> (Command, PathBuf) {
    let stderr = data.with_extension("stderr");
    let mut cmd = Command::new("bash");
    cmd.args(["-c", line]).current_dir(dir);
    // A fresh machine has none of the variables cargo gives a test.
    for (k, _) in std::env::vars() {
        if k.starts_with("CARGO_") && k != "CARGO_HOME" || k.starts_with("SUPERSYNK_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("SUPERSYNK_PORT", "0")
        .env("SUPERSYNK_BIND", "127.0.0.1")
        .env("SUPERSYNK_DATA_DIR", data)
        .env("SUPERSYNK_LOG_FORMAT", "json")
        .env(
            "SUPERSYNK_REDIS_PREFIX",
            format!("supersynk-readme-{}:", uuid::Uuid::new_v4().simple()),
        )
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .process_group(0);
    (cmd, stderr)
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Runs `line` to its end; returns (success, stdout, stderr's tail).
fn run(line: &str, dir: &Path) -> (bool, String, String) {
    let data = data_dir();
    let (mut cmd, stderr) = command(line, dir, &data);
    let out = cmd.output().expect("bash runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        tail(&stderr),
    )
}

/// A server started by a README command; its process group gets SIGTERM when stopped
/// (and SIGKILL if the test fails first).
struct Running {
    child: Option<Child>,
    addr: SocketAddr,
}

impl Running {
    /// Starts `line` and waits (within [`BUILD`]) for the server's "listening" line.
    fn start(line: &str) -> Running {
        let data = data_dir();
        let (mut cmd, stderr) = command(line, Path::new(ROOT), &data);
        let mut child = cmd.stdout(Stdio::piped()).spawn().expect("bash runs");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
                if v["fields"]["message"] == "listening" {
                    let addr: SocketAddr =
                        v["fields"]["local_addr"].as_str().unwrap().parse().unwrap();
                    // The test may have given up; nothing else to tell.
                    let _ = tx.send(addr);
                }
            }
        });
        let mut running = Running {
            child: Some(child),
            addr: "0.0.0.0:0".parse().unwrap(),
        };
        match rx.recv_timeout(BUILD) {
            Ok(addr) => running.addr = addr,
            Err(_) => panic!("`{line}` never listened; its stderr:\n{}", tail(&stderr)),
        }
        running
    }

    /// [`Running::start`] off the runtime's threads.
    async fn start_async(line: &str) -> Running {
        let line = line.to_string();
        tokio::task::spawn_blocking(move || Running::start(&line))
            .await
            .unwrap()
    }

    /// SIGTERM to the whole group; true if it exited with success.
    async fn stop(mut self) -> bool {
        let mut child = self.child.take().unwrap();
        signal_group(&child, "-TERM");
        tokio::task::spawn_blocking(move || child.wait().is_ok_and(|s| s.success()))
            .await
            .unwrap()
    }
}

fn signal_group(child: &Child, signal: &str) {
    let status = Command::new("kill")
        .args([signal, "--", &format!("-{}", child.id())])
        .status()
        .unwrap();
    assert!(status.success());
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal_group(&child, "-KILL");
            // Reaped so that no zombie is left; its status does not matter any more.
            let _ = child.wait();
        }
    }
}

/// What a plugin and an operator see of a server the README started.
async fn probe(addr: SocketAddr, line: &str) {
    assert_eq!(http(addr, "GET", "/version", "").await.2, "0.1", "{line}");
    assert_eq!(http(addr, "GET", "/healthz", "").await.2, "ok\n", "{line}");
    assert_eq!(
        http(addr, "GET", "/readyz", "").await.2,
        "ready\n",
        "{line}"
    );
    let (status, _, page) = http(addr, "GET", "/", "").await;
    assert!(
        status == 200 && page.contains("<title>supersynk") && page.contains("id=sessions>0<"),
        "{line}: {page}"
    );
    assert!(metric(addr, "supersynk_build_info").await == 1.0, "{line}");
    let (mut leader, mut follower) = pair(addr, "readme").await;
    leader.send_text(&push("readme", 1)).await.unwrap();
    assert_eq!(recv(&mut follower).await["type"], "Push", "{line}");
}

/// The Dockerfile builds the server and runs it on its default port from what the build
/// context holds.
fn check_dockerfile() {
    let dockerfile = std::fs::read_to_string(format!("{ROOT}/Dockerfile")).unwrap();
    let ignored = std::fs::read_to_string(format!("{ROOT}/.dockerignore")).unwrap_or_default();
    let ignored: Vec<&str> = ignored.lines().map(str::trim).collect();
    for line in dockerfile.lines() {
        let Some(rest) = line.strip_prefix("COPY ") else {
            continue;
        };
        if rest.starts_with("--from") {
            continue;
        }
        let words: Vec<&str> = rest.split_whitespace().collect();
        for source in &words[..words.len() - 1] {
            assert!(
                Path::new(ROOT).join(source).exists(),
                "the Dockerfile copies {source}, which is missing"
            );
            let top = source.split('/').next().unwrap();
            assert!(!ignored.contains(&top), ".dockerignore excludes {source}");
        }
    }
    // Every file the build reads is copied: the manifest's files and the sources.
    for needed in ["Cargo.toml", "Cargo.lock", "build.rs", "src"] {
        assert!(
            dockerfile
                .lines()
                .any(|l| l.starts_with("COPY ") && l.split_whitespace().any(|w| w == needed)),
            "the Dockerfile does not copy {needed}"
        );
    }
    assert!(dockerfile.contains("cargo build --release --locked --bin supersynk"));
    assert!(
        dockerfile
            .contains("COPY --from=build /src/target/release/supersynk /usr/local/bin/supersynk")
    );
    assert!(dockerfile.contains("EXPOSE 5001") && dockerfile.contains("SUPERSYNK_PORT=5001"));
    assert!(dockerfile.contains(r#"ENTRYPOINT ["/usr/local/bin/supersynk"]"#));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_shell_command_of_the_readme_runs_as_written() {
    let commands = commands();
    assert!(commands.len() >= 8, "{commands:?}");
    // The release build comes first: later commands run what it built.
    let first = commands.iter().position(|c| c == "cargo run --release");
    assert!(
        first.is_some(),
        "the README's run command is gone: {commands:?}"
    );
    let mut order = commands.clone();
    order.sort_by_key(|c| c != "cargo run --release");
    for line in &order {
        let line = line.as_str();
        match line {
            "cargo run --release" | "target/release/supersynk" => {
                let server = Running::start_async(line).await;
                probe(server.addr, line).await;
                assert!(
                    server.stop().await,
                    "`{line}` did not stop cleanly on SIGTERM"
                );
            }
            "cargo run --release -- --redis-url redis://127.0.0.1:6379" => {
                let server = Running::start_async(line).await;
                until_metric(&[server.addr], "supersynk_redis_up", 1.0).await;
                probe(server.addr, line).await;
                assert!(
                    server.stop().await,
                    "`{line}` did not stop cleanly on SIGTERM"
                );
            }
            "cargo run --release -- --config supersynk.toml --check-config" => {
                // The README's example file, where the command reads it (cargo finds the
                // manifest above this directory).
                let (_, toml) = fenced_blocks(&readme())
                    .into_iter()
                    .find(|(info, _)| info == "toml")
                    .expect("the example file");
                let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
                std::fs::write(dir.path().join("supersynk.toml"), &toml).unwrap();
                let (ok, stdout, stderr) = run(line, dir.path());
                assert!(ok, "`{line}`: {stderr}");
                // The test's SUPERSYNK_PORT=0 wins over the file's port (flag, variable,
                // file), as the README says.
                assert!(
                    stdout.starts_with("supersynk: configuration ok: listens on 127.0.0.1:0"),
                    "{stdout}"
                );
                // And the file is read: a bad key in it is refused.
                std::fs::write(
                    dir.path().join("supersynk.toml"),
                    format!("{toml}prot = 1\n"),
                )
                .unwrap();
                let (ok, _, stderr) = run(line, dir.path());
                assert!(!ok && stderr.contains("unknown field `prot`"), "{stderr}");
            }
            "cargo run --release --bin supersynk-bench -- --help" => {
                let (ok, stdout, stderr) = run(line, Path::new(ROOT));
                assert!(ok, "`{line}`: {stderr}");
                assert!(stdout.contains("Usage: supersynk-bench"), "{stdout}");
            }
            "scripts/test.sh" => {
                let (ok, _, stderr) = run("bash -n scripts/test.sh", Path::new(ROOT));
                assert!(ok, "scripts/test.sh: {stderr}");
            }
            "docker build -t supersynk ." | "docker run -p 5001:5001 supersynk" => {
                check_dockerfile();
            }
            "docker compose up --build" => {
                let check = compose(&["config", "-q"]);
                assert!(
                    check.status.success(),
                    "{}",
                    String::from_utf8_lossy(&check.stderr)
                );
            }
            other => panic!("the README shows `{other}`, which no test runs: add it here"),
        }
    }
}

/// The README's settings table: (flags, variables, default) per row.
fn settings_table() -> Vec<(Vec<String>, Vec<String>)> {
    let readme = readme();
    let start = readme
        .find("| Flag / file key | Environment |")
        .expect("the settings table");
    readme[start..]
        .lines()
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .map(|row| {
            let cells: Vec<&str> = row.split('|').map(str::trim).collect();
            let codes = |cell: &str| -> Vec<String> {
                cell.split('`')
                    .skip(1)
                    .step_by(2)
                    .map(String::from)
                    .collect()
            };
            (codes(cells[1]), codes(cells[2]))
        })
        .collect()
}

#[test]
fn the_settings_table_lists_every_flag_with_its_variable() {
    let cli = supersynk::config::Settings::command();
    let mut flags: Vec<(String, Option<String>)> = cli
        .get_arguments()
        .filter_map(|a| {
            let long = a.get_long()?;
            if ["help", "version"].contains(&long) {
                return None;
            }
            let env = a.get_env().map(|e| e.to_string_lossy().into_owned());
            Some((format!("--{long}"), env))
        })
        .collect();
    flags.sort();
    let mut table: Vec<(String, Option<String>)> = Vec::new();
    for (row_flags, row_envs) in settings_table() {
        assert!(!row_flags.is_empty());
        // A row of several flags lists their variables in the same order.
        for (i, flag) in row_flags.iter().enumerate() {
            let env = if row_flags.len() > 1 {
                row_envs.get(i).cloned()
            } else {
                row_envs.first().cloned()
            };
            table.push((flag.clone(), env));
        }
    }
    table.sort();
    assert_eq!(
        table, flags,
        "README settings table (left) vs the server's flags (right)"
    );
}
