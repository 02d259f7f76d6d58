//! The embedded Meeting API simulator (work in progress).
