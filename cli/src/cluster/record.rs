//! The record of host resources a cluster created (`DIR/created.json`).
//!
//! Why: `down` must clean up a half-started cluster, yet never touch a
//! namespace or device someone else made with the same name. So `up` writes
//! each name here *before* creating it (a crash in between leaves a name
//! `down` finds already gone, never an unrecorded resource), and `down`
//! deletes only what is listed.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

const FILE: &str = "created.json";

/// Names of what this state directory's cluster created on the host.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Created {
    /// Network namespaces (`node-1`, `external`).
    #[serde(default)]
    pub netns: Vec<String>,
    /// Host network devices (`mbr0`, `mbn-1`, ...).
    #[serde(default)]
    pub links: Vec<String>,
    /// bpffs directories, parents before children.
    #[serde(default)]
    pub bpf_dirs: Vec<PathBuf>,
}

/// [`Created`] bound to its file, saved after every change.
#[derive(Debug)]
pub struct Record {
    path: PathBuf,
    /// What is recorded.
    pub created: Created,
}

// === impl Record ===

impl Record {
    /// Loads the record of `state_dir`; an absent file is an empty record.
    pub fn load(state_dir: &Path) -> anyhow::Result<Self> {
        let path = state_dir.join(FILE);
        let created = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("parse {}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Created::default(),
            Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
        };
        Ok(Self { path, created })
    }

    /// Whether nothing is recorded.
    pub fn is_empty(&self) -> bool {
        self.created == Created::default()
    }

    /// Whether namespace `name` was created by this cluster.
    pub fn owns_netns(&self, name: &str) -> bool {
        self.created.netns.iter().any(|n| n == name)
    }

    /// Whether host device `name` was created by this cluster.
    pub fn owns_link(&self, name: &str) -> bool {
        self.created.links.iter().any(|n| n == name)
    }

    /// Records a namespace about to be created.
    pub fn add_netns(&mut self, name: &str) -> anyhow::Result<()> {
        if !self.owns_netns(name) {
            self.created.netns.push(name.to_string());
        }
        self.save()
    }

    /// Records a host device about to be created.
    pub fn add_link(&mut self, name: &str) -> anyhow::Result<()> {
        if !self.owns_link(name) {
            self.created.links.push(name.to_string());
        }
        self.save()
    }

    /// Records a bpffs directory about to be created.
    pub fn add_bpf_dir(&mut self, dir: &Path) -> anyhow::Result<()> {
        if !self.created.bpf_dirs.iter().any(|d| d == dir) {
            self.created.bpf_dirs.push(dir.to_path_buf());
        }
        self.save()
    }

    /// Writes the record, or removes the file when nothing is left in it.
    pub fn save(&self) -> anyhow::Result<()> {
        if self.is_empty() {
            return match std::fs::remove_file(&self.path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(e).with_context(|| format!("remove {}", self.path.display()))
                }
                _ => Ok(()),
            };
        }
        let json = serde_json::to_vec_pretty(&self.created).context("serialize created.json")?;
        super::write_atomic(&self.path, &json)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_survives_a_reload_and_disappears_when_emptied() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut record = Record::load(dir.path()).expect("load");
        assert!(record.is_empty());
        record.add_link("mbr0").expect("add");
        record.add_netns("node-1").expect("add");
        record.add_netns("node-1").expect("add twice");
        let mut again = Record::load(dir.path()).expect("reload");
        assert!(again.owns_link("mbr0") && again.owns_netns("node-1"));
        assert!(!again.owns_netns("node-2"));
        assert_eq!(again.created.netns.len(), 1);
        again.created = Created::default();
        again.save().expect("save");
        assert!(!dir.path().join(FILE).exists());
    }
}
