//! The OpenID Connect relying party for CIS2: discovery and keys, the authorization request, the
//! loopback redirect, the code exchange, ID token validation and the CIS2 user model.

pub mod authorize;
pub mod claims;
pub mod discovery;
pub mod exchange;
pub mod loopback;
pub mod rp;
pub mod validate;
