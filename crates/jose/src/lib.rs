//! The small slice of JOSE that talking to NHS CIS2 needs, and nothing more: compact JWS with the RSA
//! algorithms CIS2 uses (RS256, RS512, PS256), RSA JSON Web Keys with their RFC 7638 thumbprints, and a
//! verifier that refuses `none` and HMAC outright and picks the key by `kid` the way CIS2's key rotation
//! expects. The provider (`cis2-mock-idp`), the agent's relying party and the relay all sign and verify
//! through this crate, so every component agrees on what a valid token is.
//!
//! It does not validate claims: what `iss`, `aud`, `exp` and friends must be is the caller's business.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rsa::pkcs1::{DecodeRsaPrivateKey, EncodeRsaPrivateKey};
use rsa::pkcs8::{DecodePrivateKey, EncodePrivateKey, LineEnding};
use rsa::traits::PublicKeyParts;
use rsa::{BigUint, Pkcs1v15Sign, Pss, RsaPrivateKey, RsaPublicKey};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256, Sha512};
use std::fmt;

/// Base64url without padding, as JOSE writes it.
pub fn b64url(bytes: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Decodes base64url as JOSE requires it (RFC 7515 §2): no padding, and the unused bits of the last
/// character zero. Anything else has more than one spelling of the same bytes, which a token never
/// needs and a forger could use to slip past a comparison of the text.
pub fn b64url_decode(text: &str) -> Result<Vec<u8>, JoseError> {
    URL_SAFE_NO_PAD
        .decode(text)
        .map_err(|_| JoseError::Malformed("a part is not canonical unpadded base64url"))
}

/// The SHA-256 of `bytes`, base64url encoded: a PKCE S256 challenge, a jti, an `at_hash` building block.
pub fn sha256_b64url(bytes: impl AsRef<[u8]>) -> String {
    b64url(Sha256::digest(bytes.as_ref()))
}

/// A random base64url string carrying `bytes` bytes of entropy (state, nonce, codes, verifiers).
pub fn random_token(bytes: usize) -> String {
    use rand::RngCore;
    let mut buf = vec![0u8; bytes];
    rand::rngs::OsRng.fill_bytes(&mut buf);
    b64url(buf)
}

/// The signature algorithms this project signs and verifies with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Alg {
    RS256,
    RS512,
    PS256,
}

impl Alg {
    pub fn as_str(self) -> &'static str {
        match self {
            Alg::RS256 => "RS256",
            Alg::RS512 => "RS512",
            Alg::PS256 => "PS256",
        }
    }

    pub fn parse(name: &str) -> Option<Alg> {
        match name {
            "RS256" => Some(Alg::RS256),
            "RS512" => Some(Alg::RS512),
            "PS256" => Some(Alg::PS256),
            _ => None,
        }
    }

    /// The left half of this algorithm's hash of `value`, base64url: OIDC's `at_hash`, `c_hash`, `s_hash`.
    pub fn half_hash(self, value: &str) -> String {
        let digest: Vec<u8> = match self {
            Alg::RS256 | Alg::PS256 => Sha256::digest(value.as_bytes()).to_vec(),
            Alg::RS512 => Sha512::digest(value.as_bytes()).to_vec(),
        };
        b64url(&digest[..digest.len() / 2])
    }
}

impl fmt::Display for Alg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a token or key was refused. Each case is its own variant so that callers can say exactly what
/// went wrong; none of them carries the token itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JoseError {
    #[error("the token is malformed: {0}")]
    Malformed(&'static str),
    #[error("the token is unsigned (alg \"none\"), which is never accepted")]
    AlgNone,
    #[error("the token is signed with {0}, which is not accepted (only RSA signatures are)")]
    AlgNotAllowed(String),
    #[error("no published key has the token's key id \"{0}\"")]
    UnknownKid(String),
    #[error(
        "the token names no key id and the provider publishes several keys, so the key is ambiguous"
    )]
    AmbiguousKey,
    #[error("the provider publishes no usable signing key")]
    NoKeys,
    #[error("the token's signature does not verify")]
    BadSignature,
    #[error("the key is not usable: {0}")]
    BadKey(String),
    /// RFC 7515 §4.1.11: a `crit` header names extensions the verifier must understand; this one
    /// understands none, so any `crit` refuses the token.
    #[error("the token's header marks {0} as critical, which this verifier does not understand")]
    CriticalHeader(String),
}

/// A public RSA key as a JWK.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwk {
    pub kty: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "use")]
    pub use_: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alg: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub e: Option<String>,
}

impl Jwk {
    pub fn from_public_key(key: &RsaPublicKey, alg: Option<Alg>) -> Jwk {
        let n = b64url(key.n().to_bytes_be());
        let e = b64url(key.e().to_bytes_be());
        let kid = rsa_thumbprint(&n, &e);
        Jwk {
            kty: "RSA".into(),
            kid: Some(kid),
            use_: Some("sig".into()),
            alg: alg.map(|a| a.as_str().to_string()),
            n: Some(n),
            e: Some(e),
        }
    }

    /// The RSA public key, if this JWK is a usable RSA signing key.
    pub fn rsa_public_key(&self) -> Result<RsaPublicKey, JoseError> {
        if self.kty != "RSA" {
            return Err(JoseError::BadKey(format!(
                "key type {} is not RSA",
                self.kty
            )));
        }
        let (Some(n), Some(e)) = (&self.n, &self.e) else {
            return Err(JoseError::BadKey("an RSA key without n or e".into()));
        };
        let n = BigUint::from_bytes_be(&b64url_decode(n)?);
        let e = BigUint::from_bytes_be(&b64url_decode(e)?);
        RsaPublicKey::new(n, e).map_err(|err| JoseError::BadKey(err.to_string()))
    }

    /// RFC 7638 thumbprint of this key (SHA-256, base64url).
    pub fn thumbprint(&self) -> Option<String> {
        Some(rsa_thumbprint(self.n.as_deref()?, self.e.as_deref()?))
    }

    fn usable_for_signatures(&self) -> bool {
        self.kty == "RSA" && self.use_.as_deref().is_none_or(|u| u == "sig")
    }
}

/// RFC 7638: SHA-256 over the required members in lexicographic order, no white space.
pub fn rsa_thumbprint(n: &str, e: &str) -> String {
    let canonical = format!(r#"{{"e":"{e}","kty":"RSA","n":"{n}"}}"#);
    sha256_b64url(canonical)
}

/// Whether `kid` may name a key: 1 to 128 of `A-Z a-z 0-9 - _`, as every RFC 7638 thumbprint is.
pub fn check_kid(kid: &str) -> Result<(), JoseError> {
    let fits = !kid.is_empty()
        && kid.len() <= 128
        && kid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if fits {
        Ok(())
    } else {
        Err(JoseError::BadKey(format!(
            "the key id {kid:?} is not usable: write 1 to 128 letters, digits, - or _"
        )))
    }
}

/// A JWK Set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JwkSet {
    pub keys: Vec<Jwk>,
}

impl JwkSet {
    pub fn find(&self, kid: &str) -> Option<&Jwk> {
        self.keys.iter().find(|k| k.kid.as_deref() == Some(kid))
    }
}

/// An RSA private key that signs JWTs. Its `Debug` shows the key id only. Signing goes through ring
/// (constant-time, blinded, and several times faster than the pure-Rust `rsa` crate's private-key
/// operation); `rsa` keeps the key for encoding and the public parts.
#[derive(Clone)]
pub struct SigningKey {
    key: RsaPrivateKey,
    signer: std::sync::Arc<ring::signature::RsaKeyPair>,
    kid: String,
    alg: Alg,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// A fresh 2048-bit key.
    pub fn generate(alg: Alg) -> SigningKey {
        let key = RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).expect("RSA key generation");
        SigningKey::from_key(key, alg).expect("a generated 2048-bit key is usable")
    }

    /// A key from PEM (PKCS#8 `PRIVATE KEY` or PKCS#1 `RSA PRIVATE KEY`).
    pub fn from_pem(pem: &str, alg: Alg) -> Result<SigningKey, JoseError> {
        let key = RsaPrivateKey::from_pkcs8_pem(pem)
            .or_else(|_| RsaPrivateKey::from_pkcs1_pem(pem))
            .map_err(|_| {
                JoseError::BadKey("not a PEM RSA private key (PKCS#8 or PKCS#1)".into())
            })?;
        SigningKey::from_key(key, alg)
    }

    fn from_key(key: RsaPrivateKey, alg: Alg) -> Result<SigningKey, JoseError> {
        let der = key
            .to_pkcs8_der()
            .map_err(|_| JoseError::BadKey("the key cannot be encoded as PKCS#8".into()))?;
        let signer = ring::signature::RsaKeyPair::from_pkcs8(der.as_bytes()).map_err(|e| {
            JoseError::BadKey(format!(
                "the RSA key is not usable for signing ({e}); keys must be 2048 to 8192 bits"
            ))
        })?;
        let jwk = Jwk::from_public_key(&key.to_public_key(), None);
        Ok(SigningKey {
            kid: jwk.kid.expect("a thumbprint"),
            key,
            signer: std::sync::Arc::new(signer),
            alg,
        })
    }

    /// The same key, signing with another algorithm.
    pub fn with_alg(&self, alg: Alg) -> SigningKey {
        SigningKey {
            alg,
            ..self.clone()
        }
    }

    /// PKCS#8 PEM of the private key, for writing test fixtures and key files.
    pub fn to_pkcs8_pem(&self) -> String {
        self.key
            .to_pkcs8_pem(LineEnding::LF)
            .expect("PKCS#8 encoding")
            .to_string()
    }

    /// PKCS#1 PEM of the private key.
    pub fn to_pkcs1_pem(&self) -> String {
        self.key
            .to_pkcs1_pem(LineEnding::LF)
            .expect("PKCS#1 encoding")
            .to_string()
    }

    /// The key id: the RFC 7638 thumbprint unless [`with_kid`](Self::with_kid) named it otherwise.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The same key under the key id it was registered with, where that is a name rather than the
    /// thumbprint (EPS registers `eps-cpt-ui-int`): its signatures and its public JWK carry `kid`.
    /// Refused unless `kid` is 1 to 128 of `A-Z a-z 0-9 - _` (a thumbprint is), so that it can go
    /// anywhere a key id goes, a relay's dotted event-stream tickets included.
    pub fn with_kid(&self, kid: &str) -> Result<SigningKey, JoseError> {
        check_kid(kid)?;
        Ok(SigningKey {
            kid: kid.to_string(),
            ..self.clone()
        })
    }

    /// A 256-bit secret for `purpose`, derived from the private key (HMAC-SHA-256 keyed by the purpose
    /// over the PKCS#8 encoding): every holder of the key derives the same one, nobody else can, and
    /// it reveals nothing of the key. Lets servers that share a signing key share a MAC key too.
    pub fn derive_secret(&self, purpose: &str) -> [u8; 32] {
        let der = self.key.to_pkcs8_der().expect("PKCS#8 encoding");
        let mac = ring::hmac::sign(
            &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, purpose.as_bytes()),
            der.as_bytes(),
        );
        let mut secret = [0u8; 32];
        secret.copy_from_slice(mac.as_ref());
        secret
    }

    pub fn alg(&self) -> Alg {
        self.alg
    }

    /// The public key as a JWK, under this key's kid.
    pub fn public_jwk(&self) -> Jwk {
        Jwk {
            kid: Some(self.kid.clone()),
            ..Jwk::from_public_key(&self.key.to_public_key(), Some(self.alg))
        }
    }

    /// Signs `claims` as a compact JWS with header `{"alg", "typ": "JWT", "kid"}`.
    pub fn sign(&self, claims: &Value) -> String {
        let mut header = Map::new();
        header.insert("alg".into(), self.alg.as_str().into());
        header.insert("typ".into(), "JWT".into());
        header.insert("kid".into(), self.kid.clone().into());
        self.sign_with_header(&Value::Object(header), claims)
    }

    /// Signs with a header the caller wrote (tests use it for odd headers; `alg` must match this key's).
    pub fn sign_with_header(&self, header: &Value, claims: &Value) -> String {
        let signing_input = format!(
            "{}.{}",
            b64url(header.to_string()),
            b64url(claims.to_string())
        );
        let signature = self.sign_bytes(signing_input.as_bytes());
        format!("{signing_input}.{}", b64url(signature))
    }

    fn sign_bytes(&self, input: &[u8]) -> Vec<u8> {
        let padding: &'static dyn ring::signature::RsaEncoding = match self.alg {
            Alg::RS256 => &ring::signature::RSA_PKCS1_SHA256,
            Alg::RS512 => &ring::signature::RSA_PKCS1_SHA512,
            Alg::PS256 => &ring::signature::RSA_PSS_SHA256,
        };
        let mut signature = vec![0; self.signer.public().modulus_len()];
        self.signer
            .sign(
                padding,
                &ring::rand::SystemRandom::new(),
                input,
                &mut signature,
            )
            .expect("RSA signing with a checked key");
        signature
    }
}

/// A compact JWS split into its parts, before any verification.
#[derive(Debug, Clone)]
pub struct UnverifiedJwt {
    pub header: Map<String, Value>,
    pub claims: Map<String, Value>,
    signing_input: String,
    signature: Vec<u8>,
}

impl UnverifiedJwt {
    pub fn parse(token: &str) -> Result<UnverifiedJwt, JoseError> {
        let mut parts = token.split('.');
        let (Some(h), Some(c), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(JoseError::Malformed("a JWT has three dot-separated parts"));
        };
        let header: Value = serde_json::from_slice(&b64url_decode(h)?)
            .map_err(|_| JoseError::Malformed("the header is not JSON"))?;
        let claims: Value = serde_json::from_slice(&b64url_decode(c)?)
            .map_err(|_| JoseError::Malformed("the claims are not JSON"))?;
        let (Value::Object(header), Value::Object(claims)) = (header, claims) else {
            return Err(JoseError::Malformed(
                "header and claims must be JSON objects",
            ));
        };
        if let Some(crit) = header.get("crit") {
            return Err(JoseError::CriticalHeader(match crit {
                Value::Array(names) if !names.is_empty() => names
                    .iter()
                    .map(|n| {
                        n.as_str()
                            .map_or_else(|| n.to_string(), |n| format!("{n:?}"))
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
                other => format!("a malformed crit ({other})"),
            }));
        }
        Ok(UnverifiedJwt {
            header,
            claims,
            signing_input: format!("{h}.{c}"),
            signature: b64url_decode(s)?,
        })
    }

    pub fn alg(&self) -> Option<&str> {
        self.header.get("alg").and_then(Value::as_str)
    }

    pub fn kid(&self) -> Option<&str> {
        self.header.get("kid").and_then(Value::as_str)
    }

    /// The algorithm, refused unless it is one of `allowed` (and never `none` or an HMAC).
    pub fn checked_alg(&self, allowed: &[Alg]) -> Result<Alg, JoseError> {
        let name = self
            .alg()
            .ok_or(JoseError::Malformed("the header has no alg"))?;
        if name.eq_ignore_ascii_case("none") {
            return Err(JoseError::AlgNone);
        }
        match Alg::parse(name) {
            Some(alg) if allowed.contains(&alg) => Ok(alg),
            _ => Err(JoseError::AlgNotAllowed(name.to_string())),
        }
    }

    /// Picks the key: by `kid` when the token names one; with no `kid`, only when exactly one signing key is
    /// published (OIDC Core 10.1).
    pub fn select_key<'a>(&self, keys: &'a JwkSet) -> Result<&'a Jwk, JoseError> {
        let candidates: Vec<&Jwk> = keys
            .keys
            .iter()
            .filter(|k| k.usable_for_signatures())
            .collect();
        match self.kid() {
            Some(kid) => candidates
                .into_iter()
                .find(|k| k.kid.as_deref() == Some(kid))
                .ok_or_else(|| JoseError::UnknownKid(kid.to_string())),
            None => match candidates.as_slice() {
                [] => Err(JoseError::NoKeys),
                [only] => Ok(only),
                _ => Err(JoseError::AmbiguousKey),
            },
        }
    }

    /// Verifies the signature with `key` under `alg` (already checked by [`checked_alg`](Self::checked_alg)).
    pub fn verify_with(&self, alg: Alg, key: &Jwk) -> Result<(), JoseError> {
        let public = key.rsa_public_key()?;
        let input = self.signing_input.as_bytes();
        let result = match alg {
            Alg::RS256 => public.verify(
                Pkcs1v15Sign::new::<Sha256>(),
                &Sha256::digest(input),
                &self.signature,
            ),
            Alg::RS512 => public.verify(
                Pkcs1v15Sign::new::<Sha512>(),
                &Sha512::digest(input),
                &self.signature,
            ),
            Alg::PS256 => public.verify(
                Pss::new::<Sha256>(),
                &Sha256::digest(input),
                &self.signature,
            ),
        };
        result.map_err(|_| JoseError::BadSignature)
    }

    /// `checked_alg`, `select_key` and `verify_with` in one: the claims if the signature holds.
    pub fn verify(self, allowed: &[Alg], keys: &JwkSet) -> Result<Map<String, Value>, JoseError> {
        let alg = self.checked_alg(allowed)?;
        let key = self.select_key(keys)?;
        self.verify_with(alg, key)?;
        Ok(self.claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::sync::OnceLock;

    fn key() -> &'static SigningKey {
        static KEY: OnceLock<SigningKey> = OnceLock::new();
        KEY.get_or_init(|| SigningKey::generate(Alg::RS256))
    }

    fn set_of(keys: &[&SigningKey]) -> JwkSet {
        JwkSet {
            keys: keys.iter().map(|k| k.public_jwk()).collect(),
        }
    }

    #[test]
    fn rfc7638_example_thumbprint() {
        // The worked example of RFC 7638 §3.1.
        let n = "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw";
        assert_eq!(
            rsa_thumbprint(n, "AQAB"),
            "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
        );
    }

    #[test]
    fn each_algorithm_round_trips() {
        for alg in [Alg::RS256, Alg::RS512, Alg::PS256] {
            let signer = key().with_alg(alg);
            let token = signer.sign(&json!({"sub": "x"}));
            let claims = UnverifiedJwt::parse(&token)
                .unwrap()
                .verify(&[alg], &set_of(&[&signer]))
                .unwrap();
            assert_eq!(claims["sub"], "x");
        }
    }

    #[test]
    fn a_tampered_payload_fails() {
        let token = key().sign(&json!({"sub": "alice"}));
        let parts: Vec<&str> = token.split('.').collect();
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            b64url(r#"{"sub":"mallory"}"#),
            parts[2]
        );
        let err = UnverifiedJwt::parse(&forged)
            .unwrap()
            .verify(&[Alg::RS256], &set_of(&[key()]))
            .unwrap_err();
        assert_eq!(err, JoseError::BadSignature);
    }

    #[test]
    fn none_and_hmac_are_refused_before_any_key_is_looked_at() {
        let none = format!(
            "{}.{}.",
            b64url(r#"{"alg":"none"}"#),
            b64url(r#"{"sub":"x"}"#)
        );
        assert_eq!(
            UnverifiedJwt::parse(&none)
                .unwrap()
                .verify(&[Alg::RS256], &JwkSet::default())
                .unwrap_err(),
            JoseError::AlgNone
        );
        let hs = format!(
            "{}.{}.c2ln",
            b64url(r#"{"alg":"HS256"}"#),
            b64url(r#"{"sub":"x"}"#)
        );
        assert_eq!(
            UnverifiedJwt::parse(&hs)
                .unwrap()
                .verify(&[Alg::RS256], &set_of(&[key()]))
                .unwrap_err(),
            JoseError::AlgNotAllowed("HS256".into())
        );
    }

    #[test]
    fn algorithm_outside_the_allowed_list_is_refused() {
        let token = key().with_alg(Alg::RS512).sign(&json!({}));
        assert_eq!(
            UnverifiedJwt::parse(&token)
                .unwrap()
                .verify(&[Alg::RS256], &set_of(&[key()]))
                .unwrap_err(),
            JoseError::AlgNotAllowed("RS512".into())
        );
    }

    #[test]
    fn key_selection_without_kid() {
        let other = SigningKey::generate(Alg::RS256);
        let header = json!({"alg": "RS256"});
        let token = key().sign_with_header(&header, &json!({"sub": "x"}));
        let parsed = UnverifiedJwt::parse(&token).unwrap();
        assert!(
            parsed
                .clone()
                .verify(&[Alg::RS256], &set_of(&[key()]))
                .is_ok()
        );
        assert_eq!(
            parsed
                .verify(&[Alg::RS256], &set_of(&[key(), &other]))
                .unwrap_err(),
            JoseError::AmbiguousKey
        );
    }

    #[test]
    fn unknown_kid_is_named() {
        let other = SigningKey::generate(Alg::RS256);
        let token = other.sign(&json!({}));
        assert_eq!(
            UnverifiedJwt::parse(&token)
                .unwrap()
                .verify(&[Alg::RS256], &set_of(&[key()]))
                .unwrap_err(),
            JoseError::UnknownKid(other.kid().to_string())
        );
    }

    #[test]
    fn a_named_kid_goes_into_signatures_and_the_jwk_and_odd_names_are_refused() {
        let named = key().with_kid("eps-cpt-ui-int").unwrap();
        let token = named.sign(&json!({"sub": "x"}));
        let parsed = UnverifiedJwt::parse(&token).unwrap();
        assert_eq!(parsed.kid(), Some("eps-cpt-ui-int"));
        assert_eq!(named.public_jwk().kid.as_deref(), Some("eps-cpt-ui-int"));
        assert_eq!(
            named.public_jwk().thumbprint().as_deref(),
            Some(key().kid())
        );
        assert!(parsed.verify(&[key().alg()], &set_of(&[&named])).is_ok());
        // Under the thumbprint alone, the named token's key is not found.
        assert_eq!(
            UnverifiedJwt::parse(&token)
                .unwrap()
                .verify(&[key().alg()], &set_of(&[key()]))
                .unwrap_err(),
            JoseError::UnknownKid("eps-cpt-ui-int".into())
        );
        for bad in ["", "a.b", "with space", "ünïcode", &"x".repeat(129)] {
            assert!(
                matches!(key().with_kid(bad), Err(JoseError::BadKey(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn pem_round_trip_keeps_the_kid() {
        let pem = key().to_pkcs8_pem();
        assert_eq!(
            SigningKey::from_pem(&pem, Alg::RS256).unwrap().kid(),
            key().kid()
        );
        let pem1 = key().to_pkcs1_pem();
        assert_eq!(
            SigningKey::from_pem(&pem1, Alg::RS256).unwrap().kid(),
            key().kid()
        );
        assert!(SigningKey::from_pem("not a key", Alg::RS256).is_err());
    }

    #[test]
    fn base64url_with_padding_or_stray_trailing_bits_is_refused() {
        assert_eq!(b64url_decode("AA").unwrap(), vec![0]);
        // The same byte padded, and with a non-zero unused bit: other spellings of [0].
        for bad in ["AA==", "AB", "AA=", "A", "A+", "A/"] {
            assert!(
                matches!(b64url_decode(bad), Err(JoseError::Malformed(_))),
                "{bad}"
            );
        }
        let token = key().sign(&json!({"sub": "x"}));
        let mut parts: Vec<String> = token.split('.').map(str::to_string).collect();
        parts[1].push_str("==");
        assert!(matches!(
            UnverifiedJwt::parse(&parts.join(".")),
            Err(JoseError::Malformed(_))
        ));
    }

    #[test]
    fn a_critical_header_is_refused_even_when_the_signature_holds() {
        let header = json!({"alg": "RS256", "kid": key().kid(), "crit": ["exp"], "exp": 1});
        let token = key()
            .with_alg(Alg::RS256)
            .sign_with_header(&header, &json!({}));
        assert_eq!(
            UnverifiedJwt::parse(&token).unwrap_err(),
            JoseError::CriticalHeader("\"exp\"".into())
        );
        let empty = json!({"alg": "RS256", "kid": key().kid(), "crit": []});
        let token = key()
            .with_alg(Alg::RS256)
            .sign_with_header(&empty, &json!({}));
        assert!(matches!(
            UnverifiedJwt::parse(&token),
            Err(JoseError::CriticalHeader(_))
        ));
        // The same token without crit verifies: it is the header alone that refuses it.
        let plain = json!({"alg": "RS256", "kid": key().kid(), "exp": 1});
        let token = key()
            .with_alg(Alg::RS256)
            .sign_with_header(&plain, &json!({}));
        assert!(
            UnverifiedJwt::parse(&token)
                .unwrap()
                .verify(&[Alg::RS256], &set_of(&[key()]))
                .is_ok()
        );
    }

    #[test]
    fn malformed_tokens_are_refused() {
        for bad in ["", "a.b", "a.b.c.d", "!!.!!.!!", "e30.bm90IGpzb24.AA"] {
            assert!(matches!(
                UnverifiedJwt::parse(bad),
                Err(JoseError::Malformed(_))
            ));
        }
    }

    #[test]
    fn a_derived_secret_is_the_same_for_every_holder_of_the_key_and_differs_by_purpose_and_key() {
        let reloaded = SigningKey::from_pem(&key().to_pkcs1_pem(), Alg::RS512).unwrap();
        assert_eq!(key().derive_secret("a"), reloaded.derive_secret("a"));
        assert_ne!(key().derive_secret("a"), key().derive_secret("b"));
        let other = SigningKey::generate(Alg::RS256);
        assert_ne!(key().derive_secret("a"), other.derive_secret("a"));
    }
}
