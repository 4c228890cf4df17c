//! Embeds the eBPF object built by `cargo xtask build-ebpf`, or a placeholder when it has not
//! been built (so `cargo check`, clippy and unit tests need no BPF toolchain). The daemon
//! refuses to load the placeholder with a message saying how to build the real object.

use std::{env, fs, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=GUARDIAN_EBPF_OBJECT");
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let object = env::var_os("GUARDIAN_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../target/ebpf/bpfel-unknown-none/release/guardian"));
    println!("cargo:rerun-if-changed={}", object.display());
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo")).join("guardian-ebpf.o");
    match fs::read(&object) {
        Ok(bytes) => fs::write(&out, bytes).expect("writing OUT_DIR/guardian-ebpf.o"),
        Err(_) => {
            println!(
                "cargo:warning=eBPF object not found at {}: building with a placeholder \
                 (run `cargo xtask build-ebpf` for a working daemon)",
                object.display()
            );
            fs::write(&out, b"").expect("writing OUT_DIR/guardian-ebpf.o");
        }
    }
}
