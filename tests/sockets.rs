//! Every kind of socket keeps its address through upgrades: TCP on IPv4 and
//! IPv6 with kernel-chosen ports, Unix sockets on a path (which still exists
//! and accepts after the old generation exits) and in the abstract namespace.

mod common;

use std::path::Path;

use common::{Server, TempDir, field, load};

#[test]
fn tcp_v4_and_v6_with_port_zero_keep_their_addresses() {
    let v6 = std::net::TcpListener::bind("[::1]:0").is_ok();
    let mut args = vec!["--listen", "127.0.0.1:0"];
    if v6 {
        args.extend(["--listen", "[::1]:0"]);
    } else {
        eprintln!("IPv6 loopback unavailable here: testing IPv4 only");
    }
    let mut srv = Server::start(&args);
    let addrs = srv.addrs();
    assert_eq!(addrs.len(), if v6 { 2 } else { 1 });
    assert!(addrs.iter().all(|a| a.port() != 0));
    for _ in 0..3 {
        let (_, new) = srv.upgrade();
        assert_eq!(srv.addrs(), addrs, "kernel-chosen ports must carry over");
        for a in &addrs {
            assert_eq!(load::get(*a, "/").expect("request").pid, new, "{a}");
        }
    }
    assert!(srv.stop().success());
}

fn unix_roundtrip(path: &str) {
    let mut srv = Server::start(&["--listen", "127.0.0.1:0", "--unix", path]);
    assert_eq!(field(&srv.ready_line, "unix"), Some(path));
    assert_eq!(
        load::get_unix(Path::new(path)).expect("request").pid,
        srv.pid()
    );
    for _ in 0..3 {
        let (old, new) = srv.upgrade();
        // upgrade() returned after the old generation exited and was reaped.
        assert!(!common::procs::exists(old));
        if !path.starts_with('@') {
            assert!(
                Path::new(path).exists(),
                "the old generation removed {path}"
            );
        }
        assert_eq!(load::get_unix(Path::new(path)).expect("request").pid, new);
    }
    assert!(srv.stop().success());
}

#[test]
fn unix_path_listener_survives_upgrades_and_a_stale_path_is_reused() {
    let dir = TempDir::new("unix");
    let path = dir.path().join("http.sock");
    let p = path.to_str().unwrap();
    unix_roundtrip(p);
    // The last generation stopped; its socket file is stale now. A fresh
    // start removes it and binds again.
    assert!(path.exists());
    unix_roundtrip(p);
}

#[test]
fn abstract_unix_listener_survives_upgrades() {
    unix_roundtrip(&format!("@handover-test-{}", std::process::id()));
}

#[test]
fn a_live_unix_socket_is_not_stolen() {
    let dir = TempDir::new("live");
    let path = dir.path().join("busy.sock");
    let _owner = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let out = common::output_bounded(
        std::process::Command::new(common::server_bin()).args([
            "--listen",
            "127.0.0.1:0",
            "--unix",
            path.to_str().unwrap(),
        ]),
        common::EVENT_TIMEOUT,
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another process is listening on"), "{err}");
}
