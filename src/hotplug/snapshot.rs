//! The sans-IO heart of discovery: a map of present devices keyed by syspath, fed udev
//! records, producing board events. No threads, no clocks, no udev: tests drive it directly.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::identity::{BoardIdentity, DeviceRecord, Mode};

/// A device kflash can see, with the registered board it belongs to, if any.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Board {
    #[serde(flatten)]
    pub identity: BoardIdentity,
    /// Registry key of the board this device is, if registered.
    pub key: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// A device appeared that was not seen before (or came back in the same mode).
    Added,
    /// A device went away.
    Removed,
    /// A board that went away came back in another mode (Klipper ↔ Katapult ↔ ROM bootloader).
    ModeChanged,
    /// A present device's properties changed.
    Changed,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Added => "added",
            Action::Removed => "removed",
            Action::ModeChanged => "mode-changed",
            Action::Changed => "changed",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BoardEvent {
    pub action: Action,
    /// Boxed: a broadcast channel keeps every slot of its buffer allocated (the hotplug's
    /// holds 1024 events), and a slot is as large as the event.
    pub board: Box<Board>,
    /// For `mode-changed`: the mode the board was last seen in.
    pub previous_mode: Option<Mode>,
}

/// Attaches registry keys to identities.
pub type KeyResolver = std::sync::Arc<dyn Fn(&BoardIdentity) -> Option<String> + Send + Sync>;

/// How many departed boards to remember for recognising a mode change on return.
const DEPARTED_MEMORY: usize = 32;

pub struct Snapshot {
    present: BTreeMap<String, Board>,
    /// Boards that left, newest last, so a re-enumeration in another mode is recognised
    /// as the same board changing mode rather than a stranger arriving.
    departed: Vec<BoardIdentity>,
    resolve: KeyResolver,
}

impl Snapshot {
    pub fn new(resolve: KeyResolver) -> Snapshot {
        Snapshot { present: BTreeMap::new(), departed: Vec::new(), resolve }
    }

    /// Boards present now, in syspath order.
    pub fn boards(&self) -> impl Iterator<Item = &Board> {
        self.present.values()
    }

    pub fn find(&self, matcher: &dyn Fn(&Board) -> bool) -> Option<Board> {
        self.present.values().find(|b| matcher(b)).cloned()
    }

    /// A device was added (or re-announced by enumeration, or changed).
    pub fn upsert(&mut self, rec: &DeviceRecord) -> Option<BoardEvent> {
        let Some(identity) = BoardIdentity::from_record(rec) else {
            // It stopped looking like a board (or never did): treat as gone if we had it.
            return self.remove(&rec.syspath);
        };
        let board = Board { key: self.key_of(&identity), identity };
        match self.present.get(&rec.syspath) {
            Some(old) if *old == board => None,
            Some(old) => {
                let previous = old.identity.mode;
                self.present.insert(rec.syspath.clone(), board.clone());
                let action = if previous == board.identity.mode { Action::Changed } else { Action::ModeChanged };
                Some(BoardEvent {
                    action,
                    previous_mode: (action == Action::ModeChanged).then_some(previous),
                    board: Box::new(board),
                })
            }
            None => {
                let returned = self.departed.iter().rposition(|d| d.same_board(&board.identity));
                let previous_mode = returned.map(|i| self.departed.remove(i).mode);
                self.present.insert(rec.syspath.clone(), board.clone());
                match previous_mode {
                    Some(m) if m != board.identity.mode => {
                        Some(BoardEvent { action: Action::ModeChanged, board: Box::new(board), previous_mode: Some(m) })
                    }
                    _ => Some(BoardEvent { action: Action::Added, board: Box::new(board), previous_mode: None }),
                }
            }
        }
    }

    /// The registry key of a device. A resolver that panics resolves nothing: it runs under
    /// the hotplug's lock, and a panic there must not take discovery down with it.
    fn key_of(&self, identity: &BoardIdentity) -> Option<String> {
        let resolve = &self.resolve;
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| resolve(identity))).unwrap_or_else(|_| {
            tracing::error!(syspath = %identity.syspath, "the registry key resolver panicked; the device stays unresolved");
            None
        })
    }

    /// Use another resolver (a reloaded registry) and resolve the present boards again: a
    /// board whose key changed is told as `Changed`.
    pub fn set_resolver(&mut self, resolve: KeyResolver) -> Vec<BoardEvent> {
        self.resolve = resolve;
        let mut events = Vec::new();
        let syspaths: Vec<String> = self.present.keys().cloned().collect();
        for syspath in syspaths {
            let key = self.key_of(&self.present[&syspath].identity);
            let board = self.present.get_mut(&syspath).expect("listed above");
            if board.key != key {
                board.key = key;
                events.push(BoardEvent {
                    action: Action::Changed,
                    board: Box::new(board.clone()),
                    previous_mode: None,
                });
            }
        }
        events
    }

    pub fn remove(&mut self, syspath: &str) -> Option<BoardEvent> {
        let board = self.present.remove(syspath)?;
        self.departed.retain(|d| !d.same_board(&board.identity));
        self.departed.push(board.identity.clone());
        if self.departed.len() > DEPARTED_MEMORY {
            self.departed.remove(0);
        }
        Some(BoardEvent { action: Action::Removed, board: Box::new(board), previous_mode: None })
    }

    /// Make the snapshot equal to a fresh enumeration: whatever vanished is removed, whatever
    /// is new is added. Used at start and to recover from events the kernel dropped.
    pub fn reconcile(&mut self, devices: &[DeviceRecord]) -> Vec<BoardEvent> {
        let gone: Vec<String> =
            self.present.keys().filter(|k| !devices.iter().any(|d| &d.syspath == *k)).cloned().collect();
        let mut events: Vec<BoardEvent> = gone.iter().filter_map(|k| self.remove(k)).collect();
        events.extend(devices.iter().filter_map(|d| self.upsert(d)));
        events
    }
}
