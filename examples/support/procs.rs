//! Process bookkeeping for the demo and the tests: reaping descendants as a
//! child subreaper, counting fds and zombies through /proc.
#![allow(dead_code)] // each includer uses a different part

use std::io;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

/// Makes this process the subreaper of its descendants, so that every
/// generation of a server it started is reparented to it and can be reaped
/// here, with its exit status.
pub fn become_subreaper() {
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) takes an integer flag and
    // touches no memory of ours.
    let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(
        r,
        0,
        "prctl(PR_SET_CHILD_SUBREAPER): {}",
        io::Error::last_os_error()
    );
}

/// Reaps `pid` once it has exited and been reparented to us, waiting at
/// most `timeout` (a probe loop with a deadline).
pub fn reap(pid: u32, timeout: Duration) -> io::Result<ExitStatus> {
    use std::os::unix::process::ExitStatusExt;
    let deadline = Instant::now() + timeout;
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes the status into the int it is given.
        let r = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, libc::WNOHANG) };
        if r == pid as libc::pid_t {
            return Ok(ExitStatus::from_raw(status));
        }
        if r < 0 {
            let e = io::Error::last_os_error();
            // ECHILD: not (yet) our child: its parent is still alive.
            if e.raw_os_error() != Some(libc::ECHILD) {
                return Err(e);
            }
        }
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("pid {pid} not reaped within {timeout:?}"),
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Waits (at most `timeout`) until `pid` has exited, and returns its wait
/// status without reaping it: read from `/proc/PID/stat` (`exit_code`,
/// Linux 3.5) while it is a zombie, whoever its parent is.
pub fn exit_status(pid: u32, timeout: Duration) -> io::Result<ExitStatus> {
    use std::os::unix::process::ExitStatusExt;
    let deadline = Instant::now() + timeout;
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        if fields.first() == Some(&"Z") {
            let code = fields
                .get(49)
                .and_then(|c| c.parse::<i32>().ok())
                .ok_or_else(|| io::Error::other(format!("no exit_code in {stat:?}")))?;
            return Ok(ExitStatus::from_raw(code));
        }
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("pid {pid} did not exit within {timeout:?}"),
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Whether `pid` exists (zombies count as existing).
pub fn exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// The open fds of `pid`, as `(fd, link target)`.
pub fn fds(pid: u32) -> io::Result<Vec<(i32, String)>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let e = e?;
        let Some(fd) = e.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let target = std::fs::read_link(e.path())
            .map(|t| t.display().to_string())
            .unwrap_or_default();
        out.push((fd, target));
    }
    out.sort();
    Ok(out)
}

/// The number of open fds of `pid`.
pub fn fd_count(pid: u32) -> usize {
    fds(pid).map(|f| f.len()).unwrap_or(0)
}

/// `(pid, state)` of every child of `parent`, from /proc/*/stat.
pub fn children(parent: u32) -> Vec<(u32, char)> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // The command name may hold spaces and parentheses: parse after the last ')'.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next().and_then(|s| s.chars().next()).unwrap_or('?');
        let ppid: u32 = fields.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        if ppid == parent {
            out.push((pid, state));
        }
    }
    out
}

/// Zombie children of `parent`.
pub fn zombies(parent: u32) -> Vec<u32> {
    children(parent)
        .into_iter()
        .filter(|(_, s)| *s == 'Z')
        .map(|(p, _)| p)
        .collect()
}

/// Sends `sig` to `pid`.
pub fn signal(pid: u32, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: kill takes a pid and a signal number and touches no memory.
    if unsafe { libc::kill(pid as libc::pid_t, sig) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The lines of `r` (a child's stdout), read by a thread, as they come.
pub fn line_channel(r: impl io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    use io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in io::BufReader::new(r).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}
