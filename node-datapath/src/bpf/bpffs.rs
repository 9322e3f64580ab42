// SPDX-License-Identifier: Apache-2.0
//! The BPF filesystem, where maps and links are pinned.

use std::path::Path;

use nix::{
    mount::{MsFlags, mount},
    sys::statfs::{BPF_FS_MAGIC, statfs},
};

use super::Error;

/// Where bpffs is conventionally mounted.
pub const BPFFS_PATH: &str = "/sys/fs/bpf";

/// Mounts bpffs at [`BPFFS_PATH`] unless a bpffs is already mounted there.
/// Returns whether this call mounted it. A fresh machine does not mount it
/// (see shared/STACK.md). Mounts in the caller's mount namespace.
pub fn ensure_bpffs() -> Result<bool, Error> {
    let path = Path::new(BPFFS_PATH);
    if is_bpffs(path) {
        return Ok(false);
    }
    mount(
        Some("bpffs"),
        path,
        Some("bpf"),
        MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|source| Error::MountBpffs {
        path: path.to_owned(),
        source,
    })?;
    Ok(true)
}

/// Whether `path` is on a bpffs (a mountpoint or below one).
pub(crate) fn is_bpffs(path: &Path) -> bool {
    statfs(path).is_ok_and(|s| s.filesystem_type() == BPF_FS_MAGIC)
}
