//! `kflash daemon`: the background service. It watches the boards (udev events) and Klippy
//! (Moonraker's pushes), learns what each board runs, and answers `kflash status` and the
//! web UI. It does nothing while nothing happens: no timers, no rescans.

pub mod status;
