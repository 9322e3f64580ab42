//! Contract tests of the desired-state stream over loopback gRPC: a real
//! publisher served by tonic, real subscribers.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use membrane_proto::stream::v1 as pb;
use membrane_runtime::grpc;
use membrane_runtime::stream::{Change, Publisher, Scope, StateSink, Subscriber};
use prost_types::Any;

fn any(v: &str) -> Any {
    Any {
        type_url: "test/v".into(),
        value: v.as_bytes().to_vec(),
    }
}

fn upsert(key: &str, scope: Scope, v: &str) -> Change {
    Change::Upsert {
        key: key.into(),
        scope,
        value: any(v),
    }
}

/// Every (version, state) a sink was asked to apply.
type Applied = Arc<Mutex<Vec<(u64, BTreeMap<String, Any>)>>>;

/// Records every state it was asked to apply; can be told to refuse.
#[derive(Clone, Default)]
struct Recorder {
    applied: Applied,
    refuse: Arc<Mutex<Option<String>>>,
}

impl Recorder {
    fn last(&self) -> Option<(u64, Vec<String>)> {
        let a = self.applied.lock().expect("lock");
        a.last().map(|(v, s)| (*v, s.keys().cloned().collect()))
    }
}

impl StateSink for Recorder {
    async fn apply(
        &mut self,
        version: u64,
        state: &BTreeMap<String, Any>,
        _changed: &[String],
    ) -> Result<(), String> {
        if let Some(r) = self.refuse.lock().expect("lock").clone() {
            return Err(r);
        }
        self.applied
            .lock()
            .expect("lock")
            .push((version, state.clone()));
        Ok(())
    }
}

/// A publisher served on its own runtime, so that stopping it kills every
/// connection and stream task at once, like a service process dying.
struct Served {
    url: String,
    runtime: Option<tokio::runtime::Runtime>,
}

async fn serve(publisher: &Publisher) -> Served {
    serve_on(publisher, "127.0.0.1:0").await
}

async fn serve_on(publisher: &Publisher, addr: &str) -> Served {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let std_listener = std::net::TcpListener::bind(addr).expect("bind");
    std_listener.set_nonblocking(true).expect("nonblocking");
    let url = format!("http://{}", std_listener.local_addr().expect("addr"));
    let routes = tonic::service::Routes::new(publisher.service());
    runtime.spawn(async move {
        let listener = tokio::net::TcpListener::from_std(std_listener).expect("listener");
        grpc::serve(listener, routes, &[], None, std::future::pending()).await
    });
    Served {
        url,
        runtime: Some(runtime),
    }
}

impl Served {
    async fn stop(mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

async fn eventually<F: FnMut() -> bool>(what: &str, mut f: F) {
    for _ in 0..200 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for: {what}");
}

fn start_subscriber(node: &str, url: &str, sink: Recorder) -> tokio::task::JoinHandle<()> {
    let channel = grpc::connect_lazy(url, "", None).expect("channel");
    let sub = Subscriber::new(node, "test", channel);
    tokio::spawn(sub.run(sink, std::future::pending()))
}

#[tokio::test]
async fn a_node_gets_a_snapshot_then_updates_and_sees_only_its_scope() {
    let publisher = Publisher::new();
    publisher.apply(
        5,
        vec![
            upsert("all/a", Scope::All, "1"),
            upsert("n1/x", Scope::Node("node-1".into()), "2"),
            upsert("n2/y", Scope::Node("node-2".into()), "3"),
        ],
    );
    let served = serve(&publisher).await;
    let rec = Recorder::default();
    let sub = start_subscriber("node-1", &served.url, rec.clone());
    eventually("snapshot applied", || {
        rec.last() == Some((5, vec!["all/a".into(), "n1/x".into()]))
    })
    .await;

    publisher.apply(6, vec![upsert("n2/z", Scope::Node("node-2".into()), "4")]);
    publisher.apply(
        7,
        vec![
            Change::Remove { key: "n1/x".into() },
            upsert("all/b", Scope::All, "5"),
        ],
    );
    eventually("update applied", || {
        rec.last() == Some((7, vec!["all/a".into(), "all/b".into()]))
    })
    .await;
    // Version 6 held nothing for node-1, so it was never sent to it.
    assert!(
        rec.applied
            .lock()
            .expect("lock")
            .iter()
            .all(|(v, _)| *v != 6)
    );

    eventually("ack recorded", || {
        publisher
            .deliveries()
            .get("node-1")
            .map(|d| d.acked_version)
            == Some(7)
    })
    .await;
    sub.abort();
    served.stop().await;
}

#[tokio::test]
async fn stale_versions_are_ignored_and_versions_only_grow() {
    let publisher = Publisher::new();
    publisher.apply(10, vec![upsert("k", Scope::All, "new")]);
    publisher.apply(9, vec![upsert("k", Scope::All, "old")]);
    assert_eq!(publisher.version(), 10);
    // A re-list at an older revision that differs still moves forward.
    publisher.replace_all(3, vec![("k".into(), Scope::All, any("relisted"))]);
    assert_eq!(publisher.version(), 11);
    // A re-list with nothing new publishes nothing, and leaves the version.
    publisher.replace_all(12, vec![("k".into(), Scope::All, any("relisted"))]);
    assert_eq!(publisher.version(), 11);
    // Nor does an update that repeats the current value.
    publisher.apply(13, vec![upsert("k", Scope::All, "relisted")]);
    assert_eq!(publisher.version(), 11);
    assert_eq!(publisher.len(), 1);
}

#[tokio::test]
async fn a_refused_update_is_nacked_with_its_reason_and_retried() {
    let publisher = Publisher::new();
    publisher.apply(1, vec![upsert("a", Scope::All, "1")]);
    let served = serve(&publisher).await;
    let rec = Recorder::default();
    *rec.refuse.lock().expect("lock") = Some("map full".into());
    let sub = start_subscriber("node-1", &served.url, rec.clone());
    eventually("nack recorded", || {
        publisher
            .deliveries()
            .get("node-1")
            .map(|d| (d.nacked_version, d.nack_reason.clone()))
            == Some((1, "map full".into()))
    })
    .await;
    assert_eq!(publisher.deliveries()["node-1"].acked_version, 0);
    *rec.refuse.lock().expect("lock") = None;
    eventually("retried and acked", || {
        publisher.deliveries()["node-1"].acked_version == 1
    })
    .await;
    sub.abort();
    served.stop().await;
}

#[tokio::test]
async fn a_reconnect_keeps_the_state_until_the_new_snapshot_is_complete() {
    let publisher = Publisher::new();
    let big: Vec<Change> = (0..2000)
        .map(|i| upsert(&format!("r/{i:05}"), Scope::All, "v"))
        .collect();
    publisher.apply(1, big);
    let served = serve(&publisher).await;
    let addr = served.url.trim_start_matches("http://").to_string();
    let rec = Recorder::default();
    let sub = start_subscriber("node-1", &served.url, rec.clone());
    eventually("first snapshot", || {
        rec.last().map(|(_, k)| k.len()) == Some(2000)
    })
    .await;
    assert_eq!(
        rec.applied.lock().expect("lock").len(),
        1,
        "a multi-message snapshot is applied once, whole"
    );

    // The service goes away; the node keeps its state and nothing is applied.
    served.stop().await;
    publisher.apply(
        2,
        vec![Change::Remove {
            key: "r/00000".into(),
        }],
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rec.applied.lock().expect("lock").len(), 1);

    // It comes back on the same address: one whole new snapshot is applied.
    let served = serve_on(&publisher, &addr).await;
    eventually("second snapshot", || {
        rec.last().map(|(v, k)| (v, k.len())) == Some((2, 1999))
    })
    .await;
    assert!(
        rec.applied
            .lock()
            .expect("lock")
            .iter()
            .all(|(_, s)| s.len() >= 1999),
        "never a partial state"
    );
    sub.abort();
    served.stop().await;
}

#[tokio::test]
async fn garbage_on_the_stream_is_refused_with_a_clear_error() {
    let publisher = Publisher::new();
    let served = serve(&publisher).await;
    let channel = grpc::connect(&served.url, "", None).await.expect("connect");
    let mut client = pb::desired_state_client::DesiredStateClient::new(channel);

    // An ACK before any HELLO.
    let msgs = vec![pb::SubscribeRequest {
        kind: Some(pb::subscribe_request::Kind::Ack(pb::Ack { version: 3 })),
    }];
    let err = client
        .subscribe(tokio_stream::iter(msgs))
        .await
        .expect_err("must refuse");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("first message must be `hello`"),
        "{}",
        err.message()
    );

    // A HELLO without a node name.
    let msgs = vec![pb::SubscribeRequest {
        kind: Some(pb::subscribe_request::Kind::Hello(pb::Hello::default())),
    }];
    let err = client
        .subscribe(tokio_stream::iter(msgs))
        .await
        .expect_err("must refuse");
    assert!(err.message().contains("hello.node"), "{}", err.message());
    assert!(publisher.deliveries().is_empty(), "no node was recorded");
    served.stop().await;
}
