//! The label model: which labels make up an endpoint's security identity,
//! and the one canonical string each label set has.
//!
//! A label is `source:key=value`. Pod labels have the source `k8s`; the
//! namespace joins as `k8s:io.kubernetes.pod.namespace=<ns>`; reserved
//! identities use the source `reserved` (see [`crate::numbers`]). Labels that
//! change with every rollout but say nothing about security
//! (`pod-template-hash`, ...) are dropped by a [`LabelFilter`] before the
//! identity is chosen, or every rollout would mint new identities.
//!
//! Canonical form: the labels sorted by (source, key, value) and rendered as
//! `source:key=value` (`source:key` for an empty value) joined with `;`, e.g.
//! `k8s:app=web;k8s:io.kubernetes.pod.namespace=default`. Keys never contain
//! `:`, `=` or `;` and values never contain `;`, so the form parses back
//! unambiguously. It is also the label set's etcd key, after
//! [`escape_key`] (label keys such as `app.kubernetes.io/name` contain `/`).

use std::collections::BTreeSet;
use std::fmt;

use crate::error::IdentityError;

/// Source of pod labels.
pub const SOURCE_K8S: &str = "k8s";
/// Source of the reserved identities' labels; never accepted from clients.
pub const SOURCE_RESERVED: &str = "reserved";
/// Source of CIDR identities' labels (node-local); never accepted from clients.
pub const SOURCE_CIDR: &str = "cidr";
/// Key of the label every pod's label set gets from its namespace.
pub const NAMESPACE_KEY: &str = "io.kubernetes.pod.namespace";

/// Longest canonical form accepted. Kubernetes keeps labels far smaller; the
/// limit keeps etcd keys reasonable.
pub const MAX_CANONICAL_LEN: usize = 8 * 1024;

/// Label keys excluded by default: they differ between replicas or
/// rollouts of the same workload and carry no security meaning.
pub const DEFAULT_EXCLUDES: &[&str] = &[
    "pod-template-hash",
    "controller-revision-hash",
    "statefulset.kubernetes.io/pod-name",
    "pod-template-generation",
];

/// One label, rendered `source:key=value`, or `source:key` when the value
/// is empty (as reserved labels are: `reserved:host`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Label {
    /// Where it comes from (`k8s`, `reserved`, ...).
    pub source: String,
    /// The key, without the source.
    pub key: String,
    /// The value; may be empty.
    pub value: String,
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.value.is_empty() {
            write!(f, "{}:{}", self.source, self.key)
        } else {
            write!(f, "{}:{}={}", self.source, self.key, self.value)
        }
    }
}

// === impl Label ===

impl Label {
    /// A label from a client: `raw_key` is `key` (source `k8s`) or
    /// `source:key`. Reserved sources are refused.
    pub fn from_client(field: &str, raw_key: &str, value: &str) -> Result<Self, IdentityError> {
        let invalid = |reason: &str| IdentityError::InvalidLabel {
            field: field.into(),
            label: format!("{raw_key}={value}"),
            reason: reason.into(),
        };
        let (source, key) = match raw_key.split_once(':') {
            Some((s, k)) => (s, k),
            None => (SOURCE_K8S, raw_key),
        };
        if source.is_empty()
            || !source
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(invalid(
                "the source must be lowercase letters, digits and `-`",
            ));
        }
        if source == SOURCE_RESERVED || source == SOURCE_CIDR {
            return Err(invalid(&format!(
                "the source `{source}` is kept for identities the service assigns itself"
            )));
        }
        if key.is_empty() {
            return Err(invalid("the key is empty"));
        }
        if let Some(c) = key
            .chars()
            .find(|c| !c.is_ascii_graphic() || matches!(c, ':' | '=' | ';'))
        {
            return Err(invalid(&format!("the key may not contain {c:?}")));
        }
        if let Some(c) = value.chars().find(|c| !c.is_ascii_graphic() || *c == ';') {
            return Err(invalid(&format!("the value may not contain {c:?}")));
        }
        Ok(Self {
            source: source.into(),
            key: key.into(),
            value: value.into(),
        })
    }

    /// A reserved identity's label, `reserved:<name>`.
    pub fn reserved(name: &str) -> Self {
        Self {
            source: SOURCE_RESERVED.into(),
            key: name.into(),
            value: String::new(),
        }
    }
}

/// A set of labels: what an identity stands for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct LabelSet(BTreeSet<Label>);

// === impl LabelSet ===

impl LabelSet {
    /// A pod's label set: its labels minus those `filter` excludes, plus its
    /// namespace.
    pub fn for_pod<'a>(
        namespace: &str,
        labels: impl IntoIterator<Item = (&'a str, &'a str)>,
        filter: &LabelFilter,
    ) -> Result<Self, IdentityError> {
        if namespace.is_empty() {
            return Err(IdentityError::Empty {
                field: "namespace".into(),
            });
        }
        let ns = Label::from_client("namespace", NAMESPACE_KEY, namespace)?;
        let mut set = BTreeSet::new();
        for (k, v) in labels {
            let label = Label::from_client("labels", k, v)?;
            if label.source == SOURCE_K8S && label.key == NAMESPACE_KEY && label.value != namespace
            {
                return Err(IdentityError::InvalidLabel {
                    field: "labels".into(),
                    label: label.to_string(),
                    reason: format!("contradicts namespace `{namespace}`"),
                });
            }
            if !filter.excludes(&label) {
                set.insert(label);
            }
        }
        set.insert(ns);
        let set = Self(set);
        let len = set.canonical().len();
        if len > MAX_CANONICAL_LEN {
            return Err(IdentityError::InvalidLabel {
                field: "labels".into(),
                label: format!(
                    "{}...",
                    set.canonical().chars().take(64).collect::<String>()
                ),
                reason: format!("the label set is {len} bytes long; at most {MAX_CANONICAL_LEN}"),
            });
        }
        Ok(set)
    }

    /// A set of exactly these labels (no filtering, no validation).
    pub fn from_labels(labels: impl IntoIterator<Item = Label>) -> Self {
        Self(labels.into_iter().collect())
    }

    /// The canonical form: sorted `source:key=value` joined with `;`.
    pub fn canonical(&self) -> String {
        self.strings().join(";")
    }

    /// The labels as sorted `source:key=value` strings.
    pub fn strings(&self) -> Vec<String> {
        self.0.iter().map(Label::to_string).collect()
    }

    /// The labels.
    pub fn iter(&self) -> impl Iterator<Item = &Label> {
        self.0.iter()
    }
}

impl fmt::Display for LabelSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.canonical())
    }
}

/// Splits a canonical form back into its label strings.
pub fn split_canonical(canonical: &str) -> Vec<String> {
    if canonical.is_empty() {
        return Vec::new();
    }
    canonical.split(';').map(str::to_string).collect()
}

/// Makes a canonical form usable as one etcd key segment: `%` becomes `%25`
/// and `/` becomes `%2F` (percent-encoding of just these two bytes), so the
/// key has no `/` and decodes back exactly.
pub fn escape_key(canonical: &str) -> String {
    canonical.replace('%', "%25").replace('/', "%2F")
}

/// The inverse of [`escape_key`].
pub fn unescape_key(escaped: &str) -> String {
    escaped.replace("%2F", "/").replace("%25", "%")
}

/// Which label keys do not count towards an identity. A pattern is a key
/// (`pod-template-hash`), or a key prefix ending in `*`
/// (`controller.example.com/*`); it matches the key without its source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelFilter {
    exclude: Vec<KeyPattern>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum KeyPattern {
    Exact(String),
    Prefix(String),
}

impl Default for LabelFilter {
    fn default() -> Self {
        Self {
            exclude: DEFAULT_EXCLUDES
                .iter()
                .map(|k| KeyPattern::Exact((*k).to_string()))
                .collect(),
        }
    }
}

// === impl LabelFilter ===

impl LabelFilter {
    /// A filter excluding `patterns` (see the type's doc for the syntax).
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> Result<Self, IdentityError> {
        let mut exclude = Vec::new();
        for p in patterns {
            let p = p.as_ref().trim();
            let invalid = |reason: &str| IdentityError::InvalidConfig {
                flag: "label-filter-exclude".into(),
                value: p.into(),
                reason: reason.into(),
            };
            if p.is_empty() {
                continue;
            }
            let (body, prefix) = match p.strip_suffix('*') {
                Some(b) => (b, true),
                None => (p, false),
            };
            if body.contains('*') {
                return Err(invalid("`*` is only allowed at the end"));
            }
            if prefix && body.is_empty() {
                return Err(invalid("`*` alone would exclude every label"));
            }
            exclude.push(if prefix {
                KeyPattern::Prefix(body.into())
            } else {
                KeyPattern::Exact(body.into())
            });
        }
        Ok(Self { exclude })
    }

    /// Whether `label` is dropped. The namespace label never is.
    pub fn excludes(&self, label: &Label) -> bool {
        if label.source == SOURCE_K8S && label.key == NAMESPACE_KEY {
            return false;
        }
        self.exclude.iter().any(|p| match p {
            KeyPattern::Exact(k) => label.key == *k,
            KeyPattern::Prefix(k) => label.key.starts_with(k.as_str()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ns: &str, labels: &[(&str, &str)]) -> Result<LabelSet, IdentityError> {
        LabelSet::for_pod(ns, labels.iter().copied(), &LabelFilter::default())
    }

    #[test]
    fn a_pods_label_set_is_its_labels_plus_namespace_sorted_and_joined() {
        let set = pod("default", &[("app", "web"), ("tier", "front")]).expect("valid");
        assert_eq!(
            set.canonical(),
            "k8s:app=web;k8s:io.kubernetes.pod.namespace=default;k8s:tier=front"
        );
        // Order of input does not matter.
        let again = pod("default", &[("tier", "front"), ("app", "web")]).expect("valid");
        assert_eq!(set, again);
    }

    #[test]
    fn rollout_noise_is_filtered_out_of_the_identity() {
        let a = pod(
            "default",
            &[
                ("app", "web"),
                ("pod-template-hash", "5d9f8"),
                ("controller-revision-hash", "abc"),
                ("statefulset.kubernetes.io/pod-name", "web-0"),
                ("pod-template-generation", "3"),
            ],
        )
        .expect("valid");
        let b = pod("default", &[("app", "web"), ("pod-template-hash", "77aa1")]).expect("valid");
        assert_eq!(
            a.canonical(),
            "k8s:app=web;k8s:io.kubernetes.pod.namespace=default"
        );
        assert_eq!(a, b);
    }

    #[test]
    fn filter_patterns_are_exact_keys_or_prefixes() {
        let f = LabelFilter::new(&["team", "example.com/*", ""]).expect("valid");
        let l = |k: &str| Label::from_client("labels", k, "x").expect("label");
        assert!(f.excludes(&l("team")));
        assert!(!f.excludes(&l("teams")));
        assert!(f.excludes(&l("example.com/build")));
        assert!(f.excludes(&l("container:example.com/build")));
        assert!(!f.excludes(&l("pod-template-hash")), "defaults replaced");
        assert!(
            !f.excludes(&l(NAMESPACE_KEY)),
            "the namespace always counts"
        );
        assert!(LabelFilter::new(&["*"]).is_err());
        let err = LabelFilter::new(&["a*b"]).expect_err("inner star");
        assert_eq!(
            err.to_string(),
            "label-filter-exclude: invalid value `a*b`: `*` is only allowed at the end"
        );
    }

    #[test]
    fn keys_may_carry_a_source_but_not_a_reserved_one() {
        let set = pod("ns", &[("container:app", "x")]).expect("valid");
        assert_eq!(
            set.canonical(),
            "container:app=x;k8s:io.kubernetes.pod.namespace=ns"
        );
        let err = pod("ns", &[("reserved:host", "")]).expect_err("reserved");
        assert_eq!(
            err.to_string(),
            "labels: invalid label `reserved:host=`: the source `reserved` is kept for identities the service assigns itself"
        );
        assert!(pod("ns", &[("cidr:10.0.0.0/8", "")]).is_err());
        assert!(pod("ns", &[("Bad Source:app", "x")]).is_err());
    }

    #[test]
    fn separators_and_blanks_are_refused_so_the_canonical_form_stays_unambiguous() {
        for (k, v) in [
            ("a;b", "x"),
            ("a=b", "x"),
            ("", "x"),
            ("app", "x;y"),
            ("app", "a b"),
        ] {
            let err = pod("ns", &[(k, v)]).expect_err("invalid");
            assert!(
                err.to_string()
                    .starts_with(&format!("labels: invalid label `{k}={v}`")),
                "{err}"
            );
        }
        assert_eq!(
            pod("", &[]).expect_err("no ns").to_string(),
            "namespace: must not be empty"
        );
        // An empty value is a value; it renders without `=`.
        let set = pod("ns", &[("flag", "")]).expect("valid");
        assert_eq!(
            set.canonical(),
            "k8s:flag;k8s:io.kubernetes.pod.namespace=ns"
        );
    }

    #[test]
    fn a_namespace_label_must_agree_with_the_namespace() {
        assert!(pod("a", &[(NAMESPACE_KEY, "a")]).is_ok());
        let err = pod("a", &[(NAMESPACE_KEY, "b")]).expect_err("conflict");
        assert!(
            err.to_string().contains("contradicts namespace `a`"),
            "{err}"
        );
    }

    #[test]
    fn huge_label_sets_are_refused() {
        let big = "v".repeat(600);
        let labels: Vec<(String, String)> =
            (0..20).map(|i| (format!("k{i}"), big.clone())).collect();
        let err = LabelSet::for_pod(
            "ns",
            labels.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            &LabelFilter::default(),
        )
        .expect_err("too long");
        assert!(err.to_string().contains("at most 8192"), "{err}");
    }

    #[test]
    fn keys_with_slashes_escape_into_one_etcd_segment_and_back() {
        let set = pod("ns", &[("app.kubernetes.io/name", "web%1")]).expect("valid");
        let c = set.canonical();
        let k = escape_key(&c);
        assert!(!k.contains('/'), "{k}");
        assert_eq!(
            k,
            "k8s:app.kubernetes.io%2Fname=web%251;k8s:io.kubernetes.pod.namespace=ns"
        );
        assert_eq!(unescape_key(&k), c);
        assert_eq!(split_canonical(&c).len(), 2);
        assert!(split_canonical("").is_empty());
    }
}
