//! Where a session survives a restart. One trait, two kinds:
//! - `keyring`: a random 256-bit data key in the OS keychain (Secret Service on Linux, Keychain on
//!   macOS, Credential Manager on Windows, through `keyring-core`), and the session — tokens, claims,
//!   expiry — sealed with XChaCha20-Poly1305 in `<data_dir>/session.bin`, written atomically (temp file,
//!   fsync, rename, fsync of the folder). Only 64 hex characters ever go into the keychain, so Windows'
//!   2,560-byte credential limit and large ID tokens do not matter.
//! - `memory`: nothing touches the disk (shared PCs); a restart signs the clinician out.
//!
//! The keychain unavailable means `memory`, said plainly in `status` — never plaintext on disk. A session
//! file that cannot be opened is set aside (`session.bin.unreadable-<time>`), logged, and a fresh sign-in
//! follows; the agent does not crash over it.

use crate::oidc::claims::User;
use crate::oidc::rp::SignedIn;
use crate::secret::Secret;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use zeroize::Zeroizing;

use crate::audit::SealKey;

const MAGIC: &[u8; 8] = b"CIS2SES1";
const AAD: &[u8] = b"cis2-agent session v1";
pub const KEYCHAIN_SERVICE: &str = "cis2-agent";

/// What the agent keeps of a session across restarts.
#[derive(Serialize, Deserialize)]
pub struct Stored {
    pub user: User,
    pub sub: String,
    pub sid: Option<String>,
    #[serde(with = "zeroizing")]
    pub access_token: Zeroizing<String>,
    pub expires_at: u64,
    #[serde(with = "zeroizing_option")]
    pub refresh_token: Option<Zeroizing<String>>,
    #[serde(with = "zeroizing")]
    pub id_token: Zeroizing<String>,
    pub signed_in_at: u64,
    /// Why the session is locked, if it is: a restart must not lift a lock.
    #[serde(default)]
    pub locked: Option<String>,
    /// The lock came from taking the session's smartcard out.
    #[serde(default)]
    pub locked_by_card: bool,
    /// The smartcard the clinician signed in with.
    #[serde(default)]
    pub card: Option<crate::smartcard::Card>,
    /// Opens the relay's logout event stream (with `method = "relay"`).
    #[serde(default, with = "zeroizing_option")]
    pub events_ticket: Option<Zeroizing<String>>,
}

/// Secrets in the sealed file: plain JSON strings inside the encryption, wiped from memory after use.
mod zeroizing {
    use serde::{Deserialize, Deserializer, Serializer};
    use zeroize::Zeroizing;

    pub fn serialize<S: Serializer>(value: &Zeroizing<String>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(value)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Zeroizing<String>, D::Error> {
        String::deserialize(d).map(Zeroizing::new)
    }
}

mod zeroizing_option {
    use serde::{Deserialize, Deserializer, Serializer};
    use zeroize::Zeroizing;

    pub fn serialize<S: Serializer>(
        value: &Option<Zeroizing<String>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Some(v) => s.serialize_some(v.as_str()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Zeroizing<String>>, D::Error> {
        Option::<String>::deserialize(d).map(|v| v.map(Zeroizing::new))
    }
}

impl Stored {
    pub fn from_session(session: &SignedIn, signed_in_at: u64) -> Stored {
        Stored {
            user: session.user.clone(),
            sub: session.sub.clone(),
            sid: session.sid.clone(),
            access_token: Zeroizing::new(session.access_token.expose().to_string()),
            expires_at: session.expires_at,
            refresh_token: session
                .refresh_token
                .as_ref()
                .map(|t| Zeroizing::new(t.expose().to_string())),
            id_token: Zeroizing::new(session.id_token.expose().to_string()),
            events_ticket: session
                .events_ticket
                .as_ref()
                .map(|t| Zeroizing::new(t.expose().to_string())),
            signed_in_at,
            locked: None,
            locked_by_card: false,
            card: None,
        }
    }

    pub fn into_session(self) -> (SignedIn, u64) {
        (
            SignedIn {
                user: self.user,
                sub: self.sub,
                sid: self.sid,
                access_token: Secret::new(self.access_token.as_str()),
                expires_at: self.expires_at,
                refresh_token: self.refresh_token.map(|t| Secret::new(t.as_str())),
                id_token: Secret::new(self.id_token.as_str()),
                events_ticket: self.events_ticket.map(|t| Secret::new(t.as_str())),
                callback_to_done: None,
                provider_time: std::time::Duration::ZERO,
            },
            self.signed_in_at,
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct StoreError(pub String);

/// How the session is kept, for `status` and the GUI.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoreStatus {
    /// `keyring` or `memory`.
    pub kind: &'static str,
    /// Why the store is not what the config asked for, when it is not.
    pub warning: Option<String>,
}

pub trait TokenStore: Send + Sync {
    fn load(&self) -> Option<Stored>;
    fn save(&self, session: &Stored) -> Result<(), StoreError>;
    fn clear(&self) -> Result<(), StoreError>;
    fn status(&self) -> StoreStatus;
    /// The key that seals the audit log's head, when this store keeps one outside the data folder.
    fn audit_seal_key(&self) -> Option<SealKey> {
        None
    }
}

/// Nothing persists.
pub struct MemoryStore {
    pub warning: Option<String>,
}

impl TokenStore for MemoryStore {
    fn load(&self) -> Option<Stored> {
        None
    }
    fn save(&self, _: &Stored) -> Result<(), StoreError> {
        Ok(())
    }
    fn clear(&self) -> Result<(), StoreError> {
        Ok(())
    }
    fn status(&self) -> StoreStatus {
        StoreStatus {
            kind: "memory",
            warning: self.warning.clone(),
        }
    }
}

/// The data key in the keychain, the sealed session in a file.
pub struct KeyringStore {
    key: Zeroizing<[u8; 32]>,
    file: PathBuf,
}

impl KeyringStore {
    /// Opens the store for `data_dir` in `credentials` (the platform's keychain, or the mock in tests):
    /// reads the data key, or creates one on first use. Fails when the keychain cannot be used.
    pub fn open(
        data_dir: &Path,
        credentials: &Arc<keyring_core::CredentialStore>,
    ) -> Result<KeyringStore, StoreError> {
        let entry = keychain_entry(data_dir, credentials)?;
        let key = match entry.get_secret() {
            Ok(stored) => match decode_key(&stored) {
                Some(key) => key,
                // A damaged key is replaced; the old session file no longer opens and is set aside.
                None => new_key(&entry)?,
            },
            Err(keyring_core::Error::NoEntry) => new_key(&entry)?,
            Err(e) => return Err(StoreError(format!("the keychain cannot be used: {e}"))),
        };
        Ok(KeyringStore {
            key,
            file: data_dir.join("session.bin"),
        })
    }

    pub fn file(&self) -> &Path {
        &self.file
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(Key::from_slice(&self.key[..]))
    }

    fn set_aside(&self, why: &str) {
        let aside = self.file.with_extension(format!(
            "bin.unreadable-{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        ));
        tracing::warn!(file = %self.file.display(), aside = %aside.display(), why, "the saved session cannot be used; set aside, a fresh sign-in is needed");
        let _ = std::fs::rename(&self.file, aside);
    }
}

/// The keychain entry of `data_dir`'s data key: one key per data folder, so two agents with their own
/// folders never share a key.
fn keychain_entry(
    data_dir: &Path,
    credentials: &Arc<keyring_core::CredentialStore>,
) -> Result<keyring_core::Entry, StoreError> {
    let account = format!(
        "session-key:{}",
        &crate::audit::sha256_hex(data_dir.to_string_lossy().as_bytes())[..16]
    );
    keyring_core::Entry::new_in_store(credentials, KEYCHAIN_SERVICE, &account)
        .map_err(|e| StoreError(format!("the keychain cannot be used: {e}")))
}

/// The audit seal key of `data_dir`'s keychain entry, if there is one (never creates it): what
/// `cis2ctl audit verify` checks the head with.
pub fn existing_audit_seal_key(
    data_dir: &Path,
    credentials: &Arc<keyring_core::CredentialStore>,
) -> Result<Option<SealKey>, StoreError> {
    match keychain_entry(data_dir, credentials)?.get_secret() {
        Ok(stored) => Ok(decode_key(&stored).map(|key| SealKey::derived_from(&key[..]))),
        Err(keyring_core::Error::NoEntry) => Ok(None),
        Err(e) => Err(StoreError(format!("the keychain cannot be used: {e}"))),
    }
}

/// A fresh random data key, stored in the keychain entry.
fn new_key(entry: &keyring_core::Entry) -> Result<Zeroizing<[u8; 32]>, StoreError> {
    let mut fresh = Zeroizing::new([0u8; 32]);
    rand_fill(&mut fresh[..]);
    let text = Zeroizing::new(hex::encode(&fresh[..]));
    entry
        .set_secret(text.as_bytes())
        .map_err(|e| StoreError(format!("the keychain refused a new key: {e}")))?;
    Ok(fresh)
}

fn decode_key(stored: &[u8]) -> Option<Zeroizing<[u8; 32]>> {
    let bytes = Zeroizing::new(hex::decode(stored).ok()?);
    let mut key = Zeroizing::new([0u8; 32]);
    if bytes.len() != 32 {
        return None;
    }
    key.copy_from_slice(&bytes);
    Some(key)
}

fn rand_fill(buf: &mut [u8]) {
    use rand::RngCore;
    rand::rngs::OsRng.fill_bytes(buf);
}

impl TokenStore for KeyringStore {
    fn audit_seal_key(&self) -> Option<SealKey> {
        Some(SealKey::derived_from(&self.key[..]))
    }

    fn load(&self) -> Option<Stored> {
        let bytes = match std::fs::read(&self.file) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                self.set_aside(&format!("unreadable: {e}"));
                return None;
            }
        };
        if bytes.len() < MAGIC.len() + 24 || &bytes[..MAGIC.len()] != MAGIC {
            self.set_aside("not a session file");
            return None;
        }
        let (nonce, sealed) = bytes[MAGIC.len()..].split_at(24);
        let Ok(plain) = self.cipher().decrypt(
            XNonce::from_slice(nonce),
            Payload {
                msg: sealed,
                aad: AAD,
            },
        ) else {
            self.set_aside(
                "it does not decrypt with the keychain's key (damaged, or from another key)",
            );
            return None;
        };
        let plain = Zeroizing::new(plain);
        match serde_json::from_slice::<Stored>(&plain) {
            Ok(stored) => Some(stored),
            Err(_) => {
                self.set_aside("its contents are not a session");
                None
            }
        }
    }

    fn save(&self, session: &Stored) -> Result<(), StoreError> {
        let plain =
            Zeroizing::new(serde_json::to_vec(session).map_err(|e| StoreError(e.to_string()))?);
        let mut nonce = [0u8; 24];
        rand_fill(&mut nonce);
        let sealed = self
            .cipher()
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &plain,
                    aad: AAD,
                },
            )
            .map_err(|_| StoreError("sealing the session failed".into()))?;
        let mut bytes = Vec::with_capacity(MAGIC.len() + 24 + sealed.len());
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&nonce);
        bytes.extend_from_slice(&sealed);
        write_atomically(&self.file, &bytes)
            .map_err(|e| StoreError(format!("cannot write {}: {e}", self.file.display())))
    }

    fn clear(&self) -> Result<(), StoreError> {
        match std::fs::remove_file(&self.file) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError(format!(
                "cannot remove {}: {e}",
                self.file.display()
            ))),
        }
    }

    fn status(&self) -> StoreStatus {
        StoreStatus {
            kind: "keyring",
            warning: None,
        }
    }
}

/// Temp file in the same folder, fsync, rename over the target, fsync the folder: after a crash the
/// file is either the old one or the new one, never a mix.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("tmp");
    {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Ok(dir) = std::fs::File::open(dir) {
        let _ = dir.sync_all();
    }
    Ok(())
}

/// The platform's keychain as a `keyring-core` store.
pub fn platform_credentials() -> Result<Arc<keyring_core::CredentialStore>, StoreError> {
    #[cfg(target_os = "linux")]
    {
        let store = dbus_secret_service_keyring_store::Store::new().map_err(|e| {
            StoreError(format!(
                "no Secret Service (is a keyring running and unlocked?): {e}"
            ))
        })?;
        Ok(store)
    }
    #[cfg(target_os = "macos")]
    {
        let store = apple_native_keyring_store::keychain::Store::new()
            .map_err(|e| StoreError(format!("the macOS Keychain cannot be used: {e}")))?;
        Ok(store)
    }
    #[cfg(windows)]
    {
        let store = windows_native_keyring_store::Store::new().map_err(|e| {
            StoreError(format!(
                "the Windows Credential Manager cannot be used: {e}"
            ))
        })?;
        Ok(store)
    }
    #[cfg(not(any(target_os = "linux", target_os = "macos", windows)))]
    {
        Err(StoreError(
            "no keychain is supported on this platform".into(),
        ))
    }
}

/// A signed-in session with every field set, the given access token and a lock-free state: for the
/// tests of the store and of the agent's saved sessions.
#[cfg(test)]
pub(crate) fn sample(token: &str) -> Stored {
    Stored {
        user: User {
            uid: "555021935107".into(),
            name: Some("Amelia Hart".into()),
            given_name: None,
            family_name: None,
            email: None,
            roles: vec![],
            selected_role: None,
            assurance: crate::oidc::claims::Assurance {
                acr: None,
                amr: vec![],
                id_assurance_level: None,
                authentication_assurance_level: None,
                auth_time: None,
            },
        },
        sub: "555021935107".into(),
        sid: Some("sid".into()),
        access_token: Zeroizing::new(token.into()),
        expires_at: 42,
        refresh_token: Some(Zeroizing::new("refresh-secret-value".into())),
        id_token: Zeroizing::new("id.token.value".into()),
        events_ticket: Some(Zeroizing::new("v1.events.ticket".into())),
        signed_in_at: 7,
        locked: None,
        locked_by_card: false,
        card: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mock() -> Arc<keyring_core::CredentialStore> {
        keyring_core::mock::Store::new().unwrap()
    }

    #[test]
    fn a_saved_session_comes_back_and_the_file_holds_no_token_in_clear() {
        let dir = tempfile::tempdir().unwrap();
        let credentials = mock();
        let store = KeyringStore::open(dir.path(), &credentials).unwrap();
        store.save(&sample("access-secret-value")).unwrap();
        let bytes = std::fs::read(store.file()).unwrap();
        for secret in [
            "access-secret-value",
            "refresh-secret-value",
            "id.token.value",
            "v1.events.ticket",
            "Amelia",
        ] {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "{secret} in clear"
            );
        }
        let again = KeyringStore::open(dir.path(), &credentials).unwrap();
        let loaded = again.load().unwrap();
        assert_eq!(loaded.access_token.as_str(), "access-secret-value");
        assert_eq!(loaded.user.uid, "555021935107");
        let (session, _) = loaded.into_session();
        assert_eq!(
            session.events_ticket.as_ref().map(|t| t.expose()),
            Some("v1.events.ticket"),
            "the relay's event-stream ticket outlives a restart"
        );
        again.clear().unwrap();
        assert!(again.load().is_none());
    }

    #[test]
    fn a_damaged_file_is_set_aside_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let credentials = mock();
        let store = KeyringStore::open(dir.path(), &credentials).unwrap();
        store.save(&sample("t")).unwrap();
        let mut bytes = std::fs::read(store.file()).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(store.file(), bytes).unwrap();
        assert!(store.load().is_none());
        assert!(!store.file().exists());
        let aside = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .any(|e| e.file_name().to_string_lossy().contains("unreadable"));
        assert!(aside);
        std::fs::write(store.file(), b"garbage").unwrap();
        assert!(store.load().is_none());
    }

    #[test]
    fn another_key_cannot_open_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = KeyringStore::open(dir.path(), &mock()).unwrap();
        store.save(&sample("t")).unwrap();
        // A new keychain (the key lost): the file is set aside, not misread.
        let other = KeyringStore::open(dir.path(), &mock()).unwrap();
        assert!(other.load().is_none());
    }
}
