//! `cis2-relay`: the vendor-run confidential client that CIS2 requires (cis2-reference.md §3). It holds the
//! private key, swaps the agent's authorization code for tokens, and receives CIS2's back-channel logout.
//!
//! Not built yet: this crate is empty until the relay issue is worked on. Nothing here pretends to work.
