//! kflash: build, flash and verify Klipper/Kalico MCU firmware per registered board,
//! driven by udev hotplug events instead of polling.
//!
//! The library holds all logic; the `kflash` binary only parses arguments, calls into
//! this crate and draws what it returns.

pub mod app;
pub mod atomic_file;
pub mod can;
pub mod daemon;
pub mod error;
pub mod event;
pub mod firmware;
pub mod flash;
pub mod history;
pub mod hotplug;
pub mod identity;
pub mod install;
pub mod json;
pub mod kconfig;
pub mod locator;
pub mod moonraker;
pub mod moonraker_link;
pub mod orchestrator;
pub mod profiles;
pub mod protocol;
pub mod registry;
pub mod safety;
pub mod service;
pub mod version;

pub use error::{Error, Result};
