//! `membrane observe`: the flows the datapath saw, Hubble-style, for the
//! whole cluster (through the relay) or for one node (`--node`).
//!
//! The command line becomes a `GetFlowsRequest` ([`request`]); each item of
//! the answer is printed as it comes ([`Printer`]) in one of four formats:
//! an aligned table, Hubble's compact one-liners, plain JSON per line, or the
//! protobuf JSON mapping per line. Items that report an unavailable node (the
//! relay sends them as lost events whose source starts with
//! `relay: node unavailable`) become warnings on stderr.

use std::io::Write as _;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use clap::{Args, ValueEnum};
use membrane_proto::observer::v1 as pb;
use pb::get_flows_response::ResponseTypes;
use pb::layer4::Protocol;
use prost_types::Timestamp;
use serde_json::{Map, Value, json};

use crate::client::Ctx;
use crate::output;

/// Source prefix of the relay's report of an unavailable node.
const UNAVAILABLE_SOURCE: &str = "relay: node unavailable";

/// Flows shown when neither `--last`, `--follow` nor `--since` says otherwise.
const DEFAULT_LAST: u64 = 20;

/// `membrane observe` flags.
#[derive(Debug, Clone, Default, Args)]
pub struct ObserveArgs {
    /// Ask this node's observer directly instead of the relay.
    #[arg(long)]
    pub node: Option<String>,
    /// Flows with a pod of this namespace on either side.
    #[arg(long)]
    pub namespace: Vec<String>,
    /// Flows from or to this pod (`NS/NAME`, or `NAME` in `default`).
    #[arg(long)]
    pub pod: Vec<String>,
    /// Flows from this pod.
    #[arg(long)]
    pub from_pod: Vec<String>,
    /// Flows to this pod.
    #[arg(long)]
    pub to_pod: Vec<String>,
    /// Only flows with this verdict.
    #[arg(long, value_enum, ignore_case = true)]
    pub verdict: Vec<VerdictArg>,
    /// Only this protocol: `tcp`, `udp` or `icmp`.
    #[arg(long)]
    pub protocol: Vec<String>,
    /// Flows with this port on either side.
    #[arg(long)]
    pub port: Vec<String>,
    /// Only HTTP flows with this method.
    #[arg(long)]
    pub http_method: Vec<String>,
    /// Only HTTP flows whose path matches this regular expression.
    #[arg(long)]
    pub http_path: Vec<String>,
    /// The N most recent flows (default 20 unless following or `--since`).
    #[arg(long)]
    pub last: Option<u64>,
    /// Keep printing new flows as they come.
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// Only flows since then: a duration ago (`30s`, `5m`, `1h30m`) or an RFC 3339 time.
    #[arg(long)]
    pub since: Option<String>,
    /// Only flows until then: a duration ago or an RFC 3339 time.
    #[arg(long)]
    pub until: Option<String>,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = ObserveFormat::Table)]
    pub output: ObserveFormat,
}

/// A verdict to filter on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "UPPER")]
pub enum VerdictArg {
    /// Let through.
    Forwarded,
    /// Dropped by the datapath.
    Dropped,
    /// A service address translated to a backend.
    Translated,
}

/// How `membrane observe` prints flows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum ObserveFormat {
    /// Aligned columns: TIMESTAMP, SOURCE, DESTINATION, TYPE, VERDICT, SUMMARY.
    #[default]
    Table,
    /// One line per flow, like Hubble's compact output.
    Compact,
    /// One JSON object per line (field names as in the .proto).
    Json,
    /// The protobuf JSON mapping of each `GetFlowsResponse`, one per line.
    Jsonpb,
}

/// Runs `membrane observe`.
pub async fn run(ctx: &Ctx, args: ObserveArgs) -> anyhow::Result<()> {
    let req = request(&args, SystemTime::now())?;
    let (what, channel) = match &args.node {
        Some(node) => {
            let target = ctx
                .nodes
                .iter()
                .find(|n| n.name == *node)
                .with_context(|| format!("node `{node}` is not a running node of this cluster"))?
                .clone();
            let channel = ctx
                .connect(&target)
                .await
                .with_context(|| format!("node `{node}` is unavailable"))?;
            (format!("node `{node}`"), channel)
        }
        None => {
            let relay = ctx
                .service("relay")
                .context("cannot observe the cluster: the relay is not part of it (is membrane-relay built?); use --node for one node")?
                .clone();
            let channel = ctx.connect(&relay).await.with_context(|| {
                format!(
                    "the relay is unavailable at {} (see `membrane status`)",
                    relay.endpoint
                )
            })?;
            ("the relay".to_string(), channel)
        }
    };
    let mut stream = pb::observer_client::ObserverClient::new(channel)
        .get_flows(req)
        .await
        .map_err(|s| anyhow::anyhow!("{what}: {}", s.message()))?
        .into_inner();
    let mut printer = Printer::new(args.output, args.follow);
    while let Some(item) = stream
        .message()
        .await
        .map_err(|s| anyhow::anyhow!("{what}: {}", s.message()))?
    {
        printer.item(&item)?;
    }
    printer.finish()
}

// === the request ===

/// The request the flags ask for, with relative times taken from `now`.
pub fn request(args: &ObserveArgs, now: SystemTime) -> anyhow::Result<pb::GetFlowsRequest> {
    let since = args
        .since
        .as_deref()
        .map(|s| parse_time(s, now).context("--since"))
        .transpose()?;
    let until = args
        .until
        .as_deref()
        .map(|s| parse_time(s, now).context("--until"))
        .transpose()?;
    let number = match args.last {
        Some(n) => n,
        None if args.follow || since.is_some() => 0,
        None => DEFAULT_LAST,
    };
    Ok(pb::GetFlowsRequest {
        number,
        follow: args.follow,
        whitelist: filters(args)?,
        blacklist: Vec::new(),
        since,
        until,
    })
}

/// The whitelist: flows must match one of these filters. Flags that name
/// either side (`--pod`, `--port`) make two filters, one for each side,
/// like Hubble's; every other flag is in both.
pub fn filters(args: &ObserveArgs) -> anyhow::Result<Vec<pb::FlowFilter>> {
    if !args.pod.is_empty() && (!args.from_pod.is_empty() || !args.to_pod.is_empty()) {
        anyhow::bail!("--pod cannot be combined with --from-pod or --to-pod");
    }
    let protocol = args
        .protocol
        .iter()
        .map(|p| match p.to_ascii_lowercase().as_str() {
            p @ ("tcp" | "udp" | "icmp") => Ok(p.to_string()),
            "icmpv4" => Ok("icmp".to_string()),
            other => anyhow::bail!("--protocol `{other}`: expected tcp, udp or icmp"),
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    for p in &args.port {
        p.parse::<u16>()
            .with_context(|| format!("--port `{p}`: expected a port number"))?;
    }
    // `--namespace ns --pod name` means `ns/name`.
    let qualify = |pod: &String| match (pod.contains('/'), args.namespace.as_slice()) {
        (false, [ns]) => format!("{ns}/{pod}"),
        _ => pod.clone(),
    };
    let base = pb::FlowFilter {
        source_pod: args.from_pod.iter().map(qualify).collect(),
        destination_pod: args.to_pod.iter().map(qualify).collect(),
        verdict: args
            .verdict
            .iter()
            .map(|v| match v {
                VerdictArg::Forwarded => pb::Verdict::Forwarded as i32,
                VerdictArg::Dropped => pb::Verdict::Dropped as i32,
                VerdictArg::Translated => pb::Verdict::Translated as i32,
            })
            .collect(),
        protocol,
        namespace: args.namespace.clone(),
        http_method: args.http_method.iter().map(|m| m.to_uppercase()).collect(),
        http_path: args.http_path.clone(),
        ..Default::default()
    };
    if args.pod.is_empty() && args.port.is_empty() {
        return Ok(if base == pb::FlowFilter::default() {
            Vec::new()
        } else {
            vec![base]
        });
    }
    let pods: Vec<String> = args.pod.iter().map(qualify).collect();
    let from = pb::FlowFilter {
        source_pod: if pods.is_empty() {
            base.source_pod.clone()
        } else {
            pods.clone()
        },
        source_port: args.port.clone(),
        ..base.clone()
    };
    let to = pb::FlowFilter {
        destination_pod: if pods.is_empty() {
            base.destination_pod.clone()
        } else {
            pods
        },
        destination_port: args.port.clone(),
        ..base
    };
    Ok(vec![from, to])
}

/// A duration ago (`30s`, `5m`, `1h30m`, `500ms`, `2d`) or an RFC 3339 time.
pub fn parse_time(s: &str, now: SystemTime) -> anyhow::Result<Timestamp> {
    if let Ok(d) = parse_duration(s) {
        let then = now.checked_sub(d).context("that is before 1970")?;
        return Ok(Timestamp::from(then));
    }
    parse_rfc3339(s).with_context(|| {
        format!("`{s}` is neither a duration (30s, 5m, 1h30m) nor an RFC 3339 time")
    })
}

/// `30s`, `5m`, `1h30m`, `500ms`, `2d`.
pub fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    let s = s.trim();
    anyhow::ensure!(!s.is_empty(), "empty duration");
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        anyhow::ensure!(digits > 0, "`{s}`: expected a number");
        let n: u64 = rest[..digits].parse()?;
        rest = &rest[digits..];
        let unit = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let per = match &rest[..unit] {
            "ms" => Duration::from_millis(1),
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            "d" => Duration::from_secs(86400),
            u => anyhow::bail!("`{s}`: unknown unit `{u}` (ms, s, m, h, d)"),
        };
        total += per * u32::try_from(n).context("duration too large")?;
        rest = &rest[unit..];
    }
    Ok(total)
}

// === printing ===

/// Prints items as they arrive; a table without `follow` is printed whole at
/// the end so its columns align.
pub struct Printer {
    format: ObserveFormat,
    follow: bool,
    rows: Vec<Vec<String>>,
    header_printed: bool,
}

const HEADER: [&str; 6] = [
    "TIMESTAMP",
    "SOURCE",
    "DESTINATION",
    "TYPE",
    "VERDICT",
    "SUMMARY",
];

/// Column widths of a followed table (rows are printed as they come).
const FOLLOW_WIDTHS: [usize; 5] = [19, 32, 32, 30, 10];

// === impl Printer ===

impl Printer {
    /// A printer for `format`.
    pub fn new(format: ObserveFormat, follow: bool) -> Self {
        Self {
            format,
            follow,
            rows: Vec::new(),
            header_printed: false,
        }
    }

    /// Prints (or, for a table, keeps) one item.
    pub fn item(&mut self, item: &pb::GetFlowsResponse) -> anyhow::Result<()> {
        if let Some(ResponseTypes::LostEvents(l)) = &item.response_types
            && l.source.starts_with(UNAVAILABLE_SOURCE)
        {
            let reason = l
                .source
                .strip_prefix(UNAVAILABLE_SOURCE)
                .unwrap_or_default()
                .trim_start_matches(':')
                .trim();
            eprintln!("warning: node {} unavailable: {reason}", item.node_name);
            return Ok(());
        }
        let mut out = std::io::stdout().lock();
        match (self.format, &item.response_types) {
            (ObserveFormat::Json, _) => writeln!(out, "{}", plain_json(item))?,
            (ObserveFormat::Jsonpb, _) => writeln!(out, "{}", proto_json(item))?,
            (_, Some(ResponseTypes::LostEvents(l))) => writeln!(out, "{}", lost_line(l))?,
            (ObserveFormat::Compact, Some(ResponseTypes::Flow(f))) => {
                writeln!(out, "{}", compact(item, f))?
            }
            (ObserveFormat::Table, Some(ResponseTypes::Flow(f))) if self.follow => {
                if !self.header_printed {
                    writeln!(out, "{}", fixed_row(&HEADER.map(String::from)))?;
                    self.header_printed = true;
                }
                writeln!(out, "{}", fixed_row(&row(item, f)))?;
            }
            (ObserveFormat::Table, Some(ResponseTypes::Flow(f))) => {
                self.rows.push(row(item, f).to_vec())
            }
            (_, None) => {}
        }
        out.flush()?;
        Ok(())
    }

    /// Prints what was kept (a table's rows).
    pub fn finish(self) -> anyhow::Result<()> {
        if self.format == ObserveFormat::Table && !self.follow {
            if self.rows.is_empty() {
                eprintln!("no flows");
            } else {
                let header: Vec<String> = HEADER.iter().map(|h| h.to_string()).collect();
                print!("{}", output::table(&header, &self.rows));
            }
        }
        Ok(())
    }
}

/// `EVENTS LOST: N (source)`.
pub fn lost_line(l: &pb::LostEvents) -> String {
    format!("EVENTS LOST: {} ({})", l.num_events_lost, l.source)
}

fn fixed_row(cells: &[String; 6]) -> String {
    let mut s = String::new();
    for (cell, w) in cells.iter().zip(FOLLOW_WIDTHS) {
        s.push_str(&format!("{cell:<w$}   "));
    }
    s.push_str(&cells[5]);
    s.truncate(s.trim_end().len());
    s
}

/// The table row of a flow.
pub fn row(item: &pb::GetFlowsResponse, f: &pb::Flow) -> [String; 6] {
    [
        f.time.or(item.time).map(|t| stamp(&t)).unwrap_or_default(),
        side(f, Side::Source),
        side(f, Side::Destination),
        flow_type(f),
        verdict(f).to_string(),
        summary(f),
    ]
}

/// Hubble's compact line:
/// `TIME [NODE]: SRC (ID) -> DST (ID) TYPE VERDICT (SUMMARY)`; replies are
/// printed from the initiator's side with `<-`.
pub fn compact(item: &pb::GetFlowsResponse, f: &pb::Flow) -> String {
    let time = f.time.or(item.time).map(|t| stamp(&t)).unwrap_or_default();
    let node = if f.node_name.is_empty() {
        &item.node_name
    } else {
        &f.node_name
    };
    let src = format!(
        "{} ({})",
        side(f, Side::Source),
        identity_label(f.source.as_ref())
    );
    let dst = format!(
        "{} ({})",
        side(f, Side::Destination),
        identity_label(f.destination.as_ref())
    );
    let (left, arrow, right) = if f.is_reply {
        (dst, "<-", src)
    } else {
        (src, "->", dst)
    };
    format!(
        "{time} [{node}]: {left} {arrow} {right} {} {} ({})",
        flow_type(f),
        verdict(f),
        summary(f)
    )
}

#[derive(Clone, Copy)]
enum Side {
    Source,
    Destination,
}

/// `ns/pod:port` for pods, `ip:port` otherwise (no port for ICMP).
fn side(f: &pb::Flow, side: Side) -> String {
    let (ep, ip) = match side {
        Side::Source => (f.source.as_ref(), f.ip.as_ref().map(|i| i.source.as_str())),
        Side::Destination => (
            f.destination.as_ref(),
            f.ip.as_ref().map(|i| i.destination.as_str()),
        ),
    };
    let mut s = match ep {
        Some(e) if !e.pod_name.is_empty() => format!("{}/{}", e.namespace, e.pod_name),
        _ => ip
            .filter(|i| !i.is_empty())
            .unwrap_or("<unknown>")
            .to_string(),
    };
    let port = match f.l4.as_ref().and_then(|l| l.protocol.as_ref()) {
        Some(Protocol::Tcp(t)) => Some((t.source_port, t.destination_port)),
        Some(Protocol::Udp(u)) => Some((u.source_port, u.destination_port)),
        _ => None,
    };
    if let Some((sp, dp)) = port {
        let p = match side {
            Side::Source => sp,
            Side::Destination => dp,
        };
        if p != 0 {
            s.push_str(&format!(":{p}"));
        }
    }
    s
}

/// `ID:12345`, or the name of a reserved identity (`world`, `host`, ...).
fn identity_label(ep: Option<&pb::Endpoint>) -> String {
    let id = ep.map(|e| e.identity).unwrap_or(0);
    let reserved = ep.and_then(|e| {
        e.labels
            .iter()
            .find_map(|l| l.strip_prefix("reserved:"))
            .map(|n| n.split('=').next().unwrap_or(n).to_string())
    });
    match (reserved, id) {
        (Some(name), _) => name,
        (None, 1) => "host".into(),
        (None, 2) => "world".into(),
        (None, 6) => "remote-node".into(),
        (None, id) => format!("ID:{id}"),
    }
}

fn verdict(f: &pb::Flow) -> &'static str {
    pb::Verdict::try_from(f.verdict)
        .unwrap_or(pb::Verdict::Unspecified)
        .as_str_name()
}

fn direction(f: &pb::Flow) -> Option<&'static str> {
    match pb::TrafficDirection::try_from(f.traffic_direction) {
        Ok(pb::TrafficDirection::Ingress) => Some("INGRESS"),
        Ok(pb::TrafficDirection::Egress) => Some("EGRESS"),
        _ => None,
    }
}

/// Hubble's TYPE column: `policy-verdict:INGRESS DENIED` for policy drops,
/// `DROP` for other drops, the observation point for traces.
pub fn flow_type(f: &pb::Flow) -> String {
    if let Some(h) = &f.http {
        return if h.code != 0 {
            "http-response".into()
        } else {
            "http-request".into()
        };
    }
    match pb::EventType::try_from(f.event_type).unwrap_or(pb::EventType::Unspecified) {
        pb::EventType::Drop if f.drop_reason.starts_with("POLICY") || !f.policy_rule.is_empty() => {
            match direction(f) {
                Some(d) => format!("policy-verdict:{d} DENIED"),
                None => "policy-verdict:DENIED".into(),
            }
        }
        pb::EventType::Drop => "DROP".into(),
        pb::EventType::Translation => match f.service.as_str() {
            "" => "translated".into(),
            svc => format!("translated:{svc}"),
        },
        _ if !f.trace_observation_point.is_empty() => f.trace_observation_point.clone(),
        _ => "trace".into(),
    }
}

/// The SUMMARY column: drop reason and rule, then the packet (the node's
/// summary, else TCP flags / UDP / ICMP type, or the HTTP request).
pub fn summary(f: &pb::Flow) -> String {
    let mut parts = Vec::new();
    if !f.drop_reason.is_empty() {
        parts.push(f.drop_reason.clone());
    }
    if !f.policy_rule.is_empty() {
        parts.push(format!("rule: {}", f.policy_rule));
    }
    let packet = if let Some(h) = &f.http {
        match h.code {
            0 => format!("HTTP {} {}", h.method, h.url),
            c => format!("HTTP {c} {} {}", h.method, h.url),
        }
    } else if !f.summary.is_empty() {
        f.summary.clone()
    } else {
        match f.l4.as_ref().and_then(|l| l.protocol.as_ref()) {
            Some(Protocol::Tcp(t)) => tcp_flags(t.flags.as_ref()),
            Some(Protocol::Udp(_)) => "UDP".into(),
            Some(Protocol::Icmpv4(i)) => format!("ICMPv4 type {} code {}", i.r#type, i.code),
            None => String::new(),
        }
    };
    if !packet.is_empty() {
        parts.push(packet);
    }
    parts.join("; ")
}

fn tcp_flags(flags: Option<&pb::TcpFlags>) -> String {
    let Some(fl) = flags else {
        return "TCP".into();
    };
    let names: Vec<&str> = [
        (fl.syn, "SYN"),
        (fl.ack, "ACK"),
        (fl.psh, "PSH"),
        (fl.fin, "FIN"),
        (fl.rst, "RST"),
    ]
    .into_iter()
    .filter_map(|(set, n)| set.then_some(n))
    .collect();
    if names.is_empty() {
        "TCP".into()
    } else {
        format!("TCP Flags: {}", names.join(", "))
    }
}

// === JSON ===

/// How JSON is spelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Style {
    /// `-o json`: field names as in the .proto, every scalar present.
    Plain,
    /// `-o jsonpb`: the protobuf JSON mapping (lowerCamelCase names, default
    /// values left out, 64-bit integers as strings).
    Proto,
}

/// `-o json`: the flow (or the lost-events report) as one JSON object.
pub fn plain_json(item: &pb::GetFlowsResponse) -> Value {
    match &item.response_types {
        Some(ResponseTypes::Flow(f)) => flow_json(f, Style::Plain),
        Some(ResponseTypes::LostEvents(l)) => {
            let mut o = Obj::new(Style::Plain);
            o.msg("lost_events", Some(lost_json(l, Style::Plain)));
            o.str("node_name", &item.node_name);
            o.time("time", item.time.as_ref());
            o.done()
        }
        None => json!({}),
    }
}

/// `-o jsonpb`: the `GetFlowsResponse` in the protobuf JSON mapping.
pub fn proto_json(item: &pb::GetFlowsResponse) -> Value {
    let mut o = Obj::new(Style::Proto);
    match &item.response_types {
        Some(ResponseTypes::Flow(f)) => o.msg("flow", Some(flow_json(f, Style::Proto))),
        Some(ResponseTypes::LostEvents(l)) => {
            o.msg("lost_events", Some(lost_json(l, Style::Proto)))
        }
        None => {}
    }
    o.str("node_name", &item.node_name);
    o.time("time", item.time.as_ref());
    o.done()
}

fn lost_json(l: &pb::LostEvents, style: Style) -> Value {
    let mut o = Obj::new(style);
    o.u64("num_events_lost", l.num_events_lost);
    o.str("source", &l.source);
    o.done()
}

fn flow_json(f: &pb::Flow, style: Style) -> Value {
    let mut o = Obj::new(style);
    o.time("time", f.time.as_ref());
    o.enumeration(
        "verdict",
        f.verdict,
        pb::Verdict::try_from(f.verdict)
            .ok()
            .map(|v| v.as_str_name()),
    );
    o.str("drop_reason", &f.drop_reason);
    o.msg(
        "IP",
        f.ip.as_ref().map(|ip| {
            let mut i = Obj::new(style);
            i.str("source", &ip.source);
            i.str("destination", &ip.destination);
            i.done()
        }),
    );
    o.msg("l4", f.l4.as_ref().map(|l| l4_json(l, style)));
    o.msg("source", f.source.as_ref().map(|e| endpoint_json(e, style)));
    o.msg(
        "destination",
        f.destination.as_ref().map(|e| endpoint_json(e, style)),
    );
    o.enumeration(
        "event_type",
        f.event_type,
        pb::EventType::try_from(f.event_type)
            .ok()
            .map(|v| v.as_str_name()),
    );
    o.str("node_name", &f.node_name);
    o.enumeration(
        "traffic_direction",
        f.traffic_direction,
        pb::TrafficDirection::try_from(f.traffic_direction)
            .ok()
            .map(|v| v.as_str_name()),
    );
    o.str("policy_rule", &f.policy_rule);
    o.bool("is_reply", f.is_reply);
    o.str("trace_observation_point", &f.trace_observation_point);
    o.msg(
        "http",
        f.http.as_ref().map(|h| {
            let mut x = Obj::new(style);
            x.u32("code", h.code);
            x.str("method", &h.method);
            x.str("url", &h.url);
            x.done()
        }),
    );
    o.str("service", &f.service);
    o.str("summary", &f.summary);
    o.done()
}

fn endpoint_json(e: &pb::Endpoint, style: Style) -> Value {
    let mut o = Obj::new(style);
    o.u32("id", e.id);
    o.u32("identity", e.identity);
    o.str("namespace", &e.namespace);
    o.str("pod_name", &e.pod_name);
    o.list(
        "labels",
        e.labels.iter().map(|l| Value::String(l.clone())).collect(),
    );
    o.str("node_name", &e.node_name);
    o.done()
}

fn l4_json(l: &pb::Layer4, style: Style) -> Value {
    let mut o = Obj::new(style);
    let ports = |sp: u32, dp: u32| {
        let mut p = Obj::new(style);
        p.u32("source_port", sp);
        p.u32("destination_port", dp);
        p
    };
    match &l.protocol {
        Some(Protocol::Tcp(t)) => {
            let mut p = ports(t.source_port, t.destination_port);
            p.msg(
                "flags",
                t.flags.as_ref().map(|fl| {
                    let mut x = Obj::new(style);
                    x.bool("FIN", fl.fin);
                    x.bool("SYN", fl.syn);
                    x.bool("RST", fl.rst);
                    x.bool("PSH", fl.psh);
                    x.bool("ACK", fl.ack);
                    x.done()
                }),
            );
            o.msg("TCP", Some(p.done()));
        }
        Some(Protocol::Udp(u)) => {
            o.msg("UDP", Some(ports(u.source_port, u.destination_port).done()))
        }
        Some(Protocol::Icmpv4(i)) => {
            let mut x = Obj::new(style);
            x.u32("type", i.r#type);
            x.u32("code", i.code);
            o.msg("ICMPv4", Some(x.done()));
        }
        None => {}
    }
    o.done()
}

/// A JSON object built field by field in one [`Style`].
struct Obj {
    style: Style,
    map: Map<String, Value>,
}

// === impl Obj ===

impl Obj {
    fn new(style: Style) -> Self {
        Self {
            style,
            map: Map::new(),
        }
    }

    fn key(&self, name: &str) -> String {
        match self.style {
            Style::Plain => name.to_string(),
            Style::Proto => json_name(name),
        }
    }

    fn put(&mut self, name: &str, value: Value, is_default: bool) {
        if !(is_default && self.style == Style::Proto) {
            self.map.insert(self.key(name), value);
        }
    }

    fn str(&mut self, name: &str, v: &str) {
        self.put(name, json!(v), v.is_empty());
    }

    fn u32(&mut self, name: &str, v: u32) {
        self.put(name, json!(v), v == 0);
    }

    fn u64(&mut self, name: &str, v: u64) {
        let value = match self.style {
            Style::Plain => json!(v),
            Style::Proto => json!(v.to_string()),
        };
        self.put(name, value, v == 0);
    }

    fn bool(&mut self, name: &str, v: bool) {
        self.put(name, json!(v), !v);
    }

    fn enumeration(&mut self, name: &str, v: i32, known: Option<&str>) {
        let value = known.map(|n| json!(n)).unwrap_or_else(|| json!(v));
        self.put(name, value, v == 0);
    }

    fn time(&mut self, name: &str, t: Option<&Timestamp>) {
        if let Some(t) = t {
            self.put(name, json!(rfc3339(t)), false);
        }
    }

    fn msg(&mut self, name: &str, v: Option<Value>) {
        if let Some(v) = v {
            self.put(name, v, false);
        }
    }

    fn list(&mut self, name: &str, v: Vec<Value>) {
        let empty = v.is_empty();
        self.put(name, Value::Array(v), empty);
    }

    fn done(self) -> Value {
        Value::Object(self.map)
    }
}

/// protoc's JSON name of a field: underscores dropped, the letter after
/// each one upper-cased (`drop_reason` → `dropReason`, `IP` → `IP`).
fn json_name(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut upper = false;
    for c in field.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

// === time ===

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// Days since 1970-01-01 → (year, month 1-12, day 1-31), proleptic Gregorian.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// (year, month, day) → days since 1970-01-01.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

struct Civil {
    year: i64,
    month: u32,
    day: u32,
    hour: i64,
    minute: i64,
    second: i64,
    nanos: i32,
}

fn civil(t: &Timestamp) -> Civil {
    let secs = t.seconds + i64::from(t.nanos.div_euclid(1_000_000_000));
    let nanos = t.nanos.rem_euclid(1_000_000_000);
    let (year, month, day) = civil_from_days(secs.div_euclid(86_400));
    let sod = secs.rem_euclid(86_400);
    Civil {
        year,
        month,
        day,
        hour: sod / 3600,
        minute: sod % 3600 / 60,
        second: sod % 60,
        nanos,
    }
}

/// RFC 3339 in UTC with 0, 3, 6 or 9 fraction digits, as the protobuf JSON
/// mapping writes timestamps: `2024-05-01T12:00:00.123Z`.
pub fn rfc3339(t: &Timestamp) -> String {
    let c = civil(t);
    let frac = match c.nanos {
        0 => String::new(),
        n if n % 1_000_000 == 0 => format!(".{:03}", n / 1_000_000),
        n if n % 1_000 == 0 => format!(".{:06}", n / 1_000),
        n => format!(".{n:09}"),
    };
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}{frac}Z",
        c.year, c.month, c.day, c.hour, c.minute, c.second
    )
}

/// Hubble's timestamp column (Go's `StampMilli`), in UTC: `Jan  2 15:04:05.000`.
pub fn stamp(t: &Timestamp) -> String {
    let c = civil(t);
    format!(
        "{} {:>2} {:02}:{:02}:{:02}.{:03}",
        MONTHS[(c.month - 1) as usize],
        c.day,
        c.hour,
        c.minute,
        c.second,
        c.nanos / 1_000_000
    )
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`.
pub fn parse_rfc3339(s: &str) -> anyhow::Result<Timestamp> {
    let bad = || anyhow::anyhow!("`{s}` is not an RFC 3339 time (2024-05-01T12:00:00Z)");
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return Err(bad());
    }
    if b[13] != b':' || b[16] != b':' {
        return Err(bad());
    }
    let num = |r: std::ops::Range<usize>| -> anyhow::Result<i64> {
        let part = s.get(r).ok_or_else(bad)?;
        anyhow::ensure!(part.bytes().all(|c| c.is_ascii_digit()), bad());
        Ok(part.parse()?)
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    anyhow::ensure!(
        (1..=12).contains(&month)
            && (1..=31).contains(&day)
            && hour < 24
            && minute < 60
            && second < 61,
        bad()
    );
    let mut rest = &s[19..];
    let mut nanos: i32 = 0;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(frac.len());
        anyhow::ensure!(digits > 0, bad());
        let mut padded = frac[..digits.min(9)].to_string();
        while padded.len() < 9 {
            padded.push('0');
        }
        nanos = padded.parse()?;
        rest = &frac[digits..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ if rest.len() == 6 && rest.as_bytes()[3] == b':' => {
            let sign = match rest.as_bytes()[0] {
                b'+' => 1,
                b'-' => -1,
                _ => return Err(bad()),
            };
            let h: i64 = rest[1..3].parse().map_err(|_| bad())?;
            let m: i64 = rest[4..6].parse().map_err(|_| bad())?;
            sign * (h * 3600 + m * 60)
        }
        _ => return Err(bad()),
    };
    let days = days_from_civil(year, month as u32, day as u32);
    Ok(Timestamp {
        seconds: days * 86_400 + hour * 3600 + minute * 60 + second - offset,
        nanos,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use std::time::UNIX_EPOCH;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: ObserveArgs,
    }

    fn args(line: &[&str]) -> ObserveArgs {
        Cli::try_parse_from(std::iter::once("observe").chain(line.iter().copied()))
            .expect("flags parse")
            .args
    }

    fn ts(secs: i64, nanos: i32) -> Timestamp {
        Timestamp {
            seconds: secs,
            nanos,
        }
    }

    /// 2024-05-01T12:34:56.789Z
    const T0: i64 = 1_714_566_896;

    fn denied_flow() -> pb::Flow {
        pb::Flow {
            time: Some(ts(T0, 789_000_000)),
            verdict: pb::Verdict::Dropped as i32,
            drop_reason: "POLICY_DENIED".into(),
            ip: Some(pb::Ip {
                source: "10.200.1.5".into(),
                destination: "10.200.0.7".into(),
            }),
            l4: Some(pb::Layer4 {
                protocol: Some(Protocol::Tcp(pb::Tcp {
                    source_port: 40312,
                    destination_port: 80,
                    flags: Some(pb::TcpFlags {
                        syn: true,
                        ..Default::default()
                    }),
                })),
            }),
            source: Some(pb::Endpoint {
                identity: 12345,
                namespace: "default".into(),
                pod_name: "client".into(),
                labels: vec!["k8s:app=client".into()],
                ..Default::default()
            }),
            destination: Some(pb::Endpoint {
                id: 3,
                identity: 23456,
                namespace: "default".into(),
                pod_name: "server".into(),
                ..Default::default()
            }),
            event_type: pb::EventType::Drop as i32,
            node_name: "node-1".into(),
            traffic_direction: pb::TrafficDirection::Ingress as i32,
            policy_rule: "CiliumNetworkPolicy default/deny-client ingressDeny[0]".into(),
            ..Default::default()
        }
    }

    fn item(f: pb::Flow) -> pb::GetFlowsResponse {
        pb::GetFlowsResponse {
            node_name: f.node_name.clone(),
            time: f.time,
            response_types: Some(ResponseTypes::Flow(f)),
        }
    }

    // --- filters and the request ---

    #[test]
    fn no_filter_flags_ask_for_every_flow_and_the_last_twenty() {
        let req = request(&args(&[]), SystemTime::now()).expect("request");
        assert!(req.whitelist.is_empty());
        assert_eq!((req.number, req.follow), (20, false));
        let req = request(&args(&["--follow"]), SystemTime::now()).expect("request");
        assert_eq!(
            (req.number, req.follow),
            (0, true),
            "following starts with new flows"
        );
        let req = request(&args(&["--last", "5", "--follow"]), SystemTime::now()).expect("request");
        assert_eq!(req.number, 5);
    }

    #[test]
    fn flags_for_one_side_or_neither_make_one_filter() {
        let f = filters(&args(&[
            "--verdict",
            "DROPPED",
            "--from-pod",
            "default/client",
            "--to-pod",
            "server",
            "--protocol",
            "TCP",
            "--http-method",
            "get",
            "--namespace",
            "default",
        ]))
        .expect("filters");
        assert_eq!(
            f,
            [pb::FlowFilter {
                source_pod: vec!["default/client".into()],
                destination_pod: vec!["default/server".into()],
                verdict: vec![pb::Verdict::Dropped as i32],
                protocol: vec!["tcp".into()],
                namespace: vec!["default".into()],
                http_method: vec!["GET".into()],
                ..Default::default()
            }]
        );
    }

    #[test]
    fn pod_means_source_or_destination_as_two_filters() {
        let f = filters(&args(&[
            "--pod",
            "default/server",
            "--verdict",
            "forwarded",
        ]))
        .expect("filters");
        let common = pb::FlowFilter {
            verdict: vec![pb::Verdict::Forwarded as i32],
            ..Default::default()
        };
        assert_eq!(
            f,
            [
                pb::FlowFilter {
                    source_pod: vec!["default/server".into()],
                    ..common.clone()
                },
                pb::FlowFilter {
                    destination_pod: vec!["default/server".into()],
                    ..common
                },
            ]
        );
    }

    #[test]
    fn port_means_either_side_and_pairs_with_pod_on_the_same_side() {
        let f = filters(&args(&["--pod", "server", "--port", "80"])).expect("filters");
        assert_eq!(f.len(), 2);
        assert_eq!(f[0].source_pod, ["server"]);
        assert_eq!(f[0].source_port, ["80"]);
        assert!(f[0].destination_port.is_empty());
        assert_eq!(f[1].destination_pod, ["server"]);
        assert_eq!(f[1].destination_port, ["80"]);
    }

    #[test]
    fn namespace_qualifies_bare_pod_names() {
        let f = filters(&args(&["--namespace", "prod", "--pod", "web"])).expect("filters");
        assert_eq!(f[0].source_pod, ["prod/web"]);
        assert_eq!(f[1].destination_pod, ["prod/web"]);
    }

    #[test]
    fn contradictory_or_malformed_flags_are_errors() {
        let e = filters(&args(&["--pod", "a", "--from-pod", "b"])).expect_err("conflict");
        assert!(e.to_string().contains("--pod"), "{e}");
        let e = filters(&args(&["--protocol", "sctp"])).expect_err("protocol");
        assert!(e.to_string().contains("sctp"), "{e}");
        let e = filters(&args(&["--port", "http"])).expect_err("port");
        assert!(e.to_string().contains("--port `http`"), "{e}");
        assert!(
            Cli::try_parse_from(["observe", "--verdict", "MAYBE"]).is_err(),
            "unknown verdict"
        );
    }

    #[test]
    fn since_takes_a_duration_ago_or_an_rfc3339_time() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let req = request(&args(&["--since", "1h30m"]), now).expect("request");
        assert_eq!(req.since, Some(ts(1_000_000 - 5400, 0)));
        assert_eq!(
            req.number, 0,
            "--since without --last returns everything since"
        );
        let req = request(&args(&["--since", "2024-05-01T12:34:56.789Z"]), now).expect("req");
        assert_eq!(req.since, Some(ts(T0, 789_000_000)));
        assert!(request(&args(&["--since", "yesterday"]), now).is_err());
    }

    #[test]
    fn durations_and_times_parse_and_print_round_trip() {
        assert_eq!(
            parse_duration("500ms").ok(),
            Some(Duration::from_millis(500))
        );
        assert_eq!(
            parse_duration("2d").ok(),
            Some(Duration::from_secs(172_800))
        );
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("5x").is_err());
        assert_eq!(rfc3339(&ts(T0, 789_000_000)), "2024-05-01T12:34:56.789Z");
        assert_eq!(rfc3339(&ts(0, 0)), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(&ts(951_782_400, 1)),
            "2000-02-29T00:00:00.000000001Z"
        );
        assert_eq!(
            parse_rfc3339("2024-05-01T14:34:56.789+02:00").ok(),
            Some(ts(T0, 789_000_000))
        );
        assert_eq!(
            parse_rfc3339("2000-02-29T00:00:00.000000001Z").ok(),
            Some(ts(951_782_400, 1))
        );
        assert!(parse_rfc3339("2024-13-01T00:00:00Z").is_err());
        assert_eq!(stamp(&ts(T0, 789_000_000)), "May  1 12:34:56.789");
    }

    // --- formats ---

    #[test]
    fn a_policy_drop_reads_like_hubbles_table_row() {
        let f = denied_flow();
        assert_eq!(
            row(&item(f.clone()), &f),
            [
                "May  1 12:34:56.789".to_string(),
                "default/client:40312".into(),
                "default/server:80".into(),
                "policy-verdict:INGRESS DENIED".into(),
                "DROPPED".into(),
                "POLICY_DENIED; rule: CiliumNetworkPolicy default/deny-client ingressDeny[0]; TCP Flags: SYN"
                    .into(),
            ]
        );
    }

    #[test]
    fn a_forwarded_trace_to_the_world_shows_addresses_and_the_observation_point() {
        let f = pb::Flow {
            time: Some(ts(T0, 0)),
            verdict: pb::Verdict::Forwarded as i32,
            ip: Some(pb::Ip {
                source: "10.200.1.5".into(),
                destination: "192.0.2.1".into(),
            }),
            l4: Some(pb::Layer4 {
                protocol: Some(Protocol::Udp(pb::Udp {
                    source_port: 5353,
                    destination_port: 53,
                })),
            }),
            source: Some(pb::Endpoint {
                identity: 12345,
                namespace: "default".into(),
                pod_name: "client".into(),
                ..Default::default()
            }),
            destination: Some(pb::Endpoint {
                identity: 2,
                labels: vec!["reserved:world".into()],
                ..Default::default()
            }),
            event_type: pb::EventType::Trace as i32,
            trace_observation_point: "to-stack".into(),
            node_name: "node-2".into(),
            ..Default::default()
        };
        let r = row(&item(f.clone()), &f);
        assert_eq!(
            r[1..],
            [
                "default/client:5353",
                "192.0.2.1:53",
                "to-stack",
                "FORWARDED",
                "UDP"
            ]
        );
        assert_eq!(
            compact(&item(f.clone()), &f),
            "May  1 12:34:56.000 [node-2]: default/client:5353 (ID:12345) -> 192.0.2.1:53 (world) to-stack FORWARDED (UDP)"
        );
    }

    #[test]
    fn compact_prints_one_hubble_line_and_replies_from_the_initiator() {
        let f = denied_flow();
        assert_eq!(
            compact(&item(f.clone()), &f),
            "May  1 12:34:56.789 [node-1]: default/client:40312 (ID:12345) -> default/server:80 (ID:23456) policy-verdict:INGRESS DENIED DROPPED (POLICY_DENIED; rule: CiliumNetworkPolicy default/deny-client ingressDeny[0]; TCP Flags: SYN)"
        );
        let reply = pb::Flow {
            is_reply: true,
            verdict: pb::Verdict::Forwarded as i32,
            drop_reason: String::new(),
            policy_rule: String::new(),
            event_type: pb::EventType::Trace as i32,
            trace_observation_point: "to-endpoint".into(),
            source: denied_flow().destination,
            destination: denied_flow().source,
            l4: Some(pb::Layer4 {
                protocol: Some(Protocol::Tcp(pb::Tcp {
                    source_port: 80,
                    destination_port: 40312,
                    flags: None,
                })),
            }),
            ..denied_flow()
        };
        let line = compact(&item(reply.clone()), &reply);
        assert!(
            line.contains("default/client:40312 (ID:12345) <- default/server:80 (ID:23456) to-endpoint FORWARDED (TCP)"),
            "{line}"
        );
    }

    #[test]
    fn lost_events_print_as_one_line() {
        let l = pb::LostEvents {
            num_events_lost: 42,
            source: "perf/ring buffer".into(),
        };
        assert_eq!(lost_line(&l), "EVENTS LOST: 42 (perf/ring buffer)");
    }

    #[test]
    fn json_names_fields_as_the_proto_does_with_pods_identities_and_drop_reason() {
        let v = plain_json(&item(denied_flow()));
        assert_eq!(v["verdict"], "DROPPED");
        assert_eq!(v["drop_reason"], "POLICY_DENIED");
        assert_eq!(v["source"]["pod_name"], "client");
        assert_eq!(v["source"]["identity"], 12345);
        assert_eq!(v["destination"]["pod_name"], "server");
        assert_eq!(v["l4"]["TCP"]["destination_port"], 80);
        assert_eq!(v["l4"]["TCP"]["flags"]["SYN"], true);
        assert_eq!(v["is_reply"], false, "plain json keeps default scalars");
        assert_eq!(v["time"], "2024-05-01T12:34:56.789Z");
        assert_eq!(v["IP"]["source"], "10.200.1.5");
    }

    #[test]
    fn jsonpb_is_the_protobuf_json_mapping_of_the_response() {
        let v = proto_json(&item(denied_flow()));
        assert_eq!(v["nodeName"], "node-1");
        let f = &v["flow"];
        assert_eq!(f["dropReason"], "POLICY_DENIED");
        assert_eq!(f["source"]["podName"], "client");
        assert_eq!(f["trafficDirection"], "INGRESS");
        assert_eq!(f["l4"]["TCP"]["flags"], json!({"SYN": true}));
        assert!(f.get("isReply").is_none(), "defaults are left out");
        assert!(f["destination"].get("labels").is_none());
        let lost = proto_json(&pb::GetFlowsResponse {
            response_types: Some(ResponseTypes::LostEvents(pb::LostEvents {
                num_events_lost: 3,
                source: "observer ring buffer".into(),
            })),
            ..Default::default()
        });
        assert_eq!(
            lost,
            json!({"lostEvents": {"numEventsLost": "3", "source": "observer ring buffer"}})
        );
        assert_eq!(
            json_name("trace_observation_point"),
            "traceObservationPoint"
        );
    }
}
