//! The subscriber half of the desired-state stream.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::time::Duration;

use futures::FutureExt as _;
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

/// At most this many stream messages are folded into one apply.
const MAX_BATCH: usize = 4096;

/// Messages folded into one apply.
#[derive(Debug, Default)]
struct Batch {
    /// Keys changed since the last apply.
    changed: BTreeSet<String>,
    /// Whether `desired` moved to a new complete version (an update, or a
    /// snapshot's last chunk), so there is something to apply.
    complete: bool,
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
            // Fold this message and every one already received behind it
            // into one apply (and one ACK, of the newest version): a node
            // that falls behind catches up in a few applies instead of
            // queueing one apply per published version.
            let mut batch = Batch::default();
            self.fold(update, desired, &mut staging, received, &mut batch, &tx)
                .await?;
            let mut ended = false;
            for _ in 1..MAX_BATCH {
                match inbound.message().now_or_never() {
                    None => break,
                    Some(Ok(Some(update))) => {
                        self.fold(update, desired, &mut staging, received, &mut batch, &tx)
                            .await?;
                    }
                    Some(Ok(None)) => {
                        ended = true;
                        break;
                    }
                    Some(Err(s)) => {
                        // Apply what arrived intact before reporting the error.
                        if batch.complete {
                            self.apply_batch(sink, desired, *received, batch, applied, &tx)
                                .await?;
                        }
                        return Err(format!("stream from {}: {}", self.service, s.message()));
                    }
                }
            }
            if batch.complete {
                pending_retry = !self
                    .apply_batch(sink, desired, *received, batch, applied, &tx)
                    .await?;
            }
            if ended {
                return Ok(());
            }
        }
    }

    /// Folds one message into `desired` (or the staged snapshot), adding the
    /// keys it changed to `batch`. `desired` is only ever complete: a
    /// snapshot replaces it once its last chunk has arrived.
    async fn fold(
        &self,
        update: pb::StateUpdate,
        desired: &mut BTreeMap<String, Any>,
        staging: &mut Option<BTreeMap<String, Any>>,
        received: &mut u64,
        batch: &mut Batch,
        tx: &mpsc::Sender<pb::SubscribeRequest>,
    ) -> Result<(), String> {
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
                return Ok(());
            }
            let Some(new) = staging.take() else {
                return Ok(());
            };
            batch.changed.extend(diff_keys(desired, &new));
            *desired = new;
        } else {
            if staging.is_some() {
                return Err("update inside an unfinished snapshot".into());
            }
            if update.version <= *received {
                return nack(
                    tx,
                    update.version,
                    format!("version {} is not newer than {}", update.version, *received),
                )
                .await;
            }
            for key in update.removals {
                desired.remove(&key);
                batch.changed.insert(key);
            }
            for r in update.upserts {
                match r.value {
                    Some(v) => {
                        desired.insert(r.key.clone(), v);
                        batch.changed.insert(r.key);
                    }
                    None => {
                        nack(
                            tx,
                            update.version,
                            format!("resource `{}` has no value", r.key),
                        )
                        .await?;
                    }
                }
            }
        }
        *received = update.version;
        batch.complete = true;
        Ok(())
    }

    /// Reports the batch as received, then applies it as `version`.
    async fn apply_batch<S: StateSink>(
        &self,
        sink: &mut S,
        desired: &BTreeMap<String, Any>,
        version: u64,
        batch: Batch,
        applied: &mut u64,
        tx: &mpsc::Sender<pb::SubscribeRequest>,
    ) -> Result<bool, String> {
        self.state_tx.send_modify(|s| {
            s.connected = true;
            s.received_version = version;
        });
        let changed: Vec<String> = batch.changed.into_iter().collect();
        self.apply(sink, desired, version, &changed, applied, tx)
            .await
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

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::stream::{Change, Publisher, Scope};

    /// One apply: (version, state, changed).
    type Applied = (u64, BTreeMap<String, Any>, Vec<String>);

    /// A slow sink that records each apply.
    #[derive(Clone, Default)]
    struct Slow {
        applied: Arc<Mutex<Vec<Applied>>>,
    }

    impl StateSink for Slow {
        async fn apply(
            &mut self,
            version: u64,
            state: &BTreeMap<String, Any>,
            changed: &[String],
        ) -> Result<(), String> {
            tokio::time::sleep(Duration::from_millis(20)).await;
            self.applied
                .lock()
                .expect("lock")
                .push((version, state.clone(), changed.to_vec()));
            Ok(())
        }
    }

    fn any(v: u64) -> Any {
        Any {
            type_url: "test/v".into(),
            value: v.to_be_bytes().to_vec(),
        }
    }

    #[tokio::test]
    async fn a_node_that_falls_behind_applies_what_it_received_at_once_and_acks_the_newest() {
        let publisher = Publisher::new();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let routes = tonic::service::Routes::new(publisher.service());
        tokio::spawn(crate::grpc::serve(
            listener,
            routes,
            &[],
            None,
            std::future::pending(),
        ));
        let sink = Slow::default();
        let channel = crate::grpc::connect_lazy(&url, "", None).expect("channel");
        let sub = Subscriber::new("node-1", "test", channel);
        let mut state = sub.state();
        tokio::spawn(sub.run(sink.clone(), std::future::pending()));
        tokio::time::timeout(Duration::from_secs(10), state.wait_for(|s| s.connected))
            .await
            .expect("connected")
            .expect("state");

        // 300 versions, far faster than the sink's 20 ms per apply; some
        // keys change again, one is removed, one is only for another node.
        for v in 2..=301u64 {
            let mut changes = vec![Change::Upsert {
                key: format!("k/{}", v % 100),
                scope: Scope::All,
                value: any(v),
            }];
            if v == 150 {
                changes.push(Change::Remove { key: "k/7".into() });
            }
            if v == 301 {
                changes = vec![Change::Upsert {
                    key: "other".into(),
                    scope: Scope::Node("node-2".into()),
                    value: any(v),
                }];
            }
            publisher.apply(v, changes);
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        let want: BTreeMap<String, Any> = (202..=300u64)
            .map(|v| (format!("k/{}", v % 100), any(v)))
            .chain([("k/1".to_string(), any(201))])
            .collect();
        tokio::time::timeout(
            Duration::from_secs(20),
            state.wait_for(|s| s.applied_version == 300),
        )
        .await
        .expect("caught up")
        .expect("state");
        let applied = sink.applied.lock().expect("lock").clone();
        let (last_version, last_state, _) = applied.last().expect("applied");
        assert_eq!((*last_version, last_state), (300, &want));
        assert!(
            applied.len() < 100,
            "{} applies for 300 versions: updates were not batched",
            applied.len()
        );
        // Versions only grow, and every changed key is named in some apply.
        assert!(applied.windows(2).all(|w| w[0].0 < w[1].0));
        let named: BTreeSet<&String> = applied.iter().flat_map(|(_, _, c)| c).collect();
        assert!(want.keys().all(|k| named.contains(k)));
        // The publisher saw the newest version acknowledged.
        for _ in 0..200 {
            if publisher.deliveries()["node-1"].acked_version == 300 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("ack of 300 not recorded: {:?}", publisher.deliveries());
    }
}
