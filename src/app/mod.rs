//! What the commands do, as library calls: the CLI parses arguments, calls these and prints
//! what they return.

pub mod boards;
pub mod can_devices;
pub mod config;
pub mod flash;
pub mod flash_all;
mod flash_effects;
pub mod katapult_check;
pub mod seed;
pub mod watch;
