//! TLS for [`Server`] (feature `tls`): rustls through tokio-rustls, with
//! the `ring` crypto provider.
//!
//! # Serving
//!
//! [`Server::tls`] makes every listener of the server speak TLS. The
//! accept loop is the plaintext one; each accepted connection goes to a
//! task of its own, counted in the drain from the accept, that runs the
//! handshake and then serves the TLS stream exactly as a plaintext
//! connection is served (HTTP/1.1 or HTTP/2, told from the first bytes;
//! ALPN decides which of them the client sends). So the drain is the same:
//! accepting stops at the commit (or the stop), requests in flight finish,
//! the next request of a keep-alive HTTP/1.1 connection is answered with
//! `Connection: close`, HTTP/2 gets a graceful GOAWAY. A handshake in
//! progress at the commit is finished and its connection served (lame
//! duck): the client sent its request to this generation.
//!
//! A handshake is bounded: [`HANDSHAKE_TIMEOUT`] from the accept, and never
//! past the drain deadline. At a stop, a connection that has sent no byte
//! of its handshake after 100 ms is closed, as a plaintext connection that
//! sent nothing is. A handshake that fails closes its connection at once.
//!
//! # What does not move
//!
//! An established TLS connection is never handed to the successor
//! ([`Server::migrate`] moves plaintext HTTP/1.1 only): its keys and record
//! sequence numbers live in this process's rustls state, and the successor
//! cannot continue the session from the socket alone (kernel TLS could
//! lift this, and is not on every kernel). It gets the lame-duck drain.
//!
//! # Sessions resume across upgrades
//!
//! [`tls_config`] installs the service's session-ticket keys as the
//! configuration's ticketer (see `tickets`): made by the first generation,
//! handed to each successor with the crate's secrets (a sealed memory
//! file, see `crate::secrets`) before it builds its configuration, rotated
//! on the same 6-hour schedule in every generation. A client that holds a
//! ticket from any generation resumes with the next one (TLS 1.3 PSK or a
//! TLS 1.2 ticket) instead of paying a full handshake — and the new
//! generation does not pay for every client's full handshake at once. The
//! stateful session cache (TLS 1.2 clients without ticket support) is
//! per process: such clients do a full handshake after an upgrade.
//!
//! # Why `ring`
//!
//! rustls' default provider, aws-lc-rs, needs cmake (and on some targets
//! NASM or Go) to build, and builds slower; ring needs only a C compiler,
//! and the ticket keys use its AEAD directly. What ring lacks is
//! post-quantum key exchange (rustls 0.23.48 deprecated its ring provider
//! for that): an application that wants it installs aws-lc-rs as the
//! process's default provider, which [`tls_config`] then uses.

use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body::Body;
use hyper::body::Incoming;
use hyper::service::Service;
use hyper::{Request, Response};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::ProducesTickets;
use tokio::io::{AsyncRead, AsyncWrite};

use super::conn::{self, Activity, Rewind, Shared, Socket};
use super::http::Server;
use super::tickets::{self, Tickets};
use crate::drain::DrainGuard;
use crate::error::Error;
use crate::handover::Handover;
use crate::secrets::Secret;

/// How long a TLS handshake may take from the accept (and never past the
/// drain deadline).
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest certificate or key file read.
const MAX_PEM: u64 = 1 << 20;

impl Server {
    /// Serves TLS with `config` on every listener of this server (feature
    /// `tls`): the same drain as plaintext, see the
    /// [`Server`](Self) documentation; the handshake in a task of each
    /// connection, bounded (10 s from the accept, never past the drain
    /// deadline).
    ///
    /// Build `config` with [`tls_config`], which also makes clients resume
    /// their sessions across upgrades; its `alpn_protocols` decide whether
    /// clients may choose HTTP/2. TLS connections are never handed to the
    /// successor, with [`migrate`](Self::migrate) on too: they get the
    /// lame-duck drain (their keys live in this process's TLS state).
    ///
    /// ```no_run
    /// # async fn example(handover: handover::Handover) -> Result<(), Box<dyn std::error::Error>> {
    /// use handover::serve::{Server, tls_config};
    /// let app = axum::Router::new().route("/", axum::routing::get(|| async { "hello\n" }));
    /// // Read at start: a renewed certificate is deployed by an upgrade.
    /// let tls = tls_config(&handover, "/etc/svc/cert.pem", "/etc/svc/key.pem")?;
    /// let listener = handover.tcp_listener("https", "127.0.0.1:8443")?;
    /// handover.ready()?;
    /// Server::new(&handover).listener(listener).tls(tls).serve(app).await?;
    /// # Ok(()) }
    /// # fn main() { let _ = example; }
    /// ```
    #[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
    pub fn tls(mut self, config: impl Into<Arc<rustls::ServerConfig>>) -> Self {
        self.tls = Some(tokio_rustls::TlsAcceptor::from(config.into()));
        self
    }
}

/// A rustls server configuration for [`Server::tls`] (feature `tls`): the
/// certificate chain in the PEM file `cert` (the server's certificate
/// first), the private key in the PEM file `key` (PKCS#8, PKCS#1 or SEC1),
/// ALPN `h2` and `http/1.1`, TLS 1.3 and 1.2 with rustls' safe defaults
/// (the `ring` provider, or the process's default provider if the
/// application installed one, such as aws-lc-rs for post-quantum key
/// exchange), and the service's session-ticket keys: handed
/// over from the predecessor if it had them, so that clients resume their
/// sessions across the upgrade without a full handshake, and handed on at
/// each upgrade. They rotate every 6 hours, in every generation on the same
/// schedule, and never touch the disk.
///
/// Read it at start, before [`Handover::ready`]: a renewed certificate is
/// deployed by an upgrade. A file that cannot be read, that holds no
/// certificate or key, or a key that does not belong to the certificate is
/// an error, which is also reported to the old generation
/// ([`Handover::report_failure`]): its upgrade fails with this reason (the
/// `reload` reply says it) and it serves on.
///
/// The fields of the returned configuration are rustls': change what you
/// need (a certificate resolver for SNI, client authentication, other ALPN
/// protocols) and keep `ticketer`, which carries the keys.
#[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
pub fn tls_config(
    handover: &Handover,
    cert: impl AsRef<Path>,
    key: impl AsRef<Path>,
) -> Result<rustls::ServerConfig, Error> {
    let built = build_config(handover, cert.as_ref(), key.as_ref());
    handover.g.reported(built)
}

fn build_config(
    handover: &Handover,
    cert_path: &Path,
    key_path: &Path,
) -> Result<rustls::ServerConfig, Error> {
    let invalid = |what: String, why: String| {
        Error::io(what, io::Error::new(io::ErrorKind::InvalidData, why))
    };
    let cert_pem = read_pem(cert_path, "certificate")?;
    let certs = CertificateDer::pem_slice_iter(cert_pem.bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            invalid(
                format!("the TLS certificate {} is not PEM", cert_path.display()),
                e.to_string(),
            )
        })?;
    if certs.is_empty() {
        return Err(invalid(
            format!("the TLS certificate {} is not usable", cert_path.display()),
            "it holds no certificate".to_owned(),
        ));
    }
    let key_pem = read_pem(key_path, "key")?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.bytes()).map_err(|e| {
        invalid(
            format!("the TLS key {} is not usable", key_path.display()),
            e.to_string(),
        )
    })?;
    drop(key_pem);
    let provider = rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(ring_provider);
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid("cannot configure TLS".to_owned(), e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => invalid(
                format!(
                    "the TLS key {} does not belong to the certificate {}",
                    key_path.display(),
                    cert_path.display()
                ),
                e.to_string(),
            ),
            e => invalid(
                format!(
                    "the TLS certificate {} and key {} are not usable",
                    cert_path.display(),
                    key_path.display()
                ),
                e.to_string(),
            ),
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config.ticketer = session_tickets(handover)?;
    tracing::debug!(cert = %cert_path.display(), "TLS configuration loaded");
    Ok(config)
}

/// rustls' ring provider. rustls 0.23.48 deprecated it for having no
/// post-quantum key exchange (X25519MLKEM768, which aws-lc-rs has); it is
/// the crate's choice for building with a C compiler alone. An application
/// that wants the post-quantum groups installs aws-lc-rs as the process's
/// provider (`CryptoProvider::install_default`), which [`tls_config`] then
/// uses.
#[allow(deprecated)]
fn ring_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads a PEM file, at most [`MAX_PEM`] bytes.
fn read_pem(path: &Path, what: &str) -> Result<Secret, Error> {
    let fail =
        |e: io::Error| Error::io(format!("cannot read the TLS {what} {}", path.display()), e);
    let file = std::fs::File::open(path).map_err(fail)?;
    let mut bytes = Vec::new();
    file.take(MAX_PEM + 1)
        .read_to_end(&mut bytes)
        .map_err(fail)?;
    let bytes = Secret::new(bytes);
    if bytes.bytes().len() as u64 > MAX_PEM {
        return Err(fail(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("larger than {MAX_PEM} bytes"),
        )));
    }
    Ok(bytes)
}

/// The service's session-ticket keys: this generation's, made once, from
/// the predecessor's if it handed them over.
fn session_tickets(handover: &Handover) -> Result<Arc<dyn ProducesTickets>, Error> {
    let made = handover.g.shared_secret(
        tickets::KIND,
        make_tickets,
        |t: &Result<Tickets, String>| t.as_ref().map(Tickets::export).unwrap_or_default(),
    );
    let made = made.ok_or_else(|| {
        Error::io(
            "cannot make session-ticket keys",
            io::Error::other("registered with another type"),
        )
    })?;
    match &*made {
        Ok(_) => Ok(Arc::new(SharedTickets(made))),
        Err(e) => Err(Error::io(
            "cannot make session-ticket keys",
            io::Error::other(e.clone()),
        )),
    }
}

fn make_tickets(handed: Option<Secret>) -> Result<Tickets, String> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if let Some(bytes) = handed {
        match Tickets::import(bytes.bytes(), now) {
            Ok(t) => {
                tracing::info!(
                    "TLS session-ticket keys handed over: clients resume their sessions"
                );
                return Ok(t);
            }
            Err(reason) => {
                tracing::warn!(%reason, "cannot use the handed-over session-ticket keys; new ones are made")
            }
        }
    }
    Tickets::new(tickets::LIFETIME, now).ok_or_else(|| "no randomness".to_owned())
}

/// The generation's [`Tickets`], as rustls takes a ticketer.
#[derive(Debug)]
struct SharedTickets(Arc<Result<Tickets, String>>);

impl SharedTickets {
    fn get(&self) -> Option<&Tickets> {
        self.0.as_ref().as_ref().ok()
    }
}

impl ProducesTickets for SharedTickets {
    fn enabled(&self) -> bool {
        self.get().is_some()
    }

    fn lifetime(&self) -> u32 {
        self.get().map_or(0, |t| t.lifetime())
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.get()?.encrypt(plain)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        self.get()?.decrypt(cipher)
    }
}

/// A TLS connection is served, never handed over.
impl<T> Socket for tokio_rustls::server::TlsStream<T>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    const MIGRATES: bool = false;

    fn into_fd(self) -> io::Result<OwnedFd> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "a TLS connection is not handed over",
        ))
    }

    fn from_fd(_: OwnedFd) -> io::Result<Self> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "a TLS connection is not handed over",
        ))
    }
}

/// Runs the handshake of an accepted connection, counted in the drain by
/// `guard`, then serves it (`conn::serve`). See the module documentation
/// for the bounds.
pub(crate) async fn serve<T, S, B>(
    acceptor: tokio_rustls::TlsAcceptor,
    io: T,
    service: S,
    shared: Arc<Shared>,
    guard: DrainGuard,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut deadline = shared.deadline.clone();
    // Its reads tell a stop whether the client sent anything.
    let activity = Activity::new();
    let io = Rewind::new(Bytes::new(), io, Some(activity.clone()));
    let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(io));
    let stream = tokio::select! {
        done = handshake => done,
        _ = activity.idle_at_stop(&shared.drain) => {
            return tracing::debug!("connection sent nothing; closed at the stop");
        }
        _ = deadline.wait_for(|passed| *passed) => {
            return tracing::debug!("TLS handshake cut at the drain deadline");
        }
    };
    match stream {
        Ok(Ok(stream)) => conn::serve(stream, service, shared, guard).await,
        Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
        Err(_) => tracing::debug!("TLS handshake timed out"),
    }
}
