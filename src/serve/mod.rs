//! Serving with the lossless drain: the triggers that end a generation, and
//! (feature `http`) an HTTP server for hyper and tower services.
//!
//! - [`Triggers`] owns "signal → upgrade" and "signal → stop" (and the
//!   control socket) in a task of its own, so the accept loop keeps
//!   accepting while an upgrade runs — up to the ready timeout, and a
//!   successor that hangs must not stall the service. Its handlers are the
//!   only ones `handover` installs, and only for the signals the application
//!   names.
//! - [`Server`] (feature `http`) serves the handover's listeners, TCP and
//!   Unix, with any hyper or tower service (an axum `Router` as it is),
//!   HTTP/1.1 and HTTP/2 on the same listener, and drains without losing a
//!   request. See its documentation for the drain rules. With feature
//!   `tls`, [`Server::tls`] serves it over TLS (rustls), and
//!   [`tls_config`] makes clients resume their sessions across upgrades.
//! - [`AcceptBackoff`] is the accept-error policy of both (`EMFILE` and the
//!   like: 5 ms doubling to 1 s, rate-limited logging), for hand-written
//!   accept loops too.
//!
//! The crate-level documentation and the README show both at work; so do
//! examples/axum.rs (an axum service in 40 lines) and examples/http_server.rs.

mod backoff;
mod triggers;

#[cfg(feature = "http")]
mod canary;
#[cfg(feature = "http")]
mod conn;
#[cfg(feature = "http")]
mod http;
#[cfg(feature = "tls")]
mod tickets;
#[cfg(feature = "tls")]
mod tls;

pub use backoff::AcceptBackoff;
pub use triggers::Triggers;

#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
pub use http::{Listener, Server};
#[cfg(feature = "tls")]
#[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
pub use tls::tls_config;

/// The stream of a connection the server upgraded (what `hyper`'s
/// `Upgraded` downcasts to).
#[cfg(feature = "websocket")]
pub(crate) type Upgraded<T> = hyper_util::rt::TokioIo<conn::Rewind<T>>;
