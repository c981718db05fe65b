//! One incarnation of the engine for the simulation: the single node's whole stack (the sled
//! log, views, actors, flows, the simulated payment channels and every HTTP handler) on a
//! thread and actix system of its own, driven through the real routes without a socket.
//!
//! A crash ends the incarnation without any of the graceful stop: the system stops, every
//! task, actor and in-flight request is dropped where it stands, nothing is drained or
//! checkpointed, and the next incarnation reopens the same directory. A crash "between a write
//! and its flush" first holds the journal writer after it has applied a batch and before it
//! flushes (the store's test seam), sends requests into it, and dies while they wait: their
//! answers are lost and the batch may or may not be found on reopening, as after a power cut.
//! A failed flush makes the journal fail stop, as a failing disk would, before the crash.
//!
//! Each incarnation proves the directory as it finds it before it serves: the audit's every
//! invariant over the whole log, and every view equal to a rebuild up to its checkpoint.

use crate::audit::{views_check, AuditReport};
use crate::clock::Clock;
use crate::config::Config;
use crate::events::sled_store::{FlushHold, SledStore};
use crate::events::EventStore;
use crate::http::AppState;
use crate::metrics::Metrics;
use actix_http::Request;
use actix_web::dev::{Service, ServiceResponse};
use actix_web::{test, web, App};
use serde_json::Value;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Who sends a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Admin,
    Issuer,
    Gateway,
}

/// One HTTP request of the simulated clients.
#[derive(Debug, Clone)]
pub struct Call {
    pub method: actix_web::http::Method,
    pub path: String,
    pub role: Role,
    pub body: Option<Value>,
}

/// Status and JSON body of an answer.
pub type Answer = (u16, Value);

/// How an incarnation ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The graceful stop of `hongbao serve` (flows drained, views caught up, log closed).
    Graceful,
    /// Dropped where it stands.
    Crash,
    /// `calls` are sent while the journal holds an applied batch before its flush; then the
    /// crash.
    CrashBeforeFlush,
    /// The journal's next flush fails (a failing disk: the journal fails stop); `calls` are
    /// sent into it, then the crash.
    FlushFailsThenCrash,
}

enum Msg {
    Call(Call, std_mpsc::Sender<Answer>),
    End(Ending, Vec<Call>, std_mpsc::Sender<Ended>),
}

/// The answers of the calls sent at the end, or why the end failed (a graceful stop that
/// could not close the log).
type Ended = Result<Vec<Option<Answer>>, String>;

/// What an incarnation found when it opened the directory.
pub struct Opened {
    pub report: AuditReport,
    pub head: u64,
}

/// A running incarnation.
pub struct Incarnation {
    tx: mpsc::UnboundedSender<Msg>,
    /// Disconnected when the engine thread has returned (everything of it dropped).
    exited: Option<std_mpsc::Receiver<()>>,
}

/// Longest wait for one answer, or for an incarnation to end: a hung engine fails the run
/// (printing its plan) instead of hanging it.
const ANSWER_WAIT: Duration = Duration::from_secs(60);
/// How long an opening waits for the previous incarnation's threads to let go of the
/// directory's lock (sled's own wait is shorter than a loaded machine may need).
const REOPEN_WAIT: Duration = Duration::from_secs(20);

impl Incarnation {
    /// Opens the engine on `config.data_dir` (creating it on first use), audits what it finds,
    /// and starts serving calls.
    pub fn open(config: Config, clock: Arc<dyn Clock>) -> Result<(Incarnation, Opened), String> {
        let (tx, rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = std_mpsc::channel();
        let (exit_tx, exited) = std_mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("hongbao-simulated".into())
            .spawn(move || {
                run(config, clock, rx, ready_tx);
                drop(exit_tx);
            })
            .map_err(|e| format!("cannot start the engine thread: {e}"))?;
        let incarnation = Incarnation {
            tx,
            exited: Some(exited),
        };
        match ready_rx.recv() {
            Ok(Ok(opened)) => Ok((incarnation, opened)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err("the engine thread died while opening".into()),
        }
    }

    /// Sends one call; `None` when the engine died before answering.
    pub fn call(&self, call: Call) -> Option<Answer> {
        self.call_all(vec![call]).pop().flatten()
    }

    /// Sends calls at once (concurrently in the engine); their answers in order, `None` for
    /// each that got none.
    pub fn call_all(&self, calls: Vec<Call>) -> Vec<Option<Answer>> {
        let receivers: Vec<_> = calls
            .into_iter()
            .map(|call| {
                let (tx, rx) = std_mpsc::channel();
                let _ = self.tx.send(Msg::Call(call, tx));
                rx
            })
            .collect();
        receivers
            .into_iter()
            .map(|rx| rx.recv_timeout(ANSWER_WAIT).ok())
            .collect()
    }

    /// Ends the incarnation; `calls` are sent first for the endings that take them (their
    /// answers, those that came before the end, are returned). Waits until the engine thread
    /// has returned: its system, tasks and stores dropped.
    pub fn end(mut self, ending: Ending, calls: Vec<Call>) -> Result<Vec<Option<Answer>>, String> {
        let (tx, rx) = std_mpsc::channel();
        let sent = self.tx.send(Msg::End(ending, calls, tx)).is_ok();
        let ended = match rx.recv_timeout(ANSWER_WAIT) {
            Ok(ended) => ended,
            Err(_) if sent => Err(format!("the engine did not answer its {ending:?} end")),
            Err(_) => Err("the engine had already stopped".into()),
        };
        self.wait_exited()?;
        ended
    }

    fn wait_exited(&mut self) -> Result<(), String> {
        match self.exited.take() {
            Some(exited) => match exited.recv_timeout(ANSWER_WAIT) {
                Err(std_mpsc::RecvTimeoutError::Timeout) => Err(format!(
                    "the engine thread did not stop within {} s",
                    ANSWER_WAIT.as_secs()
                )),
                _ => Ok(()),
            },
            None => Ok(()),
        }
    }
}

impl Drop for Incarnation {
    fn drop(&mut self) {
        if self.exited.is_some() {
            let (tx, _rx) = std_mpsc::channel();
            let _ = self.tx.send(Msg::End(Ending::Crash, Vec::new(), tx));
            let _ = self.wait_exited();
        }
    }
}

/// The engine thread: opens, proves, serves until told to end.
fn run(
    config: Config,
    clock: Arc<dyn Clock>,
    mut rx: mpsc::UnboundedReceiver<Msg>,
    ready: std_mpsc::Sender<Result<Opened, String>>,
) {
    let system = actix_rt::System::new();
    let metrics = Arc::new(Metrics::new());
    let data_dir: PathBuf = config.data_dir.clone();
    let deadline = std::time::Instant::now() + REOPEN_WAIT;
    let store = loop {
        match SledStore::open(&data_dir, config.journal(), clock.clone(), metrics.clone()) {
            Ok(store) => break store,
            // The previous incarnation's last threads may still hold the lock a moment.
            Err(crate::events::StoreError::Locked(_)) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => {
                let _ = ready.send(Err(format!("cannot open the log: {e}")));
                return;
            }
        }
    };
    let opened = match prove(&store, &data_dir, clock.clone()) {
        Ok(opened) => opened,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    // Held across the system's end, so that the batch it holds stays unflushed until every
    // task of the incarnation is gone.
    let mut hold: Option<FlushHold> = None;
    let served = system.block_on(async {
        let keys = crate::config::Keys::resolve(&config.auth, &data_dir, |_| None)
            .map_err(|e| e.to_string())?
            .0;
        let log: Arc<dyn crate::events::Log> = store.clone();
        let state = web::Data::new(
            AppState::build(config.clone(), keys, log, clock, metrics.clone(), None)
                .await
                .map_err(|e| format!("cannot build the engine: {e:#}"))?,
        );
        let (app_state, app_metrics) = (state.clone(), web::Data::from(metrics.clone()));
        let body_max = config.server.request_body_bytes_max;
        let service = Rc::new(
            test::init_service(App::new().configure(move |cfg| {
                crate::http::extractors(cfg, body_max);
                crate::http::configure_node(cfg, app_state.clone(), app_metrics.clone());
            }))
            .await,
        );
        let _ = ready.send(Ok(opened));
        let keys = state.keys.clone();
        while let Some(msg) = rx.recv().await {
            match msg {
                Msg::Call(call, reply) => {
                    let answer = spawn_calls(&service, &keys, vec![call]);
                    actix_rt::spawn(async move {
                        for rx in answer {
                            if let Ok(answer) = rx.await {
                                let _ = reply.send(answer);
                            }
                        }
                    });
                }
                Msg::End(ending, calls, reply) => {
                    match ending {
                        Ending::Graceful => {
                            let stopped = state.stop().await;
                            let _ = reply.send(
                                stopped
                                    .map(|()| Vec::new())
                                    .map_err(|e| format!("the graceful stop failed: {e}")),
                            );
                            return Ok::<(), String>(());
                        }
                        Ending::Crash => {
                            let _ = reply.send(Ok(Vec::new()));
                        }
                        Ending::CrashBeforeFlush => {
                            let held = store.hold_next_flush();
                            let answers = spawn_calls(&service, &keys, calls);
                            // Until the writer holds an applied batch (none may come: every
                            // call may have been refused before writing).
                            for _ in 0..200 {
                                if held.wait_reached(Duration::ZERO) {
                                    break;
                                }
                                tokio::time::sleep(Duration::from_millis(5)).await;
                            }
                            hold = Some(held);
                            let _ = reply.send(Ok(collect(answers).await));
                        }
                        Ending::FlushFailsThenCrash => {
                            store.fail_next_flush();
                            let answers = spawn_calls(&service, &keys, calls);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            let _ = reply.send(Ok(collect(answers).await));
                        }
                    }
                    return Ok(());
                }
            }
        }
        Ok(())
    });
    // Only a failure before serving reaches here with an error: the opening reports it.
    if let Err(e) = served {
        let _ = ready.send(Err(e));
    }
    // Stops the arbiters of the flows (the system's controller does), then drops every task.
    actix_rt::System::current().stop();
    system.run().ok();
    drop(store);
    drop(hold);
}

/// Proves the directory as found: the audit over the whole log (with the channels'
/// statements), then every view against a rebuild up to its checkpoint.
fn prove(
    store: &SledStore,
    data_dir: &std::path::Path,
    clock: Arc<dyn Clock>,
) -> Result<Opened, String> {
    let channels = if data_dir.join("channels").exists() {
        Some(
            crate::channels::SimulatedChannels::open(data_dir, clock)
                .map_err(|e| format!("cannot open the channels: {e}"))?,
        )
    } else {
        None
    };
    let mut report = crate::audit::audit(store, channels.as_deref(), |_, _| {})
        .map_err(|e| format!("audit: {e}"))?;
    drop(channels);
    let views = views_check(
        store,
        &crate::projections::all(Arc::new(Metrics::new())),
        |_, _| {},
    )
    .map_err(|e| format!("views check: {e}"))?;
    report.checks.push(views);
    Ok(Opened {
        report,
        head: store.head(),
    })
}

fn request(call: &Call, keys: &crate::config::Keys) -> Request {
    let key = match call.role {
        Role::Admin => &keys.admin,
        Role::Issuer => &keys.issuer,
        Role::Gateway => &keys.gateway,
    };
    let mut request = test::TestRequest::default()
        .method(call.method.clone())
        .uri(&call.path)
        .insert_header(("authorization", format!("Bearer {key}")));
    if let Some(body) = &call.body {
        request = request.set_json(body);
    }
    request.to_request()
}

/// Sends `calls` at once; a receiver for each answer.
fn spawn_calls<S>(
    service: &Rc<S>,
    keys: &crate::config::Keys,
    calls: Vec<Call>,
) -> Vec<oneshot::Receiver<Answer>>
where
    S: Service<Request, Response = ServiceResponse, Error = actix_web::Error> + 'static,
{
    calls
        .into_iter()
        .map(|call| {
            let (tx, rx) = oneshot::channel();
            let (service, request) = (service.clone(), request(&call, keys));
            actix_rt::spawn(async move {
                let _ = tx.send(send(service.as_ref(), request).await);
            });
            rx
        })
        .collect()
}

/// The answers that come within a moment; `None` for each still waiting (on the held flush).
async fn collect(answers: Vec<oneshot::Receiver<Answer>>) -> Vec<Option<Answer>> {
    let mut out = Vec::with_capacity(answers.len());
    for rx in answers {
        out.push(
            tokio::time::timeout(Duration::from_millis(200), rx)
                .await
                .ok()
                .and_then(Result::ok),
        );
    }
    out
}

async fn send<S>(service: &S, request: Request) -> Answer
where
    S: Service<Request, Response = ServiceResponse, Error = actix_web::Error>,
{
    match service.call(request).await {
        Ok(response) => {
            let status = response.status().as_u16();
            let bytes = test::read_body(response).await;
            let body = serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
            (status, body)
        }
        Err(e) => {
            let response = e.error_response();
            (response.status().as_u16(), Value::String(e.to_string()))
        }
    }
}
