//! Upstream identities' tokens: appauth signing, the token cache and its refresh.

mod cache;
mod shared;
pub mod sign;
mod signin;

pub use cache::{
    backoff, freshness, schedule, Authenticator, Freshness, Grant, SignInError, SignInFuture, Slot,
    Token, TokenCache, TokenKey, TokenStats,
};
pub use shared::SharedAuthenticator;
pub use signin::{nonce, UpstreamAuthenticator, APPAUTH_PATH};
