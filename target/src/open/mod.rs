//! Opening a cache: `create` writes a new cache set (superblocks, an empty checkpoint), and
//! `recover` brings one back to a running engine, in phases (open the legs → apply the fault
//! record → walk the log → repair torn mirror copies → adopt a crashed
//! daemon's RAM buffers → rebuild the state → start).

pub mod create;
pub mod recover;
