//! WebSocket connections survive upgrades (issue 19): real processes
//! (tests/fixture/websocket.rs: examples/chat.rs on the serving layer, or
//! with `--plain` a tokio-tungstenite server of its own through the
//! migration API), loopback, kernel-chosen ports, tokio-tungstenite
//! clients in one runtime with one worker thread.
//!
//! `cargo test --features websocket --test websocket` does not build the
//! fixture: run `cargo build --features websocket --examples` first (as
//! .ci/run does).

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use common::{EVENT_TIMEOUT, procs, wait_until};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::{Frame, FrameHeader};

type Client =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// One test at a time: each runs a chain of servers with many
/// connections, and they should not compete for the 2 cores.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static ONE: Mutex<()> = Mutex::new(());
    ONE.lock().unwrap_or_else(|e| e.into_inner())
}

fn fixture() -> PathBuf {
    let bin = common::server_bin().with_file_name("fixture_websocket");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --features websocket --examples` first",
        bin.display()
    );
    bin
}

/// The clients' runtime: one worker thread, which runs the clients' tasks
/// while the test's thread waits for the servers.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

fn raise_nofile() {
    // SAFETY: a plain C struct, filled in by getrlimit.
    let mut rl: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: getrlimit and setrlimit read and write the struct we pass.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl), 0);
        rl.rlim_cur = rl.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &rl);
    }
}

/// The generations of one fixture service.
struct Chain {
    child: Child,
    lines: mpsc::Receiver<String>,
    /// Lines read but not waited for yet: the generations print at once,
    /// in any order (an old generation's exit may come before its
    /// successor's `listening` line).
    pending: Vec<String>,
    addr: SocketAddr,
    /// Every generation's pid, and whether it was reaped.
    pids: Vec<(u32, bool)>,
}

/// What one upgrade took.
struct Upgrade {
    new: u32,
    /// The old generation's drain, by its own clock.
    drain_ms: u64,
    /// From the successor's commit (its `listening` line, printed when
    /// the commit arrived) until the old generation was reaped.
    gone_after: Duration,
}

impl Chain {
    fn start(args: &[&str]) -> Chain {
        procs::become_subreaper();
        let mut child = Command::new(fixture())
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(if std::env::var_os("HANDOVER_TEST_VERBOSE").is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .spawn()
            .expect("spawn the fixture");
        let lines = procs::line_channel(child.stdout.take().expect("piped"));
        let mut c = Chain {
            child,
            lines,
            pending: Vec::new(),
            addr: "0.0.0.0:0".parse().unwrap(),
            pids: Vec::new(),
        };
        let (addr, pid) = c.wait_listening();
        c.addr = addr;
        c.pids.push((pid, false));
        c
    }

    /// The first line that starts with `prefix`, within EVENT_TIMEOUT;
    /// other lines stay for later waits.
    fn wait_line(&mut self, prefix: &str) -> String {
        if let Some(i) = self.pending.iter().position(|l| l.starts_with(prefix)) {
            return self.pending.remove(i);
        }
        let deadline = Instant::now() + EVENT_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no `{prefix}` line in time: {:?}", self.pending));
            if line.starts_with(prefix) {
                return line;
            }
            self.pending.push(line);
        }
    }

    fn wait_listening(&mut self) -> (SocketAddr, u32) {
        let line = self.wait_line("listening on ");
        let words: Vec<&str> = line.split_whitespace().collect();
        (words[2].parse().unwrap(), words[4].parse().unwrap())
    }

    fn pid(&self) -> u32 {
        self.pids.last().unwrap().0
    }

    fn url(&self, room: &str) -> String {
        format!("ws://{}/ws?room={room}", self.addr)
    }

    /// SIGHUP; waits for the successor's commit, then for the old
    /// generation's exit line and status (0).
    fn upgrade(&mut self) -> Upgrade {
        let old = self.pid();
        procs::signal(old, libc::SIGHUP).unwrap();
        let (addr, new) = self.wait_listening();
        let committed = Instant::now();
        assert_eq!(addr, self.addr);
        self.pids.push((new, false));
        let exit = self.wait_line(&format!("exit pid={old} "));
        let status = procs::reap(old, EVENT_TIMEOUT).expect("reap the old generation");
        let gone_after = committed.elapsed();
        assert!(status.success(), "old generation {old}: {status}");
        self.reaped(old);
        assert!(exit.ends_with(" remaining=0"), "{exit}");
        Upgrade {
            new,
            drain_ms: field(&exit, "drain_ms"),
            gone_after,
        }
    }

    fn reaped(&mut self, pid: u32) {
        self.pids.iter_mut().for_each(|p| p.1 |= p.0 == pid);
    }

    fn stop(&mut self) {
        let pid = self.pid();
        procs::signal(pid, libc::SIGTERM).unwrap();
        let status = procs::reap(pid, EVENT_TIMEOUT).expect("reap the last generation");
        assert!(status.success(), "last generation {pid}: {status}");
        self.reaped(pid);
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

fn field(line: &str, name: &str) -> u64 {
    let prefix = format!("{name}=");
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(prefix.as_str()))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {line:?}"))
}

async fn connect(url: &str) -> Client {
    let (ws, _) = tokio::time::timeout(EVENT_TIMEOUT, tokio_tungstenite::connect_async(url))
        .await
        .expect("connect in time")
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    ws
}

/// The next message that is not a pong (bounded).
async fn next(ws: &mut Client) -> Result<Message, String> {
    loop {
        match tokio::time::timeout(EVENT_TIMEOUT, ws.next()).await {
            Err(_) => return Err("nothing within the bound".into()),
            Ok(None) => return Err("the stream ended".into()),
            Ok(Some(Err(e))) => return Err(format!("error: {e}")),
            Ok(Some(Ok(Message::Pong(_)))) => {}
            Ok(Some(Ok(m))) => return Ok(m),
        }
    }
}

/// Asks the connection which process serves it.
async fn pid_of(ws: &mut Client) -> u32 {
    ws.send(Message::text("pid?")).await.unwrap();
    let m = next(ws).await.unwrap();
    let text = m.to_text().unwrap();
    text.strip_prefix("pid=")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("not a pid answer: {text:?}"))
}

/// What the clients of the big test share with the test's thread.
struct Board {
    connected: AtomicU64,
    /// Per client: the pid that last answered its probe.
    last_pid: Vec<AtomicU32>,
    /// Per client: messages echoed.
    echoed: Vec<AtomicU64>,
    stop: AtomicBool,
}

/// One of the big test's clients: a numbered message every 100 ms, each
/// echo checked (exactly once, in order), the serving pid asked whenever
/// `probe` changes. Returns the pids that answered, in order.
async fn steady_client(
    i: usize,
    url: String,
    board: Arc<Board>,
    mut probe: tokio::sync::watch::Receiver<u32>,
) -> Result<(u64, Vec<u32>), String> {
    let mut ws = connect(&url).await;
    board.connected.fetch_add(1, Ordering::SeqCst);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut sent, mut echoed, mut pids) = (0u64, 0u64, Vec::new());
    let mut stopping_since: Option<Instant> = None;
    probe.mark_changed();
    loop {
        if board.stop.load(Ordering::Relaxed) && stopping_since.is_none() {
            stopping_since = Some(Instant::now());
        }
        if let Some(since) = stopping_since {
            if echoed == sent {
                break;
            }
            if since.elapsed() > EVENT_TIMEOUT {
                return Err(format!("{} of {sent} echoes missing", sent - echoed));
            }
        }
        tokio::select! {
            _ = tick.tick(), if stopping_since.is_none() => {
                sent += 1;
                ws.send(Message::text(format!("{i}:{sent}"))).await
                    .map_err(|e| format!("send {sent}: {e}"))?;
            }
            changed = probe.changed() => {
                if changed.is_ok() {
                    ws.send(Message::text("pid?")).await.map_err(|e| format!("probe: {e}"))?;
                }
            }
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(t))) => {
                    if let Some(pid) = t.strip_prefix("pid=") {
                        let pid: u32 = pid.parse().map_err(|_| format!("bad pid {t}"))?;
                        pids.push(pid);
                        board.last_pid[i].store(pid, Ordering::SeqCst);
                        continue;
                    }
                    let want = format!("{i}:{}", echoed + 1);
                    if t.as_str() != want {
                        return Err(format!("got {:?}, expected {want:?}", t.as_str()));
                    }
                    echoed += 1;
                    board.echoed[i].store(echoed, Ordering::Relaxed);
                }
                Some(Ok(Message::Close(f))) => return Err(format!("closed by the server: {f:?}")),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(format!("after {echoed} echoes: {e}")),
                None => return Err(format!("ended after {echoed} echoes")),
            },
            () = tokio::time::sleep(Duration::from_millis(50)), if stopping_since.is_some() => {}
        }
    }
    let _ = tokio::time::timeout(EVENT_TIMEOUT, ws.close(None)).await;
    Ok((sent, pids))
}

#[test]
fn a_thousand_clients_through_10_upgrades_lose_nothing_and_repeat_nothing() {
    let _serial = serial();
    const CLIENTS: usize = 1000;
    const UPGRADES: usize = 10;
    raise_nofile();
    let started = Instant::now();
    // A drain timeout far past the bound: an old generation that waited
    // for its connections would be caught.
    let mut chain = Chain::start(&["--drain-timeout", "30"]);
    let board = Arc::new(Board {
        connected: AtomicU64::new(0),
        last_pid: (0..CLIENTS).map(|_| AtomicU32::new(0)).collect(),
        echoed: (0..CLIENTS).map(|_| AtomicU64::new(0)).collect(),
        stop: AtomicBool::new(false),
    });
    let (probe, probe_rx) = tokio::sync::watch::channel(0u32);
    // Each client in a room of its own: what it gets back is its own.
    let urls: Vec<String> = (0..CLIENTS).map(|i| chain.url(&format!("c{i}"))).collect();
    let rt = runtime();
    let clients: Vec<_> = urls
        .into_iter()
        .enumerate()
        .map(|(i, url)| rt.spawn(steady_client(i, url, board.clone(), probe_rx.clone())))
        .collect();
    let all_answered_by = |pid: u32| {
        board
            .last_pid
            .iter()
            .all(|p| p.load(Ordering::SeqCst) == pid)
    };
    let first = chain.pid();
    wait_until("every client connected and answered", EVENT_TIMEOUT, || {
        board.connected.load(Ordering::SeqCst) == CLIENTS as u64 && all_answered_by(first)
    });
    let connected_in = started.elapsed();
    let echoes = || -> u64 { board.echoed.iter().map(|e| e.load(Ordering::Relaxed)).sum() };
    let mut gone = Vec::new();
    for round in 1..=UPGRADES {
        // Messages flow through the old generation first.
        let before = echoes();
        wait_until("echoes before the upgrade", EVENT_TIMEOUT, || {
            echoes() >= before + CLIENTS as u64
        });
        let up = chain.upgrade();
        gone.push((up.gone_after.as_millis(), up.drain_ms));
        probe.send(round as u32).unwrap();
        wait_until(
            "every client answered by the successor",
            EVENT_TIMEOUT,
            || all_answered_by(up.new),
        );
    }
    let before = echoes();
    wait_until("echoes after the last upgrade", EVENT_TIMEOUT, || {
        echoes() >= before + CLIENTS as u64
    });
    board.stop.store(true, Ordering::SeqCst);
    let results: Vec<_> = rt.block_on(async {
        let mut results = Vec::new();
        for c in clients {
            results.push(c.await.unwrap());
        }
        results
    });
    let generations: Vec<u32> = chain.pids.iter().map(|p| p.0).collect();
    let mut total = 0;
    for (i, r) in results.into_iter().enumerate() {
        let (sent, pids) = r.unwrap_or_else(|e| panic!("client {i}: {e}"));
        total += sent;
        assert_eq!(
            pids, generations,
            "client {i}: answered by every generation in turn"
        );
    }
    eprintln!(
        "{CLIENTS} clients, {UPGRADES} upgrades: {total} messages, each echoed once and in order, \
         0 disconnects; connected in {} ms; old generation gone after its commit / its drain (ms): \
         {gone:?}; {} s in all",
        connected_in.as_millis(),
        started.elapsed().as_secs()
    );
    for (i, (gone_ms, drain_ms)) in gone.iter().enumerate() {
        assert!(
            *gone_ms < 1000,
            "upgrade {}: the old generation was gone {gone_ms} ms after the commit (drain {drain_ms} ms)",
            i + 1
        );
    }
    chain.stop();
}

#[test]
fn upgrades_are_served_with_migration_on() {
    let _serial = serial();
    let mut chain = Chain::start(&[]);
    let old = chain.pid();
    let rt = runtime();
    // axum's own WebSocketUpgrade (hyper's upgrade): served as before.
    let url = format!("ws://{}/axum-ws", chain.addr);
    rt.block_on(async {
        let mut ws = connect(&url).await;
        ws.send(Message::text("axum")).await.unwrap();
        assert_eq!(next(&mut ws).await.unwrap(), Message::text("axum"));
        ws.close(None).await.unwrap();
    });
    // `websocket::upgrade` on a keep-alive connection that served a request
    // first (the migrating connection becomes hyper's upgradeable one).
    let mut http = Http::open(chain.addr);
    assert_eq!(http.get(), (old, false));
    let stream = http.0.into_inner();
    stream.set_nonblocking(true).unwrap();
    let mut ws = rt.block_on(async {
        let stream = tokio::net::TcpStream::from_std(stream).unwrap();
        let stream = tokio_tungstenite::MaybeTlsStream::Plain(stream);
        let url = chain.url("after-http");
        let (mut ws, _) = tokio_tungstenite::client_async(url, stream).await.unwrap();
        ws.send(Message::text("hi")).await.unwrap();
        assert_eq!(next(&mut ws).await.unwrap(), Message::text("hi"));
        assert_eq!(pid_of(&mut ws).await, old);
        ws
    });
    // It moves like any other.
    let up = chain.upgrade();
    rt.block_on(async {
        assert_eq!(pid_of(&mut ws).await, up.new);
        ws.close(None).await.unwrap();
    });
    chain.stop();
}

/// A message of `len` bytes, text or binary, recognisable by `tag`.
fn sized(len: usize, text: bool, tag: u8) -> Message {
    let body: Vec<u8> = (0..len)
        .map(|i| b'a' + ((i + tag as usize) % 26) as u8)
        .collect();
    match text {
        true => Message::text(String::from_utf8(body).unwrap()),
        false => Message::binary(body),
    }
}

#[test]
fn messages_of_every_size_and_pings_cross_upgrades() {
    let _serial = serial();
    let mut chain = Chain::start(&[]);
    let url = chain.url("sizes");
    let rt = runtime();
    let mut ws = rt.block_on(connect(&url));
    let sizes = [1, 125, 126, 65_535, 65_536, 300_000, 1 << 20];
    for round in 0..3u8 {
        let pid = chain.pid();
        rt.block_on(async {
            assert_eq!(pid_of(&mut ws).await, pid);
            for &len in &sizes {
                for text in [true, false] {
                    let m = sized(len, text, round);
                    ws.send(m.clone()).await.unwrap();
                    assert_eq!(next(&mut ws).await.unwrap(), m, "{len} bytes, text {text}");
                }
            }
            ws.send(Message::Ping(vec![round; 4].into())).await.unwrap();
            let pong = loop {
                match tokio::time::timeout(EVENT_TIMEOUT, ws.next()).await {
                    Ok(Some(Ok(Message::Pong(p)))) => break p,
                    other => assert!(matches!(other, Ok(Some(Ok(_)))), "{other:?}"),
                }
            };
            assert_eq!(&pong[..], &[round; 4]);
            // Sent just before the upgrade, unanswered yet: a ping and a
            // large message in flight while the connection moves.
            ws.send(Message::Ping(vec![9; 2].into())).await.unwrap();
            ws.send(sized(1 << 20, false, 7)).await.unwrap();
        });
        let up = chain.upgrade();
        rt.block_on(async {
            let mut got_pong = false;
            loop {
                match tokio::time::timeout(EVENT_TIMEOUT, ws.next()).await {
                    Ok(Some(Ok(Message::Pong(p)))) => {
                        assert_eq!(&p[..], &[9; 2]);
                        got_pong = true;
                    }
                    Ok(Some(Ok(m))) => {
                        assert_eq!(m, sized(1 << 20, false, 7));
                        break;
                    }
                    other => panic!("{other:?}"),
                }
            }
            if !got_pong {
                match tokio::time::timeout(EVENT_TIMEOUT, ws.next()).await {
                    Ok(Some(Ok(Message::Pong(p)))) => assert_eq!(&p[..], &[9; 2]),
                    other => panic!("no pong: {other:?}"),
                }
            }
            assert_eq!(pid_of(&mut ws).await, up.new);
        });
    }
    rt.block_on(async { ws.close(None).await.unwrap() });
    chain.stop();
}

/// A frame of a fragmented text message.
fn fragment(first: bool, fin: bool, payload: &[u8]) -> Message {
    let opcode = match first {
        true => OpCode::Data(Data::Text),
        false => OpCode::Data(Data::Continue),
    };
    let header = FrameHeader {
        is_final: fin,
        opcode,
        ..FrameHeader::default()
    };
    Message::Frame(Frame::from_payload(header, payload.to_vec().into()))
}

#[test]
fn a_fragmented_message_finished_in_time_moves_one_left_unfinished_is_closed_with_1012() {
    let _serial = serial();
    let mut chain = Chain::start(&[]);
    let rt = runtime();
    let (mut finished, mut unfinished) = rt.block_on(async {
        (
            connect(&chain.url("a")).await,
            connect(&chain.url("b")).await,
        )
    });
    rt.block_on(async {
        for ws in [&mut finished, &mut unfinished] {
            ws.send(fragment(true, false, b"hel")).await.unwrap();
            ws.flush().await.unwrap();
        }
    });
    let old = chain.pid();
    procs::signal(old, libc::SIGHUP).unwrap();
    let (_, new) = chain.wait_listening();
    let committed = Instant::now();
    chain.pids.push((new, false));
    rt.block_on(async {
        // One finishes its message within the second the old generation
        // waits for a boundary; it is answered, and moves.
        finished.send(fragment(false, true, b"lo")).await.unwrap();
        assert_eq!(next(&mut finished).await.unwrap(), Message::text("hello"));
        assert_eq!(pid_of(&mut finished).await, new);
        // The other never does: closed with 1012, not reset, not hung.
        match next(&mut unfinished).await.unwrap() {
            Message::Close(Some(f)) => assert_eq!(f.code, CloseCode::Restart),
            other => panic!("{other:?}"),
        }
        let closed_after = committed.elapsed();
        assert!(
            closed_after < Duration::from_secs(3),
            "closed {closed_after:?} after the commit"
        );
        // tungstenite answers the close; then the stream ends.
        assert!(matches!(
            tokio::time::timeout(EVENT_TIMEOUT, unfinished.next()).await,
            Ok(None | Some(Err(_)))
        ));
        finished.close(None).await.unwrap();
    });
    let exit = chain.wait_line(&format!("exit pid={old} "));
    procs::reap(old, EVENT_TIMEOUT).unwrap();
    chain.reaped(old);
    assert!(field(&exit, "drain_ms") < 5_000, "{exit}");
    chain.stop();
}

#[test]
fn rooms_survive_an_upgrade() {
    let _serial = serial();
    let mut chain = Chain::start(&[]);
    let rt = runtime();
    let mut a: Vec<Client> = Vec::new();
    let mut b: Vec<Client> = Vec::new();
    rt.block_on(async {
        for _ in 0..3 {
            a.push(connect(&chain.url("a")).await);
        }
        for _ in 0..2 {
            b.push(connect(&chain.url("b")).await);
        }
    });
    // Every member of room a gets a's message, the sender too; b nothing.
    let check =
        |rt: &tokio::runtime::Runtime, a: &mut Vec<Client>, b: &mut Vec<Client>, text: &str| {
            rt.block_on(async {
                a[1].send(Message::text(text)).await.unwrap();
                for ws in a.iter_mut() {
                    assert_eq!(next(ws).await.unwrap(), Message::text(text));
                }
                b[0].send(Message::text("to b")).await.unwrap();
                for ws in b.iter_mut() {
                    assert_eq!(next(ws).await.unwrap(), Message::text("to b"));
                }
            });
        };
    check(&rt, &mut a, &mut b, "before");
    let up = chain.upgrade();
    rt.block_on(async {
        for ws in a.iter_mut().chain(b.iter_mut()) {
            assert_eq!(pid_of(ws).await, up.new);
        }
    });
    check(&rt, &mut a, &mut b, "after");
    // A stop: no successor; each connection is closed with 1001 (Going
    // Away), and the process exits at once.
    let ends = watch_ends(&rt, a.into_iter().chain(b).collect());
    let t = Instant::now();
    chain.stop();
    let stopped = t.elapsed();
    for (end, _) in rt.block_on(ends).unwrap() {
        assert_eq!(end, Ok(End::Closed(1001)));
    }
    assert!(
        stopped < Duration::from_secs(2),
        "stopped after {stopped:?}"
    );
}

/// How a client's connection ended when the service went away under it.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum End {
    /// A close frame with this code.
    Closed(u16),
    /// No close frame: the connection was cut (its process died).
    Cut,
}

/// Waits for the end of `ws`, which receives nothing more (bounded).
async fn end_of(ws: &mut Client) -> Result<End, String> {
    match tokio::time::timeout(EVENT_TIMEOUT, ws.next()).await {
        Err(_) => Err("hangs".into()),
        Ok(Some(Ok(Message::Close(f)))) => {
            let code = f.map_or(1005, |f| f.code.into());
            // tungstenite answers the close; then the server ends the
            // connection, without a reset.
            match tokio::time::timeout(EVENT_TIMEOUT, ws.next()).await {
                Ok(None) => Ok(End::Closed(code)),
                other => Err(format!("after close {code}: {other:?}")),
            }
        }
        Ok(Some(Ok(m))) => Err(format!("unexpected {m:?}")),
        Ok(Some(Err(_)) | None) => Ok(End::Cut),
    }
}

/// Waits for the end of every client at once, in tasks of the clients'
/// runtime (so that each answers the server's close frame at once): how
/// each ended, and when.
fn watch_ends(
    rt: &tokio::runtime::Runtime,
    clients: Vec<Client>,
) -> tokio::task::JoinHandle<Vec<(Result<End, String>, Instant)>> {
    rt.spawn(async move {
        let tasks: Vec<_> = clients
            .into_iter()
            .map(|mut ws| {
                tokio::spawn(async move {
                    let end = end_of(&mut ws).await;
                    (end, Instant::now())
                })
            })
            .collect();
        let mut ends = Vec::new();
        for t in tasks {
            ends.push(t.await.unwrap());
        }
        ends
    })
}

#[test]
fn a_successor_that_crashes_after_taking_half_loses_those_the_rest_close_with_1012() {
    let _serial = serial();
    const CLIENTS: usize = 600;
    raise_nofile();
    // The tokio-tungstenite server of the fixture: its successor dies in
    // the loop that takes the connections, right after the 300th. (The
    // serving layer takes them all before its handlers run; the old
    // generation's side, `hand_over`, is the same code.)
    let mut chain = Chain::start(&["--plain", "--crash-after", "300", "--drain-timeout", "5"]);
    let rt = runtime();
    let clients = rt.block_on(async {
        let mut v = Vec::new();
        for i in 0..CLIENTS {
            let mut ws = connect(&chain.url(&format!("c{i}"))).await;
            ws.send(Message::text("hi")).await.unwrap();
            assert_eq!(next(&mut ws).await.unwrap(), Message::text("hi"));
            v.push(ws);
        }
        v
    });
    let ends = watch_ends(&rt, clients);
    let old = chain.pid();
    let t = Instant::now();
    procs::signal(old, libc::SIGHUP).unwrap();
    // The successor's crash and the old generation's exit, in any order.
    let crash = chain.wait_line("crash pid=");
    let exit = chain.wait_line(&format!("exit pid={old} "));
    let new = field(&crash, "pid") as u32;
    chain.pids.push((new, false));
    let status = procs::reap(new, EVENT_TIMEOUT).expect("reap the successor");
    chain.reaped(new);
    assert_eq!(status.code(), Some(3), "{status}");
    let mut counts = BTreeMap::<End, usize>::new();
    for (i, (end, _)) in rt.block_on(ends).unwrap().into_iter().enumerate() {
        let end = end.unwrap_or_else(|e| panic!("client {i}: {e}"));
        *counts.entry(end).or_default() += 1;
    }
    let ends = counts;
    procs::reap(old, EVENT_TIMEOUT).expect("reap the old generation");
    let old_gone = t.elapsed();
    chain.reaped(old);
    eprintln!(
        "a successor dead after taking 300 of {CLIENTS}: {ends:?}; {exit}; the old generation gone {} ms after the SIGHUP",
        old_gone.as_millis()
    );
    let cut = ends.get(&End::Cut).copied().unwrap_or(0);
    let restarted = ends.get(&End::Closed(1012)).copied().unwrap_or(0);
    assert_eq!(cut + restarted, CLIENTS, "{ends:?}");
    assert!(cut >= 300, "{ends:?}");
    assert!(restarted > 0, "none given back: {ends:?}");
    // At its deadline at the latest (5 s), not the migration's 30.
    assert!(field(&exit, "drain_ms") <= 5_500, "{exit}");
}

/// An HTTP/1.1 keep-alive connection, read by hand.
struct Http(BufReader<std::net::TcpStream>);

impl Http {
    fn open(addr: SocketAddr) -> Http {
        let s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(EVENT_TIMEOUT)).unwrap();
        Http(BufReader::new(s))
    }

    /// GET /: (X-Pid, whether it said `Connection: close`).
    fn get(&mut self) -> (u32, bool) {
        self.0
            .get_mut()
            .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            .unwrap();
        let (mut len, mut pid, mut close) = (0, 0, false);
        let mut line = String::new();
        self.0.read_line(&mut line).unwrap();
        assert!(line.starts_with("HTTP/1.1 200"), "{line:?}");
        loop {
            line.clear();
            self.0.read_line(&mut line).unwrap();
            let l = line.trim_end().to_ascii_lowercase();
            if l.is_empty() {
                break;
            }
            if let Some(v) = l.strip_prefix("content-length:") {
                len = v.trim().parse().unwrap();
            } else if let Some(v) = l.strip_prefix("x-pid:") {
                pid = v.trim().parse().unwrap();
            } else if l == "connection: close" {
                close = true;
            }
        }
        self.0.read_exact(&mut vec![0; len]).unwrap();
        (pid, close)
    }
}

/// Generation 2 takes no connections: each WebSocket is closed with 1012
/// and each keep-alive connection answered as a lame duck right after the
/// commit, with no wait for an offer that will not come.
fn a_successor_that_takes_nothing(plain: bool) {
    let _serial = serial();
    const SOCKETS: usize = 50;
    let mut args = vec!["--no-migrate-from", "2"];
    if plain {
        args.push("--plain");
    }
    let mut chain = Chain::start(&args);
    let old = chain.pid();
    let rt = runtime();
    let sockets = rt.block_on(async {
        let mut v = Vec::new();
        for i in 0..SOCKETS {
            let mut ws = connect(&chain.url(&format!("c{i}"))).await;
            assert_eq!(pid_of(&mut ws).await, old);
            v.push(ws);
        }
        v
    });
    let ends = watch_ends(&rt, sockets);
    let mut http: Vec<Http> = match plain {
        true => Vec::new(),
        false => (0..10).map(|_| Http::open(chain.addr)).collect(),
    };
    for h in &mut http {
        assert_eq!(h.get(), (old, false));
    }
    procs::signal(old, libc::SIGHUP).unwrap();
    let (_, new) = chain.wait_listening();
    let committed = Instant::now();
    chain.pids.push((new, false));
    let mut answered = Vec::new();
    for h in &mut http {
        // The old generation hears of the commit an instant after the
        // successor does: a request in between is answered as usual (the
        // connection stays open), the next one as a lame duck.
        let deadline = Instant::now() + EVENT_TIMEOUT;
        loop {
            let (pid, close) = h.get();
            assert_eq!(pid, old, "answered by the old generation");
            if close {
                break;
            }
            assert!(Instant::now() < deadline, "no lame-duck answer in time");
        }
        answered.push(committed.elapsed().as_millis());
    }
    let mut closed = Vec::new();
    for (end, at) in rt.block_on(ends).unwrap() {
        assert_eq!(end, Ok(End::Closed(1012)));
        closed.push(at.saturating_duration_since(committed).as_millis());
    }
    let exit = chain.wait_line(&format!("exit pid={old} "));
    procs::reap(old, EVENT_TIMEOUT).unwrap();
    chain.reaped(old);
    let slowest = closed.iter().chain(&answered).max().copied().unwrap();
    eprintln!(
        "successor takes nothing (plain {plain}): {SOCKETS} WebSockets closed with 1012, {} keep-alive \
         connections answered as a lame duck, the last {slowest} ms after the commit; {exit}",
        answered.len()
    );
    // An offer is waited for 5 s: none is.
    assert!(slowest < 2_000, "{slowest} ms after the commit");
    assert!(field(&exit, "drain_ms") < 2_000, "{exit}");
    // New connections: the successor.
    rt.block_on(async {
        let mut ws = connect(&chain.url("new")).await;
        assert_eq!(pid_of(&mut ws).await, new);
    });
    chain.stop();
}

#[test]
fn a_successor_that_takes_nothing_closes_with_1012_and_lame_ducks_at_once() {
    a_successor_that_takes_nothing(false);
}

#[test]
fn plain_tokio_tungstenite_a_successor_that_takes_nothing_closes_with_1012_at_once() {
    a_successor_that_takes_nothing(true);
}

#[test]
fn plain_tokio_tungstenite_connections_move_through_upgrades() {
    let _serial = serial();
    const CLIENTS: usize = 100;
    raise_nofile();
    let mut chain = Chain::start(&["--plain"]);
    let rt = runtime();
    let mut clients = rt.block_on(async {
        let mut v = Vec::new();
        for i in 0..CLIENTS {
            v.push((connect(&chain.url(&format!("c{i}"))).await, 0u64));
        }
        v
    });
    for _ in 0..3 {
        let pid = chain.pid();
        rt.block_on(async {
            for (i, (ws, n)) in clients.iter_mut().enumerate() {
                assert_eq!(pid_of(ws).await, pid);
                *n += 1;
                let m = Message::text(format!("{i}:{n}"));
                ws.send(m.clone()).await.unwrap();
                assert_eq!(next(ws).await.unwrap(), m);
                // In flight while it moves: answered by the successor.
                *n += 1;
                ws.send(Message::text(format!("{i}:{n}"))).await.unwrap();
            }
        });
        let up = chain.upgrade();
        assert!(
            up.gone_after < Duration::from_secs(1),
            "{:?}",
            up.gone_after
        );
        rt.block_on(async {
            for (i, (ws, n)) in clients.iter_mut().enumerate() {
                assert_eq!(next(ws).await.unwrap(), Message::text(format!("{i}:{n}")));
                assert_eq!(pid_of(ws).await, up.new);
            }
        });
    }
    rt.block_on(async {
        for (ws, _) in &mut clients {
            ws.close(None).await.unwrap();
        }
    });
    chain.stop();
}
