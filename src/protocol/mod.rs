//! Wire protocols spoken with the boards: Katapult's bootloader framing and Klipper's
//! message blocks (used for `identify`). Both are sans-IO codecs: bytes in, frames out.

pub mod katapult;
pub mod klipper;
