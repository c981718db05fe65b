//! Signed checkpoints (D4): the server signs `(seq, hash)` of the log's durable head with an
//! Ed25519 key, so that an auditor holding only the public key can tell that an export is the
//! history the server had, not a suffix rewritten (and consistently re-hashed) afterwards.
//!
//! - The key is generated on first start into `<data>/checkpoint.key` (mode 0600, beside the
//!   API keys); `hongbao checkpoints public-key` prints its public half.
//! - The server appends a checkpoint `{seq, hash, at, signature}` as one JSON line to
//!   `<data>/checkpoints.jsonl` (synced to disk) every `audit.checkpoint_every_ms` when the
//!   head moved, and once more at shutdown after the journal is closed.
//! - `hongbao verify --export FILE --checkpoints FILE --public-key HEX` refuses a checkpoint
//!   whose signature does not hold, and fails when a validly signed checkpoint disagrees with
//!   the export (another hash at its seq, or a seq past the export's end).
//!
//! The signature covers a domain tag, the sequence, the hash and the `at` text, so no field of
//! a line can be changed without the signature failing. What this does and does not protect
//! against is in docs/ARCHITECTURE.md ("Signed checkpoints: threat model").

use crate::clock::{rfc3339, Clock};
use crate::events::{EventStore, Hash};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The signing key's file in the data directory (hex of the 32-byte secret seed).
pub const KEY_FILE: &str = "checkpoint.key";
/// The checkpoints' file in the data directory (JSON lines, appended).
pub const CHECKPOINTS_FILE: &str = "checkpoints.jsonl";
/// Prefix of every signed message: a signature made for anything else never verifies here.
const SIGNED_DOMAIN: &[u8] = b"hongbao checkpoint v1\0";

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// (`error`, not `source`: the message already carries it, once.)
    #[error("{path}: {error}")]
    Io { path: String, error: std::io::Error },
    #[error("{path}: {message}")]
    Key { path: String, message: String },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |error| CheckpointError::Io {
        path: path.display().to_string(),
        error,
    }
}

/// One signed checkpoint, as a line of `checkpoints.jsonl`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    /// Sequence of the log's durable head when signed.
    pub seq: u64,
    /// Hash (hex) of the record at `seq`.
    pub hash: String,
    /// When it was signed (RFC 3339, UTC).
    pub at: String,
    /// Ed25519 signature (hex) over the domain tag, `seq`, `hash` and `at`.
    pub signature: String,
}

fn signed_message(seq: u64, hash: &Hash, at: &str) -> Vec<u8> {
    let mut message = Vec::with_capacity(SIGNED_DOMAIN.len() + 8 + 32 + at.len());
    message.extend_from_slice(SIGNED_DOMAIN);
    message.extend_from_slice(&seq.to_be_bytes());
    message.extend_from_slice(hash);
    message.extend_from_slice(at.as_bytes());
    message
}

fn parse_hex<const N: usize>(what: &str, text: &str) -> Result<[u8; N], String> {
    let bytes = hex::decode(text.trim()).map_err(|_| format!("{what} is not hex"))?;
    bytes
        .try_into()
        .map_err(|_| format!("{what} is not {N} bytes ({} hex characters)", 2 * N))
}

/// Parses a 32-byte hash written in hex.
pub fn parse_hash(what: &str, text: &str) -> Result<Hash, String> {
    parse_hex::<32>(what, text)
}

/// Parses a public key as `hongbao checkpoints public-key` prints it.
pub fn parse_public_key(text: &str) -> Result<VerifyingKey, String> {
    let bytes = parse_hex::<32>("the public key", text)?;
    VerifyingKey::from_bytes(&bytes).map_err(|_| "the public key is not a valid Ed25519 key".into())
}

/// The public key in hex.
pub fn public_key_hex(key: &SigningKey) -> String {
    hex::encode(key.verifying_key().to_bytes())
}

impl Checkpoint {
    /// Signs `(seq, hash)` as of `at_ms`.
    pub fn sign(key: &SigningKey, seq: u64, hash: &Hash, at_ms: i64) -> Checkpoint {
        let at = rfc3339(at_ms);
        let signature = key.sign(&signed_message(seq, hash, &at));
        Checkpoint {
            seq,
            hash: hex::encode(hash),
            at,
            signature: hex::encode(signature.to_bytes()),
        }
    }

    /// The checkpoint's hash if its signature holds under `key`; why not otherwise.
    pub fn verify(&self, key: &VerifyingKey) -> Result<Hash, String> {
        let hash = parse_hash("hash", &self.hash)?;
        let signature = Signature::from_bytes(&parse_hex::<64>("signature", &self.signature)?);
        key.verify_strict(&signed_message(self.seq, &hash, &self.at), &signature)
            .map_err(|_| "the signature does not hold for this public key (forged or altered)")?;
        Ok(hash)
    }
}

/// Reads the signing key from the data directory.
pub fn load_key(data_dir: &Path) -> Result<SigningKey, CheckpointError> {
    let path = data_dir.join(KEY_FILE);
    let text = std::fs::read_to_string(&path).map_err(io_error(&path))?;
    let seed = text
        .lines()
        .map(str::trim)
        .find(|line| !line.is_empty() && !line.starts_with('#'))
        .ok_or_else(|| "no key in the file".to_string())
        .and_then(|line| parse_hex::<32>("the key", line))
        .map_err(|message| CheckpointError::Key {
            path: path.display().to_string(),
            message,
        })?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Reads the signing key, generating it (mode 0600) on first start. Returns the key and, when
/// it was generated, the file's path.
pub fn load_or_generate_key(
    data_dir: &Path,
) -> Result<(SigningKey, Option<PathBuf>), CheckpointError> {
    let path = data_dir.join(KEY_FILE);
    if path.exists() {
        return Ok((load_key(data_dir)?, None));
    }
    let seed: [u8; 32] = rand::random();
    let key = SigningKey::from_bytes(&seed);
    std::fs::create_dir_all(data_dir).map_err(io_error(data_dir))?;
    let text = format!(
        "# Generated by hongbao on first start: the Ed25519 key that signs log checkpoints.\n\
         # Keep secret. Public key (publish it off this machine): {}\n{}\n",
        public_key_hex(&key),
        hex::encode(seed)
    );
    crate::config::write_private(&path, &text).map_err(io_error(&path))?;
    Ok((key, Some(path)))
}

/// Reads a checkpoints file: every line with its number (from 1). A last line without its
/// newline that does not parse is a write cut short by a crash: it is skipped (it was never
/// a whole checkpoint); any other line that does not parse is an error.
pub fn read_checkpoints(path: &Path) -> Result<Vec<(u64, Checkpoint)>, CheckpointError> {
    let text = std::fs::read_to_string(path).map_err(io_error(path))?;
    let torn_tail = !text.is_empty() && !text.ends_with('\n');
    let count = text.lines().count();
    let mut checkpoints = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(line) {
            Ok(checkpoint) => checkpoints.push((i as u64 + 1, checkpoint)),
            Err(_) if torn_tail && i + 1 == count => {}
            Err(e) => {
                return Err(CheckpointError::Key {
                    path: path.display().to_string(),
                    message: format!("line {} is not a checkpoint: {e}", i + 1),
                })
            }
        }
    }
    Ok(checkpoints)
}

/// What checking checkpoints against an export found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckpointReport {
    /// Checkpoints whose signature holds and whose (seq, hash) the export confirms.
    pub confirmed: u64,
    /// Validly signed checkpoints before the export's first seq (a partial export).
    pub not_covered: u64,
    /// The first checkpoint that does not hold: its line and why.
    pub violation: Option<(u64, String)>,
}

/// Checks every checkpoint's signature, then its (seq, hash) against the export's hashes
/// (`hashes`, the export's hash at each checkpoint's seq; `first_seq..=last_seq` its range).
/// A bad signature is refused before anything is compared: a forged line proves nothing.
pub fn check_against_export(
    checkpoints: &[(u64, Checkpoint)],
    key: &VerifyingKey,
    hashes: &HashMap<u64, Hash>,
    first_seq: Option<u64>,
    last_seq: Option<u64>,
) -> CheckpointReport {
    let mut report = CheckpointReport::default();
    let mut signed = Vec::with_capacity(checkpoints.len());
    for (line, checkpoint) in checkpoints {
        match checkpoint.verify(key) {
            Ok(hash) => signed.push((*line, checkpoint, hash)),
            Err(why) => {
                report.violation = Some((
                    *line,
                    format!("checkpoint at seq {} refused: {why}", checkpoint.seq),
                ));
                return report;
            }
        }
    }
    for (line, checkpoint, hash) in signed {
        let at = checkpoint.seq;
        let signed_at = &checkpoint.at;
        match (first_seq, last_seq) {
            (Some(first), _) if at < first => report.not_covered += 1,
            (_, Some(last)) if at <= last => match hashes.get(&at) {
                Some(found) if *found == hash => report.confirmed += 1,
                found => {
                    report.violation = Some((
                        line,
                        format!(
                            "the checkpoint signed at {signed_at} has hash {} at seq {at}, the export {}: \
                             the history from seq {at} back was rewritten",
                            checkpoint.hash,
                            found.map(hex::encode).unwrap_or_else(|| "nothing".into())
                        ),
                    ));
                    return report;
                }
            },
            (_, last) => {
                report.violation = Some((
                    line,
                    format!(
                        "the checkpoint signed at {signed_at} is at seq {at}, the export ends at seq {}: \
                         it was cut short",
                        last.unwrap_or(0)
                    ),
                ));
                return report;
            }
        }
    }
    report
}

/// Checks the data directory's own checkpoints against its log: every signature under the
/// directory's key, and the log's hash at each checkpoint's seq (`hongbao verify`). `None`
/// when the directory has no checkpoints or no key (a log from before signed checkpoints).
/// It detects a log changed behind the server's back (a restored backup, an edit); someone
/// who also holds the key can re-sign, which is why the public key and the checkpoints are
/// to be kept off the machine and checked with `verify --export --checkpoints`.
pub fn check_local(
    data_dir: &Path,
    store: &dyn crate::events::Log,
) -> Result<Option<CheckpointReport>, CheckpointError> {
    let path = data_dir.join(CHECKPOINTS_FILE);
    if !path.exists() || !data_dir.join(KEY_FILE).exists() {
        return Ok(None);
    }
    let key = load_key(data_dir)?.verifying_key();
    let checkpoints = read_checkpoints(&path)?;
    let head = store.head();
    let mut hashes = HashMap::new();
    for (_, checkpoint) in &checkpoints {
        if checkpoint.seq == 0 || checkpoint.seq > head || hashes.contains_key(&checkpoint.seq) {
            continue;
        }
        if let Ok(Some(record)) = store.stored_record(checkpoint.seq) {
            if let Ok((_, hash, _)) = crate::events::split_stored(&record.stored) {
                hashes.insert(record.seq, hash);
            }
        }
    }
    Ok(Some(check_against_export(
        &checkpoints,
        &key,
        &hashes,
        Some(1),
        Some(head),
    )))
}

/// Cuts a last line left without its newline by a crash mid-append, so that the next append
/// starts a line of its own. Returns the bytes cut.
fn cut_torn_tail(path: &Path) -> std::io::Result<u64> {
    let text = match std::fs::read(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    if text.is_empty() || text.ends_with(b"\n") {
        return Ok(0);
    }
    let keep = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let file = std::fs::OpenOptions::new().write(true).open(path)?;
    file.set_len(keep as u64)?;
    file.sync_all()?;
    Ok((text.len() - keep) as u64)
}

/// Appends one checkpoint line and syncs it to disk.
pub fn append_checkpoint(path: &Path, checkpoint: &Checkpoint) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(checkpoint).map_err(std::io::Error::other)?;
    line.push(b'\n');
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    file.write_all(&line)?;
    file.sync_data()
}

struct HeadSigner {
    store: Arc<dyn EventStore>,
    key: SigningKey,
    path: PathBuf,
    clock: Arc<dyn Clock>,
    /// The last seq signed by this process (none yet: the first tick signs the head).
    signed_seq: Option<u64>,
}

impl HeadSigner {
    /// Signs the durable head if it moved since the last checkpoint. Errors are logged: a
    /// missed checkpoint weakens the evidence, it does not endanger the log.
    fn checkpoint(&mut self) {
        let head = self.store.head();
        if head == 0 || self.signed_seq == Some(head) {
            return;
        }
        let hash = match self.store.read_all(head, 1) {
            Ok(events) if events.first().is_some_and(|e| e.seq == head) => events[0].hash,
            Ok(_) => {
                tracing::error!(head, "checkpoint: the head's record is missing");
                return;
            }
            Err(e) => {
                tracing::error!(head, error = %e, "checkpoint: cannot read the head");
                return;
            }
        };
        let checkpoint = Checkpoint::sign(&self.key, head, &hash, self.clock.now_ms());
        match append_checkpoint(&self.path, &checkpoint) {
            Ok(()) => self.signed_seq = Some(head),
            Err(e) => {
                tracing::error!(path = %self.path.display(), error = %e, "checkpoint not written")
            }
        }
    }
}

/// The server's checkpoint signer: a thread that signs every `every` when the head moved, and
/// [`Checkpointer::finish`] for the last one at shutdown.
pub struct Checkpointer {
    signer: Arc<Mutex<HeadSigner>>,
    stop: Mutex<Option<std::sync::mpsc::Sender<()>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Checkpointer {
    /// Starts signing into `<data_dir>/checkpoints.jsonl`; `every` None: only at shutdown.
    pub fn start(
        store: Arc<dyn EventStore>,
        key: SigningKey,
        data_dir: &Path,
        every: Option<Duration>,
        clock: Arc<dyn Clock>,
    ) -> std::io::Result<Checkpointer> {
        let path = data_dir.join(CHECKPOINTS_FILE);
        let cut = cut_torn_tail(&path)?;
        if cut > 0 {
            tracing::warn!(path = %path.display(), bytes = cut, "cut a checkpoint line torn by a crash");
        }
        let signer = Arc::new(Mutex::new(HeadSigner {
            store,
            key,
            path,
            clock,
            signed_seq: None,
        }));
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = match every {
            None => None,
            Some(every) => {
                let signer = signer.clone();
                Some(
                    std::thread::Builder::new()
                        .name("hongbao-checkpoints".into())
                        .spawn(move || {
                            // A message or a hang-up both mean stop.
                            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                                stopped.recv_timeout(every)
                            {
                                if let Ok(mut signer) = signer.lock() {
                                    signer.checkpoint();
                                }
                            }
                        })?,
                )
            }
        };
        Ok(Checkpointer {
            signer,
            stop: Mutex::new(Some(stop)),
            thread: Mutex::new(thread),
        })
    }

    /// Stops the periodic signer and signs the head one last time (call it after the journal
    /// is closed, so that the checkpoint is the log's final head).
    pub async fn finish(&self) {
        self.stop.lock().ok().and_then(|mut s| s.take());
        let thread = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        let signer = self.signer.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if let Ok(mut signer) = signer.lock() {
                signer.checkpoint();
            }
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_verifies_and_any_changed_field_does_not() {
        // Goal: the signature covers seq, hash and at; another key's signature is refused.
        let key = SigningKey::from_bytes(&[1; 32]);
        let public = key.verifying_key();
        let checkpoint = Checkpoint::sign(&key, 42, &[9; 32], 1_000);
        assert_eq!(checkpoint.verify(&public), Ok([9; 32]));
        let mut seq = checkpoint.clone();
        seq.seq = 43;
        let mut hash = checkpoint.clone();
        hash.hash = hex::encode([8u8; 32]);
        let mut at = checkpoint.clone();
        at.at = rfc3339(2_000);
        let other = Checkpoint::sign(&SigningKey::from_bytes(&[2; 32]), 42, &[9; 32], 1_000);
        for forged in [seq, hash, at, other] {
            assert!(forged.verify(&public).is_err(), "{forged:?}");
        }
    }

    #[test]
    fn a_torn_last_line_is_skipped_and_any_other_bad_line_refused() {
        // Goal: a crash mid-append leaves the earlier checkpoints usable; garbage is named.
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::from_bytes(&[1; 32]);
        let path = dir.path().join(CHECKPOINTS_FILE);
        append_checkpoint(&path, &Checkpoint::sign(&key, 1, &[1; 32], 0)).unwrap();
        append_checkpoint(&path, &Checkpoint::sign(&key, 2, &[2; 32], 0)).unwrap();
        let whole = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, format!("{whole}{{\"seq\":3,\"ha")).unwrap();
        let read = read_checkpoints(&path).unwrap();
        assert_eq!(read.iter().map(|(_, c)| c.seq).collect::<Vec<_>>(), [1, 2]);
        std::fs::write(&path, format!("{{\"seq\":3,\"ha\n{whole}")).unwrap();
        let refused = read_checkpoints(&path).unwrap_err().to_string();
        assert!(refused.contains("line 1 is not a checkpoint"), "{refused}");
        // The signer, starting after the crash, cuts the torn line before it appends.
        std::fs::write(&path, format!("{whole}{{\"seq\":3,\"ha")).unwrap();
        assert_eq!(
            cut_torn_tail(&path).unwrap(),
            "{\"seq\":3,\"ha".len() as u64
        );
        append_checkpoint(&path, &Checkpoint::sign(&key, 4, &[4; 32], 0)).unwrap();
        let read = read_checkpoints(&path).unwrap();
        assert_eq!(
            read.iter().map(|(_, c)| c.seq).collect::<Vec<_>>(),
            [1, 2, 4]
        );
    }

    #[test]
    fn a_generated_key_is_private_and_read_back() {
        // Goal: the key is generated once (mode 0600 on unix) and the same key is read back.
        let dir = tempfile::tempdir().unwrap();
        let (key, generated) = load_or_generate_key(dir.path()).unwrap();
        assert_eq!(generated, Some(dir.path().join(KEY_FILE)));
        let (again, generated) = load_or_generate_key(dir.path()).unwrap();
        assert_eq!(generated, None);
        assert_eq!(public_key_hex(&key), public_key_hex(&again));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
