// SPDX-License-Identifier: Apache-2.0
//! Compiles every eBPF entry file `bpf/*.c` with clang into `OUT_DIR/<name>.o`;
//! `src/bpf/objects.rs` embeds them. A clang error fails the build with
//! clang's own output. `CLANG` overrides the compiler (default `clang-19`).

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

/// The flags the datapath is written for (see shared/STACK.md): `-g` because
/// aya needs BTF, the multiarch include dir because `-target bpf` does not
/// know where Debian keeps `asm/types.h`.
const CFLAGS: &[&str] = &[
    "-O2",
    "-g",
    "-Wall",
    "-Werror",
    "-target",
    "bpf",
    "-I/usr/include/x86_64-linux-gnu",
];

fn main() {
    let manifest_dir =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let bpf_dir = manifest_dir.join("bpf");
    let clang = env::var("CLANG").unwrap_or_else(|_| "clang-19".to_owned());

    // A directory: cargo rescans everything under it (entries and lib/*.h).
    println!("cargo:rerun-if-changed=bpf");
    println!("cargo:rerun-if-env-changed=CLANG");

    let mut entries: Vec<PathBuf> = fs::read_dir(&bpf_dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", bpf_dir.display()))
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|ext| ext == "c"))
        .collect();
    entries.sort();
    assert!(
        !entries.is_empty(),
        "no eBPF entry files in {}",
        bpf_dir.display()
    );

    for src in &entries {
        compile(&clang, &bpf_dir, src, &out_dir);
    }
}

fn compile(clang: &str, bpf_dir: &Path, src: &Path, out_dir: &Path) {
    let stem = src
        .file_stem()
        .expect("entry file has a name")
        .to_string_lossy();
    let obj = out_dir.join(format!("{stem}.o"));
    let output = Command::new(clang)
        .args(CFLAGS)
        .arg("-I")
        .arg(bpf_dir)
        .arg("-c")
        .arg(src)
        .arg("-o")
        .arg(&obj)
        .output()
        .unwrap_or_else(|e| panic!("run `{clang}` (install clang-19, or set CLANG): {e}"));
    if !output.status.success() {
        panic!(
            "clang failed on {} ({}):\n{}{}",
            src.display(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
