//! Running CNI plugin binaries the way a runtime does: a clean environment
//! holding only CNI_* variables, the netconf on stdin, JSON on stdout.
#![allow(dead_code, reason = "each test file uses a different subset")]

use std::collections::BTreeSet;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

/// Our binary, built by cargo for this test run.
pub fn ours() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_membrane-cni"))
}

/// What one invocation printed and returned.
#[derive(Debug)]
pub struct Outcome {
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Outcome {
    /// stdout as JSON; panics with the raw output if it is not.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}): {:?} / stderr {:?}",
                self.stdout, self.stderr
            )
        })
    }

    /// Asserts a spec error object with `code` and exit status 1, and returns it.
    pub fn expect_error(&self, code: u64) -> Value {
        assert_eq!(self.status, 1, "exit status; stdout {:?}", self.stdout);
        let v = self.json();
        assert_eq!(v["code"], code, "error code in {v}");
        assert!(
            v["msg"].as_str().is_some_and(|m| !m.is_empty()),
            "msg in {v}"
        );
        v
    }
}

/// Runs `plugin` with exactly `env` (plus nothing inherited) and `stdin`.
pub fn run(plugin: &Path, env: &[(&str, &str)], stdin: &str) -> Outcome {
    let mut child = Command::new(plugin)
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", plugin.display()));
    if let Some(mut input) = child.stdin.take() {
        // A plugin may exit without reading stdin (VERSION): ignore EPIPE.
        let _ = input.write_all(stdin.as_bytes());
    }
    let out = child.wait_with_output().expect("wait for plugin");
    Outcome {
        status: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).trim().to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The top-level keys of a JSON object.
pub fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default()
}

/// The keys every spec error object of ours has.
pub fn error_keys() -> BTreeSet<String> {
    ["cniVersion", "code", "msg", "details"]
        .map(String::from)
        .into()
}
