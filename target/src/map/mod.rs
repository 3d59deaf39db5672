//! The engine's maps: backing block → newest cached copy (`block_map`), and the discarded or
//! zeroed ranges not yet written back (`zero_ranges`).

pub mod block_map;
pub mod zero_ranges;
