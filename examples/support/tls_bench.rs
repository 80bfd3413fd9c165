//! `bench tls` (feature `tls`): what the session-ticket key handoff saves
//! the new generation when every client reconnects after an upgrade.
//!
//! N clients (each with a session store of its own, as N browsers) make one
//! request over TLS to examples/axum_tls (release) and keep their tickets;
//! the service upgrades (SIGHUP), and once the old generation has exited
//! every client reconnects at once (8 threads) and makes one request. The
//! figure is the new generation's CPU time (user + system, from
//! `/proc/PID/stat`) in the first second after that, and until the last
//! client is answered; with the key handoff (the crate's ticketer) and
//! without (`--tickets-per-process`: rustls' own ticketer, random keys per
//! process, as most servers have them). Two certificates: ECDSA P-256 and
//! RSA 2048 (its key made by `openssl genpkey`, skipped without openssl);
//! both signed by a test CA the clients trust. The clients send an X25519
//! key share first, as browsers do.

use std::io::BufReader;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, HandshakeKind, StreamOwned};

use crate::procs;

/// The threads that reconnect the clients.
const THREADS: usize = 8;

/// The new generation's CPU time so far (user + system).
fn cpu(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/PID/stat");
    // After the command name's closing parenthesis: state is field 3, utime
    // field 14, stime field 15.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

/// The clients' crypto: rustls' ring provider with X25519 as the first
/// key share, as browsers, curl and OpenSSL send it (rustls 0.23.48's ring
/// provider puts P-384 first, which costs ring several times more on both
/// sides and is not what a server meets in the field).
#[allow(deprecated)]
fn client_provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::ring::kx_group::{SECP256R1, SECP384R1, X25519};
    let mut p = rustls::crypto::ring::default_provider();
    p.kx_groups = vec![X25519, SECP256R1, SECP384R1];
    Arc::new(p)
}

/// A test CA and a server certificate for `localhost` with `key`, in `dir`.
fn certs(dir: &Path, key: rcgen::KeyPair) -> (CertificateDer<'static>, PathBuf, PathBuf) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    (ca.der().clone(), cert_path, key_path)
}

/// An RSA 2048 key from openssl (ring makes none), if openssl runs.
fn rsa_key(dir: &Path) -> Option<rcgen::KeyPair> {
    let path = dir.join("rsa.pem");
    let made = Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&path)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let pem = std::fs::read_to_string(&path).ok().filter(|_| made)?;
    rcgen::KeyPair::from_pem(&pem).ok()
}

/// One request on a new TLS connection: the kind of handshake.
fn get(addr: SocketAddr, config: &Arc<ClientConfig>) -> Result<HandshakeKind, String> {
    let tcp = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    tcp.set_nodelay(true).unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let conn = ClientConnection::new(config.clone(), name).map_err(|e| e.to_string())?;
    let mut tls = StreamOwned::new(conn, tcp);
    std::io::Write::write_all(
        &mut tls,
        b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .map_err(|e| e.to_string())?;
    let mut r = BufReader::new(tls);
    let mut status = String::new();
    std::io::BufRead::read_line(&mut r, &mut status).map_err(|e| e.to_string())?;
    if !status.starts_with("HTTP/1.1 200") {
        return Err(format!("status {status:?}"));
    }
    let mut rest = Vec::new();
    let _ = std::io::Read::read_to_end(&mut r, &mut rest);
    Ok(r.get_ref().conn.handshake_kind().expect("done"))
}

/// Every client once, from `THREADS` threads: (resumed, full, failed).
fn burst(addr: SocketAddr, clients: &[Arc<ClientConfig>]) -> (usize, usize, usize) {
    let chunk = clients.len().div_ceil(THREADS);
    std::thread::scope(|s| {
        let threads: Vec<_> = clients
            .chunks(chunk)
            .map(|part| {
                s.spawn(move || {
                    let (mut resumed, mut full, mut failed) = (0, 0, 0);
                    for c in part {
                        match get(addr, c) {
                            Ok(HandshakeKind::Resumed) => resumed += 1,
                            Ok(_) => full += 1,
                            Err(_) => failed += 1,
                        }
                    }
                    (resumed, full, failed)
                })
            })
            .collect();
        threads.into_iter().fold((0, 0, 0), |acc, t| {
            let r = t.join().unwrap();
            (acc.0 + r.0, acc.1 + r.1, acc.2 + r.2)
        })
    })
}

struct Run {
    first_second: Duration,
    until_done: Duration,
    burst: Duration,
    resumed: usize,
    full: usize,
    failed: usize,
}

fn run_once(
    server: &Path,
    cert: &Path,
    key: &Path,
    ca: &CertificateDer<'static>,
    n: usize,
    handoff: bool,
) -> Run {
    let mut args = vec![
        "--listen".to_owned(),
        "127.0.0.1:0".to_owned(),
        "--tls-cert".to_owned(),
        cert.display().to_string(),
        "--tls-key".to_owned(),
        key.display().to_string(),
    ];
    if !handoff {
        args.push("--tickets-per-process".to_owned());
    }
    let mut child = Command::new(server)
        .args(&args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn axum_tls");
    let lines = procs::line_channel(child.stdout.take().unwrap());
    let listening = || loop {
        let line = lines.recv_timeout(Duration::from_secs(60)).expect("a line");
        if let Some(rest) = line.strip_prefix("listening on ") {
            let w: Vec<&str> = rest.split_whitespace().collect();
            return (
                w[0].parse::<SocketAddr>().unwrap(),
                w[2].parse::<u32>().unwrap(),
            );
        }
    };
    let (addr, old) = listening();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let base = ClientConfig::builder_with_provider(client_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let clients: Vec<Arc<ClientConfig>> = (0..n)
        .map(|_| {
            let mut c = base.clone();
            c.alpn_protocols = vec![b"http/1.1".to_vec()];
            c.resumption = rustls::client::Resumption::store(Arc::new(
                rustls::client::ClientSessionMemoryCache::new(4),
            ));
            Arc::new(c)
        })
        .collect();
    let (_, _, failed) = burst(addr, &clients);
    assert_eq!(failed, 0, "the first round failed");
    procs::signal(old, libc::SIGHUP).unwrap();
    let (_, new) = listening();
    procs::reap(old, Duration::from_secs(60)).expect("reap the old generation");
    let before = cpu(new);
    let t = Instant::now();
    let ((resumed, full, failed), burst_time, at_end, at_one_second) = std::thread::scope(|s| {
        let sampler = s.spawn(|| {
            std::thread::sleep(Duration::from_secs(1));
            cpu(new)
        });
        let counts = burst(addr, &clients);
        let (took, at_end) = (t.elapsed(), cpu(new));
        (counts, took, at_end, sampler.join().unwrap())
    });
    let first_second = at_one_second - before;
    let until_done = at_end - before;
    procs::signal(new, libc::SIGTERM).unwrap();
    procs::reap(new, Duration::from_secs(60)).expect("reap");
    let _ = child.wait();
    Run {
        first_second,
        until_done,
        burst: burst_time,
        resumed,
        full,
        failed,
    }
}

/// `bench tls [--clients N] [--runs R]`.
pub fn tls(server: &Path, n: usize, runs: usize) {
    procs::become_subreaper();
    let dir = std::env::temp_dir().join(format!("handover-bench-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    println!(
        "{n} TLS clients with tickets from the old generation reconnect at once ({THREADS} threads) after an upgrade; \
         CPU time of the new generation (user + system, /proc/PID/stat), medians of {runs} runs (release)"
    );
    println!();
    println!(
        "| certificate | ticket keys | CPU, first second | CPU, until all answered | burst | resumed | full | failed |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    let mut keys = vec![("ECDSA P-256", Some(rcgen::KeyPair::generate().unwrap()))];
    keys.push(("RSA 2048", rsa_key(&dir)));
    for (label, key) in keys {
        let Some(key) = key else {
            println!("| {label} | (openssl not found: skipped) | | | | | | |");
            continue;
        };
        let sub = dir.join(label.replace(' ', "-"));
        std::fs::create_dir_all(&sub).unwrap();
        let (ca, cert, key) = certs(&sub, key);
        for handoff in [true, false] {
            let mut results: Vec<Run> = (0..runs)
                .map(|_| run_once(server, &cert, &key, &ca, n, handoff))
                .collect();
            let med = |f: &dyn Fn(&Run) -> f64, rs: &mut Vec<Run>| {
                let mut v: Vec<f64> = rs.iter().map(f).collect();
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            };
            let first = med(&|r| r.first_second.as_secs_f64() * 1e3, &mut results);
            let done = med(&|r| r.until_done.as_secs_f64() * 1e3, &mut results);
            let burst = med(&|r| r.burst.as_secs_f64() * 1e3, &mut results);
            let resumed = med(&|r| r.resumed as f64, &mut results);
            let full = med(&|r| r.full as f64, &mut results);
            let failed: usize = results.iter().map(|r| r.failed).sum();
            println!(
                "| {label} | {} | {first:.0} ms | {done:.0} ms | {burst:.0} ms | {resumed:.0} | {full:.0} | {failed} |",
                if handoff {
                    "handed over (crate's ticketer)"
                } else {
                    "per process (`--tickets-per-process`)"
                }
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
