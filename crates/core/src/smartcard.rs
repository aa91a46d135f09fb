//! Smartcard presence through PC/SC (pcsc-lite's `pcscd` on Linux, WinSCard on Windows, CryptoTokenKit's
//! PC/SC layer on macOS — the same `pcsc` crate on all three). The legacy Identity Agent tied the session
//! to the card; NHS Smartcard Connect no longer does, so this is the agent's "the clinician walked away"
//! signal. A card is told apart from another by its GlobalPlatform Card Production Life Cycle data (the
//! chip's serial number, `GET DATA 9F7F`) with its ATR; a card that does not answer that is
//! `Unidentified`: its removal still counts, but it can never prove it is "the same card back".
//!
//! This module only reports: [`watch`] hands out each insertion and removal on a channel and knows
//! nothing of the session. What they do (`[workstation] on_card_removal`, `same_card_unlocks`) is the
//! agent's business, which reads that channel.

use sha2::{Digest, Sha256};

/// Which card is in a reader.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Card {
    /// A stable identity: SHA-256 (hex, 32 characters) of the ATR and the CPLC data.
    Known(String),
    /// The card did not give its CPLC: it cannot be told apart from another of the same model.
    Unidentified,
}

/// GlobalPlatform GET DATA for the Card Production Life Cycle data.
pub const GET_CPLC: [u8; 5] = [0x80, 0xCA, 0x9F, 0x7F, 0x00];

/// The identity from the ATR and the answer to [`GET_CPLC`] (with its status word), if any.
pub fn identify(atr: &[u8], cplc_answer: Option<&[u8]>) -> Card {
    let Some(answer) = cplc_answer else {
        return Card::Unidentified;
    };
    // A good answer is data followed by 90 00, and the data is tag 9F7F, length, ≥ 18 bytes.
    let ok = answer.len() >= 2 && answer[answer.len() - 2..] == [0x90, 0x00];
    let data = &answer[..answer.len().saturating_sub(2)];
    if !ok || data.len() < 3 + 18 || data[..2] != [0x9F, 0x7F] {
        return Card::Unidentified;
    }
    let mut hash = Sha256::new();
    hash.update((atr.len() as u32).to_be_bytes());
    hash.update(atr);
    hash.update(data);
    Card::Known(hex::encode(&hash.finalize()[..16]))
}

/// A change in a reader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CardEvent {
    Inserted(Card),
    Removed(Card),
}

/// Watches every PC/SC reader in a thread of its own and sends each insertion and removal on the
/// channel it returns (`None` when the thread cannot start). When the smartcard service is missing or
/// goes away, it keeps trying every few seconds (Debian starts `pcscd` on demand; a reader may be
/// plugged in later).
pub fn watch() -> Option<tokio::sync::mpsc::UnboundedReceiver<CardEvent>> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<CardEvent>();
    let spawned = std::thread::Builder::new()
        .name("cis2-pcsc".into())
        .spawn(move || pcsc_loop(tx));
    match spawned {
        Ok(_) => Some(rx),
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch smartcard readers");
            None
        }
    }
}

/// The service behind PC/SC, as the log names it.
const SERVICE: &str = if cfg!(windows) {
    "the Smart Card service (SCardSvr)"
} else {
    "pcscd"
};

/// Whether an error means the smartcard service is gone, so the context must be established again.
/// Windows stops its Smart Card service when the last reader is unplugged (`SCARD_E_SERVICE_STOPPED`)
/// and a context then fails with `SCARD_E_NO_SERVICE` or an invalid handle; pcscd does the same when
/// it exits. Having no reader is not one: the watch goes on for a reader plugged in later.
fn service_gone(e: &pcsc::Error) -> bool {
    use pcsc::Error;
    matches!(
        e,
        Error::NoService | Error::ServiceStopped | Error::InvalidHandle
    )
}

fn pcsc_loop(tx: tokio::sync::mpsc::UnboundedSender<CardEvent>) {
    use pcsc::{Context, Error, PNP_NOTIFICATION, ReaderState, Scope, State};
    use std::collections::HashMap;
    use std::ffi::CString;
    use std::time::Duration;

    let mut told_missing = false;
    loop {
        let ctx = match Context::establish(Scope::User) {
            Ok(ctx) => ctx,
            Err(e) => {
                if !told_missing {
                    tracing::info!(error = %e, service = SERVICE, "no smartcard service yet; card removal is not watched until there is one");
                    told_missing = true;
                }
                std::thread::sleep(Duration::from_secs(3));
                continue;
            }
        };
        told_missing = false;
        tracing::info!("watching smartcard readers");
        let mut states = vec![ReaderState::new(PNP_NOTIFICATION(), State::UNAWARE)];
        let mut cards: HashMap<CString, Card> = HashMap::new();
        let mut names = vec![0u8; 4096];
        'session: loop {
            // Readers that went away: a card in them is gone too.
            states.retain(|rs| {
                let dead = rs.name() != PNP_NOTIFICATION()
                    && rs.event_state().intersects(State::UNKNOWN | State::IGNORE);
                if dead && let Some(card) = cards.remove(rs.name()) {
                    let _ = tx.send(CardEvent::Removed(card));
                }
                !dead
            });
            match ctx.list_readers(&mut names) {
                Ok(list) => {
                    for name in list {
                        if !states.iter().any(|rs| rs.name() == name) {
                            states.push(ReaderState::new(name.to_owned(), State::UNAWARE));
                        }
                    }
                }
                Err(Error::NoReadersAvailable) => {}
                Err(e) if service_gone(&e) => break 'session,
                Err(e) => tracing::debug!(error = %e, "listing smartcard readers failed"),
            }
            for rs in &mut states {
                rs.sync_current_state();
            }
            match ctx.get_status_change(Duration::from_secs(2), &mut states) {
                Ok(()) | Err(Error::Timeout) => {}
                Err(e) if service_gone(&e) => break 'session,
                Err(e) => {
                    tracing::debug!(error = %e, "waiting for smartcard events failed");
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
            for rs in &states {
                if rs.name() == PNP_NOTIFICATION() {
                    continue;
                }
                let present = rs.event_state().contains(State::PRESENT)
                    && !rs.event_state().contains(State::MUTE);
                let known = cards.contains_key(rs.name());
                if present && !known {
                    let card = read_identity(&ctx, rs.name(), rs.atr());
                    cards.insert(rs.name().to_owned(), card.clone());
                    tracing::info!(reader = ?rs.name(), identified = matches!(card, Card::Known(_)), "smartcard inserted");
                    let _ = tx.send(CardEvent::Inserted(card));
                } else if !present
                    && known
                    && let Some(card) = cards.remove(rs.name())
                {
                    tracing::info!(reader = ?rs.name(), "smartcard removed");
                    let _ = tx.send(CardEvent::Removed(card));
                }
            }
        }
        for (_, card) in cards.drain() {
            let _ = tx.send(CardEvent::Removed(card));
        }
        tracing::warn!("the smartcard service stopped; waiting for it to come back");
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn read_identity(ctx: &pcsc::Context, reader: &std::ffi::CStr, atr: &[u8]) -> Card {
    let Ok(card) = ctx.connect(reader, pcsc::ShareMode::Shared, pcsc::Protocols::ANY) else {
        return Card::Unidentified;
    };
    let mut buffer = [0u8; pcsc::MAX_BUFFER_SIZE];
    let answer = card.transmit(&GET_CPLC, &mut buffer).ok();
    let identity = identify(atr, answer);
    let _ = card.disconnect(pcsc::Disposition::LeaveCard);
    identity
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cplc(serial: u8) -> Vec<u8> {
        let mut answer = vec![0x9F, 0x7F, 0x2A];
        let mut data = vec![0u8; 42];
        data[15] = serial;
        answer.extend(data);
        answer.extend([0x90, 0x00]);
        answer
    }

    #[test]
    fn cards_are_told_apart_by_their_cplc_and_unknown_without_it() {
        let atr = [0x3B, 0xDC, 0x18];
        let a = identify(&atr, Some(&cplc(1)));
        assert_eq!(
            a,
            identify(&atr, Some(&cplc(1))),
            "the same card, the same identity"
        );
        assert_ne!(a, identify(&atr, Some(&cplc(2))));
        assert!(matches!(a, Card::Known(ref id) if id.len() == 32));
        assert_eq!(identify(&atr, None), Card::Unidentified);
        assert_eq!(identify(&atr, Some(&[0x6D, 0x00])), Card::Unidentified);
        assert_eq!(
            identify(&atr, Some(&[0x9F, 0x7F, 0x01, 0x00, 0x90, 0x00])),
            Card::Unidentified
        );
        let mut wrong_status = cplc(1);
        let n = wrong_status.len();
        wrong_status[n - 2] = 0x62;
        assert_eq!(identify(&atr, Some(&wrong_status)), Card::Unidentified);
    }

    #[test]
    fn only_a_stopped_or_missing_service_restarts_the_watch() {
        use pcsc::Error;
        for gone in [
            Error::NoService,
            Error::ServiceStopped,
            Error::InvalidHandle,
        ] {
            assert!(service_gone(&gone), "{gone:?}");
        }
        for stays in [
            Error::NoReadersAvailable,
            Error::Timeout,
            Error::UnknownReader,
        ] {
            assert!(!service_gone(&stays), "{stays:?}");
        }
    }

    /// Whatever this machine's PC/SC says with no reader (Wine's WinSCard, a Windows PC with none
    /// plugged in, no pcscd), it is one of the answers the watch goes on after: no service, no
    /// readers, or a list. Nothing panics and the agent never waits on it.
    #[test]
    fn the_smartcard_service_answers_something_the_watch_handles() {
        match pcsc::Context::establish(pcsc::Scope::User) {
            // The watch takes any failure here as "no service yet", says so once and tries again
            // later. Expected: no pcscd (NoService), or Wine 8's WinSCard stub (InternalError).
            Err(e) => assert!(
                service_gone(&e) || e == pcsc::Error::InternalError,
                "establishing a context: {e:?}"
            ),
            Ok(ctx) => {
                let mut names = vec![0u8; 4096];
                match ctx.list_readers(&mut names) {
                    Ok(_) | Err(pcsc::Error::NoReadersAvailable) => {}
                    Err(e) => assert!(service_gone(&e), "listing readers: {e:?}"),
                }
            }
        }
    }

    /// WinSCard with a reader and a card: only real Windows has them (Wine has no readers). Run on a
    /// Windows PC with a reader and a card in it: `cargo test -p cis2-core --lib -- --ignored real_windows`.
    #[cfg(windows)]
    #[test]
    #[ignore = "needs real Windows with a smartcard reader and a card: run with --ignored"]
    fn real_windows_a_card_in_a_reader_is_identified_through_winscard() {
        if cis2_os::under_wine() {
            eprintln!(
                "skipped under Wine: Wine has no smartcard reader (needs real Windows with one)"
            );
            return;
        }
        let ctx = pcsc::Context::establish(pcsc::Scope::User)
            .expect("the Smart Card service answers (plug in a reader: Windows starts it then)");
        let mut names = vec![0u8; 4096];
        let readers: Vec<_> = ctx
            .list_readers(&mut names)
            .expect("a smartcard reader is plugged in")
            .map(|r| r.to_owned())
            .collect();
        let mut states: Vec<_> = readers
            .iter()
            .map(|r| pcsc::ReaderState::new(r.clone(), pcsc::State::UNAWARE))
            .collect();
        ctx.get_status_change(std::time::Duration::from_secs(5), &mut states)
            .unwrap();
        let with_card = states
            .iter()
            .find(|rs| rs.event_state().contains(pcsc::State::PRESENT))
            .expect("a card is in one of the readers");
        let first = read_identity(&ctx, with_card.name(), with_card.atr());
        assert_eq!(
            first,
            read_identity(&ctx, with_card.name(), with_card.atr()),
            "the same card reads as the same identity"
        );
        eprintln!("the card in {:?} reads as {first:?}", with_card.name());
    }
}
