//! Connection migration over real sockets: TCP connections on 127.0.0.1
//! handed across a real migration socket, in one process (both generations'
//! code runs on one runtime; the kernel does not care).

use std::collections::HashSet;
use std::io;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::MetadataExt;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;

use super::receive::{IncomingConnections, Phase};
use super::send::{ConnectionSender, Source, WINDOW};
use super::*;

/// Bounds every wait in these tests.
const BOUND: Duration = Duration::from_secs(20);

/// One test at a time: they count fds and hold many sockets.
static SERIAL: Mutex<()> = Mutex::new(());

/// Runs `test` on a runtime of its own, built and dropped under the
/// [`SERIAL`] lock so that no other test's runtime fds come and go while it
/// counts.
fn run<F: std::future::Future<Output = ()>>(test: F) {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(test);
}

/// The inode of a socket.
fn inode(fd: BorrowedFd<'_>) -> u64 {
    nix::sys::stat::fstat(fd).unwrap().st_ino
}

/// How many fds of this process refer to one of `inodes`.
fn held(inodes: &HashSet<u64>) -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::metadata(e.ok()?.path()).ok())
        .filter(|m| inodes.contains(&m.ino()))
        .count()
}

/// Waits (bounded) until no fd of this process refers to one of `inodes`
/// (every socket a test made, and the migration socket): a writer task
/// closes its copies when it next runs. Counting every fd of the process
/// instead would count the other unit tests' fds too, which come and go
/// meanwhile (a tokio runtime's, a signal pipe opened for good).
async fn settle(inodes: &HashSet<u64>) {
    let until = Instant::now() + BOUND;
    while held(inodes) != 0 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(held(inodes), 0, "an fd of this test's sockets leaked");
}

/// [`pair`], and the inodes of its migration socket.
fn watched_pair(deadline: Duration) -> (ConnectionSender, IncomingConnections, HashSet<u64>) {
    let (a, b) = sock::seqpacket_pair().unwrap();
    let inodes = [inode(a.as_fd()), inode(b.as_fd())].into_iter().collect();
    let sender = ConnectionSender::spawn(Source::Socket(a), Instant::now() + deadline).unwrap();
    let incoming = IncomingConnections::new(Phase::Open(sock::register(b).unwrap()), 1);
    (sender, incoming, inodes)
}

/// `n` connections on loopback: (client, server side, what the server read).
/// Each client sent `req <i>\n`, which the server read.
fn connections(n: usize) -> Vec<(TcpStream, TcpStream, Vec<u8>)> {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    (0..n)
        .map(|i| {
            let mut client = TcpStream::connect(addr).unwrap();
            client.set_read_timeout(Some(BOUND)).unwrap();
            let (mut server, _) = listener.accept().unwrap();
            server.set_read_timeout(Some(BOUND)).unwrap();
            let req = format!("req {i}\n");
            client.write_all(req.as_bytes()).unwrap();
            let mut got = vec![0u8; req.len()];
            server.read_exact(&mut got).unwrap();
            (client, server, got)
        })
        .collect()
}

/// A connected sender and receiver over a fresh migration socket.
fn pair(deadline: Duration) -> (ConnectionSender, IncomingConnections) {
    let (a, b) = sock::seqpacket_pair().unwrap();
    let sender = ConnectionSender::spawn(Source::Socket(a), Instant::now() + deadline).unwrap();
    let incoming = IncomingConnections::new(Phase::Open(sock::register(b).unwrap()), 1);
    (sender, incoming)
}

fn is_cloexec(fd: BorrowedFd<'_>) -> bool {
    crate::sys::is_cloexec(fd).unwrap()
}

async fn next(incoming: &mut IncomingConnections) -> Option<Result<Migrated, MigrateError>> {
    tokio::time::timeout(BOUND, incoming.recv())
        .await
        .expect("recv within the bound")
}

#[test]
fn a_thousand_connections_move_in_batches_and_still_work() {
    run(many_connections(1000));
}

/// Timing: `cargo test --release --lib migrate::tests::timing -- --ignored --nocapture`.
#[test]
#[ignore]
fn timing_of_5000_connections() {
    run(many_connections(5000));
}

/// `n` connections handed over concurrently, each answered by the receiver
/// on its own connection with its payload.
async fn many_connections(n: usize) {
    let conns = connections(n);
    let server_inodes: HashSet<u64> = conns.iter().map(|(_, s, _)| inode(s.as_fd())).collect();
    let (sender, mut incoming) = pair(BOUND);

    let start = Instant::now();
    let mut clients = Vec::new();
    let mut sends = JoinSet::new();
    for (client, server, payload) in conns {
        clients.push(client);
        let sender = sender.clone();
        sends.spawn(async move { sender.send(server, payload).await });
    }
    // The successor's side: take them all, then answer each connection with
    // its payload.
    let receiver = tokio::spawn(async move {
        let mut taken = Vec::new();
        for _ in 0..n {
            let item = next(&mut incoming).await.expect("a connection").unwrap();
            let Migrated::Connection(conn) = item else {
                panic!("not a connection")
            };
            taken.push(conn);
        }
        let took = start.elapsed();
        for conn in taken {
            assert!(is_cloexec(conn.as_fd()), "received fds are close-on-exec");
            let (mut stream, payload) = conn.into_tcp().unwrap();
            stream.set_nonblocking(false).unwrap();
            stream.write_all(b"resp ").unwrap();
            stream.write_all(&payload).unwrap();
        }
        (incoming, took)
    });
    while let Some(sent) = sends.join_next().await {
        sent.unwrap().expect("handed over");
    }
    let (mut incoming, took) = tokio::time::timeout(BOUND, receiver)
        .await
        .unwrap()
        .unwrap();
    tokio::time::timeout(BOUND, sender.finish())
        .await
        .unwrap()
        .unwrap();
    assert!(
        next(&mut incoming).await.is_none(),
        "the end record ends the stream"
    );

    let records = sender.counts.records.load(Ordering::Relaxed);
    let largest = sender.counts.largest_batch.load(Ordering::Relaxed);
    eprintln!(
        "{n} connections taken by the receiver in {:.1} ms, {records} records, largest {largest}",
        took.as_secs_f64() * 1e3
    );
    assert_eq!(sender.counts.connections.load(Ordering::Relaxed), n as u64);
    assert!(
        records < n as u64 / 4,
        "{records} records for {n} connections"
    );
    assert!(largest <= 253 && largest > 1, "largest batch {largest}");
    assert_eq!(incoming.records, records + 1, "the records and the end");

    // Every client is answered on its own connection, by the new owner.
    for (i, mut client) in clients.into_iter().enumerate() {
        let want = format!("resp req {i}\n");
        let mut got = vec![0u8; want.len()];
        client.read_exact(&mut got).unwrap();
        assert_eq!(String::from_utf8_lossy(&got), want);
    }
    drop(incoming);
    assert_eq!(held(&server_inodes), 0, "a server-side socket leaked");
}

#[test]
fn a_receiver_that_never_reads_gets_nothing_past_the_deadline() {
    run(async {
        const N: usize = WINDOW + 4;
        let conns = connections(N);
        let server_inodes: HashSet<u64> = conns.iter().map(|(_, s, _)| inode(s.as_fd())).collect();
        let (a, never_read) = sock::seqpacket_pair().unwrap();
        let mut mine = server_inodes.clone();
        mine.extend([inode(a.as_fd()), inode(never_read.as_fd())]);
        let deadline = Duration::from_millis(300);
        let start = Instant::now();
        let sender = ConnectionSender::spawn(Source::Socket(a), start + deadline).unwrap();
        let mut clients = Vec::new();
        let mut sends = JoinSet::new();
        for (client, server, _) in conns {
            clients.push(client);
            let sender = sender.clone();
            // 64 KiB payloads: one connection per record, so some wait in the
            // queue while WINDOW records wait for an answer.
            sends.spawn(async move { sender.send(server, vec![b'x'; MAX_PAYLOAD]).await });
        }
        let (mut shut, mut given_back) = (0, 0);
        while let Some(sent) = tokio::time::timeout(BOUND, sends.join_next())
            .await
            .unwrap()
        {
            let e = sent.unwrap().unwrap_err();
            assert!(matches!(e.error(), MigrateError::TimedOut), "{e}");
            match e.into_connection() {
                Some(_) => given_back += 1,
                None => shut += 1,
            }
        }
        let took = start.elapsed();
        assert!(
            took >= deadline && took < deadline + Duration::from_secs(2),
            "{took:?}"
        );
        assert_eq!(shut, WINDOW, "the records in flight are shut down");
        assert_eq!(given_back, N - WINDOW, "the rest comes back");
        // Later requests fail at once, with the connection given back.
        let (late, server, _) = connections(1).pop().unwrap();
        let e = sender.send(server, b"late".to_vec()).await.unwrap_err();
        assert!(matches!(e.error(), MigrateError::TimedOut), "{e}");
        assert!(e.into_connection().is_some());
        drop(late);
        // Every client sees its connection end.
        for mut client in clients {
            let mut buf = [0u8; 1];
            assert_eq!(client.read(&mut buf).unwrap(), 0);
        }
        // The copies waiting in the receiver's queue go with it.
        drop(never_read);
        drop(sender);
        assert_eq!(held(&server_inodes), 0, "a server-side socket leaked");
        settle(&mine).await;
    });
}

#[test]
fn a_receiver_that_goes_away_gives_the_rest_back_at_once() {
    run(async {
        const N: usize = 40;
        let conns = connections(N);
        let server_inodes: HashSet<u64> = conns.iter().map(|(_, s, _)| inode(s.as_fd())).collect();
        let (sender, mut incoming, mut mine) = watched_pair(Duration::from_secs(60));
        mine.extend(&server_inodes);
        let start = Instant::now();
        let mut clients = Vec::new();
        let mut sends = JoinSet::new();
        for (i, (client, server, payload)) in conns.into_iter().enumerate() {
            clients.push(client);
            let sender = sender.clone();
            // Large payloads: one connection per record.
            let mut payload = payload;
            payload.resize(MAX_PAYLOAD, b' ');
            sends.spawn(async move { (i, sender.send(server, payload).await) });
        }
        // The successor takes three, then dies (its socket and queue close).
        let mut taken = Vec::new();
        for _ in 0..3 {
            match next(&mut incoming).await.unwrap().unwrap() {
                Migrated::Connection(c) => taken.push(c),
                Migrated::State(_) => panic!("a state"),
            }
        }
        drop(incoming);
        for c in taken {
            let (mut s, _) = c.into_tcp().unwrap();
            s.set_nonblocking(false).unwrap();
            s.write_all(b"new\n").unwrap();
        }
        let mut ok = 0;
        while let Some(sent) = tokio::time::timeout(BOUND, sends.join_next())
            .await
            .unwrap()
        {
            match sent.unwrap() {
                (_, Ok(())) => ok += 1,
                (i, Err(e)) => {
                    assert!(matches!(e.error(), MigrateError::SuccessorGone), "{e}");
                    // Still ours, and still usable: answer it here.
                    let (fd, _) = e.into_connection().expect("given back");
                    let mut s = TcpStream::from(fd);
                    s.set_nonblocking(false).unwrap();
                    s.write_all(format!("old {i}\n").as_bytes()).unwrap();
                }
            }
        }
        assert_eq!(ok, 3);
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no wait for the deadline"
        );
        for (i, mut client) in clients.into_iter().enumerate() {
            let mut got = String::new();
            client.read_to_string(&mut got).unwrap();
            assert!(
                got == "new\n" || got == format!("old {i}\n"),
                "{i}: {got:?}"
            );
        }
        drop(sender);
        assert_eq!(held(&server_inodes), 0, "a server-side socket leaked");
        settle(&mine).await;
    });
}

#[test]
fn a_successor_process_killed_with_records_queued_gives_them_back() {
    use std::os::unix::process::CommandExt;
    run(async {
        let conns = connections(4);
        let (a, b) = sock::seqpacket_pair().unwrap();
        let sender = ConnectionSender::spawn(Source::Socket(a), Instant::now() + BOUND).unwrap();
        let raw = b.as_raw_fd();
        let mut cmd = std::process::Command::new("sleep");
        cmd.arg("60");
        // SAFETY: dup2 is async-signal-safe and touches only the child's fd
        // table; `raw` is open in the parent, so in the child too.
        unsafe {
            cmd.pre_exec(move || match libc::dup2(raw, 3) {
                -1 => Err(io::Error::last_os_error()),
                _ => Ok(()),
            });
        }
        let mut child = cmd.spawn().unwrap();
        drop(b);
        let mut sends = JoinSet::new();
        let mut clients = Vec::new();
        for (client, server, payload) in conns {
            clients.push(client);
            let sender = sender.clone();
            sends.spawn(async move { sender.send(server, payload).await });
        }
        // Let the first record reach the child's queue: the sends are pending.
        tokio::task::yield_now().await;
        child.kill().unwrap();
        child.wait().unwrap();
        while let Some(sent) = tokio::time::timeout(BOUND, sends.join_next())
            .await
            .unwrap()
        {
            let e = sent.unwrap().unwrap_err();
            assert!(matches!(e.error(), MigrateError::SuccessorGone), "{e}");
            let (fd, payload) = e.into_connection().expect("given back");
            let mut s = TcpStream::from(fd);
            s.set_nonblocking(false).unwrap();
            s.write_all(&payload).unwrap();
        }
        for mut client in clients {
            let mut got = [0u8; 4];
            client.read_exact(&mut got).unwrap();
            assert_eq!(&got, b"req ");
        }
    });
}

#[test]
fn bad_input_gives_typed_errors_and_closes_the_fds() {
    run(async {
        let mut mine = HashSet::new();
        {
            let (sender, _incoming, pair_inodes) = watched_pair(BOUND);
            mine.extend(pair_inodes);
            // Not a socket: refused before anything is sent, and given back.
            let (r, _w) = crate::sys::pipe_cloexec().unwrap();
            let e = sender.send(r, b"".to_vec()).await.unwrap_err();
            assert!(
                matches!(e.error(), MigrateError::NotASocket { found: "a pipe" }),
                "{e}"
            );
            assert!(e.into_connection().is_some());
            let (_c, server, _) = connections(1).pop().unwrap();
            mine.insert(inode(server.as_fd()));
            let e = sender
                .send(server, vec![0; MAX_PAYLOAD + 1])
                .await
                .unwrap_err();
            assert!(
                matches!(e.error(), MigrateError::PayloadTooLarge { .. }),
                "{e}"
            );
            let e = sender.send_state(vec![0; MAX_STATE + 1]).await.unwrap_err();
            assert!(
                matches!(e.error(), MigrateError::StateTooLarge { .. }),
                "{e}"
            );
        }

        // Raw records into a receiver, as a broken or hostile peer would send.
        let (raw, b) = sock::seqpacket_pair().unwrap();
        mine.extend([inode(raw.as_fd()), inode(b.as_fd())]);
        let mut incoming = IncomingConnections::new(Phase::Open(sock::register(b).unwrap()), 1);
        let conns = connections(3);
        let socks: Vec<BorrowedFd<'_>> = conns.iter().map(|(_, s, _)| s.as_fd()).collect();
        let inodes: HashSet<u64> = socks.iter().map(|s| inode(*s)).collect();
        mine.extend(&inodes);
        let send =
            |rec: &[u8], fds: &[BorrowedFd<'_>]| sock::send_record(raw.as_fd(), rec, fds).unwrap();
        let answer = || {
            let mut buf = [0u8; 512];
            let mut cmsg = sock::cmsg_buffer();
            crate::sys::poll_until(
                &[(raw.as_fd(), libc::POLLIN)],
                std::time::Instant::now() + BOUND,
            )
            .unwrap();
            let got = sock::recv_with_fds(raw.as_fd(), &mut buf, &mut cmsg).unwrap();
            wire::decode(&buf[..got.len], got.fds.len()).map(|r| format!("{r:?}"))
        };

        // Garbage: no answer (no readable header), a typed error.
        send(b"\x00\x01", &[]);
        let e = next(&mut incoming).await.unwrap().unwrap_err();
        assert!(
            matches!(e, MigrateError::BadRecord(FrameError::Short { len: 2 })),
            "{e}"
        );
        // Two connections announced, three fds attached: refused, all closed.
        send(&wire::encode_connections(7, &[b"a", b"b"]), &socks);
        let e = next(&mut incoming).await.unwrap().unwrap_err();
        assert!(
            matches!(
                e,
                MigrateError::BadRecord(FrameError::FdCount {
                    expected: 2,
                    received: 3
                })
            ),
            "{e}"
        );
        assert!(answer().unwrap().starts_with("Refused { seq: 7"));
        assert_eq!(held(&inodes), 3, "only our own copies are left");
        // A pipe where a connection belongs: that entry is an error, the record
        // is answered, the socket beside it arrives.
        let (r, _w) = crate::sys::pipe_cloexec().unwrap();
        send(
            &wire::encode_connections(8, &[b"p", b"s"]),
            &[r.as_fd(), socks[0]],
        );
        let e = next(&mut incoming).await.unwrap().unwrap_err();
        assert!(
            matches!(e, MigrateError::NotASocket { found: "a pipe" }),
            "{e}"
        );
        let Some(Ok(Migrated::Connection(c))) = next(&mut incoming).await else {
            panic!("the socket beside the pipe")
        };
        assert_eq!(c.payload(), b"s");
        assert_eq!(answer().unwrap(), "Taken { seq: 8 }");
        drop(c);
        // An answer record travelling the wrong way.
        send(&wire::encode_answer(9, None), &[]);
        let e = next(&mut incoming).await.unwrap().unwrap_err();
        assert!(matches!(e, MigrateError::Protocol { .. }), "{e}");
        // A state chunk with an fd: refused, the fd closed.
        send(&wire::encode_state(10, b"x", false), &socks[..1]);
        let e = next(&mut incoming).await.unwrap().unwrap_err();
        assert!(
            matches!(e, MigrateError::BadRecord(FrameError::FdCount { .. })),
            "{e}"
        );
        assert!(answer().unwrap().starts_with("Refused { seq: 10"));
        // More fds than one message carries never leave this process.
        let many: Vec<BorrowedFd<'_>> = (0..254).map(|_| socks[0]).collect();
        let e = sock::send_record(raw.as_fd(), &[0; 12], &many).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        // The peer goes: the stream ends.
        drop(raw);
        assert!(next(&mut incoming).await.is_none());
        assert_eq!(held(&inodes), 3, "only our own copies are left");
        mine.extend([inode(r.as_fd()), inode(_w.as_fd())]);
        drop((conns, incoming, r, _w));
        settle(&mine).await;
    });
}

#[test]
fn state_travels_in_order_with_connections() {
    run(async {
        let (sender, mut incoming) = pair(BOUND);
        let (mut client, server, _) = connections(1).pop().unwrap();
        let big: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        let s = sender.clone();
        let big2 = big.clone();
        let sends = tokio::spawn(async move {
            s.send_state(b"first".to_vec()).await.unwrap();
            s.send(server, b"conn".to_vec()).await.unwrap();
            s.send_state(big2).await.unwrap();
            s.send_state(Vec::new()).await.unwrap();
            s.finish().await.unwrap();
            let e = s.send_state(b"late".to_vec()).await.unwrap_err();
            assert!(matches!(e.error(), MigrateError::Finished), "{e}");
        });
        let mut got = Vec::new();
        while let Some(item) = next(&mut incoming).await {
            got.push(item.unwrap());
        }
        tokio::time::timeout(BOUND, sends).await.unwrap().unwrap();
        assert_eq!(got.len(), 4);
        assert!(matches!(&got[0], Migrated::State(s) if s == b"first"));
        let Migrated::Connection(c) = got.remove(1) else {
            panic!("not a connection")
        };
        assert!(matches!(&got[1], Migrated::State(s) if *s == big));
        assert!(matches!(&got[2], Migrated::State(s) if s.is_empty()));
        let (mut s, payload) = c.into_tcp().unwrap();
        assert_eq!(payload, b"conn");
        s.set_nonblocking(false).unwrap();
        s.write_all(b"ok").unwrap();
        let mut buf = [0u8; 2];
        client.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ok");
    });
}

#[test]
fn the_offer_crosses_the_channel_after_a_stale_line() {
    run(async {
        let (ours, theirs) = crate::sys::socketpair_cloexec().unwrap();
        // An unhealthy report that crossed the commit is skipped.
        crate::sys::send_all(theirs.as_fd(), b"Unot well\n").unwrap();
        let sender =
            ConnectionSender::spawn(Source::Channel(ours), Instant::now() + BOUND).unwrap();
        let mut incoming = IncomingConnections::new(Phase::Offer(theirs), 1);
        let (mut client, server, payload) = connections(1).pop().unwrap();
        let send = tokio::spawn({
            let sender = sender.clone();
            async move { sender.send(server, payload).await }
        });
        let Some(Ok(Migrated::Connection(c))) = next(&mut incoming).await else {
            panic!("no connection")
        };
        tokio::time::timeout(BOUND, send)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let (mut s, payload) = c.into_tcp().unwrap();
        s.set_nonblocking(false).unwrap();
        s.write_all(&payload).unwrap();
        let mut buf = [0u8; 6];
        client.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"req 0\n");
    });
}

#[test]
fn no_offer_gives_the_connection_back_within_the_bound() {
    run(async {
        let (ours, theirs) = crate::sys::socketpair_cloexec().unwrap();
        let start = Instant::now();
        let sender =
            ConnectionSender::spawn(Source::Channel(ours), start + Duration::from_millis(200))
                .unwrap();
        let (_client, server, payload) = connections(1).pop().unwrap();
        let e = sender.send(server, payload).await.unwrap_err();
        assert!(matches!(e.error(), MigrateError::NotOffered { .. }), "{e}");
        assert!(e.into_connection().is_some());
        assert!(start.elapsed() < Duration::from_secs(2));
        // A successor that is gone: at once.
        let (ours, gone) = crate::sys::socketpair_cloexec().unwrap();
        drop(gone);
        let sender =
            ConnectionSender::spawn(Source::Channel(ours), Instant::now() + BOUND).unwrap();
        let (_client, server, payload) = connections(1).pop().unwrap();
        let e = sender.send(server, payload).await.unwrap_err();
        assert!(matches!(e.error(), MigrateError::SuccessorGone), "{e}");
        drop(theirs);
    });
}

#[test]
fn state_still_goes_after_the_deadline_for_connections() {
    run(async {
        let deadline = Duration::from_millis(100);
        let (sender, mut incoming) = pair(deadline);
        // Waiting for the deadline to pass is what this test is about.
        tokio::time::sleep_until(Instant::now() + deadline * 2).await;
        let (client, server, payload) = connections(1).pop().unwrap();
        let e = sender.send(server, payload).await.unwrap_err();
        assert!(matches!(e.error(), MigrateError::TimedOut), "{e}");
        assert!(e.into_connection().is_some(), "given back");
        drop(client);
        let s = sender.clone();
        let sends = tokio::spawn(async move {
            s.send_state(b"final delta".to_vec()).await.unwrap();
            s.finish().await.unwrap();
        });
        let Some(Ok(Migrated::State(delta))) = next(&mut incoming).await else {
            panic!("no state")
        };
        assert_eq!(delta, b"final delta");
        assert!(next(&mut incoming).await.is_none());
        tokio::time::timeout(BOUND, sends).await.unwrap().unwrap();
    });
}
