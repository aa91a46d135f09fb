//! The provider's signing keys and their rotation: publish a next key, switch to it, retire the old one.

use cis2_jose::{Alg, JwkSet, SigningKey};
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyStatus {
    /// Signs new tokens.
    Active,
    /// Published ahead of a switch, so that relying parties already have it.
    Next,
    /// Signed earlier tokens; published until retired.
    Previous,
}

#[derive(Debug)]
pub struct KeyRing {
    keys: Vec<(SigningKey, KeyStatus)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyInfo {
    pub kid: String,
    pub status: KeyStatus,
}

impl KeyRing {
    pub fn new(first: SigningKey) -> KeyRing {
        KeyRing {
            keys: vec![(first, KeyStatus::Active)],
        }
    }

    pub fn active(&self) -> &SigningKey {
        self.keys
            .iter()
            .find(|(_, s)| *s == KeyStatus::Active)
            .map(|(k, _)| k)
            .expect("the ring always has an active key")
    }

    /// Every published key (active, next and previous), without `alg`: a key signs RS256 or RS512 by client.
    pub fn jwks(&self) -> JwkSet {
        JwkSet {
            keys: self
                .keys
                .iter()
                .map(|(k, _)| {
                    let mut jwk = k.public_jwk();
                    jwk.alg = None;
                    jwk
                })
                .collect(),
        }
    }

    pub fn list(&self) -> Vec<KeyInfo> {
        self.keys
            .iter()
            .map(|(k, status)| KeyInfo {
                kid: k.kid().to_string(),
                status: *status,
            })
            .collect()
    }

    /// Step 1: publish `key` as the next key (replacing an earlier next key).
    pub fn add_next(&mut self, key: SigningKey) -> KeyInfo {
        self.keys.retain(|(_, s)| *s != KeyStatus::Next);
        let info = KeyInfo {
            kid: key.kid().to_string(),
            status: KeyStatus::Next,
        };
        self.keys.push((key, KeyStatus::Next));
        info
    }

    /// Step 2: the next key signs from now on; the old active key stays published.
    pub fn activate_next(&mut self) -> Result<KeyInfo, &'static str> {
        if !self.keys.iter().any(|(_, s)| *s == KeyStatus::Next) {
            return Err("there is no next key to activate: add one first");
        }
        for (_, status) in &mut self.keys {
            *status = match *status {
                KeyStatus::Active => KeyStatus::Previous,
                KeyStatus::Next => KeyStatus::Active,
                KeyStatus::Previous => KeyStatus::Previous,
            };
        }
        let active = self.active();
        Ok(KeyInfo {
            kid: active.kid().to_string(),
            status: KeyStatus::Active,
        })
    }

    /// Step 3: stop publishing the previous keys.
    pub fn retire_previous(&mut self) -> Vec<String> {
        let retired = self
            .keys
            .iter()
            .filter(|(_, s)| *s == KeyStatus::Previous)
            .map(|(k, _)| k.kid().to_string())
            .collect();
        self.keys.retain(|(_, s)| *s != KeyStatus::Previous);
        retired
    }

    /// The active key, signing with `alg`.
    pub fn signer(&self, alg: Alg) -> SigningKey {
        self.active().with_alg(alg)
    }
}
