//! Event-stream tickets. `/v1/events` serves only an agent holding a ticket for that CIS2 session, which
//! the relay hands out with the tokens, so nobody else can watch when a session ends or fill the relay's
//! stream slots. A ticket reads `v1.<kid>.<expiry>.<sid>.<sub>.<mac>` (sid, sub and mac in base64url):
//! an HMAC-SHA-256 under a secret derived from the signing key `kid`. Every instance configured with the
//! same keys therefore accepts every other's tickets, nothing is stored, and retiring a key retires the
//! tickets it made.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use cis2_jose::SigningKey;
use ring::hmac;

/// How long a ticket opens streams. Each refresh brings a new one, so this bounds only a session that
/// is never refreshed; CIS2 sessions are shorter.
pub const TICKET_LIFETIME_SECS: u64 = 24 * 3600;
const PURPOSE: &str = "cis2-relay event-stream ticket v1";

/// The session a good ticket is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticketed {
    pub sid: String,
    pub sub: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    #[error("the ticket is malformed")]
    Malformed,
    #[error(
        "the ticket was made with a signing key this relay no longer holds; a fresh one comes with the next sign-in or refresh"
    )]
    RetiredKey,
    #[error("the ticket was not made by this relay or has been altered")]
    Forged,
    #[error("the ticket has expired; a fresh one comes with the next sign-in or refresh")]
    Expired,
}

pub struct Tickets {
    /// Each configured signing key's `kid` and derived MAC key.
    keys: Vec<(String, hmac::Key)>,
    /// Which of them makes new tickets.
    active: usize,
}

impl Tickets {
    /// `active` must be one of `keys`.
    pub fn new(keys: &[SigningKey], active: &SigningKey) -> Tickets {
        let mac_keys: Vec<(String, hmac::Key)> = keys
            .iter()
            .map(|key| {
                let secret = key.derive_secret(PURPOSE);
                (
                    key.kid().to_string(),
                    hmac::Key::new(hmac::HMAC_SHA256, &secret),
                )
            })
            .collect();
        let active = mac_keys
            .iter()
            .position(|(kid, _)| kid == active.kid())
            .unwrap_or(0);
        Tickets {
            keys: mac_keys,
            active,
        }
    }

    /// A ticket for the session `sid` of the person `sub`, good until `now` + [`TICKET_LIFETIME_SECS`].
    pub fn issue(&self, sid: &str, sub: &str, now: u64) -> String {
        let (kid, key) = &self.keys[self.active];
        let signed = format!(
            "v1.{kid}.{}.{}.{}",
            now.saturating_add(TICKET_LIFETIME_SECS),
            URL_SAFE_NO_PAD.encode(sid),
            URL_SAFE_NO_PAD.encode(sub),
        );
        let mac = hmac::sign(key, signed.as_bytes());
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(mac.as_ref()))
    }

    /// The session `ticket` opens, if it was made by a key this relay holds, is unaltered and unexpired.
    pub fn check(&self, ticket: &str, now: u64) -> Result<Ticketed, TicketError> {
        let (signed, mac) = ticket.rsplit_once('.').ok_or(TicketError::Malformed)?;
        let parts: Vec<&str> = signed.split('.').collect();
        let [version, kid, expiry, sid, sub] = parts[..] else {
            return Err(TicketError::Malformed);
        };
        if version != "v1" {
            return Err(TicketError::Malformed);
        }
        let mac = URL_SAFE_NO_PAD
            .decode(mac)
            .map_err(|_| TicketError::Malformed)?;
        let (_, key) = self
            .keys
            .iter()
            .find(|(known, _)| known == kid)
            .ok_or(TicketError::RetiredKey)?;
        hmac::verify(key, signed.as_bytes(), &mac).map_err(|_| TicketError::Forged)?;
        // Only what the relay itself wrote is read from here on.
        let expiry: u64 = expiry.parse().map_err(|_| TicketError::Malformed)?;
        if now >= expiry {
            return Err(TicketError::Expired);
        }
        let text = |part: &str| {
            URL_SAFE_NO_PAD
                .decode(part)
                .ok()
                .and_then(|bytes| String::from_utf8(bytes).ok())
                .ok_or(TicketError::Malformed)
        };
        Ok(Ticketed {
            sid: text(sid)?,
            sub: text(sub)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cis2_jose::Alg;

    #[test]
    fn a_ticket_opens_its_session_until_it_expires_and_only_unaltered() {
        let (old, new) = (
            SigningKey::generate(Alg::RS512),
            SigningKey::generate(Alg::RS512),
        );
        let now = 1_900_000_000;
        let tickets = Tickets::new(&[old.clone(), new.clone()], &old);
        let ticket = tickets.issue("sid-1", "555021935108", now);
        let opened = Ticketed {
            sid: "sid-1".into(),
            sub: "555021935108".into(),
        };
        assert_eq!(tickets.check(&ticket, now), Ok(opened.clone()));

        // Another instance with the same keys, now signing with the next key, still accepts it.
        let rotated = Tickets::new(&[old.clone(), new.clone()], &new);
        assert_eq!(rotated.check(&ticket, now + 60), Ok(opened));
        // Once the old key is retired, its tickets are too.
        let retired = Tickets::new(std::slice::from_ref(&new), &new);
        assert_eq!(retired.check(&ticket, now), Err(TicketError::RetiredKey));

        assert_eq!(
            tickets.check(&ticket, now + TICKET_LIFETIME_SECS),
            Err(TicketError::Expired)
        );
        let swap = |index: usize, value: &str| {
            let mut parts: Vec<String> = ticket.split('.').map(String::from).collect();
            parts[index] = value.to_string();
            parts.join(".")
        };
        // Relabelled with the other held key's kid, the MAC no longer matches.
        assert_eq!(
            tickets.check(&swap(1, new.kid()), now),
            Err(TicketError::Forged)
        );
        let other_sid = URL_SAFE_NO_PAD.encode("sid-2");
        let later = (now + 10 * TICKET_LIFETIME_SECS).to_string();
        assert_eq!(
            tickets.check(&swap(3, &other_sid), now),
            Err(TicketError::Forged)
        );
        assert_eq!(
            tickets.check(&swap(4, &other_sid), now),
            Err(TicketError::Forged)
        );
        assert_eq!(
            tickets.check(&swap(2, &later), now),
            Err(TicketError::Forged)
        );
        assert_eq!(
            tickets.check(&swap(5, "AAAA"), now),
            Err(TicketError::Forged)
        );
        assert_eq!(
            tickets.check(&swap(0, "v2"), now),
            Err(TicketError::Malformed)
        );
        for garbage in ["", "v1", "a.b.c.d.e.f.g", "v1.x.1.a.b.!!", &ticket[1..]] {
            assert!(tickets.check(garbage, now).is_err(), "{garbage:?}");
        }
    }
}
