//! Labels and label selectors, as Cilium reads them.
//!
//! An identity's labels are `source:key=value` strings (`k8s:app=web`,
//! `reserved:host`). A selector key may carry a source too: `k8s:app` matches
//! only the `k8s` source, while `any:app` and a plain `app` match the key
//! from any source (so a plain `app` matches `k8s:app`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// Source of pod labels.
pub const SOURCE_K8S: &str = "k8s";
/// The selector source that matches every source.
pub const SOURCE_ANY: &str = "any";
/// Key of the label carrying a pod's namespace.
pub const NAMESPACE_KEY: &str = "io.kubernetes.pod.namespace";
/// Prefix under which a pod's namespace labels join its labels (as Cilium
/// does): `k8s:io.cilium.k8s.namespace.labels.team=a`.
pub const NAMESPACE_LABELS_PREFIX: &str = "io.cilium.k8s.namespace.labels.";
/// Label every namespace carries with its own name (Kubernetes sets it).
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// One label.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Label {
    /// Where it comes from (`k8s`, `reserved`, ...).
    pub source: String,
    /// The key without the source.
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
    /// A label.
    pub fn new(source: &str, key: &str, value: &str) -> Self {
        Self {
            source: source.into(),
            key: key.into(),
            value: value.into(),
        }
    }

    /// Parses `source:key=value` (`source:key` for an empty value; a missing
    /// source means `k8s`).
    pub fn parse(s: &str) -> Self {
        let (kv, value) = match s.split_once('=') {
            Some((kv, v)) => (kv, v),
            None => (s, ""),
        };
        let (source, key) = split_source(kv).unwrap_or((SOURCE_K8S, kv));
        Self::new(source, key, value)
    }
}

fn split_source(key: &str) -> Option<(&str, &str)> {
    key.split_once(':')
}

/// The labels of an identity.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSet(BTreeSet<Label>);

// === impl LabelSet ===

impl LabelSet {
    /// Parses `source:key=value` strings.
    pub fn parse<S: AsRef<str>>(labels: impl IntoIterator<Item = S>) -> Self {
        Self(
            labels
                .into_iter()
                .map(|l| Label::parse(l.as_ref()))
                .collect(),
        )
    }

    /// Adds a label.
    pub fn insert(&mut self, label: Label) {
        self.0.insert(label);
    }

    /// The values of `key` from `source` (every source when `None`).
    fn values<'a>(
        &'a self,
        source: Option<&'a str>,
        key: &'a str,
    ) -> impl Iterator<Item = &'a str> {
        self.0
            .iter()
            .filter(move |l| l.key == key && source.is_none_or(|s| s == l.source))
            .map(|l| l.value.as_str())
    }

    /// The pod namespace, if the set has one.
    pub fn namespace(&self) -> Option<&str> {
        self.values(Some(SOURCE_K8S), NAMESPACE_KEY).next()
    }

    /// Every label.
    pub fn iter(&self) -> impl Iterator<Item = &Label> {
        self.0.iter()
    }

    /// The labels as `source:key=value` strings.
    pub fn to_strings(&self) -> Vec<String> {
        self.0.iter().map(Label::to_string).collect()
    }
}

/// A selector operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operator {
    /// The key has one of the values.
    In,
    /// The key is absent or has none of the values.
    NotIn,
    /// The key is present.
    Exists,
    /// The key is absent.
    DoesNotExist,
}

/// One requirement of a selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirement {
    /// Source the key must come from; `None` for any source.
    pub source: Option<String>,
    /// The key.
    pub key: String,
    /// The operator.
    pub op: Operator,
    /// Values for `In` / `NotIn`.
    pub values: BTreeSet<String>,
}

// === impl Requirement ===

impl Requirement {
    /// A requirement on a selector key as written (`app`, `k8s:app`, `any:app`).
    pub fn new(raw_key: &str, op: Operator, values: impl IntoIterator<Item = String>) -> Self {
        let (source, key) = match split_source(raw_key) {
            Some((SOURCE_ANY, k)) => (None, k),
            Some((s, k)) => (Some(s.to_string()), k),
            None => (None, raw_key),
        };
        Self {
            source,
            key: key.to_string(),
            op,
            values: values.into_iter().collect(),
        }
    }

    /// `source:key == value`, with the source fixed.
    pub fn equals(source: &str, key: &str, value: &str) -> Self {
        Self {
            source: Some(source.into()),
            key: key.into(),
            op: Operator::In,
            values: [value.to_string()].into(),
        }
    }

    fn matches(&self, labels: &LabelSet) -> bool {
        let mut values = labels.values(self.source.as_deref(), &self.key);
        match self.op {
            Operator::In => values.any(|v| self.values.contains(v)),
            Operator::NotIn => !values.any(|v| self.values.contains(v)),
            Operator::Exists => values.next().is_some(),
            Operator::DoesNotExist => values.next().is_none(),
        }
    }

    /// Whether this requirement is about `key` from the `k8s` source (or any).
    fn is_about_k8s(&self, key: &str) -> bool {
        self.key == key && self.source.as_deref().is_none_or(|s| s == SOURCE_K8S)
    }
}

/// A label selector: every requirement must hold. The empty selector
/// matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    /// The requirements.
    pub requirements: Vec<Requirement>,
}

// === impl Selector ===

impl Selector {
    /// Whether `labels` satisfy every requirement.
    pub fn matches(&self, labels: &LabelSet) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }

    /// Whether the selector says anything about the pod namespace.
    pub fn names_namespace(&self) -> bool {
        self.requirements
            .iter()
            .any(|r| r.is_about_k8s(NAMESPACE_KEY))
    }

    /// Whether the selector has no requirement.
    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    /// Adds a requirement.
    pub fn with(mut self, r: Requirement) -> Self {
        self.requirements.push(r);
        self
    }
}

/// The labels of a namespace that was never applied: only its name.
pub fn default_namespace_labels(ns: &str) -> BTreeMap<String, String> {
    [(NAMESPACE_NAME_LABEL.to_string(), ns.to_string())].into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(labels: &[&str]) -> LabelSet {
        LabelSet::parse(labels)
    }

    #[test]
    fn a_plain_key_matches_any_source_and_a_prefixed_key_only_its_own() {
        let web = set(&["k8s:app=web", "k8s:io.kubernetes.pod.namespace=default"]);
        let plain = Selector::default().with(Requirement::new("app", Operator::In, ["web".into()]));
        let k8s =
            Selector::default().with(Requirement::new("k8s:app", Operator::In, ["web".into()]));
        let any =
            Selector::default().with(Requirement::new("any:app", Operator::In, ["web".into()]));
        let container = Selector::default().with(Requirement::new(
            "container:app",
            Operator::In,
            ["web".into()],
        ));
        assert!(plain.matches(&web));
        assert!(k8s.matches(&web));
        assert!(any.matches(&web));
        assert!(!container.matches(&web));
    }

    #[test]
    fn operators_follow_kubernetes_semantics() {
        let web = set(&["k8s:app=web", "k8s:tier=front"]);
        let req = |op, vals: &[&str]| {
            Selector::default().with(Requirement::new(
                "tier",
                op,
                vals.iter().map(|s| s.to_string()),
            ))
        };
        assert!(req(Operator::In, &["front", "back"]).matches(&web));
        assert!(!req(Operator::In, &["back"]).matches(&web));
        assert!(req(Operator::NotIn, &["back"]).matches(&web));
        assert!(!req(Operator::NotIn, &["front"]).matches(&web));
        assert!(req(Operator::Exists, &[]).matches(&web));
        assert!(!req(Operator::DoesNotExist, &[]).matches(&web));
        let bare = set(&["k8s:app=web"]);
        assert!(
            req(Operator::NotIn, &["front"]).matches(&bare),
            "NotIn holds when the key is absent"
        );
        assert!(req(Operator::DoesNotExist, &[]).matches(&bare));
        assert!(
            Selector::default().matches(&bare),
            "the empty selector matches everything"
        );
    }

    #[test]
    fn reserved_labels_parse_without_a_value() {
        let host = set(&["reserved:host"]);
        let sel =
            Selector::default().with(Requirement::new("reserved:host", Operator::In, ["".into()]));
        assert!(sel.matches(&host));
        assert_eq!(host.to_strings(), vec!["reserved:host"]);
        assert_eq!(host.namespace(), None);
        assert_eq!(
            set(&["k8s:io.kubernetes.pod.namespace=prod"]).namespace(),
            Some("prod")
        );
    }
}
