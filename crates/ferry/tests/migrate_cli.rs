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
