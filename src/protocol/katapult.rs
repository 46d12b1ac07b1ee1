//! Katapult bootloader framing (see ../shared/reference/katapult-klipper-moonraker-can.md §1.5).
