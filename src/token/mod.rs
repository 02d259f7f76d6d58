//! Upstream identities' tokens: appauth signing, the token cache and its refresh.

pub mod sign;
