//! Requests for a partition's entities, sent to its holder over NATS request-reply.
//!
//! Only the holder of a partition listens on its subject (`hb.rpc.p007`), in the queue group
//! `hb` (so that during the moment two nodes might both listen, a request is still answered
//! once). It starts listening when it has opened the partition and stops, waiting for the
//! requests it is answering, before its lease is released. A request nobody listens for fails
//! at once with [`RouteError::NoOwner`] (NATS answers "no responders"), which the HTTP layer
//! answers 503 with `Retry-After`: the client retries with the same business id, which is
//! safe, and the partition's next holder answers it with the original outcome.

use super::partition::Partition;
use futures::future::BoxFuture;
use futures::StreamExt;
use std::sync::Arc;
use std::time::Duration;

/// The queue group every holder listens in.
pub const QUEUE_GROUP: &str = "hb";

/// Why a routed request has no answer.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("no node serves {0} right now (a hand-over is under way)")]
    NoOwner(Partition),
    #[error("{0}: no answer within {1:?}")]
    Timeout(Partition, Duration),
    #[error("NATS: {0}")]
    Unreachable(String),
}

/// What answers a partition's requests on its holder.
pub type Handler = Arc<dyn Fn(Vec<u8>) -> BoxFuture<'static, Vec<u8>> + Send + Sync>;

/// Sends requests to partitions' holders, and listens for the partitions this node holds.
#[derive(Clone)]
pub struct Router {
    client: async_nats::Client,
    timeout: Duration,
}

impl Router {
    pub fn new(client: async_nats::Client, timeout: Duration) -> Router {
        Router { client, timeout }
    }

    /// Sends `request` to the holder of `partition`'s lease taken at `epoch` and returns its
    /// answer.
    pub async fn request(
        &self,
        partition: Partition,
        epoch: u64,
        request: Vec<u8>,
    ) -> Result<Vec<u8>, RouteError> {
        use async_nats::client::RequestErrorKind;
        let sent = self
            .client
            .send_request(
                partition.rpc_subject(epoch),
                async_nats::Request::new()
                    .payload(request.into())
                    .timeout(Some(self.timeout)),
            )
            .await;
        match sent {
            Ok(reply) => Ok(reply.payload.to_vec()),
            Err(e) => Err(match e.kind() {
                RequestErrorKind::NoResponders => RouteError::NoOwner(partition),
                RequestErrorKind::TimedOut => RouteError::Timeout(partition, self.timeout),
                _ => RouteError::Unreachable(e.to_string()),
            }),
        }
    }

    /// Publishes to a fresh inbox of this connection and waits for the message to come back.
    async fn round_trip(&self) -> Result<(), RouteError> {
        let unreachable = |e: &dyn std::fmt::Display| RouteError::Unreachable(e.to_string());
        let inbox = self.client.new_inbox();
        let mut probe = self
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| unreachable(&e))?;
        self.client
            .publish(inbox, Vec::new().into())
            .await
            .map_err(|e| unreachable(&e))?;
        match tokio::time::timeout(self.timeout, probe.next()).await {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err(RouteError::Unreachable("connection closed".into())),
            Err(_) => Err(RouteError::Unreachable(format!(
                "the server did not answer within {:?}",
                self.timeout
            ))),
        }
    }

    /// Starts answering `partition`'s requests with `handler`, each in a task of its own.
    /// The server has the subscription before this returns.
    pub async fn serve(
        &self,
        partition: Partition,
        epoch: u64,
        handler: Handler,
    ) -> Result<Serving, RouteError> {
        let mut subscriber = self
            .client
            .queue_subscribe(partition.rpc_subject(epoch), QUEUE_GROUP.into())
            .await
            .map_err(|e| RouteError::Unreachable(e.to_string()))?;
        // The server has the interest before the holder says it serves: it handles one
        // connection's commands in order, so once a message this connection publishes after
        // the subscription comes back, the subscription is in place (a flush only empties
        // the client's buffer: a request sent from another connection right after it could
        // still meet "no responders").
        self.round_trip().await?;
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let client = self.client.clone();
        let task = tokio::spawn(async move {
            let mut answering = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    message = subscriber.next() => {
                        let Some(message) = message else { break };
                        let Some(reply) = message.reply.clone() else { continue };
                        let (client, handler) = (client.clone(), handler.clone());
                        answering.spawn(async move {
                            let answer = handler(message.payload.to_vec()).await;
                            if let Err(e) = client.publish(reply, answer.into()).await {
                                tracing::warn!(error = %e, "routed request's answer not sent");
                            }
                        });
                    }
                    Some(_) = answering.join_next(), if !answering.is_empty() => {}
                }
            }
            if let Err(e) = subscriber.unsubscribe().await {
                tracing::warn!(%partition, error = %e, "request subject not unsubscribed");
            }
            while answering.join_next().await.is_some() {}
            let _ = client.flush().await;
        });
        Ok(Serving {
            stop: Some(stop),
            task: Some(task),
        })
    }
}

/// A partition's requests being answered on this node.
pub struct Serving {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Serving {
    /// Stops listening and waits until every request taken has been answered.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
