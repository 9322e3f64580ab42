//! The cluster's etcd: one member on loopback, data under `DIR/etcd`.
//!
//! Services reach it from the host namespace only, so it listens on
//! 127.0.0.1 and needs no TLS. Readiness is etcd's own `GET /health`, spoken
//! as plain HTTP/1.0 over a TCP stream: one request does not justify an HTTP
//! client dependency.

use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Member name, also used in `--initial-cluster`.
const MEMBER: &str = "membrane";

/// The client URL for `port`.
pub fn client_url(port: u16) -> String {
    format!("http://127.0.0.1:{port}")
}

/// Command-line arguments for a single-member etcd.
pub fn args(data_dir: &Path, client_port: u16, peer_port: u16) -> Vec<OsString> {
    let client = client_url(client_port);
    let peer = format!("http://127.0.0.1:{peer_port}");
    let mut args: Vec<OsString> = vec!["--name".into(), MEMBER.into(), "--data-dir".into()];
    args.push(data_dir.as_os_str().to_owned());
    for arg in [
        "--listen-client-urls",
        &client,
        "--advertise-client-urls",
        &client,
        "--listen-peer-urls",
        &peer,
        "--initial-advertise-peer-urls",
        &peer,
        "--initial-cluster",
        &format!("{MEMBER}={peer}"),
        "--initial-cluster-state",
        "new",
        "--logger",
        "zap",
        "--log-outputs",
        "stderr",
    ] {
        args.push(arg.into());
    }
    args
}

/// Whether etcd on `127.0.0.1:port` reports itself healthy.
pub async fn is_healthy(port: u16, timeout: Duration) -> bool {
    let probe = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        stream
            .write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .await
            .ok()?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.ok()?;
        Some(health_ok(&response))
    };
    matches!(tokio::time::timeout(timeout, probe).await, Ok(Some(true)))
}

/// etcd answers `{"health":"true"}` (3.4 and 3.5 add more fields).
fn health_ok(response: &[u8]) -> bool {
    let text = String::from_utf8_lossy(response);
    text.starts_with("HTTP/1.")
        && text.contains(" 200 ")
        && text.replace(' ', "").contains("\"health\":\"true\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_healthy_answer_is_recognised_and_an_unhealthy_one_is_not() {
        assert!(health_ok(
            b"HTTP/1.0 200 OK\r\n\r\n{\"health\":\"true\",\"reason\":\"\"}"
        ));
        assert!(!health_ok(
            b"HTTP/1.0 503 Service Unavailable\r\n\r\n{\"health\":\"false\"}"
        ));
        assert!(!health_ok(b""));
    }

    #[test]
    fn the_member_listens_on_loopback_with_the_given_ports() {
        let args: Vec<String> = args(Path::new("/tmp/e"), 23790, 23800)
            .into_iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let joined = args.join(" ");
        assert!(joined.contains("--data-dir /tmp/e"));
        assert!(joined.contains("--listen-client-urls http://127.0.0.1:23790"));
        assert!(joined.contains("--initial-cluster membrane=http://127.0.0.1:23800"));
    }
}
