//! CAN bus boards: Klipper's admin protocol (UUID query, node ids, bootloader request), the
//! USB-to-CAN bridge's UUID, and Katapult's byte stream carried in CAN frames. The codecs are
//! sans-IO; only `socket` touches SocketCAN.

pub mod admin;
pub mod bridge;
pub mod error;
pub mod frame;
pub mod link;
pub mod linkwatch;
pub mod lock;
pub mod preflight;
pub mod presence;
pub mod socket;
pub mod stream;
pub mod uuid;

pub use admin::{AdminCommand, AdminReply, CanApp, NodeId};
pub use error::CanError;
pub use frame::CanFrame;
pub use uuid::CanUuid;
