//! State handoff: a counter survives upgrades under load, a state of the
//! wrong version fails the upgrade with the old generation serving, and a
//! 1 GiB state streams through without being held whole on either side.

mod common;

use std::io::Read;
use std::time::{Duration, Instant};

use common::{Server, TempDir, field, install, load, procs, wait_until};
use handover::{Handover, UpgradeOptions};

fn stats(addr: std::net::SocketAddr) -> (u32, u64) {
    let r = load::get(addr, "/stats").expect("GET /stats");
    let served = r.body.split("\"served_total\":").nth(1).unwrap();
    let served = served
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap();
    (r.pid, served)
}

#[test]
fn served_total_survives_ten_upgrades_under_load() {
    let mut srv = Server::start(&["--listen", "127.0.0.1:0"]);
    let addr = srv.addr();
    let load = load::Load::start_warm(addr, 2, 2, 51);
    let mut last = 0;
    for i in 0..10 {
        let (old, new) = srv.upgrade();
        let line = srv
            .history
            .iter()
            .find(|l| l.starts_with("state") && field(l, "pid") == Some(&new.to_string()))
            .cloned();
        let handed: u64 = line
            .as_deref()
            .and_then(|l| field(l, "served_total"))
            .unwrap_or_else(|| panic!("no state line for {new}: {:?}", srv.history))
            .parse()
            .unwrap();
        assert!(
            handed >= last,
            "upgrade {i}: {old} handed {handed}, less than {last}"
        );
        wait_until("the successor to answer", Duration::from_secs(30), || {
            let (pid, served) = stats(addr);
            pid == new && served > handed
        });
        last = handed;
    }
    let stats = load.stop();
    assert_eq!(stats.failed(), 0, "{:?}", stats.errors.lock().unwrap());
    assert!(last > 100, "the counter did not carry over: {last}");
    assert!(srv.stop().success());
}

/// The state goes out when the successor starts, but the old generation
/// serves on while it drains: what it serves then follows as a final delta
/// after its drain (over the connection-migration transport), so the count
/// the service keeps is exactly the count its clients saw.
#[test]
fn served_total_is_exact_after_twenty_upgrades_under_load() {
    let mut srv = Server::start(&["--listen", "127.0.0.1:0"]);
    let addr = srv.addr();
    let load = load::Load::start_warm(addr, 2, 2, 51);
    for _ in 0..20 {
        srv.upgrade();
    }
    let last = srv.pid();
    let stats_after = load.stop();
    assert_eq!(
        stats_after.failed(),
        0,
        "{:?}",
        stats_after.errors.lock().unwrap()
    );
    let ok = stats_after.ok();
    // Each GET /stats counts itself: the n-th one sees ok + n. The last old
    // generation's delta may still be on its way.
    let mut polls = 0;
    let mut seen = 0;
    wait_until("the last delta to arrive", Duration::from_secs(30), || {
        polls += 1;
        let (pid, served) = stats(addr);
        assert_eq!(pid, last);
        seen = served;
        served == ok + polls
    });
    assert!(ok > 100, "too little load to mean anything: {ok}");
    eprintln!("served_total {seen} = {ok} OK responses + {polls} /stats");
    assert!(srv.stop().success());
}

#[test]
fn a_state_of_the_wrong_version_is_rejected_and_the_old_generation_serves() {
    let dir = TempDir::new("state-version");
    let bin = dir.path().join("server");
    let real = common::server_bin();
    install(&bin, &std::fs::read(&real).unwrap(), 0o755);
    let mut srv = Server::start_program(&bin, &["--listen", "127.0.0.1:0"]);
    let serving = srv.pid();
    let load = load::Load::start_warm(srv.addr(), 2, 2, 21);
    // A new build that reads only state version 3.
    let script = format!(
        "#!/bin/sh\nexec {} \"$@\" --state-version 3\n",
        real.display()
    );
    install(&bin, script.as_bytes(), 0o755);
    let line = srv.failed_upgrade();
    assert!(
        line.contains("rejected the state: state version 1, but this build reads version 3"),
        "{line}"
    );
    assert!(procs::zombies(serving).is_empty());
    let stats = load.stop();
    assert_eq!(stats.failed(), 0, "{:?}", stats.errors.lock().unwrap());
    assert_eq!(stats.pids(), vec![serving]);
    assert!(srv.stop().success());
}

#[test]
fn a_one_gib_state_streams_through() {
    procs::become_subreaper();
    let h = Handover::builder()
        .ready_timeout(Duration::from_secs(120))
        .build()
        .unwrap();
    let listener = h.tcp_listener("http", "127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    h.ready().unwrap();
    const SIZE: u64 = 1 << 30;
    let source = std::io::repeat(0x5a).take(SIZE);
    let t = Instant::now();
    let done = h
        .upgrade_blocking_with(
            UpgradeOptions::new()
                .program(common::server_bin())
                .args(["--listen", &addr.to_string(), "--state-version", "2"])
                .state(2, source),
        )
        .expect("upgrade with a 1 GiB state");
    let secs = t.elapsed().as_secs_f64();
    drop(listener);
    let r = load::get(addr, "/stats").unwrap();
    assert_eq!(r.pid, done.pid);
    assert!(
        r.body.contains(&format!("\"state_bytes\":{SIZE}")),
        "{}",
        r.body
    );
    // Streamed, not buffered: the successor's peak RSS stays far below 1 GiB.
    let status = std::fs::read_to_string(format!("/proc/{}/status", done.pid)).unwrap();
    let hwm_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    assert!(hwm_kb < 200 * 1024, "successor peak RSS {hwm_kb} kB");
    eprintln!(
        "1 GiB state: upgrade in {secs:.2} s ({:.0} MB/s), successor peak RSS {hwm_kb} kB",
        SIZE as f64 / secs / 1e6
    );
    procs::signal(done.pid, libc::SIGTERM).unwrap();
    assert!(
        procs::reap(done.pid, common::EVENT_TIMEOUT)
            .unwrap()
            .success()
    );
}
