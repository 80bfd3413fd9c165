//! The serving layer (`handover::serve`, feature `http`): examples/axum.rs
//! under load through upgrades, HTTP/2 through upgrades, the drain rules
//! one by one, and what plain `axum::serve` + `with_graceful_shutdown`
//! loses under the same load.

mod common;

use std::collections::BTreeSet;
use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{EVENT_TIMEOUT, TempDir, load, procs, wait_until};

/// An example built by `cargo test` beside the fixture.
fn example(name: &str) -> PathBuf {
    let bin = common::server_bin().with_file_name(name);
    assert!(
        bin.exists(),
        "{} is missing: run `cargo test`",
        bin.display()
    );
    bin
}

/// A chain of generations of a service that prints `listening on ADDR pid
/// PID` when it serves (examples/axum.rs, tests/fixture/axum_plain.rs).
struct Chain {
    child: Child,
    lines: mpsc::Receiver<String>,
    addr: SocketAddr,
    /// Every generation's pid, in order, and whether it was reaped.
    pids: Vec<(u32, bool)>,
}

impl Chain {
    fn start(program: &Path, args: &[&str]) -> Chain {
        procs::become_subreaper();
        let mut child = common::spawn(
            Command::new(program)
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null()),
        )
        .expect("spawn the service");
        let lines = procs::line_channel(child.stdout.take().expect("piped"));
        let mut c = Chain {
            child,
            lines,
            addr: "0.0.0.0:0".parse().unwrap(),
            pids: Vec::new(),
        };
        let (addr, pid) = c.wait_listening();
        c.addr = addr;
        c.pids.push((pid, false));
        c
    }

    /// Waits for the next `listening on ADDR pid PID` line.
    fn wait_listening(&mut self) -> (SocketAddr, u32) {
        let deadline = Instant::now() + EVENT_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .expect("no `listening on` line in time");
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
            "old generation {old} exited with {status}"
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

/// 4 keep-alive and 4 close-mode clients through `upgrades` upgrades;
/// returns the load's stats and every generation's pid.
fn upgrades_under_load(chain: &mut Chain, upgrades: usize) -> (Arc<load::Stats>, Vec<u32>) {
    let load = load::Load::start_warm(chain.addr, 4, 4, 51);
    let stats = load.stats.clone();
    let mut pids = vec![chain.pid()];
    for _ in 0..upgrades {
        let new = chain.upgrade();
        pids.push(new);
        wait_until(
            "the new generation to answer",
            Duration::from_secs(30),
            || stats.by_pid.lock().unwrap().get(&new).copied().unwrap_or(0) > 10,
        );
    }
    (load.stop(), pids)
}

#[test]
fn axum_example_through_20_upgrades_under_load_loses_nothing() {
    let dir = TempDir::new("axum");
    let pid_file = dir.path().join("axum.pid");
    let mut chain = Chain::start(
        &example("axum"),
        &[
            "--listen",
            "127.0.0.1:0",
            "--pid-file",
            pid_file.to_str().unwrap(),
        ],
    );
    let (stats, pids) = upgrades_under_load(&mut chain, 20);
    let errors = stats.errors.lock().unwrap().clone();
    assert_eq!(stats.failed(), 0, "failed requests: {errors:?}");
    assert!(stats.ok() > 1000, "too little load: {}", stats.ok());
    let served: BTreeSet<u32> = stats.pids().into_iter().collect();
    for pid in &pids {
        assert!(served.contains(pid), "generation {pid} never answered");
    }
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
        "axum example, 20 upgrades: {} requests, 0 failed, {} generations",
        stats.ok(),
        pids.len()
    );
    chain.stop();
}

/// The same load on axum served the obvious way: its graceful shutdown
/// closes idle keep-alive connections and connections not read yet, and
/// the requests on the wire to them fail. This is the README's claim.
#[test]
fn plain_axum_serve_with_graceful_shutdown_loses_requests_under_the_same_load() {
    let mut chain = Chain::start(&example("fixture_axum_plain"), &["--listen", "127.0.0.1:0"]);
    let (stats, pids) = upgrades_under_load(&mut chain, 20);
    eprintln!(
        "plain axum::serve + with_graceful_shutdown, 20 upgrades: {} requests, {} failed",
        stats.ok(),
        stats.failed()
    );
    assert_eq!(pids.len(), 21);
    assert!(
        stats.failed() > 0,
        "plain axum::serve lost nothing: the README's comparison is stale"
    );
    chain.stop();
}

type H2Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Empty<hyper::body::Bytes>,
>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One GET over h2: status, version and X-Pid, within 10 s.
async fn get(
    client: &H2Client,
    uri: &hyper::Uri,
) -> Result<Result<(hyper::StatusCode, hyper::Version, u32), BoxError>, tokio::time::error::Elapsed>
{
    use http_body_util::BodyExt;
    tokio::time::timeout(Duration::from_secs(10), async {
        let resp = client.get(uri.clone()).await?;
        let pid: u32 = resp.headers()["x-pid"].to_str()?.parse()?;
        let (status, version) = (resp.status(), resp.version());
        resp.into_body().collect().await?;
        Ok((status, version, pid))
    })
    .await
}

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

/// HTTP/2 with prior knowledge (h2c), hyper's client, through 10 upgrades:
/// each old generation sends GOAWAY and the client moves on without a
/// failed request.
#[test]
fn h2c_through_10_upgrades_loses_nothing() {
    use http_body_util::Empty;
    use hyper::body::Bytes;
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    // With migration on, HTTP/2 keeps the graceful GOAWAY.
    let mut chain = Chain::start(&example("axum"), &["--migrate", "--listen", "127.0.0.1:0"]);
    let uri: hyper::Uri = format!("http://{}/", chain.addr).parse().unwrap();
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let by_pid = Arc::new(std::sync::Mutex::new(
        std::collections::BTreeMap::<u32, u64>::new(),
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let retried = Arc::new(AtomicU64::new(0));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (client, uri, ok, failed, by_pid, stop, retried) = (
            client.clone(),
            uri.clone(),
            ok.clone(),
            failed.clone(),
            by_pid.clone(),
            stop.clone(),
            retried.clone(),
        );
        tasks.push(rt.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                // One retry for a request refused by a GOAWAY: hyper's client
                // reports it as an error (it does not retry it itself), while
                // RFC 9113 (6.8) says it was not processed, and browsers,
                // curl and Go's client send it again on a new connection.
                let mut result = get(&client, &uri).await;
                if matches!(&result, Ok(Err(e)) if refused_by_goaway(e.as_ref())) {
                    retried.fetch_add(1, Ordering::Relaxed);
                    result = get(&client, &uri).await;
                }
                match result {
                    Ok(Ok((status, version, pid))) if status == 200 => {
                        assert_eq!(version, hyper::Version::HTTP_2);
                        ok.fetch_add(1, Ordering::Relaxed);
                        *by_pid.lock().unwrap().entry(pid).or_default() += 1;
                    }
                    Ok(Ok((status, _, _))) => {
                        failed.lock().unwrap().push(format!("status {status}"))
                    }
                    Ok(Err(e)) => failed.lock().unwrap().push(format!("{e:?}")),
                    Err(_) => failed.lock().unwrap().push("timed out".into()),
                }
            }
        }));
    }
    wait_until("h2 load to start", Duration::from_secs(30), || {
        ok.load(Ordering::Relaxed) > 50
    });
    let mut pids = vec![chain.pid()];
    for _ in 0..10 {
        let new = chain.upgrade();
        pids.push(new);
        wait_until(
            "the new generation to answer over h2",
            Duration::from_secs(30),
            || by_pid.lock().unwrap().get(&new).copied().unwrap_or(0) > 10,
        );
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        rt.block_on(t).unwrap();
    }
    let failed = failed.lock().unwrap().clone();
    assert!(failed.is_empty(), "{} failed: {failed:?}", failed.len());
    let by_pid = by_pid.lock().unwrap().clone();
    for pid in &pids {
        assert!(
            by_pid.contains_key(pid),
            "generation {pid} never answered: {by_pid:?}"
        );
    }
    eprintln!(
        "h2c, 10 upgrades: {} requests, 0 failed, {} refused by a GOAWAY before they were sent and retried",
        ok.load(Ordering::Relaxed),
        retried.load(Ordering::Relaxed)
    );
    chain.stop();
}

/// While an upgrade waits for a successor that never becomes ready, a new
/// connection is answered at once: the upgrade runs beside the accept loop.
#[test]
fn a_hanging_successor_does_not_delay_a_fresh_connection() {
    let dir = TempDir::new("hang");
    let bin = dir.path().join("axum");
    common::install(&bin, &std::fs::read(example("axum")).unwrap(), 0o755);
    let mut chain = Chain::start(&bin, &["--listen", "127.0.0.1:0"]);
    let old = chain.pid();
    // Deploy a build that starts and never reports ready.
    let started = dir.path().join("hung.pid");
    let script = format!(
        "#!/bin/sh\necho $$ > {}.new\nmv {0}.new {0}\nexec sleep 120\n",
        started.display()
    );
    common::install(&bin, script.as_bytes(), 0o755);
    procs::signal(old, libc::SIGHUP).unwrap();
    wait_until("the successor to start", Duration::from_secs(30), || {
        started.exists()
    });
    let hung: u32 = std::fs::read_to_string(&started)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let mut slowest = Duration::ZERO;
    for _ in 0..5 {
        let t = Instant::now();
        let r = load::get(chain.addr, "/").expect("a request during the upgrade");
        slowest = slowest.max(t.elapsed());
        assert_eq!((r.status, r.pid), (200, old));
    }
    assert!(
        slowest < Duration::from_millis(100),
        "a fresh connection took {slowest:?} during the upgrade"
    );
    // End the upgrade: the successor dies, the old generation serves on.
    procs::signal(hung, libc::SIGKILL).unwrap();
    wait_until("the upgrade to fail", Duration::from_secs(30), || {
        procs::children(old).is_empty()
    });
    assert_eq!(load::get(chain.addr, "/").unwrap().pid, old);
    chain.stop();
}

mod in_process {
    //! The drain rules against the serving layer in this process, with a
    //! drain the test starts itself.

    use super::*;
    use handover::Drain;
    use handover::serve::Server;
    use hyper::body::Incoming;
    use hyper::{Request, Response};
    use tokio::sync::Notify;

    type Body = http_body_util::Full<hyper::body::Bytes>;

    /// Serves on a fresh loopback listener with `service`; returns the
    /// address, the drain and the server's task.
    fn start<F, Fut>(
        rt: &tokio::runtime::Runtime,
        service: F,
    ) -> (
        SocketAddr,
        Drain,
        tokio::task::JoinHandle<handover::DrainReport>,
    )
    where
        F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<Response<Body>, std::convert::Infallible>>
            + Send
            + 'static,
    {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let drain = Drain::new();
        let server = Server::with_drain(drain.clone(), Duration::from_secs(20)).listener(listener);
        let task = rt.spawn(async move {
            server
                .serve_hyper(hyper::service::service_fn(service))
                .await
                .unwrap()
        });
        (addr, drain, task)
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    }

    fn ok(body: &'static str) -> Response<Body> {
        Response::new(Body::from(body))
    }

    fn connect(addr: SocketAddr) -> TcpStream {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }

    fn read_all(s: &mut TcpStream) -> String {
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    /// A connection accepted before the drain, whose request arrives only
    /// after it started, is answered (with `Connection: close`), not closed.
    #[test]
    fn a_connection_accepted_but_not_read_when_the_drain_starts_is_answered() {
        let rt = runtime();
        let (addr, drain, task) = start(&rt, |_req| async { Ok(ok("hello")) });
        let mut s = connect(addr);
        wait_until(
            "the connection to be accepted",
            Duration::from_secs(10),
            || drain.in_flight() == 1,
        );
        drain.start();
        // The listener is gone once the accept loop has seen the drain.
        wait_until(
            "the server to stop accepting",
            Duration::from_secs(10),
            || TcpStream::connect(addr).is_err(),
        );
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let reply = read_all(&mut s);
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        assert!(
            reply.to_ascii_lowercase().contains("connection: close"),
            "{reply}"
        );
        assert!(reply.ends_with("hello"), "{reply}");
        let report = rt.block_on(task).unwrap();
        assert_eq!(report.remaining, 0);
    }

    /// A request in flight when the drain starts completes; the server
    /// returns once it has, long before the deadline.
    #[test]
    fn a_slow_request_in_flight_completes_and_the_drain_ends_with_it() {
        let rt = runtime();
        let (entered, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        let (e, r) = (entered.clone(), release.clone());
        let (addr, drain, task) = start(&rt, move |_req| {
            let (e, r) = (e.clone(), r.clone());
            async move {
                e.notify_one();
                r.notified().await;
                Ok(ok("slow"))
            }
        });
        let client = std::thread::spawn(move || {
            let mut s = connect(addr);
            s.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
            read_all(&mut s)
        });
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), entered.notified()).await
        })
        .expect("the request reaches the handler");
        drain.start();
        assert_eq!(drain.in_flight(), 1);
        assert!(!task.is_finished());
        release.notify_one();
        let reply = client.join().unwrap();
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        assert!(reply.ends_with("slow"), "{reply}");
        let report = rt.block_on(task).unwrap();
        assert_eq!(report.remaining, 0);
        assert!(report.elapsed < Duration::from_secs(10), "{report:?}");
    }

    /// An idle keep-alive connection is left open through the drain: its
    /// next request is answered with `Connection: close`.
    #[test]
    fn an_idle_keep_alive_connection_gets_its_next_request_answered() {
        let rt = runtime();
        let (addr, drain, task) = start(&rt, |_req| async { Ok(ok("hi")) });
        let mut s = BufReader::new(connect(addr));
        load::send_get(s.get_mut(), "/", true).unwrap();
        let first = load::read_response(&mut s).unwrap();
        assert!(!first.close);
        drain.start();
        assert_eq!(drain.in_flight(), 1, "the idle connection stays");
        load::send_get(s.get_mut(), "/", true).unwrap();
        let second = load::read_response(&mut s).unwrap();
        assert_eq!(second.status, 200);
        assert!(
            second.close,
            "the answer while draining says Connection: close"
        );
        let report = rt.block_on(task).unwrap();
        assert_eq!(report.remaining, 0);
    }

    /// HTTP/2: a stream in flight when the drain starts completes; the
    /// server then closes the connection (GOAWAY, streams done), and the
    /// drain ends with it.
    #[test]
    fn http2_a_stream_in_flight_completes_then_the_connection_closes() {
        let rt = runtime();
        let (entered, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        let (e, r) = (entered.clone(), release.clone());
        let (addr, drain, task) = start(&rt, move |_req| {
            let (e, r) = (e.clone(), r.clone());
            async move {
                e.notify_one();
                r.notified().await;
                Ok(ok("h2"))
            }
        });
        rt.block_on(async {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (mut sender, conn) = hyper::client::conn::http2::handshake(
                hyper_util::rt::TokioExecutor::new(),
                hyper_util::rt::TokioIo::new(tcp),
            )
            .await
            .unwrap();
            let conn = tokio::spawn(conn);
            let req = Request::get("/slow")
                .body(http_body_util::Empty::<hyper::body::Bytes>::new())
                .unwrap();
            let slow = tokio::spawn(sender.send_request(req));
            tokio::time::timeout(Duration::from_secs(10), entered.notified())
                .await
                .expect("the stream reaches the handler");
            drain.start();
            release.notify_one();
            let resp = slow.await.unwrap().unwrap();
            assert_eq!(
                (resp.status(), resp.version()),
                (hyper::StatusCode::OK, hyper::Version::HTTP_2)
            );
            tokio::time::timeout(Duration::from_secs(10), conn)
                .await
                .expect("the server closes the connection after its GOAWAY")
                .unwrap()
                .unwrap();
        });
        let report = rt.block_on(task).unwrap();
        assert_eq!(report.remaining, 0);
    }

    /// HTTP/2 on a connection accepted but not read when the drain starts:
    /// a request the client sends at once (preface, SETTINGS and HEADERS in
    /// one write, as before it could see a GOAWAY) is answered, and the
    /// connection then gets its GOAWAY.
    #[test]
    fn http2_a_connection_accepted_but_not_read_is_answered() {
        let rt = runtime();
        let (addr, drain, task) = start(&rt, |_req| async { Ok(ok("h2")) });
        let mut s = connect(addr);
        wait_until(
            "the connection to be accepted",
            Duration::from_secs(10),
            || drain.in_flight() == 1,
        );
        drain.start();
        let mut request = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        request.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]); // SETTINGS, empty
        // HEADERS on stream 1, END_STREAM | END_HEADERS: GET, http, / (HPACK
        // static table entries 2, 6 and 4).
        request.extend_from_slice(&[0, 0, 3, 1, 5, 0, 0, 0, 1, 0x82, 0x86, 0x84]);
        s.write_all(&request).unwrap();
        // Read frame by frame, acknowledging SETTINGS and PING as a client
        // does (the server's graceful GOAWAY waits for the PING's ack),
        // until the server closes the connection.
        let (mut status_200, mut goaway, mut reply) = (false, false, Vec::new());
        let mut head = [0u8; 9];
        while s.read_exact(&mut head).is_ok() {
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let (kind, flags) = (head[3], head[4]);
            let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]);
            let mut payload = vec![0u8; len];
            s.read_exact(&mut payload).unwrap();
            reply.push((kind, flags, stream));
            match (kind, flags & 1) {
                // :status 200 is HPACK static entry 8.
                (1, _) => status_200 |= stream == 1 && payload.first() == Some(&0x88),
                (4, 0) => s.write_all(&[0, 0, 0, 4, 1, 0, 0, 0, 0]).unwrap(),
                (6, 0) => {
                    s.write_all(&[0, 0, 8, 6, 1, 0, 0, 0, 0]).unwrap();
                    s.write_all(&payload).unwrap();
                }
                (7, _) => goaway = true,
                _ => {}
            }
        }
        assert!(status_200, "no 200 on stream 1 in {reply:?}");
        assert!(goaway, "no GOAWAY in {reply:?}");
        let report = rt.block_on(task).unwrap();
        assert_eq!(report.remaining, 0);
    }

    /// At the deadline what is still open is closed and counted.
    #[test]
    fn an_idle_connection_is_closed_at_the_deadline_and_reported() {
        let rt = runtime();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let drain = Drain::new();
        let server =
            Server::with_drain(drain.clone(), Duration::from_millis(300)).listener(listener);
        let task = rt.spawn(server.serve_hyper(hyper::service::service_fn(
            |_req: Request<Incoming>| async { Ok::<_, std::convert::Infallible>(ok("x")) },
        )));
        let mut s = connect(addr);
        wait_until(
            "the connection to be accepted",
            Duration::from_secs(10),
            || drain.in_flight() == 1,
        );
        drain.start();
        let report = rt.block_on(task).unwrap().unwrap();
        assert_eq!(report.remaining, 1);
        assert!(report.elapsed >= Duration::from_millis(300), "{report:?}");
        // Closed by the server at the deadline.
        assert_eq!(read_all(&mut s), "");
    }
}

/// At the fd limit, the serving layer's accept loop backs off instead of
/// spinning: little CPU, a few log lines, and it serves again once fds are
/// free.
#[test]
fn at_the_fd_limit_accepting_backs_off_quietly_and_recovers() {
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;

    procs::become_subreaper();
    let mut cmd = Command::new(common::server_bin());
    cmd.args(["--listen", "127.0.0.1:0", "--drain-timeout", "5"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: setrlimit is async-signal-safe, and the closure touches no
    // memory shared with the parent.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 64,
                rlim_max: 64,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = common::spawn(&mut cmd).expect("spawn the fixture");
    let lines = procs::line_channel(child.stdout.take().unwrap());
    let warnings = Arc::new(AtomicU64::new(0));
    {
        let (warnings, err) = (warnings.clone(), child.stderr.take().unwrap());
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if line.contains("accept failed") {
                    warnings.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    let ready = lines.recv_timeout(EVENT_TIMEOUT).expect("ready line");
    let pid: u32 = common::field_u32(&ready, "pid");
    let addr: SocketAddr = common::field(&ready, "addr").unwrap().parse().unwrap();
    // 150 clients: more than the fds the server may open.
    let clients: Vec<TcpStream> = (0..150)
        .map(|_| TcpStream::connect(addr).unwrap())
        .collect();
    wait_until("the first accept error", Duration::from_secs(10), || {
        warnings.load(Ordering::Relaxed) > 0
    });
    let cpu_ticks = |pid: u32| -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = after.split_whitespace().collect();
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap() // utime + stime
    };
    // Measure over 2 s (a measurement window, not a synchronisation).
    let (t0, c0, w0) = (
        Instant::now(),
        cpu_ticks(pid),
        warnings.load(Ordering::Relaxed),
    );
    std::thread::sleep(Duration::from_secs(2));
    let (secs, ticks) = (t0.elapsed().as_secs_f64(), cpu_ticks(pid) - c0);
    let logged = warnings.load(Ordering::Relaxed) - w0;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let share = ticks as f64 / hz / secs;
    eprintln!(
        "at the fd limit: {:.1}% of a core, {logged} log lines in {secs:.1} s",
        share * 100.0
    );
    assert!(
        share < 0.05,
        "the accept loop used {:.1}% of a core",
        share * 100.0
    );
    assert!(logged <= 4, "{logged} log lines in {secs:.1} s");
    // Free the fds: the queued connections and a new one are served.
    drop(clients);
    let t = Instant::now();
    let r = load::get(addr, "/").expect("a request once fds are free");
    assert_eq!(r.pid, pid);
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    procs::signal(pid, libc::SIGTERM).unwrap();
    let status = procs::reap(pid, EVENT_TIMEOUT).unwrap();
    assert!(status.success(), "{status}");
    let _ = child.wait();
}

/// examples/axum.rs with `RUST_LOG` set to `filter` (unset if `None`),
/// started and stopped: its stderr.
fn axum_log(filter: Option<&str>) -> String {
    let dir = TempDir::new("axum-log");
    let log = dir.path().join("stderr");
    let mut cmd = Command::new(example("axum"));
    cmd.args(["--listen", "127.0.0.1:0"])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap());
    if let Some(f) = filter {
        cmd.env("RUST_LOG", f);
    }
    procs::become_subreaper();
    let mut child = common::spawn(&mut cmd).expect("spawn axum");
    let lines = procs::line_channel(child.stdout.take().expect("piped"));
    let line = lines.recv_timeout(EVENT_TIMEOUT).expect("listening");
    assert!(line.starts_with("listening on"), "logs on stdout: {line}");
    procs::signal(child.id(), libc::SIGTERM).unwrap();
    let status = procs::reap(child.id(), EVENT_TIMEOUT).expect("reap axum");
    assert!(status.success(), "{status}");
    let _ = child.try_wait(); // reaped above
    std::fs::read_to_string(&log).unwrap()
}

#[test]
fn the_axum_example_logs_what_rust_log_asks_for() {
    let default = axum_log(None);
    assert!(
        default.contains(" INFO ") && default.contains("ready"),
        "{default}"
    );
    let quiet = axum_log(Some("warn"));
    assert!(!quiet.contains(" INFO "), "RUST_LOG=warn ignored: {quiet}");
    let debug = axum_log(Some("handover=debug"));
    assert!(
        debug.contains(" DEBUG "),
        "RUST_LOG=handover=debug ignored: {debug}"
    );
}
