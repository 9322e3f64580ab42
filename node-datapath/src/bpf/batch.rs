// SPDX-License-Identifier: Apache-2.0
//! `BPF_MAP_UPDATE_BATCH` and `BPF_MAP_DELETE_BATCH`: many elements of one
//! map in one `bpf(2)` call. aya 0.14 has no wrapper for them, so this is
//! the one raw `bpf(2)` call of the crate.
//!
//! The service lb tables (`sock.rs`) need them twice: an inner array of a
//! table is filled in one call instead of one per slot, and many inner
//! arrays are swapped into (or deleted from) the hash-of-maps
//! `mb_lb_tables` in one call, so the `synchronize_rcu()` the kernel runs
//! after every write to a map-of-maps (`maybe_wait_bpf_programs`) is paid
//! once per batch instead of once per service.
//!
//! The kernel (`generic_map_update_batch` / `generic_map_delete_batch`)
//! applies a batch element by element, in order, each as the ordinary
//! single-element update or delete (for a map-of-maps: one pointer swap per
//! key), stops at the first failure and reports how many it applied. So a
//! batch is no transaction: a prefix of it may be applied, and
//! [`BatchError::applied`] says how long.

use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd},
};

/// `enum bpf_cmd` in linux/bpf.h.
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
/// The kernel-internal `ENOTSUPP` that `bpf(2)` returns for a batch command
/// the map type does not implement.
const ENOTSUPP: i32 = 524;

/// The `batch` member of `union bpf_attr` (linux/bpf.h). The kernel accepts
/// an attr shorter than its own union and treats the rest as zero.
#[repr(C)]
#[derive(Debug, Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    /// In: the number of elements; out: the number applied.
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// A batch that failed, possibly after applying a prefix of its elements.
#[derive(Debug, thiserror::Error)]
#[error("{command}: {applied} of {total} elements applied")]
pub(crate) struct BatchError {
    /// The command.
    pub command: &'static str,
    /// How many elements, from the first, the kernel applied.
    pub applied: usize,
    /// How many were asked for.
    pub total: usize,
    /// What stopped it.
    #[source]
    pub source: io::Error,
}

impl BatchError {
    /// The kernel does not have this batch command for this map type (or at
    /// all: older kernels answer an unknown command with `EINVAL`).
    pub fn is_unsupported(&self) -> bool {
        self.applied == 0
            && matches!(
                self.source.raw_os_error(),
                Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP)
            )
    }
}

/// Updates `keys[i]` to `values[i]` for every `i`, in order, with
/// `BPF_ANY` semantics. `K` and `V` must be the map's key and value types
/// (for a map-of-maps the value is the inner map's fd as `u32`).
pub(crate) fn update<K: aya::Pod, V: aya::Pod>(
    map: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> Result<(), BatchError> {
    let total = keys.len().min(values.len());
    let mut attr = attr(map, "BPF_MAP_UPDATE_BATCH", total)?;
    attr.keys = keys.as_ptr() as u64;
    attr.values = values.as_ptr() as u64;
    call(BPF_MAP_UPDATE_BATCH, "BPF_MAP_UPDATE_BATCH", attr, total)
}

/// Deletes `keys`, in order. A missing key stops the batch with `ENOENT`.
pub(crate) fn delete<K: aya::Pod>(map: BorrowedFd<'_>, keys: &[K]) -> Result<(), BatchError> {
    let mut attr = attr(map, "BPF_MAP_DELETE_BATCH", keys.len())?;
    attr.keys = keys.as_ptr() as u64;
    call(
        BPF_MAP_DELETE_BATCH,
        "BPF_MAP_DELETE_BATCH",
        attr,
        keys.len(),
    )
}

/// Whether the kernel has `BPF_MAP_UPDATE_BATCH` (`update`) or
/// `BPF_MAP_DELETE_BATCH` for this map: an empty batch, which the kernel
/// accepts without doing anything when it has the command (it still waits
/// for readers on a map-of-maps: one `synchronize_rcu()`).
pub(crate) fn probe(map: BorrowedFd<'_>, update: bool) -> Result<bool, BatchError> {
    let r = if update {
        self::update::<u32, u32>(map, &[], &[])
    } else {
        delete::<u32>(map, &[])
    };
    match r {
        Ok(()) => Ok(true),
        Err(e) if e.is_unsupported() => Ok(false),
        Err(e) => Err(e),
    }
}

fn attr(map: BorrowedFd<'_>, command: &'static str, total: usize) -> Result<BatchAttr, BatchError> {
    let count = u32::try_from(total).map_err(|_| BatchError {
        command,
        applied: 0,
        total,
        source: io::Error::from_raw_os_error(libc::E2BIG),
    })?;
    // A valid fd is never negative.
    let map_fd = map.as_raw_fd() as u32;
    Ok(BatchAttr {
        count,
        map_fd,
        ..BatchAttr::default()
    })
}

/// The `bpf(2)` call itself.
///
/// `unsafe` because the kernel reads `attr.count` elements through the raw
/// `keys` (and `values`) addresses: the callers above take them from slices
/// that outlive the call, and clamp `count` to the slices' lengths.
#[allow(
    unsafe_code,
    reason = "bpf(2) has no safe wrapper for batch commands in aya 0.14"
)]
fn call(
    cmd: libc::c_long,
    command: &'static str,
    mut attr: BatchAttr,
    total: usize,
) -> Result<(), BatchError> {
    // SAFETY: `attr` is a valid `#[repr(C)]` prefix of `union bpf_attr`
    // that lives across the call; the pointers in it come from live slices
    // of at least `count` elements of the map's key and value sizes (see
    // the callers); the kernel writes back only `count`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            &raw mut attr,
            size_of::<BatchAttr>() as libc::c_uint,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let source = io::Error::last_os_error();
    Err(BatchError {
        command,
        applied: (attr.count as usize).min(total),
        total,
        source,
    })
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd as _;

    use aya::maps::{Array, IterableMap as _, MapData};

    use super::*;

    fn is_root() -> bool {
        std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1))
                == Some("0")
        })
    }

    #[test]
    fn the_batch_attr_has_the_layout_of_linux_bpf_h() {
        // __aligned_u64 × 4, __u32 × 2, __u64 × 2.
        assert_eq!(size_of::<BatchAttr>(), 56);
        assert_eq!(std::mem::offset_of!(BatchAttr, count), 32);
        assert_eq!(std::mem::offset_of!(BatchAttr, map_fd), 36);
        assert_eq!(std::mem::offset_of!(BatchAttr, elem_flags), 40);
    }

    #[test]
    fn a_batch_update_fills_an_array_and_a_failing_one_reports_the_applied_prefix() {
        if !is_root() {
            let _ = std::io::Write::write_all(
                &mut std::io::stderr(),
                b"\n==== SKIPPED (needs root): batch update ====\n",
            );
            return;
        }
        let array = Array::<MapData, u32>::create(4, 0).expect("create array");
        let fd = array.map().fd().as_fd();
        assert!(probe(fd, true).expect("probe"));
        update(fd, &[0u32, 1, 2, 3], &[10u32, 11, 12, 13]).expect("update");
        let read = |i: u32| array.get(&i, 0).expect("get");
        assert_eq!((0..4).map(read).collect::<Vec<_>>(), [10, 11, 12, 13]);

        // Key 9 is out of bounds: the two before it are applied, the rest not.
        let e = update(fd, &[0u32, 1, 9, 3], &[20u32, 21, 22, 23]).expect_err("key 9");
        assert_eq!((e.applied, e.total), (2, 4), "{e}");
        assert!(!e.is_unsupported());
        assert_eq!((0..4).map(read).collect::<Vec<_>>(), [20, 21, 12, 13]);
    }
}
