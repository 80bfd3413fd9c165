//! TLS in the serving layer (feature `tls`): examples/axum_tls through
//! upgrades under TLS load (HTTP/1.1 keep-alive and new-connection clients,
//! HTTP/2 by ALPN), sessions that resume across upgrades (checked by the
//! client: rustls' `handshake_kind`), a certificate that breaks in the new
//! build, and the drain rules of the handshake, in process.
//!
//! Certificates are made at run time (rcgen): a CA the clients trust, and
//! a server certificate for `localhost` signed by it.

mod common;

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use common::{EVENT_TIMEOUT, TempDir, load, procs, wait_until};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, HandshakeKind, StreamOwned};

/// Bound on every connect, handshake, read and write of the test clients.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// An example built by `cargo test --features tls` (which builds the
/// examples) or `cargo build --features tls --examples`.
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> -> target/<profile>/examples/<name>
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("examples")
        .join(name);
    assert!(
        bin.exists(),
        "{} is missing: run `cargo test --features tls`",
        bin.display()
    );
    bin
}

/// A CA, and a certificate for `localhost` signed by it, as PEM files.
struct Certs {
    ca: CertificateDer<'static>,
    cert: PathBuf,
    key: PathBuf,
    /// The good files' bytes, to put back.
    cert_pem: String,
    key_pem: String,
}

impl Certs {
    fn make(dir: &Path) -> Certs {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "handover test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        let certs = Certs {
            ca: ca.der().clone(),
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        };
        certs.restore();
        certs
    }

    /// Puts the good certificate and key in place (as a deploy does).
    fn restore(&self) {
        common::install(&self.cert, self.cert_pem.as_bytes(), 0o600);
        common::install(&self.key, self.key_pem.as_bytes(), 0o600);
    }

    /// A certificate for another key, in place of the good one.
    fn install_foreign_cert(&self) {
        let other = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        common::install(&self.cert, other.cert.pem().as_bytes(), 0o600);
    }

    fn client(&self, alpn: &[&[u8]]) -> Arc<ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.clone()).unwrap();
        let mut config = ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }
}

/// A chain of generations of examples/axum_tls: it prints `listening on
/// ADDR pid PID` when it serves.
struct Chain {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: Arc<Mutex<Vec<String>>>,
    addr: SocketAddr,
    /// Every generation's pid, in order, and whether it was reaped.
    pids: Vec<(u32, bool)>,
}

impl Chain {
    fn start(args: &[&str]) -> Chain {
        procs::become_subreaper();
        let mut child = common::spawn(
            Command::new(example("axum_tls"))
                .args(args)
                .env("RUST_LOG", "info")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
        )
        .expect("spawn axum_tls");
        let lines = procs::line_channel(child.stdout.take().expect("piped"));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (pipe, sink) = (child.stderr.take().expect("piped"), stderr.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if std::env::var_os("HANDOVER_TEST_VERBOSE").is_some() {
                    eprintln!("[axum_tls] {line}");
                }
                sink.lock().unwrap().push(line);
            }
        });
        let mut c = Chain {
            child,
            lines,
            stderr,
            addr: "0.0.0.0:0".parse().unwrap(),
            pids: Vec::new(),
        };
        let (addr, pid) = c.wait_listening();
        c.addr = addr;
        c.pids.push((pid, false));
        c
    }

    fn stderr_tail(&self) -> Vec<String> {
        let e = self.stderr.lock().unwrap();
        e.iter().rev().take(20).rev().cloned().collect()
    }

    /// Waits for the next `listening on ADDR pid PID` line.
    fn wait_listening(&mut self) -> (SocketAddr, u32) {
        let deadline = Instant::now() + EVENT_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = self.lines.recv_timeout(left) else {
                panic!(
                    "no `listening on` line in time; stderr: {:#?}",
                    self.stderr_tail()
                );
            };
            let Some(rest) = line.strip_prefix("listening on ") else {
                continue;
            };
            let mut words = rest.split_whitespace();
            let addr = words.next().unwrap().parse().unwrap();
            let pid = words.nth(1).unwrap().parse().unwrap();
            return (addr, pid);
        }
    }

    fn pid(&self) -> u32 {
        self.pids.last().unwrap().0
    }

    /// SIGHUP; waits for the successor to serve and the old generation to
    /// exit with status 0. Returns the successor's pid.
    fn upgrade(&mut self) -> u32 {
        let old = self.pid();
        procs::signal(old, libc::SIGHUP).unwrap();
        let (addr, new) = self.wait_listening();
        assert_eq!(addr, self.addr, "the address must survive the upgrade");
        assert_ne!(new, old);
        self.pids.push((new, false));
        let status = procs::reap(old, EVENT_TIMEOUT).expect("reap the old generation");
        assert!(
            status.success(),
            "old generation {old} exited with {status}; stderr: {:#?}",
            self.stderr_tail()
        );
        self.pids.iter_mut().for_each(|p| p.1 |= p.0 == old);
        new
    }

    fn stop(&mut self) {
        let pid = self.pid();
        procs::signal(pid, libc::SIGTERM).unwrap();
        let status = procs::reap(pid, EVENT_TIMEOUT).expect("reap the last generation");
        assert!(
            status.success(),
            "last generation {pid} exited with {status}"
        );
        self.pids.iter_mut().for_each(|p| p.1 |= p.0 == pid);
    }
}

impl Drop for Chain {
    fn drop(&mut self) {
        for (pid, reaped) in self.pids.clone() {
            if !reaped {
                let _ = procs::signal(pid, libc::SIGKILL);
                let _ = procs::reap(pid, Duration::from_secs(5));
            }
        }
        let _ = self.child.try_wait();
    }
}

type Tls = StreamOwned<ClientConnection, TcpStream>;

/// A TLS connection to `localhost` at `addr`, handshake done: the stream
/// and the kind of handshake it was.
fn connect(addr: SocketAddr, config: &Arc<ClientConfig>) -> io::Result<(Tls, HandshakeKind)> {
    let tcp = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    tcp.set_read_timeout(Some(IO_TIMEOUT))?;
    tcp.set_write_timeout(Some(IO_TIMEOUT))?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from("localhost").unwrap();
    let conn = ClientConnection::new(config.clone(), name).map_err(io::Error::other)?;
    let mut tls = StreamOwned::new(conn, tcp);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock)?;
    }
    let kind = tls.conn.handshake_kind().expect("the handshake is done");
    Ok((tls, kind))
}

/// One GET on a new TLS connection (HTTP/1.1, `Connection: close`): the
/// response and the kind of handshake.
fn get_once(
    addr: SocketAddr,
    config: &Arc<ClientConfig>,
) -> io::Result<(load::Response, HandshakeKind)> {
    let (mut tls, kind) = connect(addr, config)?;
    load::send_get(&mut tls, "/", false)?;
    let mut r = BufReader::new(tls);
    let resp = load::read_response(&mut r)?;
    Ok((resp, kind))
}

/// A keep-alive HTTP/1.1 client over TLS: reuses its connection until the
/// server says `Connection: close`.
struct KeepAlive {
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    conn: Option<BufReader<Tls>>,
}

impl KeepAlive {
    fn get(&mut self) -> io::Result<load::Response> {
        if self.conn.is_none() {
            self.conn = Some(BufReader::new(connect(self.addr, &self.config)?.0));
        }
        let conn = self.conn.as_mut().expect("connected above");
        let result =
            load::send_get(conn.get_mut(), "/", true).and_then(|()| load::read_response(conn));
        match &result {
            Ok(r) if !r.close => {}
            _ => self.conn = None,
        }
        result
    }
}

/// Counts of a load run, shared by its clients.
#[derive(Default)]
struct Stats {
    ok: AtomicU64,
    failed: AtomicU64,
    /// HTTP/2 requests refused by a GOAWAY before the server processed
    /// them, and sent again on a new connection (RFC 9113, 6.8).
    retried: AtomicU64,
    by_pid: Mutex<BTreeMap<(&'static str, u32), u64>>,
    errors: Mutex<Vec<String>>,
}

impl Stats {
    fn ok(&self, client: &'static str, pid: u32) {
        self.ok.fetch_add(1, Ordering::Relaxed);
        *self
            .by_pid
            .lock()
            .unwrap()
            .entry((client, pid))
            .or_default() += 1;
    }

    fn fail(&self, reason: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut e = self.errors.lock().unwrap();
        if e.len() < 20 {
            e.push(reason);
        }
    }

    fn answered(&self, client: &'static str, pid: u32) -> u64 {
        self.by_pid
            .lock()
            .unwrap()
            .get(&(client, pid))
            .copied()
            .unwrap_or(0)
    }

    fn record(&self, client: &'static str, r: io::Result<load::Response>) {
        match r {
            Ok(resp) if resp.status == 200 => self.ok(client, resp.pid),
            Ok(resp) => self.fail(format!("{client}: status {}", resp.status)),
            Err(e) => self.fail(format!("{client}: {e}")),
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Whether `e` is h2's refusal of a stream after the peer's GOAWAY.
fn refused_by_goaway(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(e) = cur {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return h2.is_go_away() && h2.is_remote();
        }
        cur = e.source();
    }
    false
}

type H2 = hyper::client::conn::http2::SendRequest<http_body_util::Empty<hyper::body::Bytes>>;

/// An HTTP/2 connection over TLS, `h2` chosen by ALPN.
async fn h2_connect(addr: SocketAddr, config: Arc<ClientConfig>) -> Result<H2, BoxError> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from("localhost")?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await?;
    let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    if alpn.as_deref() != Some(b"h2") {
        return Err(format!("ALPN chose {alpn:?}, not h2").into());
    }
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// One GET over `sender`: X-Pid, within the I/O bound.
async fn h2_get(sender: &mut H2) -> Result<u32, BoxError> {
    use http_body_util::BodyExt;
    let req = hyper::Request::get("https://localhost/")
        .body(http_body_util::Empty::new())
        .unwrap();
    let resp = tokio::time::timeout(IO_TIMEOUT, async {
        let resp = sender.send_request(req).await?;
        if resp.status() != 200 || resp.version() != hyper::Version::HTTP_2 {
            return Err(format!("{} {:?}", resp.status(), resp.version()).into());
        }
        let pid: u32 = resp.headers()["x-pid"].to_str()?.parse()?;
        resp.into_body().collect().await?;
        Ok::<_, BoxError>(pid)
    })
    .await;
    resp.unwrap_or_else(|_| Err("timed out".into()))
}

/// An HTTP/2 client that keeps its connection until the server ends it
/// (GOAWAY), then opens a new one.
async fn h2_client(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
) {
    let mut sender: Option<H2> = None;
    while !stop.load(Ordering::Relaxed) {
        let mut s = match sender.take() {
            Some(s) if !s.is_closed() => s,
            _ => match h2_connect(addr, config.clone()).await {
                Ok(s) => s,
                Err(e) => {
                    stats.fail(format!("h2 connect: {e}"));
                    continue;
                }
            },
        };
        // A connection that is going away takes no new stream: not a
        // request yet, open another.
        if s.ready().await.is_err() {
            continue;
        }
        match h2_get(&mut s).await {
            Ok(pid) => {
                stats.ok("h2", pid);
                sender = Some(s);
            }
            Err(e) if refused_by_goaway(e.as_ref()) => {
                stats.retried.fetch_add(1, Ordering::Relaxed);
                let again = match h2_connect(addr, config.clone()).await {
                    Ok(mut s) => h2_get(&mut s).await.map(|pid| (pid, s)),
                    Err(e) => Err(e),
                };
                match again {
                    Ok((pid, s)) => {
                        stats.ok("h2", pid);
                        sender = Some(s);
                    }
                    Err(e) => stats.fail(format!("h2 (retried): {e}")),
                }
            }
            Err(e) => stats.fail(format!("h2: {e:?}")),
        }
    }
}

/// TLS load against `addr` until stopped: `fresh` threads open a new
/// connection per request (resuming their sessions, as browsers do),
/// `keep_alive` threads reuse theirs, `h2` tasks speak HTTP/2.
struct Load {
    stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    rt: tokio::runtime::Runtime,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(addr: SocketAddr, certs: &Certs, fresh: usize, keep_alive: usize, h2: usize) -> Load {
        let stats = Arc::new(Stats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let h1 = certs.client(&[b"http/1.1"]);
        let mut threads = Vec::new();
        for i in 0..fresh + keep_alive {
            let (stats, stop, config) = (stats.clone(), stop.clone(), h1.clone());
            threads.push(std::thread::spawn(move || {
                let mut ka = (i >= fresh).then(|| KeepAlive {
                    addr,
                    config: config.clone(),
                    conn: None,
                });
                while !stop.load(Ordering::Relaxed) {
                    match &mut ka {
                        Some(c) => stats.record("keep-alive", c.get()),
                        None => stats.record("fresh", get_once(addr, &config).map(|(r, _)| r)),
                    }
                }
            }));
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let h2_config = certs.client(&[b"h2"]);
        let tasks = (0..h2)
            .map(|_| {
                rt.spawn(h2_client(
                    addr,
                    h2_config.clone(),
                    stats.clone(),
                    stop.clone(),
                ))
            })
            .collect();
        Load {
            stats,
            stop,
            threads,
            rt,
            tasks,
        }
    }

    /// Stops the clients (each ends within one request, bounded).
    fn stop(self) -> Arc<Stats> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        for t in self.tasks {
            self.rt.block_on(t).unwrap();
        }
        self.stats
    }
}

/// How many fds of process `pid` are the crate's secrets file (a memory
/// file named `handover.secrets`).
fn secrets_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| {
            target
                .to_string_lossy()
                .starts_with("/memfd:handover.secrets")
        })
        .count()
}

/// 20 upgrades under TLS load: HTTP/1.1 keep-alive and new-connection
/// clients, HTTP/2 by ALPN. Not one request fails, every generation
/// answers every kind of client, every old generation exits 0.
#[test]
fn tls_through_20_upgrades_under_load_loses_nothing() {
    let dir = TempDir::new("tls-load");
    let certs = Certs::make(dir.path());
    let pid_file = dir.path().join("tls.pid");
    let mut chain = Chain::start(&[
        "--listen",
        "127.0.0.1:0",
        "--pid-file",
        pid_file.to_str().unwrap(),
        "--tls-cert",
        certs.cert.to_str().unwrap(),
        "--tls-key",
        certs.key.to_str().unwrap(),
    ]);
    let load = Load::start(chain.addr, &certs, 4, 4, 2);
    let stats = load.stats.clone();
    let mut pids = vec![chain.pid()];
    for _ in 0..20 {
        let new = chain.upgrade();
        pids.push(new);
        // The file that brought the keys is closed at build(); the one kept
        // is the new generation's own, for its upgrade: no fd piles up.
        assert_eq!(secrets_fds(new), 1, "generation {new}");
        wait_until(
            "every kind of client to reach the new generation",
            Duration::from_secs(30),
            || {
                ["fresh", "keep-alive", "h2"]
                    .iter()
                    .all(|c| stats.answered(c, new) > 20)
            },
        );
    }
    let stats = load.stop();
    let errors = stats.errors.lock().unwrap().clone();
    assert_eq!(
        stats.failed.load(Ordering::Relaxed),
        0,
        "failed requests: {errors:?}"
    );
    let ok = stats.ok.load(Ordering::Relaxed);
    assert!(ok > 1000, "too little load: {ok}");
    for pid in &pids[..pids.len() - 1] {
        assert!(!procs::exists(*pid), "old generation {pid} still exists");
    }
    let named: u32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(
        named,
        chain.pid(),
        "the pid file names the serving generation"
    );
    eprintln!(
        "TLS, 20 upgrades: {ok} requests (HTTP/1.1 keep-alive and new connections, HTTP/2), 0 failed, \
         {} HTTP/2 requests refused by a GOAWAY before they were processed and sent again",
        stats.retried.load(Ordering::Relaxed)
    );
    chain.stop();
}

/// Three clients, each with its own session store: what kind of handshake
/// each gets on its next connection, and from which generation.
fn resumption_across_two_upgrades(extra: &[&str]) -> [(HandshakeKind, u32); 6] {
    let dir = TempDir::new("tls-resume");
    let certs = Certs::make(dir.path());
    let mut args = vec![
        "--listen",
        "127.0.0.1:0",
        "--tls-cert",
        certs.cert.to_str().unwrap(),
        "--tls-key",
        certs.key.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let mut chain = Chain::start(&args);
    let addr = chain.addr;
    let (a, b, c) = (
        certs.client(&[b"http/1.1"]),
        certs.client(&[b"http/1.1"]),
        certs.client(&[b"http/1.1"]),
    );
    let get = |config: &Arc<ClientConfig>| {
        let (resp, kind) = get_once(addr, config).expect("GET over TLS");
        assert_eq!(resp.status, 200);
        (kind, resp.pid)
    };
    // Generation N: A and B get tickets; the same generation resumes B's.
    let a_first = get(&a);
    let _ = get(&b);
    let n1 = chain.upgrade();
    // N+1: B holds a ticket from N; C gets one from N+1.
    let b_next = get(&b);
    let c_first = get(&c);
    let n2 = chain.upgrade();
    // N+2: A still holds its ticket from N (unused since); C's is from N+1.
    let a_later = get(&a);
    let c_later = get(&c);
    assert_eq!((b_next.1, c_first.1), (n1, n1));
    assert_eq!((a_later.1, c_later.1), (n2, n2));
    chain.stop();
    [
        a_first,
        b_next,
        c_first,
        a_later,
        c_later,
        get_same_generation_twice(&certs, extra),
    ]
}

/// A client's second connection to one generation: a resumption, with or
/// without the key handoff (what tickets are for).
fn get_same_generation_twice(certs: &Certs, extra: &[&str]) -> (HandshakeKind, u32) {
    let mut args = vec![
        "--listen",
        "127.0.0.1:0",
        "--tls-cert",
        certs.cert.to_str().unwrap(),
        "--tls-key",
        certs.key.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let mut chain = Chain::start(&args);
    let config = certs.client(&[b"http/1.1"]);
    let _ = get_once(chain.addr, &config).unwrap();
    let (resp, kind) = get_once(chain.addr, &config).unwrap();
    chain.stop();
    (kind, resp.pid)
}

/// Clients that got a ticket from generation N resume — no full handshake
/// — with N+1 and with N+2, and so do those that got theirs from N+1:
/// the session-ticket keys travel with the upgrade.
#[test]
fn sessions_resume_across_upgrades_n_to_n1_and_n2() {
    let [a_first, b_next, c_first, a_later, c_later, same] = resumption_across_two_upgrades(&[]);
    assert_eq!(a_first.0, HandshakeKind::Full, "the first connection");
    assert_eq!(c_first.0, HandshakeKind::Full, "C's first connection");
    assert_eq!(b_next.0, HandshakeKind::Resumed, "a ticket from N, on N+1");
    assert_eq!(a_later.0, HandshakeKind::Resumed, "a ticket from N, on N+2");
    assert_eq!(
        c_later.0,
        HandshakeKind::Resumed,
        "a ticket from N+1, on N+2"
    );
    assert_eq!(same.0, HandshakeKind::Resumed);
}

/// The same clients against a build whose keys stay in each process
/// (rustls' own ticketer, as most servers have it): every client does a
/// full handshake after each upgrade, though the same generation resumes.
#[test]
fn without_the_key_handoff_every_client_does_a_full_handshake_after_an_upgrade() {
    let [a_first, b_next, c_first, a_later, c_later, same] =
        resumption_across_two_upgrades(&["--tickets-per-process"]);
    assert_eq!(a_first.0, HandshakeKind::Full);
    assert_eq!(c_first.0, HandshakeKind::Full);
    assert_eq!(b_next.0, HandshakeKind::Full, "a ticket from N, on N+1");
    assert_eq!(a_later.0, HandshakeKind::Full, "a ticket from N, on N+2");
    assert_eq!(c_later.0, HandshakeKind::Full, "a ticket from N+1, on N+2");
    assert_eq!(
        same.0,
        HandshakeKind::Resumed,
        "tickets work within a generation"
    );
}

/// A process that takes the service over (not started by it) gets the
/// ticket keys too, through the control socket's offer: a client with a
/// ticket from the old generation resumes with the taker.
#[test]
fn a_process_that_takes_over_gets_the_ticket_keys() {
    let dir = TempDir::new("tls-takeover");
    let certs = Certs::make(dir.path());
    let ctl = dir.path().join("control");
    let args = |listen: &str, take_over: bool| {
        let mut a = vec![
            "--listen".to_owned(),
            listen.to_owned(),
            "--control".to_owned(),
            ctl.to_str().unwrap().to_owned(),
            "--tls-cert".to_owned(),
            certs.cert.to_str().unwrap().to_owned(),
            "--tls-key".to_owned(),
            certs.key.to_str().unwrap().to_owned(),
        ];
        if take_over {
            a.extend(["--take-over".to_owned(), ctl.to_str().unwrap().to_owned()]);
        }
        a
    };
    let a = args("127.0.0.1:0", false);
    let mut old = Chain::start(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let client = certs.client(&[b"http/1.1"]);
    let (first, kind) = get_once(old.addr, &client).unwrap();
    assert_eq!((first.pid, kind), (old.pid(), HandshakeKind::Full));
    let b = args(&old.addr.to_string(), true);
    let mut taker = Chain::start(&b.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(taker.addr, old.addr);
    let status = procs::reap(old.pid(), EVENT_TIMEOUT).expect("reap the old generation");
    assert!(status.success(), "the old generation exited with {status}");
    old.pids[0].1 = true;
    let (resp, kind) = get_once(taker.addr, &client).unwrap();
    assert_eq!(resp.pid, taker.pid());
    assert_eq!(
        kind,
        HandshakeKind::Resumed,
        "a ticket from the old generation, on the taker"
    );
    assert_eq!(secrets_fds(taker.pid()), 1);
    taker.stop();
}

/// Runs `axum_tls reload --control ctl`: (exit code, stderr).
fn reload(ctl: &Path) -> (i32, String) {
    let out = common::output_bounded(
        Command::new(example("axum_tls"))
            .arg("reload")
            .arg("--control")
            .arg(ctl),
        Duration::from_secs(60),
    );
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A new build whose certificate cannot be used — garbage, a certificate
/// for another key, a file gone — fails its upgrade with the reason in the
/// `reload` reply; the old generation serves on without losing a request,
/// and upgrades once the certificate is put right.
#[test]
fn a_broken_certificate_fails_the_upgrade_with_the_reason_and_loses_nothing() {
    let dir = TempDir::new("tls-broken");
    let certs = Certs::make(dir.path());
    let ctl = dir.path().join("control");
    let mut chain = Chain::start(&[
        "--listen",
        "127.0.0.1:0",
        "--control",
        ctl.to_str().unwrap(),
        "--tls-cert",
        certs.cert.to_str().unwrap(),
        "--tls-key",
        certs.key.to_str().unwrap(),
    ]);
    let old = chain.pid();
    let load = Load::start(chain.addr, &certs, 2, 2, 1);
    wait_until("the load to start", Duration::from_secs(30), || {
        load.stats.ok.load(Ordering::Relaxed) > 50
    });
    let cases: [(&str, &dyn Fn(), &str); 3] = [
        (
            "garbage",
            &|| common::install(&certs.cert, b"not a certificate\n", 0o600),
            "holds no certificate",
        ),
        (
            "another key's certificate",
            &|| certs.install_foreign_cert(),
            "does not belong to the certificate",
        ),
        (
            "no file",
            &|| std::fs::remove_file(&certs.cert).unwrap(),
            "cannot read the TLS certificate",
        ),
    ];
    for (what, break_it, reason) in cases {
        break_it();
        let (code, err) = reload(&ctl);
        assert_eq!(code, 1, "{what}: reload must fail; stderr: {err}");
        assert!(
            err.contains(reason),
            "{what}: the reason is in the reply: {err}"
        );
        assert!(
            err.contains(certs.cert.to_str().unwrap()),
            "{what}: the reply names the file: {err}"
        );
        assert_eq!(chain.pid(), old);
        assert!(procs::exists(old), "the old generation serves on");
        let before = load.stats.answered("keep-alive", old);
        wait_until(
            "the old generation to answer on",
            Duration::from_secs(10),
            || load.stats.answered("keep-alive", old) > before + 5,
        );
        certs.restore();
    }
    let (code, err) = reload(&ctl);
    assert_eq!(
        code, 0,
        "with the certificate put right, the upgrade succeeds: {err}"
    );
    let (_, new) = chain.wait_listening();
    chain.pids.push((new, false));
    let status = procs::reap(old, EVENT_TIMEOUT).unwrap();
    assert!(status.success(), "the old generation exited with {status}");
    chain.pids[0].1 = true;
    wait_until(
        "the new generation to answer",
        Duration::from_secs(30),
        || load.stats.answered("fresh", new) > 5,
    );
    let stats = load.stop();
    let errors = stats.errors.lock().unwrap().clone();
    assert_eq!(
        stats.failed.load(Ordering::Relaxed),
        0,
        "failed requests: {errors:?}"
    );
    chain.stop();
}

/// The drain rules of the handshake, in process: `Server::with_drain` over
/// TLS on a loopback listener.
mod drain {
    use super::*;
    use handover::Drain;
    use handover::serve::Server;

    type Body = http_body_util::Full<hyper::body::Bytes>;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    }

    /// Serves TLS (with `certs`) on a fresh loopback listener, with
    /// `timeout` as the drain deadline; returns the address, the drain and
    /// the server's task.
    fn start(
        rt: &tokio::runtime::Runtime,
        certs: &Certs,
        timeout: Duration,
    ) -> (
        SocketAddr,
        Drain,
        tokio::task::JoinHandle<handover::DrainReport>,
    ) {
        use rustls::pki_types::pem::PemObject;
        let chain = rustls::pki_types::CertificateDer::pem_file_iter(&certs.cert)
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&certs.key).unwrap();
        let mut config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let drain = Drain::new();
        let server = Server::with_drain(drain.clone(), timeout)
            .listener(listener)
            .tls(config);
        let service = hyper::service::service_fn(|_req| async {
            Ok::<_, std::convert::Infallible>(hyper::Response::new(Body::from("hello")))
        });
        let task = rt.spawn(async move { server.serve_hyper(service).await.unwrap() });
        (addr, drain, task)
    }

    fn tcp(addr: SocketAddr) -> TcpStream {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s
    }

    /// A connection accepted before the drain whose handshake runs only
    /// after the drain started is finished and served, with
    /// `Connection: close`; the drain then ends at once.
    #[test]
    fn a_handshake_in_progress_when_the_drain_starts_is_finished_and_served() {
        let rt = runtime();
        let dir = TempDir::new("tls-drain");
        let certs = Certs::make(dir.path());
        let (addr, drain, task) = start(&rt, &certs, Duration::from_secs(20));
        let sock = tcp(addr);
        wait_until(
            "the connection to be accepted",
            Duration::from_secs(10),
            || drain.in_flight() == 1,
        );
        drain.start();
        wait_until(
            "the server to stop accepting",
            Duration::from_secs(10),
            || TcpStream::connect(addr).is_err(),
        );
        let conn = ClientConnection::new(
            certs.client(&[b"http/1.1"]),
            ServerName::try_from("localhost").unwrap(),
        )
        .unwrap();
        let mut tls = StreamOwned::new(conn, sock);
        load::send_get(&mut tls, "/", true).unwrap();
        let resp = load::read_response(&mut BufReader::new(tls)).unwrap();
        assert_eq!(resp.status, 200);
        assert!(resp.close, "answered as a lame duck: Connection: close");
        assert_eq!(resp.body, "hello");
        let report = rt.block_on(task).unwrap();
        assert_eq!(report.remaining, 0);
        assert!(report.elapsed < Duration::from_secs(10), "{report:?}");
    }

    /// A handshake that hangs (half a ClientHello, then nothing) does not
    /// hold the drain past its deadline: the server returns at the
    /// deadline with the connection counted as remaining, and closes it.
    #[test]
    fn a_hanging_handshake_ends_at_the_drain_deadline() {
        let rt = runtime();
        let dir = TempDir::new("tls-hang");
        let certs = Certs::make(dir.path());
        let (addr, drain, task) = start(&rt, &certs, Duration::from_secs(1));
        let mut sock = tcp(addr);
        // A TLS record header announcing a handshake message of 512 bytes,
        // and only 5 of them.
        sock.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03])
            .unwrap();
        wait_until(
            "the connection to be accepted",
            Duration::from_secs(10),
            || drain.in_flight() == 1,
        );
        let t = Instant::now();
        drain.start();
        let report = rt.block_on(task).unwrap();
        let took = t.elapsed();
        assert_eq!(report.remaining, 1, "{report:?}");
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(5),
            "{took:?}"
        );
        // Closed by the server (EOF or reset) at the deadline, not left
        // open until the handshake timeout.
        let mut buf = [0u8; 64];
        let read = sock.read(&mut buf);
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "closed after {:?}",
            t.elapsed()
        );
    }

    /// A handshake bounds itself while the server serves (no drain): a
    /// client that stops half-way through its ClientHello is closed after
    /// the handshake timeout (10 s), and stops counting in the drain.
    #[test]
    fn a_hanging_handshake_is_closed_after_the_handshake_timeout() {
        let rt = runtime();
        let dir = TempDir::new("tls-timeout");
        let certs = Certs::make(dir.path());
        let (addr, drain, task) = start(&rt, &certs, Duration::from_secs(60));
        let mut sock = tcp(addr);
        let t = Instant::now();
        sock.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
            .unwrap();
        let mut buf = [0u8; 64];
        let read = sock.read(&mut buf);
        let took = t.elapsed();
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        assert!(
            took >= Duration::from_secs(9) && took < Duration::from_secs(15),
            "closed after {took:?}"
        );
        wait_until(
            "the connection to leave the count",
            Duration::from_secs(5),
            || drain.in_flight() == 0,
        );
        drain.start();
        let report = rt.block_on(task).unwrap();
        assert_eq!(report.remaining, 0);
    }

    /// A client that speaks plaintext to the TLS port fails its handshake:
    /// its connection closes at once, and a drain that starts then ends at
    /// once.
    #[test]
    fn a_failed_handshake_closes_at_once() {
        let rt = runtime();
        let dir = TempDir::new("tls-fail");
        let certs = Certs::make(dir.path());
        let (addr, drain, task) = start(&rt, &certs, Duration::from_secs(20));
        let mut sock = tcp(addr);
        let t = Instant::now();
        sock.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut reply = Vec::new();
        let _ = sock.read_to_end(&mut reply);
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "closed after {:?}",
            t.elapsed()
        );
        assert!(!reply.starts_with(b"HTTP/"), "no plaintext answer");
        wait_until(
            "the connection to leave the count",
            Duration::from_secs(5),
            || drain.in_flight() == 0,
        );
        drain.start();
        let report = rt.block_on(task).unwrap();
        assert_eq!(report.remaining, 0);
        assert!(report.elapsed < Duration::from_secs(1), "{report:?}");
    }

    /// At a stop, a connection that sent no byte of its handshake is
    /// closed after the stop's grace (100 ms), not held to the deadline.
    #[test]
    fn at_a_stop_a_connection_that_sent_nothing_is_closed() {
        let rt = runtime();
        let dir = TempDir::new("tls-stop");
        let certs = Certs::make(dir.path());
        let (addr, drain, task) = start(&rt, &certs, Duration::from_secs(20));
        let mut sock = tcp(addr);
        wait_until(
            "the connection to be accepted",
            Duration::from_secs(10),
            || drain.in_flight() == 1,
        );
        drain.start_stop();
        let report = rt.block_on(task).unwrap();
        assert_eq!(report.remaining, 0);
        assert!(report.elapsed < Duration::from_secs(5), "{report:?}");
        let mut buf = [0u8; 8];
        assert!(matches!(sock.read(&mut buf), Ok(0) | Err(_)));
    }
}
