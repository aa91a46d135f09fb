//! The OpenID Connect relying party for NHS CIS2, with no state of its own: discovery and the provider's
//! keys, the authorization request (PKCE, state, nonce), the loopback redirect listener, the code
//! exchange (direct client authentication, or through the vendor's relay), ID token validation (OpenID
//! Connect Core 3.1.3.7) and the CIS2 user model. The agent (`cis2-core`) and the relay (`cis2-relay`)
//! both build on it, so a token is judged by the same rules wherever it is redeemed. The edges that tests
//! replace — clock, browser, HTTP client — live here too.

pub mod authorize;
pub mod browser;
pub mod claims;
pub mod clock;
pub mod discovery;
pub mod exchange;
pub mod http;
pub mod logout;
pub mod loopback;
pub mod relay;
pub mod rp;
pub mod secret;
pub mod token_exchange;
pub mod validate;
