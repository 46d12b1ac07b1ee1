//! The live dashboard (`kflash` on a terminal, `kflash dashboard`): a sans-IO model
//! ([`model::State`], fed inputs, returning what to do), a pure drawing function
//! ([`render::render`]) and the runner that feeds it from the event streams (hotplug,
//! Moonraker's link, the daemon, the terminal) and carries out what it asks.

pub mod model;
pub mod render;
pub mod runner;
pub mod view;

#[cfg(test)]
mod tests;
