//! Free page hinting (virtio 1.2 §5.5.6.5): the command-id state machine (the engine's
//! hint source built on it is in [`crate::hinting`]).
//!
//! ```text
//!                  epoch_begin(k): cmd_id := next id N, config irq
//!   ┌──────────┐ ───────────────────────────────────────────────▶ ┌───────────────┐
//!   │  STOP(0) │                                                  │ ISSUED(N, k)  │
//!   │ DONE(1)  │ ◀─────────────────────────────────────────────── │ hints ignored │
//!   └──────────┘   epoch_end(k): cmd_id := STOP / finish: DONE    └───────────────┘
//!        ▲                                                            │ driver outbuf N
//!        │ epoch_end(k) / finish                                      ▼
//!        │                                                  ┌──────────────────────┐
//!        └───────────────────────────────────────────────── │ ACTIVE(N, k)         │
//!                                                           │ inbufs -> hints @ k  │
//!                 driver outbuf STOP: epoch_complete(k) ◀── └──────────────────────┘
//! ```
//!
//! Ids start at `0x8000_0000`, increase by one per round and wrap back to `0x8000_0000`
//! (as QEMU does). The driver's own round (from its outbuf with an id to its outbuf with
//! STOP) is tracked separately: an id the driver has not closed with STOP is never issued
//! again (§5.5.6.5.2 "MUST NOT reuse a command ID until it has received an output buffer
//! containing VIRTIO_BALLOON_CMD_ID_STOP"). Hinted blocks are only accepted while the
//! driver's round is the one for the id currently in the config space (§5.5.6.5.2 "MUST
//! ignore pages that are provided with a command ID that does not match").

use serde::{Deserialize, Serialize};

use ferry_migration::Epoch;

/// `VIRTIO_BALLOON_CMD_ID_STOP`: stop hinting, keep the hinted pages.
pub const CMD_ID_STOP: u32 = 0;
/// `VIRTIO_BALLOON_CMD_ID_DONE`: stop hinting, give the hinted pages back to the guest.
pub const CMD_ID_DONE: u32 = 1;
/// The first command id issued, and where ids wrap back to.
pub const CMD_ID_MIN: u32 = 0x8000_0000;

/// What an outbuf on the free page queue did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OutbufEffect {
    /// The driver started a round for the current id: hints may follow.
    Started,
    /// The driver ended the round for the current id (it has nothing more for `Epoch`).
    Completed(Epoch),
    /// Nothing the device acts on (a stale id, a duplicate, STOP of a stale round).
    Ignored,
}

/// The hinting round state: what is in the config space and what the driver is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HintRound {
    /// `free_page_hint_cmd_id` as the guest sees it.
    cmd_id: u32,
    /// The next id to issue.
    next_id: u32,
    /// The epoch the current id (if `cmd_id` is one) was issued for. Epochs belong to one
    /// migration and are not part of the saved device state.
    epoch: Option<Epoch>,
    /// The id of the round the driver opened (outbuf with that id) and has not closed yet
    /// (outbuf with STOP).
    driver_round: Option<u32>,
}

impl Default for HintRound {
    fn default() -> Self {
        Self {
            cmd_id: CMD_ID_STOP,
            next_id: CMD_ID_MIN,
            epoch: None,
            driver_round: None,
        }
    }
}

/// The saved form of the hinting round (the epoch is per migration and not saved).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HintRoundState {
    /// `free_page_hint_cmd_id` as the guest sees it.
    pub cmd_id: u32,
    /// The next command id the device will issue.
    pub next_id: u32,
    /// The round the driver has opened and not closed with STOP.
    pub driver_round: Option<u32>,
}

/// Why a [`HintRoundState`] cannot be restored.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HintStateError {
    /// An id outside the valid ranges.
    #[error("free page hint {what} {value:#x} is neither reserved nor at least {CMD_ID_MIN:#x}")]
    BadId {
        /// Which field.
        what: &'static str,
        /// Its value.
        value: u32,
    },
}

fn next_after(id: u32) -> u32 {
    if id == u32::MAX {
        CMD_ID_MIN
    } else {
        id + 1
    }
}

impl HintRound {
    /// The value of `free_page_hint_cmd_id`.
    pub fn cmd_id(&self) -> u32 {
        self.cmd_id
    }

    /// Issues a new command id for `epoch` and returns it.
    pub fn begin(&mut self, epoch: Epoch) -> u32 {
        let mut id = self.next_id;
        // Never hand out the id of a round the driver has not stopped, nor the one the
        // guest sees right now (only reachable after 2^31 rounds).
        while Some(id) == self.driver_round || id == self.cmd_id {
            id = next_after(id);
        }
        self.next_id = next_after(id);
        self.cmd_id = id;
        self.epoch = Some(epoch);
        id
    }

    /// Stops hinting for `epoch`; returns whether the config space changed.
    pub fn end(&mut self, epoch: Epoch) -> bool {
        if self.epoch != Some(epoch) {
            return false;
        }
        self.epoch = None;
        self.cmd_id = CMD_ID_STOP;
        true
    }

    /// Ends hinting for good and lets the guest free its hinted pages; returns whether the
    /// config space changed.
    pub fn done(&mut self) -> bool {
        self.epoch = None;
        let changed = self.cmd_id != CMD_ID_DONE;
        self.cmd_id = CMD_ID_DONE;
        changed
    }

    /// Whether the driver has a round open (it sent an id and not yet STOP): it is in its
    /// hint loop, or has not yet told the device it left it.
    pub fn driver_busy(&self) -> bool {
        self.driver_round.is_some()
    }

    /// The epoch hinted blocks arriving now belong to, if they are to be accepted.
    pub fn accepting(&self) -> Option<Epoch> {
        match (self.driver_round, self.epoch) {
            (Some(round), Some(epoch)) if round == self.cmd_id => Some(epoch),
            _ => None,
        }
    }

    /// Handles an outbuf (a le32 command id) from the driver.
    pub fn on_outbuf(&mut self, value: u32) -> OutbufEffect {
        match value {
            CMD_ID_STOP => match self.driver_round.take() {
                Some(round) if round == self.cmd_id => self
                    .epoch
                    .map_or(OutbufEffect::Ignored, OutbufEffect::Completed),
                _ => OutbufEffect::Ignored,
            },
            CMD_ID_DONE => OutbufEffect::Ignored,
            id => {
                // A start for an id the device did not issue last is stale, but the driver
                // still opened a round with it: remember it so it is not reissued.
                let duplicate = self.driver_round == Some(id);
                self.driver_round = Some(id);
                if id == self.cmd_id && self.epoch.is_some() && !duplicate {
                    OutbufEffect::Started
                } else {
                    OutbufEffect::Ignored
                }
            }
        }
    }

    /// Forgets the driver's round (device reset: the driver starts over).
    pub fn driver_reset(&mut self) {
        self.driver_round = None;
    }

    /// The state to save.
    pub fn state(&self) -> HintRoundState {
        HintRoundState {
            cmd_id: self.cmd_id,
            next_id: self.next_id,
            driver_round: self.driver_round,
        }
    }

    /// Rebuilds the round from saved state; no epoch is open afterwards.
    pub fn restore(s: &HintRoundState) -> Result<Self, HintStateError> {
        let valid = |v: u32| v == CMD_ID_STOP || v == CMD_ID_DONE || v >= CMD_ID_MIN;
        if !valid(s.cmd_id) {
            return Err(HintStateError::BadId {
                what: "cmd_id",
                value: s.cmd_id,
            });
        }
        if s.next_id < CMD_ID_MIN {
            return Err(HintStateError::BadId {
                what: "next_id",
                value: s.next_id,
            });
        }
        if let Some(r) = s.driver_round.filter(|&r| r < CMD_ID_MIN) {
            return Err(HintStateError::BadId {
                what: "driver_round",
                value: r,
            });
        }
        // The saved cmd_id was issued in the source's migration; here no epoch is open, so
        // hints for it are ignored until the engine issues a new id.
        Ok(Self {
            cmd_id: s.cmd_id,
            next_id: s.next_id,
            epoch: None,
            driver_round: s.driver_round,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_start_high_increment_and_wrap() {
        let mut r = HintRound::default();
        assert_eq!(r.begin(Epoch(0)), CMD_ID_MIN);
        assert!(r.end(Epoch(0)));
        assert_eq!(r.begin(Epoch(1)), CMD_ID_MIN + 1);
        r.next_id = u32::MAX;
        r.end(Epoch(1));
        assert_eq!(r.begin(Epoch(2)), u32::MAX);
        r.end(Epoch(2));
        assert_eq!(r.begin(Epoch(3)), CMD_ID_MIN, "wraps to 0x80000000");
    }

    #[test]
    fn an_id_is_not_reissued_before_the_driver_stops_its_round() {
        let mut r = HintRound::default();
        let id = r.begin(Epoch(0));
        assert_eq!(r.on_outbuf(id), OutbufEffect::Started);
        r.end(Epoch(0));
        // Force a wrap onto the id of the driver's open round.
        r.next_id = id;
        let next = r.begin(Epoch(1));
        assert_ne!(next, id);
        assert_eq!(
            r.on_outbuf(CMD_ID_STOP),
            OutbufEffect::Ignored,
            "stale round"
        );
        r.end(Epoch(1));
        r.next_id = id;
        assert_eq!(r.begin(Epoch(2)), id, "free again after the driver's STOP");
    }

    #[test]
    fn hints_are_accepted_only_for_the_current_round() {
        let mut r = HintRound::default();
        assert_eq!(r.accepting(), None);
        let id = r.begin(Epoch(7));
        assert_eq!(r.accepting(), None, "before the driver's start outbuf");
        assert_eq!(r.on_outbuf(id + 5), OutbufEffect::Ignored);
        assert_eq!(r.accepting(), None, "driver started with a wrong id");
        assert_eq!(r.on_outbuf(id), OutbufEffect::Started);
        assert_eq!(r.accepting(), Some(Epoch(7)));
        assert_eq!(r.on_outbuf(id), OutbufEffect::Ignored, "duplicate start");
        assert!(!r.end(Epoch(6)), "ending another epoch changes nothing");
        assert!(r.end(Epoch(7)));
        assert_eq!(r.accepting(), None, "device said STOP");
    }

    #[test]
    fn driver_stop_completes_the_epoch() {
        let mut r = HintRound::default();
        let id = r.begin(Epoch(3));
        assert!(!r.driver_busy(), "asked, not started");
        r.on_outbuf(id);
        assert!(r.driver_busy());
        // Told to stop, the driver is busy until its STOP says it left the loop.
        assert!(r.end(Epoch(3)));
        assert!(r.driver_busy());
        assert_eq!(r.on_outbuf(CMD_ID_STOP), OutbufEffect::Ignored);
        assert!(!r.driver_busy());
        let id = r.begin(Epoch(4));
        r.on_outbuf(id);
        assert_eq!(r.on_outbuf(CMD_ID_STOP), OutbufEffect::Completed(Epoch(4)));
        assert!(!r.driver_busy());
        assert_eq!(r.accepting(), None);
        assert_eq!(r.on_outbuf(CMD_ID_STOP), OutbufEffect::Ignored);
        assert!(r.done());
        assert_eq!(r.cmd_id(), CMD_ID_DONE);
        assert!(!r.done());
    }

    #[test]
    fn restore_validates_ids() {
        let mut r = HintRound::default();
        let id = r.begin(Epoch(0));
        r.on_outbuf(id);
        let s = r.state();
        let back = HintRound::restore(&s).unwrap();
        assert_eq!(back.accepting(), None, "no epoch is open after a restore");
        assert_eq!(back.cmd_id(), id);
        for bad in [
            HintRoundState { cmd_id: 2, ..s },
            HintRoundState { next_id: 1, ..s },
            HintRoundState {
                driver_round: Some(7),
                ..s
            },
        ] {
            assert!(HintRound::restore(&bad).is_err());
        }
    }
}
