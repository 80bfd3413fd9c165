//! The wire protocol in environment variables.
//!
//! The successor finds its fds exactly as under systemd socket activation
//! ([sd_listen_fds(3)]): fds `3 .. 3 + LISTEN_FDS`, named by the
//! colon-separated `LISTEN_FDNAMES`, valid only when `LISTEN_PID` equals the
//! reading process's pid. `handover` adds variables of its own, read under
//! the same pid check (`HANDOVER_*`, listed below): the fd of the channel to
//! the old generation (always `3 + LISTEN_FDS`), the generation number,
//! whether a state follows, the deploy path, the process group to join, and
//! when the upgrade that started the process began.
//!
//! Decoding is a pure function over a getter, so it is tested without
//! touching the real environment.
//!
//! [sd_listen_fds(3)]: https://www.freedesktop.org/software/systemd/man/latest/sd_listen_fds.html

use std::ffi::OsString;
use std::os::fd::RawFd;

use crate::error::Error;

/// Number of fds passed (systemd protocol).
pub(crate) const LISTEN_FDS: &str = "LISTEN_FDS";
/// The pid the fds are meant for (systemd protocol).
pub(crate) const LISTEN_PID: &str = "LISTEN_PID";
/// Colon-separated fd names (systemd protocol).
pub(crate) const LISTEN_FDNAMES: &str = "LISTEN_FDNAMES";
/// The readiness channel's fd number (ours).
pub(crate) const CHANNEL_FD: &str = "HANDOVER_CHANNEL_FD";
/// This process's generation, 1 for the first (ours).
pub(crate) const GENERATION: &str = "HANDOVER_GENERATION";
/// `1` when the old generation streams a state over the channel (ours).
pub(crate) const STATE: &str = "HANDOVER_STATE";
/// The path plain upgrades run, as the operator deploys to it (symlinks
/// not followed): carried from generation to generation, so that a
/// successor started from another binary (a rollback) or through a symlink
/// still upgrades to the deploy path (ours).
pub(crate) const PROGRAM: &str = "HANDOVER_PROGRAM";
/// The old generation's process group, which the successor joins in
/// `ready()` (ours; see `spawn::join_predecessor_group`).
pub(crate) const PGID: &str = "HANDOVER_PGID";
/// When the upgrade that started this process began — before it chose the
/// program to run — in `CLOCK_MONOTONIC` µs (ours): the moment this
/// generation's binary and configuration are at least as new as.
pub(crate) const STARTED_US: &str = "HANDOVER_STARTED_US";
/// The service's upgrade counters as `SUCCEEDED:FAILED`, the upgrade that
/// started this process counted as a success (ours): kept if the old
/// generation dies before its commit, which carries the exact ones.
pub(crate) const COUNTERS: &str = "HANDOVER_COUNTERS";
/// The channel protocol version the old generation speaks (ours; absent:
/// 1). See `channel`.
pub(crate) const PROTOCOL: &str = "HANDOVER_PROTOCOL";

/// Variables never passed on to a successor: they describe this process,
/// not the next one. The successor gets fresh `LISTEN_*` and `HANDOVER_*`.
/// `WATCHDOG_USEC` is passed on without `WATCHDOG_PID`, so that the
/// successor pings the watchdog once it is the main process.
pub(crate) const NOT_INHERITED: &[&str] = &[
    LISTEN_FDS,
    LISTEN_PID,
    LISTEN_FDNAMES,
    CHANNEL_FD,
    GENERATION,
    STATE,
    PROGRAM,
    PGID,
    STARTED_US,
    COUNTERS,
    PROTOCOL,
    "WATCHDOG_PID",
];

/// The first passed fd (`SD_LISTEN_FDS_START`).
pub(crate) const FDS_START: RawFd = 3;

/// The most fds accepted from the environment. Linux's `fs.nr_open`
/// defaults to this; a larger `LISTEN_FDS` is certainly bogus.
pub(crate) const MAX_FDS: usize = 1 << 20;

/// The name systemd gives fds when `LISTEN_FDNAMES` is unset.
pub(crate) const UNKNOWN_NAME: &str = "unknown";

/// What a predecessor (or systemd) handed to this process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Inherited {
    /// `(name, fd)` for fds `3 .. 3 + LISTEN_FDS`, in order.
    pub fds: Vec<(String, RawFd)>,
    /// The readiness channel to the old generation, if started by one.
    pub channel: Option<RawFd>,
    /// This process's generation.
    pub generation: u64,
    /// Whether a state follows on the channel.
    pub state: bool,
    /// The deploy path of the service (`HANDOVER_PROGRAM`), if given.
    pub program: Option<std::path::PathBuf>,
    /// When the upgrade that started this process began
    /// (`HANDOVER_STARTED_US`), if given.
    pub started_us: Option<u128>,
    /// The service's counters `(succeeded, failed)` (`HANDOVER_COUNTERS`),
    /// if given.
    pub counters: Option<(u64, u64)>,
    /// The old generation's channel protocol version (`HANDOVER_PROTOCOL`;
    /// 1 if absent).
    pub protocol: u32,
}

fn env_err(var: &'static str, value: &OsString, reason: impl Into<String>) -> Error {
    Error::Env {
        var,
        value: value.to_string_lossy().into_owned(),
        reason: reason.into(),
    }
}

fn parse_num<T: std::str::FromStr>(var: &'static str, value: &OsString) -> Result<T, Error> {
    value
        .to_str()
        .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| env_err(var, value, "not a decimal number"))
}

/// Decodes the handoff variables for the process `own_pid`.
///
/// `Ok(None)`: nothing is meant for this process (no `LISTEN_PID`, or one
/// naming another process, as when a variable leaked into a grandchild).
pub(crate) fn decode(
    get: impl Fn(&str) -> Option<OsString>,
    own_pid: u32,
) -> Result<Option<Inherited>, Error> {
    let Some(pid_value) = get(LISTEN_PID) else {
        return Ok(None);
    };
    let pid: u32 = parse_num(LISTEN_PID, &pid_value)?;
    if pid != own_pid {
        return Ok(None);
    }
    let count_value = get(LISTEN_FDS).ok_or_else(|| Error::Env {
        var: LISTEN_FDS,
        value: String::new(),
        reason: format!("unset, but LISTEN_PID names this process ({own_pid})"),
    })?;
    let count: usize = parse_num(LISTEN_FDS, &count_value)?;
    if count > MAX_FDS {
        return Err(env_err(
            LISTEN_FDS,
            &count_value,
            format!("more than the limit of {MAX_FDS} fds"),
        ));
    }
    let names: Vec<String> = match get(LISTEN_FDNAMES) {
        None => vec![UNKNOWN_NAME.to_owned(); count],
        Some(value) => {
            let s = value
                .to_str()
                .ok_or_else(|| env_err(LISTEN_FDNAMES, &value, "not UTF-8"))?;
            let names: Vec<String> = if s.is_empty() {
                Vec::new()
            } else {
                s.split(':').map(str::to_owned).collect()
            };
            if names.len() != count {
                return Err(env_err(
                    LISTEN_FDNAMES,
                    &value,
                    format!("{} names for LISTEN_FDS={count}", names.len()),
                ));
            }
            if let Some(bad) = names.iter().find(|n| n.is_empty()) {
                return Err(env_err(
                    LISTEN_FDNAMES,
                    &value,
                    format!("empty name {bad:?}"),
                ));
            }
            names
        }
    };
    let fds = names.into_iter().zip(FDS_START..).collect::<Vec<_>>();
    let after = FDS_START as usize + count;
    let channel = match get(CHANNEL_FD) {
        None => None,
        Some(value) => {
            let fd: usize = parse_num(CHANNEL_FD, &value)?;
            if fd != after {
                return Err(env_err(
                    CHANNEL_FD,
                    &value,
                    format!("the channel must follow the {count} listed fds, at fd {after}"),
                ));
            }
            Some(fd as RawFd)
        }
    };
    let generation = match get(GENERATION) {
        None => 1,
        Some(value) => {
            let g: u64 = parse_num(GENERATION, &value)?;
            if g == 0 {
                return Err(env_err(GENERATION, &value, "generations count from 1"));
            }
            g
        }
    };
    let state = match get(STATE) {
        None => false,
        Some(v) if v == "1" && channel.is_some() => true,
        Some(v) => {
            return Err(env_err(
                STATE,
                &v,
                "must be 1, and only with HANDOVER_CHANNEL_FD",
            ));
        }
    };
    let program = match get(PROGRAM) {
        None => None,
        Some(v) if v.as_encoded_bytes().first() == Some(&b'/') => Some(v.into()),
        Some(v) => return Err(env_err(PROGRAM, &v, "not an absolute path")),
    };
    let started_us = match get(STARTED_US) {
        None => None,
        Some(v) => Some(parse_num(STARTED_US, &v)?),
    };
    let counters = match get(COUNTERS) {
        None => None,
        Some(v) => {
            let bad = || {
                env_err(
                    COUNTERS,
                    &v,
                    "expected SUCCEEDED:FAILED, two decimal numbers",
                )
            };
            let (a, b) = v.to_str().and_then(|s| s.split_once(':')).ok_or_else(bad)?;
            let num = |n: &str| parse_num::<u64>(COUNTERS, &OsString::from(n)).map_err(|_| bad());
            Some((num(a)?, num(b)?))
        }
    };
    let protocol = match get(PROTOCOL) {
        None => 1,
        Some(v) => match parse_num::<u32>(PROTOCOL, &v)? {
            0 => return Err(env_err(PROTOCOL, &v, "versions count from 1")),
            n => n,
        },
    };
    Ok(Some(Inherited {
        fds,
        channel,
        generation,
        state,
        program,
        started_us,
        counters,
        protocol,
    }))
}

/// The variables a successor is started with, except `LISTEN_PID`, which
/// the child fills in with its own pid after fork.
pub(crate) fn successor_vars(
    names: &[&str],
    generation: u64,
    state: bool,
    program: &std::path::Path,
    started_us: u128,
    counters: (u64, u64),
) -> Vec<(&'static str, String)> {
    let mut vars = vec![
        (LISTEN_FDS, names.len().to_string()),
        (LISTEN_FDNAMES, names.join(":")),
        (CHANNEL_FD, (FDS_START as usize + names.len()).to_string()),
        (GENERATION, generation.to_string()),
        (STARTED_US, started_us.to_string()),
        (COUNTERS, format!("{}:{}", counters.0, counters.1)),
        (PROTOCOL, crate::channel::VERSION.to_string()),
    ];
    if state {
        vars.push((STATE, "1".to_owned()));
    }
    // A path that is not UTF-8 is not carried: the successor then upgrades
    // to the binary it runs.
    if let Some(p) = program.to_str() {
        vars.push((PROGRAM, p.to_owned()));
    }
    vars
}

/// Checks that `name` can travel in `LISTEN_FDNAMES`: the rules of
/// systemd's `FileDescriptorName=` (1-255 printable ASCII characters, no
/// colon, no white space).
pub(crate) fn validate_name(name: &str) -> Result<(), Error> {
    let reason = if name.is_empty() {
        "empty"
    } else if name.len() > 255 {
        "longer than 255 bytes"
    } else if name.contains(':') {
        "contains ':', the separator of LISTEN_FDNAMES"
    } else if !name.bytes().all(|b| b.is_ascii_graphic()) {
        "only printable ASCII without spaces is allowed"
    } else {
        return Ok(());
    };
    Err(Error::InvalidName {
        name: name.to_owned(),
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn getter(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> + use<> {
        let map: HashMap<String, OsString> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn nothing_without_listen_pid() {
        assert_eq!(decode(getter(&[("LISTEN_FDS", "2")]), 7).unwrap(), None);
    }

    #[test]
    fn other_pid_is_ignored_even_with_garbage_elsewhere() {
        let got = decode(getter(&[("LISTEN_PID", "8"), ("LISTEN_FDS", "x")]), 7).unwrap();
        assert_eq!(got, None);
    }

    #[test]
    fn systemd_style_without_names() {
        let got = decode(getter(&[("LISTEN_PID", "7"), ("LISTEN_FDS", "2")]), 7)
            .unwrap()
            .unwrap();
        assert_eq!(got.fds, vec![("unknown".into(), 3), ("unknown".into(), 4)]);
        assert_eq!(got.channel, None);
        assert_eq!(got.generation, 1);
    }

    #[test]
    fn full_handover_set() {
        let g = getter(&[
            ("LISTEN_PID", "7"),
            ("LISTEN_FDS", "2"),
            ("LISTEN_FDNAMES", "http:admin"),
            ("HANDOVER_CHANNEL_FD", "5"),
            ("HANDOVER_GENERATION", "4"),
        ]);
        let got = decode(g, 7).unwrap().unwrap();
        assert_eq!(got.fds, vec![("http".into(), 3), ("admin".into(), 4)]);
        assert_eq!(got.channel, Some(5));
        assert_eq!(got.generation, 4);
    }

    #[test]
    fn zero_fds_with_channel() {
        let g = getter(&[
            ("LISTEN_PID", "7"),
            ("LISTEN_FDS", "0"),
            ("LISTEN_FDNAMES", ""),
            ("HANDOVER_CHANNEL_FD", "3"),
        ]);
        let got = decode(g, 7).unwrap().unwrap();
        assert!(got.fds.is_empty());
        assert_eq!(got.channel, Some(3));
    }

    fn err(vars: &[(&str, &str)]) -> String {
        decode(getter(vars), 7).unwrap_err().to_string()
    }

    #[test]
    fn malformed_values_are_refused_with_the_variable_named() {
        assert!(err(&[("LISTEN_PID", "7x")]).starts_with("LISTEN_PID=\"7x\" is invalid"));
        assert!(err(&[("LISTEN_PID", "7")]).contains("LISTEN_FDS"));
        assert!(err(&[("LISTEN_PID", "7"), ("LISTEN_FDS", "-1")]).contains("not a decimal"));
        assert!(err(&[("LISTEN_PID", "7"), ("LISTEN_FDS", "+1")]).contains("not a decimal"));
        assert!(err(&[("LISTEN_PID", "7"), ("LISTEN_FDS", "99999999")]).contains("limit"));
        let e = err(&[
            ("LISTEN_PID", "7"),
            ("LISTEN_FDS", "2"),
            ("LISTEN_FDNAMES", "a"),
        ]);
        assert!(e.contains("1 names for LISTEN_FDS=2"), "{e}");
        let e = err(&[
            ("LISTEN_PID", "7"),
            ("LISTEN_FDS", "2"),
            ("LISTEN_FDNAMES", "a:"),
        ]);
        assert!(e.contains("empty name"), "{e}");
        let e = err(&[
            ("LISTEN_PID", "7"),
            ("LISTEN_FDS", "1"),
            ("HANDOVER_CHANNEL_FD", "9"),
        ]);
        assert!(e.contains("at fd 4"), "{e}");
        let e = err(&[
            ("LISTEN_PID", "7"),
            ("LISTEN_FDS", "1"),
            ("HANDOVER_GENERATION", "0"),
        ]);
        assert!(e.contains("from 1"), "{e}");
        for bad in ["1", "1:", ":1", "1:x", "-1:2"] {
            let e = err(&[
                ("LISTEN_PID", "7"),
                ("LISTEN_FDS", "0"),
                ("HANDOVER_COUNTERS", bad),
            ]);
            assert!(
                e.contains("HANDOVER_COUNTERS") && e.contains("SUCCEEDED:FAILED"),
                "{e}"
            );
        }
    }

    #[test]
    fn successor_vars_round_trip() {
        let vars = successor_vars(
            &["http", "udp"],
            3,
            true,
            std::path::Path::new("/srv/app/current/svc"),
            1234,
            (5, 2),
        );
        let mut all: Vec<(&str, String)> = vars.clone();
        all.push((LISTEN_PID, "42".into()));
        let owned: Vec<(String, String)> = all
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        let get = move |k: &str| {
            owned
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| OsString::from(v))
        };
        let got = decode(get, 42).unwrap().unwrap();
        assert_eq!(got.fds, vec![("http".into(), 3), ("udp".into(), 4)]);
        assert_eq!(got.channel, Some(5));
        assert_eq!(got.generation, 3);
        assert!(got.state);
        assert_eq!(got.started_us, Some(1234));
        assert_eq!(got.counters, Some((5, 2)));
        assert_eq!(got.protocol, crate::channel::VERSION);
        assert_eq!(
            got.program.as_deref(),
            Some(std::path::Path::new("/srv/app/current/svc"))
        );
    }

    #[test]
    fn a_relative_program_is_refused() {
        let e = decode(
            getter(&[
                ("LISTEN_PID", "7"),
                ("LISTEN_FDS", "0"),
                ("HANDOVER_PROGRAM", "svc"),
            ]),
            7,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("HANDOVER_PROGRAM") && e.contains("absolute"),
            "{e}"
        );
    }

    #[test]
    fn names() {
        assert!(validate_name("http").is_ok());
        assert!(validate_name("http.1").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name("a:b").is_err());
        assert!(validate_name("a b").is_err());
        assert!(validate_name(&"x".repeat(256)).is_err());
    }
}
