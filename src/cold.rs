//! Rare paths kept out of the request path's code: a wait that few requests make, run behind
//! a pointer the compiler cannot see through.
//!
//! An `async fn` that awaits another has the callee's state machine inlined into its own poll
//! function, so the request path's poll functions held every rare path's code (a control
//! call's token exchange, where a token already held is looked up in line; a sign-in
//! answered locally; a quota wait; a new connection's handshakes) between the blocks every
//! request runs: about 47 KB for the request handler alone. Each request then fetched a fresh
//! instruction-cache line every few instructions (callgrind's model). Behind `out_of_line` the
//! rare future is polled through its vtable, which the caller cannot inline, and the caller's
//! future no longer holds the rare one's state either (a box per rare wait instead).

use std::future::Future;
use std::pin::Pin;

/// A future boxed behind `dyn`, made in a function that is never inlined, so the caller sees
/// neither its size nor its code.
pub type OutOfLine<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Boxes `future` out of line (see the module's note). For a wait few requests make: each
/// call allocates.
#[inline(never)]
pub fn out_of_line<'a, T>(future: impl Future<Output = T> + Send + 'a) -> OutOfLine<'a, T> {
    Box::pin(future)
}
