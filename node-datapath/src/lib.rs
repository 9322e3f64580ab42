//! The node agent: the only Membrane process that touches eBPF.
//!
//! Module map:
//! - `bpf`: loads the C programs, owns every map and link (the only module with raw aya calls).
