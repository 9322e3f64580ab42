//! What the plugin prints: success results, the VERSION answer and errors,
//! as the CNI spec shapes them (1.0.0, plus the 0.3.x/0.4.0 differences).
//!
//! The types deserialize as well as serialize: a `prevResult` handed to CHECK
//! is read back with them, and the reference-plugin test decodes the reference
//! `bridge` output with them to prove the shapes agree.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// The spec version this plugin speaks when nobody asked for another.
pub const SPEC_VERSION: CniVersion = CniVersion::V1_0_0;

/// A CNI spec version this plugin supports.
///
/// 0.1.0 and 0.2.0 are left out on purpose: their result has no `interfaces`
/// list, and no runtime that can run Membrane still speaks them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum CniVersion {
    V0_3_0,
    V0_3_1,
    V0_4_0,
    V1_0_0,
}

/// The answer to `CNI_COMMAND=VERSION`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VersionResult {
    pub cni_version: String,
    pub supported_versions: Vec<String>,
}

/// A successful ADD, or a `prevResult`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Success {
    pub cni_version: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    /// Always printed (as `{}` when empty), like the reference plugins do.
    #[serde(default)]
    pub dns: Dns,
}

/// One interface the plugin created or touched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// The netns path for interfaces inside the pod; absent for host ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_path: Option<String>,
    #[serde(default, rename = "pciID", skip_serializing_if = "Option::is_none")]
    pub pci_id: Option<String>,
}

/// One address assigned to an interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    /// `"4"` or `"6"`: required before 1.0.0, removed in 1.0.0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Address with prefix; host bits are kept (`10.200.0.5/24`).
    pub address: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    /// Index into `interfaces`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

/// One route inside the pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub dst: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
}

/// DNS settings; in the result and, with the same shape, in the netconf.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

/// The error object printed on stdout with exit status 1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorResult {
    /// Required by the spec; the reference plugins (libcni 1.1) leave it out,
    /// hence `default` so their errors still decode.
    #[serde(default)]
    pub cni_version: String,
    pub code: u32,
    pub msg: String,
    /// Always printed by us; the reference plugins omit it when empty.
    #[serde(default)]
    pub details: String,
}

/// A failure, carrying the spec error code it is reported with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: ErrorCode,
    pub msg: String,
    pub details: String,
}

/// The error codes this plugin reports: the spec's well-known ones (< 100)
/// and our own (>= 100).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// 1: the requested cniVersion is not one we speak.
    IncompatibleVersion,
    /// 2: a netconf field we refuse (named with its value in the message).
    UnsupportedField,
    /// 3: the container (or its endpoint) is unknown.
    UnknownContainer,
    /// 4: a CNI_* environment variable is missing or malformed.
    InvalidEnvironment,
    /// 5: reading stdin or talking to the socket failed locally.
    IoFailure,
    /// 6: stdin (or `prevResult`) is not the JSON we expect.
    DecodeFailure,
    /// 7: the netconf decodes but is invalid.
    InvalidConfig,
    /// 11: transient; the runtime should retry (agent unreachable or busy).
    TryAgainLater,
    /// 100: the agent already has this container's interface.
    AlreadyAttached,
    /// 101: the agent's address pool is exhausted.
    PoolExhausted,
    /// 102: the agent says the endpoint is not as it was attached (CHECK).
    EndpointMismatch,
    /// 999: anything else the agent reported; same value as libcni's
    /// "internal" code, so tooling reading either plugin agrees.
    Agent,
}

// === impl CniVersion ===

impl CniVersion {
    /// Every supported version, oldest first.
    pub const ALL: [CniVersion; 4] = [Self::V0_3_0, Self::V0_3_1, Self::V0_4_0, Self::V1_0_0];

    /// The version named by `s`, if we support it.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::V0_3_0 => "0.3.0",
            Self::V0_3_1 => "0.3.1",
            Self::V0_4_0 => "0.4.0",
            Self::V1_0_0 => "1.0.0",
        }
    }

    /// Whether `ips[].version` is part of this version's result.
    pub fn has_ip_version_field(self) -> bool {
        self < Self::V1_0_0
    }

    /// CHECK arrived with 0.4.0.
    pub fn has_check(self) -> bool {
        self >= Self::V0_4_0
    }
}

impl fmt::Display for CniVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// === impl VersionResult ===

impl VersionResult {
    pub fn ours() -> Self {
        Self {
            cni_version: SPEC_VERSION.to_string(),
            supported_versions: CniVersion::ALL.iter().map(|v| v.to_string()).collect(),
        }
    }
}

// === impl Success ===

/// What the agent attached, in plain types: the input of an ADD result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub host_ifname: String,
    pub host_mac: String,
    pub pod_ifname: String,
    pub pod_mac: String,
    pub address: IpNet,
    pub gateway: IpAddr,
}

/// Index of the pod-side interface in an ADD result (the host veth is 0).
pub const POD_INTERFACE: usize = 1;

impl Success {
    /// The ADD result for `attached`, shaped for `version`. `dns` comes from
    /// the netconf (the agent knows nothing about DNS).
    pub fn attached(version: CniVersion, attached: &Attachment, netns: &str, dns: Dns) -> Self {
        let ip_version = version
            .has_ip_version_field()
            .then(|| match attached.address {
                IpNet::V4(_) => "4".to_string(),
                IpNet::V6(_) => "6".to_string(),
            });
        let default_dst = match attached.gateway {
            IpAddr::V4(_) => IpNet::V4(ipnet::Ipv4Net::default()),
            IpAddr::V6(_) => IpNet::V6(ipnet::Ipv6Net::default()),
        };
        Self {
            cni_version: version.to_string(),
            interfaces: vec![
                Interface::named(&attached.host_ifname, &attached.host_mac, None),
                Interface::named(&attached.pod_ifname, &attached.pod_mac, Some(netns)),
            ],
            ips: vec![IpConfig {
                version: ip_version,
                address: attached.address,
                gateway: Some(attached.gateway),
                interface: Some(POD_INTERFACE),
            }],
            routes: vec![Route {
                dst: default_dst,
                gw: Some(attached.gateway),
            }],
            dns,
        }
    }

    /// Whether the result lists interface `ifname` inside `netns`.
    pub fn has_sandbox_interface(&self, ifname: &str, netns: &str) -> bool {
        self.interfaces
            .iter()
            .any(|i| i.name == ifname && i.sandbox.as_deref() == Some(netns))
    }
}

impl Interface {
    fn named(name: &str, mac: &str, sandbox: Option<&str>) -> Self {
        Self {
            name: name.to_string(),
            mac: (!mac.is_empty()).then(|| mac.to_string()),
            mtu: None,
            sandbox: sandbox.map(str::to_string),
            socket_path: None,
            pci_id: None,
        }
    }
}

// === impl CniError ===

impl CniError {
    pub fn new(code: ErrorCode, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// The printed form, in the version the runtime asked for (or ours when
    /// it asked for one we do not speak, or we failed before knowing).
    pub fn to_result(&self, version: CniVersion) -> ErrorResult {
        ErrorResult {
            cni_version: version.to_string(),
            code: self.code.value(),
            msg: self.msg.clone(),
            details: self.details.clone(),
        }
    }
}

impl fmt::Display for CniError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (code {}): {}",
            self.msg,
            self.code.value(),
            self.details
        )
    }
}

impl std::error::Error for CniError {}

// === impl ErrorCode ===

impl ErrorCode {
    pub fn value(self) -> u32 {
        match self {
            Self::IncompatibleVersion => 1,
            Self::UnsupportedField => 2,
            Self::UnknownContainer => 3,
            Self::InvalidEnvironment => 4,
            Self::IoFailure => 5,
            Self::DecodeFailure => 6,
            Self::InvalidConfig => 7,
            Self::TryAgainLater => 11,
            Self::AlreadyAttached => 100,
            Self::PoolExhausted => 101,
            Self::EndpointMismatch => 102,
            Self::Agent => 999,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn attachment(address: &str, gateway: &str) -> Attachment {
        Attachment {
            host_ifname: "lxc1a2b3c".into(),
            host_mac: "aa:bb:cc:00:00:01".into(),
            pod_ifname: "eth0".into(),
            pod_mac: "aa:bb:cc:00:00:02".into(),
            address: address.parse().expect("address"),
            gateway: gateway.parse().expect("gateway"),
        }
    }

    #[test]
    fn a_1_0_0_add_result_has_the_spec_shape_without_ip_versions() {
        let r = Success::attached(
            CniVersion::V1_0_0,
            &attachment("10.200.0.5/32", "10.200.0.1"),
            "/var/run/netns/pod",
            Dns::default(),
        );
        assert_eq!(
            serde_json::to_value(&r).expect("serialize"),
            json!({
                "cniVersion": "1.0.0",
                "interfaces": [
                    {"name": "lxc1a2b3c", "mac": "aa:bb:cc:00:00:01"},
                    {"name": "eth0", "mac": "aa:bb:cc:00:00:02", "sandbox": "/var/run/netns/pod"}
                ],
                "ips": [{"address": "10.200.0.5/32", "gateway": "10.200.0.1", "interface": 1}],
                "routes": [{"dst": "0.0.0.0/0", "gw": "10.200.0.1"}],
                "dns": {}
            })
        );
    }

    #[test]
    fn pre_1_0_0_results_carry_the_ip_version_and_the_requested_cni_version() {
        for version in [CniVersion::V0_3_0, CniVersion::V0_3_1, CniVersion::V0_4_0] {
            let r = Success::attached(
                version,
                &attachment("10.200.0.5/32", "10.200.0.1"),
                "/ns",
                Dns::default(),
            );
            let v = serde_json::to_value(&r).expect("serialize");
            assert_eq!(v["cniVersion"], version.as_str());
            assert_eq!(v["ips"][0]["version"], "4");
        }
    }

    #[test]
    fn an_ipv6_attachment_gets_version_6_and_a_v6_default_route() {
        let r = Success::attached(
            CniVersion::V0_4_0,
            &attachment("fd00::5/128", "fd00::1"),
            "/ns",
            Dns::default(),
        );
        let v = serde_json::to_value(&r).expect("serialize");
        assert_eq!(v["ips"][0]["version"], "6");
        assert_eq!(v["routes"][0], json!({"dst": "::/0", "gw": "fd00::1"}));
    }

    #[test]
    fn netconf_dns_is_echoed_into_the_result() {
        let dns = Dns {
            nameservers: vec!["10.96.0.10".into()],
            search: vec!["svc.cluster.local".into()],
            ..Dns::default()
        };
        let r = Success::attached(
            CniVersion::V1_0_0,
            &attachment("10.200.0.5/32", "10.200.0.1"),
            "/ns",
            dns,
        );
        let v = serde_json::to_value(&r).expect("serialize");
        assert_eq!(
            v["dns"],
            json!({"nameservers": ["10.96.0.10"], "search": ["svc.cluster.local"]})
        );
    }

    #[test]
    fn a_result_round_trips_through_json() {
        let r = Success::attached(
            CniVersion::V0_3_1,
            &attachment("10.200.0.5/24", "10.200.0.1"),
            "/ns",
            Dns::default(),
        );
        let text = serde_json::to_string(&r).expect("serialize");
        let back: Success = serde_json::from_str(&text).expect("deserialize");
        assert_eq!(back, r);
        assert!(back.has_sandbox_interface("eth0", "/ns"));
        assert!(!back.has_sandbox_interface("lxc1a2b3c", "/ns"));
    }

    #[test]
    fn version_answers_list_every_supported_version() {
        assert_eq!(
            serde_json::to_value(VersionResult::ours()).expect("serialize"),
            json!({"cniVersion": "1.0.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0"]})
        );
    }

    #[test]
    fn errors_print_the_four_spec_keys_with_the_numeric_code() {
        let e = CniError::new(ErrorCode::TryAgainLater, "agent unreachable", "no socket");
        assert_eq!(
            serde_json::to_value(e.to_result(CniVersion::V0_4_0)).expect("serialize"),
            json!({"cniVersion": "0.4.0", "code": 11, "msg": "agent unreachable", "details": "no socket"})
        );
    }

    #[test]
    fn error_codes_have_the_spec_values() {
        let codes = [
            (ErrorCode::IncompatibleVersion, 1),
            (ErrorCode::UnsupportedField, 2),
            (ErrorCode::UnknownContainer, 3),
            (ErrorCode::InvalidEnvironment, 4),
            (ErrorCode::IoFailure, 5),
            (ErrorCode::DecodeFailure, 6),
            (ErrorCode::InvalidConfig, 7),
            (ErrorCode::TryAgainLater, 11),
            (ErrorCode::AlreadyAttached, 100),
            (ErrorCode::PoolExhausted, 101),
            (ErrorCode::EndpointMismatch, 102),
            (ErrorCode::Agent, 999),
        ];
        for (code, value) in codes {
            assert_eq!(code.value(), value, "{code:?}");
        }
    }

    #[test]
    fn only_the_four_supported_versions_parse() {
        assert_eq!(CniVersion::parse("0.4.0"), Some(CniVersion::V0_4_0));
        for v in ["0.1.0", "0.2.0", "1.1.0", "", "1.0"] {
            assert_eq!(CniVersion::parse(v), None, "{v}");
        }
        assert!(!CniVersion::V0_3_1.has_check());
        assert!(CniVersion::V0_4_0.has_check());
    }
}
