//! The core promise, with real processes: a server upgrading itself under
//! load loses nothing, every generation serves and exits cleanly, and fds
//! and zombies stay flat.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{Server, TempDir, field, field_u32, load, procs, wait_until};

#[test]
fn ten_upgrades_under_load_lose_no_request() {
    let mut srv = Server::start(&["--listen", "127.0.0.1:0", "--drain-timeout", "10"]);
    let addr = srv.addr();
    // 4 clients with a new connection per request, 4 with keep-alive.
    let load = load::Load::start_warm(addr, 4, 4, 51);
    let stats = load.stats.clone();
    let mut pids = vec![srv.pid()];
    for _ in 0..10 {
        let (_old, new) = srv.upgrade();
        pids.push(new);
        // The new generation serves before the next upgrade starts.
        wait_until(
            "the new generation to answer",
            Duration::from_secs(30),
            || stats.by_pid.lock().unwrap().get(&new).copied().unwrap_or(0) > 10,
        );
        assert_eq!(srv.addr(), addr, "the address must survive the upgrade");
    }
    let stats = load.stop();
    let errors = stats.errors.lock().unwrap().clone();
    assert_eq!(stats.failed(), 0, "failed requests: {errors:?}");
    assert!(
        stats.ok() > 500,
        "too little load to mean anything: {}",
        stats.ok()
    );
    let served: BTreeSet<u32> = stats.pids().into_iter().collect();
    for pid in &pids {
        assert!(served.contains(pid), "generation {pid} never answered");
    }
    // Every old generation has exited with status 0 and was reaped (checked
    // in upgrade()); none is left running.
    for pid in &pids[..pids.len() - 1] {
        assert!(!procs::exists(*pid), "old generation {pid} still exists");
    }
    let last = srv.pid();
    assert!(
        procs::zombies(last).is_empty(),
        "zombies under the serving generation"
    );
    assert!(srv.stop().success());
}

#[test]
fn slow_request_started_before_the_upgrade_completes_on_the_old_generation() {
    let mut srv = Server::start(&["--listen", "127.0.0.1:0", "--drain-timeout", "20"]);
    let addr = srv.addr();
    let old = srv.pid();
    let before = served_total(addr);
    let slow = std::thread::spawn(move || load::get(addr, "/slow?ms=1500"));
    // The slow request has reached the handler once the count moved by two
    // (it, and the /stats probe itself).
    wait_until(
        "the slow request to arrive",
        Duration::from_secs(10),
        || served_total(addr) >= before + 3,
    );
    procs::signal(old, libc::SIGHUP).unwrap();
    let ok = srv.wait_line("upgrade-ok", Some(old));
    let new = field_u32(&ok, "successor");
    // New connections go to the successor while the old one finishes (for a
    // moment after the handover both accept: either answer is right).
    wait_until(
        "the successor to take new connections",
        Duration::from_secs(10),
        || {
            let r = load::get(addr, "/").expect("request during drain");
            assert!(r.pid == new || r.pid == old);
            r.pid == new
        },
    );
    assert!(
        !slow.is_finished(),
        "the slow request finished before the successor took over"
    );
    let resp = slow.join().unwrap().expect("slow request");
    assert_eq!(resp.status, 200);
    assert_eq!(
        resp.pid, old,
        "the slow request must be answered by the generation that took it"
    );
    assert!(resp.body.contains("slept 1500 ms"), "{}", resp.body);
    let exit = srv.wait_line("exit", Some(old));
    assert_eq!(field(&exit, "remaining"), Some("0"), "{exit}");
    assert!(procs::reap(old, common::EVENT_TIMEOUT).unwrap().success());
    let ready = srv.wait_line("ready", Some(new));
    srv.ready_line = ready;
    srv.generations = vec![(new, false)];
    assert!(srv.stop().success());
}

fn served_total(addr: std::net::SocketAddr) -> u64 {
    let r = load::get(addr, "/stats").expect("GET /stats");
    let v = r
        .body
        .split("\"served_total\":")
        .nth(1)
        .expect("served_total");
    let digits = v.split(|c: char| !c.is_ascii_digit()).next().unwrap_or("");
    digits.parse().expect("number")
}

#[test]
fn hundred_upgrades_keep_fds_and_zombies_flat_and_helpers_never_hold_a_listener() {
    let dir = TempDir::new("flat");
    let report = dir.path().join("fds.txt");
    let report_s = report.to_str().unwrap();
    let mut srv = Server::start(&[
        "--listen",
        "127.0.0.1:0",
        "--udp",
        "127.0.0.1:0",
        "--report-fds",
        report_s,
        "--spawn-helpers",
    ]);
    let addr = srv.addr();
    let mut counts = Vec::new();
    for i in 0..100 {
        let (old, new) = srv.upgrade();
        assert_eq!(load::get(addr, "/").expect("request").pid, new);
        // Helpers are reaped by the thread that spawned them, a moment after
        // they exit; a zombie that stays is a leak.
        wait_until(
            &format!("no zombies under {new} after upgrade {i}"),
            Duration::from_secs(5),
            || procs::zombies(new).is_empty(),
        );
        let exit = srv
            .history
            .iter()
            .rev()
            .find(|l| l.starts_with("exit") && field_u32(l, "pid") == old);
        assert!(exit.is_some());
        // The channel to the predecessor closes, copies included, once the
        // predecessor is gone. Told by what it is (the successor reported
        // it at start): its fd number, 5, is soon taken again — by the
        // helpers' pipes, or by the fds the successor opens for its own
        // next upgrade.
        let reports = std::fs::read_to_string(&report).unwrap();
        let channel = reports
            .lines()
            .find(|l| field(l, "pid") == Some(new.to_string().as_str()))
            .and_then(|l| field(l, "channel"))
            .expect("the successor reported its channel")
            .to_owned();
        assert!(channel.starts_with("socket:"), "{channel}");
        wait_until(
            &format!("the predecessor channel ({channel}) to close"),
            Duration::from_secs(10),
            || {
                !procs::fds(new)
                    .unwrap_or_default()
                    .iter()
                    .any(|(_, target)| *target == channel)
            },
        );
        // Non-pipe fds of the serving generation once its predecessor is
        // gone. Helper processes open pipes and /dev/null, and our request's
        // connection closes a moment after its response: those come and go,
        // so the count must settle back to the first generation's.
        let steady = || {
            procs::fds(new)
                .unwrap_or_default()
                .iter()
                .filter(|(_, t)| !t.starts_with("pipe:") && t != "/dev/null")
                .count()
        };
        if counts.is_empty() {
            // The reference is taken settled too: the same count in 20
            // polls in a row (100 ms), so that a connection closing just
            // then is not counted as part of it.
            let (mut same, mut last) = (0, usize::MAX);
            let settled = (0..2000).any(|_| {
                let now = steady();
                same = if now == last { same + 1 } else { 0 };
                last = now;
                same >= 20 || {
                    std::thread::sleep(Duration::from_millis(5));
                    false
                }
            });
            assert!(settled, "the first generation's fd count never settled");
            counts.push(last);
        } else {
            let first = counts[0];
            let mut last = 0;
            let settled = (0..2000).any(|_| {
                last = steady();
                last == first || {
                    std::thread::sleep(Duration::from_millis(5));
                    false
                }
            });
            assert!(
                settled,
                "generation {} holds {last} fds, the first held {first}",
                i + 2
            );
            counts.push(last);
        }
    }
    assert!(
        counts.iter().all(|c| *c == counts[0]),
        "fd count not flat: {counts:?}"
    );

    // Each successor started with exactly 0, 1, 2, the two named sockets
    // (LISTEN_FDS=2) and the channel at 5: nothing else leaked in.
    let text = std::fs::read_to_string(&report).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 101, "one report per generation");
    for line in &lines[1..] {
        assert_eq!(field(line, "listen_fds"), Some("2"), "{line}");
        assert_eq!(field(line, "fds"), Some("0,1,2,3,4,5"), "{line}");
    }

    let status = srv.stop();
    assert!(status.success());
    // No helper ever held a socket, and helpers did run in the generations.
    let leaks: Vec<&String> = srv
        .history
        .iter()
        .filter(|l| l.starts_with("helper-leak"))
        .collect();
    assert!(leaks.is_empty(), "helpers inherited sockets: {leaks:?}");
    let helpers: u64 = srv
        .history
        .iter()
        .filter(|l| l.starts_with("exit"))
        .map(|l| {
            field(l, "helpers")
                .and_then(|h| h.parse::<u64>().ok())
                .unwrap_or(0)
        })
        .sum();
    assert!(
        helpers >= 100,
        "only {helpers} helpers ran: the check proved little"
    );
    // Every generation exited and was reaped here (the test is their
    // subreaper): none is left, not even as a zombie.
    for (pid, reaped) in &srv.generations {
        assert!(
            *reaped && !procs::exists(*pid),
            "generation {pid} left behind"
        );
    }
}
