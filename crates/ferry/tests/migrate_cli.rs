//! `ferry migrate` and `ferry receive` failure paths that need no KVM: each must exit non-zero
//! with a sentence that says what went wrong.

use std::process::Command;

fn ferry(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .env("FERRY_LOG", "off")
        .output()
        .expect("run ferry");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn migrate_without_a_reachable_vmm_says_so() {
    let dir = std::env::temp_dir().join(format!("ferry-migrate-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let api = dir.join("nobody.api");
    let (ok, err) = ferry(&[
        "migrate",
        "--api",
        api.to_str().unwrap(),
        "--to",
        "127.0.0.1:1",
    ]);
    assert!(!ok);
    assert!(
        err.contains("the source VMM at") && err.contains("nobody.api"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn migrate_refuses_bad_arguments_before_contacting_anything() {
    let (ok, err) = ferry(&["migrate", "--api", "/x", "--to", "nowhere"]);
    assert!(!ok);
    assert!(err.contains("is not an address"), "{err}");
    // A valid destination and one bad option.
    let with = |option: &str, value: &str| {
        ferry(&[
            "migrate",
            "--api",
            "/x",
            "--to",
            "127.0.0.1:1",
            option,
            value,
        ])
    };
    let (ok, err) = with("--connections", "17");
    assert!(!ok);
    assert!(err.contains("17"), "{err}");
    for (bad, says) in [
        ("zstd:99", "zstd level 99 is not between 1 and 19"),
        ("lz4", "none, zstd or zstd:LEVEL"),
    ] {
        let (ok, err) = with("--compress", bad);
        assert!(!ok);
        assert!(err.contains(says) && !err.contains("/x"), "{err}");
    }
}

#[test]
fn receive_fails_cleanly_when_no_vm_can_be_created() {
    // An unusable KVM device: the destination must stop before listening, with the reason.
    let (ok, err) = ferry(&[
        "receive",
        "--listen",
        "127.0.0.1:0",
        "--kvm",
        "/nonexistent/kvm",
    ]);
    assert!(!ok);
    assert!(err.contains("cannot create the destination VM"), "{err}");
    assert!(err.contains("/nonexistent/kvm"), "{err}");
    assert!(!err.contains("waiting for a migration"), "{err}");
}

#[test]
fn cancel_without_a_reachable_vmm_says_so() {
    let (ok, err) = ferry(&["cancel", "--api", "/nonexistent/ferry.api"]);
    assert!(!ok);
    assert!(err.contains("the VMM at /nonexistent/ferry.api"), "{err}");
    let (ok, err) = ferry(&["cancel"]);
    assert!(!ok && err.contains("--api"), "{err}");
}

#[test]
fn a_destination_answers_its_api_while_it_waits_for_a_migration() {
    // The destination serves its API socket from the start (so binding it is not part of the
    // downtime): until a VM runs there, requests get a sentence, not a missing socket.
    // `--kvm /dev/null --allow-pvm` gets past the KVM check without KVM; no VM is built
    // before a source arrives.
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    use std::time::Duration;

    let dir = std::env::temp_dir().join(format!("ferry-cli-dest-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let api = dir.join("b.api");
    let api_arg = api.to_str().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args([
            "receive",
            "--listen",
            "127.0.0.1:0",
            "--api-socket",
            api_arg,
        ])
        .args(["--kvm", "/dev/null", "--allow-pvm"])
        .env("FERRY_LOG", "off")
        .stderr(Stdio::piped())
        .spawn()
        .expect("run ferry receive");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut seen = Vec::new();
    let waiting = loop {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) if line.starts_with("ferry: waiting for a migration on ") => break true,
            Ok(line) => seen.push(line),
            Err(_) => break false,
        }
    };
    let status = waiting.then(|| ferry(&["status", "--api", api_arg]));
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(waiting, "the destination never waited: {seen:?}");
    let (ok, err) = status.unwrap();
    assert!(!ok, "a destination without a VM answered status");
    assert!(err.contains("migration-active"), "{err}");
    assert!(err.contains("no VM runs here yet"), "{err}");

    // A socket it cannot bind fails the command before it takes a source.
    let (ok, err) = ferry(&[
        "receive",
        "--listen",
        "127.0.0.1:0",
        "--api-socket",
        "/nonexistent/dir/b.api",
        "--kvm",
        "/dev/null",
        "--allow-pvm",
    ]);
    assert!(!ok);
    assert!(err.contains("/nonexistent/dir/b.api"), "{err}");
    assert!(!err.contains("waiting for a migration"), "{err}");
}
