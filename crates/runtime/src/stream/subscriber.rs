//! The subscriber half of the desired-state stream.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use membrane_proto::stream::v1 as pb;
use pb::desired_state_client::DesiredStateClient;
use prost_types::Any;
use tokio::sync::{mpsc, watch};

use crate::grpc::GrpcChannel;

/// What a node does with desired state. Level-triggered: it is always handed
/// the whole desired state, plus the keys that changed since the last call.
pub trait StateSink: Send + 'static {
    /// Makes the node match `state`. An error is reported to the service as
    /// a NACK and the same state is retried later.
    fn apply(
        &mut self,
        version: u64,
        state: &BTreeMap<String, Any>,
        changed: &[String],
    ) -> impl Future<Output = Result<(), String>> + Send;
}

/// What a subscriber reports about itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubscriberState {
    /// Whether the stream is open and the first snapshot arrived.
    pub connected: bool,
    /// Newest version the sink applied.
    pub applied_version: u64,
    /// Newest version received.
    pub received_version: u64,
    /// Last error (connection or apply), if any.
    pub last_error: Option<String>,
}

/// Subscribes one node to one service's desired-state stream.
#[derive(Debug)]
pub struct Subscriber {
    node: String,
    service: String,
    channel: GrpcChannel,
    state_tx: watch::Sender<SubscriberState>,
}

/// How often a refused state is retried.
const RETRY_APPLY: Duration = Duration::from_secs(2);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

impl Subscriber {
    /// A subscriber for `node` to `service` (a name for logs) over `channel`.
    pub fn new(node: impl Into<String>, service: impl Into<String>, channel: GrpcChannel) -> Self {
        let (state_tx, _) = watch::channel(SubscriberState::default());
        Self {
            node: node.into(),
            service: service.into(),
            channel,
            state_tx,
        }
    }

    /// Watches this subscriber's state.
    pub fn state(&self) -> watch::Receiver<SubscriberState> {
        self.state_tx.subscribe()
    }

    /// Runs until `shutdown` resolves: subscribes, applies, reconnects.
    pub async fn run<S: StateSink>(self, mut sink: S, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut desired: BTreeMap<String, Any> = BTreeMap::new();
        let mut applied = 0u64;
        let mut received = 0u64;
        let mut backoff = Duration::from_millis(100);
        loop {
            let session = self.session(&mut sink, &mut desired, &mut applied, &mut received);
            let result = tokio::select! {
                r = session => r,
                _ = &mut shutdown => return,
            };
            let err = match result {
                Ok(()) => "stream ended".to_string(),
                Err(e) => e,
            };
            tracing::warn!(service = %self.service, node = %self.node, error = %err, "desired-state stream lost; keeping current state");
            self.state_tx.send_modify(|s| {
                s.connected = false;
                s.last_error = Some(err);
            });
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {},
                _ = &mut shutdown => return,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// One stream from hello to its end. `desired` survives across sessions:
    /// it is only replaced when a new snapshot has fully arrived.
    async fn session<S: StateSink>(
        &self,
        sink: &mut S,
        desired: &mut BTreeMap<String, Any>,
        applied: &mut u64,
        received: &mut u64,
    ) -> Result<(), String> {
        let (tx, rx) = mpsc::channel(16);
        let hello = pb::SubscribeRequest {
            kind: Some(pb::subscribe_request::Kind::Hello(pb::Hello {
                node: self.node.clone(),
                last_applied_version: *applied,
            })),
        };
        tx.send(hello).await.map_err(|_| "request stream closed")?;
        let mut client = DesiredStateClient::new(self.channel.clone());
        let mut inbound = client
            .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map_err(|s| format!("subscribe to {}: {}", self.service, s.message()))?
            .into_inner();

        let mut staging: Option<BTreeMap<String, Any>> = None;
        let mut pending_retry = false;
        loop {
            let msg = tokio::select! {
                m = inbound.message() => m.map_err(|s| format!("stream from {}: {}", self.service, s.message()))?,
                _ = tokio::time::sleep(RETRY_APPLY), if pending_retry => {
                    pending_retry = !self.apply(sink, desired, *received, &[], applied, &tx).await?;
                    continue;
                }
            };
            let Some(update) = msg else { return Ok(()) };
            let changed: Vec<String>;
            if update.snapshot {
                if update.version < *received && !desired.is_empty() && staging.is_none() {
                    // A replica whose store lags behind: still take it, the service is the authority.
                    tracing::info!(service = %self.service, version = update.version, previous = *received, "snapshot older than current state");
                }
                let stage = staging.get_or_insert_with(BTreeMap::new);
                for r in update.upserts {
                    if let Some(v) = r.value {
                        stage.insert(r.key, v);
                    }
                }
                if !update.snapshot_end {
                    continue;
                }
                let Some(new) = staging.take() else { continue };
                changed = diff_keys(desired, &new);
                *desired = new;
            } else {
                if staging.is_some() {
                    return Err("update inside an unfinished snapshot".into());
                }
                if update.version <= *received {
                    nack(
                        &tx,
                        update.version,
                        format!("version {} is not newer than {}", update.version, *received),
                    )
                    .await?;
                    continue;
                }
                let mut keys = Vec::new();
                for key in update.removals {
                    desired.remove(&key);
                    keys.push(key);
                }
                for r in update.upserts {
                    match r.value {
                        Some(v) => {
                            desired.insert(r.key.clone(), v);
                            keys.push(r.key);
                        }
                        None => {
                            nack(
                                &tx,
                                update.version,
                                format!("resource `{}` has no value", r.key),
                            )
                            .await?;
                        }
                    }
                }
                changed = keys;
            }
            *received = update.version;
            self.state_tx.send_modify(|s| {
                s.connected = true;
                s.received_version = update.version;
            });
            pending_retry = !self
                .apply(sink, desired, update.version, &changed, applied, &tx)
                .await?;
        }
    }

    /// Applies and ACKs/NACKs. Returns whether the apply succeeded.
    async fn apply<S: StateSink>(
        &self,
        sink: &mut S,
        desired: &BTreeMap<String, Any>,
        version: u64,
        changed: &[String],
        applied: &mut u64,
        tx: &mpsc::Sender<pb::SubscribeRequest>,
    ) -> Result<bool, String> {
        match sink.apply(version, desired, changed).await {
            Ok(()) => {
                *applied = version;
                self.state_tx.send_modify(|s| {
                    s.applied_version = version;
                    s.last_error = None;
                });
                let ack = pb::SubscribeRequest {
                    kind: Some(pb::subscribe_request::Kind::Ack(pb::Ack { version })),
                };
                tx.send(ack).await.map_err(|_| "request stream closed")?;
                Ok(true)
            }
            Err(reason) => {
                tracing::warn!(service = %self.service, version, reason = %reason, "could not apply desired state");
                self.state_tx
                    .send_modify(|s| s.last_error = Some(reason.clone()));
                nack(tx, version, reason).await?;
                Ok(false)
            }
        }
    }
}

async fn nack(
    tx: &mpsc::Sender<pb::SubscribeRequest>,
    version: u64,
    reason: String,
) -> Result<(), String> {
    let msg = pb::SubscribeRequest {
        kind: Some(pb::subscribe_request::Kind::Nack(pb::Nack {
            version,
            reason,
        })),
    };
    tx.send(msg)
        .await
        .map_err(|_| "request stream closed".to_string())
}

/// Keys that differ between two states.
fn diff_keys(old: &BTreeMap<String, Any>, new: &BTreeMap<String, Any>) -> Vec<String> {
    let removed = old.keys().filter(|k| !new.contains_key(*k));
    let changed = new
        .iter()
        .filter(|(k, v)| old.get(*k) != Some(v))
        .map(|(k, _)| k);
    removed.chain(changed).cloned().collect()
}
