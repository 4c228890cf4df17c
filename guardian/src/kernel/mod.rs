//! The kernel side: loading the eBPF program, its tracepoints and maps, and decoding its records.

pub mod btf;
pub mod events;
pub mod loader;
pub mod tracefs;
