//! Klipper message blocks, VLQ encoding and the identify exchange.
