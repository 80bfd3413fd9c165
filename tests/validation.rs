//! What a process is handed is checked before use: a bogus inherited fd or
//! variable is refused with a message that names it; a good one (as systemd
//! socket activation passes it) is taken by name.

mod common;

use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::{TempDir, load, procs};

/// Runs http_server with `fd` at 3, `vars` in its environment and
/// `LISTEN_PID` set to its own pid (unless `vars` sets it), like systemd
/// does. Returns the exit status and stderr; kills it if still running
/// after `timeout` or once it reports ready (returning `None`).
fn run(
    fd: Option<RawFd>,
    vars: &[(&str, &str)],
    args: &[&str],
) -> (Option<ExitStatus>, String, String) {
    let dir = TempDir::new("validation");
    let out_path = dir.path().join("out");
    let err_path = dir.path().join("err");
    let own_pid = !vars.iter().any(|(k, _)| *k == "LISTEN_PID");
    let script = if own_pid {
        "export LISTEN_PID=$$; exec \"$0\" \"$@\""
    } else {
        "exec \"$0\" \"$@\""
    };
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(script)
        .arg(common::server_bin())
        .args(args);
    cmd.envs(vars.iter().copied())
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap());
    place_at_3(&mut cmd, fd);
    let mut child = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        let out = std::fs::read_to_string(&out_path).unwrap_or_default();
        if out.starts_with("ready") || Instant::now() >= deadline {
            procs::signal(child.id(), libc::SIGTERM).unwrap();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let out = std::fs::read_to_string(&out_path).unwrap();
    let err = std::fs::read_to_string(&err_path).unwrap();
    (status, out, err)
}

/// Puts `fd` at 3 in the child, inheritable (`dup2(3, 3)` would keep
/// FD_CLOEXEC, so an fd already at 3 gets the flag cleared instead), and
/// closes every fd above 3 that the test runner may pass down (cargo's
/// jobserver pipes), so that none stands in for an fd a case leaves out.
fn place_at_3(cmd: &mut Command, fd: Option<RawFd>) {
    // SAFETY: the closure runs between fork and exec and only calls dup2,
    // fcntl and close_range, which are async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(src) = fd {
                if src == 3 {
                    let flags = libc::fcntl(3, libc::F_GETFD);
                    libc::fcntl(3, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
                } else if libc::dup2(src, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            libc::syscall(libc::SYS_close_range, 4u32, u32::MAX, 0u32);
            Ok(())
        });
    }
}

fn refused(fd: Option<RawFd>, vars: &[(&str, &str)], args: &[&str], expect: &str) {
    let (status, out, err) = run(fd, vars, args);
    let status =
        status.unwrap_or_else(|| panic!("accepted, but should refuse with {expect:?}: {out}"));
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains(expect), "expected {expect:?} in stderr: {err}");
}

const HTTP: &[(&str, &str)] = &[("LISTEN_FDS", "1"), ("LISTEN_FDNAMES", "http")];

#[test]
fn a_regular_file_is_refused() {
    let f = std::fs::File::open(common::server_bin()).unwrap();
    refused(
        Some(f.as_raw_fd()),
        HTTP,
        &["--listen", "127.0.0.1:0"],
        "inherited fd 3 named \"http\" is refused: expected a TCP listener on 127.0.0.1:0, found a regular file",
    );
}

#[test]
fn a_connected_socket_is_refused() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let s = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    refused(
        Some(s.as_raw_fd()),
        HTTP,
        &["--listen", "127.0.0.1:0"],
        &format!(
            "found a connected socket (peer {})",
            l.local_addr().unwrap()
        ),
    );
}

#[test]
fn a_wrong_family_or_type_is_refused() {
    let dir = TempDir::new("family");
    let u = std::os::unix::net::UnixListener::bind(dir.path().join("s")).unwrap();
    refused(
        Some(u.as_raw_fd()),
        HTTP,
        &["--listen", "127.0.0.1:0"],
        "family IPv4 (AF_INET), found family Unix (AF_UNIX)",
    );
    let d = UdpSocket::bind("127.0.0.1:0").unwrap();
    refused(
        Some(d.as_raw_fd()),
        HTTP,
        &["--listen", "127.0.0.1:0"],
        "type stream (SOCK_STREAM), found type datagram (SOCK_DGRAM)",
    );
}

#[test]
fn a_listener_on_another_address_is_refused() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let other = format!(
        "127.0.0.1:{}",
        if addr.port() == 65535 {
            65534
        } else {
            addr.port() + 1
        }
    );
    refused(
        Some(l.as_raw_fd()),
        HTTP,
        &["--listen", &other],
        &format!("found one bound to {addr}"),
    );
}

#[test]
fn bogus_variables_are_refused_with_the_variable_named() {
    refused(
        None,
        &[("LISTEN_FDS", "abc")],
        &[],
        "LISTEN_FDS=\"abc\" is invalid: not a decimal number",
    );
    refused(
        None,
        &[("LISTEN_FDS", "2"), ("LISTEN_FDNAMES", "http")],
        &[],
        "1 names for LISTEN_FDS=2",
    );
    refused(
        None,
        &[
            ("LISTEN_FDS", "1"),
            ("LISTEN_FDNAMES", "http"),
            ("HANDOVER_CHANNEL_FD", "9"),
        ],
        &[],
        "HANDOVER_CHANNEL_FD=\"9\" is invalid",
    );
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    refused(
        Some(l.as_raw_fd()),
        &[("LISTEN_FDS", "2"), ("LISTEN_FDNAMES", "http:admin")],
        &["--listen", "127.0.0.1:0"],
        "inherited fd 4 named \"admin\" is refused: LISTEN_FDS lists it, but it is not open",
    );
}

#[test]
fn variables_meant_for_another_process_are_ignored() {
    let (status, out, err) = run(
        None,
        &[("LISTEN_PID", "1"), ("LISTEN_FDS", "3")],
        &["--listen", "127.0.0.1:0"],
    );
    assert!(status.is_none(), "refused: {err}");
    assert!(out.starts_with("ready"), "{out}");
}

#[test]
fn a_socket_activated_listener_is_taken_by_name() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    // Pending before the server even starts: it must answer this one.
    let mut early = TcpStream::connect(addr).unwrap();
    early.set_read_timeout(Some(load::IO_TIMEOUT)).unwrap();
    load::send_get(&mut early, "/", false).unwrap();
    let dir = TempDir::new("activated");
    let out_path = dir.path().join("out");
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg("export LISTEN_PID=$$; exec \"$0\" \"$@\"")
        .arg(common::server_bin())
        .args(["--listen", &addr.to_string()])
        .envs(HTTP.iter().copied())
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(Stdio::null());
    place_at_3(&mut cmd, Some(l.as_raw_fd()));
    let mut child = cmd.spawn().unwrap();
    drop(l);
    let r = load::read_response(&mut std::io::BufReader::new(early)).expect("answered");
    assert_eq!(r.pid, child.id());
    common::wait_until("ready line", Duration::from_secs(10), || {
        std::fs::read_to_string(&out_path)
            .unwrap_or_default()
            .starts_with("ready")
    });
    let out = std::fs::read_to_string(&out_path).unwrap();
    assert!(out.contains(&format!("addr={addr}")), "{out}");
    procs::signal(child.id(), libc::SIGTERM).unwrap();
    assert!(child.wait().unwrap().success());
}

#[test]
fn an_inherited_control_socket_others_can_reach_is_refused() {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::{SocketAddr, UnixListener};
    const CONTROL: &[(&str, &str)] = &[("LISTEN_FDS", "1"), ("LISTEN_FDNAMES", "handover.control")];
    let dir = TempDir::new("ctl-inherited");
    let path = dir.path().join("ctl");
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--control",
        path.to_str().unwrap(),
    ];
    // As a socket unit with the default SocketMode=0666 would pass it.
    let open = UnixListener::bind(&path).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
    refused(
        Some(open.as_raw_fd()),
        CONTROL,
        &args,
        "has mode 0666: group or others may connect: other users could reach the control socket",
    );
    // An abstract socket: anyone in the network namespace may connect.
    let name = format!("handover-test-ctl-{}", std::process::id());
    let abs = UnixListener::bind_addr(&SocketAddr::from_abstract_name(name).unwrap()).unwrap();
    refused(
        Some(abs.as_raw_fd()),
        CONTROL,
        &args,
        "it is an abstract socket",
    );
    // 0600, ours: taken.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (status, out, err) = run(Some(open.as_raw_fd()), CONTROL, &args);
    assert!(status.is_none(), "refused a private control socket: {err}");
    assert!(out.starts_with("ready"), "{out}{err}");
}
