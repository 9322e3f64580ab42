//! Local clusters (being written).
