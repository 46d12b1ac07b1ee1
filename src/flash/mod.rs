//! Getting new firmware onto a board: bootloader entry, the flash methods, and proof that
//! the board came back running it.

pub mod bridge;
pub mod can;
pub mod error;
pub mod external;
pub mod identify;
pub mod katapult;
pub mod serial;
pub mod usb;

pub use error::FlashError;
