//! Policy against a real etcd, through real `membrane-policy` processes fed
//! by a real `membrane-identity` process (or, when its binary has not been
//! built, by a stand-in serving the real stream publisher over loopback).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use membrane_proto::identity::v1 as idpb;
use membrane_proto::objects::v1 as objpb;
use membrane_proto::policy::v1 as pb;
use membrane_runtime::grpc::{self, GrpcChannel};
use membrane_runtime::stream::{Publisher, Scope, StateSink, Subscriber};
use membrane_test_support::{Etcd, free_port};
use prost_types::Any;
use tokio::sync::watch;

/// A child process, killed on drop.
struct Proc {
    child: Child,
    url: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn spawn(program: PathBuf, etcd: &Etcd, env: &[(&str, String)]) -> Proc {
    let port = free_port();
    let mut cmd = Command::new(&program);
    cmd.env("MEMBRANE_LISTEN", format!("127.0.0.1:{port}"))
        .env("MEMBRANE_ETCD_ENDPOINTS", etcd.endpoint())
        .env("MEMBRANE_LOG", "warn")
        .stdout(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let proc = Proc {
        child: cmd.spawn().expect("spawn"),
        url: format!("http://127.0.0.1:{port}"),
    };
    for _ in 0..100 {
        if grpc::check_health(&proc.url, "", None, Duration::from_millis(500))
            .await
            .is_ok()
        {
            return proc;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{} did not become healthy", program.display());
}

/// `membrane-identity` beside this test's target directory, if built.
fn identity_binary() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?.parent()?; // target/debug/deps/.. → target/debug
    let bin = dir.join("membrane-identity");
    bin.is_file().then_some(bin)
}

/// Where identities come from: the real service, or a stand-in.
enum IdentitySource {
    Real(Proc),
    StandIn(String),
}

impl IdentitySource {
    fn url(&self) -> &str {
        match self {
            IdentitySource::Real(p) => &p.url,
            IdentitySource::StandIn(u) => u,
        }
    }
}

/// Starts the identity side and returns it with the ids of `web` and `client`.
async fn identities(etcd: &Etcd) -> (IdentitySource, u32, u32) {
    if let Some(bin) = identity_binary() {
        let proc = spawn(bin, etcd, &[]).await;
        let mut c = idpb::identity_client::IdentityClient::new(channel(&proc.url));
        c.heartbeat(idpb::HeartbeatRequest {
            node: "node-1".into(),
        })
        .await
        .expect("heartbeat");
        let alloc = |app: &str| {
            let req = idpb::AllocateRequest {
                node: "node-1".into(),
                namespace: "default".into(),
                labels: [("app".to_string(), app.to_string())].into(),
            };
            let mut c = c.clone();
            async move { c.allocate(req).await.expect("allocate").into_inner().id }
        };
        let web = alloc("web").await;
        let client = alloc("client").await;
        return (IdentitySource::Real(proc), web, client);
    }
    eprintln!("membrane-identity not built: using an in-process stand-in for its stream");
    let publisher = Publisher::new();
    let info = |id: u32, app: &str| {
        Any::from_msg(&idpb::IdentityInfo {
            id,
            labels: vec![
                format!("k8s:app={app}"),
                "k8s:io.kubernetes.pod.namespace=default".into(),
            ],
            reserved: false,
        })
        .expect("encode")
    };
    publisher.replace_all(
        1,
        vec![
            ("identity/300".into(), Scope::All, info(300, "web")),
            ("identity/301".into(), Scope::All, info(301, "client")),
        ],
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let routes = tonic::service::Routes::new(publisher.service());
    tokio::spawn(grpc::serve(
        listener,
        routes,
        &[],
        None,
        std::future::pending(),
    ));
    (IdentitySource::StandIn(url), 300, 301)
}

fn channel(url: &str) -> GrpcChannel {
    grpc::connect_lazy(url, "", None).expect("channel")
}

/// Records the whole state a subscriber is given.
struct Recorder(watch::Sender<BTreeMap<String, Any>>);

impl StateSink for Recorder {
    async fn apply(
        &mut self,
        _v: u64,
        state: &BTreeMap<String, Any>,
        _c: &[String],
    ) -> Result<(), String> {
        self.0.send_replace(state.clone());
        Ok(())
    }
}

fn subscribe(url: &str, node: &str) -> watch::Receiver<BTreeMap<String, Any>> {
    let (tx, rx) = watch::channel(BTreeMap::new());
    let sub = Subscriber::new(node, "policy", channel(url));
    tokio::spawn(sub.run(Recorder(tx), std::future::pending()));
    rx
}

/// Waits until `pred` holds for the recorded state, returning it.
async fn until(
    rx: &mut watch::Receiver<BTreeMap<String, Any>>,
    what: &str,
    pred: impl Fn(&BTreeMap<String, Any>) -> bool,
) -> BTreeMap<String, Any> {
    let found = {
        let wait = rx.wait_for(|s| pred(s));
        match tokio::time::timeout(Duration::from_secs(20), wait).await {
            Ok(Ok(s)) => Some(s.clone()),
            _ => None,
        }
    };
    found.unwrap_or_else(|| {
        panic!(
            "timed out waiting for {what}; have {:?}",
            rx.borrow().keys().collect::<Vec<_>>()
        )
    })
}

fn object(origin: &str, yaml: &str) -> objpb::Object {
    let v: serde_json::Value = serde_yaml::from_str(yaml).expect("yaml");
    objpb::Object {
        origin: origin.into(),
        json: v.to_string(),
    }
}

const ALLOW_WEB: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules: {http: [{method: GET}]}
"#;

const BAD: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: bad, namespace: default}
spec:
  endpointSelector: {}
  ingress:
  - toPorts:
    - ports: [{port: "80", endPort: 79}]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_applied_policy_reaches_subscribers_identically_from_two_replicas() {
    membrane_runtime::tls::install_crypto_provider();
    let etcd = Etcd::start().await.expect("etcd");
    let (source, web, client) = identities(&etcd).await;
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_membrane-policy"));
    let env = [("MEMBRANE_IDENTITY_ENDPOINT", source.url().to_string())];
    let a = spawn(bin.clone(), &etcd, &env).await;
    let b = spawn(bin, &etcd, &env).await;
    let mut objects = objpb::objects_client::ObjectsClient::new(channel(&a.url));

    // All or nothing: one invalid document and nothing is stored.
    let err = objects
        .apply(objpb::ApplyRequest {
            objects: vec![object("p.yaml#1", ALLOW_WEB), object("p.yaml#2", BAD)],
            dry_run: false,
        })
        .await
        .expect_err("the second document is invalid");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message()
            .starts_with("p.yaml#2: CiliumNetworkPolicy/default/bad: spec.ingress[0].toPorts[0].ports[0].endPort:"),
        "{}",
        err.message()
    );
    let listed = objects
        .list(objpb::ListRequest {
            kind: String::new(),
        })
        .await
        .expect("list")
        .into_inner();
    assert!(listed.objects.is_empty(), "nothing was applied");

    let lines = objects
        .apply(objpb::ApplyRequest {
            objects: vec![object("p.yaml#1", ALLOW_WEB)],
            dry_run: false,
        })
        .await
        .expect("apply")
        .into_inner()
        .results;
    assert_eq!(lines, vec!["ciliumnetworkpolicy/default/web created"]);

    let key = format!("policy/{web}");
    let mut from_a = subscribe(&a.url, "node-a");
    let mut from_b = subscribe(&b.url, "node-b");
    let sa = until(&mut from_a, &key, |s| s.contains_key(&key)).await;
    let sb = until(&mut from_b, &key, |s| s.contains_key(&key)).await;
    assert_eq!(sa, sb, "replicas publish identical content");
    let policy: pb::IdentityPolicy = sa[&key].to_msg().expect("an IdentityPolicy");
    assert_eq!(policy.identity, web);
    assert!(policy.ingress_enforced);
    assert!(!policy.egress_enforced);
    assert_eq!(policy.rules.len(), 1);
    let rule = &policy.rules[0];
    assert_eq!(
        rule.peer,
        Some(pb::resolved_rule::Peer::Identities(pb::IdentitySet {
            ids: vec![client]
        }))
    );
    assert!(rule.l7_not_enforced);
    assert!(
        !sa.contains_key(&format!("policy/{client}")),
        "the client is not selected"
    );

    // Trace and list from the other replica.
    let mut pol = pb::policy_client::PolicyClient::new(channel(&b.url));
    let trace = |port: u32| pb::TraceRequest {
        from: client.to_string(),
        to: format!("identity/{web}"),
        port,
        protocol: pb::Protocol::Tcp as i32,
    };
    let t = pol.trace(trace(80)).await.expect("trace").into_inner();
    assert_eq!(t.verdict, pb::Verdict::Allow as i32);
    let t = pol.trace(trace(81)).await.expect("trace").into_inner();
    assert_eq!(t.verdict, pb::Verdict::Deny as i32);
    assert_eq!(
        t.ingress.map(|i| i.reason),
        Some(pb::TraceReason::DefaultDeny as i32)
    );
    let list = pol
        .list_policies(pb::ListPoliciesRequest {})
        .await
        .expect("list")
        .into_inner();
    assert_eq!(list.policies.len(), 1);
    assert_eq!(list.policies[0].selected_identities, vec![web]);
    assert_eq!(
        list.policies[0].notes,
        vec!["L7 rules not enforced".to_string()]
    );

    // Deleting the policy removes the resource.
    objects
        .delete(objpb::DeleteRequest {
            objects: vec![object("p.yaml#1", ALLOW_WEB)],
            dry_run: false,
        })
        .await
        .expect("delete");
    until(&mut from_b, "removal", |s| !s.contains_key(&key)).await;
}
