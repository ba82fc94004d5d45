//! The `ferry` binary as a user runs it.

use std::process::Command;

fn ferry(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .output()
        .expect("run ferry");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn sim_migrates_between_two_processes_and_the_destination_verifies() {
    let (ok, out, err) = ferry(&[
        "sim",
        "--memory",
        "64M",
        "--workload",
        "freed",
        "--hints",
        "both",
    ]);
    assert!(ok, "ferry sim failed: {err}");
    assert_eq!(
        out.matches("- PASS").count(),
        2,
        "both runs verified: {out}"
    );
    assert!(out.contains("hints off vs on"), "{out}");
    // With 75% of RAM freed, hints must cut the bytes sent well below half.
    let ratio_line = out
        .lines()
        .find(|l| l.starts_with("| bytes sent"))
        .expect("bytes row");
    let ratio: f64 = ratio_line
        .rsplit('|')
        .nth(1)
        .and_then(|c| c.trim().trim_end_matches('x').parse().ok())
        .expect("a ratio");
    assert!(ratio < 0.5, "hints on/off byte ratio {ratio}: {out}");
}

#[test]
fn sim_json_output_is_machine_readable() {
    let (ok, out, err) = ferry(&[
        "sim",
        "--memory",
        "32M",
        "--workload",
        "dirty",
        "--connections",
        "2",
        "--json",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON line");
    assert_eq!(v["verdict"]["mismatches"], 0);
    assert!(v["stats"]["rounds"]
        .as_array()
        .is_some_and(|r| !r.is_empty()));
    assert_eq!(v["stats"]["connections"], 2);
}

#[test]
fn bad_arguments_get_clear_errors() {
    let (ok, _, err) = ferry(&["sim", "--memory", "lots"]);
    assert!(!ok && err.contains("is not a size"), "{err}");
    let (ok, _, err) = ferry(&["sim", "--memory", "12345B"]);
    assert!(!ok && err.contains("not a multiple of 8 KiB"), "{err}");
    // One set of units: a rate without a unit is refused with the units there are.
    let (ok, _, err) = ferry(&["sim", "--bandwidth", "512"]);
    assert!(
        !ok && err.contains("give a unit") && err.contains("Gbit"),
        "{err}"
    );
    let (ok, _, err) = ferry(&["sim", "--connections", "99"]);
    assert!(!ok && err.contains("99"), "{err}");
    // A downtime limit no deadline can be computed from fails as the command line is read,
    // before any VMM is reached (the address below is never connected to).
    for command in [
        &[
            "migrate",
            "--api",
            "/nonexistent.sock",
            "--to",
            "127.0.0.1:1",
        ][..],
        &["sim"][..],
    ] {
        for bad in ["0", "99999999999999999"] {
            let args: Vec<&str> = command
                .iter()
                .copied()
                .chain(["--downtime-ms", bad])
                .collect();
            let (ok, _, err) = ferry(&args);
            assert!(
                !ok && err.contains("--downtime-ms") && err.contains(bad),
                "{args:?}: {err}"
            );
        }
    }
}

#[test]
fn logs_go_to_a_file_as_json_lines_when_asked() {
    let path = std::env::temp_dir().join(format!("ferry-cli-log-{}.json", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["--log-format", "json", "--log-file"])
        .arg(&path)
        .args(["sim", "--memory", "16M", "--workload", "idle", "--json"])
        .env("FERRY_LOG", "debug")
        .output()
        .expect("run ferry");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = std::fs::read_to_string(&path).expect("the log file");
    std::fs::remove_file(&path).unwrap();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(!lines.is_empty(), "nothing logged at debug");
    assert!(lines
        .iter()
        .all(|l| l["level"].is_string() && l["fields"].is_object()));
    // Nothing of it went to stderr.
    assert!(!String::from_utf8_lossy(&out.stderr).contains("DEBUG"));
    let (ok, _, err) = ferry(&["--log-file", "/nonexistent/dir/log", "sim-demo"]);
    assert!(!ok && err.contains("/nonexistent/dir/log"), "{err}");
}

#[test]
fn completions_and_the_manual_page_cover_every_command() {
    let (ok, script, err) = ferry(&["completions", "bash"]);
    assert!(ok, "{err}");
    for command in ["migrate", "receive", "status", "cancel", "balloon"] {
        assert!(script.contains(command), "bash completion lacks {command}");
    }
    let (ok, fish, _) = ferry(&["completions", "fish"]);
    assert!(ok && fish.contains("complete -c ferry"), "{fish}");
    let (ok, _, err) = ferry(&["completions", "tcsh"]);
    assert!(!ok && err.contains("possible values"), "{err}");
    let (ok, page, err) = ferry(&["man"]);
    assert!(ok, "{err}");
    assert!(
        page.starts_with(".ie") && page.contains(".TH ferry 1"),
        "{page}"
    );
    assert!(
        page.contains("migrate") && page.contains("receive"),
        "{page}"
    );
}

#[test]
fn outside_a_checkout_the_demo_says_how_to_find_one() {
    if ferry_lab::hw_kvm_usable() {
        eprintln!("skipped: with hardware KVM `ferry demo` would boot a guest right here");
        return;
    }
    // The binary as `cargo install` leaves it: outside the checkout, run from elsewhere.
    let dir = std::env::temp_dir().join(format!("ferry-cli-installed-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let exe = dir.join("ferry");
    let _ = std::fs::remove_file(&exe);
    if std::fs::hard_link(env!("CARGO_BIN_EXE_ferry"), &exe).is_err() {
        std::fs::copy(env!("CARGO_BIN_EXE_ferry"), &exe).unwrap();
    }
    let out = Command::new(&exe)
        .arg("demo")
        .current_dir(&dir)
        .env_remove(ferry_lab::REPO_ENV)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("cannot find a ferry checkout") && err.contains("FERRY_REPO"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
