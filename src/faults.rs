//! Injected disk faults (issue 15), compiled in only with the cargo feature `failpoints`.
//!
//! Each point is named where the code can meet a disk error; `FAILPOINTS` configures them when
//! the process starts (the `fail` crate's syntax: `name=[N*]action[(arg)][->...];...`), e.g.
//! `FAILPOINTS="journal-flush=40*off->return(enospc)"`: the first forty flushes pass, every later
//! one fails as a full disk would. The action `return(enospc)` gives the error of a full disk,
//! any other argument a plain I/O error carrying it.
//!
//! | point | where | what the code must do |
//! |---|---|---|
//! | `journal-write` | the journal applies a batch to the log's tree | fail-stop: nothing of the batch acknowledged or visible |
//! | `journal-flush` | the journal flushes that batch | fail-stop, the batch taken back out of the tree |
//! | `view-commit` | a view's commit (its rows and checkpoint, one atomic batch) | the view stays at its checkpoint and is retried from the log; the journal goes on |
//! | `snapshot-write` | an actor's snapshot into the derived-state database (either backend) | a warning (limited); the actor goes on, its next activation replays from the last snapshot saved |
//! | `flow-checkpoint` | a flow's checkpoint (reward lanes, payout lanes, packets, coupons, reconciliation) | a warning (limited); the flow goes on and saves at its next checkpoint; after a crash it resumes from the older one and its repeats are idempotent |
//!
//! Without the feature [`injected`] is `Ok(())` and the points cost nothing.

/// The error injected at `point`, if `FAILPOINTS` arms it now.
#[cfg(feature = "failpoints")]
pub fn injected(point: &str) -> std::io::Result<()> {
    fail::fail_point!(point, |arg: Option<String>| {
        let why = arg.unwrap_or_default();
        let kind = if why == "enospc" {
            std::io::ErrorKind::StorageFull
        } else {
            std::io::ErrorKind::Other
        };
        Err(std::io::Error::new(
            kind,
            format!("injected fault at {point}: {why}"),
        ))
    });
    Ok(())
}

/// Without the `failpoints` feature no fault is ever injected.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn injected(_point: &str) -> std::io::Result<()> {
    Ok(())
}

/// Arms the points `FAILPOINTS` names (call once, first thing in `main`); the guard keeps them
/// armed. Without the feature a set `FAILPOINTS` is reported and ignored.
#[cfg(feature = "failpoints")]
pub fn setup() -> fail::FailScenario<'static> {
    fail::FailScenario::setup()
}

/// Without the feature: a set `FAILPOINTS` is reported and ignored.
#[cfg(not(feature = "failpoints"))]
pub fn setup() {
    if std::env::var_os("FAILPOINTS").is_some() {
        eprintln!("FAILPOINTS is ignored: this binary was built without the `failpoints` feature");
    }
}
