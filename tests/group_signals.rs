//! SIGHUP to the service's process group while successors start: 200
//! `kill -HUP -- -PGID` at 1 ms intervals under load. Every generation in
//! the group upgrades or ignores it as it should; no successor dies of it
//! (each starts in a process group of its own and joins the service's in
//! `ready()`, with its handlers installed), the group never vanishes (each
//! `kill` finds it), and no request fails. A successor signalled between
//! `ready()` and its predecessor's commit refuses to upgrade (not yet
//! committed): that is the only failure allowed.

mod common;

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{EVENT_TIMEOUT, field, field_u32, load, procs, server_bin};

/// The event lines of a chain of generations, and what they say.
struct Chain {
    rx: mpsc::Receiver<String>,
    /// The generation that serves (the last successor named by an
    /// `upgrade-ok`).
    serving: u32,
    /// Every generation seen ready, and those reaped.
    started: BTreeSet<u32>,
    reaped: BTreeSet<u32>,
    upgrades: usize,
    failures: Vec<String>,
}

impl Chain {
    /// Takes in one line, if one comes within `wait`.
    fn pump(&mut self, wait: Duration) -> Option<String> {
        let line = self.rx.recv_timeout(wait).ok()?;
        let pid = field(&line, "pid").and_then(|p| p.parse::<u32>().ok());
        match line.split_whitespace().next() {
            Some("ready") => {
                self.started.insert(pid.expect("pid"));
            }
            Some("upgrade-ok") => {
                self.upgrades += 1;
                self.serving = field_u32(&line, "successor");
            }
            Some("upgrade-failed") => self.failures.push(line.clone()),
            Some("exit") => {
                let pid = pid.expect("pid");
                let status = procs::reap(pid, EVENT_TIMEOUT).expect("reap a generation");
                assert!(status.success(), "generation {pid} exited with {status}");
                self.reaped.insert(pid);
            }
            _ => {}
        }
        Some(line)
    }

    fn wait_for(&mut self, what: &str, mut done: impl FnMut(&Chain) -> bool) {
        let deadline = Instant::now() + EVENT_TIMEOUT;
        while !done(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            self.pump(Duration::from_millis(5));
        }
    }

    /// No upgrade in flight and every older generation gone: the serving
    /// generation has no child (an intermediate), and every other
    /// generation seen has exited.
    fn settled(&self) -> bool {
        procs::children(self.serving)
            .iter()
            .all(|(_, state)| *state == 'Z')
            && self
                .started
                .iter()
                .all(|p| *p == self.serving || self.reaped.contains(p))
    }
}

#[test]
fn sighup_to_the_process_group_kills_no_starting_successor() {
    procs::become_subreaper();
    // setsid(1) execs the server as the leader of a new session and process
    // group (the test's own group must not get the signals).
    let mut child = Command::new("setsid")
        .arg(server_bin())
        .args(["--listen", "127.0.0.1:0", "--drain-timeout", "5"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn setsid http_server");
    let first = child.id();
    let rx = procs::line_channel(child.stdout.take().expect("piped"));
    let mut chain = Chain {
        rx,
        serving: first,
        started: BTreeSet::new(),
        reaped: BTreeSet::new(),
        upgrades: 0,
        failures: Vec::new(),
    };
    let ready = loop {
        let line = chain.pump(EVENT_TIMEOUT).expect("a ready line");
        if line.starts_with("ready ") {
            break line;
        }
    };
    let addr = field(&ready, "addr")
        .expect("addr")
        .parse()
        .expect("address");
    let pgid = first as libc::pid_t;
    let load = load::Load::start_warm(addr, 2, 2, 21);

    let storm = std::thread::spawn(move || {
        for _ in 0..200 {
            // SAFETY: kill takes a process group id and a signal; the group
            // is the one the server we started leads.
            assert_eq!(unsafe { libc::kill(-pgid, libc::SIGHUP) }, 0);
            std::thread::sleep(Duration::from_millis(1)); // pacing, not synchronisation
        }
    });
    while !storm.is_finished() {
        chain.pump(Duration::from_millis(5));
    }
    storm.join().unwrap();
    // Let what the storm started finish (a delivered SIGHUP starts its
    // upgrade within milliseconds): settled for 300 ms in a row.
    let mut since: Option<Instant> = None;
    chain.wait_for("the chain to settle", |c| {
        match (c.settled(), since) {
            (false, _) => since = None,
            (true, None) => since = Some(Instant::now()),
            (true, Some(t)) => return t.elapsed() >= Duration::from_millis(300),
        }
        false
    });
    let during_storm = chain.upgrades;

    // The service still upgrades on a plain SIGHUP, then stops.
    let before = chain.serving;
    procs::signal(before, libc::SIGHUP).unwrap();
    chain.wait_for("one more upgrade", |c| c.serving != before);
    let last = chain.serving;
    chain.wait_for("the old generation to exit", |c| c.reaped.contains(&before));
    let stats = load.stop();
    procs::signal(last, libc::SIGTERM).unwrap();
    chain.wait_for("the last generation to exit", |c| c.reaped.contains(&last));
    let _ = child.try_wait();

    let by_sighup = chain
        .failures
        .iter()
        .filter(|l| l.contains("SIGHUP"))
        .count();
    let (refused, failed): (Vec<&String>, Vec<&String>) = chain
        .failures
        .iter()
        .partition(|l| l.contains("has not committed the handover"));
    let first: Vec<&&String> = failed.iter().take(5).collect();
    eprintln!(
        "{during_storm} upgrades during 200 group SIGHUPs; {} requests ok; {} refused before the commit; {} failed upgrades ({by_sighup} of SIGHUP), first: {first:?}",
        stats.ok(),
        refused.len(),
        failed.len(),
    );
    assert!(during_storm >= 1, "the storm upgraded nothing");
    assert_eq!(by_sighup, 0, "successors died of SIGHUP: {first:?}");
    assert!(failed.is_empty(), "{first:?}");
    assert_eq!(stats.failed(), 0, "{:?}", stats.errors.lock().unwrap());
}
