//! Upstream identities' tokens: appauth signing, the token cache and its refresh.

mod cache;
mod settings;
mod shared;
pub mod sign;
mod signin;

pub use cache::{
    backoff, freshness, schedule, Authenticator, Freshness, Grant, SignInError, SignInFuture, Slot,
    Token, TokenCache, TokenKey, TokenStats,
};
pub use settings::{AppConfig, TokenConfig};
pub use shared::SharedAuthenticator;
pub use signin::{answer as sign_in_answer, nonce, UpstreamAuthenticator, APPAUTH_PATH};
