//! `membrane pod run|exec|list|rm`, `membrane host exec`, and
//! `membrane get endpoints`: pods as network namespaces, attached the way a
//! container runtime does it — by calling the CNI plugin.
//!
//! Each pod is a namespace `pod-<namespace>-<name>` (recorded in the
//! cluster's ownership record, so `membrane down` removes it) and a record
//! `DIR/pods/<namespace>/<name>.json`.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::Context as _;
use membrane_proto::node::v1 as node;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::status_err;
use crate::client::Ctx;
use crate::cluster::{cgroups, components, net, record::Record};
use crate::output::{self, Format};

/// The CNI plugin's binary name.
pub const CNI_BINARY: &str = "membrane-cni";

/// A pod as the CLI recorded it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRecord {
    /// Pod name.
    pub name: String,
    /// Pod namespace.
    pub namespace: String,
    /// Node it runs on.
    pub node: String,
    /// Its network namespace (in /run/netns).
    pub netns: String,
    /// The CNI container id.
    pub container_id: String,
    /// Its address.
    pub ip: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Annotations.
    pub annotations: BTreeMap<String, String>,
}

/// Flags of `pod run`.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Pod name (a DNS label).
    pub name: String,
    /// Node to run on, e.g. `node-1`.
    #[arg(long)]
    pub node: String,
    /// Pod namespace.
    #[arg(long, short = 'n', default_value = "default")]
    pub namespace: String,
    /// Labels, `k=v,k2=v2`.
    #[arg(long, value_delimiter = ',')]
    pub labels: Vec<String>,
    /// Annotations, `k=v` (repeatable).
    #[arg(long = "annotation")]
    pub annotations: Vec<String>,
    #[command(flatten)]
    pub output: crate::OutputFlag,
}

fn parse_kv(field: &str, items: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    items
        .iter()
        .filter(|s| !s.is_empty())
        .map(|s| {
            let (k, v) = s
                .split_once('=')
                .with_context(|| format!("{field}: `{s}` is not k=v"))?;
            anyhow::ensure!(!k.is_empty(), "{field}: `{s}` has an empty key");
            Ok((k.to_string(), v.to_string()))
        })
        .collect()
}

/// DNS-1123 label: what Kubernetes accepts as a pod or namespace name.
fn check_name(field: &str, s: &str) -> anyhow::Result<()> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    anyhow::ensure!(
        ok,
        "{field}: `{s}` must be a DNS label (lowercase letters, digits, '-', at most 63)"
    );
    Ok(())
}

fn pods_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("pods")
}

fn record_path(state_dir: &Path, namespace: &str, name: &str) -> PathBuf {
    pods_dir(state_dir)
        .join(namespace)
        .join(format!("{name}.json"))
}

/// Every recorded pod, sorted by namespace and name.
pub fn records(state_dir: &Path) -> Vec<PodRecord> {
    let mut out: Vec<PodRecord> = std::fs::read_dir(pods_dir(state_dir))
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .flat_map(|ns| {
            std::fs::read_dir(ns.path())
                .into_iter()
                .flatten()
                .filter_map(Result::ok)
        })
        .filter_map(|f| serde_json::from_slice(&std::fs::read(f.path()).ok()?).ok())
        .collect();
    out.sort_by(|a: &PodRecord, b: &PodRecord| {
        (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name))
    });
    out
}

fn find(state_dir: &Path, namespace: &str, name: &str) -> anyhow::Result<PodRecord> {
    let path = record_path(state_dir, namespace, name);
    let bytes =
        std::fs::read(&path).with_context(|| format!("pod `{namespace}/{name}` not found"))?;
    serde_json::from_slice(&bytes).with_context(|| format!("parse {}", path.display()))
}

/// Serializes changes to the ownership record across concurrent CLI runs.
fn lock(state_dir: &Path) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(state_dir.join("pods.lock"))
        .context("open pods.lock")?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| anyhow::anyhow!("lock pods.lock: {e}"))
}

/// Runs the CNI plugin as a container runtime would.
fn cni(ctx: &Ctx, command: &str, pod: &PodRecord) -> anyhow::Result<serde_json::Value> {
    let plugin = components::find_binary(
        CNI_BINARY,
        std::env::var_os("MEMBRANE_BIN_DIR")
            .map(PathBuf::from)
            .as_deref(),
    )
    .with_context(|| format!("{CNI_BINARY} not found next to membrane or on PATH"))?;
    let socket = ctx
        .info
        .state_dir
        .join("nodes")
        .join(&pod.node)
        .join("agent.sock");
    let netconf = json!({
        "cniVersion": "1.0.0",
        "name": "membrane",
        "type": CNI_BINARY,
        "socket": socket,
        "args": {"cni": {"labels": pod.labels, "annotations": pod.annotations}},
    });
    let mut child = Command::new(&plugin)
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", &pod.container_id)
        .env("CNI_NETNS", net::netns_path(&pod.netns))
        .env("CNI_IFNAME", "eth0")
        .env(
            "CNI_ARGS",
            format!(
                "K8S_POD_NAMESPACE={};K8S_POD_NAME={}",
                pod.namespace, pod.name
            ),
        )
        .env("CNI_PATH", plugin.parent().unwrap_or(Path::new("/")))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("run {}", plugin.display()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(netconf.to_string().as_bytes())
            .context("write netconf")?;
    }
    let out = child
        .wait_with_output()
        .context("wait for the CNI plugin")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let result: serde_json::Value = if stdout.trim().is_empty() {
        json!({})
    } else {
        serde_json::from_str(&stdout).unwrap_or(json!({"raw": stdout}))
    };
    if !out.status.success() {
        anyhow::bail!(
            "CNI {command} for pod `{}/{}` failed (code {}): {} {}",
            pod.namespace,
            pod.name,
            result["code"],
            result["msg"].as_str().unwrap_or(&stdout),
            result["details"]
                .as_str()
                .unwrap_or(&String::from_utf8_lossy(&out.stderr))
        );
    }
    Ok(result)
}

/// `membrane pod run`.
pub async fn run(ctx: &Ctx, args: RunArgs) -> anyhow::Result<()> {
    check_name("name", &args.name)?;
    check_name("namespace", &args.namespace)?;
    anyhow::ensure!(
        ctx.info.nodes.iter().any(|n| n.name == args.node),
        "node `{}` is not part of this cluster (nodes: {})",
        args.node,
        ctx.info
            .nodes
            .iter()
            .map(|n| n.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let labels = parse_kv("labels", &args.labels)?;
    let annotations = parse_kv("annotation", &args.annotations)?;
    let state_dir = ctx.info.state_dir.clone();
    let path = record_path(&state_dir, &args.namespace, &args.name);
    let netns = format!("pod-{}-{}", args.namespace, args.name);
    let mut pod = PodRecord {
        name: args.name.clone(),
        namespace: args.namespace.clone(),
        node: args.node.clone(),
        netns: netns.clone(),
        container_id: format!("{:016x}", rand::random::<u64>()),
        ip: String::new(),
        labels,
        annotations,
    };
    {
        let _lock = lock(&state_dir)?;
        anyhow::ensure!(
            !path.exists(),
            "pod `{}/{}` already exists",
            args.namespace,
            args.name
        );
        anyhow::ensure!(
            !net::netns_exists(&netns),
            "network namespace `{netns}` already exists"
        );
        Record::load(&state_dir)?.add_netns(&netns)?;
        std::fs::create_dir_all(path.parent().context("pod dir")?).context("create pods dir")?;
        // Reserve the name before the slow part, so a concurrent run of the same pod fails here.
        std::fs::write(&path, serde_json::to_vec_pretty(&pod)?).context("write pod record")?;
    }
    let attached = net::add_netns(&netns)
        .map_err(anyhow::Error::from)
        .and_then(|()| cni(ctx, "ADD", &pod));
    let result = match attached {
        Ok(r) => r,
        Err(e) => {
            let _ = net::del_netns(&netns);
            let _lock = lock(&state_dir)?;
            let _ = std::fs::remove_file(&path);
            let mut rec = Record::load(&state_dir)?;
            rec.created.netns.retain(|n| n != &netns);
            rec.save()?;
            return Err(e);
        }
    };
    pod.ip = result["ips"][0]["address"]
        .as_str()
        .unwrap_or_default()
        .split('/')
        .next()
        .unwrap_or_default()
        .to_string();
    std::fs::write(&path, serde_json::to_vec_pretty(&pod)?).context("write pod record")?;
    create_pod_cgroup(&pod);
    match args.output.output {
        Format::Table => println!("{}", pod.ip),
        f => output::print_value(f, &serde_json::to_value(&pod)?)?,
    }
    Ok(())
}

/// `membrane pod rm`.
pub async fn rm(ctx: &Ctx, namespace: &str, name: &str) -> anyhow::Result<()> {
    let state_dir = ctx.info.state_dir.clone();
    let pod = find(&state_dir, namespace, name)?;
    if pod.ip.is_empty() || net::netns_exists(&pod.netns) {
        cni(ctx, "DEL", &pod)?;
    }
    remove_pod_cgroup(&pod);
    net::del_netns(&pod.netns)?;
    let _lock = lock(&state_dir)?;
    let mut rec = Record::load(&state_dir)?;
    rec.created.netns.retain(|n| n != &pod.netns);
    rec.save()?;
    std::fs::remove_file(record_path(&state_dir, namespace, name)).context("remove pod record")?;
    println!("pod/{name} deleted");
    Ok(())
}

/// `membrane pod list`.
pub fn list(ctx: &Ctx, format: Format) -> anyhow::Result<()> {
    let items: Vec<_> = records(&ctx.info.state_dir)
        .into_iter()
        .map(|p| serde_json::to_value(&p).unwrap_or_default())
        .collect();
    output::print_items(
        format,
        &[
            ("NAMESPACE", "namespace"),
            ("NAME", "name"),
            ("NODE", "node"),
            ("IP", "ip"),
            ("LABELS", "labels"),
        ],
        &items,
    )
}

fn pod_cgroup(pod: &PodRecord) -> PathBuf {
    cgroups::root().join(&pod.node).join(&pod.netns)
}

/// Creates the pod's cgroup; without a cgroup v2 hierarchy, warns and goes on
/// (the pod works, only socket load balancing will not see it).
fn create_pod_cgroup(pod: &PodRecord) {
    let dir = pod_cgroup(pod);
    let hierarchy = cgroups::root();
    if !hierarchy
        .parent()
        .is_some_and(|m| m.join("cgroup.procs").exists())
    {
        eprintln!(
            "warning: no cgroup v2 hierarchy at {}: pod/{} runs without a cgroup",
            hierarchy.display(),
            pod.name
        );
        return;
    }
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("warning: create cgroup {}: {e}", dir.display());
    }
}

/// Kills the pod's processes and removes its cgroup.
fn remove_pod_cgroup(pod: &PodRecord) {
    if let Err(e) = cgroups::kill_and_remove(&pod_cgroup(pod)) {
        eprintln!("warning: {e}");
    }
}

/// Runs `argv` in network namespace `netns` (and, when given and present,
/// in `cgroup`), returning its exit code. The cgroup is joined by a small
/// shell that writes its own pid into `cgroup.procs` before it execs
/// nsenter, so the command is in the cgroup from its first instruction.
fn exec_in(netns: &str, cgroup: Option<&Path>, argv: &[String]) -> anyhow::Result<i32> {
    anyhow::ensure!(!argv.is_empty(), "no command given (use `-- CMD ...`)");
    anyhow::ensure!(
        net::netns_exists(netns),
        "network namespace `{netns}` does not exist"
    );
    let nsenter_net = format!("--net={}", net::netns_path(netns));
    let mut cmd = match cgroup {
        Some(dir) if dir.is_dir() => {
            let mut c = Command::new("sh");
            c.arg("-c")
                .arg(
                    r#"procs="$1"; shift; echo $$ > "$procs" || echo "warning: could not join cgroup ($procs): running without" >&2; exec "$@""#,
                )
                .arg("sh")
                .arg(dir.join("cgroup.procs"))
                .arg("nsenter");
            c
        }
        Some(dir) => {
            eprintln!(
                "warning: cgroup {} is missing: running without it",
                dir.display()
            );
            Command::new("nsenter")
        }
        None => Command::new("nsenter"),
    };
    let status = cmd
        .arg(nsenter_net)
        .arg("--")
        .args(argv)
        .status()
        .context("run nsenter")?;
    Ok(status.code().unwrap_or(128))
}

/// `membrane pod exec`: in the pod's network namespace and cgroup.
pub fn exec(ctx: &Ctx, namespace: &str, name: &str, argv: &[String]) -> anyhow::Result<i32> {
    let pod = find(&ctx.info.state_dir, namespace, name)?;
    exec_in(&pod.netns, Some(&pod_cgroup(&pod)), argv)
}

/// `membrane host exec`.
pub fn host_exec(ctx: &Ctx, host: &str, argv: &[String]) -> anyhow::Result<i32> {
    let netns = if host == "external" {
        ctx.info.external.netns.clone()
    } else {
        ctx.info
            .nodes
            .iter()
            .find(|n| n.name == host)
            .map(|n| n.netns.clone())
            .with_context(|| format!("host `{host}`: not `external` or a node name"))?
    };
    exec_in(&netns, None, argv)
}

/// `membrane get endpoints`: what every node-datapath has programmed.
pub async fn endpoints(ctx: &Ctx, format: Format) -> anyhow::Result<()> {
    let mut items = Vec::new();
    for n in &ctx.nodes {
        let channel = ctx.connect(n).await?;
        let list = node::node_client::NodeClient::new(channel)
            .list_endpoints(node::ListEndpointsRequest {})
            .await
            .map_err(|s| status_err(&format!("endpoints of {}", n.name), s))?
            .into_inner();
        for e in list.endpoints {
            items.push(json!({
                "node": e.node, "id": e.id, "pod": format!("{}/{}", e.pod_namespace, e.pod_name),
                "address": e.address, "mac": e.mac, "hostInterface": e.host_ifname, "hostIfindex": e.host_ifindex,
                "identity": e.identity, "programmed": e.programmed, "containerID": e.container_id,
                "labels": e.labels.into_iter().collect::<BTreeMap<_, _>>(),
            }));
        }
    }
    output::print_items(
        format,
        &[
            ("NODE", "node"),
            ("ID", "id"),
            ("POD", "pod"),
            ("ADDRESS", "address"),
            ("INTERFACE", "hostInterface"),
            ("IDENTITY", "identity"),
            ("PROGRAMMED", "programmed"),
        ],
        &items,
    )
}

/// `membrane pod label`: replaces labels (`k=v` sets, `k-` removes), and moves
/// the pod to the identity of its new label set.
pub async fn label(
    ctx: &Ctx,
    namespace: &str,
    name: &str,
    changes: &[String],
) -> anyhow::Result<()> {
    let state_dir = ctx.info.state_dir.clone();
    let mut pod = find(&state_dir, namespace, name)?;
    anyhow::ensure!(
        !changes.is_empty(),
        "no label changes given (k=v to set, k- to remove)"
    );
    for c in changes {
        if let Some(key) = c.strip_suffix('-').filter(|k| !k.contains('=')) {
            pod.labels.remove(key);
        } else {
            let (k, v) = parse_kv("labels", std::slice::from_ref(c))?
                .into_iter()
                .next()
                .context("label")?;
            pod.labels.insert(k, v);
        }
    }
    let target = ctx
        .nodes
        .iter()
        .find(|n| n.name == pod.node)
        .with_context(|| {
            format!(
                "node `{}` of pod `{namespace}/{name}` is not running",
                pod.node
            )
        })?;
    let ep = node::node_client::NodeClient::new(ctx.connect(target).await?)
        .set_endpoint_labels(node::SetEndpointLabelsRequest {
            container_id: pod.container_id.clone(),
            ifname: "eth0".into(),
            labels: pod.labels.clone().into_iter().collect(),
        })
        .await
        .map_err(|s| status_err(&format!("label pod `{namespace}/{name}`"), s))?
        .into_inner();
    std::fs::write(
        record_path(&state_dir, namespace, name),
        serde_json::to_vec_pretty(&pod)?,
    )
    .context("write pod record")?;
    println!("pod/{name} labeled (identity {})", ep.identity);
    Ok(())
}

/// `membrane get ipcache`: the ipcache map of each node (or of one).
pub async fn ipcache(ctx: &Ctx, only: Option<&str>, format: Format) -> anyhow::Result<()> {
    let mut items = Vec::new();
    for n in ctx
        .nodes
        .iter()
        .filter(|n| only.is_none_or(|o| o == n.name))
    {
        let entries = node::node_client::NodeClient::new(ctx.connect(n).await?)
            .ipcache(node::IpcacheRequest {})
            .await
            .map_err(|s| status_err(&format!("ipcache of {}", n.name), s))?
            .into_inner()
            .entries;
        items.extend(
            entries
                .into_iter()
                .map(|e| json!({"node": n.name, "prefix": e.prefix, "identity": e.identity})),
        );
    }
    output::print_items(
        format,
        &[
            ("NODE", "node"),
            ("PREFIX", "prefix"),
            ("IDENTITY", "identity"),
        ],
        &items,
    )
}
