//! The shell blocks of README.md and docs/*.md marked to run (```` ```sh run ````) run for real:
//! each against a service started as its systemd unit would start it — examples/axum installed
//! as `myservice` at the deploy path, with its control socket — the paths of the text
//! (`/usr/local/bin`, `/run/myservice`, `build/`) moved into a temporary directory. The Rust
//! blocks are doctests (src/lib.rs), the systemd units run under systemd (tests/systemd.rs).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{Server, TempDir, install, procs};

/// `(file, first line, text)` of every block marked `sh run`.
fn runnable_blocks() -> Vec<(String, usize, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![root.join("README.md")];
    let mut guides: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .expect("docs/")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    guides.sort();
    files.extend(guides);
    let mut blocks = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let mut current: Option<(usize, String)> = None;
        for (i, line) in text.lines().enumerate() {
            match &mut current {
                None if line.trim_end() == "```sh run" => current = Some((i + 2, String::new())),
                Some((start, body)) if line.trim_end() == "```" => {
                    let name = file.strip_prefix(root).unwrap().display().to_string();
                    blocks.push((name, *start, std::mem::take(body)));
                    current = None;
                }
                Some((_, body)) => {
                    body.push_str(line);
                    body.push('\n');
                }
                None => {}
            }
        }
        assert!(current.is_none(), "{}: an unclosed block", file.display());
    }
    blocks
}

/// Runs `script` against a fresh service; panics with its output unless it
/// exits 0 and the service still serves afterwards.
fn run_block(name: &str, line: usize, script: &str) {
    let dir = TempDir::new("docs");
    let bin = dir.path().join("usr/local/bin");
    let run = dir.path().join("run/myservice");
    let build = dir.path().join("build");
    for d in [&bin, &run, &build] {
        std::fs::create_dir_all(d).unwrap();
    }
    let axum = std::fs::read(common::server_bin().with_file_name("axum")).unwrap();
    let deploy = bin.join("myservice");
    install(&deploy, &axum, 0o755);
    install(&build.join("myservice"), &axum, 0o755);
    let ctl = run.join("control");
    let (ctl_s, bin_s) = (ctl.to_str().unwrap(), bin.to_str().unwrap());
    let mut srv = Server::launch_program(
        &deploy,
        &[
            "--listen",
            "127.0.0.1:0",
            "--control",
            ctl_s,
            "--allow-program",
            bin_s,
        ],
    );
    srv.wait_line("listening", None);
    let script = script
        .replace("/usr/local/bin", bin_s)
        .replace("/run/myservice", run.to_str().unwrap())
        .replace("build/myservice", build.join("myservice").to_str().unwrap());
    let path = format!("{bin_s}:{}", std::env::var("PATH").unwrap_or_default());
    let out = common::output_bounded(
        Command::new("sh")
            .args(["-e", "-c", &script])
            .current_dir(dir.path())
            .env("PATH", path),
        Duration::from_secs(120),
    );
    let said = format!(
        "{name}:{line}: exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{said}");
    println!("{said}");
    // Still serving; stop it (and every generation the block made) by pid.
    let status = handover::control::status(&ctl, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{name}:{line}: no status after the block: {e}\n{said}"));
    let pid: u32 = common::json(&status, "pid").parse().unwrap();
    procs::signal(pid, libc::SIGTERM).unwrap();
    assert!(procs::reap(pid, common::EVENT_TIMEOUT).unwrap().success());
    let _ = srv.wait_child();
}

#[test]
fn every_shell_block_marked_to_run_runs() {
    let blocks = runnable_blocks();
    assert!(
        blocks.iter().any(|(f, _, _)| f == "README.md"),
        "the README's operator commands are marked to run"
    );
    for (name, line, script) in &blocks {
        run_block(name, *line, script);
    }
}

/// Every `ini` block of the guides is (a part of) a unit that tests/systemd.rs runs under a real
/// manager: docs/systemd.md's own unit (read from there), or one of examples/systemd/, whose
/// placeholders the block fills in with the values a reader would use.
#[test]
fn every_unit_in_the_guides_is_one_the_systemd_tests_run() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let units: Vec<String> = std::fs::read_dir(root.join("examples/systemd"))
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .collect();
    let mut checked = 0;
    for guide in std::fs::read_dir(root.join("docs")).unwrap() {
        let path = guide.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        for block in text.split("```ini\n").skip(1) {
            let block = &block[..block.find("```").expect("closed")];
            checked += 1;
            if block.starts_with("# myservice.service") {
                continue; // tests/systemd.rs runs it as written
            }
            let normal = |l: &str| {
                l.replace("/usr/local/bin/myservice", "@BIN@")
                    .replace("/run/myservice.sock", "@CTL@")
                    .replace("0.0.0.0:8080", "127.0.0.1:@PORT@")
            };
            let found = units.iter().any(|u| {
                block
                    .lines()
                    .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
                    .all(|l| u.lines().any(|ul| ul.starts_with(&normal(l))))
            });
            assert!(found, "{}: a unit no test runs:\n{block}", path.display());
        }
    }
    assert!(checked >= 2, "{checked} units");
}
