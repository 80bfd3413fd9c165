//! Canary judgement on live traffic (`--probation`, `handover::canary`):
//! during the window both generations accept from the same socket, each
//! counts what it answers, and the old generation judges the canary's counts
//! against its own: a canary that answers worse is taken back (it drains)
//! within its window, a healthy one is committed after it, and the numbers
//! reach whoever asked for the upgrade (the control socket's `reload` reply).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Server, TempDir, field_u32, json, load, procs, stats, wait_until, wrapper};
use handover::control::{self, ControlError};

/// The longest a `reload` is waited for: the window, the drain, and slack.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(60);

/// Requests answered (200) by `pid` so far.
fn served_by(stats: &load::Stats, pid: u32) -> u64 {
    stats.by_pid.lock().unwrap().get(&pid).copied().unwrap_or(0)
}

/// Responses other than 200 from `pid` so far.
fn failed_by(stats: &load::Stats, pid: u32) -> u64 {
    stats
        .failed_by_pid
        .lock()
        .unwrap()
        .get(&pid)
        .copied()
        .unwrap_or(0)
}

/// The number after the first `key` in `text` (`"requests":2412`,
/// `after 1.234 s`, `of 2,412`).
fn number_after(text: &str, key: &str) -> f64 {
    let at = text
        .find(key)
        .unwrap_or_else(|| panic!("no {key:?} in {text}"));
    leading_number(&text[at + key.len()..])
        .unwrap_or_else(|| panic!("no number after {key:?} in {text}"))
}

/// The number `text` starts with (spaces and thousands separators aside).
fn leading_number(text: &str) -> Option<f64> {
    let n: String = text
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ',')
        .filter(|c| *c != ',')
        .collect();
    n.parse().ok()
}

/// A field of one generation's numbers in a `reload` reply's judgement
/// (`side`: `canary` or `baseline`).
fn reply_field(reply: &str, side: &str, field: &str) -> f64 {
    let key = format!("\"{side}\":{{\"requests\":");
    let at = reply
        .find(&key)
        .unwrap_or_else(|| panic!("no {key} in {reply}"));
    number_after(&reply[at..], &format!("\"{field}\":"))
}

/// Kills and reaps the successor `pid` (started by this test's server
/// chain, reparented to this process, the subreaper) if the test fails
/// before the chain knows it: a failed test leaves no process behind.
struct KillOnPanic(u32);

impl Drop for KillOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() && procs::exists(self.0) {
            let _ = procs::signal(self.0, libc::SIGKILL);
            let _ = procs::reap(self.0, Duration::from_secs(5));
        }
    }
}

/// The successor's pid in a `reload` reply (`{"pid":N,…`).
fn reply_pid(reply: &str) -> u32 {
    number_after(reply, "{\"pid\":") as u32
}

/// A server under `dir` with a control socket, started from a deployed
/// copy (so a test can swap the successor's build), with `args`.
fn start(dir: &Path, args: &[&str]) -> (Server, std::path::PathBuf) {
    let (bin, _) = common::deploy(dir, "server");
    let control = dir.join("control.sock");
    let mut all = vec![
        "--listen",
        "127.0.0.1:0",
        "--control",
        control.to_str().unwrap(),
        "--drain-timeout",
        "10",
    ];
    all.extend_from_slice(args);
    (Server::start_program(&bin, &all), control)
}

/// A canary that fails the judgement: rolled back within the window, with
/// the numbers in the reply; it drains and exits; the old generation serves
/// on and failed none of the requests it answered.
fn rolled_back(tag: &str, canary_flags: &str, expect: &str) -> String {
    let dir = TempDir::new(tag);
    let window = 10.0;
    let (mut srv, control) = start(dir.path(), &["--probation", "10"]);
    let old = srv.pid();
    let addr = srv.addr();
    // New connections (which either generation may accept) and keep-alive
    // ones (established before the canary: they stay with the old one).
    let load = load::Load::start_warm(addr, 4, 1, 50);

    wrapper(dir.path(), "server", canary_flags);
    let t = Instant::now();
    let reply = control::reload(&control, None, RELOAD_TIMEOUT);
    let took = t.elapsed();
    let reason = match reply {
        Err(ControlError::Failed(reason)) => reason,
        Ok(reply) => {
            let _successor = KillOnPanic(reply_pid(&reply));
            panic!("the bad canary was not rolled back: {reply}")
        }
        Err(e) => panic!("no answer to the reload: {e:?}"),
    };
    println!("reload: {reason} ({:.3} s)", took.as_secs_f64());
    let canary = field_u32(&srv.wait_line("ready", None), "pid");
    let _canary = KillOnPanic(canary);
    assert!(
        reason.contains(&format!(
            "successor (pid {canary}) failed its probation after"
        )),
        "{reason}"
    );
    assert!(reason.contains(expect), "{reason}");
    // Within its window: judged early, on clear evidence.
    let after = number_after(&reason, "failed its probation after");
    assert!(after < window, "judged after {after} s: {reason}");
    // The numbers: both generations answered at least the minimum
    // ("canary 5xx X % of N vs Y % of M").
    let counts: Vec<f64> = reason
        .split("% of")
        .skip(1)
        .map(|part| leading_number(part).unwrap_or_else(|| panic!("{reason}")))
        .collect();
    assert_eq!(counts.len(), 2, "{reason}");
    assert!(counts.iter().all(|n| *n >= 100.0), "{reason}");

    // The canary stopped accepting at once and drained on its own (nobody
    // called anything in it), and is gone; the old generation serves alone.
    let exit = srv.wait_line("exit", Some(canary));
    assert!(exit.contains("reason=rolled-back"), "{exit}");
    assert!(exit.contains("remaining=0"), "{exit}");
    wait_until("the canary to be reaped", Duration::from_secs(10), || {
        !procs::exists(canary)
    });
    assert!(procs::zombies(old).is_empty(), "zombies under {old}");
    let served_by_canary = served_by(&load.stats, canary) + failed_by(&load.stats, canary);
    assert!(served_by_canary > 0, "the canary answered nothing");
    let before = served_by(&load.stats, old);
    wait_until(
        "the old generation to serve on",
        Duration::from_secs(10),
        || served_by(&load.stats, old) > before + 100,
    );
    let canary_after = served_by(&load.stats, canary) + failed_by(&load.stats, canary);
    assert_eq!(
        canary_after, served_by_canary,
        "the canary answered after it exited"
    );

    // stats(), the metrics, the log.
    let s = stats(addr);
    assert_eq!(json(&s, "pid"), old.to_string(), "{s}");
    assert_eq!(json(&s, "upgrades_failed"), "1", "{s}");
    assert!(json(&s, "last_judgement").contains(expect), "{s}");
    let metrics = load::get(addr, "/metrics").unwrap().body;
    assert!(
        metrics.contains("handover_last_canary_verdict{verdict=")
            && metrics.contains("rolled_back=\"true\"} 1"),
        "{metrics}"
    );
    let failed = srv.wait_line("upgrade-failed", Some(old));
    assert!(failed.contains(expect), "{failed}");

    let stats = load.stop();
    // Every failed request is one the canary answered (its 500s): none of
    // the old generation's, and no connection lost.
    let errors = stats.errors.lock().unwrap().clone();
    assert_eq!(failed_by(&stats, old), 0, "{errors:?}");
    assert_eq!(
        stats.failed(),
        failed_by(&stats, canary),
        "requests failed other than the canary's answers: {errors:?}"
    );
    println!(
        "{} requests: the canary answered {} ({} with an error), the old generation {} (0 failed)",
        stats.ok() + stats.failed(),
        served_by(&stats, canary) + failed_by(&stats, canary),
        failed_by(&stats, canary),
        served_by(&stats, old)
    );
    assert!(srv.stop().success());
    reason
}

#[test]
fn a_canary_answering_a_fifth_with_500_is_rolled_back_within_its_window() {
    let reason = rolled_back(
        "canary-500",
        "--errors-percent 20",
        "; rolled back: 5xx rate",
    );
    // The rates: about a fifth for the canary, none for the old generation.
    let rate = number_after(&reason, "canary 5xx");
    assert!((15.0..=25.0).contains(&rate), "{reason}");
    assert!(reason.contains("vs 0.0 % of"), "{reason}");
}

#[test]
fn a_canary_50_ms_slower_is_rolled_back_on_p99() {
    let reason = rolled_back(
        "canary-slow",
        "--add-latency 50",
        "; rolled back: p99 latency",
    );
    // "p99 5x.x ms vs …": the canary's p99 is at least the 50 ms it adds.
    let p99 = number_after(&reason, ", p99");
    assert!(p99 >= 50.0, "{reason}");
}

#[test]
fn a_healthy_canary_is_committed_after_its_window_with_the_numbers() {
    let dir = TempDir::new("canary-ok");
    let (mut srv, control) = start(dir.path(), &["--probation", "3"]);
    let old = srv.pid();
    let addr = srv.addr();
    let load = load::Load::start_warm(addr, 4, 1, 50);

    let t = Instant::now();
    let reply = control::reload(&control, None, RELOAD_TIMEOUT).expect("the upgrade");
    let _successor = KillOnPanic(reply_pid(&reply));
    let took = t.elapsed();
    println!("reload: {reply} ({:.3} s)", took.as_secs_f64());
    assert!(
        took >= Duration::from_secs(3),
        "committed before the window"
    );
    assert!(reply.contains("\"verdict\":\"passed\""), "{reply}");
    assert!(reply.contains("\"rolled_back\":false"), "{reply}");
    assert!(reply.contains("; committed\""), "{reply}");
    // Both generations' numbers are there, with at least the minimum.
    let canary_requests = reply_field(&reply, "canary", "requests");
    let old_requests = reply_field(&reply, "baseline", "requests");
    assert!(canary_requests >= 100.0 && old_requests >= 100.0, "{reply}");
    assert!(reply.contains("\"p99_ms\":"), "{reply}");

    let ok = srv.wait_line("upgrade-ok", Some(old));
    assert!(ok.contains("judgement=canary 5xx 0.0 % of"), "{ok}");
    let new = field_u32(&ok, "successor");
    srv.finish_upgrade(old, new);
    // The judgement travelled with the commit: the new generation's stats.
    let s = stats(addr);
    assert_eq!(json(&s, "pid"), new.to_string(), "{s}");
    assert_eq!(json(&s, "upgrades_succeeded"), "1", "{s}");
    assert!(json(&s, "last_judgement").ends_with("; committed"), "{s}");
    let metrics = load::get(addr, "/metrics").unwrap().body;
    assert!(
        metrics
            .contains("handover_last_canary_verdict{verdict=\"passed\",rolled_back=\"false\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("handover_last_canary_requests{generation=\"canary\"}"),
        "{metrics}"
    );

    let stats = load.stop();
    let errors = stats.errors.lock().unwrap().clone();
    assert_eq!(stats.failed(), 0, "failed requests: {errors:?}");
    assert!(served_by(&stats, new) > 0 && served_by(&stats, old) > 0);
    assert!(srv.stop().success());
}

#[test]
fn too_little_traffic_is_not_judged_and_commits() {
    let dir = TempDir::new("canary-quiet");
    let (mut srv, control) = start(dir.path(), &["--probation", "2"]);
    let old = srv.pid();
    let addr = srv.addr();
    // A trickle: one request every 50 ms (at most 20 a second, whoever
    // answers), until the upgrade is over.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let trickle = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut answered = std::collections::BTreeMap::<u32, u64>::new();
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let r = load::get(addr, "/").expect("a request of the trickle");
                assert_eq!(r.status, 200);
                *answered.entry(r.pid).or_default() += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            answered
        })
    };
    let reply = control::reload(&control, None, RELOAD_TIMEOUT).expect("the upgrade");
    let _successor = KillOnPanic(reply_pid(&reply));
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let answered = trickle.join().unwrap();
    println!("reload: {reply}\nanswered by pid: {answered:?}");
    // Documented: fewer than the minimum (100) on either side is no
    // evidence either way; committed as without judgement, and said so.
    assert!(
        reply.contains("\"verdict\":\"too-few-requests\""),
        "{reply}"
    );
    assert!(reply.contains("requests < 100; committed\""), "{reply}");
    assert!(reply.contains("\"rolled_back\":false"), "{reply}");
    let (canary, baseline) = (
        reply_field(&reply, "canary", "requests"),
        reply_field(&reply, "baseline", "requests"),
    );
    assert!(canary + baseline > 0.0, "no traffic in the window: {reply}");
    assert!(canary < 100.0 || baseline < 100.0, "{reply}");
    let new = field_u32(&srv.wait_line("upgrade-ok", Some(old)), "successor");
    srv.finish_upgrade(old, new);
    let s = stats(addr);
    assert_eq!(json(&s, "pid"), new.to_string(), "{s}");
    assert!(json(&s, "last_judgement").contains("not judged"), "{s}");
    assert!(srv.stop().success());
}

#[test]
fn with_a_share_of_a_tenth_the_canary_takes_a_tenth_of_new_connections() {
    let dir = TempDir::new("canary-share");
    let (mut srv, control) = start(dir.path(), &["--probation", "5", "--canary-share", "0.1"]);
    let old = srv.pid();
    let addr = srv.addr();
    // One request per connection: every request is a new connection.
    let load = load::Load::start_warm(addr, 4, 0, 50);

    let reply = control::reload(&control, None, RELOAD_TIMEOUT).expect("the upgrade");
    let _successor = KillOnPanic(reply_pid(&reply));
    println!("reload: {reply}");
    let canary = reply_field(&reply, "canary", "requests");
    let mine = reply_field(&reply, "canary", "connections");
    let theirs = reply_field(&reply, "baseline", "connections");
    let share = mine / (mine + theirs);
    println!(
        "canary: {mine} of {} new connections in the window ({:.1} %), {canary} requests",
        mine + theirs,
        share * 100.0
    );
    assert!(
        mine + theirs >= 1000.0,
        "too little traffic to measure: {reply}"
    );
    assert!((0.07..=0.13).contains(&share), "share {share}: {reply}");
    assert!(reply.contains("\"verdict\":\"passed\""), "{reply}");

    let ok = srv.wait_line("upgrade-ok", Some(old));
    let new = field_u32(&ok, "successor");
    // What the clients saw agrees: the canary answered about as many
    // requests, one per connection, as it counted connections (it reports
    // every 100 ms, so a little more may come after its last report).
    let seen = served_by(&load.stats, new) as f64;
    assert!(
        seen >= mine,
        "clients saw {seen} answers from the canary, it counted {mine}"
    );
    srv.finish_upgrade(old, new);

    let stats = load.stop();
    let errors = stats.errors.lock().unwrap().clone();
    // Pacing refuses nothing: a connection the canary leaves is the old
    // generation's.
    assert_eq!(stats.failed(), 0, "failed requests: {errors:?}");
    assert!(srv.stop().success());
}
