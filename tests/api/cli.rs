//! The command line as a shell uses it: piped into `head`, logging into a file.

use super::{ADMIN, GATEWAY, ISSUER, SECRET};
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// A data directory holding an (empty) log, as `hongbao serve` leaves it.
fn data_dir_with_log(dir: &Path) {
    let store = hongbao::events::sled_store::SledStore::open(
        dir,
        Default::default(),
        std::sync::Arc::new(hongbao::clock::SystemClock),
        std::sync::Arc::new(hongbao::metrics::Metrics::new()),
    )
    .unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    use hongbao::events::EventStore;
    runtime.block_on(store.close()).unwrap();
}

#[test]
fn a_printing_command_piped_into_a_closed_reader_exits_quietly() {
    // Goal: `hongbao projections list | head` does not panic when the reader is gone; the read
    // end is closed before the process starts, so its first write meets EPIPE for certain.
    let dir = tempfile::tempdir().unwrap();
    data_dir_with_log(dir.path());
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let mut child = Command::new(env!("CARGO_BIN_EXE_hongbao"))
        .args(["projections", "list", "--data-dir"])
        .arg(dir.path())
        .stdout(writer)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let status = child.wait().unwrap();
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(status.success(), "{status}: {stderr}");
}

#[test]
fn log_lines_carry_no_colour_codes_when_standard_error_is_not_a_terminal() {
    // Goal: a server logging into a pipe or a file writes plain text (no ANSI escapes), even
    // without NO_COLOR.
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_hongbao"))
        .args(["serve", "--addr", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env_remove("NO_COLOR")
        .env("RUST_LOG", "info")
        .env("HONGBAO_ADMIN_KEY", ADMIN)
        .env("HONGBAO_ISSUER_KEY", ISSUER)
        .env("HONGBAO_GATEWAY_KEY", GATEWAY)
        .env("HONGBAO_TOKEN_SECRET", SECRET)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let listening = line.contains("hongbao listening");
            seen.push(line);
            if listening {
                let _ = tx.send(seen.clone());
            }
        }
    });
    let lines = rx.recv_timeout(Duration::from_secs(30));
    child.kill().unwrap();
    child.wait().unwrap();
    let lines = lines.expect("the server did not log that it listens");
    for line in &lines {
        assert!(!line.contains('\u{1b}'), "colour code in {line:?}");
    }
}
