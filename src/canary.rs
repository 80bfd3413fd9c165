//! Canary judgement: during a probation window
//! ([`UpgradeOptions::probation`](crate::UpgradeOptions::probation)) both
//! generations accept on the same sockets, so they serve the same traffic at
//! the same time — same host, same minute, same clients. Each counts what it
//! answers ([`Recorder`]; [`serve::Server`](crate::serve::Server) does it by
//! itself), the successor (the canary) sends its counts to the old generation
//! over the channel every 100 ms, and the old generation judges them against
//! its own ([`Policy`]): it takes the service back when the canary does worse
//! beyond the policy's bounds, and commits otherwise. The outcome, with its
//! numbers, is a [`Judgement`].
//!
//! # What is counted
//!
//! Per generation, from the start of the window (for the canary: from
//! `ready()`):
//!
//! - **requests**: responses, and requests that failed without one (the
//!   service returned an error; a connection failed in the serving layer);
//! - **errors**: of those, the responses with a 5xx status and the failures;
//! - **latency**: from the service's call to its response head, in a
//!   log-linear histogram (8 buckets per power of two, 1 µs to 71 min:
//!   quantiles within 12.5 %);
//! - **connections** accepted (for [`Policy::share`]).
//!
//! Recording costs one relaxed atomic load per request outside a window,
//! and in a window two clock reads and three atomic additions.
//!
//! # The decision
//!
//! With `n` the requests of each generation, the canary is rolled back when,
//! with at least [`Policy::min_requests`] requests on each side:
//!
//! - its **error rate** exceeds the old generation's by more than
//!   [`Policy::max_error_increase`] (default 1 percentage point), and the
//!   difference is clear: a two-proportion z-test gives z ≥ 3;
//! - or its **p99 latency** exceeds the old generation's p99 ×
//!   [`Policy::max_p99`] (default × 1.5 + 10
//!   ms), and the share of its requests slower than that bound exceeds the
//!   old generation's share clearly (z ≥ 3);
//! - or the application's own [`Policy::check`] says so (at any time).
//!
//! The judgement is made at the end of the window; it stops the window
//! early, rolling back at once, when the evidence is already clear (z ≥ 5,
//! every time a report arrives). A canary is never
//! committed early: the window also watches for crashes and
//! [`Handover::report_unhealthy`](crate::Handover::report_unhealthy).
//!
//! **Too few requests** (either side below the minimum at the end of the
//! window) is no evidence either way: the canary is committed, as without
//! judgement, and the judgement says so ([`Verdict::TooFewRequests`]:
//! "not judged: canary 12 requests < 100"). So is a canary that sent no
//! counts (an older build: [`Verdict::NoCounts`]).
//!
//! # A share of the traffic
//!
//! Without [`Policy::share`], the canary gets whatever share of new
//! connections the kernel's accept wake-ups give it (about half, with both
//! generations idle in `accept`). With a share, the canary paces its own
//! accepts against the old generation's, which the old generation reports
//! every 100 ms: it accepts a new connection only while its count stays
//! within the share of all connections accepted in the window; the old
//! generation accepts the rest. Nothing is moved or refused: a connection
//! the canary leaves waits in the shared accept queue for the old
//! generation. Connections already established stay where they are. The
//! share counts the connections the old generation's serving layer (or
//! [`Recorder::connection`]) counts: an old generation that counts none
//! leaves the canary none.
//!
//! # Rolling back loses nothing
//!
//! A canary judged worse is taken back as one that reported itself
//! unhealthy: the old generation tells it (`A` on the channel), and the
//! canary's drain starts by itself — [`serve::Server`](crate::serve::Server)
//! stops accepting at once, finishes the requests in flight and answers the
//! next request on each keep-alive connection with `Connection: close`
//! (the lame duck), so its clients come back on new connections, which the
//! old generation accepts. Its connections are not handed back to the old
//! generation: they end on their own within the drain. The old generation
//! waits for the canary to exit (at most its drain timeout, then kills it)
//! before the upgrade returns its error.
//!
//! # What one host cannot see
//!
//! The baseline is as good as it gets — same host, same minute, same
//! clients — but it is one host: a canary that overloads a shared database,
//! fills a disk, or fails only on another machine's hardware looks healthy
//! here; errors the clients see but the server does not (a proxy's
//! timeout, a broken response body) are not counted; and with the kernel's
//! split (no share) a window's traffic is small for a service with little
//! of it, so the judgement needs a window long enough for
//! [`Policy::min_requests`]. The counts are HTTP's (5xx); an application
//! serving another protocol records its own with a [`Recorder`], and adds
//! checks of its own with [`Policy::check`].

use std::fmt::{self, Write as _};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

/// Buckets of the latency histogram: 8 exact ones (0–7 µs), then 8 per
/// power of two up to 2³² µs.
pub(crate) const BUCKETS: usize = 240;
/// Sub-buckets per power of two, as a shift.
const SUB_BITS: u32 = 3;
/// The largest latency the histogram tells apart (about 71 minutes).
const MAX_US: u64 = (1 << 32) - 1;

/// How often the canary reports its counts, and the old generation its
/// accepted connections (with a share).
pub(crate) const REPORT_EVERY: Duration = Duration::from_millis(100);

/// The z-score a difference must reach at the end of the window.
const Z_FINAL: f64 = 3.0;
/// The z-score a difference must reach to stop the window early.
const Z_EARLY: f64 = 5.0;

/// The bucket of a latency of `us` microseconds.
fn bucket_of(us: u64) -> usize {
    let v = us.min(MAX_US);
    if v < 8 {
        return v as usize;
    }
    let msb = 63 - v.leading_zeros(); // >= 3
    let sub = (v >> (msb - SUB_BITS)) & 7;
    (8 + (msb - SUB_BITS) * 8) as usize + sub as usize
}

/// The lowest latency (µs) of bucket `i`.
fn bucket_low(i: usize) -> u64 {
    if i < 8 {
        return i as u64;
    }
    let octave = ((i - 8) / 8) as u32;
    let sub = ((i - 8) % 8) as u64;
    (8 + sub) << octave
}

/// The lowest latency (µs) above bucket `i`.
fn bucket_high(i: usize) -> u64 {
    if i < 8 {
        return i as u64 + 1;
    }
    bucket_low(i) + (1 << ((i - 8) / 8))
}

/// A generation's counts during a probation window (see the
/// [module documentation](self) for what is counted).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Counts {
    /// Requests answered, or failed without an answer.
    pub requests: u64,
    /// Of them: answered with a 5xx status, or failed.
    pub errors: u64,
    /// Connections accepted.
    pub connections: u64,
    /// Latency histogram (empty: all zero).
    latency: Vec<u64>,
}

impl Counts {
    /// `errors / requests` (0 without requests).
    pub fn error_rate(&self) -> f64 {
        ratio(self.errors, self.requests)
    }

    /// Responses with a latency recorded.
    pub(crate) fn timed(&self) -> u64 {
        self.latency.iter().fold(0u64, |a, c| a.saturating_add(*c))
    }

    /// The latency below which a share `q` (0 to 1) of the timed responses
    /// fall, as the upper bound of its histogram bucket (within 12.5 %);
    /// `None` without timed responses.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let n = self.timed();
        if n == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * n as f64).ceil() as u64).clamp(1, n);
        let mut seen = 0u64;
        for (i, c) in self.latency.iter().enumerate() {
            seen = seen.saturating_add(*c);
            if seen >= rank {
                return Some(Duration::from_micros(bucket_high(i)));
            }
        }
        None
    }

    /// The median latency; see [`quantile`](Self::quantile).
    pub(crate) fn p50(&self) -> Option<Duration> {
        self.quantile(0.5)
    }

    /// The 99th percentile latency; see [`quantile`](Self::quantile).
    pub(crate) fn p99(&self) -> Option<Duration> {
        self.quantile(0.99)
    }

    /// Timed responses slower than `bound` (those in buckets wholly above
    /// it).
    pub(crate) fn slower_than(&self, bound: Duration) -> u64 {
        let us = bound.as_micros().min(u64::MAX as u128) as u64;
        self.latency
            .iter()
            .enumerate()
            .filter(|(i, _)| bucket_low(*i) > us)
            .fold(0u64, |a, (_, c)| a.saturating_add(*c))
    }

    /// The numbers a [`Judgement`] shows.
    pub(crate) fn summary(&self) -> Summary {
        Summary {
            requests: self.requests,
            errors: self.errors,
            connections: self.connections,
            p50: self.p50(),
            p99: self.p99(),
        }
    }
}

fn ratio(x: u64, n: u64) -> f64 {
    if n == 0 { 0.0 } else { x as f64 / n as f64 }
}

/// Counts what one generation answers during a probation window: the
/// generation's own, from [`Handover::canary`](crate::Handover::canary).
///
/// [`serve::Server`](crate::serve::Server) records every response, failure
/// and accepted connection by itself. An application that serves otherwise
/// records its own with [`response`](Self::response),
/// [`failure`](Self::failure) and [`connection`](Self::connection); outside
/// a window they do nothing (one atomic load), so they may be called for
/// every request. Cheap to clone; clones share the counts.
#[derive(Clone)]
pub struct Recorder(Arc<Inner>);

struct Inner {
    active: AtomicBool,
    /// Counting as the canary (from `ready()` to the end of its window),
    /// not as an old generation judging one.
    as_canary: AtomicBool,
    requests: AtomicU64,
    errors: AtomicU64,
    connections: AtomicU64,
    latency: Box<[AtomicU64]>,
    /// The canary's share of new connections, in millionths; 0: no pacing.
    share_ppm: AtomicU32,
    /// Connections the other generation accepted in the window, as last
    /// reported.
    others: AtomicU64,
    /// Woken when the pacing changes.
    #[cfg(feature = "tokio")]
    paced: tokio::sync::Notify,
}

impl fmt::Debug for Recorder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Recorder")
            .field("active", &self.is_active())
            .field("counts", &self.snapshot())
            .finish()
    }
}

impl Recorder {
    pub(crate) fn new() -> Recorder {
        Recorder(Arc::new(Inner {
            active: AtomicBool::new(false),
            as_canary: AtomicBool::new(false),
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            latency: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            share_ppm: AtomicU32::new(0),
            others: AtomicU64::new(0),
            #[cfg(feature = "tokio")]
            paced: tokio::sync::Notify::new(),
        }))
    }

    /// Whether a probation window is being counted now.
    pub(crate) fn is_active(&self) -> bool {
        self.0.active.load(Ordering::Relaxed)
    }

    /// A response with `status` was made `latency` after the request came
    /// to the service.
    pub fn response(&self, status: u16, latency: Duration) {
        if !self.is_active() {
            return;
        }
        let i = &self.0;
        i.requests.fetch_add(1, Ordering::Relaxed);
        if status >= 500 {
            i.errors.fetch_add(1, Ordering::Relaxed);
        }
        let us = latency.as_micros().min(u64::MAX as u128) as u64;
        i.latency[bucket_of(us)].fetch_add(1, Ordering::Relaxed);
    }

    /// A request failed without a response (the service returned an error,
    /// the connection failed).
    pub fn failure(&self) {
        if !self.is_active() {
            return;
        }
        self.0.requests.fetch_add(1, Ordering::Relaxed);
        self.0.errors.fetch_add(1, Ordering::Relaxed);
    }

    /// A connection was accepted.
    pub fn connection(&self) {
        if self.is_active() {
            self.0.connections.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The counts so far.
    pub fn snapshot(&self) -> Counts {
        let i = &self.0;
        let mut latency: Vec<u64> = i
            .latency
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        if latency.iter().all(|c| *c == 0) {
            latency.clear();
        }
        Counts {
            requests: i.requests.load(Ordering::Relaxed),
            errors: i.errors.load(Ordering::Relaxed),
            connections: i.connections.load(Ordering::Relaxed),
            latency,
        }
    }

    /// Starts counting from zero.
    pub(crate) fn begin(&self) {
        let i = &self.0;
        i.requests.store(0, Ordering::Relaxed);
        i.errors.store(0, Ordering::Relaxed);
        i.connections.store(0, Ordering::Relaxed);
        for c in i.latency.iter() {
            c.store(0, Ordering::Relaxed);
        }
        i.others.store(0, Ordering::Relaxed);
        i.active.store(true, Ordering::Relaxed);
    }

    /// Starts counting from zero as the canary.
    pub(crate) fn begin_canary(&self) {
        self.begin();
        self.0.as_canary.store(true, Ordering::Relaxed);
    }

    /// Ends the canary's window, if it counts as one (not the window of
    /// an upgrade of its own, later).
    pub(crate) fn end_canary(&self) {
        if self.0.as_canary.swap(false, Ordering::Relaxed) {
            self.end();
        }
    }

    /// Stops counting (the counts stay) and pacing.
    pub(crate) fn end(&self) {
        self.0.active.store(false, Ordering::Relaxed);
        self.0.share_ppm.store(0, Ordering::Relaxed);
        #[cfg(feature = "tokio")]
        self.0.paced.notify_waiters();
    }

    /// The old generation's pacing report: the canary's share (ppm) and the
    /// connections the old generation accepted in the window.
    pub(crate) fn pace(&self, share_ppm: u32, others: u64) {
        if !self.is_active() {
            return;
        }
        self.0.others.fetch_max(others, Ordering::Relaxed);
        self.0
            .share_ppm
            .store(share_ppm.min(PPM - 1), Ordering::Relaxed);
        #[cfg(feature = "tokio")]
        self.0.paced.notify_waiters();
    }

    /// Whether a connection may be accepted now: always, unless this
    /// generation paces its accepts (a canary with a share), and accepting
    /// one more would take it past its share of the connections accepted
    /// in the window.
    #[cfg_attr(not(feature = "http"), allow(dead_code))]
    pub(crate) fn admitted(&self) -> bool {
        let i = &self.0;
        let ppm = i.share_ppm.load(Ordering::Relaxed);
        if ppm == 0 {
            return true;
        }
        let mine = i.connections.load(Ordering::Relaxed) as u128 + 1;
        let theirs = i.others.load(Ordering::Relaxed) as u128;
        // (mine + 1) / (mine + 1 + theirs) <= share
        mine * u128::from(PPM - ppm) <= u128::from(ppm) * theirs
    }

    /// Waits until [`admitted`](Self::admitted).
    #[cfg(feature = "http")]
    pub(crate) async fn admit(&self) {
        if self.admitted() {
            return; // no pacing: one atomic load
        }
        loop {
            let paced = self.0.paced.notified();
            tokio::pin!(paced);
            paced.as_mut().enable();
            if self.admitted() {
                return;
            }
            paced.await;
        }
    }
}

/// Millionths.
pub(crate) const PPM: u32 = 1_000_000;

/// The application's own check over both generations' counts.
type Check = Arc<dyn Fn(&Counts, &Counts) -> Result<(), String> + Send + Sync>;

/// How a canary is judged during its probation window; see the
/// [module documentation](self). Given to
/// [`UpgradeOptions::canary`](crate::UpgradeOptions::canary). The defaults
/// are meant to be used as they are.
#[derive(Clone)]
#[must_use]
pub struct Policy {
    pub(crate) judge: bool,
    pub(crate) min_requests: u64,
    pub(crate) max_error_increase: f64,
    pub(crate) max_p99_ratio: f64,
    pub(crate) p99_slack: Duration,
    pub(crate) early_stop: bool,
    pub(crate) share: Option<f64>,
    pub(crate) check: Option<Check>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            judge: true,
            min_requests: 100,
            max_error_increase: 0.01,
            max_p99_ratio: 1.5,
            p99_slack: Duration::from_millis(10),
            early_stop: true,
            share: None,
            check: None,
        }
    }
}

impl fmt::Debug for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Policy")
            .field("judge", &self.judge)
            .field("min_requests", &self.min_requests)
            .field("max_error_increase", &self.max_error_increase)
            .field("max_p99_ratio", &self.max_p99_ratio)
            .field("p99_slack", &self.p99_slack)
            .field("early_stop", &self.early_stop)
            .field("share", &self.share)
            .field("check", &self.check.is_some())
            .finish()
    }
}

impl Policy {
    /// The defaults: judged, at least 100 requests each, error rate at most
    /// 1 point worse, p99 at most × 1.5 + 10 ms, early stop on, no share.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the counts are judged at all. Off, a probation window rolls
    /// back only when the successor exits or reports itself unhealthy.
    /// Default: on.
    pub fn judge(mut self, on: bool) -> Self {
        self.judge = on;
        self
    }

    /// The fewest requests each generation must have answered in the
    /// window for the counts to be judged; with fewer, the canary is
    /// committed unjudged ([`Verdict::TooFewRequests`]). Default: 100.
    pub fn min_requests(mut self, n: u64) -> Self {
        self.min_requests = n;
        self
    }

    /// How much higher (absolute, 0 to 1) the canary's error rate may be
    /// than the old generation's. Default: 0.01 (one percentage point).
    pub fn max_error_increase(mut self, increase: f64) -> Self {
        self.max_error_increase = increase;
        self
    }

    /// The p99 bound: the canary's p99 may be at most `ratio` times the old
    /// generation's (at least 1) plus `slack` (which keeps the noise of a
    /// fast service's tail from rolling back a good build). Default: 1.5
    /// and 10 ms.
    pub fn max_p99(mut self, ratio: f64, slack: Duration) -> Self {
        self.max_p99_ratio = ratio;
        self.p99_slack = slack;
        self
    }

    /// The canary's share of new connections during the window, between 0
    /// and 1 exclusive (0.1: one in ten): the canary paces its accepts
    /// against the old generation's (see the
    /// [module documentation](self)). Default: none, the kernel's split.
    pub fn share(mut self, share: f64) -> Self {
        self.share = Some(share);
        self
    }

    /// The application's own check, called with the canary's counts and the
    /// old generation's at every report (every 100 ms) and at the end of
    /// the window: `Err(reason)` rolls the canary back at once, with the
    /// reason in the judgement. Called even with too few requests.
    pub fn check<F>(mut self, check: F) -> Self
    where
        F: Fn(&Counts, &Counts) -> Result<(), String> + Send + Sync + 'static,
    {
        self.check = Some(Arc::new(check));
        self
    }

    /// `Err((setting, reason))` for a value out of range.
    pub(crate) fn validate(&self) -> Result<(), (&'static str, String)> {
        let e = self.max_error_increase;
        if !(0.0..=1.0).contains(&e) {
            return Err((
                "canary.max_error_increase",
                format!("{e} is not between 0 and 1"),
            ));
        }
        let r = self.max_p99_ratio;
        if !(r >= 1.0 && r.is_finite()) {
            return Err((
                "canary.max_p99_ratio",
                format!("{r} is not a finite number >= 1"),
            ));
        }
        crate::clock::check_setting(self.p99_slack, true)
            .map_err(|reason| ("canary.p99_slack", reason))?;
        if let Some(s) = self.share {
            if !(s > 0.0 && s < 1.0) {
                return Err((
                    "canary.share",
                    format!("{s} is not between 0 and 1 (exclusive)"),
                ));
            }
        }
        Ok(())
    }

    /// The share in millionths, if pacing.
    pub(crate) fn share_ppm(&self) -> Option<u32> {
        let s = self.share?;
        Some(((s * f64::from(PPM)).round() as u32).clamp(1, PPM - 1))
    }

    /// The application's check, as a rollback verdict.
    fn checked(&self, canary: &Counts, old: &Counts) -> Option<Verdict> {
        let check = self.check.as_ref()?;
        check(canary, old).err().map(Verdict::Check)
    }

    /// A rollback verdict from the rules, judged with `z` as the bar;
    /// `None` if the counts do not show the canary worse (or are too few).
    fn worse(&self, canary: &Counts, old: &Counts, z: f64) -> Option<Verdict> {
        if canary.requests < self.min_requests || old.requests < self.min_requests {
            return None;
        }
        let (rc, ro) = (canary.error_rate(), old.error_rate());
        if rc - ro > self.max_error_increase
            && z_worse(canary.errors, canary.requests, old.errors, old.requests) >= z
        {
            return Some(Verdict::ErrorRate);
        }
        let (Some(pc), Some(po)) = (canary.p99(), old.p99()) else {
            return None;
        };
        let bound = po
            .mul_f64(self.max_p99_ratio)
            .saturating_add(self.p99_slack);
        if pc > bound {
            let (sc, so) = (canary.slower_than(bound), old.slower_than(bound));
            if z_worse(sc, canary.timed(), so, old.timed()) >= z {
                return Some(Verdict::Latency);
            }
        }
        None
    }
}

/// How much worse (in standard errors) proportion `xc / nc` is than
/// `xo / no`: the two-proportion z statistic (0 when they cannot be told
/// apart).
fn z_worse(xc: u64, nc: u64, xo: u64, no: u64) -> f64 {
    if nc == 0 || no == 0 {
        return 0.0;
    }
    let (xc, nc, xo, no) = (xc.min(nc) as f64, nc as f64, xo.min(no) as f64, no as f64);
    let pooled = (xc + xo) / (nc + no);
    let var = pooled * (1.0 - pooled) * (1.0 / nc + 1.0 / no);
    if var <= 0.0 {
        return 0.0;
    }
    (xc / nc - xo / no) / var.sqrt()
}

/// The numbers of one generation in a [`Judgement`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Summary {
    /// Requests answered, or failed without an answer.
    pub requests: u64,
    /// Of them: 5xx responses and failures.
    pub errors: u64,
    /// Connections accepted.
    pub connections: u64,
    /// The median latency (response head), if any response was timed.
    pub p50: Option<Duration>,
    /// The 99th percentile latency, if any response was timed.
    pub p99: Option<Duration>,
}

impl Summary {
    /// `errors / requests` (0 without requests).
    pub(crate) fn error_rate(&self) -> f64 {
        ratio(self.errors, self.requests)
    }
}

/// What the judgement decided.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Verdict {
    /// Judged and within the bounds: committed.
    Passed,
    /// Not judged: a generation answered fewer requests than the minimum
    /// (given) in the window. Committed, as without judgement.
    TooFewRequests {
        /// [`Policy::min_requests`].
        min: u64,
    },
    /// Not judged: the canary sent no counts (an older build). Committed,
    /// as without judgement.
    NoCounts,
    /// Rolled back: the canary's error rate is worse beyond the bound.
    ErrorRate,
    /// Rolled back: the canary's p99 latency is worse beyond the bound.
    Latency,
    /// Rolled back by the application's check ([`Policy::check`]), for
    /// this reason.
    Check(String),
}

impl Verdict {
    /// Whether the canary was rolled back.
    pub(crate) fn rolled_back(&self) -> bool {
        matches!(
            self,
            Verdict::ErrorRate | Verdict::Latency | Verdict::Check(_)
        )
    }

    /// A short name: `passed`, `too-few-requests`, `no-counts`,
    /// `error-rate`, `latency`, `check` (for metrics labels): its
    /// `Display`.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Verdict::Passed => "passed",
            Verdict::TooFewRequests { .. } => "too-few-requests",
            Verdict::NoCounts => "no-counts",
            Verdict::ErrorRate => "error-rate",
            Verdict::Latency => "latency",
            Verdict::Check(_) => "check",
        }
    }
}

impl fmt::Display for Verdict {
    /// The short name: `passed`, `too-few-requests`, `no-counts`,
    /// `error-rate`, `latency`, `check` (for metrics labels).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The outcome of a canary's judgement, with both generations' numbers.
/// Its `Display` is the one line an operator reads ("canary 5xx 19.8 % of
/// 2,412 vs 0.1 % of 2,377, p99 1.2 ms vs 0.9 ms; rolled back: 5xx rate").
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Judgement {
    /// The decision.
    pub verdict: Verdict,
    /// The canary's numbers.
    pub canary: Summary,
    /// The old generation's numbers over the same time.
    pub baseline: Summary,
}

impl Judgement {
    /// Whether the canary was rolled back.
    pub fn rolled_back(&self) -> bool {
        self.verdict.rolled_back()
    }
}

impl fmt::Display for Judgement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (c, o) = (&self.canary, &self.baseline);
        write!(
            f,
            "canary 5xx {} of {} vs {} of {}, p99 {} vs {}",
            percent(c.error_rate()),
            thousands(c.requests),
            percent(o.error_rate()),
            thousands(o.requests),
            latency(c.p99),
            latency(o.p99),
        )?;
        if c.connections > 0 || o.connections > 0 {
            let share = ratio(c.connections, c.connections + o.connections);
            write!(
                f,
                ", connections {} vs {} ({} to the canary)",
                thousands(c.connections),
                thousands(o.connections),
                percent(share)
            )?;
        }
        match &self.verdict {
            Verdict::Passed => f.write_str("; committed"),
            Verdict::TooFewRequests { min } => {
                let (who, n) = if c.requests < *min {
                    ("canary", c.requests)
                } else {
                    ("old generation", o.requests)
                };
                write!(
                    f,
                    "; not judged: {who} {} requests < {}; committed",
                    thousands(n),
                    thousands(*min)
                )
            }
            Verdict::NoCounts => f.write_str("; not judged: no counts from the canary; committed"),
            Verdict::ErrorRate => f.write_str("; rolled back: 5xx rate"),
            Verdict::Latency => f.write_str("; rolled back: p99 latency"),
            Verdict::Check(reason) => write!(f, "; rolled back: {reason}"),
        }
    }
}

/// `2,412`
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// `19.8 %`
fn percent(r: f64) -> String {
    format!("{:.1} %", r * 100.0)
}

/// `850 µs`, `1.2 ms`, `250 ms`, `n/a`
fn latency(d: Option<Duration>) -> String {
    match d {
        None => "n/a".to_owned(),
        Some(d) if d < Duration::from_millis(1) => format!("{} µs", d.as_micros()),
        Some(d) if d < Duration::from_millis(100) => format!("{:.1} ms", d.as_secs_f64() * 1e3),
        Some(d) => format!("{:.0} ms", d.as_secs_f64() * 1e3),
    }
}

/// The old generation's side of a judgement during one window.
pub(crate) struct Judging {
    policy: Policy,
    own: Recorder,
    /// The canary's latest counts, and ours when they arrived.
    latest: Option<(Counts, Counts)>,
}

impl Judging {
    /// Starts counting this generation's own traffic for the window.
    pub(crate) fn begin(policy: Policy, own: Recorder) -> Judging {
        own.begin();
        Judging {
            policy,
            own,
            latest: None,
        }
    }

    /// The pacing report for the canary, if it paces: `(share_ppm,
    /// accepted)`.
    pub(crate) fn pacing(&self) -> Option<(u32, u64)> {
        let share = self.policy.share_ppm()?;
        Some((share, self.own.snapshot().connections))
    }

    /// Takes in the canary's counts; `Some` if they decide a rollback now
    /// (the application's check, or clear evidence with early stop on).
    pub(crate) fn report(&mut self, canary: Counts) -> Option<Judgement> {
        let own = self.own.snapshot();
        if !self.policy.judge {
            return None;
        }
        let verdict = self.policy.checked(&canary, &own).or_else(|| {
            self.policy
                .early_stop
                .then(|| self.policy.worse(&canary, &own, Z_EARLY))
                .flatten()
        });
        let judgement = verdict.map(|verdict| Judgement {
            verdict,
            canary: canary.summary(),
            baseline: own.summary(),
        });
        self.latest = Some((canary, own));
        judgement
    }

    /// The judgement at the end of the window (`None` when judging is off).
    pub(crate) fn conclude(&self) -> Option<Judgement> {
        if !self.policy.judge {
            return None;
        }
        let (canary, own) = match &self.latest {
            Some((c, o)) => (c.clone(), o.clone()),
            None => (Counts::default(), self.own.snapshot()),
        };
        let p = &self.policy;
        let verdict = p
            .checked(&canary, &own)
            .or_else(|| p.worse(&canary, &own, Z_FINAL))
            .unwrap_or_else(|| {
                if self.latest.is_none() {
                    Verdict::NoCounts
                } else if canary.requests < p.min_requests || own.requests < p.min_requests {
                    Verdict::TooFewRequests {
                        min: p.min_requests,
                    }
                } else {
                    Verdict::Passed
                }
            });
        Some(Judgement {
            verdict,
            canary: canary.summary(),
            baseline: own.summary(),
        })
    }
}

impl Drop for Judging {
    fn drop(&mut self) {
        self.own.end();
    }
}

// ---- wire forms (see `channel`) ----

/// The fields of a counts report (`P`): ` n=REQUESTS e=ERRORS c=CONNECTIONS
/// h=BUCKET:COUNT,…` (buckets ascending, zeros left out).
pub(crate) fn encode_counts(c: &Counts) -> String {
    let mut s = format!(" n={} e={} c={}", c.requests, c.errors, c.connections);
    let mut first = true;
    for (i, n) in c.latency.iter().enumerate().filter(|(_, n)| **n > 0) {
        s.push_str(if first { " h=" } else { "," });
        first = false;
        let _ = write!(s, "{i}:{n}");
    }
    s
}

/// Parses the fields of a counts report. Unknown fields are skipped (a
/// newer sender may add some); malformed ones, and buckets out of range or
/// out of order, are refused.
pub(crate) fn decode_counts(text: &str) -> Result<Counts, String> {
    let mut c = Counts::default();
    for field in text.split(' ').filter(|f| !f.is_empty()) {
        let (key, value) = field
            .split_once('=')
            .ok_or_else(|| format!("field {field:?} has no '='"))?;
        let number = |v: &str| {
            v.parse::<u64>()
                .map_err(|_| format!("field {key:?}: {v:?} is not a number"))
        };
        match key {
            "n" => c.requests = number(value)?,
            "e" => c.errors = number(value)?,
            "c" => c.connections = number(value)?,
            "h" => {
                let mut latency = vec![0u64; BUCKETS];
                let mut last: Option<usize> = None;
                for pair in value.split(',') {
                    let (i, n) = pair
                        .split_once(':')
                        .ok_or_else(|| format!("histogram entry {pair:?} has no ':'"))?;
                    let i = number(i)? as usize;
                    if i >= BUCKETS || last.is_some_and(|l| i <= l) {
                        return Err(format!("histogram bucket {i} out of range or order"));
                    }
                    last = Some(i);
                    latency[i] = number(n)?;
                }
                if latency.iter().any(|n| *n > 0) {
                    c.latency = latency;
                }
            }
            _ if !key.is_empty() && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') => {
            }
            _ => return Err(format!("field name {key:?} is malformed")),
        }
    }
    if c.errors > c.requests {
        return Err(format!("{} errors of {} requests", c.errors, c.requests));
    }
    Ok(c)
}

/// The fields a commit (`C`) carries about the judgement of the upgrade.
pub(crate) fn encode_judgement(j: &Judgement, s: &mut String) {
    let verdict = match &j.verdict {
        Verdict::Passed => "passed",
        Verdict::TooFewRequests { .. } => "few",
        Verdict::NoCounts => "none",
        // A rollback never commits: nothing to carry.
        _ => return,
    };
    let _ = write!(s, " canary={verdict}");
    if let Verdict::TooFewRequests { min } = j.verdict {
        let _ = write!(s, " canary_min={min}");
    }
    for (side, m) in [("c", &j.canary), ("b", &j.baseline)] {
        let _ = write!(
            s,
            " {side}_requests={} {side}_errors={} {side}_connections={}",
            m.requests, m.errors, m.connections
        );
        for (name, d) in [("p50", m.p50), ("p99", m.p99)] {
            if let Some(d) = d {
                let _ = write!(s, " {side}_{name}_us={}", d.as_micros());
            }
        }
    }
}

/// One field of a commit's judgement: `Ok(true)` if `key` is one.
pub(crate) fn decode_judgement_field(
    key: &str,
    value: &str,
    j: &mut Option<Box<Judgement>>,
) -> Result<bool, String> {
    let number = || {
        value
            .parse::<u64>()
            .map_err(|_| format!("field {key:?}: {value:?} is not a number"))
    };
    if key == "canary" {
        let verdict = match value {
            "passed" => Verdict::Passed,
            "few" => Verdict::TooFewRequests { min: 0 },
            "none" => Verdict::NoCounts,
            _ => return Ok(true), // a verdict of a newer version
        };
        *j = Some(Box::new(Judgement {
            verdict,
            canary: Summary::default(),
            baseline: Summary::default(),
        }));
        return Ok(true);
    }
    let Some(judgement) = j.as_mut() else {
        return Ok(false);
    };
    if key == "canary_min" {
        if let Verdict::TooFewRequests { min } = &mut judgement.verdict {
            *min = number()?;
        }
        return Ok(true);
    }
    let (summary, field) = match key.split_once('_') {
        Some(("c", f)) => (&mut judgement.canary, f),
        Some(("b", f)) => (&mut judgement.baseline, f),
        _ => return Ok(false),
    };
    match field {
        "requests" => summary.requests = number()?,
        "errors" => summary.errors = number()?,
        "connections" => summary.connections = number()?,
        "p50_us" => summary.p50 = Some(Duration::from_micros(number()?)),
        "p99_us" => summary.p99 = Some(Duration::from_micros(number()?)),
        _ => return Ok(false),
    }
    Ok(true)
}

/// The fields of a pacing report (`S`): ` share=PPM accepted=N`.
pub(crate) fn encode_pacing(share_ppm: u32, accepted: u64) -> String {
    format!(" share={share_ppm} accepted={accepted}")
}

/// Parses the fields of a pacing report.
pub(crate) fn decode_pacing(text: &str) -> Result<(u32, u64), String> {
    let (mut share, mut accepted) = (None, None);
    for field in text.split(' ').filter(|f| !f.is_empty()) {
        let (key, value) = field
            .split_once('=')
            .ok_or_else(|| format!("field {field:?} has no '='"))?;
        let bad = || format!("field {key:?}: {value:?} is not a number");
        match key {
            "share" => {
                share = Some(
                    value
                        .parse::<u32>()
                        .ok()
                        .filter(|s| (1..PPM).contains(s))
                        .ok_or_else(bad)?,
                )
            }
            "accepted" => accepted = Some(value.parse::<u64>().map_err(|_| bad())?),
            _ => {}
        }
    }
    match (share, accepted) {
        (Some(s), Some(a)) => Ok((s, a)),
        _ => Err("a pacing report needs share= and accepted=".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(requests: u64, errors: u64, latency_ms: &[(u64, u64)]) -> Counts {
        let r = Recorder::new();
        r.begin();
        for (ms, n) in latency_ms {
            for _ in 0..*n {
                r.response(200, Duration::from_millis(*ms));
            }
        }
        let mut c = r.snapshot();
        c.requests = requests;
        c.errors = errors;
        c
    }

    #[test]
    fn buckets_cover_the_range_in_order() {
        let mut last = 0;
        for i in 0..BUCKETS {
            assert_eq!(bucket_of(bucket_low(i)), i, "{i}");
            assert_eq!(bucket_of(bucket_high(i) - 1), i, "{i}");
            assert!(bucket_low(i) >= last);
            last = bucket_high(i);
            // Within 12.5 %.
            if i >= 8 {
                assert!((bucket_high(i) - bucket_low(i)) * 8 <= bucket_low(i));
            }
        }
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
        assert_eq!(bucket_of(0), 0);
    }

    #[test]
    fn quantiles_come_from_the_buckets() {
        let c = counts(1000, 0, &[(1, 990), (50, 10)]);
        let p50 = c.p50().unwrap();
        assert!(p50 >= Duration::from_millis(1) && p50 <= Duration::from_micros(1125));
        let p99 = c.p99().unwrap();
        assert!(p99 <= Duration::from_micros(1125), "{p99:?}");
        assert!(c.quantile(0.995).unwrap() >= Duration::from_millis(50));
        assert_eq!(c.slower_than(Duration::from_millis(10)), 10);
        assert_eq!(Counts::default().p99(), None);
    }

    #[test]
    fn the_recorder_counts_only_in_a_window() {
        let r = Recorder::new();
        r.response(500, Duration::from_millis(1));
        r.failure();
        r.connection();
        assert_eq!(r.snapshot(), Counts::default());
        r.begin();
        r.response(500, Duration::from_millis(1));
        r.response(200, Duration::from_millis(1));
        r.failure();
        r.connection();
        let c = r.snapshot();
        assert_eq!(
            (c.requests, c.errors, c.connections, c.timed()),
            (3, 2, 1, 2)
        );
        r.end();
        r.failure();
        assert_eq!(r.snapshot().requests, 3);
        r.begin();
        assert_eq!(r.snapshot(), Counts::default());
    }

    #[test]
    fn a_worse_error_rate_rolls_back_noise_does_not() {
        let p = Policy::new();
        let old = counts(2377, 2, &[(1, 2375)]);
        let bad = counts(2412, 477, &[(1, 1935)]);
        assert_eq!(p.worse(&bad, &old, Z_FINAL), Some(Verdict::ErrorRate));
        assert_eq!(p.worse(&bad, &old, Z_EARLY), Some(Verdict::ErrorRate));
        // 3 errors in 100 against none: more than a point, but not clear.
        let few = counts(100, 3, &[(1, 97)]);
        let clean = counts(100, 0, &[(1, 100)]);
        assert_eq!(p.worse(&few, &clean, Z_FINAL), None);
        // Below the minimum: not judged at all.
        let tiny = counts(12, 6, &[(1, 6)]);
        assert_eq!(p.worse(&tiny, &old, Z_FINAL), None);
    }

    #[test]
    fn a_slower_p99_rolls_back_a_noisy_tail_does_not() {
        let p = Policy::new();
        let old = counts(2000, 0, &[(1, 1980), (8, 20)]);
        let slow = counts(500, 0, &[(51, 500)]);
        assert_eq!(p.worse(&slow, &old, Z_FINAL), Some(Verdict::Latency));
        // The same tail, a little heavier: within × 1.5 + 10 ms.
        let noisy = counts(2000, 0, &[(1, 1960), (12, 40)]);
        assert_eq!(p.worse(&noisy, &old, Z_FINAL), None);
    }

    #[test]
    fn the_judgement_says_what_it_saw() {
        let old = Recorder::new();
        let mut j = Judging::begin(Policy::new(), old.clone());
        for _ in 0..2377 {
            old.response(200, Duration::from_micros(900));
        }
        assert!(j.report(counts(12, 0, &[(1, 12)])).is_none());
        let done = j.conclude().unwrap();
        assert_eq!(done.verdict, Verdict::TooFewRequests { min: 100 });
        let text = done.to_string();
        assert!(
            text.contains("not judged: canary 12 requests < 100; committed"),
            "{text}"
        );
        let bad = counts(2412, 477, &[(1, 1935)]);
        let early = j.report(bad).expect("clear evidence stops early");
        assert!(early.rolled_back());
        let text = early.to_string();
        assert!(
            text.starts_with("canary 5xx 19.8 % of 2,412 vs 0.0 % of 2,377, p99 "),
            "{text}"
        );
        assert!(text.ends_with("; rolled back: 5xx rate"), "{text}");
        drop(j);
        assert!(!old.is_active());
        let never = Judging::begin(Policy::new(), Recorder::new());
        assert_eq!(never.conclude().unwrap().verdict, Verdict::NoCounts);
    }

    #[test]
    fn the_application_check_rolls_back_with_its_reason() {
        let p = Policy::new().check(|canary, _old| {
            if canary.requests > 5 {
                Err("canary too busy".into())
            } else {
                Ok(())
            }
        });
        let mut j = Judging::begin(p, Recorder::new());
        assert!(j.report(counts(5, 0, &[])).is_none());
        let v = j.report(counts(6, 0, &[])).unwrap();
        assert_eq!(v.verdict, Verdict::Check("canary too busy".into()));
        assert!(v.to_string().ends_with("rolled back: canary too busy"));
    }

    #[test]
    fn pacing_keeps_the_share() {
        let r = Recorder::new();
        r.begin();
        assert!(r.admitted(), "no pacing yet");
        r.pace(100_000, 0);
        assert!(!r.admitted(), "nothing accepted by the other side yet");
        let mut taken = 0;
        for others in (0..=9000).step_by(100) {
            r.pace(100_000, others);
            while r.admitted() {
                r.connection();
                taken += 1;
            }
        }
        assert_eq!(taken, 1000, "1,000 of 10,000");
        r.end();
        assert!(r.admitted());
    }

    #[test]
    fn wire_forms_round_trip_and_refuse_nonsense() {
        let c = counts(30, 3, &[(1, 20), (400, 7)]);
        let c = Counts {
            connections: 4,
            ..c
        };
        assert_eq!(decode_counts(&encode_counts(&c)), Ok(c));
        assert_eq!(decode_counts(" n=0 e=0 c=0 later=5"), Ok(Counts::default()));
        for bad in [
            " n=x",
            " n=1 e=2",
            " h=240:1",
            " h=3:1,3:1",
            " h=4:1,3:1",
            " h=3",
            " nonsense",
            " =3",
        ] {
            assert!(decode_counts(bad).is_err(), "{bad}");
        }
        assert_eq!(decode_pacing(&encode_pacing(100_000, 7)), Ok((100_000, 7)));
        assert!(decode_pacing(" share=0 accepted=1").is_err());
        assert!(decode_pacing(" share=1000000 accepted=1").is_err());
        assert!(decode_pacing(" accepted=1").is_err());
    }

    /// What recording costs per request: outside a window (one atomic load)
    /// and inside one (two clock reads, three atomic additions), from one
    /// thread and from two at once (`cargo test --release --lib
    /// timing_of_recording -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn timing_of_recording() {
        const N: u32 = 5_000_000;
        let r = Recorder::new();
        let per_op = |r: &Recorder, threads: u32| {
            let t = std::time::Instant::now();
            std::thread::scope(|s| {
                for _ in 0..threads {
                    s.spawn(|| {
                        for _ in 0..N {
                            if r.is_active() {
                                let at = std::time::Instant::now();
                                r.response(200, at.elapsed());
                            }
                        }
                    });
                }
            });
            t.elapsed().as_nanos() as f64 / f64::from(N)
        };
        let idle = per_op(&r, 1);
        r.begin();
        let active = per_op(&r, 1);
        let active2 = per_op(&r, 2);
        println!(
            "per request: {idle:.1} ns outside a window, {active:.1} ns in one \
             ({active2:.1} ns with two threads recording at once)"
        );
        assert_eq!(r.snapshot().requests, u64::from(3 * N));
    }

    #[test]
    fn numbers_read_well() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(2412), "2,412");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(latency(Some(Duration::from_micros(850))), "850 µs");
        assert_eq!(latency(Some(Duration::from_micros(1200))), "1.2 ms");
        assert_eq!(latency(Some(Duration::from_millis(250))), "250 ms");
        assert!(Policy::new().share(1.0).validate().is_err());
        assert!(
            Policy::new()
                .max_p99(0.5, Duration::ZERO)
                .validate()
                .is_err()
        );
        assert!(Policy::new().share(0.1).validate().is_ok());
        assert_eq!(Policy::new().share(0.1).share_ppm(), Some(100_000));
    }
}
