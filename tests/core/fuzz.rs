//! Fuzzed inputs (issue 15), as proptest generators (cargo-fuzz needs a nightly toolchain this
//! project does not use): every parser of outside bytes answers a typed error for bad input
//! and never panics. The record decoder (what `verify`, `export` and activation read from
//! disk), the reward-token parser (a header any caller sends), the export-line checker (a file
//! an auditor hands over). The JSON bodies of every route are fuzzed over HTTP in the API
//! suite (`tests/api/fuzz.rs`).

use super::event;
use hongbao::domain::activity::{RewardClaim, RewardKind};
use hongbao::events::{seal, Envelope, GENESIS_HASH};
use hongbao::export::{verify_export, ExportLine};
use hongbao::ids::Id;
use hongbao::money::Fen;
use hongbao::tokens::TokenSigner;
use proptest::prelude::*;

/// A stored record as the journal writes it: `[prev_hash][hash][format][body]`.
fn stored_record(n: u64) -> (Envelope, Vec<u8>) {
    let new = event(n);
    let mut envelope = Envelope {
        seq: n,
        stream: format!("wallet:fz{n}"),
        version: 1,
        event_id: u128::from(n),
        correlation_id: format!("order-{n}"),
        recorded_at_ms: 1_700_000_000_000,
        schema_version: 1,
        event: new.event,
        prev_hash: GENESIS_HASH,
        hash: GENESIS_HASH,
    };
    let (hash, stored) = seal(&GENESIS_HASH, &envelope.encode_record().unwrap());
    envelope.hash = hash;
    (envelope, stored)
}

/// Changes `bytes` at the given places (a flipped bit, a byte replaced, a cut).
fn mutate(mut bytes: Vec<u8>, edits: &[(usize, u8, u8)]) -> Vec<u8> {
    for &(at, kind, value) in edits {
        if bytes.is_empty() {
            break;
        }
        let at = at % bytes.len();
        match kind % 3 {
            0 => bytes[at] ^= 1 << (value % 8),
            1 => bytes[at] = value,
            _ => bytes.truncate(at),
        }
    }
    bytes
}

/// A subsidy claim with ids at the edges of what ids allow (128 characters, every kind of
/// allowed punctuation), so damage lands in long fields too.
fn claim() -> RewardClaim {
    let id = |text: &str| Id::parse(text).unwrap();
    RewardClaim {
        activity_id: id("fuzz.act-1_x"),
        order_id: id(&format!("o:{}", "9".repeat(126))),
        uid: id("u-fz_1.a:b"),
        kind: RewardKind::Subsidy,
        amount: Fen::new(1),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn the_record_decoder_types_every_bad_record(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        // Goal: arbitrary bytes read from a damaged disk decode to an error (or, by chance, a
        // record), never a panic.
        let _ = Envelope::decode_stored(&bytes);
    }

    #[test]
    fn a_damaged_record_decodes_to_an_error_or_a_record_the_hash_check_refuses(
        n in 1u64..1_000,
        edits in proptest::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 1..4),
    ) {
        // Goal: a real record with a few bytes damaged never panics the decoder; whatever it
        // decodes to, the chain's hash no longer matches unless the damage undid itself.
        let (_, stored) = stored_record(n);
        let damaged = mutate(stored.clone(), &edits);
        if let Ok(decoded) = Envelope::decode_stored(&damaged) {
            let (_, _, record) = hongbao::events::split_stored(&damaged).unwrap();
            let (hash, _) = seal(&decoded.prev_hash, record);
            prop_assert!(
                damaged == stored || hash != decoded.hash,
                "a damaged record decoded and its hash still matched"
            );
        }
    }

    #[test]
    fn the_token_parser_refuses_every_string_it_did_not_sign(token in ".{0,300}") {
        // Goal: any string is refused with a reason, never a panic or a claim.
        let signer = TokenSigner::new("secret-for-fuzzing-0001");
        prop_assert!(signer.verify(&token).is_err());
        let prefixed = format!("hb1.{token}");
        prop_assert!(signer.verify(&prefixed).is_err());
    }

    #[test]
    fn a_damaged_token_is_refused_or_is_the_same_token(
        edits in proptest::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 1..4),
    ) {
        // Goal: a signed token with a few bytes changed is refused, unless the change undid
        // itself; it never verifies to another claim.
        let signer = TokenSigner::new("secret-for-fuzzing-0001");
        let token = signer.sign(&claim());
        let damaged = mutate(token.clone().into_bytes(), &edits);
        let damaged = String::from_utf8_lossy(&damaged).into_owned();
        match signer.verify(&damaged) {
            Ok(decoded) => prop_assert!(damaged == token && decoded == claim(), "{damaged}"),
            Err(_) => prop_assert_ne!(damaged, token),
        }
    }

    #[test]
    fn the_export_checker_reports_every_bad_line_and_never_panics(
        lines in proptest::collection::vec(".{0,200}", 0..5),
    ) {
        // Goal: arbitrary lines give a report with a violation (or, for no line, an empty
        // report), never a panic.
        let text = lines.join("\n");
        let report = verify_export(&mut text.as_bytes(), |_| {}).expect("reading from memory");
        if lines.iter().any(|l| !l.is_empty()) {
            prop_assert!(report.violation.is_some(), "{report:?}");
        }
    }

    #[test]
    fn a_damaged_export_line_is_reported_not_accepted(
        n in 1u64..1_000,
        edits in proptest::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 1..4),
    ) {
        // Goal: a real export line with a few bytes changed is reported as a violation unless
        // it is still the same JSON (whitespace, an escape). Upper-case hex, a renamed field
        // (an unknown one added, a null one left out) passed before the checker compared the
        // line with its record's JSON.
        let (envelope, _) = stored_record(n);
        let line = serde_json::to_string(&ExportLine::from_envelope(envelope)).unwrap();
        let damaged = mutate(line.clone().into_bytes(), &edits);
        let text = String::from_utf8_lossy(&damaged).into_owned();
        let report = verify_export(&mut text.as_bytes(), |_| {}).expect("reading from memory");
        if damaged.is_empty() {
            // Cut to nothing: no line to check (the command line says so).
            prop_assert_eq!(report.lines, 0);
        } else if report.violation.is_none() {
            // Passed: then it is the same JSON (whitespace, key order or an escape changed).
            let parsed: serde_json::Value = serde_json::from_str(text.trim_end()).unwrap();
            let original: serde_json::Value = serde_json::from_str(&line).unwrap();
            prop_assert_eq!(parsed, original, "a changed line passed");
        }
    }
}

#[test]
fn an_export_line_with_a_key_given_twice_is_refused() {
    // Goal: `"amount":5,...,"amount":999` is not one record: a reader taking the first value
    // and one taking the last would see different money.
    let (envelope, _) = stored_record(7);
    let line = serde_json::to_string(&ExportLine::from_envelope(envelope)).unwrap();
    let doubled = line.replacen("\"seq\":7,", "\"seq\":7,\"seq\":7,", 1);
    assert_ne!(doubled, line);
    let report = verify_export(&mut doubled.as_bytes(), |_| {}).unwrap();
    assert!(report.violation.is_some(), "{report:?}");
    let report = verify_export(&mut line.as_bytes(), |_| {}).unwrap();
    assert_eq!(report.violation, None);
}
